//! raft-elector: a Kubernetes leader-election sidecar built on a Raft core.
//!
//! Modules, in the direction data flows:
//! - [`discovery`]: peers from a headless Service's DNS records or a static list.
//! - [`transport`]: authenticated peer RPC (HTTP/JSON, HMAC-signed).
//! - [`raft`]: the pure election core (no I/O, no clock, no randomness of its own).
//! - [`storage`]: durable hard state (atomic file writes, corruption detection).
//! - [`runtime`]: the task that owns the core and publishes [`runtime::LeaderState`].
//! - [`api`]: the app-facing HTTP API (`/is-leader`, `/leader`, wait, `/metrics`).
//! - [`metrics`]: Prometheus metrics.
//! - [`cli`]: flags, env twins and their validation.
//! - [`demo`]: `raft-elector demo`, a local cluster with a live view and fault injection.
//! - [`sim`]: a deterministic simulator of many cores (tests and benchmarks).
pub mod api;
pub mod cli;
pub mod demo;
pub mod discovery;
pub mod metrics;
pub mod raft;
pub mod runtime;
pub mod sim;
pub mod storage;
pub mod transport;
