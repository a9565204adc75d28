//! Reproduces Figure 16 of the Raft paper on the deterministic simulator:
//! time from the leader's crash until a new leader holds a valid lease, for
//! several election-timeout ranges and cluster sizes.
//!
//! Run: `cargo bench --bench election_sim` (`-- --trials N` to change the
//! number of trials per row; `-- --quick` for 300). Exits non-zero when the
//! 5-node default row misses its targets (p50 <= 200 ms, p99 <= 300 ms).

use raft_elector::sim::{Sim, SimConfig};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// Give up on a trial after this long without a leader.
const GIVE_UP: Duration = Duration::from_secs(10);

struct Row {
    nodes: usize,
    timeout: (u64, u64),
    delay_us: (u64, u64),
    samples: Vec<Duration>,
    gave_up: usize,
}

fn trial(nodes: usize, timeout: (u64, u64), delay_us: (u64, u64), seed: u64) -> Option<Duration> {
    let mut cfg = SimConfig::new(nodes, seed);
    cfg.raft.election_timeout_min = Duration::from_millis(timeout.0);
    cfg.raft.election_timeout_max = Duration::from_millis(timeout.1);
    cfg.delay = (
        Duration::from_micros(delay_us.0),
        Duration::from_micros(delay_us.1),
    );
    let mut sim = Sim::new(cfg.clone());
    // Fixed timeouts may never elect from a cold start; the first leader of
    // every row comes from randomized timeouts, as in a running cluster.
    if timeout.0 == timeout.1 {
        let mut warm = cfg.clone();
        warm.raft.election_timeout_max = Duration::from_millis(300);
        sim = Sim::new(warm);
        sim.run_until_lease(Duration::from_secs(5))?;
        sim.set_timeouts(cfg.raft.election_timeout_min, cfg.raft.election_timeout_max);
    } else {
        sim.run_until_lease(Duration::from_secs(5))?;
    }
    // Crash at a random point of the heartbeat cycle.
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xf16);
    sim.run_for(Duration::from_millis(400 + rng.random_range(0..50)));
    let leader = sim.lease_holder()?;
    sim.crash(leader);
    sim.run_until_lease(GIVE_UP)
}

fn pct(sorted: &[Duration], p: f64) -> String {
    if sorted.is_empty() {
        return "-".into();
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    format!("{:.1}", sorted[i].as_secs_f64() * 1e3)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut trials = 2000usize;
    if args.iter().any(|a| a == "--quick") {
        trials = 300;
    }
    if let Some(i) = args.iter().position(|a| a == "--trials") {
        trials = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(trials);
    }
    let realistic = (500, 1500); // one-way pod-network delay, uniform
    let started = Instant::now();
    let mut rows = Vec::new();
    for nodes in [3, 5, 7] {
        for timeout in [(150, 150), (150, 155), (150, 175), (150, 200), (150, 300)] {
            rows.push(measure(nodes, timeout, realistic, trials));
        }
    }
    let target = measure(5, (150, 300), (1000, 1000), trials.max(2000));
    let wall = started.elapsed();

    println!("\n## Failover in the simulator (Raft paper, Figure 16)\n");
    println!("Crash of the leader at a random point of its heartbeat cycle -> first");
    println!("node holding a valid lease. Heartbeat 50 ms, PreVote and CheckQuorum on,");
    println!("clock drift 1%, one-way delay uniform in 0.5-1.5 ms. {trials} trials per row.");
    println!("Machine: {}.\n", machine());
    println!(
        "| nodes | election timeout | p50 ms | p90 ms | p99 ms | max ms | no leader in 10 s |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in rows.iter().chain(std::iter::once(&target)) {
        println!(
            "| {} | {}-{} ms{} | {} | {} | {} | {} | {} |",
            r.nodes,
            r.timeout.0,
            r.timeout.1,
            if r.delay_us == (1000, 1000) {
                " (1 ms fixed delay)"
            } else {
                ""
            },
            pct(&r.samples, 0.5),
            pct(&r.samples, 0.9),
            pct(&r.samples, 0.99),
            pct(&r.samples, 1.0),
            r.gave_up
        );
    }
    let p50 = percentile(&target.samples, 0.5);
    let p99 = percentile(&target.samples, 0.99);
    let met = target.gave_up == 0
        && p50 <= Duration::from_millis(200)
        && p99 <= Duration::from_millis(300);
    println!(
        "\nTarget (5 nodes, 150-300 ms, 1 ms delay, {} trials): p50 {:.1} ms <= 200, p99 {:.1} ms <= 300: {}",
        target.samples.len() + target.gave_up,
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        if met { "MET" } else { "NOT MET" }
    );
    println!(
        "Simulated {} trials in {:.1} s of wall time.",
        rows.len() * trials + trials.max(2000),
        wall.as_secs_f64()
    );
    if !met {
        std::process::exit(1);
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::MAX;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn measure(nodes: usize, timeout: (u64, u64), delay_us: (u64, u64), trials: usize) -> Row {
    let mut samples = Vec::with_capacity(trials);
    let mut gave_up = 0;
    for seed in 0..trials as u64 {
        match trial(nodes, timeout, delay_us, seed) {
            Some(d) => samples.push(d),
            None => gave_up += 1,
        }
    }
    samples.sort();
    Row {
        nodes,
        timeout,
        delay_us,
        samples,
        gave_up,
    }
}
