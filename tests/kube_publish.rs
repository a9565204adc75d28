//! Kubernetes publishing end to end: real `raft-elector run` processes, a
//! real kube-apiserver (the test bed, or `E2E_KUBECONFIG`), the sidecars
//! authenticated as a ServiceAccount bound by the chart's Role, and member
//! pods created through the API (Pending: no kubelet, labels are enough).

mod kube_env;
mod support;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::Api;
use kube_env::{kube_requests, FaultProxy, KubeEnv, LeaderWatch};
use std::path::Path;
use std::time::{Duration, Instant};
use support::cluster::{Cluster, ClusterConfig, CLUSTER_ID};

/// Bound on labels matching a freshly elected leader.
const LABEL_BOUND: Duration = Duration::from_secs(2);
/// Bound on any election in these tests.
const ELECTION_BOUND: Duration = Duration::from_secs(10);
/// Write verbs the publisher uses.
const WRITES: &[&str] = &["patch", "update", "create"];

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("node-{i}")).collect()
}

async fn start_cluster(env: &KubeEnv, n: usize, kubeconfig: &Path) -> Cluster {
    env.create_pods(&names(n), CLUSTER_ID).await;
    let mut config = ClusterConfig::default();
    config.extra_args.extend(env.sidecar_args(kubeconfig));
    // KUBE_TEST_LOG=info,raft_elector::kube=debug shows every publisher decision.
    if let Ok(level) = std::env::var("KUBE_TEST_LOG") {
        config.extra_args.extend(["--log-level".into(), level]);
    }
    Cluster::start(n, config).await
}

