//! The leader-side membership driver: turns what discovery sees into one
//! configuration change at a time.
//!
//! Rules (architecture, "Membership through the log"):
//! - a peer seen continuously for [`MembershipPolicy::add_after`] that is not
//!   a member is added as a learner (the core promotes it when caught up);
//! - a member replaced by a new incarnation (same name or address, another
//!   id) is removed at once: its old identity can never come back;
//! - a member not seen for [`MembershipPolicy::removal_grace`] is removed;
//! - members that leave gracefully are removed by the core on their Leave.
//!
//! Debounce: a peer must be seen twice, `add_after` apart, before it is added,
//! and a removal waits for the grace period, so a flapping DNS answer does
//! not churn the configuration.
//!
//! Tombstones: an incarnation that left (its hello said `leaving`) or was
//! removed from the configuration by any path (its Leave, gone from
//! discovery, replaced by a new incarnation) is tombstoned: it is neither
//! observed nor added again, so a departing pod that still answers hello for
//! a moment is not re-added behind its own removal. Tombstones are per
//! incarnation: a new incarnation with the same name joins as usual. They
//! expire after [`TOMBSTONE_GRACE_FACTOR`] removal grace periods (only an
//! incarnation that is still alive then, e.g. one removed while partitioned,
//! is added back) and at most [`MAX_TOMBSTONES`] are kept.

use crate::raft::{Configuration, NodeId};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::time::Instant;

/// A tombstone lasts this many removal grace periods (2 min by default).
pub const TOMBSTONE_GRACE_FACTOR: u32 = 4;
/// Most tombstones kept; the oldest is dropped first beyond it.
pub const MAX_TOMBSTONES: usize = 1024;

/// Timing of membership decisions.
#[derive(Clone, Debug)]
pub struct MembershipPolicy {
    /// How long a new peer must be seen before it is added.
    pub add_after: Duration,
    /// How long a member may be unseen before it is removed.
    pub removal_grace: Duration,
}

/// One peer as discovery last saw it.
#[derive(Clone, Debug)]
struct Sighting {
    address: String,
    first_seen: Instant,
    last_seen: Instant,
}

/// A configuration change the leader should propose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add a new peer as a learner.
    AddLearner { id: NodeId, address: String },
    /// Remove a member, with the reason for the log.
    Remove { id: NodeId, reason: &'static str },
}

/// What discovery has seen, and the decisions drawn from it.
#[derive(Debug)]
pub struct MembershipDriver {
    policy: MembershipPolicy,
    seen: HashMap<NodeId, Sighting>,
    /// When this node started watching (removals wait a grace period from it).
    since: Instant,
    /// Incarnations that left or were removed, and when: never added again
    /// while the tombstone lasts.
    tombstones: HashMap<NodeId, Instant>,
    /// Members of the configuration seen by the last
    /// [`track_configuration`](Self::track_configuration); those missing
    /// from the next one are tombstoned.
    members: BTreeSet<NodeId>,
}

impl MembershipDriver {
    /// Creates a driver that has seen nobody yet.
    pub fn new(policy: MembershipPolicy, now: Instant) -> MembershipDriver {
        MembershipDriver {
            policy,
            seen: HashMap::new(),
            since: now,
            tombstones: HashMap::new(),
            members: BTreeSet::new(),
        }
    }

    /// Records that `id` answered at `address`. A tombstoned incarnation is
    /// not recorded: it left and must not be added again.
    pub fn observe(&mut self, id: NodeId, address: String, now: Instant) {
        if self.is_tombstoned(&id, now) {
            return;
        }
        let s = self.seen.entry(id).or_insert(Sighting {
            address: address.clone(),
            first_seen: now,
            last_seen: now,
        });
        // A peer that was away longer than the debounce starts over.
        if now.saturating_duration_since(s.last_seen) > self.policy.add_after * 4 {
            s.first_seen = now;
        }
        s.address = address;
        s.last_seen = now;
    }

