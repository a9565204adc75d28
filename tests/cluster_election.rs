//! Elections of real `raft-elector run` processes on loopback, peers found
//! through the in-process DNS server, `/is-leader` sampled every 2 ms.
//!
//! Tests run one at a time (the cluster harness holds a lock), so their
//! timing does not depend on each other.

mod support;

use std::time::Duration;
use support::cluster::{Cluster, ClusterConfig, Timeline};

/// Sampling period of the `/is-leader` sampler.
const SAMPLE_EVERY: Duration = Duration::from_millis(2);
/// Longest wait for a first or a new steady leader.
const ELECT: Duration = Duration::from_secs(10);

fn assert_no_double_leader(timeline: &Timeline) {
    let violations = timeline.violations();
    assert!(
        violations.is_empty(),
        "two nodes led at once ({} violations, first {:?}); {} samples",
        violations.len(),
        violations.first(),
        timeline.samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_found_through_dns_have_exactly_one_leader_in_steady_state() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    let leader = cluster.wait_for_single_leader(ELECT).await;
    cluster.start_sampling(SAMPLE_EVERY);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let timeline = cluster.stop_sampling().await;

    assert_eq!(
        timeline.leader_slots().into_iter().collect::<Vec<_>>(),
        vec![leader],
        "only the leader answers 200"
    );
    let (asked, led) = timeline.counts(leader);
    assert!(
        asked > 200,
        "the sampler asked the leader {asked} times in 2 s"
    );
    assert!(
        led * 100 >= asked * 99,
        "the leader's lease lapsed in steady state: {led} of {asked} answers were 200"
    );
    assert_no_double_leader(&timeline);
    let status = cluster.status(leader).await.expect("leader answers");
    assert_eq!((status.voters, status.learners), (5, 0), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_at_once_form_one_cluster_that_agrees_on_leader_and_term() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    cluster.start_sampling(SAMPLE_EVERY);
    cluster
        .wait_until(
            ELECT,
            "one cluster of 5 that agrees on leader and term",
            || async {
                if cluster.steady_leader().await.is_none() {
                    return false;
                }
                let mut all_in = true;
                for (slot, status) in cluster.statuses().await {
                    all_in &= status.is_some_and(|s| s.voters + s.learners == 5)
                        && cluster.is_ready(slot).await;
                }
                all_in
            },
        )
        .await;
    let timeline = cluster.stop_sampling().await;

    let leader = cluster.steady_leader().await.expect("still one leader");
    let leader_status = cluster.status(leader).await.expect("leader answers");
    for (slot, status) in cluster.statuses().await {
        let status = status.unwrap_or_else(|| panic!("node-{slot} does not answer"));
        assert_eq!(status.leader.as_deref(), Some(leader_status.node.as_str()));
        assert_eq!(status.term, leader_status.term, "{status:?}");
    }
    // Two clusters would each have had a leader answering 200 at once.
    assert_no_double_leader(&timeline);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_moves_the_200_to_another_node_and_never_to_two() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    let old = cluster.wait_for_single_leader(ELECT).await;
    cluster.start_sampling(SAMPLE_EVERY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = cluster.kill9(old);
    let killed_at = cluster.micros(killed);
    let new = cluster.wait_for_single_leader(ELECT).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let timeline = cluster.stop_sampling().await;

    assert_ne!(new, old);
    let failover = timeline
        .first_200_elsewhere(killed_at, old)
        .expect("another node answered 200 after the kill");
    assert!(
        failover < Duration::from_secs(2),
        "failover took {failover:?}"
    );
    assert_no_double_leader(&timeline);
    eprintln!(
        "kill -9 failover {failover:?}; {} samples, {} ambiguous overlaps",
        timeline.samples.len(),
        timeline.ambiguous_overlaps()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_the_leader_hands_over_without_an_election_timeout_and_exits_0() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    let old = cluster.wait_for_single_leader(ELECT).await;
    cluster.start_sampling(SAMPLE_EVERY);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let termed = cluster.sigterm(old);
    let termed_at = cluster.micros(termed);
    let exit = cluster.wait_exit(old, Duration::from_secs(5)).await;
    let new = cluster.wait_for_single_leader(ELECT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let timeline = cluster.stop_sampling().await;

    assert!(exit.success(), "the old leader exited with {exit}");
    assert_ne!(new, old);
    // Upper bound of the time nobody led: from the send of the old leader's
    // last 200 to the answer of the new leader's first.
    let handoff = timeline
        .handoff_gap(termed_at, old)
        .unwrap_or_else(|missing| panic!("{missing}"));
    assert!(
        handoff <= Duration::from_millis(100),
        "handoff took {handoff:?} from the old leader's last claim to the new one's first"
    );
    assert_no_double_leader(&timeline);
    eprintln!("SIGTERM handoff {handoff:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_with_its_state_keeps_its_identity_and_rejoins() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    let leader = cluster.wait_for_single_leader(ELECT).await;
    let follower = (leader + 1) % 5;
    let before = cluster.status(follower).await.expect("follower answers");
    cluster.kill9(follower);
    cluster.restart(follower, true).await;
    cluster
        .wait_until(ELECT, "restarted node ready", || cluster.is_ready(follower))
        .await;
    let leader = cluster.wait_for_single_leader(ELECT).await;

    let after = cluster
        .status(follower)
        .await
        .expect("restarted node answers");
    assert_eq!(
        after.node_id, before.node_id,
        "same incarnation after restart"
    );
    let status = cluster.status(leader).await.expect("leader answers");
    assert_eq!(
        status.voters + status.learners,
        5,
        "no duplicate member: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_without_state_is_a_new_incarnation_that_replaces_the_old() {
    let mut cluster = Cluster::start(5, ClusterConfig::default()).await;
    let leader = cluster.wait_for_single_leader(ELECT).await;
    let follower = (leader + 1) % 5;
    let before = cluster.status(follower).await.expect("follower answers");
    cluster.kill9(follower);
    cluster.restart(follower, false).await;
    let new_id = cluster
        .status(follower)
        .await
        .expect("restarted node answers")
        .node_id;
    assert_ne!(new_id, before.node_id, "a fresh start is a new incarnation");
    assert_eq!(new_id.split('#').next(), Some(before.node.as_str()));
    cluster
        .wait_until(
            Duration::from_secs(15),
            "new incarnation joined, old removed",
            || async {
                let Some(leader) = cluster.steady_leader().await else {
                    return false;
                };
                let Some(status) = cluster.status(leader).await else {
                    return false;
                };
                cluster.is_ready(follower).await && status.voters + status.learners == 5
            },
        )
        .await;
}
