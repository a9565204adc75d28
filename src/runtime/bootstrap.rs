//! Bootstrap: the first configuration holds every expected member as a voter
//! (up to `--max-voters`, the rest learners), agreed on before any vote.
//!
//! With `--bootstrap-expect N` the group is fault tolerant from its first
//! election, the way Consul's `bootstrap_expect` and etcd's
//! `--initial-cluster` are: there is never a one-voter cluster that grows
//! later. Who decides the first configuration is a [`BootstrapAuthority`]:
//! today the members' [`LocalAgreement`]; in Kubernetes (issue 9) a
//! compare-and-swap on the LeaderElection CR status takes its place (see
//! "The seam" below).
//!
//! # The local agreement: one proposer, a promise from everyone, then bootstrap
//!
//! ```text
//!   hello answers (PeerInfo: joined, bootstrap_lock) ──► observe()
//!                                                           │
//!   housekeeping / each answer ──► decide(local view) ──────┤
//!        ┌──────────────────────────────────────────────────┘
//!        ▼
//!   Lock(P)       promise P: persisted in the hard state BEFORE it is reported
//!   Bootstrap(P)  every member of P reports the promise P: install P as index 1
//!   Abandon       the promise can never complete: continue as a new incarnation
//! ```
//!
//! 1. **Propose.** A node with an empty log and no promise, that sees no
//!    member of an existing cluster and at least `N − 1` other fresh,
//!    unjoined, unpromised peers (one id per name, each heard within
//!    [`SETTLE`]: a quiet one may be restarting), takes itself and the
//!    `N − 1` lowest of them. If it is the lowest id of that set it promises
//!    the set as configuration `P` (voters: the lowest ids, as many as the
//!    largest odd number ≤ `min(N, max_voters)`; the others learners).
//! 2. **Adopt.** A node with an empty log and no promise that sees a peer
//!    report a promise `P` containing its own id (same incarnation), with
//!    `N` members of distinct names and the voter rule above, promises `P`.
//! 3. **Bootstrap.** A node that promised `P` and sees every other member
//!    of `P` report the promise `P`, or one member report having
//!    bootstrapped `P` (which it did only after seeing every promise),
//!    installs `P` as its first configuration, then elects as usual.
//! 4. **Abandon.** A promise that can never complete is given up: at once
//!    when a member promised another configuration or joined a cluster
//!    without it (then nobody saw every promise, nobody bootstrapped it);
//!    when a member was replaced by a new incarnation of its name, another
//!    cluster answers, or not every member confirmed within
//!    [`LOCK_TIMEOUT`], only once giving up cannot take a voter from a
//!    cluster that bootstrapped the promise behind this node's back
//!    (`LocalAgreement::may_give_up`: the promise can never reach a quorum
//!    again, or a quorum of its voters was just heard not having
//!    bootstrapped it). A bootstrapped
//!    configuration under which this node knows nothing committed once a
//!    majority of its voters is gone (replaced by new incarnations, or
//!    silent for [`LOCK_TIMEOUT`] while a majority of the expected members
//!    answer unbootstrapped): the node continues as a **new incarnation**
//!    with no state, exactly like a stateless restart.
//! 5. **Join, never bootstrap.** A node that sees a member of an existing
//!    cluster does not propose; it waits to be added as a learner. A node
//!    with a log never bootstraps. A leader never adds a node that holds a
//!    promise and no log, and such a node refuses messages from outside its
//!    promise (`RaftCore::lock_bootstrap`).
//!
//! # Why two clusters never both elect a leader for one group
//!
//! - *Promises are unique per incarnation.* An incarnation promises at most
//!   once (the core refuses a second), persists the promise before it is
//!   reported, and restarts with state keep it. Giving a promise up makes a
//!   new incarnation; the old identity never answers, votes or acknowledges
//!   again (the same rule as a stateless restart).
//! - *Bootstrap needs every member's promise.* So if some node bootstrapped
//!   `P` and another `P' ≠ P`, a member common to both would have promised
//!   both: impossible. **Two first configurations never share a member.**
//! - *Lineages never share a member later either.* A leader adds only peers
//!   with neither a log nor a promise; a node with a promise refuses every
//!   message from outside it, and a node that received a leader's entries
//!   has a log and never promises or bootstraps. So every identity belongs
//!   to at most one lineage (first configuration and what its leaders added).
//! - *Two lineages cannot both have a live quorum.* A first configuration
//!   names `N` distinct member names; a leader (with a lease) needs
//!   acknowledgements from a majority of its lineage's voters, which are
//!   distinct names too. At most one process runs per name (StatefulSet
//!   pods; a Deployment's pods have unique names), and during bootstrap at
//!   most `N` members run (`--bootstrap-expect` is the replica count), so
//!   two disjoint majorities of live names cannot exist at once: at no
//!   instant do two leaders hold a lease. Unless a quorum of a committed
//!   configuration loses its state (restarts without it), at most one
//!   first configuration ever commits an entry (next point).
//! - *Abandoning never makes two leaders.* It only retires an identity,
//!   and the argument above holds for any set of retired identities. It
//!   could still cost a committed cluster its quorum: members that
//!   promised but did not hear the bootstrap would time out while the
//!   members that bootstrapped were down, and those, back with a log and
//!   short of a quorum, would be stuck (or give up a log they did not know
//!   was committed, and a second first configuration would commit). So a
//!   promise is given up on a timeout or a replaced member only when no
//!   quorum can hold its log (`LocalAgreement::may_give_up`); until then
//!   the node waits for the members it does not hear.
//!
//! A second group with another cluster id on the same DNS name never
//! interferes: hello answers and messages of another cluster id are refused
//! by the transport and ignored by the node.
//!
//! Limits: before the first configuration is promised by all `N`, nothing
//! is elected (by design, like Consul): a group that never sees `N` members
//! waits, and says so in its log. After it, any majority elects.
//!
//! # The seam for Kubernetes
//!
//! [`BootstrapAuthority`] is what the node consults. With Kubernetes on,
//! [`RecordedAgreement`] takes the local agreement's place: the first
//! configuration is recorded in the LeaderElection CR status by a
//! compare-and-swap (resourceVersion precondition), through the
//! [`FirstConfigRecord`] seam that app wiring connects to the Kubernetes
//! recorder. The CR holds at most one first configuration per cluster id,
//! and everyone bootstraps with the one recorded there, so members that
//! start together form exactly one cluster; nobody promises (`Lock`), the
//! record is the promise. The node's side (`Bootstrap`, `Abandon`) stays.

