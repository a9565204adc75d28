//! The Raft election core: a pure state machine.
//!
//! No I/O, no clock, no global randomness. Time comes in as [`Time`]
//! arguments, randomness from a seed given at construction, and everything
//! the node wants done comes out of [`RaftCore::take_ready`] as a [`Ready`]:
//! hard state to persist first, then messages to send, then the leadership
//! view to publish. This is what lets `tests/` run hundreds of clusters
//! through a deterministic simulator.
//!
//! ```text
//!   runtime / simulator                          RaftCore
//!   ───────────────────                          ────────
//!   timer fires ───────── tick(now) ───────────►  timeouts, heartbeats, CheckQuorum
//!   peer message ──────── step(now, msg) ──────►  handle_request_vote, handle_append_entries, ...
//!   membership driver ─── propose_add_learner ─►  config entry appended (one at a time)
//!   SIGTERM ───────────── transfer_leadership ─►  TimeoutNow to the most up-to-date voter
//!                                                      │
//!   persist(hard_state) ◄─ take_ready() ◄──────────────┘
//!   send(messages)        (persist BEFORE send)
//!   publish(leadership)
//! ```
//!
//! Rules and where they come from: terms and votes (Raft paper §5.2), log
//! up-to-date check (§5.4.1), PreVote (dissertation §9.6), CheckQuorum and
//! stickiness (§6.2, §4.2.3), the leader lease (§6.4), leadership transfer
//! (§3.10), single-server membership changes with learners (§4.1–4.2.1), log
//! compaction to a snapshot of the configuration (§5).

pub mod config;
pub mod core;
pub mod log;
pub mod message;
pub mod types;

pub use self::config::{Config, ConfigError};
pub use self::core::{
    BootstrapError, Leadership, ProposeError, RaftCore, Ready, Role, StepError, TransferError,
};
pub use self::log::RaftLog;
pub use self::message::{Message, MessageBody};
pub use self::types::{
    Configuration, Entry, HardState, LogIndex, NodeId, Payload, Snapshot, Term, Time,
};

#[cfg(test)]
mod tests;
