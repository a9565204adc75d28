//! Shared test support; one module per fake or fixture.
pub mod cluster;
pub mod dns;
pub mod proc_stats;