use crate::raft::{Configuration, NodeId, Time};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// A peer's report counts as current for this long after it arrived.
pub const REPORT_FRESHNESS: Duration = Duration::from_secs(3);
/// A promise not confirmed by every member within this long is given up
/// (a member died before confirming and will not come back under its id);
/// also how long a never-led first configuration waits for silent voters.
pub const LOCK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a promise is held before a replaced member makes it give up:
/// a little over two hello rounds, so a member that bootstrapped the
/// promise is heard from first.
pub const SETTLE: Duration = Duration::from_millis(600);
/// Reports older than this are forgotten.
const REPORT_RETENTION: Duration = Duration::from_secs(12);

/// What one peer says about itself in its hello answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerReport {
    /// Its identity.
    pub id: NodeId,
    /// Where it is reached.
    pub address: String,
    /// Whether it is in a cluster configuration.
    pub joined: bool,
    /// Whether it is shutting down.
    pub leaving: bool,
    /// The first configuration it promised, if any.
    pub lock: Option<Configuration>,
}

/// This node, as far as bootstrap is concerned (read from its core).
#[derive(Clone, Copy, Debug)]
pub struct LocalView<'a> {
    /// This incarnation.
    pub id: &'a NodeId,
    /// Its advertised address.
    pub address: &'a str,
    /// Whether its log is empty (never bootstrapped nor joined).
    pub log_empty: bool,
    /// Whether nothing beyond its bootstrap configuration is known committed.
    pub pristine: bool,
    /// Its configuration (the first configuration when pristine).
    pub config: &'a Configuration,
    /// Its promise, if any.
    pub lock: Option<&'a Configuration>,
}

/// What the node should do next about bootstrap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootstrapStep {
    /// Promise this first configuration (`RaftCore::lock_bootstrap`):
    /// persist, then report it.
    Lock(Configuration),
    /// Install this first configuration (`RaftCore::bootstrap`).
    Bootstrap(Configuration),
    /// Give up the promise or the never-led first configuration and
    /// continue as a new incarnation with no state; the text says why.
    Abandon(String),
}

/// Decides the first configuration: the members' local agreement, or
/// (issue 9) the LeaderElection CR. See the module doc.
pub trait BootstrapAuthority: Send {
    /// Records a peer's hello answer that arrived at `now`.
    fn observe(&mut self, now: Time, report: PeerReport);
    /// Returns the next step for this node, if any. Called after every
    /// report and periodically; MUST be idempotent until the step is applied.
    fn decide(&mut self, now: Time, local: &LocalView<'_>) -> Option<BootstrapStep>;
    /// Forgets what was tied to this node's previous incarnation (after
    /// `Abandon`, or a restart).
    fn reset(&mut self);
    /// Takes explanations of refused proposals, each given once, for the log.
    fn take_refusals(&mut self) -> Vec<String>;
}

/// Returns the number of voters of a first configuration of `members`
/// members: the largest odd number at most `min(members, max_voters)`
/// (an even count tolerates no more failures than the odd one below it).
pub fn first_voter_count(members: usize, max_voters: usize) -> usize {
    let m = members.min(max_voters).max(1);
    if m % 2 == 0 {
        m - 1
    } else {
        m
    }
}

/// Builds the first configuration of `members` (id, address): the lowest
/// ids vote, as many as [`first_voter_count`], the rest are learners.
pub fn first_configuration(mut members: Vec<(NodeId, String)>, max_voters: usize) -> Configuration {
    members.sort();
    let voters = first_voter_count(members.len(), max_voters);
    let mut config = Configuration::default();
    for (i, (id, address)) in members.into_iter().enumerate() {
        if i < voters {
            config.voters.insert(id, address);
        } else {
            config.learners.insert(id, address);
        }
    }
    config
}

/// The members' local agreement on the first configuration (module doc).
#[derive(Debug)]
pub struct LocalAgreement {
    expect: usize,
    max_voters: usize,
    /// Latest report of each peer and when it arrived (this node's clock).
    reports: HashMap<NodeId, (PeerReport, Time)>,
    /// When this incarnation was first seen holding its promise.
    locked_since: Option<Time>,
    /// When this incarnation was first seen with a never-led first configuration.
    pristine_since: Option<Time>,
    /// Proposals refused, by proposer and reason (each logged once).
    refused: BTreeSet<String>,
    new_refusals: Vec<String>,
}

impl LocalAgreement {
    /// Creates the agreement for `expect` members with at most `max_voters` voters.
    pub fn new(expect: usize, max_voters: usize) -> LocalAgreement {
        LocalAgreement {
            expect: expect.max(1),
            max_voters: max_voters.max(1),
            reports: HashMap::new(),
            locked_since: None,
            pristine_since: None,
            refused: BTreeSet::new(),
            new_refusals: Vec::new(),
        }
    }

    /// Returns the number of members the first configuration holds.
    pub fn expect(&self) -> usize {
        self.expect
    }

