//! Bootstrap of real processes (issue 8): the first configuration holds
//! every expected member as a voter, so the cluster survives losing its
//! first leader at once; and a scale walk 3 → 5 → 7 → 3 → 1 → 3 with stable
//! (StatefulSet-like) and fresh (Deployment-like) names.
//!
//! `BOOTSTRAP_TRIALS=<n>` sets the kill trials per size and kill delay
//! (default 2, so 6 per size); `BOOTSTRAP_TRIALS=7` (21 per size) also
//! checks the targets: new leader p99 ≤ 350 ms after the kill, last
//! process start → all voters p50 ≤ 1 s and p99 ≤ 2 s.

mod support;

use raft_elector::runtime::bootstrap::first_voter_count;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterConfig};

/// Kill the first leader this long after its first 200.
const KILL_DELAYS_MS: [u64; 3] = [0, 500, 1000];
/// Longest wait for the survivors to elect a new leader.
const RECOVERY_LIMIT: Duration = Duration::from_secs(5);
/// Longest wait for the first configuration to be in force everywhere.
const FORMATION_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for one scale step to settle.
const STEP_LIMIT: Duration = Duration::from_secs(20);
/// Default `--max-voters`.
const MAX_VOTERS: usize = 5;

fn trials_per_delay() -> usize {
    std::env::var("BOOTSTRAP_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}

/// Returns the `q` quantile of sorted `v`.
fn quantile(v: &[Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Trial {
    to_voters: Duration,
    failover: Duration,
}

/// Starts `n − 1` members, then the last one; measures the time from the
/// last start until every member reports all voters; kills the first
/// leader `delay` after its first 200 and measures the new leader's first
/// 200 after the kill.
async fn one_trial(n: usize, delay: Duration, seed: u64) -> Trial {
    let config = ClusterConfig {
        bootstrap_expect: Some(n),
        ..ClusterConfig::default()
    };
    let mut cluster = Cluster::start(n - 1, config).await;
    cluster.start_sampling(Duration::from_millis(2));
    // The others wait a little (nothing forms without the last one).
    tokio::time::sleep(Duration::from_millis(50 + seed % 250)).await;
    let last_start = Instant::now();
    let last = cluster.add_node(&format!("node-{}", n - 1)).await;
    assert_eq!(last, n - 1);
    let voters = first_voter_count(n, MAX_VOTERS);

    let mut first_200: Option<(usize, Instant)> = None;
    let mut to_voters = None;
    let deadline = last_start + FORMATION_LIMIT;
    while first_200.is_none() || to_voters.is_none() {
        let statuses = cluster.statuses().await;
        let now = Instant::now();
        if first_200.is_none() {
            if let Some((slot, _)) = statuses
                .iter()
                .find(|(_, s)| s.as_ref().is_some_and(|s| s.is_leader))
            {
                first_200 = Some((*slot, now));
            }
        }
        let all_voters = statuses.len() == n
            && statuses.iter().all(|(_, s)| {
                s.as_ref()
                    .is_some_and(|s| s.voters == voters && s.learners == n - voters)
            });
        if to_voters.is_none() && all_voters {
            to_voters = Some(now.saturating_duration_since(last_start));
        }
        if now > deadline {
            cluster.print_logs();
            panic!("{n} nodes (seed {seed}): no leader and {voters} voters everywhere within {FORMATION_LIMIT:?}: {statuses:#?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (leader, seen_200) = first_200.unwrap_or_else(|| unreachable!("loop ends with a leader"));
    tokio::time::sleep_until((seen_200 + delay).into()).await;
    let killed_at = cluster.kill9(leader);
    let limit = killed_at + RECOVERY_LIMIT;
    loop {
        let mut led = false;
        for slot in cluster.running() {
            led |= cluster.status(slot).await.is_some_and(|s| s.is_leader);
        }
        if led {
            break;
        }
        if Instant::now() > limit {
            cluster.print_logs();
            panic!("{n} nodes (seed {seed}): no new leader within {RECOVERY_LIMIT:?} after killing node-{leader} {delay:?} after its first 200");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Let the sampler see the new leader for a moment.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let kill_us = cluster.micros(killed_at);
    let timeline = cluster.stop_sampling().await;
    let violations = timeline.violations();
    assert!(
        violations.is_empty(),
        "{n} nodes (seed {seed}): two leaders at once: {violations:?}"
    );
    let new_200 = timeline
        .first_after(kill_us, |s| s.is_200() && s.slot != leader)
        .unwrap_or_else(|| panic!("{n} nodes (seed {seed}): the sampler saw no new leader"));
    Trial {
        to_voters: to_voters.unwrap_or_else(|| unreachable!("loop ends with all voters")),
        failover: Duration::from_micros(new_200.received_us.saturating_sub(kill_us)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survivors_elect_at_once_when_the_first_leader_dies_right_after_bootstrap() {
    let per_delay = trials_per_delay();
    let mut table = Vec::new();
    for n in [3, 5] {
        let mut failovers = Vec::new();
        let mut formations = Vec::new();
        for (d, &delay_ms) in KILL_DELAYS_MS.iter().enumerate() {
            for t in 0..per_delay {
                let seed = (n * 1000 + d * 100 + t) as u64;
                let trial = one_trial(n, Duration::from_millis(delay_ms), seed).await;
                eprintln!(
                    "{n} nodes, kill {delay_ms} ms after the first 200, trial {t}: all voters {:.0} ms after the last start, new leader {:.1} ms after the kill",
                    ms(trial.to_voters),
                    ms(trial.failover)
                );
                failovers.push(trial.failover);
                formations.push(trial.to_voters);
            }
        }
        failovers.sort();
        formations.sort();
        table.push((n, failovers, formations));
    }
    println!("| nodes | trials | kill → new 200 p50 ms | p99 ms | max ms | last start → all voters p50 ms | p99 ms | max ms |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (n, f, v) in &table {
        println!(
            "| {n} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} |",
            f.len(),
            ms(quantile(f, 0.5)),
            ms(quantile(f, 0.99)),
            ms(quantile(f, 1.0)),
            ms(quantile(v, 0.5)),
            ms(quantile(v, 0.99)),
            ms(quantile(v, 1.0)),
        );
    }
    for (n, f, v) in &table {
        if f.len() >= 20 {
            assert!(
                quantile(f, 0.99) <= Duration::from_millis(350),
                "{n} nodes: failover p99 {:?}",
                quantile(f, 0.99)
            );
            assert!(
                quantile(v, 0.5) <= Duration::from_secs(1),
                "{n} nodes: formation p50 {:?}",
                quantile(v, 0.5)
            );
            assert!(
                quantile(v, 0.99) <= Duration::from_secs(2),
                "{n} nodes: formation p99 {:?}",
                quantile(v, 0.99)
            );
        } else {
            // Few trials on a shared machine: bounds with headroom.
            assert!(
                quantile(f, 1.0) <= Duration::from_secs(1),
                "{n} nodes: failover {f:?}"
            );
            assert!(
                quantile(v, 1.0) <= Duration::from_secs(3),
                "{n} nodes: formation {v:?}"
            );
        }
    }
}

/// How members come and go in the walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Names {
    /// StatefulSet-like: `node-<ordinal>`, scaled down from the highest
    /// ordinal, back under the same name and address without state.
    Stable,
    /// Deployment-like: every new pod has a new name; scale-down removes
    /// the leader first, then the oldest.
    Fresh,
}

/// Waits until one leader is agreed on and every running member reports
/// `min(members, max_voters)` voters and the rest learners.
async fn wait_settled(cluster: &Cluster, members: usize, step: &str) {
    let voters = members.min(MAX_VOTERS);
    cluster
        .wait_until(STEP_LIMIT, step, || async {
            if cluster.running().len() != members || cluster.steady_leader().await.is_none() {
                return false;
            }
            let statuses = cluster.statuses().await;
            statuses.iter().all(|(_, s)| {
                s.as_ref()
                    .is_some_and(|s| s.voters == voters && s.learners == members - voters)
            })
        })
        .await;
}

async fn scale_walk(names: Names) {
    let mut cluster = Cluster::start(3, ClusterConfig::default()).await;
    cluster.start_sampling(Duration::from_millis(5));
    wait_settled(&cluster, 3, "3 members formed").await;
    let mut next_fresh = 3;
    let mut log = Vec::new();
    for target in [5usize, 7, 3, 1, 3] {
        let started = Instant::now();
        let running = cluster.running();
        if target > running.len() {
            for _ in running.len()..target {
                match names {
                    Names::Stable => {
                        let ordinal = (0..cluster.len())
                            .find(|s| !cluster.node(*s).is_running())
                            .unwrap_or(cluster.len());
                        if ordinal < cluster.len() {
                            cluster.dns_add(ordinal);
                            cluster.restart(ordinal, false).await;
                        } else {
                            cluster.add_node(&format!("node-{ordinal}")).await;
                        }
                    }
                    Names::Fresh => {
                        cluster.add_node(&format!("pod-{next_fresh}")).await;
                        next_fresh += 1;
                    }
                }
            }
        } else {
            let mut leaving: Vec<usize> = match names {
                Names::Stable => running.iter().rev().copied().collect(),
                Names::Fresh => {
                    let leader = cluster.steady_leader().await;
                    let mut order: Vec<usize> = leader.into_iter().collect();
                    order.extend(running.iter().copied().filter(|s| Some(*s) != leader));
                    order
                }
            };
            leaving.truncate(running.len() - target);
            for slot in leaving {
                cluster.dns_remove(slot);
                cluster.sigterm(slot);
                let exit = cluster.wait_exit(slot, Duration::from_secs(15)).await;
                assert!(
                    exit.success(),
                    "{} exited with {exit}",
                    cluster.node(slot).name
                );
            }
        }
        wait_settled(
            &cluster,
            target,
            &format!("{names:?} names: scaled to {target}"),
        )
        .await;
        log.push((target, started.elapsed()));
    }
    let timeline = cluster.stop_sampling().await;
    let violations = timeline.violations();
    assert!(violations.is_empty(), "two leaders at once: {violations:?}");
    let steps: Vec<String> = log
        .iter()
        .map(|(n, d)| format!("→{n} in {:.1} s", d.as_secs_f64()))
        .collect();
    println!(
        "scale walk, {names:?} names: 3 {}; {} samples, {} with 200, 0 instants with two 200s, longest leaderless gap {:?}",
        steps.join(" "),
        timeline.samples.len(),
        timeline.leader_samples().count(),
        timeline.max_leaderless_gap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_walk_with_stable_names_keeps_one_leader_and_odd_voters() {
    scale_walk(Names::Stable).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_walk_with_fresh_names_keeps_one_leader_and_odd_voters() {
    scale_walk(Names::Fresh).await;
}

/// Names of the members each running node of `group` reports as leader,
/// with the slot that answers 200 among them, once they all agree on one
/// member of `group`.
async fn agreed_leader(cluster: &Cluster, group: &[usize]) -> Option<(usize, String)> {
    let mut leader = None;
    let mut named = BTreeSet::new();
    for &slot in group {
        if !cluster.running().contains(&slot) {
            continue;
        }
        let status = cluster.status(slot).await?;
        if status.is_leader {
            if leader.is_some() {
                return None;
            }
            leader = Some(slot);
        }
        named.insert(status.leader?);
    }
    let slot = leader?;
    let name = &cluster.node(slot).name;
    (named.len() == 1 && named.contains(name)).then(|| (slot, name.clone()))
}

/// Sums every series of `metric` in slot `slot`'s `/metrics`.
async fn metric_sum(cluster: &Cluster, slot: usize, metric: &str) -> f64 {
    let Some((_, text)) = cluster.get(slot, "/metrics").await else {
        return 0.0;
    };
    text.lines()
        .filter(|l| l.starts_with(metric))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until each of the two groups agrees on one leader of its own.
async fn wait_both(cluster: &Cluster, groups: [&[usize]; 2]) -> ((usize, String), (usize, String)) {
    let deadline = Instant::now() + FORMATION_LIMIT;
    loop {
        let blue = agreed_leader(cluster, groups[0]).await;
        let green = agreed_leader(cluster, groups[1]).await;
        if let (Some(b), Some(g)) = (blue, green) {
            return (b, g);
        }
        if Instant::now() > deadline {
            cluster.print_logs();
            panic!(
                "no agreed leader in each group within {FORMATION_LIMIT:?}: {:#?}",
                cluster.statuses().await
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two groups with different `--cluster-id`s behind one DNS name (a Service
/// selecting both by mistake): each forms its own cluster of its own three
/// members, the other group's connections are refused at the handshake, and
/// one group losing its leader leaves the other untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_on_one_dns_name_form_two_clusters_that_never_mix() {
    let config = ClusterConfig {
        bootstrap_expect: Some(3),
        loopback_net: 93,
        cluster_ids: ["blue", "blue", "blue", "green", "green", "green"]
            .map(String::from)
            .to_vec(),
        ..ClusterConfig::default()
    };
    let mut cluster = Cluster::start(6, config).await;
    let groups: [&[usize]; 2] = [&[0, 1, 2], &[3, 4, 5]];
    let ((blue, _), (green, green_name)) = wait_both(&cluster, groups).await;
    for (slot, status) in cluster.statuses().await {
        let status = status.expect("every node answers");
        let own = if slot < 3 { groups[0] } else { groups[1] };
        assert_eq!(
            (status.voters, status.learners),
            (3, 0),
            "node-{slot} sees a configuration beyond its group: {status:?}"
        );
        let leader = status.leader.expect("a leader is known");
        assert!(
            own.iter().any(|s| cluster.node(*s).name == leader),
            "node-{slot} follows {leader}, outside its group"
        );
    }
    let green_term = cluster
        .status(green)
        .await
        .expect("green's leader answers")
        .term;
    let mut refused = 0.0;
    for slot in 0..6 {
        refused += metric_sum(
            &cluster,
            slot,
            "raft_elector_peer_connections_refused_total",
        )
        .await;
    }
    assert!(refused > 0.0, "no handshake of the other group was refused");

    cluster.kill9(blue);
    let ((new_blue, _), (green_after, green_name_after)) = wait_both(&cluster, groups).await;
    assert_ne!(new_blue, blue, "blue elected a live member");
    assert_eq!(
        (green_after, green_name_after),
        (green, green_name),
        "green's leader changed when blue's died"
    );
    let term = cluster
        .status(green)
        .await
        .expect("green's leader answers")
        .term;
    assert_eq!(
        term, green_term,
        "green held an election when blue's leader died"
    );
    println!(
        "two groups on one DNS name: one leader each, 3 voters each, {refused} cross-group connections refused; blue's leader killed, green kept its leader and term"
    );
}
