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
///
/// On the wire each is one JSON object with its kind in `"type"` (serde's
/// internally tagged form). Decoding goes through [`WireBody`], one flat
/// struct, because serde decodes an internally tagged enum by buffering the
/// whole object first; that was a tenth of an idle leader's CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
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
    /// Answer to a vote request. `leader_contact_age` is how long ago, in
    /// nanoseconds of the voter's own monotonic clock, the voter last heard
    /// from a live leader (or led a round itself): the winner waits out the
    /// rest of that member's stickiness window before its lease may start
    /// (see the core's "Crash failover" doc). Peers that do not send it are
    /// read as 0, the most cautious value.
    #[serde(rename_all = "camelCase")]
    RequestVoteResponse {
        granted: bool,
        leader_contact_age: u64,
    },
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
    /// The sender is shutting down: to its leader, "remove me" (also the
    /// refusal of a TimeoutNow); from a leader to its members, "I leave
    /// without a successor" (see `RaftCore::abdicate`).
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

impl<'de> Deserialize<'de> for MessageBody {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MessageBody, D::Error> {
        WireBody::deserialize(d)?
            .into_body()
            .map_err(serde::de::Error::custom)
    }
}

/// Every field of every kind of [`MessageBody`], for decoding.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireBody {
    #[serde(rename = "type")]
    kind: WireKind,
    last_log_index: Option<LogIndex>,
    last_log_term: Option<Term>,
    granted: Option<bool>,
    leader_contact_age: Option<u64>,
    transfer: Option<bool>,
    prev_log_index: Option<LogIndex>,
    prev_log_term: Option<Term>,
    entries: Option<Vec<Entry>>,
    leader_commit: Option<LogIndex>,
    round: Option<u64>,
    success: Option<bool>,
    last_index: Option<LogIndex>,
    snapshot: Option<Snapshot>,
}

/// The `"type"` of a message body.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
enum WireKind {
    PreVote,
    PreVoteResponse,
    RequestVote,
    RequestVoteResponse,
    AppendEntries,
    AppendEntriesResponse,
    InstallSnapshot,
    TimeoutNow,
    Leave,
}

impl WireBody {
    /// Returns the body of the kind named, or which field it lacks.
    fn into_body(self) -> Result<MessageBody, String> {
        let kind = self.kind;
        let missing = |field: &str| format!("missing field `{field}` in a {kind:?} message");
        macro_rules! need {
            ($field:ident) => {
                self.$field.ok_or_else(|| missing(stringify!($field)))?
            };
        }
        Ok(match kind {
            WireKind::PreVote => MessageBody::PreVote {
                last_log_index: need!(last_log_index),
                last_log_term: need!(last_log_term),
            },
            WireKind::PreVoteResponse => MessageBody::PreVoteResponse {
                granted: need!(granted),
            },
            WireKind::RequestVote => MessageBody::RequestVote {
                last_log_index: need!(last_log_index),
                last_log_term: need!(last_log_term),
                transfer: need!(transfer),
            },
            WireKind::RequestVoteResponse => MessageBody::RequestVoteResponse {
                granted: need!(granted),
                leader_contact_age: self.leader_contact_age.unwrap_or(0),
            },
            WireKind::AppendEntries => MessageBody::AppendEntries {
                prev_log_index: need!(prev_log_index),
                prev_log_term: need!(prev_log_term),
                entries: need!(entries),
                leader_commit: need!(leader_commit),
                round: need!(round),
            },
            WireKind::AppendEntriesResponse => MessageBody::AppendEntriesResponse {
                success: need!(success),
                last_index: need!(last_index),
                round: need!(round),
            },
            WireKind::InstallSnapshot => MessageBody::InstallSnapshot {
                snapshot: need!(snapshot),
                leader_commit: need!(leader_commit),
                round: need!(round),
            },
            WireKind::TimeoutNow => MessageBody::TimeoutNow,
            WireKind::Leave => MessageBody::Leave,
        })
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