    /// Returns the current reports: recent, not leaving, not this node, and
    /// only the latest incarnation of each name (one process runs per name,
    /// so an older incarnation's report describes a process that is gone).
    fn fresh<'a>(
        &'a self,
        now: Time,
        me: &'a NodeId,
    ) -> impl Iterator<Item = (&'a PeerReport, Time)> + 'a {
        self.reports
            .values()
            .filter(move |(r, at)| {
                r.id != *me
                    && !r.leaving
                    && now.saturating_since(*at) <= REPORT_FRESHNESS
                    && !self.replaced(now, &r.id)
            })
            .map(|(r, at)| (r, *at))
    }

    /// Returns whether `member` is known to be gone for good: another
    /// incarnation of its name answered more recently than it did.
    fn replaced(&self, now: Time, member: &NodeId) -> bool {
        let own = self.reports.get(member).map(|(_, at)| *at);
        self.reports.values().any(|(r, at)| {
            r.id.name == member.name
                && r.id != *member
                && now.saturating_since(*at) <= REPORT_FRESHNESS
                && own.is_none_or(|o| o < *at)
        })
    }

    /// Checks a proposal from a peer against this node's own rules.
    fn validate(&self, me: &NodeId, p: &Configuration) -> Result<(), String> {
        let members: Vec<(NodeId, String)> =
            p.members().map(|(id, a)| (id.clone(), a.clone())).collect();
        if members.len() != self.expect {
            return Err(format!(
                "it has {} members, this node expects {} (--bootstrap-expect differs between members?)",
                members.len(),
                self.expect
            ));
        }
        if !p.contains(me) {
            return Err("it does not include this node".to_string());
        }
        let names: BTreeSet<&str> = members.iter().map(|(id, _)| &*id.name).collect();
        if names.len() != members.len() {
            return Err("it names one member twice".to_string());
        }
        if first_configuration(members, self.max_voters) != *p {
            return Err(format!(
                "its voters are not the {} lowest ids (--max-voters differs between members?)",
                first_voter_count(self.expect, self.max_voters)
            ));
        }
        Ok(())
    }

    fn refuse(&mut self, proposer: &NodeId, why: String) {
        let text = format!("refused the first configuration proposed by {proposer}: {why}");
        if self.refused.insert(text.clone()) {
            self.new_refusals.push(text);
        }
    }

    fn decide_unlocked(&mut self, now: Time, local: &LocalView<'_>) -> Option<BootstrapStep> {
        let me = local.id;
        if self.fresh(now, me).any(|(r, _)| r.joined) {
            return None; // a cluster exists: wait to be added to it
        }
        // Adopt the lowest proposal that names this incarnation.
        let mut offers: Vec<Configuration> = self
            .fresh(now, me)
            .filter_map(|(r, _)| r.lock.clone())
            .filter(|p| p.contains(me))
            .collect();
        offers.sort_by(|a, b| a.members().next().cmp(&b.members().next()));
        offers.dedup();
        for p in offers {
            match self.validate(me, &p) {
                Ok(()) => return Some(BootstrapStep::Lock(p)),
                Err(why) => {
                    let proposer = p.members().map(|(id, _)| id).min().cloned();
                    if let Some(proposer) = proposer {
                        self.refuse(&proposer, why);
                    }
                }
            }
        }
        // Propose, if this node is the lowest of the N it would take.
        let mut by_name: BTreeMap<&str, (&PeerReport, Time)> = BTreeMap::new();
        for (r, at) in self.fresh(now, me) {
            // Only members heard within the last probe rounds: one that
            // went quiet may be restarting as a new incarnation, and a
            // proposal naming the old one would have to be given up.
            if r.joined
                || r.lock.is_some()
                || r.id.name == me.name
                || now.saturating_since(at) > SETTLE
            {
                continue;
            }
            let newer = by_name.get(&*r.id.name).is_none_or(|(_, t)| *t < at);
            if newer {
                by_name.insert(&*r.id.name, (r, at));
            }
        }
        let mut others: Vec<(NodeId, String)> = by_name
            .values()
            .map(|(r, _)| (r.id.clone(), r.address.clone()))
            .collect();
        others.sort();
        others.truncate(self.expect - 1);
        if others.len() + 1 < self.expect || others.first().is_some_and(|(id, _)| id < me) {
            return None;
        }
        others.push((me.clone(), local.address.to_string()));
        Some(BootstrapStep::Lock(first_configuration(
            others,
            self.max_voters,
        )))
    }

    fn decide_locked(
        &mut self,
        now: Time,
        local: &LocalView<'_>,
        p: &Configuration,
    ) -> Option<BootstrapStep> {
        let me = local.id;
        let since = *self.locked_since.get_or_insert(now);
        // A member that bootstrapped P saw every member's promise of P:
        // follow it at once, whatever happened to the others since.
        let bootstrapped_elsewhere = self
            .fresh(now, me)
            .any(|(r, _)| r.joined && p.contains(&r.id) && r.lock.as_ref() == Some(p));
        if bootstrapped_elsewhere {
            return Some(BootstrapStep::Bootstrap(p.clone()));
        }
        let mut confirmed = true;
        let mut replaced = None;
        for (m, _) in p.members().filter(|(m, _)| *m != me) {
            if self.replaced(now, m) {
                replaced.get_or_insert(m);
                confirmed = false;
                continue;
            }
            match self.reports.get(m) {
                Some((r, at)) if now.saturating_since(*at) <= REPORT_FRESHNESS => match &r.lock {
                    Some(q) if q == p => {}
                    // Definitive: this member never promised P (an
                    // incarnation promises once, and a leader adds only
                    // unpromised nodes), so nobody ever saw every promise
                    // of P and nobody bootstrapped it.
                    Some(_) => {
                        return Some(BootstrapStep::Abandon(format!(
                            "member {m} promised another first configuration"
                        )))
                    }
                    None if r.joined => {
                        return Some(BootstrapStep::Abandon(format!(
                            "member {m} joined a cluster without this promise"
                        )))
                    }
                    None => confirmed = false,
                },
                _ => confirmed = false,
            }
        }
        if confirmed {
            return Some(BootstrapStep::Bootstrap(p.clone()));
        }
        // The remaining reasons are not definitive: P may have been
        // bootstrapped by members this node does not hear now.
        let why = if let Some(m) = replaced.filter(|_| now.saturating_since(since) >= SETTLE) {
            // Not at once: until a round of answers has arrived, a member
            // that bootstrapped P may not have been heard from yet.
            format!("member {m} of the promised configuration was replaced by a new incarnation")
        } else if let Some((r, _)) = self
            .fresh(now, me)
            .find(|(r, _)| r.joined && !p.contains(&r.id))
        {
            format!(
                "{} belongs to a cluster outside the promised configuration",
                r.id
            )
        } else if now.saturating_since(since) > LOCK_TIMEOUT {
            format!("not every member confirmed the promised configuration within {LOCK_TIMEOUT:?}")
        } else {
            return None;
        };
        self.may_give_up(now, me, p)
            .then_some(BootstrapStep::Abandon(why))
    }

    /// Returns whether giving up the promise `p` (held, not bootstrapped)
    /// can no longer take a voter from a cluster that bootstrapped `p` and
    /// may have committed under it (module doc, rule 4):
    ///
    /// - every voter of `p` that may hold its log (neither this node, nor
    ///   replaced by a new incarnation, nor heard within [`SETTLE`] saying
    ///   it has not bootstrapped) is too few, with the rest, for a quorum:
    ///   `p` can never elect again, with or without this node; or
    /// - a quorum of `p`'s voters is this node or was heard within
    ///   [`SETTLE`] not having bootstrapped `p`: a commit needs a quorum
    ///   holding the log, and every quorum meets this one, so nothing was
    ///   committed under `p`.
    ///
    /// Otherwise the node waits: a member that bootstrapped `p` is silent
    /// (crashed or cut off) and `p` may go on with this node's vote. Giving
    /// up then (as a plain timeout did) let a cluster that had committed
    /// lose its quorum for good, and a second first configuration commit.
    fn may_give_up(&self, now: Time, me: &NodeId, p: &Configuration) -> bool {
        let unbootstrapped = |m: &NodeId| {
            m == me
                || self.reports.get(m).is_some_and(|(r, at)| {
                    now.saturating_since(*at) <= SETTLE
                        && !r.joined
                        && r.lock.as_ref().is_none_or(|q| q == p)
                })
        };
        let alive = p.voters.keys().filter(|m| !self.replaced(now, m)).count();
        let not_holding = p.voters.keys().filter(|m| unbootstrapped(m)).count();
        alive < p.quorum() || not_holding >= p.quorum()
    }

    fn decide_pristine(&mut self, now: Time, local: &LocalView<'_>) -> Option<BootstrapStep> {
        let me = local.id;
        let since = *self.pristine_since.get_or_insert(now);
        let voters = &local.config.voters;
        // Silence counts as gone only after a while, and only while a
        // majority of the expected members answer, alive and unbootstrapped
        // (they are who the new attempt needs); replacement always counts.
        let unbootstrapped = self
            .fresh(now, me)
            .filter(|(r, _)| !r.joined && r.lock.is_none())
            .count();
        let silence_counts =
            now.saturating_since(since) > LOCK_TIMEOUT && unbootstrapped > self.expect / 2;
        let alive = voters
            .keys()
            .filter(|m| {
                if *m == me {
                    return true;
                }
                if self.replaced(now, m) {
                    return false;
                }
                !silence_counts
                    || self
                        .reports
                        .get(*m)
                        .is_some_and(|(_, at)| now.saturating_since(*at) <= REPORT_FRESHNESS)
            })
            .count();
        if alive < local.config.quorum() {
            return Some(BootstrapStep::Abandon(format!(
                "only {alive} of the {} voters of the never-led first configuration remain",
                voters.len()
            )));
        }
        None
    }
}

impl BootstrapAuthority for LocalAgreement {
    fn observe(&mut self, now: Time, report: PeerReport) {
        self.reports.insert(report.id.clone(), (report, now));
        self.reports
            .retain(|_, (_, at)| now.saturating_since(*at) <= REPORT_RETENTION);
    }

