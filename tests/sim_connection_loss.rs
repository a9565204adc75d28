//! Crash failover at the lease floor (see the "Crash failover" section of
//! the core's doc): followers that see their leader's connection end
//! campaign at once, and the new leader waits out the old lease. These tests
//! check that no two leases ever overlap — with crashes reported, spurious
//! and partial reports about a live leader, adversarial clock rates and all
//! the simulator's other faults — and that the waiting is what keeps it so.
//!
//! Replay one run with `SIM_SEED=<seed> SIM_NODES=<n> cargo test --test sim_connection_loss`.
//! `SIM_SEEDS=<count>` changes how many seeds per cluster size run (default 1000).

#[path = "support/sim.rs"]
mod sim_support;

use raft_elector::sim::{Sim, SimConfig, SimStats};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use sim_support::{
    add_stats, adversarial_clocks, assert_no_failures, faults_then_heal, faulty_config, replay,
    seeds_for, LIVENESS_BOUND,
};
use std::time::Duration;

/// A faulty network from the seed, with connection ends on.
fn connection_loss_config(nodes: usize, seed: u64) -> SimConfig {
    let (mut cfg, _) = faulty_config(nodes, seed, 0xc0ffee, &[0.0, 0.02, 0.1]);
    cfg.connection_ends = true;
    cfg
}

fn check_random_faults(nodes: usize) {
    let seeds = seeds_for(nodes, 1000);
    let mut failures = Vec::new();
    let mut total = SimStats::default();
    for &seed in &seeds {
        let mut sim = Sim::new(connection_loss_config(nodes, seed));
        let recovery = faults_then_heal(&mut sim);
        add_stats(&mut total, &sim.stats());
        let replay = replay(seed, nodes);
        if let Some(v) = sim.violations().first() {
            failures.push(format!("seed {seed}: {v} {replay}"));
        }
        if recovery.is_none_or(|d| d > LIVENESS_BOUND) {
            failures.push(format!(
                "seed {seed}: no leader with a lease within {LIVENESS_BOUND:?} after healing \
                 (took {recovery:?}) {replay}"
            ));
        }
    }
    println!("{nodes} nodes, {} seeds, faults: {total:?}", seeds.len());
    assert_no_failures(&failures, seeds.len(), nodes);
    if seeds.len() >= 100 {
        let n = seeds.len() as u64;
        assert!(total.crashes >= n, "{total:?}");
        assert!(total.connection_ends >= n, "{total:?}");
        assert!(total.spurious_connection_ends >= n / 2, "{total:?}");
        assert!(total.partitions >= n, "{total:?}");
    }
}

#[test]
fn three_node_clusters_with_connection_ends_never_hold_two_leases() {
    check_random_faults(3);
}

#[test]
fn five_node_clusters_with_connection_ends_never_hold_two_leases() {
    check_random_faults(5);
}

#[test]
fn seven_node_clusters_with_connection_ends_never_hold_two_leases() {
    check_random_faults(7);
}

/// Runs a stable 5-node cluster, then, at a seeded point of the heartbeat
/// cycle, partitions the live leader from the others (so nothing tells it of
/// the new term and it keeps its lease) and reports its connection lost to
/// every follower,
/// with the adversary's clock rates: the old leader's clock slow (its lease
/// lasts longest in real time), everyone else's fast (they measure the
/// elapsed time as long and wait least). Returns the violations seen.
fn spurious_end_at_the_worst_moment(seed: u64, skip_wait: bool) -> Vec<String> {
    let mut cfg = SimConfig::new(5, seed);
    cfg.delay = (Duration::from_micros(100), Duration::from_micros(300));
    cfg.mutate_skip_lease_wait = skip_wait;
    let drift = cfg.raft.max_clock_drift;
    let mut sim = Sim::new(cfg);
    if sim.run_until_lease(Duration::from_secs(5)).is_none() {
        return vec![format!("seed {seed}: no first leader")];
    }
    sim.run_for(Duration::from_millis(300));
    let Some(leader) = sim.leader() else {
        return vec![format!("seed {seed}: no leader after settling")];
    };
    adversarial_clocks(&mut sim, 5, leader, drift);
    // Land anywhere in the heartbeat cycle, seeded.
    let mut rng = SmallRng::seed_from_u64(seed);
    sim.run_for(Duration::from_micros(rng.random_range(0..50_000)));
    let followers: Vec<usize> = (0..5).filter(|s| *s != leader).collect();
    sim.partition(&[leader]);
    sim.report_connection_lost(&followers, leader);
    sim.run_for(Duration::from_secs(2));
    sim.violations().iter().map(|v| v.to_string()).collect()
}