    /// Forgets a peer (it is leaving on purpose).
    pub fn forget(&mut self, id: &NodeId) {
        self.seen.remove(id);
    }

    /// Forgets incarnation `id` and refuses to observe or add it again
    /// while the tombstone lasts: it left, or it was removed. Other
    /// incarnations of the same name are not affected.
    pub fn tombstone(&mut self, id: NodeId, now: Instant) {
        self.seen.remove(&id);
        self.expire_tombstones(now);
        if self.tombstones.len() >= MAX_TOMBSTONES && !self.tombstones.contains_key(&id) {
            let oldest = self
                .tombstones
                .iter()
                .min_by_key(|(_, at)| **at)
                .map(|(id, _)| id.clone());
            if let Some(oldest) = oldest {
                self.tombstones.remove(&oldest);
            }
        }
        self.tombstones.insert(id, now);
    }

    /// Returns whether incarnation `id` is tombstoned at `now`.
    pub fn is_tombstoned(&self, id: &NodeId, now: Instant) -> bool {
        self.tombstones
            .get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < self.tombstone_ttl())
    }

    /// Tombstones every member of the previously tracked configuration that
    /// `config` no longer holds (removed by any path: Leave, gone from
    /// discovery, replaced incarnation), then remembers `config`'s members.
    /// Call it before [`next_change`](Self::next_change) and whenever the
    /// configuration may have changed, on every role: a follower that
    /// becomes leader must know what its predecessor removed.
    pub fn track_configuration(&mut self, me: &NodeId, config: &Configuration, now: Instant) {
        // The common case, checked without building a set: nothing changed
        // (equal sizes and every tracked id still a member make the sets
        // equal; an id listed as voter and learner takes the long way).
        if self.members.len() == config.voters.len() + config.learners.len()
            && self.members.iter().all(|id| config.contains(id))
        {
            return;
        }
        let current: BTreeSet<NodeId> = config.members().map(|(id, _)| id.clone()).collect();
        let removed: Vec<NodeId> = self
            .members
            .difference(&current)
            .filter(|id| *id != me)
            .cloned()
            .collect();
        for id in removed {
            self.tombstone(id, now);
        }
        self.members = current;
    }

    fn tombstone_ttl(&self) -> Duration {
        self.policy.removal_grace * TOMBSTONE_GRACE_FACTOR
    }

    fn expire_tombstones(&mut self, now: Instant) {
        let ttl = self.tombstone_ttl();
        self.tombstones
            .retain(|_, at| now.saturating_duration_since(*at) < ttl);
    }

    /// Restarts the removal grace period (call when becoming leader: a new
    /// leader has not had time to see everyone yet).
    pub fn restart_grace(&mut self, now: Instant) {
        self.since = now;
    }

    /// Returns peers seen recently: (id, address).
    pub fn recently_seen(&self, now: Instant, within: Duration) -> Vec<(NodeId, String)> {
        let mut v: Vec<_> = self
            .seen
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.last_seen) <= within)
            .map(|(id, s)| (id.clone(), s.address.clone()))
            .collect();
        v.sort();
        v
    }

    /// Returns the address a peer was last seen at.
    pub fn address_of(&self, id: &NodeId) -> Option<&str> {
        self.seen.get(id).map(|s| s.address.as_str())
    }

    /// Decides the next change for leader `me` with configuration `config`.
    pub fn next_change(
        &mut self,
        me: &NodeId,
        config: &Configuration,
        now: Instant,
    ) -> Option<MembershipChange> {
        let grace = self.policy.removal_grace;
        // Forget peers unseen for much longer than any decision needs.
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.last_seen) <= grace * 4);
        self.expire_tombstones(now);
        let fresh = |s: &Sighting| now.saturating_duration_since(s.last_seen) <= grace;

        // 1. A member replaced by a new incarnation: another identity answers
        //    for its name or address, and it has not answered since.
        for (member, address) in config.members() {
            if member == me {
                continue;
            }
            let member_seen = self.seen.get(member).map(|s| s.last_seen);
            let replaced = self.seen.iter().any(|(id, s)| {
                id != member
                    && fresh(s)
                    && (id.name == member.name || s.address == *address)
                    && member_seen.is_none_or(|m| m < s.first_seen)
            });
            if replaced {
                return Some(MembershipChange::Remove {
                    id: member.clone(),
                    reason: "replaced by a new incarnation",
                });
            }
        }
        // 2. A member gone from discovery for the grace period.
        if now.saturating_duration_since(self.since) >= grace {
            for (member, _) in config.members() {
                if member == me {
                    continue;
                }
                let gone = self.seen.get(member).is_none_or(|s| !fresh(s));
                if gone {
                    return Some(MembershipChange::Remove {
                        id: member.clone(),
                        reason: "gone from discovery",
                    });
                }
            }
        }
        // 3. A new peer seen steadily.
        let mut candidates: Vec<(&NodeId, &Sighting)> = self
            .seen
            .iter()
            .filter(|(id, s)| {
                *id != me
                    && !config.contains(id)
                    && !self.tombstones.contains_key(*id)
                    && now.saturating_duration_since(s.last_seen) <= self.policy.add_after * 2
                    && s.last_seen.saturating_duration_since(s.first_seen) >= self.policy.add_after
            })
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        candidates
            .first()
            .map(|(id, s)| MembershipChange::AddLearner {
                id: (*id).clone(),
                address: s.address.clone(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str, inc: u64) -> NodeId {
        NodeId::new(name, inc)
    }

    fn policy() -> MembershipPolicy {
        MembershipPolicy {
            add_after: Duration::from_secs(1),
            removal_grace: Duration::from_secs(10),
        }
    }

    fn config(members: &[(&str, u64)]) -> Configuration {
        Configuration::with_voters(
            members
                .iter()
                .map(|(n, i)| (id(n, *i), format!("{n}:4041"))),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_peer_is_added_only_after_it_was_seen_steadily() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.observe(id("b", 1), "b:4041".into(), t0);
        assert_eq!(d.next_change(&me, &cfg, t0), None, "seen once: debounce");
        let t1 = t0 + Duration::from_millis(1100);
        d.observe(id("b", 1), "b:4041".into(), t1);
        assert_eq!(
            d.next_change(&me, &cfg, t1),
            Some(MembershipChange::AddLearner {
                id: id("b", 1),
                address: "b:4041".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flapping_peer_is_not_added() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.observe(id("b", 1), "b:4041".into(), t0);
        // Gone for a long while, then back once: the debounce starts over.
        let t1 = t0 + Duration::from_secs(8);
        d.observe(id("b", 1), "b:4041".into(), t1);
        assert_eq!(d.next_change(&me, &cfg, t1), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_replaced_by_a_new_incarnation_is_removed_at_once() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1), ("b", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.observe(id("b", 1), "b:4041".into(), t0);
        let t1 = t0 + Duration::from_millis(500);
        d.observe(id("b", 2), "b:4041".into(), t1);
        assert_eq!(
            d.next_change(&me, &cfg, t1),
            Some(MembershipChange::Remove {
                id: id("b", 1),
                reason: "replaced by a new incarnation"
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_gone_from_discovery_is_removed_after_the_grace_period() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1), ("b", 1), ("c", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.observe(id("b", 1), "b:4041".into(), t0);
        d.observe(id("c", 1), "c:4041".into(), t0);
        let t1 = t0 + Duration::from_secs(9);
        d.observe(id("b", 1), "b:4041".into(), t1);
        assert_eq!(d.next_change(&me, &cfg, t1), None, "c still within grace");
        let t2 = t0 + Duration::from_secs(11);
        d.observe(id("b", 1), "b:4041".into(), t2);
        assert_eq!(
            d.next_change(&me, &cfg, t2),
            Some(MembershipChange::Remove {
                id: id("c", 1),
                reason: "gone from discovery"
            })
        );
    }

    /// Sees `id` at `b:4041` at t0 and again `add_after` later.
    fn seen_steadily(d: &mut MembershipDriver, id: NodeId, t0: Instant) -> Instant {
        d.observe(id.clone(), "b:4041".into(), t0);
        let t1 = t0 + Duration::from_millis(1100);
        d.observe(id, "b:4041".into(), t1);
        t1
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_removed_after_its_leave_is_not_added_back_while_it_still_answers() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let mut d = MembershipDriver::new(policy(), t0);
        let with_b = config(&[("a", 1), ("b", 1)]);
        d.track_configuration(&me, &with_b, t0);
        let t1 = seen_steadily(&mut d, id("b", 1), t0);
        // The core removed b on its Leave; b's process still answers hello.
        let without_b = config(&[("a", 1)]);
        d.track_configuration(&me, &without_b, t1);
        let t2 = t1 + Duration::from_millis(100);
        d.observe(id("b", 1), "b:4041".into(), t2);
        let t3 = t2 + Duration::from_millis(1100);
        d.observe(id("b", 1), "b:4041".into(), t3);
        assert_eq!(d.next_change(&me, &without_b, t3), None);
        assert!(d.recently_seen(t3, Duration::from_secs(5)).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_incarnation_with_a_tombstoned_name_still_joins() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.tombstone(id("b", 1), t0);
        let t1 = seen_steadily(&mut d, id("b", 2), t0);
        assert_eq!(
            d.next_change(&me, &cfg, t1),
            Some(MembershipChange::AddLearner {
                id: id("b", 2),
                address: "b:4041".into()
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_removed_as_gone_or_replaced_is_tombstoned_too() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let mut d = MembershipDriver::new(policy(), t0);
        d.track_configuration(&me, &config(&[("a", 1), ("b", 1), ("c", 1)]), t0);
        d.track_configuration(&me, &config(&[("a", 1), ("c", 1)]), t0);
        d.track_configuration(&me, &config(&[("a", 1)]), t0);
        assert!(d.is_tombstoned(&id("b", 1), t0));
        assert!(d.is_tombstoned(&id("c", 1), t0));
        assert!(!d.is_tombstoned(&id("a", 1), t0), "never itself");
        assert!(!d.is_tombstoned(&id("c", 2), t0), "per incarnation");
    }

    #[tokio::test(start_paused = true)]
    async fn a_tombstone_expires_after_four_removal_grace_periods() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        d.tombstone(id("b", 1), t0);
        let almost = t0 + Duration::from_secs(39);
        assert!(d.is_tombstoned(&id("b", 1), almost));
        let after = t0 + Duration::from_secs(40);
        assert!(!d.is_tombstoned(&id("b", 1), after));
        let t1 = seen_steadily(&mut d, id("b", 1), after);
        assert!(matches!(
            d.next_change(&me, &cfg, t1),
            Some(MembershipChange::AddLearner { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn tombstones_are_bounded_and_the_oldest_goes_first() {
        let t0 = Instant::now();
        let mut d = MembershipDriver::new(policy(), t0);
        for i in 0..=MAX_TOMBSTONES as u64 {
            d.tombstone(id("p", i), t0 + Duration::from_millis(i));
        }
        let now = t0 + Duration::from_secs(2);
        assert_eq!(d.tombstones.len(), MAX_TOMBSTONES);
        assert!(!d.is_tombstoned(&id("p", 0), now), "oldest dropped");
        assert!(d.is_tombstoned(&id("p", MAX_TOMBSTONES as u64), now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_leader_waits_a_grace_period_before_removing_unseen_members() {
        let t0 = Instant::now();
        let me = id("a", 1);
        let cfg = config(&[("a", 1), ("b", 1)]);
        let mut d = MembershipDriver::new(policy(), t0);
        let t1 = t0 + Duration::from_secs(20);
        d.restart_grace(t1);
        assert_eq!(d.next_change(&me, &cfg, t1), None);
    }
}
