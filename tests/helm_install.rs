//! `helm install` of the chart with its demo into the test bed, end to end,
//! with the real helm and kubectl (`scripts/install-kube-tools`): what a
//! platform engineer does on a real cluster, here on the bed of
//! `scripts/testbed` (control plane, CoreDNS, process kubelet).
//!
//! ```text
//!  helm install elector charts/raft-elector --set demo.enabled=true (namespace helm-demo)
//!    → 3 demo pods Ready (app + sidecar), one labelled raft-elector.io/role=leader, kubectl get le shows it
//!    → only the leader's app logs "singleton work unit N" (the kubelet keeps each container's log)
//!  helm upgrade (pod template changed)      → rolling update of 3: no two 200s, ≤ 1 handoff per replaced leader
//!  helm upgrade demo.replicas=5, then again with a template change → rolling update of 5, the same
//!  every helm upgrade                        → the peer Secret's data unchanged (the chart's lookup)
//!  helm uninstall                           → no namespaced object of the release left; the CRD stays
//! ```
//!
//! A sampler asks every pod's `/is-leader` every 5 ms throughout and a pod
//! watch checks the role labels; the leaderless time of each rolling update
//! is printed per replaced leader. Without root, iproute2, kubectl, helm or
//! Go (when the bed is not built) the test says what is missing and passes
//! without doing anything.

mod support;
mod testbed_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use testbed_support::{handoffs, term_of, Bed, BedNet, Group, Handoff, RoleWatch, Sampler, WAIT};
use tokio::time::Instant;

/// The release's namespace.
const NS: &str = "helm-demo";
/// The release name.
const RELEASE: &str = "elector";
/// The release's base name (release name plus chart name): the election
/// group, the LeaderElection and the object names derive from it.
const FULLNAME: &str = "elector-raft-elector";
/// This binary's own bridge, pod network and API port (the Deployment
/// test's bed uses retest, 10.244.7, 6447).
const NET: BedNet = BedNet {
    bridge: "rehelm",
    net: [10, 244, 8],
    api_port: 6448,
};
/// The leaderless time per replaced leader the issue targets (SIGTERM handoff).
const LEADERLESS_TARGET: Duration = Duration::from_millis(50);

fn demo_deployment() -> String {
    format!("deployment/{FULLNAME}-demo")
}

/// `helm install`/`upgrade` arguments that differ per step.
fn values(replicas: usize, work_interval: u32) -> Vec<String> {
    vec![
        "--set".into(),
        "demo.enabled=true".into(),
        "--set".into(),
        format!("demo.replicas={replicas}"),
        "--set".into(),
        format!("demo.workIntervalSeconds={work_interval}"),
    ]
}

/// Runs `helm verb RELEASE charts/raft-elector -n NS values...`.
async fn helm_release(bed: &Bed, verb: &str, extra: &[&str], values: &[String]) -> String {
    let mut args: Vec<&str> = vec![verb, RELEASE, "charts/raft-elector", "-n", NS];
    args.extend_from_slice(extra);
    args.extend(values.iter().map(String::as_str));
    bed.helm(&args).await
}

/// The peer Secret's data.
async fn peer_secret(bed: &Bed) -> String {
    let data = bed
        .kubectl(
            &[
                "get",
                "secret",
                "-n",
                NS,
                &format!("{FULLNAME}-peer-secret"),
                "-o",
                "jsonpath={.data}",
            ],
            None,
        )
        .await;
    assert!(data.len() > 10, "the peer Secret holds data: {data:?}");
    data
}

/// "singleton work unit" lines of every demo pod's app container, by pod.
fn work_units(bed: &Bed, pods: &[String]) -> BTreeMap<String, usize> {
    pods.iter()
        .map(|p| {
            let units = bed
                .container_log(NS, p, "app")
                .lines()
                .filter(|l| l.starts_with("singleton work unit"))
                .count();
            (p.clone(), units)
        })
        .collect()
}

/// Waits for one leader among `n` Ready pods, its labels and `kubectl get
/// le`; returns its name.
async fn settled(bed: &Bed, group: &Group, n: usize) -> String {
    let leader = bed.wait_one_leader(group, n, None).await;
    let (_, label_term) = bed.wait_labels(group, &leader).await;
    let term = term_of(bed, group, &leader).await;
    assert_eq!(label_term, term, "the leader's pod carries its term");
    bed.wait_le(NS, FULLNAME, &leader, term).await;
    leader
}

/// One rolling update's result.
struct Rollout {
    replicas: usize,
    took: Duration,
    moves: Vec<Handoff>,
}

