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

use crate::raft::{Configuration, NodeId};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

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
}

impl MembershipDriver {
    /// Creates a driver that has seen nobody yet.
    pub fn new(policy: MembershipPolicy, now: Instant) -> MembershipDriver {
        MembershipDriver {
            policy,
            seen: HashMap::new(),
            since: now,
        }
    }

    /// Records that `id` answered at `address`.
    pub fn observe(&mut self, id: NodeId, address: String, now: Instant) {
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
