//! The node runtime: one tokio task that owns the Raft core.
pub mod state;
pub use state::LeaderState;
