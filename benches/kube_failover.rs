//! Kubernetes publishing against the test bed's real kube-apiserver, side by
//! side with client-go's `tools/leaderelection` (Lease lock, defaults
//! 15 s / 10 s / 2 s; `testbed/bin/leasebaseline`, one process per replica).
//! 5 replicas each, on loopback. Prints a markdown table and each target as
//! MET / NOT MET.
//!
//! Measured:
//! - label visible on the new leader's pod after its first `/is-leader` 200
//!   (a pod watch timestamps every label change; `/is-leader` is polled, so
//!   the 200's start is bracketed: after the replica's last polled 503,
//!   before the polled 200 was answered; targets are judged on the upper
//!   bound);
//! - kill -9 of the leader → label on the new leader's pod, p50/p99, and
//!   the same for the baseline;
//! - API requests per minute at steady state, by verb (through the fault
//!   proxy in pass mode, which counts every request), and writes per leader
//!   change (the sidecars' own request counters);
//! - idle CPU (millicores) and RSS per replica with publishing on, on fresh
//!   replicas with default flags after the trials, and the same replicas
//!   with `--no-kubernetes` for comparison: `--idle-rounds` rounds (default
//!   5) of each, taken in turn so that load from elsewhere on the machine
//!   falls on both alike; the targets are judged on the median round (the
//!   leader's, and the highest follower's of each round).
//!
//! Run with `cargo bench --bench kube_failover` (about 9 minutes;
//! `-- --trials 10 --baseline-trials 2` for a quick look). Skips with a
//! message where Go and the test bed binaries are missing.
//! `KUBE_BENCH_BIN=<path>` runs that `raft-elector` binary instead of this
//! build's (a copy keeps a long run safe from rebuilds).

#[path = "../tests/kube_env/mod.rs"]
mod kube_env;
#[path = "../tests/support/mod.rs"]
mod support;

use kube_env::{kube_requests, lines_of, testbed_bin, FaultProxy, KubeEnv, LeaderWatch};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterConfig, CLUSTER_ID};
use support::proc_stats::{cpu_nanos, rss_mib};

const REPLICAS: usize = 5;
const TRIALS: usize = 200;
const BASELINE_TRIALS: usize = 5;
const STEADY_WINDOW: Duration = Duration::from_secs(30);
const IDLE_WINDOW: Duration = Duration::from_secs(20);
const IDLE_ROUNDS: usize = 5;
const WRITES: &[&str] = &["patch", "update", "create"];

const LABEL_AFTER_200_P50_MS: f64 = 20.0;
const LABEL_AFTER_200_P99_MS: f64 = 100.0;
const KILL_TO_LABEL_P99_MS: f64 = 450.0;
const SPEEDUP: f64 = 30.0;
const IDLE_LEADER_MILLICORES: f64 = 5.0;
const IDLE_FOLLOWER_MILLICORES: f64 = 2.0;
const RSS_MIB: f64 = 20.0;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Idle millicores and RSS of each pid over `window`.
async fn idle(pids: &[u32], window: Duration) -> Vec<(f64, f64)> {
    // A replica that dies mid-window fails the bench rather than read as idle.
    let cpu = |p: u32| cpu_nanos(p).unwrap_or_else(|| panic!("replica {p} is gone"));
    let before: Vec<u64> = pids.iter().map(|p| cpu(*p)).collect();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t0.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(p, b)| {
            let used = cpu(*p).saturating_sub(b) as f64 / 1e9;
            let rss = rss_mib(*p).unwrap_or_else(|| panic!("replica {p} is gone"));
            (used / secs * 1000.0, rss)
        })
        .collect()
}

