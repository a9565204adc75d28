//! The CR side of bootstrap against a real API server, with the sidecars'
//! ServiceAccount and Role: members that start together record exactly one
//! first configuration, and a group re-bootstraps only once none of its
//! recorded members' pods exists.

mod kube_env;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use kube_env::KubeEnv;
use raft_elector::kube::bootstrap::{CrBootstrap, Outcome};
use raft_elector::kube::crd::{BootstrapMember, BootstrapRecord, LeaderElectionSpec};

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
    assert!(
        !cas.forget_if_abandoned().await.expect("check"),
        "node-2's pod still exists"
    );
    assert_eq!(cas.recorded().await.expect("read"), Some(record));
    env.delete_pod("node-2").await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cas.forget_if_abandoned().await.expect("check") {
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
