//! raft-elector: a Kubernetes leader-election sidecar built on a Raft core.
//!
//! Modules:
//! - [`api`]: the app-facing HTTP API (`/is-leader`, long-poll, events, metrics).
//! - [`cli`]: command-line flags and their validation.
//! - [`raft`]: the pure election core (no I/O, no clock, no randomness of its own).
//! - [`storage`]: durable hard state (atomic file writes, corruption detection).
//! - [`runtime`]: the task that owns the core and publishes [`runtime::LeaderState`].
//! - [`metrics`]: Prometheus metrics.
pub mod api;
pub mod cli;
pub mod metrics;
pub mod raft;
pub mod runtime;
pub mod storage;
