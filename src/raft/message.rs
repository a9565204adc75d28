//! Messages exchanged between Raft peers.

use super::types::{Entry, LogIndex, NodeId, Snapshot, Term};
use serde::{Deserialize, Serialize};
use std::fmt;

/// One message from one member to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Sender.
    pub from: NodeId,
    /// Recipient; a message for another incarnation is refused.
    pub to: NodeId,
    /// Sender's term; for a pre-vote, the term the sender would campaign in.
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// The kinds of message. `round` fields carry the leader's send time in
/// nanoseconds of its own clock; followers echo them unchanged so the leader
/// can tell which heartbeat round a majority acknowledged (the lease, §6.4).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum MessageBody {
    /// Would you vote for me in `term`? Changes no state at the receiver
    /// (dissertation §9.6).
    #[serde(rename_all = "camelCase")]
    PreVote {
        last_log_index: LogIndex,
        last_log_term: Term,
    },
    /// Answer to a pre-vote; `term` is the pre-vote's term when granted.
    #[serde(rename_all = "camelCase")]
    PreVoteResponse { granted: bool },
    /// Vote for me in `term` (Raft paper §5.2). `transfer` marks a campaign
    /// started by the old leader's TimeoutNow, which overrides stickiness.
    #[serde(rename_all = "camelCase")]
    RequestVote {
        last_log_index: LogIndex,
        last_log_term: Term,
        transfer: bool,
    },
    /// Answer to a vote request.
    #[serde(rename_all = "camelCase")]
    RequestVoteResponse { granted: bool },
    /// Heartbeat and replication (Raft paper §5.3).
    #[serde(rename_all = "camelCase")]
    AppendEntries {
        prev_log_index: LogIndex,
        prev_log_term: Term,
        entries: Vec<Entry>,
        leader_commit: LogIndex,
        round: u64,
    },
    /// Answer to AppendEntries or InstallSnapshot. On success `last_index` is
    /// the highest index known to match the leader's log; on failure it is a
    /// hint: the follower's last log index.
    #[serde(rename_all = "camelCase")]
    AppendEntriesResponse {
        success: bool,
        last_index: LogIndex,
        round: u64,
    },
    /// Replaces a lagging follower's log prefix with the leader's snapshot.
    #[serde(rename_all = "camelCase")]
    InstallSnapshot {
        snapshot: Snapshot,
        leader_commit: LogIndex,
        round: u64,
    },
    /// Start an election now: the leader hands over (dissertation §3.10).
    TimeoutNow,
    /// The sender is shutting down and asks the leader to remove it.
    Leave,
}

impl MessageBody {
    /// Returns a short name of the message kind, for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            MessageBody::PreVote { .. } => "pre_vote",
            MessageBody::PreVoteResponse { .. } => "pre_vote_response",
            MessageBody::RequestVote { .. } => "request_vote",
            MessageBody::RequestVoteResponse { .. } => "request_vote_response",
            MessageBody::AppendEntries { .. } => "append_entries",
            MessageBody::AppendEntriesResponse { .. } => "append_entries_response",
            MessageBody::InstallSnapshot { .. } => "install_snapshot",
            MessageBody::TimeoutNow => "timeout_now",
            MessageBody::Leave => "leave",
        }
    }
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}->{} t{} {}",
            self.from,
            self.to,
            self.term,
            self.body.kind()
        )
    }
}
