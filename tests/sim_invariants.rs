//! Safety and liveness of the Raft core over many random seeds of faulty runs.
//!
//! Replay one failing run with `SIM_SEED=<seed> SIM_NODES=<n> cargo test --test sim_invariants`.
//! `SIM_SEEDS=<count>` changes how many seeds per cluster size run (default 1000).

use raft_elector::sim::{Sim, SimConfig, SimStats};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Once faults heal and every node is back, a leader with a valid lease
/// appears within this bound: stickiness (150 ms) + worst election timeout
/// (300 ms) + a few split or failed rounds of up to 300 ms each.
const LIVENESS_BOUND: Duration = Duration::from_millis(2_000);

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Builds a faulty network from the seed: delay, loss, duplication and drift vary per run.
fn faulty_config(nodes: usize, seed: u64) -> SimConfig {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed);
    let mut cfg = SimConfig::new(nodes, seed);
    let lo = rng.random_range(100..2_000);
    let hi = lo + rng.random_range(0..8_000);
    cfg.delay = (Duration::from_micros(lo), Duration::from_micros(hi));
    cfg.loss = [0.0, 0.01, 0.05][rng.random_range(0..3)];
    cfg.duplicate = [0.0, 0.02, 0.1][rng.random_range(0..3)];
    // The drift bound the lease assumes, used in full.
    cfg.drift = cfg.raft.max_clock_drift;
    cfg
}

struct Outcome {
    violations: Vec<String>,
    recovery: Option<Duration>,
    stats: SimStats,
}

fn run_one(nodes: usize, seed: u64) -> Outcome {
    let mut sim = Sim::new(faulty_config(nodes, seed));
    sim.run_for(Duration::from_millis(500));
    sim.run_random_faults(Duration::from_secs(8));
    sim.heal_all();
    let recovery = sim.run_until_lease(Duration::from_secs(10));
    // Keep running healed for a while: leadership must hold without violations.
    sim.run_for(Duration::from_secs(1));
    Outcome {
        violations: sim.violations().iter().map(|v| v.to_string()).collect(),
        recovery,
        stats: sim.stats(),
    }
}

fn check_many(nodes: usize) {
    let seeds: Vec<u64> = match env_u64("SIM_SEED") {
        Some(s) if env_u64("SIM_NODES").is_none_or(|n| n == nodes as u64) => vec![s],
        Some(_) => return,
        None => (0..env_u64("SIM_SEEDS").unwrap_or(1000)).collect(),
    };
    let mut failures = Vec::new();
    let mut recoveries = Vec::new();
    let mut total = SimStats::default();
    for &seed in &seeds {
        let out = run_one(nodes, seed);
        total.crashes += out.stats.crashes;
        total.restarts_with_state += out.stats.restarts_with_state;
        total.restarts_without_state += out.stats.restarts_without_state;
        total.partitions += out.stats.partitions;
        total.transfers += out.stats.transfers;
        total.leaders += out.stats.leaders;
        total.config_changes_committed += out.stats.config_changes_committed;
        if !out.violations.is_empty() {
            failures.push(format!(
                "seed {seed}: {} (replay: SIM_SEED={seed} SIM_NODES={nodes})",
                out.violations[0]
            ));
        }
        match out.recovery {
            Some(d) if d <= LIVENESS_BOUND => recoveries.push(d),
            other => failures.push(format!(
                "seed {seed}: no leader with a lease within {LIVENESS_BOUND:?} after healing (took {other:?}) (replay: SIM_SEED={seed} SIM_NODES={nodes})"
            )),
        }
    }
    recoveries.sort();
    if let (Some(p50), Some(max)) = (recoveries.get(recoveries.len() / 2), recoveries.last()) {
        println!(
            "{nodes} nodes, {} seeds: recovery after heal p50 {:?}, max {:?}",
            seeds.len(),
            p50,
            max
        );
    }
    println!("{nodes} nodes, faults injected over all seeds: {total:?}");
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed for {nodes} nodes:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
    if seeds.len() >= 100 {
        // The faults really happened, so the invariants were really exercised.
        let n = seeds.len() as u64;
        assert!(total.crashes >= n, "{total:?}");
        assert!(total.restarts_without_state >= n / 10, "{total:?}");
        assert!(total.partitions >= n, "{total:?}");
        assert!(total.transfers >= n / 10, "{total:?}");
        assert!(total.leaders >= 2 * n, "{total:?}");
        assert!(total.config_changes_committed >= n / 10, "{total:?}");
    }
}

#[test]
fn three_node_clusters_stay_safe_and_recover_under_random_faults() {
    check_many(3);
}

#[test]
fn five_node_clusters_stay_safe_and_recover_under_random_faults() {
    check_many(5);
}

#[test]
fn seven_node_clusters_with_learners_stay_safe_and_recover_under_random_faults() {
    check_many(7);
}
