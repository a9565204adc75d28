//! The sidecar as a Kubernetes Deployment in the test bed, publishing on:
//! the real control plane, CoreDNS and the process kubelet
//! (`scripts/testbed`), driven with the real kubectl, the sidecars running
//! with their unmodified in-cluster config (the pod's ServiceAccount token)
//! and exactly the Role of `manifests/base` (rendered from the chart).
//!
//! ```text
//!  test ──scripts/testbed up──► controlplane + coredns + kubelet (bridge retest, 10.244.7.0/24)
//!    │──kubectl apply -k (manifests/base in namespace elector): CRD, ServiceAccount, Role, headless Service
//!    │──kubectl apply──► peer Secret, Deployment ×3 (sidecar: --service raft-elector-peers, in-cluster config)
//!    │──DNS A/SRV──► coredns 10.244.7.1:53
//!    │──RoleWatch: watch on the pods ──► never two raft-elector.io/role=leader
//!    └──GET /is-leader every 5 ms──► every pod IP:4040 ──► Timeline: no two leaders at once
//! ```
//!
//! Then: `kubectl delete pod <leader>` (replacement pod, new leader, labels
//! move), `kubectl scale` 3 → 5 → 3 (one leader, labelled, after each),
//! `kubectl rollout restart` (completes; at most one handoff per replaced
//! leader; its leaderless time printed), and the bed's fault hooks: a killed
//! follower is restarted by the kubelet, a frozen or cut-off leader is
//! replaced and, back, does not lead too. After each step `kubectl get le`
//! shows the leader and its term. The sampler runs throughout and the
//! double-leader rule of `tests/support/cluster.rs` must find nothing.
//!
//! Needs root, iproute2, Go (or the bed's binaries already built) and the
//! real kubectl in `.tools/bin/` (`scripts/install-kube-tools`); without
//! them the test says what is missing and passes without doing anything.

mod support;
mod testbed_support;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;
use testbed_support::{
    dns_answers, handoffs, repo, term_of, Bed, BedNet, Group, RoleWatch, Sampler, MAX_BED_RSS_MB,
    PEER_PORT, WAIT,
};
use tokio::time::Instant;

/// Namespace of the test's objects.
const NS: &str = "elector";
/// Name of the Deployment and the pods' `app` label.
const APP: &str = "elector";
/// The election group of `manifests/base`: `--cluster-id`, the pods'
/// `raft-elector.io/group` label and the LeaderElection's name.
const GROUP: &str = "raft-elector";
/// The headless Service of `manifests/base`.
const PEERS: &str = "raft-elector-peers";
/// The test's own bridge, pod network and API port.
const NET: BedNet = BedNet {
    bridge: "retest",
    net: [10, 244, 7],
    api_port: 6447,
};

/// The Deployment: the sidecar as the chart renders it (in-cluster config,
/// the peer secret from a `secretKeyRef`, DNS discovery by the Service's
/// short name through the pod's search path), with faster discovery and
/// removal than the defaults so the scale steps stay short.
fn deployment() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {APP}
  namespace: {NS}
spec:
  replicas: 3
  selector:
    matchLabels:
      app: {APP}
  template:
    metadata:
      labels:
        app: {APP}
        raft-elector.io/group: {GROUP}
    spec:
      serviceAccountName: raft-elector
      terminationGracePeriodSeconds: 10
      containers:
        - name: raft-elector
          image: ghcr.io/raft-elector/raft-elector:dev
          args:
            - run
            - --service={PEERS}
            - --cluster-id={GROUP}
            - --bootstrap-expect=3
            - --state-dir=/var/lib/raft-elector
            - --dns-interval=500ms
            - --removal-grace=5s
          env:
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
            - name: POD_NAMESPACE
              valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
            - name: POD_IP
              valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
            - name: POD_UID
              valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}
            - name: RAFT_ELECTOR_SECRET
              valueFrom:
                secretKeyRef:
                  name: raft-elector-peer-secret
                  key: secret
          ports:
            - name: http
              containerPort: 4040
            - name: raft
              containerPort: {PEER_PORT}
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
            periodSeconds: 1
            failureThreshold: 1
          volumeMounts:
            - name: state
              mountPath: /var/lib/raft-elector
      volumes:
        - name: state
          emptyDir: {{}}
"#
    )
}

/// Writes a kustomization that puts `manifests/base` into [`NS`], as the
/// README tells a user to; returns its directory.
fn overlay(bed: &Bed) -> std::path::PathBuf {
    let dir = bed.path().join("overlay");
    std::fs::create_dir_all(&dir).expect("make the overlay directory");
    // Kustomize takes bases only below or beside the kustomization: link it.
    let base = dir.join("base");
    if !base.exists() {
        std::os::unix::fs::symlink(repo().join("manifests/base"), &base).expect("link the base");
    }
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {NS}\nresources:\n  - base\n"),
    )
    .expect("write the overlay");
    dir
}

