//! The node runtime: the one task that owns the Raft core, and what it
//! consults: the membership driver and the bootstrap authority (which
//! agrees on the first configuration, [`bootstrap`]). [`crate::app`] wires
//! the adapters around it.
//!
//! ```text
//!  DNS / static peers ─► discovery ─► hello prober ─(PeerInfo)─┐
//!                                                              ▼
//!  peers ─► transport server ─(Inbound)────────────────► NodeTask (owns RaftCore)
//!            (replies go back in the HTTP answer) ◄─────────┤   │
//!  peers ◄─ transport client ◄─(Message)────────────────────┘   │
//!            (peers' replies) ─(Inbound)─► NodeTask             │
//!                                                                │ watch<LeaderState>
//!                          ┌─────────────────────────────────────┤
//!                          ▼                                     ▼
//!        HTTP API (/is-leader, /leader, wait, /metrics)    status file (optional)
//! ```

pub mod bootstrap;
pub mod membership;
pub mod node;
pub mod streams;
pub mod timer;

pub use bootstrap::{BootstrapAuthority, BootstrapStep, LocalAgreement};
pub use membership::{MembershipChange, MembershipDriver, MembershipPolicy};
pub use node::{NodeError, NodeOptions, NodeTask};