impl Rollout {
    fn leaderless(&self) -> Duration {
        self.moves.iter().map(|h| h.leaderless_at_most).sum()
    }

    /// Prints the line of the summary table.
    fn report(&self) {
        let replaced = self.moves.len().max(1) as u32;
        println!(
            "  rolling update of {}: {:>6.2?}, {} leader handoffs, leaderless ≤ {:?} in total, ≤ {:?} per replaced leader (target ≤ {LEADERLESS_TARGET:?}); each: {}",
            self.replicas,
            self.took,
            self.moves.len(),
            self.leaderless(),
            self.leaderless() / replaced,
            self.moves
                .iter()
                .map(|h| format!(
                    "{}→{} {:.1?}..{:.1?}",
                    h.from, h.to, h.leaderless_at_least, h.leaderless_at_most
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

/// Runs a `helm upgrade` that changes the pod template and waits for the
/// rolling update; checks that every handoff leaves a replaced pod, no pod
/// leads twice and the peer secret is unchanged.
async fn rolling_upgrade(
    bed: &Bed,
    group: &Group,
    sampler: &Sampler,
    replicas: usize,
    work_interval: u32,
    secret: &str,
) -> (Rollout, (u64, u64)) {
    let before: BTreeSet<String> = bed.pods(group).await.into_iter().map(|p| p.name).collect();
    let from_us = sampler.now_us();
    let started = Instant::now();
    helm_release(bed, "upgrade", &[], &values(replicas, work_interval)).await;
    bed.kubectl(
        &[
            "rollout",
            "status",
            "-n",
            NS,
            &demo_deployment(),
            "--timeout=180s",
        ],
        None,
    )
    .await;
    let leader = settled(bed, group, replicas).await;
    let took = started.elapsed();
    let until_us = sampler.now_us();
    let after: BTreeSet<String> = bed.pods(group).await.into_iter().map(|p| p.name).collect();
    assert!(
        before.is_disjoint(&after),
        "the upgrade replaced every pod: before {before:?}, after {after:?}"
    );
    assert_eq!(
        peer_secret(bed).await,
        secret,
        "helm upgrade keeps the peer secret"
    );
    eprintln!("rolling update of {replicas} done in {took:?}; leader {leader}");
    (
        Rollout {
            replicas,
            took,
            moves: Vec::new(),
        },
        (from_us, until_us),
    )
}

/// Fills in a rollout's handoffs from the timeline and checks them.
fn check_handoffs(
    rollout: &mut Rollout,
    timeline: &support::cluster::Timeline,
    slots: &BTreeMap<String, usize>,
    window: (u64, u64),
    replaced: &BTreeSet<String>,
) {
    let moves = handoffs(timeline, slots, window.0, window.1);
    let mut led = BTreeSet::new();
    for h in &moves {
        assert!(
            replaced.contains(&h.from),
            "a handoff in the rolling update of {} left {}, which the update did not replace: {moves:?}",
            rollout.replicas,
            h.from
        );
        assert!(
            led.insert(h.from.clone()),
            "{} led twice in the rolling update of {}: {moves:?}",
            h.from,
            rollout.replicas
        );
    }
    rollout.moves = moves;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_upgrade_and_uninstall_of_the_demo_in_the_test_bed() {
    let Some(bed) = Bed::up(
        "helm_install_upgrade_and_uninstall_of_the_demo_in_the_test_bed",
        NET,
        true,
    )
    .await
    else {
        return;
    };
    let group = Group {
        ns: NS.into(),
        selector: format!("raft-elector.io/group={FULLNAME}"),
    };
    let watch = RoleWatch::start(&bed, &group).await;

    // helm install with the demo on → 3 pods Ready, one leader labelled,
    // kubectl get le shows it.
    let installed = Instant::now();
    helm_release(&bed, "install", &["--create-namespace"], &values(3, 1)).await;
    let sampler = Sampler::start(&bed, &group);
    let leader = bed.wait_one_leader(&group, 3, None).await;
    bed.wait_labels(&group, &leader).await;
    let to_labelled = installed.elapsed();
    let term = term_of(&bed, &group, &leader).await;
    let row = bed.wait_le(NS, FULLNAME, &leader, term).await;
    eprintln!(
        "helm install → leader {leader} labelled after {to_labelled:?}; kubectl get le: {row:?}"
    );

    // Only the leader's app does its singleton work.
    let names: Vec<String> = bed.pods(&group).await.into_iter().map(|p| p.name).collect();
    let at_start = work_units(&bed, &names);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let at_end = work_units(&bed, &names);
    assert_eq!(
        bed.wait_one_leader(&group, 3, None).await,
        leader,
        "the leader did not change while the apps were counted"
    );
    for name in &names {
        let done = at_end[name] - at_start[name];
        if *name == leader {
            assert!(
                done >= 2,
                "the leader's app did {done} units of singleton work in 4 s (logs: {at_end:?})"
            );
        } else {
            assert_eq!(
                at_end[name], 0,
                "the app of follower {name} did singleton work: {at_end:?}"
            );
        }
    }
    eprintln!("singleton work units per pod after 4 s more: {at_end:?} (leader {leader})");

    // helm upgrade changing the pod template: a rolling update of 3.
    let secret = peer_secret(&bed).await;
    let replaced3: BTreeSet<String> = names.iter().cloned().collect();
    let (mut roll3, w3) = rolling_upgrade(&bed, &group, &sampler, 3, 2, &secret).await;

    // Scale to 5 with helm, then a rolling update of 5.
    helm_release(&bed, "upgrade", &[], &values(5, 2)).await;
    settled(&bed, &group, 5).await;
    assert_eq!(
        peer_secret(&bed).await,
        secret,
        "helm upgrade keeps the peer secret"
    );
    let replaced5: BTreeSet<String> = bed.pods(&group).await.into_iter().map(|p| p.name).collect();
    let (mut roll5, w5) = rolling_upgrade(&bed, &group, &sampler, 5, 1, &secret).await;

    let (timeline, slots) = sampler.stop().await;
    let violations = timeline.violations();
    eprintln!(
        "sampled {} answers ({} of them 200) from {} pods; {} ambiguous overlaps (not provable)",
        timeline.samples.len(),
        timeline.leader_samples().count(),
        slots.len(),
        timeline.ambiguous_overlaps()
    );
    assert!(
        violations.is_empty(),
        "two pods answered 200 at once: {violations:?} (slots {slots:?})"
    );
    check_handoffs(&mut roll3, &timeline, &slots, w3, &replaced3);
    check_handoffs(&mut roll5, &timeline, &slots, w5, &replaced5);
    let record = watch.record();
    assert!(
        record.double_leaders.is_empty(),
        "a pod watch saw two raft-elector.io/role=leader pods: {:?}",
        record.double_leaders
    );
    drop(watch);

    // helm uninstall: nothing of the release is left in the namespace
    // (Events aside, and what Kubernetes itself puts in every namespace);
    // the CRD stays, by Helm's rule for crds/.
    let uninstalled = Instant::now();
    bed.helm(&["uninstall", RELEASE, "-n", NS, "--wait", "--timeout=120s"])
        .await;
    let kinds = bed
        .kubectl(
            &[
                "api-resources",
                "--verbs=list",
                "--namespaced",
                "-o",
                "name",
            ],
            None,
        )
        .await;
    let kinds: Vec<&str> = kinds
        .lines()
        .map(str::trim)
        .filter(|k| !k.is_empty() && *k != "events" && *k != "events.events.k8s.io")
        .collect();
    assert!(
        kinds.contains(&"leaderelections.raft-elector.io") && kinds.contains(&"secrets"),
        "api-resources lists the kinds to check: {kinds:?}"
    );
    let deadline = Instant::now() + WAIT;
    let left = loop {
        let out = bed
            .kubectl(
                &[
                    "get",
                    &kinds.join(","),
                    "-n",
                    NS,
                    "-o",
                    "name",
                    "--ignore-not-found",
                ],
                None,
            )
            .await;
        let left: Vec<String> = out
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && *l != "serviceaccount/default"
                    && *l != "configmap/kube-root-ca.crt"
            })
            .map(str::to_string)
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        left.is_empty(),
        "helm uninstall left these behind in {NS} after {WAIT:?}: {left:?}"
    );
    bed.kubectl(&["get", "crd", "leaderelections.raft-elector.io"], None)
        .await;
    eprintln!(
        "helm uninstall: namespace {NS} empty after {:?}",
        uninstalled.elapsed()
    );

    println!("helm install in the test bed ({} pods at most):", 5);
    println!(
        "  scripts/testbed build (this run's Go cache) {:>8.2?}",
        bed.build_took
    );
    println!(
        "  bed start → Node Ready                  {:>8.2?}  (target ≤ 10 s warm)",
        bed.up_took
    );
    println!(
        "  helm install → leader labelled          {:>8.2?}",
        to_labelled
    );
    roll3.report();
    roll5.report();
    bed.report_rss();
}
