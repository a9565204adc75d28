//! A real Kubernetes API server for the publisher's end-to-end tests.
//!
//! ```text
//!  KubeEnv ──spawn──► testbed/bin/controlplane --components=apiserver (etcd + kube-apiserver, RBAC)
//!     │                   ▲ admin kubeconfig: CRD, namespace, Role, pods, assertions
//!     │                   │
//!     ├── namespace rek-<n>, ServiceAccount raft-elector bound by ROLE_RULES
//!     │     └── token (TokenRequest) → sidecar kubeconfig (namespace = the test's)
//!     └── FaultProxy (testbed/bin/faultproxy) between the sidecars and the API server
//! ```
//!
//! With `E2E_KUBECONFIG=<file>` the same tests run against that cluster
//! instead (its current context must be allowed to create namespaces, CRDs,
//! Roles and pods); tests that need the fault proxy skip there, because the
//! proxy needs the test bed's CA key. Without Go and without a built
//! control plane every test skips with a message saying how to run it.

#![allow(dead_code)]

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use raft_elector::kube::crd::{LeaderElection, GROUP_LABEL, ROLE_LABEL, TERM_ANNOTATION};
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The CRD as committed.
pub const CRD_FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/leaderelections.raft-elector.io.yaml"
);
/// Name of the sidecars' ServiceAccount, Role and RoleBinding.
pub const SERVICE_ACCOUNT: &str = "raft-elector";
/// How long the control plane may take to be ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// The Role the chart ships: exactly the requests the sidecar makes
/// (the README's Kubernetes section lists them one by one).
pub fn role_rules() -> Vec<PolicyRule> {
    let rule = |group: &str, resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(vec![resource.to_string()]),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    };
    vec![
        rule("", "pods", &["get", "list", "watch", "patch"]),
        rule(
            "raft-elector.io",
            "leaderelections",
            &["get", "list", "watch", "create"],
        ),
        rule("raft-elector.io", "leaderelections/status", &["update"]),
        rule("", "events", &["create"]),
    ]
}

/// Returns the repository's `testbed/bin/<name>`.
pub fn testbed_bin(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testbed/bin")
        .join(name)
}

/// Makes sure the test bed binaries exist, building them when Go is there.
/// Returns why not otherwise.
fn ensure_testbed() -> Result<(), String> {
    if testbed_bin("controlplane").exists() && testbed_bin("faultproxy").exists() {
        return Ok(());
    }
    let go = Command::new("go").arg("version").output();
    if !go.is_ok_and(|o| o.status.success()) {
        return Err("Go is not installed and testbed/bin/controlplane is not built: install Go >= 1.25 and run scripts/testbed-controlplane-build, or set E2E_KUBECONFIG to a cluster".into());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testbed-controlplane-build");
    let status = Command::new(&script)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} failed ({status})", script.display()));
    }
    Ok(())
}

/// A `controlplane` process, stopped on drop.
pub struct ControlPlane {
    child: Child,
    /// Its data directory (kubeconfig, CA, logs).
    pub dir: PathBuf,
}