#[test]
fn a_spurious_connection_end_at_the_worst_moment_never_gives_two_leases() {
    let seeds = seeds_for(5, 300);
    let mut failures = Vec::new();
    for &seed in &seeds {
        if let Some(v) = spurious_end_at_the_worst_moment(seed, false).first() {
            failures.push(format!("seed {seed}: {v} (replay: SIM_SEED={seed})"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_new_leader_that_skips_the_lease_wait_is_caught() {
    // Mutation check: without the wait, the new leader's lease overlaps the
    // live old leader's, and the invariant checker must say so.
    let seeds: Vec<u64> = (0..100).collect();
    let caught = seeds
        .iter()
        .filter(|&&seed| {
            spurious_end_at_the_worst_moment(seed, true)
                .iter()
                .any(|v| v.contains("lease"))
        })
        .count();
    println!("skipping the lease wait was caught in {caught} of 100 runs");
    assert!(
        caught >= 50,
        "skipping the wait broke the lease in only {caught} of 100 runs"
    );
}

/// Crashes the leader of a settled cluster at a seeded point of its
/// heartbeat cycle and returns how long until another node holds a lease.
fn failover_after_crash(nodes: usize, seed: u64, connection_ends: bool) -> Option<Duration> {
    let mut cfg = SimConfig::new(nodes, seed);
    cfg.delay = (Duration::from_micros(200), Duration::from_micros(600));
    cfg.connection_ends = connection_ends;
    // A dead process's sockets are all closed: every report arrives.
    cfg.connection_end_loss = 0.0;
    let mut sim = Sim::new(cfg);
    sim.run_until_lease(Duration::from_secs(5))?;
    let mut rng = SmallRng::seed_from_u64(seed);
    sim.run_for(Duration::from_millis(300 + rng.random_range(0..50)));
    let leader = sim.leader()?;
    sim.crash(leader);
    let took = sim.run_until_lease(Duration::from_secs(5));
    assert!(
        sim.violations().is_empty(),
        "seed {seed}: {:?}",
        sim.violations()
    );
    took
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn crash_failover_with_connection_ends_sits_at_the_lease_floor() {
    let trials = 300;
    let mut with: Vec<Duration> = Vec::new();
    let mut without: Vec<Duration> = Vec::new();
    for seed in 0..trials {
        with.push(failover_after_crash(5, seed, true).expect("a new leader with a lease"));
        without.push(failover_after_crash(5, seed, false).expect("a new leader with a lease"));
    }
    with.sort();
    without.sort();
    println!("slowest: {:?}", &with[with.len() - 8..]);
    let (w50, w99) = (percentile(&with, 0.5), percentile(&with, 0.99));
    let (o50, o99) = (percentile(&without, 0.5), percentile(&without, 0.99));
    println!(
        "simulated crash failover, 5 nodes, {trials} trials: connection ends p50 {w50:?} p99 {w99:?}; \
         election timeout only p50 {o50:?} p99 {o99:?}"
    );
    // The floor: the old lease (148.5 ms from its last round) stretched by
    // the drift factor, minus the time since that round.
    assert!(w99 <= Duration::from_millis(165), "p99 {w99:?}");
    assert!(w50 <= Duration::from_millis(135), "p50 {w50:?}");
    assert!(w50 < o50, "connection ends p50 {w50:?} vs timeout {o50:?}");
}
