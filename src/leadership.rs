//! The leadership state the node runtime publishes on its `watch` channel:
//! the one type every downstream adapter (HTTP API, status file, Kubernetes
//! publisher, metrics) reads. It lives outside `runtime` so adapters never
//! import the runtime.

use crate::raft::Role;
use std::time::Duration;
use tokio::time::Instant;

/// What every adapter (HTTP API, publisher, metrics) reads about leadership.
/// Published by the node runtime on each change; the lease is a deadline so
/// readers compute "leader right now" against their own `Instant::now()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderState {
    /// This member's identity (`name#incarnation`).
    pub node_id: String,
    /// This member's name (pod name).
    pub node_name: String,
    /// This node's role.
    pub role: Role,
    /// This node's current term.
    pub term: u64,
    /// Name of the known leader of `term`.
    pub leader: Option<String>,
    /// Full identity of the known leader.
    pub leader_id: Option<String>,
    /// Peer address of the known leader.
    pub leader_address: Option<String>,
    /// Deadline of this node's lease; `Some` only on a leader holding one.
    pub lease_until: Option<Instant>,
    /// Whether this node votes.
    pub is_voter: bool,
    /// Voters in the latest configuration.
    pub voters: usize,
    /// Learners in the latest configuration.
    pub learners: usize,
    /// Whether the node has joined a cluster (is in a configuration).
    pub joined: bool,
    /// Set once the node is shutting down; `/readyz` fails from then on.
    pub shutting_down: bool,
    /// Members of the latest configuration, by identity (the Kubernetes
    /// publisher writes them to the LeaderElection status).
    pub members: Vec<MemberInfo>,
}

/// One member of the latest configuration, as the status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInfo {
    /// Member (pod) name.
    pub name: String,
    /// Full identity (`name#incarnation`).
    pub id: String,
    /// Peer address (`host:port`).
    pub address: String,
    /// Whether it votes (else it is a learner).
    pub voter: bool,
}

impl LeaderState {
    /// Returns the state of a node that has not started yet.
    pub fn initial(node_id: String, node_name: String) -> LeaderState {
        LeaderState {
            node_id,
            node_name,
            role: Role::Follower,
            term: 0,
            leader: None,
            leader_id: None,
            leader_address: None,
            lease_until: None,
            is_voter: false,
            voters: 0,
            learners: 0,
            joined: false,
            shutting_down: false,
            members: Vec::new(),
        }
    }

    /// Returns whether this node is the leader with a valid lease at `now`.
    pub fn is_leader_at(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|until| now < until)
    }

    /// Returns the lease time left at `now` (zero when not leading).
    pub fn lease_remaining_at(&self, now: Instant) -> Duration {
        self.lease_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now))
    }
}
