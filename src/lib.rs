//! raft-elector: a Kubernetes leader-election sidecar built on a Raft core.
//!
//! Modules:
//! - [`raft`]: the pure election core (no I/O, no clock, no randomness of its own).
//! - [`storage`]: durable hard state (atomic file writes, corruption detection).
//! - [`runtime`]: the task that owns the core and publishes [`runtime::LeaderState`].
//! - [`metrics`]: Prometheus metrics.
pub mod metrics;
pub mod raft;
pub mod runtime;
pub mod storage;
pub mod transport;