    fn decide(&mut self, now: Time, local: &LocalView<'_>) -> Option<BootstrapStep> {
        if !local.log_empty {
            self.locked_since = None;
            if local.pristine && local.config.contains(local.id) {
                return self.decide_pristine(now, local);
            }
            self.pristine_since = None;
            return None;
        }
        self.pristine_since = None;
        match local.lock {
            Some(p) => {
                let p = p.clone();
                self.decide_locked(now, local, &p)
            }
            None => {
                self.locked_since = None;
                self.decide_unlocked(now, local)
            }
        }
    }

    fn reset(&mut self) {
        self.locked_since = None;
        self.pristine_since = None;
    }

    fn take_refusals(&mut self) -> Vec<String> {
        std::mem::take(&mut self.new_refusals)
    }
}

/// How often a refused re-bootstrap (a recorded member may still live)
/// is asked for again at most; the recorder re-checks on its own too.
const REASK_AFTER: Duration = Duration::from_secs(1);

/// The first configuration as a record outside the members holds it (the
/// LeaderElection CR status in Kubernetes), read without blocking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordRead {
    /// Not read yet (or the record's store is unreachable).
    Unread,
    /// Read: nothing is recorded.
    Empty,
    /// Read: these members (identity, address) are the first
    /// configuration, of which at most `max_voters` vote (the lowest ids).
    Members {
        /// Every member of the first configuration.
        members: Vec<(NodeId, String)>,
        /// The group's voter limit as recorded alongside (the CR spec).
        max_voters: usize,
    },
}

/// What [`RecordedAgreement`] asks of the record's keeper; the latest ask
/// replaces the earlier ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordAsk {
    /// Keep the record's view current, change nothing.
    Read,
    /// Record these members as the first configuration unless one is
    /// recorded already (compare-and-swap: exactly one proposal wins).
    Record {
        /// Proposed members (identity, address), the proposer included.
        members: Vec<(NodeId, String)>,
        /// The proposer.
        by: NodeId,
    },
    /// Forget the recorded first configuration `recorded` so that a new
    /// group can bootstrap, but only if none of its members (nor of the
    /// last configuration published with it) still has a pod, not counting
    /// the names in `replaced`: those run another incarnation now, unjoined.
    Forget {
        /// The recorded members, as read.
        recorded: Vec<NodeId>,
        /// Member names known to run a different, unjoined incarnation.
        replaced: BTreeSet<String>,
    },
}