impl ControlPlane {
    /// Starts it from the calling (runtime worker) thread: the child dies
    /// with the thread that spawned it, so never from a blocking-pool thread.
    async fn start(dir: &Path) -> ControlPlane {
        let log = std::fs::File::create(dir.join("controlplane.stdout")).expect("create the log");
        let mut cmd = Command::new(testbed_bin("controlplane"));
        cmd.arg("--dir")
            .arg(dir.join("cp"))
            .args(["--components=apiserver", "--etcd-unsafe-no-fsync"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log);
        // SAFETY: prctl is async-signal-safe; the control plane dies with
        // the test thread that started it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start testbed/bin/controlplane");
        let cp = ControlPlane {
            child,
            dir: dir.join("cp"),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        while !cp.dir.join("ready").exists() {
            if Instant::now() > deadline {
                let out =
                    std::fs::read_to_string(dir.join("controlplane.stdout")).unwrap_or_default();
                panic!("control plane not ready after {READY_TIMEOUT:?}:\n{out}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cp
    }

    /// Returns the admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's Kubernetes: a cluster, a fresh namespace with the sidecars'
/// ServiceAccount and Role, and a kubeconfig that authenticates as it.
pub struct KubeEnv {
    /// The test bed, when the tests started one.
    pub control_plane: Option<ControlPlane>,
    /// Admin client (namespace = the test's).
    pub admin: Client,
    /// The test's namespace.
    pub namespace: String,
    /// Kubeconfig of the sidecars' ServiceAccount.
    pub sidecar_kubeconfig: PathBuf,
    /// Temporary files.
    pub dir: tempfile::TempDir,
    server: String,
    ca_data: Option<String>,
    token: String,
}

static NAMESPACES: AtomicU32 = AtomicU32::new(0);

impl KubeEnv {
    /// Starts (or connects to) a cluster and prepares a namespace. Returns
    /// `None`, after saying why, when the test has to skip.
    pub async fn start(test: &str) -> Option<KubeEnv> {
        let dir = tempfile::Builder::new()
            .prefix("raft-elector-kube-")
            .tempdir()
            .expect("create a temporary directory");
        let (control_plane, admin_path) = match std::env::var_os("E2E_KUBECONFIG") {
            Some(path) => (None, PathBuf::from(path)),
            None => {
                if let Err(why) = ensure_testbed() {
                    eprintln!("SKIP {test}: {why}");
                    return None;
                }
                let cp = ControlPlane::start(dir.path()).await;
                let path = cp.kubeconfig();
                (Some(cp), path)
            }
        };
        let kubeconfig = Kubeconfig::read_from(&admin_path).expect("read the admin kubeconfig");
        let cluster = kubeconfig
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .expect("a cluster in the admin kubeconfig");
        let server = cluster.server.clone().expect("a server URL");
        let ca_data = cluster.certificate_authority_data.clone();
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("admin kubeconfig usable");
        let base = Client::try_from(config.clone()).expect("admin client");
        let namespace = format!(
            "rek-{}-{}-{}",
            std::process::id(),
            NAMESPACES.fetch_add(1, Ordering::Relaxed),
            test.replace('_', "-").chars().take(30).collect::<String>()
        )
        .trim_end_matches('-')
        .to_string();
        install_crd(&base).await;
        let nss: Api<Namespace> = Api::all(base.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": namespace }
        }))
        .expect("namespace object");
        nss.create(&PostParams::default(), &ns)
            .await
            .expect("create the test namespace");
        let mut config = config;
        config.default_namespace = namespace.clone();
        let admin = Client::try_from(config).expect("admin client");
        warm_up(&admin).await;
        let token = grant_sidecar_role(&admin, &namespace).await;
        let env = KubeEnv {
            control_plane,
            admin,
            namespace,
            sidecar_kubeconfig: dir.path().join("sidecar.kubeconfig"),
            dir,
            server,
            ca_data,
            token,
        };
        env.write_kubeconfig(&env.sidecar_kubeconfig, &env.server.clone());
        Some(env)
    }

    /// Writes a kubeconfig for the sidecars' ServiceAccount pointing at `server`.
    pub fn write_kubeconfig(&self, path: &Path, server: &str) {
        let ca = match &self.ca_data {
            Some(data) => format!("    certificate-authority-data: {data}\n"),
            None => "    insecure-skip-tls-verify: true\n".to_string(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n{ca}contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n    namespace: {ns}\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: {token}\n",
            ns = self.namespace,
            token = self.token
        );
        std::fs::write(path, text).expect("write the sidecar kubeconfig");
    }

    /// Flags that make a sidecar publish to this environment.
    pub fn sidecar_args(&self, kubeconfig: &Path) -> Vec<String> {
        vec!["--kubeconfig".into(), kubeconfig.display().to_string()]
    }

    /// Creates one Pending member pod per name (no kubelet runs them; labels
    /// and annotations are all the publisher needs).
    pub async fn create_pods(&self, names: &[String], group: &str) {
        for name in names {
            self.create_pod(name, group).await;
        }
    }

    /// Creates one member pod with the group label only (template labels).
    pub async fn create_pod(&self, name: &str, group: &str) -> Pod {
        let pods: Api<Pod> = Api::default_namespaced(self.admin.clone());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "labels": { GROUP_LABEL: group } },
            "spec": { "containers": [ { "name": "app", "image": "example.invalid/app:1" } ] }
        }))
        .expect("pod object");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("create a member pod")
    }

    /// Deletes a pod at once.
    pub async fn delete_pod(&self, name: &str) {
        let pods: Api<Pod> = Api::default_namespaced(self.admin.clone());
        pods.delete(name, &DeleteParams::default().grace_period(0))
            .await
            .expect("delete the pod");
    }

    /// Removes a pod's role label (as a person or a restarted pod would).
    pub async fn clear_role(&self, name: &str) {
        let pods: Api<Pod> = Api::default_namespaced(self.admin.clone());
        let patch = serde_json::json!({ "metadata": { "labels": { ROLE_LABEL: null } } });
        pods.patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("clear the role label");
    }

    /// Returns (name, role label, term annotation) of every pod.
    pub async fn roles(&self) -> Vec<(String, Option<String>, Option<u64>)> {
        let pods: Api<Pod> = Api::default_namespaced(self.admin.clone());
        let list = pods.list(&ListParams::default()).await.expect("list pods");
        list.items
            .iter()
            .map(|p| {
                let m = &p.metadata;
                (
                    m.name.clone().unwrap_or_default(),
                    m.labels.as_ref().and_then(|l| l.get(ROLE_LABEL).cloned()),
                    m.annotations
                        .as_ref()
                        .and_then(|a| a.get(TERM_ANNOTATION))
                        .and_then(|t| t.parse().ok()),
                )
            })
            .collect()
    }

    /// Returns the names of the pods labelled `leader`.
    pub async fn leader_pods(&self) -> Vec<String> {
        self.roles()
            .await
            .into_iter()
            .filter(|(_, role, _)| role.as_deref() == Some("leader"))
            .map(|(n, _, _)| n)
            .collect()
    }

    /// Returns the group's LeaderElection, if it exists.
    pub async fn election(&self, name: &str) -> Option<LeaderElection> {
        let les: Api<LeaderElection> = Api::default_namespaced(self.admin.clone());
        les.get_opt(name).await.expect("get the LeaderElection")
    }

    /// Waits until `pred` holds on the pods' roles; panics with them after `timeout`.
    pub async fn wait_roles(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&[(String, Option<String>, Option<u64>)]) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let roles = self.roles().await;
            if pred(&roles) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < timeout,
                "{what}: not within {timeout:?}; pods: {roles:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Applies the committed CRD (cluster-wide; once per cluster is enough).
async fn install_crd(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let text = std::fs::read_to_string(CRD_FILE).expect("read crds/");
    let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("the CRD parses");
    let name = crd.metadata.name.clone().expect("named");
    match crds.create(&PostParams::default(), &crd).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("cannot install the CRD: {e}"),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = crds.get(&name).await.expect("get the CRD");
        let established = c
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return;
        }
        assert!(Instant::now() < deadline, "CRD not established");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Creates and deletes one LeaderElection: a fresh API server builds a new
/// CRD's handlers (schema, CEL rules) on first use, which can take seconds
/// on a loaded machine; a real cluster has long done that.
async fn warm_up(admin: &Client) {
    let les: Api<LeaderElection> = Api::default_namespaced(admin.clone());
    let le: LeaderElection = serde_json::from_value(serde_json::json!({
        "apiVersion": "raft-elector.io/v1alpha1", "kind": "LeaderElection",
        "metadata": { "name": "warm-up" }, "spec": {}
    }))
    .expect("object");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match les.create(&PostParams::default(), &le).await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "LeaderElection API not served: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    les.delete("warm-up", &DeleteParams::default())
        .await
        .expect("delete the warm-up LeaderElection");
}

/// Creates the sidecars' ServiceAccount, the Role and its binding, and
/// returns a token of the ServiceAccount.
async fn grant_sidecar_role(admin: &Client, namespace: &str) -> String {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
        "metadata": { "name": SERVICE_ACCOUNT }
    }))
    .expect("service account");
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create the ServiceAccount");
    let roles: Api<Role> = Api::namespaced(admin.clone(), namespace);
    let role = Role {
        metadata: kube::api::ObjectMeta {
            name: Some(SERVICE_ACCOUNT.into()),
            ..Default::default()
        },
        rules: Some(role_rules()),
    };
    roles
        .create(&PostParams::default(), &role)
        .await
        .expect("create the Role");
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), namespace);
    let binding = RoleBinding {
        metadata: kube::api::ObjectMeta {
            name: Some(SERVICE_ACCOUNT.into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: SERVICE_ACCOUNT.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: SERVICE_ACCOUNT.into(),
            namespace: Some(namespace.into()),
            ..Default::default()
        }]),
    };
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("create the RoleBinding");
    let request = serde_json::json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": { "expirationSeconds": 7200 }
    });
    let token: TokenRequest = sas
        .create_subresource("token", SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .expect("TokenRequest for the sidecars' ServiceAccount");
    token.status.expect("a token").token
}

