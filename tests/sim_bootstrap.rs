//! Local bootstrap in the simulator (issue 8): nodes start at random times
//! without state and agree on the first configuration through hello-like
//! reports, under partial visibility, loss, crashes and stateless restarts.
//!
//! Checked over many seeds per cluster size: never two valid leases at one
//! instant, never two first configurations that commit anything, every
//! simulator invariant (one leader per term, committed entries never
//! diverge, a vote per term, ...), and liveness: once every expected member
//! is up and connected, a leader with a lease within 2 s, whose first
//! configuration held every expected member (voters up to `max_voters`).
//!
//! Replay one run with `SIM_SEED=<seed> SIM_NODES=<n> cargo test --test sim_bootstrap`.
//! `SIM_SEEDS=<count>` changes how many seeds per size run (default 1000);
//! `SIM_TRACE=1` with `SIM_SEED` prints the run's starts, crashes, promises,
//! bootstraps and abandons, then every node's state after healing.

#[path = "support/sim.rs"]
mod sim_support;

use raft_elector::runtime::bootstrap::first_voter_count;
use raft_elector::sim::{Sim, SimBootstrap, SimConfig, SimStats};
use rand::Rng;
use sim_support::{
    add_stats, assert_no_failures, env_u64, faulty_config, replay, seeds_for, LIVENESS_BOUND,
};
use std::time::Duration;

/// The runtime's hello period while a node has not joined.
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Builds a faulty network and a random start order from the seed.
fn bootstrap_config(nodes: usize, seed: u64) -> SimConfig {
    let (mut cfg, mut rng) = faulty_config(nodes, seed, 0xb007, &[0.0, 0.02]);
    cfg.bootstrap = Some(SimBootstrap {
        expect: nodes,
        // From all at once to seconds apart.
        start_within: Duration::from_millis([0, 500, 3_000][rng.random_range(0..3)]),
        probe_interval: PROBE_INTERVAL,
    });
    cfg
}

struct Outcome {
    failure: Option<String>,
    recovery: Option<Duration>,
    clean_start: Option<Duration>,
    stats: SimStats,
}

/// One run: faults while the nodes start and bootstrap, then heal and
/// require a leader; `faults` false runs the same start order without faults.
fn run_one(nodes: usize, seed: u64, faults: bool) -> Outcome {
    let mut sim = Sim::new(bootstrap_config(nodes, seed));
    let mut clean_start = None;
    let recovery = if faults {
        sim.run_random_faults(Duration::from_secs(4));
        sim.heal_all();
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{}", sim.events().join("\n"));
            for _ in 0..10 {
                eprintln!("at {:?}:\n{}", sim.now(), sim.describe());
                sim.run_for(Duration::from_millis(400));
            }
        }
        sim.run_until_lease(Duration::from_secs(10))
    } else {
        // No faults: measured from the last node's start.
        let lease = sim.run_until_lease(Duration::from_secs(10));
        let since_last = lease.map(|_| sim.now().saturating_sub(sim.last_start()));
        clean_start = since_last;
        since_last
    };
    sim.run_for(Duration::from_secs(1));
    let mut failure = sim.violations().first().map(|v| v.to_string());
    let firsts = sim.committed_first_configurations();
    if failure.is_none() {
        match firsts {
            [] => failure = Some("no first configuration committed anything".to_string()),
            [first] => {
                let members = first.voters.len() + first.learners.len();
                let voters = first_voter_count(nodes, 5);
                if members != nodes || first.voters.len() != voters {
                    failure = Some(format!(
                        "the committed first configuration has {} voters and {} learners, expected {voters} voters of {nodes}",
                        first.voters.len(),
                        first.learners.len()
                    ));
                }
            }
            more => failure = Some(format!("{} first configurations committed", more.len())),
        }
    }
    Outcome {
        failure,
        recovery,
        clean_start,
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
    let mut starts = Vec::new();
    let mut total = SimStats::default();
    for &seed in &seeds {
        // Every tenth seed starts without faults: the plain bootstrap time.
        let faults = seed % 10 != 0;
        let out = run_one(nodes, seed, faults);
        add_stats(&mut total, &out.stats);
        let replay = replay(seed, nodes);
        if let Some(f) = out.failure {
            failures.push(format!("seed {seed}: {f} {replay}"));
        }
        match out.recovery {
            Some(d) if d <= LIVENESS_BOUND => recoveries.push(d),
            other => failures.push(format!(
                "seed {seed}: no leader with a lease within {LIVENESS_BOUND:?} once all were up (took {other:?}) {replay}"
            )),
        }
        starts.extend(out.clean_start);
    }
    recoveries.sort();
    starts.sort();
    let q = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
    };
    println!(
        "{nodes} nodes, {} seeds: leader after heal p50 {:?} p99 {:?} max {:?}; from the last start without faults p50 {:?} max {:?}",
        seeds.len(),
        q(&recoveries, 0.5),
        q(&recoveries, 0.99),
        recoveries.last(),
        q(&starts, 0.5),
        starts.last(),
    );
    println!("{nodes} nodes, over all seeds: {total:?}");
    assert_no_failures(&failures, seeds.len(), nodes);
    if seeds.len() >= 100 {
        // The faults really happened during bootstrap.
        let n = seeds.len() as u64;
        assert!(total.crashes >= n, "{total:?}");
        assert!(total.restarts_without_state >= n / 10, "{total:?}");
        assert!(total.partitions >= n, "{total:?}");
        assert!(total.abandons >= n / 20, "{total:?}");
    }
}

#[test]
fn three_nodes_bootstrap_one_fault_tolerant_cluster_under_faults() {
    check_many(3);
}

#[test]
fn five_nodes_bootstrap_one_fault_tolerant_cluster_under_faults() {
    check_many(5);
}

#[test]
fn seven_nodes_bootstrap_five_voters_and_two_learners_under_faults() {
    check_many(7);
}

#[test]
fn members_started_minutes_apart_form_one_cluster_right_after_the_last_one_starts() {
    for nodes in [3, 5, 7] {
        let mut worst = Duration::ZERO;
        for seed in 0..env_u64("SIM_SEEDS").map_or(20, |n| n / 50 + 1) {
            let mut cfg = bootstrap_config(nodes, seed);
            cfg.loss = 0.0;
            if let Some(b) = cfg.bootstrap.as_mut() {
                b.start_within = Duration::from_secs(300);
            }
            let mut sim = Sim::new(cfg);
            let lease = sim.run_until_lease(Duration::from_secs(320));
            assert!(
                lease.is_some(),
                "{nodes} nodes, seed {seed}: no leader after all started minutes apart"
            );
            let since_last = sim.now().saturating_sub(sim.last_start());
            worst = worst.max(since_last);
            assert!(
                since_last <= LIVENESS_BOUND,
                "{nodes} nodes, seed {seed}: leader {since_last:?} after the last start (replay: SIM_SEED={seed} SIM_NODES={nodes})"
            );
            sim.run_for(Duration::from_secs(1));
            assert!(sim.violations().is_empty(), "{:?}", sim.violations());
            assert_eq!(sim.committed_first_configurations().len(), 1);
            assert_eq!(sim.stats().abandons, 0, "nothing to give up without faults");
        }
        println!(
            "{nodes} nodes started within 5 minutes: leader at most {worst:?} after the last start"
        );
    }
}
