//! Failover of real `raft-elector run` processes on loopback: kill -9 the
//! leader again and again (3, 5 and 7 nodes), hand leadership over with
//! SIGTERM and freeze the leader with SIGSTOP (5 nodes), and measure idle
//! CPU and memory per node. Prints a
//! markdown table, the machine, and each target as MET / NOT MET.
//!
//! `/is-leader` of every node is sampled every 2 ms during each trial; the
//! double-leader rule is the one documented in `raft_elector::demo::samples`.
//!
//! Run with `cargo bench --bench failover_process` (about 4 minutes;
//! `-- --trials 5` for a quick look, `-- --trials 0` for the idle
//! measurement alone). `-- --baseline PATH` runs every series on another
//! build too (e.g. the previous release) and measures idle CPU of both
//! interleaved, `--idle-rounds N` times each (default 1, 3 with a
//! baseline), so machine noise shows as the spread between rounds.
//! `--idle-peers static` runs the idle clusters with `--peers` instead of
//! DNS discovery (the default, `dns`), to tell discovery's share apart.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterConfig, PeerDiscovery, Timeline};
use support::proc_stats;

/// Trials per cluster size and per handoff series (`--trials N` overrides).
const TRIALS: usize = 30;
/// Sampling period of `/is-leader`.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// Longest wait for a steady cluster between trials.
const STEADY: Duration = Duration::from_secs(20);
/// How long CPU use is measured at idle.
const IDLE_WINDOW: Duration = Duration::from_secs(20);
/// Steady sampling before each fault, so the old leader's 200s are recorded.
const BEFORE_FAULT: Duration = Duration::from_millis(100);

/// Targets (the product's promises on a quiet machine).
const KILL_P50_MS: f64 = 250.0;
const KILL_P99_MS: f64 = 350.0;
const HANDOFF_P99_MS: f64 = 50.0;
const IDLE_LEADER_MILLICORES: f64 = 5.0;
const IDLE_FOLLOWER_MILLICORES: f64 = 2.0;
const RSS_MIB: f64 = 20.0;

/// Durations of one series, in milliseconds, and what the sampler saw.
#[derive(Default)]
struct Series {
    millis: Vec<f64>,
    violations: usize,
    ambiguous: usize,
    samples: usize,
}

impl Series {
    fn add(&mut self, took: Duration, timeline: &Timeline) {
        self.millis.push(took.as_secs_f64() * 1000.0);
        self.violations += timeline.violations().len();
        self.ambiguous += timeline.ambiguous_overlaps();
        self.samples += timeline.samples.len();
    }

    /// Returns the `q` quantile (nearest rank) in milliseconds.
    fn quantile(&self, q: f64) -> f64 {
        let mut sorted = self.millis.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1]
    }

    fn max(&self) -> f64 {
        self.millis.iter().copied().fold(0.0, f64::max)
    }
}

/// A binary under test and its name in the tables.
struct Build {
    name: String,
    binary: PathBuf,
}