/// The test bed's fault-injecting proxy in front of the API server.
pub struct FaultProxy {
    child: Child,
    /// Kubeconfig of the sidecars' ServiceAccount through the proxy.
    pub kubeconfig: PathBuf,
    control: String,
    http: reqwest::Client,
}

impl FaultProxy {
    /// Starts the proxy for `env`; `None` (after saying why) under
    /// `E2E_KUBECONFIG`, where there is no CA key to mint its certificate.
    pub async fn start(env: &KubeEnv, test: &str) -> Option<FaultProxy> {
        FaultProxy::start_for(env, test, &env.sidecar_kubeconfig, "proxy").await
    }

    /// Starts a proxy that forwards with the credentials of `upstream`
    /// (e.g. the admin kubeconfig for the lease baseline).
    pub async fn start_for(
        env: &KubeEnv,
        test: &str,
        upstream: &Path,
        tag: &str,
    ) -> Option<FaultProxy> {
        let Some(cp) = &env.control_plane else {
            eprintln!(
                "SKIP {test}: the fault proxy needs the test bed's CA (unset E2E_KUBECONFIG)"
            );
            return None;
        };
        let out = env.dir.path().join(format!("{tag}.kubeconfig"));
        let info = env.dir.path().join(format!("{tag}.json"));
        let log = std::fs::File::create(env.dir.path().join(format!("{tag}.log"))).expect("log");
        let mut cmd = Command::new(testbed_bin("faultproxy"));
        cmd.arg("--dir")
            .arg(&cp.dir)
            .arg("--upstream-kubeconfig")
            .arg(upstream)
            .arg("--kubeconfig-out")
            .arg(&out)
            .arg("--info-out")
            .arg(&info)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone"))
            .stderr(log);
        // SAFETY: as for the control plane.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start testbed/bin/faultproxy");
        let deadline = Instant::now() + Duration::from_secs(20);
        let control = loop {
            if let Ok(text) = std::fs::read_to_string(&info) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
                    if let Some(c) = v["control"].as_str() {
                        break c.to_string();
                    }
                }
            }
            assert!(Instant::now() < deadline, "fault proxy did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Some(FaultProxy {
            child,
            kubeconfig: out,
            control,
            http: reqwest::Client::new(),
        })
    }

    /// Switches the proxy's mode (`pass`, `down`, `error?code=500`, ...).
    pub async fn set(&self, mode: &str) {
        let url = format!("{}/{mode}", self.control);
        let resp = self
            .http
            .post(&url)
            .send()
            .await
            .expect("fault proxy control");
        assert!(resp.status().is_success(), "{url}: {}", resp.status());
    }

    /// Returns the proxy's counters.
    pub async fn stats(&self) -> serde_json::Value {
        let url = format!("{}/stats", self.control);
        self.http
            .get(&url)
            .send()
            .await
            .expect("fault proxy stats")
            .json()
            .await
            .expect("stats JSON")
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Watches the member pods and records every moment at which two or more of
/// them carried `role=leader` in the watch's own event order.
pub struct LeaderWatch {
    task: tokio::task::JoinHandle<()>,
    state: std::sync::Arc<std::sync::Mutex<WatchRecord>>,
}

/// What a [`LeaderWatch`] saw.
#[derive(Debug, Default, Clone)]
pub struct WatchRecord {
    /// Events seen.
    pub events: u64,
    /// Times a leader label moved to another pod.
    pub moves: u64,
    /// Snapshots with two or more leaders (pod names), in order.
    pub double_leaders: Vec<Vec<String>>,
    /// The current leader pods.
    pub leaders: std::collections::BTreeSet<String>,
    /// When each pod last became `leader`, by name.
    pub became_leader: std::collections::BTreeMap<String, Instant>,
}

impl LeaderWatch {
    /// Starts watching the namespace's pods.
    pub async fn start(env: &KubeEnv) -> LeaderWatch {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let pods: Api<Pod> = Api::default_namespaced(env.admin.clone());
        let state = std::sync::Arc::new(std::sync::Mutex::new(WatchRecord::default()));
        let shared = state.clone();
        let ready = std::sync::Arc::new(tokio::sync::Notify::new());
        let ready2 = ready.clone();
        let task = tokio::spawn(async move {
            let mut roles: std::collections::BTreeMap<String, bool> = Default::default();
            let stream = watcher(pods, watcher::Config::default());
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                let Ok(ev) = ev else { continue };
                let mut apply = |p: &Pod, gone: bool| {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let lead = !gone
                        && p.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(ROLE_LABEL))
                            .is_some_and(|r| r == "leader");
                    roles.insert(name, lead);
                };
                let mut done = false;
                match &ev {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => apply(p, false),
                    watcher::Event::Delete(p) => apply(p, true),
                    watcher::Event::InitDone => done = true,
                    watcher::Event::Init => {}
                }
                let leaders: std::collections::BTreeSet<String> = roles
                    .iter()
                    .filter(|(_, l)| **l)
                    .map(|(n, _)| n.clone())
                    .collect();
                let mut s = shared.lock().expect("watch record");
                s.events += 1;
                if leaders.len() > 1 {
                    s.double_leaders.push(leaders.iter().cloned().collect());
                }
                for new in leaders.difference(&s.leaders.clone()) {
                    s.moves += 1;
                    s.became_leader.insert(new.clone(), Instant::now());
                }
                s.leaders = leaders;
                drop(s);
                if done {
                    ready2.notify_one();
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), ready.notified()).await;
        LeaderWatch { task, state }
    }

    /// Returns what was seen so far.
    pub fn record(&self) -> WatchRecord {
        self.state.lock().expect("watch record").clone()
    }
}

impl Drop for LeaderWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads `raft_elector_kube_requests_total` of the given verbs from a
/// /metrics text.
pub fn kube_requests(metrics: &str, verbs: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("raft_elector_kube_requests_total{"))
        .filter(|l| verbs.iter().any(|v| l.contains(&format!("verb=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Reads the lines of a child's stdout as they come (for the lease baseline).
pub fn lines_of(child: &mut Child) -> std::sync::mpsc::Receiver<(Instant, String)> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
    }
    rx
}