/// Requests per minute by verb from two proxy stats snapshots in pass mode.
fn per_minute(
    before: &serde_json::Value,
    after: &serde_json::Value,
    window: Duration,
) -> Vec<(String, f64)> {
    let verbs = |v: &serde_json::Value| -> std::collections::BTreeMap<String, f64> {
        v["requests"]["pass"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, n)| (k.clone(), n.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (b, a) = (verbs(before), verbs(after));
    let scale = 60.0 / window.as_secs_f64();
    a.iter()
        .map(|(k, n)| (k.clone(), (n - b.get(k).copied().unwrap_or(0.0)) * scale))
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

struct Raft {
    /// Label seen − the polled 200 answered (a lower bound).
    after_200: Vec<f64>,
    /// Label seen − the last polled "no" from the same replica (an upper bound).
    after_200_upper: Vec<f64>,
    kill_to_label: Vec<f64>,
    writes: Vec<f64>,
    double_leaders: usize,
    /// Leader changes nobody caused, seen between trials.
    elections_between_trials: usize,
    steady: Vec<(String, f64)>,
    steady_writes: f64,
    /// Idle rounds with publishing on, and the same with `--no-kubernetes`.
    idle: Vec<IdleRound>,
    idle_off: Vec<IdleRound>,
}

/// (millicores, RSS MiB) of one idle round's leader and followers.
struct IdleRound {
    leader: (f64, f64),
    followers: Vec<(f64, f64)>,
}

impl IdleRound {
    fn follower_max(&self) -> f64 {
        self.followers.iter().map(|r| r.0).fold(0.0, f64::max)
    }

    fn rss_max(&self) -> f64 {
        self.followers
            .iter()
            .chain(std::iter::once(&self.leader))
            .map(|r| r.1)
            .fold(0.0, f64::max)
    }
}

/// The median round's leader and highest follower, and the highest RSS of
/// all rounds.
fn idle_summary(rounds: &[IdleRound]) -> (f64, f64, f64) {
    let leader: Vec<f64> = rounds.iter().map(|r| r.leader.0).collect();
    let followers: Vec<f64> = rounds.iter().map(IdleRound::follower_max).collect();
    let rss = rounds.iter().map(IdleRound::rss_max).fold(0.0, f64::max);
    (quantile(&leader, 0.5), quantile(&followers, 0.5), rss)
}

/// Each round as `leader / highest follower`.
fn idle_rounds_text(rounds: &[IdleRound]) -> String {
    let each: Vec<String> = rounds
        .iter()
        .map(|r| format!("{:.2} / {:.2}", r.leader.0, r.follower_max()))
        .collect();
    each.join(", ")
}

async fn bench_raft(env: &KubeEnv, proxy: &FaultProxy, trials: usize, idle_rounds: usize) -> Raft {
    let names: Vec<String> = (0..REPLICAS).map(|i| format!("node-{i}")).collect();
    env.create_pods(&names, CLUSTER_ID).await;
    let mut config = ClusterConfig::default();
    config
        .extra_args
        .extend(env.sidecar_args(&proxy.kubeconfig));
    // A copy of the binary, so that a long run is not changed by a rebuild.
    if let Some(bin) = std::env::var_os("KUBE_BENCH_BIN") {
        config.binary = bin.into();
    }
    let mut cluster = Cluster::start(REPLICAS, config).await;
    let watch = LeaderWatch::start(env).await;
    let mut slot = cluster
        .wait_for_single_leader(Duration::from_secs(20))
        .await;
    let mut out = Raft {
        after_200: Vec::new(),
        after_200_upper: Vec::new(),
        kill_to_label: Vec::new(),
        writes: Vec::new(),
        double_leaders: 0,
        elections_between_trials: 0,
        steady: Vec::new(),
        steady_writes: 0.0,
        idle: Vec::new(),
        idle_off: Vec::new(),
    };
    wait_label(
        &watch,
        &cluster.node(slot).name,
        Instant::now() - Duration::from_secs(3600),
        Duration::from_secs(5),
    )
    .await;
    for trial in 0..trials {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // An election between trials (the loaded machine starving a
        // follower's timer) would make this trial kill a non-leader: start
        // from whoever leads now, once its label is out.
        let now_leading = cluster
            .wait_for_single_leader(Duration::from_secs(20))
            .await;
        if now_leading != slot {
            out.elections_between_trials += 1;
            slot = now_leading;
            let name = cluster.node(slot).name.clone();
            let deadline = Instant::now() + Duration::from_secs(5);
            while !watch.record().leaders.contains(&name) {
                assert!(
                    Instant::now() < deadline,
                    "trial {trial}: {name} leads but is never labelled"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let before = writes_of(&cluster, Some(slot)).await;
        let victim = slot;
        let killed = cluster.kill9(victim);
        // When each slot was last asked and said no: the first 200 began
        // after that question (an upper bound of label − 200).
        let mut said_no: std::collections::HashMap<usize, Instant> = Default::default();
        let (new, first_200, no_before) = loop {
            let mut found = None;
            for s in cluster.running() {
                let asked = Instant::now();
                if cluster.status(s).await.is_some_and(|st| st.is_leader) {
                    let before = said_no.get(&s).copied().unwrap_or(killed);
                    found = Some((s, Instant::now(), before));
                    break;
                }
                said_no.insert(s, asked);
            }
            if let Some(f) = found {
                break f;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "trial {trial}: no new leader"
            );
        };
        slot = new;
        let name = cluster.node(slot).name.clone();
        let Some(labelled) = wait_label(&watch, &name, killed, Duration::from_secs(5)).await else {
            panic!("trial {trial}: {name} never labelled");
        };
        // The 200 is seen by polling, so it can be a little late: never count negative.
        out.after_200
            .push(ms(labelled.saturating_duration_since(first_200)));
        out.after_200_upper
            .push(ms(labelled.saturating_duration_since(no_before)));
        out.kill_to_label.push(ms(labelled - killed));
        tokio::time::sleep(Duration::from_millis(200)).await;
        out.writes
            .push(writes_of(&cluster, Some(victim)).await - before);
        cluster.restart(victim, true).await;
    }
    out.double_leaders = watch.record().double_leaders.len();
    cluster
        .wait_for_single_leader(Duration::from_secs(20))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = writes_of(&cluster, None).await;
    let s0 = proxy.stats().await;
    tokio::time::sleep(STEADY_WINDOW).await;
    out.steady = per_minute(&s0, &proxy.stats().await, STEADY_WINDOW);
    out.steady_writes =
        (writes_of(&cluster, None).await - writes) * 60.0 / STEADY_WINDOW.as_secs_f64();
    drop(watch);
    drop(cluster);
    // Idle is measured on fresh replicas with default flags (the trials
    // above poll DNS every 200 ms, which is most of a leader's idle CPU and
    // no part of publishing), once with publishing on and once off, so the
    // difference is what publishing costs. The pods are recreated, as a
    // StatefulSet would: a group that starts anew finds them unlabelled.
    for round in 0..idle_rounds {
        eprintln!("idle round {} of {idle_rounds} ...", round + 1);
        for name in &names {
            env.delete_pod(name).await;
        }
        env.create_pods(&names, CLUSTER_ID).await;
        out.idle.push(idle_replicas(Some(env), proxy).await);
        out.idle_off.push(idle_replicas(None, proxy).await);
    }
    out
}

/// Starts 5 replicas with default flags, publishing to `env` (or with
/// `--no-kubernetes`), waits until they are steady, and returns the idle
/// (millicores, RSS) of the leader and of each follower.
async fn idle_replicas(env: Option<&KubeEnv>, proxy: &FaultProxy) -> IdleRound {
    let mut config = ClusterConfig {
        extra_args: Vec::new(),
        ..ClusterConfig::default()
    };
    if let Some(env) = env {
        config.extra_args = env.sidecar_args(&proxy.kubeconfig);
    }
    if let Some(bin) = std::env::var_os("KUBE_BENCH_BIN") {
        config.binary = bin.into();
    }
    let mut cluster = Cluster::start(REPLICAS, config).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let leader = loop {
        let leader = cluster
            .wait_for_single_leader(Duration::from_secs(20))
            .await;
        if cluster
            .status(leader)
            .await
            .is_some_and(|s| s.voters + s.learners == REPLICAS)
        {
            break leader;
        }
        assert!(Instant::now() < deadline, "idle replicas never all joined");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Some(env) = env {
        let name = cluster.node(leader).name.clone();
        env.wait_roles(Duration::from_secs(10), "idle replicas labelled", |roles| {
            roles
                .iter()
                .any(|(n, r, _)| *n == name && r.as_deref() == Some("leader"))
        })
        .await;
    }
    // Let startup's membership changes and first DNS lookups settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let slots = cluster.running();
    let pids: Vec<u32> = slots
        .iter()
        .filter_map(|s| cluster.node(*s).pid())
        .collect();
    let rows = idle(&pids, IDLE_WINDOW).await;
    assert_eq!(
        cluster.steady_leader().await,
        Some(leader),
        "the leader changed while idle"
    );
    let mut round = IdleRound {
        leader: (0.0, 0.0),
        followers: Vec::new(),
    };
    for (s, row) in slots.iter().zip(rows) {
        if *s == leader {
            round.leader = row;
        } else {
            round.followers.push(row);
        }
    }
    round
}

async fn writes_of(cluster: &Cluster, skip: Option<usize>) -> f64 {
    let mut total = 0.0;
    for s in cluster.running() {
        if Some(s) == skip {
            continue;
        }
        if let Some((_, text)) = cluster.get(s, "/metrics").await {
            total += kube_requests(&text, WRITES);
        }
    }
    total
}

/// Waits until the watch saw `pod` become leader after `since`.
async fn wait_label(
    watch: &LeaderWatch,
    pod: &str,
    since: Instant,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(at) = watch.record().became_leader.get(pod) {
            if *at > since {
                return Some(*at);
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

struct Baseline {
    kill_to_label: Vec<f64>,
    steady: Vec<(String, f64)>,
    idle: Vec<(f64, f64)>,
}

fn start_baseline(env: &KubeEnv, kubeconfig: &std::path::Path, i: usize) -> Child {
    Command::new(testbed_bin("leasebaseline"))
        .args(["--id", &format!("b-{i}"), "--namespace", &env.namespace])
        .args(["--lease-name", "baseline", "--pod-name", &format!("b-{i}")])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start leasebaseline")
}

async fn bench_baseline(env: &KubeEnv, proxy: &FaultProxy, trials: usize) -> Baseline {
    let names: Vec<String> = (0..REPLICAS).map(|i| format!("b-{i}")).collect();
    env.create_pods(&names, "baseline").await;
    let (tx, rx) = std::sync::mpsc::channel::<(usize, Instant, String)>();
    let mut children: Vec<Child> = Vec::new();
    let spawn = |i: usize, children: &mut Vec<Child>| {
        let mut child = start_baseline(env, &proxy.kubeconfig, i);
        let lines = lines_of(&mut child);
        let tx = tx.clone();
        std::thread::spawn(move || {
            for (at, line) in lines {
                if tx.send((i, at, line)).is_err() {
                    return;
                }
            }
        });
        if i < children.len() {
            children[i] = child;
        } else {
            children.push(child);
        }
    };
    for i in 0..REPLICAS {
        spawn(i, &mut children);
    }
    let wait_labelled = |since: Instant, timeout: Duration| -> Option<(usize, Instant)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok((i, at, line)) = rx.recv_timeout(Duration::from_millis(100)) {
                if line.starts_with("labelled") && at > since {
                    return Some((i, at));
                }
            }
        }
        None
    };
    let (mut leader, _) = wait_labelled(
        Instant::now() - Duration::from_secs(3600),
        Duration::from_secs(60),
    )
    .expect("a baseline leader");
    let mut out = Baseline {
        kill_to_label: Vec::new(),
        steady: Vec::new(),
        idle: Vec::new(),
    };
    for trial in 0..trials {
        let _ = children[leader].kill();
        let killed = Instant::now();
        let _ = children[leader].wait();
        let victim = leader;
        let (new, at) = wait_labelled(killed, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("baseline trial {trial}: no new leader"));
        out.kill_to_label.push(ms(at - killed));
        leader = new;
        env.clear_role(&format!("b-{victim}")).await;
        spawn(victim, &mut children);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let s0 = proxy.stats().await;
    tokio::time::sleep(STEADY_WINDOW).await;
    out.steady = per_minute(&s0, &proxy.stats().await, STEADY_WINDOW);
    let pids: Vec<u32> = children.iter().map(|c| c.id()).collect();
    out.idle = idle(&pids, IDLE_WINDOW).await;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    out
}

fn fmt_rates(rates: &[(String, f64)]) -> String {
    if rates.is_empty() {
        return "0".into();
    }
    rates
        .iter()
        .map(|(k, v)| format!("{k} {v:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this
    // binary without it, where minutes of trials do not belong.
    if !std::env::args().any(|a| a == "--bench") {
        println!("kube_failover: skipped outside `cargo bench --bench kube_failover`");
        return;
    }
    let trials = arg("--trials", TRIALS);
    let idle_rounds = arg("--idle-rounds", IDLE_ROUNDS).max(1);
    let baseline_trials = arg("--baseline-trials", BASELINE_TRIALS);
    let Some(env) = KubeEnv::start("kube_failover_bench").await else {
        return;
    };
    let Some(proxy) = FaultProxy::start(&env, "kube_failover_bench").await else {
        return;
    };
    let admin = env
        .control_plane
        .as_ref()
        .map(|c| c.kubeconfig())
        .expect("test bed");
    let Some(base_proxy) =
        FaultProxy::start_for(&env, "kube_failover_bench", &admin, "baseline-proxy").await
    else {
        return;
    };

    let raft = bench_raft(&env, &proxy, trials, idle_rounds).await;
    let base = bench_baseline(&env, &base_proxy, baseline_trials).await;

    let r_p50 = quantile(&raft.kill_to_label, 0.5);
    let r_p99 = quantile(&raft.kill_to_label, 0.99);
    let b_p50 = quantile(&base.kill_to_label, 0.5);
    let b_p99 = quantile(&base.kill_to_label, 0.99);
    let l50 = quantile(&raft.after_200, 0.5);
    let l99 = quantile(&raft.after_200, 0.99);
    // The targets are judged on the upper bound.
    let a50 = quantile(&raft.after_200_upper, 0.5);
    let a99 = quantile(&raft.after_200_upper, 0.99);
    let max_writes = raft.writes.iter().cloned().fold(0.0, f64::max);
    let mean_writes = raft.writes.iter().sum::<f64>() / raft.writes.len().max(1) as f64;
    let (l_cpu, f_cpu, max_rss) = idle_summary(&raft.idle);
    let (l_cpu_off, f_cpu_off, max_rss_off) = idle_summary(&raft.idle_off);
    let b_cpu = base.idle.iter().map(|r| r.0).fold(0.0, f64::max);
    let b_rss = base.idle.iter().map(|r| r.1).fold(0.0, f64::max);
    let steady_reads: f64 = raft
        .steady
        .iter()
        .filter(|(k, _)| k == "GET")
        .fold(0.0, |sum, (_, v)| sum + v);

    println!(
        "\n## Kubernetes publishing vs client-go leaderelection ({REPLICAS} replicas, loopback)\n"
    );
    println!("| measure | raft-elector | client-go Lease (15/10/2 s) |");
    println!("| --- | --- | --- |");
    println!(
        "| kill -9 → label on new leader, p50 / p99 | {r_p50:.1} / {r_p99:.1} ms ({} trials) | {b_p50:.0} / {b_p99:.0} ms ({} trials) |",
        raft.kill_to_label.len(),
        base.kill_to_label.len()
    );
    println!("| label visible after the new leader's first 200, p50 / p99 (upper bound: since the replica's last polled 503) | {a50:.1} / {a99:.1} ms | – |");
    println!("| the same, lower bound (since the polled 200 was answered) | {l50:.1} / {l99:.1} ms | – |");
    println!(
        "| API requests / min at steady state (by verb) | {} | {} |",
        fmt_rates(&raft.steady),
        fmt_rates(&base.steady)
    );
    println!(
        "| API writes / min at steady state (sidecar counters) | {:.1} | – |",
        raft.steady_writes
    );
    println!(
        "| API writes per leader change, mean / max | {mean_writes:.2} / {max_writes:.0} | – |"
    );
    println!(
        "| idle CPU leader / follower (max), median of {} rounds | {l_cpu:.2} / {f_cpu:.2} millicores | {b_cpu:.2} millicores (max) |",
        raft.idle.len()
    );
    println!(
        "| the rounds, leader / follower (max) | {} | – |",
        idle_rounds_text(&raft.idle)
    );
    println!(
        "| same replicas with --no-kubernetes, in turn with the above: idle CPU leader / follower (max), median; RSS (max) | {l_cpu_off:.2} / {f_cpu_off:.2} millicores, {max_rss_off:.1} MiB | – |"
    );
    println!(
        "| the rounds with --no-kubernetes, leader / follower (max) | {} | – |",
        idle_rounds_text(&raft.idle_off)
    );
    println!("| RSS per replica (max) | {max_rss:.1} MiB | {b_rss:.1} MiB |");
    println!(
        "| watch saw two role=leader pods | {} times | – |",
        raft.double_leaders
    );
    println!(
        "| leader changes between trials nobody caused (trial restarted from the new leader) | {} | – |",
        raft.elections_between_trials
    );
    println!();
    let speedup = b_p50 / r_p50;
    let targets = [
        (
            format!("label after first 200 p50 ≤ {LABEL_AFTER_200_P50_MS} ms"),
            format!("{a50:.1} ms"),
            a50 <= LABEL_AFTER_200_P50_MS,
        ),
        (
            format!("label after first 200 p99 ≤ {LABEL_AFTER_200_P99_MS} ms"),
            format!("{a99:.1} ms"),
            a99 <= LABEL_AFTER_200_P99_MS,
        ),
        (
            format!("kill -9 → label p99 ≤ {KILL_TO_LABEL_P99_MS} ms"),
            format!("{r_p99:.1} ms"),
            r_p99 <= KILL_TO_LABEL_P99_MS,
        ),
        (
            format!("≥ {SPEEDUP}× faster than the baseline (p50)"),
            format!("{speedup:.0}×"),
            speedup >= SPEEDUP,
        ),
        (
            "0 API writes and 0 polling reads / min at steady state".to_string(),
            format!("{:.1} writes, {steady_reads:.1} GETs", raft.steady_writes),
            raft.steady_writes == 0.0 && steady_reads == 0.0,
        ),
        (
            "writes per leader change ≤ pods changed + 2 = 4".to_string(),
            format!("{max_writes:.0}"),
            max_writes <= 4.0,
        ),
        (
            format!("idle leader ≤ {IDLE_LEADER_MILLICORES} millicores"),
            format!("{l_cpu:.2} (median round)"),
            l_cpu <= IDLE_LEADER_MILLICORES,
        ),
        (
            format!("idle follower ≤ {IDLE_FOLLOWER_MILLICORES} millicores"),
            format!("{f_cpu:.2} (median round's max)"),
            f_cpu <= IDLE_FOLLOWER_MILLICORES,
        ),
        (
            format!("RSS ≤ {RSS_MIB} MiB"),
            format!("{max_rss:.1} MiB"),
            max_rss <= RSS_MIB,
        ),
        (
            "no watch sees two leaders".to_string(),
            format!("{}", raft.double_leaders),
            raft.double_leaders == 0,
        ),
    ];
    println!("| target | measured | |");
    println!("| --- | --- | --- |");
    for (what, got, ok) in targets {
        println!("| {what} | {got} | {} |", verdict(ok));
    }
}