fn bench_config(build: &Build) -> ClusterConfig {
    ClusterConfig {
        extra_args: ["--dns-interval", "500ms", "--removal-grace", "2s"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        binary: build.binary.clone(),
        ..ClusterConfig::default()
    }
}

/// Waits until one leader is agreed on, every running node is ready and
/// the configuration holds exactly `size` members; returns the leader.
async fn wait_steady(cluster: &mut Cluster, size: usize) -> usize {
    let deadline = Instant::now() + STEADY;
    loop {
        if let Some(leader) = cluster.steady_leader().await {
            let mut steady = true;
            for (slot, status) in cluster.statuses().await {
                steady &= status.is_some_and(|s| s.voters + s.learners == size)
                    && cluster.is_ready(slot).await;
            }
            if steady {
                return leader;
            }
        }
        assert!(
            Instant::now() < deadline,
            "cluster of {size} not steady within {STEADY:?}: {:#?}",
            cluster.statuses().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the leader `trials` times; returns kill → first 200 elsewhere.
async fn kill_series(build: &Build, size: usize, trials: usize) -> Series {
    let mut cluster = Cluster::start(size, bench_config(build)).await;
    let mut series = Series::default();
    for _ in 0..trials {
        let old = wait_steady(&mut cluster, size).await;
        let (took, timeline) = cluster
            .kill_leader_trial(old, SAMPLE_EVERY, BEFORE_FAULT, STEADY)
            .await;
        series.add(took, &timeline);
    }
    series
}

/// Freezes the leader with SIGSTOP `trials` times (no connection ends, so
/// followers notice only by their election timeout, as with a partition);
/// returns SIGSTOP → first 200 elsewhere. The frozen node is thawed after
/// the new leader is known and rejoins as a follower.
async fn stop_series(build: &Build, size: usize, trials: usize) -> Series {
    let mut cluster = Cluster::start(size, bench_config(build)).await;
    let mut series = Series::default();
    for _ in 0..trials {
        let old = wait_steady(&mut cluster, size).await;
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(cluster.node(old).pid().expect("the leader runs")).expect("a pid"),
        );
        cluster.start_sampling(SAMPLE_EVERY);
        tokio::time::sleep(BEFORE_FAULT).await;
        let stopped = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        let stopped_us = cluster.micros(stopped);
        let deadline = stopped + STEADY;
        let new = loop {
            let mut found = None;
            for slot in cluster.running() {
                if slot != old && cluster.status(slot).await.is_some_and(|s| s.is_leader) {
                    found = Some(slot);
                }
            }
            if found.is_some() || Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        assert!(new.is_some(), "no new leader while node-{old} was stopped");
        // Sample the thawed old leader too: it must not answer 200 again.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let timeline = cluster.stop_sampling().await;
        let first = timeline
            .first_after(stopped_us, |s| s.is_200() && s.slot != old)
            .expect("another node answered 200");
        series.add(
            Duration::from_micros(first.received_us - stopped_us),
            &timeline,
        );
    }
    series
}

/// Hands leadership over with SIGTERM `trials` times; returns the upper
/// bound of the leaderless gap (old leader's last 200 sent → new leader's
/// first 200 received). The stopped node comes back as a new incarnation,
/// as a replaced pod would.
async fn handoff_series(build: &Build, size: usize, trials: usize) -> Series {
    let mut cluster = Cluster::start(size, bench_config(build)).await;
    let mut series = Series::default();
    let mut unclean_exits = 0;
    for _ in 0..trials {
        let old = wait_steady(&mut cluster, size).await;
        cluster.start_sampling(SAMPLE_EVERY);
        tokio::time::sleep(BEFORE_FAULT).await;
        let termed = cluster.sigterm(old);
        let termed_us = cluster.micros(termed);
        let exit = cluster.wait_exit(old, Duration::from_secs(10)).await;
        unclean_exits += usize::from(!exit.success());
        cluster.wait_for_single_leader(STEADY).await;
        let timeline = cluster.stop_sampling().await;
        let gap = timeline
            .handoff_gap(termed_us, old)
            .unwrap_or_else(|missing| panic!("{missing}"));
        series.add(gap, &timeline);
        cluster.restart(old, false).await;
    }
    assert_eq!(unclean_exits, 0, "some leaders did not exit 0 on SIGTERM");
    series
}

/// The CPU time of every thread of `pid`, in nanoseconds (see
/// `support::proc_stats`); a node that died mid-window fails the round.
fn cpu_nanos(pid: u32) -> u64 {
    proc_stats::cpu_nanos(pid).expect("the CPU clock of a running node")
}

/// Returns VmRSS of `pid` in MiB.
fn rss_mib(pid: u32) -> f64 {
    proc_stats::rss_mib(pid).expect("VmRSS of a running node")
}

/// Idle CPU (millicores) and RSS (MiB) of the leader and the followers.
struct Idle {
    leader: (f64, f64),
    followers: Vec<(f64, f64)>,
}

async fn measure_idle(cluster: &mut Cluster, size: usize) -> Idle {
    let leader = wait_steady(cluster, size).await;
    let pids: Vec<(usize, u32)> = cluster
        .running()
        .into_iter()
        .filter_map(|slot| cluster.node(slot).pid().map(|pid| (slot, pid)))
        .collect();
    let before: Vec<u64> = pids.iter().map(|&(_, pid)| cpu_nanos(pid)).collect();
    let started = std::time::Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after: Vec<u64> = pids.iter().map(|&(_, pid)| cpu_nanos(pid)).collect();
    let window = started.elapsed().as_secs_f64();
    assert_eq!(
        cluster.steady_leader().await,
        Some(leader),
        "the leader changed while idle"
    );
    let mut idle = Idle {
        leader: (0.0, 0.0),
        followers: Vec::new(),
    };
    for (i, &(slot, pid)) in pids.iter().enumerate() {
        let seconds = (after[i] - before[i]) as f64 / 1e9;
        let millicores = seconds / window * 1000.0;
        let row = (millicores, rss_mib(pid));
        if slot == leader {
            idle.leader = row;
        } else {
            idle.followers.push(row);
        }
    }
    idle
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".to_string());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cores} cores")
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

async fn bench(trials: usize, builds: &[Build], idle_rounds: usize, idle_peers: PeerDiscovery) {
    println!("# failover_process: real processes on loopback\n");
    println!("machine: {}\n", machine());
    println!("idle clusters: {idle_peers:?} peer discovery\n");
    for build in builds {
        if trials == 0 {
            break;
        }
        let mut kills = Vec::new();
        for size in [3, 5, 7] {
            eprintln!("{}: kill -9 series, {size} nodes ...", build.name);
            kills.push((size, kill_series(build, size, trials).await));
        }
        eprintln!("{}: SIGTERM handoff series, 5 nodes ...", build.name);
        let handoff = handoff_series(build, 5, trials).await;
        eprintln!("{}: SIGSTOP series, 5 nodes ...", build.name);
        let stop = stop_series(build, 5, trials).await;
        println!("## {} ({})\n", build.name, build.binary.display());
        print_series(&kills, &handoff, &stop);
        println!();
    }
    // Idle CPU is measured round-robin so that load from elsewhere on the
    // machine falls on every build alike.
    let mut idle: Vec<Vec<Idle>> = builds.iter().map(|_| Vec::new()).collect();
    for round in 0..idle_rounds {
        for (i, build) in builds.iter().enumerate() {
            eprintln!(
                "{}: idle round {}, 5 nodes with default flags ...",
                build.name,
                round + 1
            );
            let quiet = ClusterConfig {
                extra_args: Vec::new(),
                discovery: idle_peers,
                binary: build.binary.clone(),
                ..ClusterConfig::default()
            };
            let mut cluster = Cluster::start(5, quiet).await;
            wait_steady(&mut cluster, 5).await;
            // Let the startup's membership changes and DNS lookups settle.
            tokio::time::sleep(Duration::from_secs(2)).await;
            idle[i].push(measure_idle(&mut cluster, 5).await);
        }
    }
    for (build, rounds) in builds.iter().zip(&idle) {
        println!("## idle: {}\n", build.name);
        print_idle(rounds);
        println!();
    }
}

/// Prints the failover rows and their targets.
fn print_series(kills: &[(usize, Series)], handoff: &Series, stop: &Series) {
    println!("| scenario | nodes | trials | p50 ms | p90 ms | p99 ms | max ms | double-200 | ambiguous overlaps | samples |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let row = |name: &str, size: usize, s: &Series| {
        println!(
            "| {name} | {size} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
            s.millis.len(),
            s.quantile(0.5),
            s.quantile(0.9),
            s.quantile(0.99),
            s.max(),
            s.violations,
            s.ambiguous,
            s.samples
        )
    };
    for (size, series) in kills {
        row("kill -9 → first 200 elsewhere", *size, series);
    }
    row("SIGTERM → old 503 → new 200", 5, handoff);
    row("SIGSTOP → first 200 elsewhere", 5, stop);

    let five = &kills[1].1;
    let double: usize = kills.iter().map(|(_, s)| s.violations).sum::<usize>()
        + handoff.violations
        + stop.violations;
    println!("\n| target | measured | verdict |");
    println!("| --- | --- | --- |");
    let target = |name: String, measured: String, met: bool| {
        println!("| {name} | {measured} | {} |", verdict(met))
    };
    let (p50, p99) = (five.quantile(0.5), five.quantile(0.99));
    target(
        format!("5 nodes kill -9 p50 ≤ {KILL_P50_MS} ms"),
        format!("{p50:.1} ms"),
        p50 <= KILL_P50_MS,
    );
    target(
        format!("5 nodes kill -9 p99 ≤ {KILL_P99_MS} ms"),
        format!("{p99:.1} ms"),
        p99 <= KILL_P99_MS,
    );
    let hp99 = handoff.quantile(0.99);
    target(
        format!("SIGTERM handoff p99 ≤ {HANDOFF_P99_MS} ms"),
        format!("{hp99:.1} ms"),
        hp99 <= HANDOFF_P99_MS,
    );
    target(
        "zero double-200 instants".to_string(),
        format!("{double}"),
        double == 0,
    );
}

/// Prints the idle rows of every round, the spread between rounds (the
/// machine's noise) and the targets, judged on the median round.
fn print_idle(rounds: &[Idle]) {
    println!("| idle round (5 nodes, default flags, {IDLE_WINDOW:?}) | leader millicores | followers millicores | max RSS MiB |");
    println!("| --- | --- | --- | --- |");
    let follower_max = |idle: &Idle| idle.followers.iter().map(|f| f.0).fold(0.0, f64::max);
    let follower_min = |idle: &Idle| idle.followers.iter().map(|f| f.0).fold(f64::MAX, f64::min);
    let rss = |idle: &Idle| {
        idle.followers
            .iter()
            .map(|f| f.1)
            .fold(idle.leader.1, f64::max)
    };
    for (i, idle) in rounds.iter().enumerate() {
        println!(
            "| {} | {:.2} | {:.2}–{:.2} | {:.1} |",
            i + 1,
            idle.leader.0,
            follower_min(idle),
            follower_max(idle),
            rss(idle)
        );
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
        hi - lo
    };
    let leaders: Vec<f64> = rounds.iter().map(|r| r.leader.0).collect();
    let followers: Vec<f64> = rounds.iter().map(follower_max).collect();
    if rounds.len() > 1 {
        println!(
            "\nnoise between rounds: leader ±{:.2}, follower max ±{:.2} millicores",
            spread(&leaders) / 2.0,
            spread(&followers) / 2.0
        );
    }
    let idle = Idle {
        leader: (
            median(leaders),
            rounds.iter().map(|r| r.leader.1).fold(0.0, f64::max),
        ),
        followers: vec![(
            median(followers),
            rounds.iter().map(rss).fold(0.0, f64::max),
        )],
    };
    let follower_cpu = idle.followers[0].0;
    let max_rss = idle.followers[0].1.max(idle.leader.1);

    println!("\n| target | measured | verdict |");
    println!("| --- | --- | --- |");
    let target = |name: String, measured: String, met: bool| {
        println!("| {name} | {measured} | {} |", verdict(met))
    };
    target(
        format!("idle leader ≤ {IDLE_LEADER_MILLICORES} millicores"),
        format!("{:.2} (median round)", idle.leader.0),
        idle.leader.0 <= IDLE_LEADER_MILLICORES,
    );
    target(
        format!("idle follower ≤ {IDLE_FOLLOWER_MILLICORES} millicores"),
        format!("{follower_cpu:.2} (median round's max)"),
        follower_cpu <= IDLE_FOLLOWER_MILLICORES,
    );
    target(
        format!("RSS ≤ {RSS_MIB} MiB"),
        format!("{max_rss:.1} MiB (max)"),
        max_rss <= RSS_MIB,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, where minutes of process trials do not belong.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        println!("failover_process: skipped outside `cargo bench --bench failover_process`");
        return;
    }
    let trials = args
        .iter()
        .position(|a| a == "--trials")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(TRIALS);
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // `--binary PATH` measures a binary built elsewhere (e.g. `cargo build
    // --release`) instead of this build's.
    let mut builds = vec![Build {
        name: "this build".to_string(),
        binary: flag("--binary")
            .map_or_else(|| PathBuf::from(support::cluster::BIN), PathBuf::from),
    }];
    if let Some(path) = flag("--baseline") {
        builds.push(Build {
            name: "baseline".to_string(),
            binary: PathBuf::from(path),
        });
    }
    let default_rounds = if builds.len() > 1 { 3 } else { 1 };
    let idle_rounds = flag("--idle-rounds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_rounds);
    let idle_peers = match flag("--idle-peers").as_deref() {
        None | Some("dns") => PeerDiscovery::Dns,
        Some("static") => PeerDiscovery::Static,
        Some(other) => {
            eprintln!("--idle-peers takes dns or static, not {other:?}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("build the tokio runtime");
    runtime.block_on(bench(trials, &builds, idle_rounds, idle_peers));
}
