//! The JSON documents the API serves, computed from a [`LeaderState`] at an
//! instant (the lease is a deadline, so "leader" depends on when you ask).

use crate::leadership::LeaderState;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Body of `GET /is-leader`, of each `leader` event on `GET /events`, and of
/// the status file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderStatus {
    /// Whether this node is the leader with a valid lease (the 200/503 answer).
    pub is_leader: bool,
    /// This member's name (pod name).
    pub node: String,
    /// This member's identity (`name#incarnation`).
    pub node_id: String,
    /// This node's Raft role (`follower`, `pre-candidate`, `candidate`, `leader`).
    pub role: String,
    /// Name of the known leader of `term`, if any.
    pub leader: Option<String>,
    /// Full identity of the known leader, if any.
    pub leader_id: Option<String>,
    /// Peer address of the known leader, if any.
    pub leader_address: Option<String>,
    /// This node's current Raft term.
    pub term: u64,
    /// Milliseconds of lease left when the document was made (0 unless leading).
    pub lease_remaining_ms: u64,
    /// Voters in the latest configuration.
    pub voters: usize,
    /// Learners in the latest configuration.
    pub learners: usize,
}

impl LeaderStatus {
    /// Describes `state` as seen at `now`.
    pub fn at(state: &LeaderState, now: Instant) -> LeaderStatus {
        let lease_ms = state.lease_remaining_at(now).as_millis();
        LeaderStatus {
            is_leader: state.is_leader_at(now),
            node: state.node_name.clone(),
            node_id: state.node_id.clone(),
            role: state.role.to_string(),
            leader: state.leader.clone(),
            leader_id: state.leader_id.clone(),
            leader_address: state.leader_address.clone(),
            term: state.term,
            lease_remaining_ms: u64::try_from(lease_ms).unwrap_or(u64::MAX),
            voters: state.voters,
            learners: state.learners,
        }
    }
}

/// Body of `GET /leader`: who leads, as far as this node knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderInfo {
    /// Name of the known leader, or `null`.
    pub leader: Option<String>,
    /// Full identity of the known leader, or `null`.
    pub leader_id: Option<String>,
    /// Peer address of the known leader, or `null`.
    pub leader_address: Option<String>,
    /// This node's current Raft term.
    pub term: u64,
}

impl LeaderInfo {
    /// Extracts the known leader from `state`.
    pub fn of(state: &LeaderState) -> LeaderInfo {
        LeaderInfo {
            leader: state.leader.clone(),
            leader_id: state.leader_id.clone(),
            leader_address: state.leader_address.clone(),
            term: state.term,
        }
    }
}

/// The part of the answer a waiting client reacts to: a long-poll returns and
/// an event is sent when any of these differs from what the client last saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// Whether this node is the leader with a valid lease.
    pub is_leader: bool,
    /// Name of the known leader.
    pub leader: Option<String>,
    /// This node's current term.
    pub term: u64,
}

impl Answer {
    /// Returns the answer `state` gives at `now`.
    pub fn of(state: &LeaderState, now: Instant) -> Answer {
        Answer {
            is_leader: state.is_leader_at(now),
            leader: state.leader.clone(),
            term: state.term,
        }
    }
}

impl From<&LeaderStatus> for Answer {
    fn from(status: &LeaderStatus) -> Answer {
        Answer {
            is_leader: status.is_leader,
            leader: status.leader.clone(),
            term: status.term,
        }
    }
}