/// Waits until the leader's configuration has `n` voters (members join as
/// learners first; a leader is only replaceable once they vote).
async fn wait_voters(cluster: &mut Cluster, n: usize) -> usize {
    let deadline = Instant::now() + ELECTION_BOUND;
    loop {
        let slot = cluster.wait_for_single_leader(ELECTION_BOUND).await;
        if cluster.status(slot).await.is_some_and(|s| s.voters >= n) {
            return slot;
        }
        assert!(Instant::now() < deadline, "never {n} voters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until exactly `leader` says `leader` and every other pod says `follower`.
async fn wait_published(env: &KubeEnv, leader: &str, bound: Duration) -> Duration {
    let leader = leader.to_string();
    env.wait_roles(bound, &format!("labels for leader {leader}"), |roles| {
        roles.iter().all(|(name, role, _)| {
            let want = if *name == leader {
                "leader"
            } else {
                "follower"
            };
            role.as_deref() == Some(want)
        })
    })
    .await
}

/// Sums the publisher's requests of `verbs` over the running slots, except `skip`.
async fn requests(cluster: &Cluster, verbs: &[&str], skip: Option<usize>) -> f64 {
    let mut total = 0.0;
    for slot in cluster.running() {
        if Some(slot) == skip {
            continue;
        }
        if let Some((_, text)) = cluster.get(slot, "/metrics").await {
            total += kube_requests(&text, verbs);
        }
    }
    total
}

async fn events(env: &KubeEnv) -> Vec<Event> {
    let api: Api<Event> = Api::default_namespaced(env.admin.clone());
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("LeaderElected"))
        .collect()
}

/// Waits until `n` LeaderElected Events are out; panics after `bound`.
async fn wait_events(env: &KubeEnv, n: usize, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let have = events(env).await.len();
        if have >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{have} Events out, want {n}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_pod_is_labelled_and_status_shows_it_then_nothing_is_written() {
    let Some(env) = KubeEnv::start("labels_and_status").await else {
        return;
    };
    let mut cluster = start_cluster(&env, 3, &env.sidecar_kubeconfig.clone()).await;
    let slot = cluster.wait_for_single_leader(ELECTION_BOUND).await;
    let leader = cluster.node(slot).name.clone();
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("labels published {took:?} after the election was seen");
    if std::env::var_os("KUBE_TEST_LOG").is_some() {
        cluster.print_logs();
    }

    let status = cluster.status(slot).await.expect("leader answers");
    let deadline = Instant::now() + ELECTION_BOUND;
    let le = loop {
        let le = env.election(CLUSTER_ID).await;
        if let Some(s) = le.as_ref().and_then(|l| l.status.as_ref()) {
            // Members join as learners and are promoted: wait for 3 voters.
            let voters = s.members.iter().filter(|m| m.voter).count();
            if s.leader.as_deref() == Some(leader.as_str()) && voters == 3 {
                break le.expect("exists");
            }
        }
        assert!(
            Instant::now() < deadline,
            "status never named {leader}: {le:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let st = le.status.expect("status");
    assert_eq!(st.term, status.term);
    assert_eq!(st.cluster_id.as_deref(), Some(CLUSTER_ID));
    let pods: Api<Pod> = Api::default_namespaced(env.admin.clone());
    let pod = pods.get(&leader).await.expect("leader pod");
    assert_eq!(
        st.leader_uid, pod.metadata.uid,
        "status names the pod's UID"
    );
    assert_eq!(st.members.len(), 3);
    assert!(st.members.iter().all(|m| m.last_seen.is_some() && m.voter));
    let published = st
        .conditions
        .iter()
        .find(|c| c.type_ == "Published")
        .expect("condition");
    assert_eq!(published.status, "True", "{published:?}");
    assert_eq!(st.observed_generation, le.metadata.generation);
    let evs = events(&env).await;
    assert_eq!(evs.len(), 1, "one Event per leader change: {evs:?}");
    assert!(evs[0]
        .message
        .as_deref()
        .unwrap_or_default()
        .contains(&leader));

    // `kubectl get le` shows leader and term (when the real kubectl is there).
    let kubectl = Path::new(env!("CARGO_MANIFEST_DIR")).join(".tools/bin/kubectl");
    if kubectl.exists() {
        if let Some(cp) = &env.control_plane {
            let out = std::process::Command::new(&kubectl)
                .arg("--kubeconfig")
                .arg(cp.kubeconfig())
                .args(["-n", &env.namespace, "get", "le"])
                .output()
                .expect("run kubectl");
            let text = String::from_utf8_lossy(&out.stdout);
            println!("{text}");
            assert!(
                text.contains(&leader) && text.contains(&st.term.to_string()),
                "{text}"
            );
        }
    } else {
        println!("kubectl not installed (scripts/install-kube-tools); skipped the kubectl check");
    }

    // Steady state: no writes and no reads other than the open watches.
    let writes = requests(&cluster, WRITES, None).await;
    let reads = requests(&cluster, &["get", "list"], None).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        requests(&cluster, WRITES, None).await,
        writes,
        "writes at steady state"
    );
    assert_eq!(
        requests(&cluster, &["get", "list"], None).await,
        reads,
        "polling reads at steady state"
    );
    cluster.kill9(slot);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_failovers_move_labels_and_a_watch_never_sees_two_leaders() {
    let Some(env) = KubeEnv::start("kill9_failovers").await else {
        return;
    };
    let rounds: usize = std::env::var("KUBE_FAILOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut cluster = start_cluster(&env, 3, &env.sidecar_kubeconfig.clone()).await;
    let watch = LeaderWatch::start(&env).await;
    let mut slot = wait_voters(&mut cluster, 3).await;
    wait_published(&env, &cluster.node(slot).name.clone(), LABEL_BOUND).await;
    // The first leader's Event is the last write of its first pass.
    wait_events(&env, 1, LABEL_BOUND).await;
    let mut moved = Vec::new();
    let mut writes_per_change = Vec::new();
    for round in 0..rounds {
        let before = requests(&cluster, WRITES, Some(slot)).await;
        let killed_at = cluster.kill9(slot);
        let victim = slot;
        let mut new = None;
        while new.is_none() {
            assert!(
                killed_at.elapsed() < ELECTION_BOUND,
                "round {round}: no new leader"
            );
            for s in cluster.running() {
                if cluster.status(s).await.is_some_and(|st| st.is_leader) {
                    new = Some(s);
                }
            }
        }
        slot = new.expect("a leader");
        let name = cluster.node(slot).name.clone();
        wait_published(&env, &name, LABEL_BOUND).await;
        moved.push(killed_at.elapsed());
        // Status, Event and the two label patches have gone out by now or very soon.
        let deadline = Instant::now() + LABEL_BOUND;
        loop {
            let st = env.election(CLUSTER_ID).await.and_then(|l| l.status);
            if st
                .as_ref()
                .is_some_and(|s| s.leader.as_deref() == Some(name.as_str()))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: status never named {name}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The Event is the pass's last write: once it is out, so is the rest.
        wait_events(&env, round + 2, LABEL_BOUND).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = requests(&cluster, WRITES, Some(victim)).await;
        writes_per_change.push(after - before);
        cluster.restart(victim, true).await;
    }
    let record = watch.record();
    assert!(
        record.double_leaders.is_empty(),
        "a watch saw two role=leader pods: {:?}",
        record.double_leaders
    );
    assert!(
        record.moves as usize >= rounds,
        "the label moved {} times",
        record.moves
    );
    let worst = writes_per_change.iter().cloned().fold(0.0, f64::max);
    moved.sort();
    println!(
        "{rounds} failovers; kill -9 → labels moved (as polled) median {:?}, max {:?}; writes per leader change: max {worst}, all {writes_per_change:?}",
        moved[moved.len() / 2],
        moved[moved.len() - 1]
    );
    // Two pods change label (old leader demoted, new one promoted), plus the
    // status write and the Event.
    assert!(
        worst <= 4.0,
        "writes per leader change above pods changed + 2: {writes_per_change:?}"
    );
    let evs = events(&env).await;
    assert_eq!(evs.len(), rounds + 1, "one Event per leader change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_leader_woken_from_sigstop_never_overwrites_the_new_leader() {
    let Some(env) = KubeEnv::start("stale_leader").await else {
        return;
    };
    let mut cluster = start_cluster(&env, 3, &env.sidecar_kubeconfig.clone()).await;
    let watch = LeaderWatch::start(&env).await;
    for round in 0..3 {
        let old = wait_voters(&mut cluster, 3).await;
        let old_name = cluster.node(old).name.clone();
        wait_published(&env, &old_name, LABEL_BOUND).await;
        let pid = nix::unistd::Pid::from_raw(cluster.node(old).pid().expect("running") as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        let deadline = Instant::now() + ELECTION_BOUND;
        let new = loop {
            let mut found = None;
            for s in cluster.running() {
                if s != old && cluster.status(s).await.is_some_and(|st| st.is_leader) {
                    found = Some(s);
                }
            }
            if let Some(s) = found {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "round {round}: no new leader while the old one is stopped"
            );
        };
        let new_name = cluster.node(new).name.clone();
        wait_published(&env, &new_name, LABEL_BOUND).await;
        let term = env
            .election(CLUSTER_ID)
            .await
            .and_then(|l| l.status)
            .map(|s| s.term);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        // The woken leader's lease is long gone: it must not write anything.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let st = env
            .election(CLUSTER_ID)
            .await
            .and_then(|l| l.status)
            .expect("status");
        assert_eq!(
            st.leader.as_deref(),
            Some(new_name.as_str()),
            "round {round}"
        );
        assert!(
            Some(st.term) >= term,
            "round {round}: status went back in term"
        );
        let roles = env.roles().await;
        let leaders: Vec<_> = roles
            .iter()
            .filter(|r| r.1.as_deref() == Some("leader"))
            .collect();
        assert_eq!(leaders.len(), 1, "round {round}: {roles:?}");
        assert_eq!(leaders[0].0, new_name, "round {round}: {roles:?}");
    }
    let record = watch.record();
    assert!(
        record.double_leaders.is_empty(),
        "two leaders seen: {:?}",
        record.double_leaders
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_edited_labels_and_recreated_pods_are_repaired() {
    let Some(env) = KubeEnv::start("repair").await else {
        return;
    };
    let mut cluster = start_cluster(&env, 3, &env.sidecar_kubeconfig.clone()).await;
    let slot = cluster.wait_for_single_leader(ELECTION_BOUND).await;
    let leader = cluster.node(slot).name.clone();
    wait_published(&env, &leader, LABEL_BOUND).await;
    let follower = cluster.node((slot + 1) % 3).name.clone();
    let pods: Api<Pod> = Api::default_namespaced(env.admin.clone());
    let set = |role: &'static str| serde_json::json!({ "metadata": { "labels": { "raft-elector.io/role": role } } });
    // The leader's label edited away.
    pods.patch(
        &leader,
        &PatchParams::default(),
        &Patch::Merge(set("follower")),
    )
    .await
    .expect("edit");
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("leader label repaired in {took:?}");
    // A follower made leader by hand.
    pods.patch(
        &follower,
        &PatchParams::default(),
        &Patch::Merge(set("leader")),
    )
    .await
    .expect("edit");
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("false leader label repaired in {took:?}");
    // A label removed.
    let remove = serde_json::json!({ "metadata": { "labels": { "raft-elector.io/role": null } } });
    pods.patch(&follower, &PatchParams::default(), &Patch::Merge(remove))
        .await
        .expect("edit");
    wait_published(&env, &leader, LABEL_BOUND).await;
    // A pod recreated with its template labels.
    env.delete_pod(&follower).await;
    env.create_pod(&follower, CLUSTER_ID).await;
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("recreated pod labelled in {took:?}");
    // The leader's own pod recreated.
    env.delete_pod(&leader).await;
    env.create_pod(&leader, CLUSTER_ID).await;
    wait_published(&env, &leader, LABEL_BOUND).await;
    let deadline = Instant::now() + LABEL_BOUND;
    loop {
        let pod = pods.get(&leader).await.expect("leader pod");
        let st = env
            .election(CLUSTER_ID)
            .await
            .and_then(|l| l.status)
            .expect("status");
        if st.leader_uid == pod.metadata.uid {
            break;
        }
        assert!(Instant::now() < deadline, "status kept the old pod's UID");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        cluster.steady_leader().await,
        Some(slot),
        "repairs never touch the election"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_down_or_failing_leaves_the_election_alone_and_labels_catch_up() {
    let Some(env) = KubeEnv::start("api_faults").await else {
        return;
    };
    let Some(proxy) = FaultProxy::start(&env, "api_faults").await else {
        return;
    };
    let outage = Duration::from_secs(
        std::env::var("KUBE_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
    );
    let mut cluster = start_cluster(&env, 3, &proxy.kubeconfig.clone()).await;
    let mut slot = wait_voters(&mut cluster, 3).await;
    wait_published(&env, &cluster.node(slot).name.clone(), LABEL_BOUND).await;
    for mode in ["down", "error?code=500"] {
        let term_before = cluster.status(slot).await.expect("leader").term;
        proxy.set(mode).await;
        let started = Instant::now();
        // The election goes on unchanged: same leader, same term, for a while.
        tokio::time::sleep(outage / 2).await;
        assert_eq!(
            cluster.steady_leader().await,
            Some(slot),
            "{mode}: leader changed while the API failed"
        );
        assert_eq!(
            cluster.status(slot).await.expect("leader").term,
            term_before,
            "{mode}: term moved"
        );
        // And failover still works without the API.
        let killed = cluster.kill9(slot);
        let victim = slot;
        slot = cluster.wait_for_single_leader(ELECTION_BOUND).await;
        println!("{mode}: failover without the API in {:?}", killed.elapsed());
        cluster.restart(victim, true).await;
        let rest = outage.saturating_sub(started.elapsed());
        tokio::time::sleep(rest).await;
        let leader = cluster.wait_for_single_leader(ELECTION_BOUND).await;
        assert_eq!(
            leader, slot,
            "{mode}: leader changed again during the outage"
        );
        proxy.set("pass").await;
        let back = Instant::now();
        wait_published(
            &env,
            &cluster.node(slot).name.clone(),
            Duration::from_secs(2),
        )
        .await;
        println!(
            "{mode}: labels caught up {:?} after the API returned",
            back.elapsed()
        );
        // The error shows in metrics and, once the API is back, in the status.
        let (_, text) = cluster.get(slot, "/metrics").await.expect("metrics");
        assert!(
            text.contains("raft_elector_kube_publish_errors_total"),
            "errors counted"
        );
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let st = env
                .election(CLUSTER_ID)
                .await
                .and_then(|l| l.status)
                .expect("status");
            let cond = st
                .conditions
                .iter()
                .find(|c| c.type_ == "Published")
                .cloned();
            if st.leader.as_deref() == Some(cluster.node(slot).name.as_str())
                && cond.as_ref().is_some_and(|c| c.reason == "Recovered")
            {
                println!("{mode}: condition {:?}", cond.map(|c| c.message));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode}: no Recovered condition: {cond:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let stats = proxy.stats().await;
    println!("fault proxy: {stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_storms_and_dropped_watches_still_converge() {
    let Some(env) = KubeEnv::start("conflicts").await else {
        return;
    };
    let Some(proxy) = FaultProxy::start(&env, "conflicts").await else {
        return;
    };
    let mut cluster = start_cluster(&env, 3, &proxy.kubeconfig.clone()).await;
    let slot = cluster.wait_for_single_leader(ELECTION_BOUND).await;
    let leader = cluster.node(slot).name.clone();
    wait_published(&env, &leader, LABEL_BOUND).await;
    let pods: Api<Pod> = Api::default_namespaced(env.admin.clone());
    let follower = cluster.node((slot + 1) % 3).name.clone();
    // Every write answered 409 for 3 s: nothing converges, nothing breaks.
    proxy.set("conflict").await;
    let edit =
        serde_json::json!({ "metadata": { "labels": { "raft-elector.io/role": "leader" } } });
    pods.patch(&follower, &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.steady_leader().await, Some(slot));
    proxy.set("pass").await;
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("after a 409 storm, repaired in {took:?}");
    // Watches dropped every 300 ms: edits are still seen and repaired.
    proxy.set("dropwatch?after_ms=300").await;
    pods.patch(&follower, &PatchParams::default(), &Patch::Merge(&edit))
        .await
        .expect("edit");
    let took = wait_published(&env, &leader, LABEL_BOUND).await;
    println!("with dropped watches, repaired in {took:?}");
    proxy.set("pass").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leader_clears_its_own_label_and_hands_over() {
    let Some(env) = KubeEnv::start("sigterm").await else {
        return;
    };
    let mut cluster = start_cluster(&env, 3, &env.sidecar_kubeconfig.clone()).await;
    let watch = LeaderWatch::start(&env).await;
    let slot = wait_voters(&mut cluster, 3).await;
    let old = cluster.node(slot).name.clone();
    wait_published(&env, &old, LABEL_BOUND).await;
    cluster.sigterm(slot);
    cluster.wait_exit(slot, Duration::from_secs(15)).await;
    let new = cluster.wait_for_single_leader(ELECTION_BOUND).await;
    wait_published(&env, &cluster.node(new).name.clone(), LABEL_BOUND).await;
    let roles = env.roles().await;
    assert!(
        roles
            .iter()
            .any(|(n, r, _)| *n == old && r.as_deref() == Some("follower")),
        "{roles:?}"
    );
    assert!(watch.record().double_leaders.is_empty());
}
