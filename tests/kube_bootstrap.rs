//! The CR side of bootstrap against a real API server, with the sidecars'
//! ServiceAccount and Role: members that start together record exactly one
//! first configuration, and a group re-bootstraps only once none of its
//! recorded members' pods exists. First the compare-and-swap on its own,
//! then real `raft-elector run` processes bootstrapping through it.

mod kube_env;
mod support;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_env::KubeEnv;
use raft_elector::kube::bootstrap::{CrBootstrap, Outcome};
use raft_elector::kube::crd::{BootstrapMember, BootstrapRecord, LeaderElectionSpec};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterConfig, CLUSTER_ID};

async fn sidecar_client(env: &KubeEnv) -> Client {
    let kc = Kubeconfig::read_from(&env.sidecar_kubeconfig).expect("sidecar kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("usable");
    Client::try_from(config).expect("client")
}

fn spec() -> LeaderElectionSpec {
    serde_json::from_str(r#"{"expectedMembers": 5}"#).expect("spec")
}

/// Member `i`'s proposal: what it saw of the others (each saw a different subset).
fn proposal(i: usize) -> BootstrapRecord {
    let members = (0..5)
        .filter(|j| (j + i) % 5 != 4 || *j == i)
        .map(|j| BootstrapMember {
            id: format!("node-{j}#{}", 100 + j),
            address: format!("10.0.0.{j}:4041"),
        })
        .collect();
    BootstrapRecord {
        members,
        recorded_by: format!("node-{i}#{}", 100 + i),
        recorded_at: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_starting_together_record_exactly_one_first_configuration() {
    let Some(env) = KubeEnv::start("bootstrap_cas").await else {
        return;
    };
    let client = sidecar_client(&env).await;
    assert!(
        env.election("grp").await.is_none(),
        "no CR before the members start"
    );
    let mut tasks = Vec::new();
    for i in 0..5 {
        let cas = CrBootstrap::new(client.clone(), &env.namespace, "grp", spec());
        tasks.push(tokio::spawn(async move {
            cas.record_or_adopt(proposal(i)).await
        }));
    }
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task").expect("compare-and-swap"));
    }
    let recorded: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o, Outcome::Recorded(_)))
        .collect();
    assert_eq!(recorded.len(), 1, "exactly one proposal wins: {outcomes:?}");
    let winner = recorded[0].record().clone();
    assert!(
        outcomes.iter().all(|o| *o.record() == winner),
        "everyone adopts the winner"
    );
    let le = env
        .election("grp")
        .await
        .expect("the members created the CR");
    assert_eq!(le.spec.expected_members, Some(5));
    assert_eq!(le.status.and_then(|s| s.bootstrap), Some(winner.clone()));
    // A member that starts later adopts it too.
    let late = CrBootstrap::new(client.clone(), &env.namespace, "grp", spec());
    assert_eq!(
        late.record_or_adopt(proposal(3)).await.expect("cas"),
        Outcome::Adopted(winner)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_rebootstraps_only_when_no_recorded_member_pod_exists() {
    let Some(env) = KubeEnv::start("bootstrap_forget").await else {
        return;
    };
    let client = sidecar_client(&env).await;
    let cas = CrBootstrap::new(client, &env.namespace, "grp", spec());
    let record = proposal(0);
    cas.record_or_adopt(record.clone()).await.expect("record");
    env.create_pod("node-2", "grp").await;
    let none = BTreeSet::new();
    assert!(
        !cas.forget_if_abandoned(&none).await.expect("check"),
        "node-2's pod still exists"
    );
    let node_2_replaced = BTreeSet::from(["node-2".to_string()]);
    assert!(
        cas.recorded().await.expect("read").is_some(),
        "nothing forgotten yet"
    );
    // node-2's pod runs another incarnation (the caller saw it): that pod is
    // not the recorded member's. Checked on a copy of the record only.
    let probe = CrBootstrap::new(sidecar_client(&env).await, &env.namespace, "probe", spec());
    probe.record_or_adopt(record.clone()).await.expect("record");
    assert!(
        probe
            .forget_if_abandoned(&node_2_replaced)
            .await
            .expect("check"),
        "a recreated pod running a new incarnation does not keep the record"
    );
    assert_eq!(cas.recorded().await.expect("read"), Some(record));
    env.delete_pod("node-2").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cas.forget_if_abandoned(&none).await.expect("check") {
        assert!(std::time::Instant::now() < deadline, "never forgotten");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        cas.recorded().await.expect("read"),
        None,
        "the next members bootstrap anew"
    );
    let fresh = proposal(2);
    assert_eq!(
        cas.record_or_adopt(fresh.clone()).await.expect("cas"),
        Outcome::Recorded(fresh)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_proposals_are_refused_without_touching_the_cr() {
    let Some(env) = KubeEnv::start("bootstrap_refuse").await else {
        return;
    };
    let client = sidecar_client(&env).await;
    let cas = CrBootstrap::new(client, &env.namespace, "grp", spec());
    let err = cas
        .record_or_adopt(BootstrapRecord::default())
        .await
        .expect_err("refused");
    assert_eq!(err.metric_label(), "invalid");
    assert!(env.election("grp").await.is_none(), "nothing created");
}

/// Bound on a group electing its leader in these tests.
const ELECTION_BOUND: Duration = Duration::from_secs(20);

async fn start_members(env: &KubeEnv, names: &[String]) -> Cluster {
    let mut config = ClusterConfig::default();
    config
        .extra_args
        .extend(env.sidecar_args(&env.sidecar_kubeconfig));
    // KUBE_TEST_LOG=info,raft_elector=debug shows every bootstrap decision.
    if let Ok(level) = std::env::var("KUBE_TEST_LOG") {
        config.extra_args.extend(["--log-level".into(), level]);
    }
    config.bootstrap_expect = Some(names.len());
    Cluster::start(names.len(), config).await
}

/// The recorded members' ids, sorted.
async fn recorded_ids(env: &KubeEnv) -> Option<Vec<String>> {
    let le = env.election(CLUSTER_ID).await?;
    let record = le.status?.bootstrap?;
    let mut ids: Vec<String> = record.members.into_iter().map(|m| m.id).collect();
    ids.sort();
    Some(ids)
}

/// Waits for one leader whose configuration holds every running member as
/// a voter, every member agreeing on it; returns the members' ids, sorted.
async fn wait_one_cluster(cluster: &mut Cluster, n: usize) -> Vec<String> {
    let deadline = Instant::now() + ELECTION_BOUND;
    loop {
        let statuses = cluster.statuses().await;
        let leaders: BTreeSet<Option<String>> = statuses
            .iter()
            .map(|(_, s)| s.as_ref().and_then(|s| s.leader_id.clone()))
            .collect();
        let all_voters = statuses
            .iter()
            .all(|(_, s)| s.as_ref().is_some_and(|s| s.voters == n));
        let one_leader = statuses
            .iter()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_leader))
            .count()
            == 1;
        if one_leader && all_voters && leaders.len() == 1 {
            let mut ids: Vec<String> = statuses
                .into_iter()
                .filter_map(|(_, s)| s.map(|s| s.node_id))
                .collect();
            ids.sort();
            return ids;
        }
        assert!(
            Instant::now() < deadline,
            "no single cluster of {n} voters within {ELECTION_BOUND:?}: {statuses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn bootstraps(cluster: &Cluster, slot: usize) -> f64 {
    cluster
        .metric(slot, "raft_elector_bootstraps_total")
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_started_together_form_one_cluster_from_the_record_and_rebootstrap_once_all_are_gone()
{
    let Some(env) = KubeEnv::start("bootstrap_processes").await else {
        return;
    };
    let names: Vec<String> = (0..5).map(|i| format!("node-{i}")).collect();
    env.create_pods(&names, CLUSTER_ID).await;
    let mut cluster = start_members(&env, &names).await;
    let ids = wait_one_cluster(&mut cluster, 5).await;
    assert_eq!(
        recorded_ids(&env).await,
        Some(ids.clone()),
        "the CR records exactly the running members"
    );
    // The leader's status write adds the cluster id next to the record.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = env.election(CLUSTER_ID).await.and_then(|le| le.status);
        let written = status.as_ref().is_some_and(|s| s.leader.is_some());
        if written {
            let status = status.expect("written");
            assert_eq!(status.cluster_id.as_deref(), Some(CLUSTER_ID));
            let mut members: Vec<String> = status.members.iter().map(|m| m.name.clone()).collect();
            members.sort();
            assert_eq!(members, names, "one cluster of every member");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the leader never wrote the status"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for slot in cluster.running() {
        assert_eq!(
            bootstraps(&cluster, slot).await,
            1.0,
            "{} bootstrapped from the record (none joined later)",
            cluster.node(slot).name
        );
    }

    // Every pod goes away; new pods under the same names start without state.
    for slot in cluster.running() {
        cluster.kill9(slot);
    }
    for name in &names {
        env.delete_pod(name).await;
    }
    env.create_pods(&names, CLUSTER_ID).await;
    for slot in 0..names.len() {
        cluster.restart(slot, false).await;
    }
    let new_ids = wait_one_cluster(&mut cluster, 5).await;
    assert!(
        new_ids.iter().all(|id| !ids.contains(id)),
        "new incarnations: {new_ids:?}"
    );
    assert_eq!(
        recorded_ids(&env).await,
        Some(new_ids),
        "the group bootstrapped anew and recorded it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_record_with_a_live_member_pod_blocks_rebootstrap_until_that_pod_is_gone() {
    let Some(env) = KubeEnv::start("bootstrap_stale").await else {
        return;
    };
    let names: Vec<String> = (0..3).map(|i| format!("node-{i}")).collect();
    env.create_pods(&names, CLUSTER_ID).await;
    // An earlier group: node-0 and node-1 as other incarnations, and
    // "keeper", whose pod still exists (its process answers nobody here).
    env.create_pod("keeper", CLUSTER_ID).await;
    let stale = BootstrapRecord {
        members: [("keeper", 3), ("node-0", 1), ("node-1", 2)]
            .iter()
            .map(|(n, i)| BootstrapMember {
                id: format!("{n}#{i:x}"),
                address: format!("127.0.0.{i}:4041"),
            })
            .collect(),
        recorded_by: "node-0#1".into(),
        recorded_at: None,
    };
    let client = sidecar_client(&env).await;
    let cas = CrBootstrap::new(client, &env.namespace, CLUSTER_ID, spec());
    cas.record_or_adopt(stale.clone())
        .await
        .expect("record the stale group");
    let mut cluster = start_members(&env, &names).await;
    // The new members see each other but a recorded member's pod lives.
    let hold = Instant::now() + Duration::from_secs(5);
    while Instant::now() < hold {
        for (slot, status) in cluster.statuses().await {
            if let Some(s) = status {
                assert_eq!(
                    s.voters,
                    0,
                    "{} bootstrapped while keeper's pod exists",
                    cluster.node(slot).name
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        cas.recorded().await.expect("read"),
        Some(stale),
        "the record of a group with a live pod is never touched"
    );
    env.delete_pod("keeper").await;
    let ids = wait_one_cluster(&mut cluster, 3).await;
    assert_eq!(
        recorded_ids(&env).await,
        Some(ids),
        "once no recorded member's pod is left, the new members bootstrap and record it"
    );
}
