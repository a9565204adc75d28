//! Membership changes of real processes driven by DNS: a rolling update
//! replaces every member with a new identity while a leader keeps serving.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;
use support::cluster::{Cluster, ClusterConfig};

/// Members of the cluster before and after the update.
const SIZE: usize = 5;
/// Longest wait for one membership step.
const STEP: Duration = Duration::from_secs(15);
/// Longest time without any node answering 200 during the update.
const MAX_GAP: Duration = Duration::from_secs(2);

/// Returns the leader's (voters, learners) when the cluster is steady.
async fn configuration(cluster: &Cluster) -> Option<(usize, usize, usize)> {
    let leader = cluster.steady_leader().await?;
    let status = cluster.status(leader).await?;
    Some((leader, status.voters, status.learners))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_update_keeps_a_leader_and_ends_with_exactly_the_new_members() {
    let mut cluster = Cluster::start(SIZE, ClusterConfig::default()).await;
    cluster
        .wait_for_single_leader(Duration::from_secs(10))
        .await;
    cluster.start_sampling(Duration::from_millis(5));

    for old in 0..SIZE {
        let name = format!("node-{}", SIZE + old);
        let new = cluster.add_node(&name).await;
        cluster
            .wait_until(STEP, &format!("{name} joined"), || async {
                cluster.is_ready(new).await
                    && configuration(&cluster)
                        .await
                        .is_some_and(|(_, v, l)| v + l == SIZE + 1)
            })
            .await;
        cluster.dns_remove(old);
        cluster.sigterm(old);
        let exit = cluster.wait_exit(old, Duration::from_secs(10)).await;
        assert!(exit.success(), "node-{old} exited with {exit}");
        cluster
            .wait_until(STEP, &format!("node-{old} removed"), || async {
                configuration(&cluster)
                    .await
                    .is_some_and(|(_, v, l)| v + l == SIZE)
            })
            .await;
    }
    let timeline = cluster.stop_sampling().await;

    let violations = timeline.violations();
    assert!(violations.is_empty(), "two leaders at once: {violations:?}");
    let gap = timeline.max_leaderless_gap();
    assert!(gap < MAX_GAP, "no leader for {gap:?} during the update");

    let new_names: BTreeSet<String> = (SIZE..2 * SIZE).map(|i| format!("node-{i}")).collect();
    let (leader, voters, learners) = configuration(&cluster)
        .await
        .expect("a steady leader after the update");
    assert_eq!((voters, learners), (SIZE, 0));
    assert!(leader >= SIZE, "the leader node-{leader} is a new member");
    // Followers learn the last promotion with the next heartbeat: wait for it.
    for slot in SIZE..2 * SIZE {
        cluster
            .wait_until(
                Duration::from_secs(2),
                "follower sees the final configuration",
                || async { cluster.metric(slot, "raft_elector_voters").await == Some(SIZE as f64) },
            )
            .await;
    }
    for slot in SIZE..2 * SIZE {
        let status = cluster.status(slot).await.expect("new member answers");
        let named = status.leader.clone().expect("knows the leader");
        assert!(
            new_names.contains(&named),
            "node-{slot} names {named} as leader"
        );
        assert_eq!(status.voters + status.learners, SIZE, "{status:?}");
        assert_eq!(
            cluster.metric(slot, "raft_elector_voters").await,
            Some(SIZE as f64),
            "node-{slot} metrics"
        );
    }
    assert!(cluster.running().iter().all(|&slot| slot >= SIZE));
}