/// Waits for one leader among `n` Ready pods, its labels and `kubectl get
/// le`; returns its name and how long the labels took after the leader was
/// seen.
async fn settled(bed: &Bed, group: &Group, n: usize, not: Option<&str>) -> (String, Duration) {
    let leader = bed.wait_one_leader(group, n, not).await;
    let (labelled, label_term) = bed.wait_labels(group, &leader).await;
    let term = term_of(bed, group, &leader).await;
    assert_eq!(
        label_term, term,
        "the leader's pod carries the term /is-leader reports"
    );
    let row = bed.wait_le(NS, GROUP, &leader, term).await;
    eprintln!("  leader {leader}, term {term}; kubectl get le: {row:?}");
    (leader, labelled)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_replica_deployment_elects_publishes_and_survives_delete_scale_rollout_and_faults()
{
    let Some(bed) = Bed::up(
        "a_three_replica_deployment_elects_publishes_and_survives_delete_scale_rollout_and_faults",
        NET,
        false,
    )
    .await
    else {
        return;
    };
    let group = Group {
        ns: NS.into(),
        selector: format!("raft-elector.io/group={GROUP}"),
    };

    // The namespace, the peer secret a user creates by hand, then
    // manifests/base: CRD, ServiceAccount, Role(Binding), headless Service.
    bed.kubectl(&["create", "namespace", NS], None).await;
    bed.kubectl(
        &[
            "create",
            "secret",
            "generic",
            "-n",
            NS,
            "raft-elector-peer-secret",
            "--from-literal=secret=testbed-peer-secret-0123456789abcdef",
        ],
        None,
    )
    .await;
    let overlay = overlay(&bed);
    bed.kubectl(&["apply", "-k", &overlay.to_string_lossy()], None)
        .await;
    bed.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd/leaderelections.raft-elector.io",
            "--timeout=30s",
        ],
        None,
    )
    .await;
    let watch = RoleWatch::start(&bed, &group).await;

    // Apply → 3 pods Running and Ready, each with its own IP.
    let applied = Instant::now();
    bed.kubectl(&["apply", "-f", "-"], Some(&deployment()))
        .await;
    let ready = bed.wait_ready(&group, 3).await;
    let to_ready = applied.elapsed();
    let ips: BTreeSet<Ipv4Addr> = ready.iter().filter_map(|p| p.ip).collect();
    assert_eq!(ips.len(), 3, "every pod has its own IP: {ready:?}");
    assert!(
        ips.iter().all(|ip| NET.holds(*ip)),
        "pod IPs come from the bed's 10.244.7.0/24: {ips:?}"
    );

    // CoreDNS answers A and SRV for the headless Service.
    let name = format!("{PEERS}.{NS}.svc.cluster.local.");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, srv) = dns_answers(NET.dns(), &name).await;
        if a == ips && srv.len() == 3 && srv.iter().all(|(_, port)| *port == PEER_PORT) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CoreDNS answers A {a:?} and SRV {srv:?}; want the pod IPs {ips:?} and 3 SRV records on port {PEER_PORT}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // One leader; its pod labelled leader, the others follower; the
    // LeaderElection shows it.
    let sampler = Sampler::start(&bed, &group);
    let (first, _) = settled(&bed, &group, 3, None).await;
    let to_labelled = applied.elapsed();
    eprintln!("leader {first} elected and labelled {to_labelled:?} after apply");

    // Delete the leader's pod: a replacement pod, a new leader, labels move.
    let deleted_at = Instant::now();
    bed.kubectl(&["delete", "pod", "-n", NS, &first, "--wait=false"], None)
        .await;
    let (second, _) = settled(&bed, &group, 3, Some(&first)).await;
    let after_delete = bed.pods(&group).await;
    assert!(
        after_delete.iter().all(|p| p.name != first),
        "the deleted leader's pod is gone: {after_delete:?}"
    );
    eprintln!(
        "leader pod {first} deleted: new leader {second} labelled, replacement pod Ready, after {:?}",
        deleted_at.elapsed()
    );

    // Scale 3 → 5 → 3.
    let deployment = format!("deployment/{APP}");
    bed.kubectl(&["scale", "-n", NS, &deployment, "--replicas=5"], None)
        .await;
    let (at5, _) = settled(&bed, &group, 5, None).await;
    bed.kubectl(&["scale", "-n", NS, &deployment, "--replicas=3"], None)
        .await;
    let (at3, _) = settled(&bed, &group, 3, None).await;
    eprintln!("scaled 3 → 5 (leader {at5}) → 3 (leader {at3})");

    // Rolling restart: completes, at most one handoff per replaced leader.
    let rollout_started = Instant::now();
    let rollout_from = sampler.now_us();
    let before: BTreeSet<String> = bed.pods(&group).await.into_iter().map(|p| p.name).collect();
    bed.kubectl(&["rollout", "restart", "-n", NS, &deployment], None)
        .await;
    bed.kubectl(
        &["rollout", "status", "-n", NS, &deployment, "--timeout=180s"],
        None,
    )
    .await;
    let (after_rollout, _) = settled(&bed, &group, 3, None).await;
    let rollout_until = sampler.now_us();
    let after: BTreeSet<String> = bed.pods(&group).await.into_iter().map(|p| p.name).collect();
    assert!(
        before.is_disjoint(&after),
        "the rollout replaced every pod: before {before:?}, after {after:?}"
    );
    eprintln!(
        "rollout restart done in {:?}; leader {after_rollout}",
        rollout_started.elapsed()
    );

    // Fault hooks. Kill a follower's processes: the kubelet restarts it.
    let follower = bed
        .pods(&group)
        .await
        .into_iter()
        .find(|p| p.name != after_rollout)
        .expect("a follower pod")
        .name;
    bed.hook(&["kill", &follower, NS]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let restarted = bed
            .pods(&group)
            .await
            .iter()
            .any(|p| p.name == follower && p.restarts >= 1);
        if restarted {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the kubelet did not restart {follower} after scripts/testbed kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (leader, _) = settled(&bed, &group, 3, None).await;
    eprintln!("killed follower {follower}: restarted by the kubelet, leader {leader}");

    // Freeze the leader: another pod leads and is labelled; thawed, the old
    // leader does not lead too.
    bed.hook(&["freeze", &leader, NS]).await;
    let during_freeze = bed.wait_leader_other_than(&group, &leader).await;
    bed.wait_labels(&group, &during_freeze).await;
    bed.hook(&["thaw", &leader, NS]).await;
    let (after_thaw, _) = settled(&bed, &group, 3, None).await;
    eprintln!("froze leader {leader}: {during_freeze} led; thawed: leader {after_thaw}");

    // Cut the leader's link: another pod leads and is labelled; healed, one leader.
    bed.hook(&["cut", &after_thaw, NS]).await;
    let during_cut = bed.wait_leader_other_than(&group, &after_thaw).await;
    bed.wait_labels(&group, &during_cut).await;
    bed.hook(&["heal", &after_thaw, NS]).await;
    let (after_heal, _) = settled(&bed, &group, 3, None).await;
    eprintln!("cut leader {after_thaw}: {during_cut} led; healed: leader {after_heal}");

    let (timeline, slots) = sampler.stop().await;
    let violations = timeline.violations();
    let leader_samples = timeline.leader_samples().count();
    eprintln!(
        "sampled {} answers ({} of them 200) from {} pods; {} ambiguous overlaps (not provable)",
        timeline.samples.len(),
        leader_samples,
        slots.len(),
        timeline.ambiguous_overlaps()
    );
    assert!(
        violations.is_empty(),
        "two pods answered 200 at once: {violations:?} (slots {slots:?})"
    );
    assert!(leader_samples > 0, "the sampler saw a leader");

    // The rollout: every handoff leaves a pod the rollout replaced, and no
    // pod leads twice.
    let moves = handoffs(&timeline, &slots, rollout_from, rollout_until);
    let mut led = BTreeSet::new();
    for h in &moves {
        assert!(
            before.contains(&h.from),
            "a handoff during the rollout left {}, which the rollout did not replace: {moves:?}",
            h.from
        );
        assert!(
            led.insert(h.from.clone()),
            "{} led twice: {moves:?}",
            h.from
        );
    }
    let leaderless: Duration = moves.iter().map(|h| h.leaderless_at_most).sum();

    let record = watch.record();
    eprintln!(
        "pod watch: {} events, the leader label moved {} times, {} snapshots with two leaders",
        record.events,
        record.moves,
        record.double_leaders.len()
    );
    assert!(
        record.double_leaders.is_empty(),
        "a pod watch saw two raft-elector.io/role=leader pods: {:?}",
        record.double_leaders
    );
    assert!(
        record.moves >= 4,
        "the watch saw the label move on the delete, the freeze and the cut: {record:?}"
    );

    println!("test bed numbers (Deployment, publishing on):");
    println!(
        "  scripts/testbed build (this run's Go cache) {:>8.2?}",
        bed.build_took
    );
    println!(
        "  bed start → Node Ready                  {:>8.2?}  (target ≤ 10 s warm)",
        bed.up_took
    );
    println!(
        "  Deployment applied → 3 pods Ready       {:>8.2?}  (target ≤ 5 s)",
        to_ready
    );
    println!(
        "  Deployment applied → leader labelled    {:>8.2?}",
        to_labelled
    );
    println!(
        "  rollout restart of 3: {} handoffs, leaderless ≤ {:?} in total ({:?})",
        moves.len(),
        leaderless,
        moves
            .iter()
            .map(|h| format!(
                "{}→{} {:?}..{:?}",
                h.from, h.to, h.leaderless_at_least, h.leaderless_at_most
            ))
            .collect::<Vec<_>>()
    );
    let bed_rss = bed.report_rss();
    assert!(
        bed_rss <= MAX_BED_RSS_MB,
        "the bed uses {bed_rss} MB RSS, more than {MAX_BED_RSS_MB} MB"
    );
}
