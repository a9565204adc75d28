//! Plain data of the Raft core: identities, terms, time, the log and the
//! configuration. Everything here is serializable so it can be persisted and
//! sent between peers.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::{Add, Sub};
use std::sync::Arc;
use std::time::Duration;

/// A Raft term (Raft paper §5.1). Terms only grow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Term(pub u64);

impl Term {
    /// Returns the term after this one.
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A position in the replicated log; the first entry has index 1, 0 means "none".
pub type LogIndex = u64;

/// The identity of one member: a name (the pod name) and an incarnation.
///
/// A process that starts without persisted state draws a fresh incarnation,
/// so it is a *new* member and can never vote as its old self (the
/// architecture's "incarnations" rule). The old incarnation is removed from
/// the configuration like any member that is gone.
///
/// The name is shared, not copied, when an id is cloned: ids are cloned
/// into every message, view and map, tens of times a round on a leader.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId {
    /// Stable name, e.g. the pod name.
    pub name: Arc<str>,
    /// Random per fresh start; persisted with the hard state.
    pub incarnation: u64,
}

impl NodeId {
    /// Creates an identity from a name and an incarnation.
    pub fn new(name: impl Into<Arc<str>>, incarnation: u64) -> NodeId {
        NodeId {
            name: name.into(),
            incarnation,
        }
    }
}

impl std::str::FromStr for NodeId {
    type Err = String;

    /// Parses `name#incarnation-hex`, the form [`Display`](fmt::Display) writes.
    fn from_str(s: &str) -> Result<NodeId, String> {
        let (name, inc) = s
            .rsplit_once('#')
            .ok_or_else(|| format!("node id {s:?} is not of the form name#incarnation"))?;
        if name.is_empty() {
            return Err(format!("node id {s:?} has an empty name"));
        }
        let incarnation = u64::from_str_radix(inc, 16)
            .map_err(|_| format!("node id {s:?} has a bad incarnation {inc:?}"))?;
        Ok(NodeId::new(name, incarnation))
    }
}

// Serialized as its string form so it can key JSON maps.
impl Serialize for NodeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<NodeId, D::Error> {
        /// Parses the borrowed text where the format allows (no copy first).
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member id `name#hex-incarnation`")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<NodeId, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{:x}", self.name, self.incarnation)
    }
}

/// A point on one node's local monotonic clock, in nanoseconds from an
/// arbitrary origin. The core never reads a clock: callers pass `Time` in.
/// Times from different nodes are not comparable.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(u64);

impl Time {
    /// The origin of the clock.
    pub const ZERO: Time = Time(0);

    /// Creates a time from nanoseconds since the clock's origin.
    pub const fn from_nanos(nanos: u64) -> Time {
        Time(nanos)
    }

    /// Returns nanoseconds since the clock's origin.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Returns how long after `earlier` this time is, or zero if it is not after.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        Time(
            self.0
                .saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// Who votes and who only follows, with the address each member is reached at.
///
/// Changed one server at a time through the log (dissertation §4.1), so the
/// majorities of two consecutive configurations always intersect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Configuration {
    /// Members whose votes and acknowledgements count toward a quorum.
    pub voters: BTreeMap<NodeId, String>,
    /// Members that replicate the log but neither vote nor count.
    pub learners: BTreeMap<NodeId, String>,
}

impl Configuration {
    /// Returns a configuration in which every given member votes.
    pub fn with_voters<I: IntoIterator<Item = (NodeId, String)>>(voters: I) -> Configuration {
        Configuration {
            voters: voters.into_iter().collect(),
            learners: BTreeMap::new(),
        }
    }

    /// Returns whether `id` votes in this configuration.
    pub fn is_voter(&self, id: &NodeId) -> bool {
        self.voters.contains_key(id)
    }

    /// Returns whether `id` is a learner in this configuration.
    pub fn is_learner(&self, id: &NodeId) -> bool {
        self.learners.contains_key(id)
    }

    /// Returns whether `id` is a voter or a learner.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.is_voter(id) || self.is_learner(id)
    }

    /// Returns the address of a member.
    pub fn address(&self, id: &NodeId) -> Option<&str> {
        self.voters
            .get(id)
            .or_else(|| self.learners.get(id))
            .map(String::as_str)
    }

    /// Iterates over all members, voters first.
    pub fn members(&self) -> impl Iterator<Item = (&NodeId, &String)> {
        self.voters.iter().chain(self.learners.iter())
    }

    /// Returns the number of voters that make a majority (0 voters: 1, never reached).
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// Returns whether some majority of `self` and some majority of `other`
    /// are disjoint, i.e. two leaders could be elected, one by each.
    pub fn has_disjoint_majority_with(&self, other: &Configuration) -> bool {
        if self.voters.is_empty() || other.voters.is_empty() {
            return false;
        }
        let both = self.voters.keys().filter(|id| other.is_voter(id)).count();
        let only_self = self.voters.len() - both;
        let only_other = other.voters.len() - both;
        let need_self = self.quorum().saturating_sub(only_self);
        let need_other = other.quorum().saturating_sub(only_other);
        need_self + need_other <= both
    }
}

/// What a log entry carries. The elector replicates nothing but its own
/// configuration; the no-op commits a new leader's term (Raft paper §8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Committed by every new leader before any configuration change.
    Noop,
    /// A new configuration, in force from the moment it is appended.
    Config(Configuration),
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log.
    pub index: LogIndex,
    /// Term of the leader that created the entry.
    pub term: Term,
    /// What the entry carries.
    pub payload: Payload,
}

/// The compacted prefix of the log: everything up to `last_index` is
/// committed and summarised by the configuration in force at that index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Index of the last entry the snapshot replaces (0: empty).
    pub last_index: LogIndex,
    /// Term of that entry.
    pub last_term: Term,
    /// Configuration in force at `last_index`.
    pub config: Configuration,
}

/// Everything that MUST be on stable storage before a message that depends
/// on it is sent (Raft paper Figure 2, "persistent state").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// This member's identity, including its incarnation.
    pub id: NodeId,
    /// Latest term this node has seen.
    pub term: Term,
    /// Candidate voted for in `term`.
    pub voted_for: Option<NodeId>,
    /// Compacted prefix of the log.
    pub snapshot: Snapshot,
    /// Log entries after the snapshot, in index order.
    pub entries: Vec<Entry>,
    /// The first configuration this incarnation promised to bootstrap with
    /// (local bootstrap agreement, `runtime::bootstrap`). Persisted before
    /// it is reported to any peer; an incarnation promises at most once.
    #[serde(default)]
    pub bootstrap_lock: Option<Configuration>,
}