/// The seam to a record of the first configuration kept outside the members:
/// a non-blocking front of a task that talks to the store (app wiring gives
/// the Kubernetes one).
pub trait FirstConfigRecord: Send {
    /// Returns the record as last read.
    fn read(&self) -> RecordRead;
    /// Hands the keeper a new ask (it replaces the one before).
    fn ask(&mut self, ask: RecordAsk);
}

/// The first configuration decided by a compare-and-swap on a shared record
/// (the LeaderElection CR) instead of the members' promises:
///
/// 1. **Propose.** A node with an empty log that sees no member of a
///    running cluster and at least `N − 1` other fresh, unjoined peers
///    asks to record itself and the `N − 1` lowest of them. Every such node
///    may ask; the compare-and-swap lets exactly one proposal in.
/// 2. **Adopt.** A node with an empty log whose identity is in the record
///    bootstraps the recorded members (voters: the lowest ids, up to the
///    recorded voter limit). Everyone reads the same record, so every
///    first configuration of the group is the same one: one cluster.
/// 3. **Join.** A node the record leaves out waits to be added by the
///    recorded group's leader, like any new member.
/// 4. **Re-bootstrap.** Only when no member of the record (nor of the last
///    configuration its leaders published) still has a pod, a name running
///    a new unjoined incarnation not counting, is the record forgotten (by
///    compare-and-swap again) and rule 1 applies anew. A pod that exists but
///    answers nobody counts as alive: the group waits rather than risk a
///    second cluster.
///
/// A never-led first configuration whose voters were replaced is given up
/// by the same rule as [`LocalAgreement`]'s, so its members become new
/// incarnations, which rule 4 then lets bootstrap again.
pub struct RecordedAgreement<R: FirstConfigRecord> {
    /// Peer reports, the voter rule and the never-led rule.
    local: LocalAgreement,
    record: R,
    /// The last ask handed over, and when.
    asked: Option<(RecordAsk, Time)>,
    /// Notes for the log, each given once.
    said: BTreeSet<String>,
    notes: Vec<String>,
}

impl<R: FirstConfigRecord> RecordedAgreement<R> {
    /// Creates the agreement for `expect` members with at most `max_voters`
    /// voters in a proposal, reading and writing through `record`.
    pub fn new(expect: usize, max_voters: usize, mut record: R) -> RecordedAgreement<R> {
        record.ask(RecordAsk::Read);
        RecordedAgreement {
            local: LocalAgreement::new(expect, max_voters),
            record,
            asked: Some((RecordAsk::Read, Time::ZERO)),
            said: BTreeSet::new(),
            notes: Vec::new(),
        }
    }

    fn ask(&mut self, now: Time, ask: RecordAsk) {
        let again = match &self.asked {
            Some((last, at)) => *last != ask || now.saturating_since(*at) >= REASK_AFTER,
            None => true,
        };
        if again {
            self.record.ask(ask.clone());
            self.asked = Some((ask, now));
        }
    }

    fn note(&mut self, text: String) {
        if self.said.insert(text.clone()) {
            self.notes.push(text);
        }
    }

    /// Rule 1: the proposal this node asks to record, if it sees enough peers.
    fn propose(&mut self, now: Time, local: &LocalView<'_>) {
        let me = local.id;
        let mut by_name: BTreeMap<&str, (&PeerReport, Time)> = BTreeMap::new();
        for (r, at) in self.local.fresh(now, me) {
            if r.joined || r.lock.is_some() || r.id.name == me.name {
                continue;
            }
            let newer = by_name.get(&*r.id.name).is_none_or(|(_, t)| *t < at);
            if newer {
                by_name.insert(&*r.id.name, (r, at));
            }
        }
        let mut members: Vec<(NodeId, String)> = by_name
            .values()
            .map(|(r, _)| (r.id.clone(), r.address.clone()))
            .collect();
        members.sort();
        let expect = self.local.expect();
        members.truncate(expect - 1);
        if members.len() + 1 < expect {
            self.ask(now, RecordAsk::Read);
            return;
        }
        members.push((me.clone(), local.address.to_string()));
        members.sort();
        self.ask(
            now,
            RecordAsk::Record {
                members,
                by: me.clone(),
            },
        );
    }

    /// Rule 4's input: the names whose recorded incarnation is known gone,
    /// because another one of the name answers unjoined (this node's own
    /// name included: it is a new incarnation the record leaves out).
    fn replaced_names(&self, now: Time, me: &NodeId, recorded: &[NodeId]) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = self
            .local
            .fresh(now, me)
            .filter(|(r, _)| !r.joined && !recorded.contains(&r.id))
            .map(|(r, _)| r.id.name.to_string())
            .collect();
        if !recorded.contains(me) {
            names.insert(me.name.to_string());
        }
        names
    }
}

impl<R: FirstConfigRecord> BootstrapAuthority for RecordedAgreement<R> {
    fn observe(&mut self, now: Time, report: PeerReport) {
        self.local.observe(now, report);
    }

