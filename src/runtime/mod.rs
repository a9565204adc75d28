//! The node runtime: the one task that owns the Raft core, and what it
//! consults: the membership driver and the bootstrap authority (which
//! agrees on the first configuration, [`bootstrap`]). [`crate::app`] wires
//! the adapters around it.
//!
//! ```text
//!  DNS / static peers ─► discovery ─► hello prober ─(PeerInfo)─┐
//!                                                              ▼
//!  peers ─► transport (one connection per peer) ─(Inbound)─► NodeTask (owns RaftCore)
//!  peers ◄─ transport ◄─(SendToPeer::send, by recipient)───────────┘   │
//!                                                                │ watch<LeaderState>
//!                          ┌─────────────────────────────────────┤
//!                          ▼                                     ▼
//!        HTTP API (/is-leader, /leader, wait, /metrics)    status file (optional)
//! ```

pub mod bootstrap;
pub mod membership;
pub mod node;

pub use bootstrap::{BootstrapAuthority, BootstrapStep, LocalAgreement};
pub use membership::{MembershipChange, MembershipDriver, MembershipPolicy};
pub use node::{NodeError, NodeOptions, NodeTask};
