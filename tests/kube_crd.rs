//! The committed CRD (`crds/`) is what the code generates, and the real API
//! server accepts it with its validation rules.

mod kube_env;

use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::Api;
use kube_env::{KubeEnv, CRD_FILE};
use raft_elector::kube::crd::{crd_yaml, LeaderElection};
use std::process::Command;

#[test]
fn committed_crd_yaml_matches_the_code() {
    let committed =
        std::fs::read_to_string(CRD_FILE).expect("read crds/leaderelections.raft-elector.io.yaml");
    let generated = crd_yaml().expect("render the CRD");
    assert!(
        committed == generated,
        "crds/leaderelections.raft-elector.io.yaml drifted from src/kube/crd.rs; regenerate it with\n  cargo run -- crd > crds/leaderelections.raft-elector.io.yaml"
    );
}

#[test]
fn crd_subcommand_prints_the_committed_yaml() {
    let out = Command::new(env!("CARGO_BIN_EXE_raft-elector"))
        .arg("crd")
        .output()
        .expect("run raft-elector crd");
    assert!(out.status.success());
    let committed = std::fs::read_to_string(CRD_FILE).expect("read crds/");
    assert!(
        String::from_utf8_lossy(&out.stdout) == committed,
        "`raft-elector crd` differs from crds/leaderelections.raft-elector.io.yaml"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_applies_defaults_and_refuses_bad_timings() {
    let Some(env) = KubeEnv::start("crd_validation").await else {
        return;
    };
    let les: Api<LeaderElection> = Api::default_namespaced(env.admin.clone());
    let good: LeaderElection = serde_json::from_value(serde_json::json!({
        "apiVersion": "raft-elector.io/v1alpha1", "kind": "LeaderElection",
        "metadata": { "name": "good" },
        "spec": { "electionTimeoutMin": "150ms", "electionTimeoutMax": "300ms" }
    }))
    .expect("object");
    let created = les
        .create(&PostParams::default(), &good)
        .await
        .expect("a valid spec is accepted");
    assert_eq!(created.spec.peer_port, 4041, "default filled by the server");
    assert_eq!(created.spec.max_voters, 5);
    let raw: Api<DynamicObject> = Api::default_namespaced_with(
        env.admin.clone(),
        &ApiResource::erase::<LeaderElection>(&()),
    );
    for (name, spec, why) in [
        (
            "inverted",
            serde_json::json!({"electionTimeoutMin": "300ms", "electionTimeoutMax": "150ms"}),
            "electionTimeoutMin must be below electionTimeoutMax",
        ),
        (
            "zero",
            serde_json::json!({"heartbeatInterval": "0s"}),
            "must be a positive duration",
        ),
        (
            "port",
            serde_json::json!({"peerPort": 70000}),
            "spec.peerPort",
        ),
        (
            "voters",
            serde_json::json!({"maxVoters": 0}),
            "spec.maxVoters",
        ),
    ] {
        let bad: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "raft-elector.io/v1alpha1", "kind": "LeaderElection",
            "metadata": { "name": name }, "spec": spec
        }))
        .expect("object");
        match raw.create(&PostParams::default(), &bad).await {
            Err(kube::Error::Api(s)) => {
                assert_eq!(s.code, 422, "{name}: {s:?}");
                assert!(s.message.contains(why), "{name}: {}", s.message);
            }
            other => panic!("{name}: expected a refusal, got {other:?}"),
        }
    }
}