    fn decide(&mut self, now: Time, local: &LocalView<'_>) -> Option<BootstrapStep> {
        if !local.log_empty {
            // A never-led first configuration: the local rule says when it
            // is lost; anything else is a running member.
            return self.local.decide(now, local);
        }
        let me = local.id;
        match self.record.read() {
            RecordRead::Unread => {
                self.ask(now, RecordAsk::Read);
                None
            }
            RecordRead::Empty => {
                if self.local.fresh(now, me).any(|(r, _)| r.joined) {
                    // A cluster runs without a record (formed before the
                    // CR was used): join it.
                    return None;
                }
                if local.lock.is_some() {
                    return Some(BootstrapStep::Abandon(
                        "a promise from the members' local agreement; the LeaderElection record decides now".into(),
                    ));
                }
                self.propose(now, local);
                None
            }
            RecordRead::Members {
                members,
                max_voters,
            } => {
                if members.len() != self.local.expect() {
                    self.note(format!(
                        "the recorded first configuration has {} members, this node expects {} (--bootstrap-expect differs between members?); the record decides",
                        members.len(),
                        self.local.expect()
                    ));
                }
                let recorded: Vec<NodeId> = members.iter().map(|(id, _)| id.clone()).collect();
                let config = first_configuration(members, max_voters);
                if config.contains(me) {
                    if local.lock.is_some_and(|p| *p != config) {
                        return Some(BootstrapStep::Abandon(
                            "promised another first configuration than the recorded one".into(),
                        ));
                    }
                    self.ask(now, RecordAsk::Read);
                    return Some(BootstrapStep::Bootstrap(config));
                }
                if local.lock.is_some() {
                    return Some(BootstrapStep::Abandon(
                        "the recorded first configuration leaves out this node's promise".into(),
                    ));
                }
                if self.local.fresh(now, me).any(|(r, _)| r.joined) {
                    // The recorded group runs: wait to be added to it.
                    self.ask(now, RecordAsk::Read);
                    return None;
                }
                let replaced = self.replaced_names(now, me, &recorded);
                self.ask(now, RecordAsk::Forget { recorded, replaced });
                None
            }
        }
    }

    fn reset(&mut self) {
        self.local.reset();
        self.asked = None;
    }

