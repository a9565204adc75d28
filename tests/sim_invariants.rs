//! Safety and liveness of the Raft core over many random seeds of faulty runs.
//!
//! Replay one failing run with `SIM_SEED=<seed> SIM_NODES=<n> cargo test --test sim_invariants`.
//! `SIM_SEEDS=<count>` changes how many seeds per cluster size run (default 1000).

#[path = "support/sim.rs"]
mod sim_support;

use raft_elector::sim::{Sim, SimStats};
use sim_support::{
    add_stats, assert_no_failures, faults_then_heal, faulty_config, replay, seeds_for,
    LIVENESS_BOUND,
};
use std::time::Duration;

struct Outcome {
    violations: Vec<String>,
    recovery: Option<Duration>,
    stats: SimStats,
}

fn run_one(nodes: usize, seed: u64) -> Outcome {
    let (cfg, _) = faulty_config(nodes, seed, 0x5eed, &[0.0, 0.02, 0.1]);
    let mut sim = Sim::new(cfg);
    let recovery = faults_then_heal(&mut sim);
    Outcome {
        violations: sim.violations().iter().map(|v| v.to_string()).collect(),
        recovery,
        stats: sim.stats(),
    }
}

fn check_many(nodes: usize) {
    let seeds = seeds_for(nodes, 1000);
    if seeds.is_empty() {
        return;
    }
    let mut failures = Vec::new();
    let mut recoveries = Vec::new();
    let mut total = SimStats::default();
    for &seed in &seeds {
        let out = run_one(nodes, seed);
        add_stats(&mut total, &out.stats);
        let replay = replay(seed, nodes);
        if let Some(violation) = out.violations.first() {
            failures.push(format!("seed {seed}: {violation} {replay}"));
        }
        match out.recovery {
            Some(d) if d <= LIVENESS_BOUND => recoveries.push(d),
            other => failures.push(format!(
                "seed {seed}: no leader with a lease within {LIVENESS_BOUND:?} after healing (took {other:?}) {replay}"
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
    assert_no_failures(&failures, seeds.len(), nodes);
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
