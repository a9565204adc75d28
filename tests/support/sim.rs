//! Shared fixtures of the seeded simulator suites (`tests/sim_*.rs`): which
//! seeds run, the faulty network drawn from a seed, the fault-then-heal run
//! and the summary of many seeds.
//!
//! Every suite replays one run with `SIM_SEED=<seed> SIM_NODES=<n>`;
//! `SIM_SEEDS=<count>` changes how many seeds per cluster size run.

#![allow(dead_code)]

use raft_elector::sim::{Sim, SimConfig, SimStats};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Once faults heal and every node is back, a leader with a valid lease
/// appears within this bound: stickiness (150 ms) + worst election timeout
/// (300 ms) + a few split or failed rounds of up to 300 ms each.
pub const LIVENESS_BOUND: Duration = Duration::from_millis(2_000);

/// Returns the environment variable `name` as a number, if set and numeric.
pub fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Returns the seeds to run for `nodes` nodes: `SIM_SEED` alone (none when
/// `SIM_NODES` names another size), else `0..SIM_SEEDS` (`default` seeds).
pub fn seeds_for(nodes: usize, default: u64) -> Vec<u64> {
    match env_u64("SIM_SEED") {
        Some(s) if env_u64("SIM_NODES").is_none_or(|n| n == nodes as u64) => vec![s],
        Some(_) => vec![],
        None => (0..env_u64("SIM_SEEDS").unwrap_or(default)).collect(),
    }
}

/// Returns how to replay `seed` with `nodes` nodes, for failure messages.
pub fn replay(seed: u64, nodes: usize) -> String {
    format!("(replay: SIM_SEED={seed} SIM_NODES={nodes})")
}

/// Builds a faulty network of `nodes` from `seed`: delay, loss, duplication
/// (one of `duplicates`) and the full drift bound the lease assumes. The
/// draws come from a generator seeded with `seed ^ salt`, returned for a
/// suite's further draws, so each suite keeps its own sequence of networks.
pub fn faulty_config(
    nodes: usize,
    seed: u64,
    salt: u64,
    duplicates: &[f64],
) -> (SimConfig, SmallRng) {
    let mut rng = SmallRng::seed_from_u64(seed ^ salt);
    let mut cfg = SimConfig::new(nodes, seed);
    let lo = rng.random_range(100..2_000);
    let hi = lo + rng.random_range(0..8_000);
    cfg.delay = (Duration::from_micros(lo), Duration::from_micros(hi));
    cfg.loss = [0.0, 0.01, 0.05][rng.random_range(0..3)];
    cfg.duplicate = duplicates[rng.random_range(0..duplicates.len())];
    cfg.drift = cfg.raft.max_clock_drift;
    (cfg, rng)
}

/// Runs `sim` settled for 0.5 s, with random faults for 8 s, heals every
/// fault and returns how long until a leader holds a lease (at most 10 s);
/// then runs 1 s more, in which leadership must hold without violations.
pub fn faults_then_heal(sim: &mut Sim) -> Option<Duration> {
    sim.run_for(Duration::from_millis(500));
    sim.run_random_faults(Duration::from_secs(8));
    sim.heal_all();
    let recovery = sim.run_until_lease(Duration::from_secs(10));
    sim.run_for(Duration::from_secs(1));
    recovery
}

/// Sets the adversary's clock rates within a drift bound of `drift`: the
/// clock of `slow` (an old leader: its lease lasts longest in real time)
/// runs slow, every other of the `nodes` clocks fast (they measure elapsed
/// time as long and wait least).
pub fn adversarial_clocks(sim: &mut Sim, nodes: usize, slow: usize, drift: f64) {
    for slot in 0..nodes {
        let rate = if slot == slow {
            1.0 - drift / 2.0
        } else {
            1.0 + drift / 2.0
        };
        sim.set_clock_rate(slot, rate);
    }
}

/// Adds the counts of one run to `total`.
pub fn add_stats(total: &mut SimStats, run: &SimStats) {
    total.delivered += run.delivered;
    total.crashes += run.crashes;
    total.connection_ends += run.connection_ends;
    total.spurious_connection_ends += run.spurious_connection_ends;
    total.restarts_with_state += run.restarts_with_state;
    total.restarts_without_state += run.restarts_without_state;
    total.partitions += run.partitions;
    total.transfers += run.transfers;
    total.leaders += run.leaders;
    total.config_changes_committed += run.config_changes_committed;
    total.bootstraps += run.bootstraps;
    total.abandons += run.abandons;
}

/// Fails with every failed seed when there is one.
pub fn assert_no_failures(failures: &[String], seeds: usize, nodes: usize) {
    assert!(
        failures.is_empty(),
        "{} of {seeds} seeds failed for {nodes} nodes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