    fn take_refusals(&mut self) -> Vec<String> {
        let mut out = self.local.take_refusals();
        out.append(&mut self.notes);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A record kept in memory; the test sets what is read and sees the asks.
    #[derive(Clone, Default)]
    struct MemoryRecord {
        read: Arc<Mutex<Option<RecordRead>>>,
        asks: Arc<Mutex<Vec<RecordAsk>>>,
    }

    impl MemoryRecord {
        fn set(&self, read: RecordRead) {
            *self.read.lock().expect("record") = Some(read);
        }
        fn last_ask(&self) -> Option<RecordAsk> {
            self.asks.lock().expect("asks").last().cloned()
        }
    }

    impl FirstConfigRecord for MemoryRecord {
        fn read(&self) -> RecordRead {
            self.read
                .lock()
                .expect("record")
                .clone()
                .unwrap_or(RecordRead::Unread)
        }
        fn ask(&mut self, ask: RecordAsk) {
            self.asks.lock().expect("asks").push(ask);
        }
    }

    fn fresh_local<'a>(me: &'a NodeId, empty: &'a Configuration) -> LocalView<'a> {
        LocalView {
            id: me,
            address: "a:4041",
            log_empty: true,
            pristine: false,
            config: empty,
            lock: None,
        }
    }

    #[test]
    fn recorded_agreement_proposes_once_it_sees_everyone_and_bootstraps_what_is_recorded() {
        let record = MemoryRecord::default();
        let mut agreement = RecordedAgreement::new(3, 5, record.clone());
        let me = id("b", 2);
        let empty = Configuration::default();
        let local = fresh_local(&me, &empty);
        assert_eq!(agreement.decide(t(0), &local), None, "nothing read yet");
        record.set(RecordRead::Empty);
        agreement.observe(t(0), report("a", 1, false, None));
        assert_eq!(agreement.decide(t(0), &local), None);
        assert_eq!(
            record.last_ask(),
            Some(RecordAsk::Read),
            "one peer is too few"
        );
        agreement.observe(t(0), report("c", 3, false, None));
        assert_eq!(agreement.decide(t(0), &local), None);
        // Not only the lowest id proposes: the compare-and-swap picks one.
        let Some(RecordAsk::Record { members, by }) = record.last_ask() else {
            panic!("a proposal: {:?}", record.last_ask());
        };
        assert_eq!(by, me);
        let names: Vec<&str> = members.iter().map(|(m, _)| &*m.name).collect();
        assert_eq!(names, ["a", "b", "c"]);
        // Another member's proposal won, with a voter limit of 1.
        let won = vec![
            (id("a", 1), "a:4041".to_string()),
            (id("b", 2), "b:4041".to_string()),
            (id("d", 4), "d:4041".to_string()),
        ];
        record.set(RecordRead::Members {
            members: won.clone(),
            max_voters: 1,
        });
        let Some(BootstrapStep::Bootstrap(config)) = agreement.decide(t(1), &local) else {
            panic!("bootstraps the recorded configuration");
        };
        assert_eq!(config, first_configuration(won, 1));
        assert_eq!(config.voters.len(), 1, "the recorded voter limit decides");
    }

    #[test]
    fn a_node_the_record_leaves_out_joins_a_running_group_or_asks_to_forget_a_gone_one() {
        let record = MemoryRecord::default();
        let mut agreement = RecordedAgreement::new(3, 5, record.clone());
        let me = id("a", 9);
        let empty = Configuration::default();
        let local = fresh_local(&me, &empty);
        let old: Vec<(NodeId, String)> = [("a", 1), ("b", 2), ("c", 3)]
            .iter()
            .map(|(n, i)| (id(n, *i), format!("{n}:4041")))
            .collect();
        record.set(RecordRead::Members {
            members: old.clone(),
            max_voters: 5,
        });
        // b still runs its recorded incarnation in a cluster: wait to be added.
        agreement.observe(t(0), report("b", 2, true, None));
        assert_eq!(agreement.decide(t(0), &local), None);
        assert_eq!(record.last_ask(), Some(RecordAsk::Read));
        // Later only new, unjoined incarnations answer.
        agreement.observe(t(5), report("b", 7, false, None));
        assert_eq!(
            agreement.decide(t(5), &local),
            None,
            "never bootstraps a record without it"
        );
        let Some(RecordAsk::Forget { recorded, replaced }) = record.last_ask() else {
            panic!("asks to forget: {:?}", record.last_ask());
        };
        assert_eq!(
            recorded,
            old.iter().map(|(i, _)| i.clone()).collect::<Vec<_>>()
        );
        let replaced: Vec<&str> = replaced.iter().map(String::as_str).collect();
        assert_eq!(
            replaced,
            ["a", "b"],
            "c was not heard from: its pod decides"
        );
        // The same ask is not repeated at every call, only after a while.
        let asks = record.asks.lock().expect("asks").len();
        agreement.decide(t(5), &local);
        assert_eq!(record.asks.lock().expect("asks").len(), asks);
        agreement.decide(t(5) + REASK_AFTER, &local);
        assert_eq!(record.asks.lock().expect("asks").len(), asks + 1);
    }

    #[test]
    fn a_local_promise_gives_way_to_the_record() {
        let record = MemoryRecord::default();
        let mut agreement = RecordedAgreement::new(3, 5, record.clone());
        let me = id("a", 1);
        let empty = Configuration::default();
        let promised = config(&[("a", 1), ("b", 2), ("x", 3)]);
        let mut local = fresh_local(&me, &empty);
        local.lock = Some(&promised);
        record.set(RecordRead::Empty);
        assert!(matches!(
            agreement.decide(t(0), &local),
            Some(BootstrapStep::Abandon(_))
        ));
    }

    fn id(name: &str, inc: u64) -> NodeId {
        NodeId::new(name, inc)
    }

    fn report(name: &str, inc: u64, joined: bool, lock: Option<Configuration>) -> PeerReport {
        PeerReport {
            id: id(name, inc),
            address: format!("{name}:4041"),
            joined,
            leaving: false,
            lock,
        }
    }

    fn config(members: &[(&str, u64)]) -> Configuration {
        first_configuration(
            members
                .iter()
                .map(|(n, i)| (id(n, *i), format!("{n}:4041")))
                .collect(),
            5,
        )
    }

    fn view<'a>(
        me: &'a NodeId,
        empty: &'a Configuration,
        lock: Option<&'a Configuration>,
    ) -> LocalView<'a> {
        LocalView {
            id: me,
            address: "x:4041",
            log_empty: true,
            pristine: false,
            config: empty,
            lock,
        }
    }

    fn t(ms: u64) -> Time {
        Time::from_nanos(ms * 1_000_000)
    }

    #[test]
    fn the_lowest_id_proposes_every_expected_member_once_it_sees_them_all() {
        let empty = Configuration::default();
        let a = id("a", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 1, false, None));
        assert_eq!(
            agreement.decide(t(0), &view(&a, &empty, None)),
            None,
            "sees 2 of 3"
        );
        agreement.observe(t(1), report("c", 1, false, None));
        let step = agreement.decide(t(1), &view(&a, &empty, None));
        let expected = Configuration {
            voters: [("a", 1), ("b", 1), ("c", 1)]
                .iter()
                .map(|(n, i)| {
                    (
                        id(n, *i),
                        if *n == "a" {
                            "x:4041".into()
                        } else {
                            format!("{n}:4041")
                        },
                    )
                })
                .collect(),
            learners: Default::default(),
        };
        assert_eq!(step, Some(BootstrapStep::Lock(expected)));
        // b is not the lowest: it waits for a's proposal.
        let b = id("b", 1);
        let mut at_b = LocalAgreement::new(3, 5);
        at_b.observe(t(0), report("a", 1, false, None));
        at_b.observe(t(0), report("c", 1, false, None));
        assert_eq!(at_b.decide(t(0), &view(&b, &empty, None)), None);
    }

    #[test]
    fn a_member_not_heard_in_the_last_rounds_is_not_proposed() {
        // c went quiet (it may be restarting as a new incarnation): a waits
        // for a current answer rather than promise c's old identity.
        let empty = Configuration::default();
        let a = id("a", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("c", 1, false, None));
        let later = t(SETTLE.as_millis() as u64 + 1);
        agreement.observe(later, report("b", 1, false, None));
        assert_eq!(agreement.decide(later, &view(&a, &empty, None)), None);
        agreement.observe(later, report("c", 2, false, None));
        let Some(BootstrapStep::Lock(p)) = agreement.decide(later, &view(&a, &empty, None)) else {
            panic!("a proposes once every member answered lately");
        };
        let ids: Vec<&NodeId> = p.members().map(|(m, _)| m).collect();
        assert_eq!(ids, [&a, &id("b", 1), &id("c", 2)]);
    }

    #[test]
    fn seven_expected_members_give_five_voters_and_two_learners() {
        let members: Vec<(&str, u64)> =
            ["a", "b", "c", "d", "e", "f", "g"].map(|n| (n, 1)).to_vec();
        let c = config(&members);
        assert_eq!((c.voters.len(), c.learners.len()), (5, 2));
        assert_eq!(first_voter_count(4, 5), 3);
        assert_eq!(first_voter_count(1, 5), 1);
    }

    #[test]
    fn a_node_adopts_a_proposal_naming_it_and_bootstraps_once_all_confirm() {
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let b = id("b", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("a", 1, false, Some(p.clone())));
        agreement.observe(t(0), report("c", 1, false, None));
        assert_eq!(
            agreement.decide(t(0), &view(&b, &empty, None)),
            Some(BootstrapStep::Lock(p.clone()))
        );
        assert_eq!(
            agreement.decide(t(1), &view(&b, &empty, Some(&p))),
            None,
            "c has not confirmed"
        );
        agreement.observe(t(2), report("c", 1, false, Some(p.clone())));
        assert_eq!(
            agreement.decide(t(2), &view(&b, &empty, Some(&p))),
            Some(BootstrapStep::Bootstrap(p))
        );
    }

    #[test]
    fn a_node_that_sees_an_existing_cluster_never_proposes_nor_adopts() {
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let b = id("b", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("a", 1, false, Some(p)));
        agreement.observe(t(0), report("c", 1, false, None));
        agreement.observe(t(0), report("z", 1, true, None));
        assert_eq!(agreement.decide(t(0), &view(&b, &empty, None)), None);
    }

    #[test]
    fn a_proposal_with_another_expected_size_is_refused_and_explained_once() {
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1)]);
        let b = id("b", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("a", 1, false, Some(p)));
        assert_eq!(agreement.decide(t(0), &view(&b, &empty, None)), None);
        assert_eq!(agreement.decide(t(1), &view(&b, &empty, None)), None);
        let refusals = agreement.take_refusals();
        assert_eq!(refusals.len(), 1, "{refusals:?}");
        assert!(refusals[0].contains("expects 3"), "{refusals:?}");
        assert!(agreement.take_refusals().is_empty());
    }

    #[test]
    fn a_promise_is_abandoned_when_a_member_promised_another_or_was_replaced() {
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let q = config(&[("b", 1), ("c", 1), ("d", 1)]);
        let a = id("a", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 1, false, Some(q)));
        assert!(matches!(
            agreement.decide(t(0), &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Abandon(_))
        ));
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 1, false, Some(p.clone())));
        agreement.observe(t(1), report("c", 2, false, None));
        assert_eq!(
            agreement.decide(t(1), &view(&a, &empty, Some(&p))),
            None,
            "b may have bootstrapped P: wait for a round of answers"
        );
        let settled = t(SETTLE.as_millis() as u64 + 1);
        agreement.observe(settled, report("c", 2, false, None));
        agreement.observe(settled, report("b", 1, false, Some(p.clone())));
        assert!(matches!(
            agreement.decide(settled, &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Abandon(_))
        ));
        // A member that bootstrapped P overrides the replaced one.
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("c", 2, false, None));
        agreement.observe(t(0), report("b", 1, true, Some(p.clone())));
        assert_eq!(
            agreement.decide(t(0), &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Bootstrap(p.clone()))
        );
    }

    #[test]
    fn an_unconfirmed_promise_is_abandoned_after_the_lock_timeout() {
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let a = id("a", 1);
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 1, false, Some(p.clone())));
        assert_eq!(agreement.decide(t(0), &view(&a, &empty, Some(&p))), None);
        agreement.observe(t(2_000), report("b", 1, false, Some(p.clone())));
        assert_eq!(
            agreement.decide(t(2_000), &view(&a, &empty, Some(&p))),
            None
        );
        let late = t(LOCK_TIMEOUT.as_millis() as u64 + 1);
        agreement.observe(late, report("b", 1, false, Some(p.clone())));
        assert!(matches!(
            agreement.decide(late, &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Abandon(_))
        ));
    }

    #[test]
    fn a_promise_is_kept_while_a_member_that_may_have_bootstrapped_it_is_silent() {
        // Five members promised P; c bootstrapped it and committed with d
        // and e, then went quiet; e restarted without state. a and b never
        // heard the bootstrap, nor c's promise. Giving up would leave c and d short of a
        // quorum for good, so a waits, past every timeout, until it hears.
        let empty = Configuration::default();
        let p = config(&[("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)]);
        let a = id("a", 1);
        let mut agreement = LocalAgreement::new(5, 5);
        for name in ["b", "d", "e"] {
            agreement.observe(t(0), report(name, 1, false, Some(p.clone())));
        }
        assert_eq!(agreement.decide(t(0), &view(&a, &empty, Some(&p))), None);
        let late = t(LOCK_TIMEOUT.as_millis() as u64 * 3);
        agreement.observe(late, report("b", 1, false, Some(p.clone())));
        agreement.observe(late, report("e", 2, false, None));
        assert_eq!(
            agreement.decide(late, &view(&a, &empty, Some(&p))),
            None,
            "c and d are silent and may hold P's log: a and b are no quorum of unbootstrapped voters"
        );
        let back = t(LOCK_TIMEOUT.as_millis() as u64 * 3 + 100);
        agreement.observe(back, report("c", 1, true, Some(p.clone())));
        assert_eq!(
            agreement.decide(back, &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Bootstrap(p.clone())),
            "the member that bootstrapped P is heard: follow it"
        );
        // When d answers unbootstrapped instead, a quorum (a, b, d) holds no
        // log of P: nothing was committed under it, and giving up is safe.
        let mut agreement = LocalAgreement::new(5, 5);
        for name in ["b", "d", "e"] {
            agreement.observe(t(0), report(name, 1, false, Some(p.clone())));
        }
        assert_eq!(agreement.decide(t(0), &view(&a, &empty, Some(&p))), None);
        for name in ["b", "d"] {
            agreement.observe(late, report(name, 1, false, Some(p.clone())));
        }
        assert!(matches!(
            agreement.decide(late, &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Abandon(_))
        ));
        // And when so many voters were replaced that P can never reach a
        // quorum again, this node's vote no longer matters: it gives up.
        let mut agreement = LocalAgreement::new(5, 5);
        for name in ["b", "d", "e"] {
            agreement.observe(t(0), report(name, 1, false, Some(p.clone())));
        }
        assert_eq!(agreement.decide(t(0), &view(&a, &empty, Some(&p))), None);
        for name in ["c", "d", "e"] {
            agreement.observe(late, report(name, 2, false, None));
        }
        assert!(matches!(
            agreement.decide(late, &view(&a, &empty, Some(&p))),
            Some(BootstrapStep::Abandon(_))
        ));
    }

    #[test]
    fn a_never_led_first_configuration_is_abandoned_once_a_majority_is_replaced() {
        let p = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let a = id("a", 1);
        let local = LocalView {
            id: &a,
            address: "a:4041",
            log_empty: false,
            pristine: true,
            config: &p,
            lock: Some(&p),
        };
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 2, false, None));
        assert_eq!(agreement.decide(t(0), &local), None, "c may still come");
        agreement.observe(t(1), report("c", 2, false, None));
        assert!(matches!(
            agreement.decide(t(1), &local),
            Some(BootstrapStep::Abandon(_))
        ));
        // With one voter left, the majority (a, b) still elects: no abandon.
        let mut agreement = LocalAgreement::new(3, 5);
        agreement.observe(t(0), report("b", 1, true, Some(p.clone())));
        agreement.observe(t(0), report("c", 2, false, None));
        assert_eq!(agreement.decide(t(0), &local), None);
    }
}
