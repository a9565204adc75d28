//! raft-elector: a Kubernetes leader-election sidecar built on a Raft core.
//!
//! Modules, in the direction data flows:
//! - [`discovery`]: peers from a headless Service's DNS records or a static list.
//! - [`transport`]: one Noise-authenticated TCP connection per peer pair.
//! - [`raft`]: the pure election core (no I/O, no clock, no randomness of its own).
//! - [`storage`]: durable hard state (atomic file writes, corruption detection).
//! - [`runtime`]: the task that owns the core and publishes [`leadership::LeaderState`].
//! - [`leadership`]: the leadership state every downstream adapter reads.
//! - [`api`]: the app-facing HTTP API (`/is-leader`, `/leader`, wait, `/metrics`).
//! - [`kube`]: Kubernetes publishing (pod labels, LeaderElection CRD and status, Events).
//! - [`metrics`]: Prometheus metrics.
//! - [`timer`]: a deadline timer that wakes the process once per deadline (timerfd).
//! - [`cli`]: flags, env twins and their validation.
//! - [`app`]: the one place that wires the adapters around the node.
//! - [`demo`]: `raft-elector demo`, a local cluster with a live view and fault injection.
//! - `sim`: a deterministic simulator of many cores, compiled only for tests
//!   and benchmarks (the `sim` feature), never into the shipped binary.
pub mod api;
pub mod app;
pub mod cli;
pub mod demo;
pub mod discovery;
pub mod kube;
pub mod leadership;
pub mod metrics;
pub mod raft;
pub mod runtime;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod storage;
pub mod timer;
pub mod transport;
