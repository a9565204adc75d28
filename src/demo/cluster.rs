//! The demo's node processes: the same binary run as `raft-elector run` N
//! times on 127.0.0.1, and the faults done to them with signals, on a
//! schedule (frozen and killed nodes come back after [`FAULT_LENGTH`]).
//!
//! ```text
//!  Cluster ──NodeCommand──► Launcher (launch.rs) ──fork/exec──► raft-elector run --id node-i ...
//!     │                                                            (own process group,
//!     └── kill -9 / SIGSTOP+SIGCONT / SIGTERM, restart ◄─────────── dies with the launcher)
//! ```
//!
//! Starting, signalling and reaping processes is [`super::launch`], shared
//! with the integration tests; this module adds the demo's plan (names and
//! ports from `--base-port`) and the life cycle of a fault.
//! [`Cluster`]'s `Drop` kills and reaps every node on every ordinary exit
//! path, panics included.

use super::launch::{LaunchError, Launcher, NodeCommand, Peers, Process};
use super::timeline::{Event, FaultKind};
use crate::cli::DemoConfig;
use nix::sys::signal::Signal;
use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::time::Instant;

/// How long a killed or stopped node stays down, and a frozen node frozen.
pub const FAULT_LENGTH: Duration = Duration::from_secs(2);
/// How long a node may take to exit after `SIGTERM` before it gets `kill -9`.
pub const HANDOFF_GRACE: Duration = Duration::from_secs(5);
/// Name of the demo's election group.
pub const CLUSTER_ID: &str = "demo";

/// Where one node listens and keeps its files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Member name, `node-<i>` counting from 1.
    pub name: String,
    /// Port of its `/is-leader` API on 127.0.0.1.
    pub http_port: u16,
    /// Port of its Raft listener on 127.0.0.1.
    pub peer_port: u16,
}

impl NodeSpec {
    /// Returns the peer address others reach it at.
    pub fn peer_address(&self) -> String {
        format!("127.0.0.1:{}", self.peer_port)
    }

    /// Returns the URL of its `/is-leader`.
    pub fn is_leader_url(&self) -> String {
        format!("http://127.0.0.1:{}/is-leader", self.http_port)
    }
}

/// Lays out the nodes of `config`: `node-1` .. `node-N` on its ports.
pub fn plan(config: &DemoConfig) -> Vec<NodeSpec> {
    (0..config.nodes)
        .map(|i| NodeSpec {
            name: format!("node-{}", i + 1),
            http_port: config.http_port(i),
            peer_port: config.peer_port(i),
        })
        .collect()
}

/// Returns how node `index` of `specs` is started: binary `exe`, state and
/// log under `workdir`, the timing of `config`, every node as a static peer.
pub fn node_command(
    config: &DemoConfig,
    specs: &[NodeSpec],
    index: usize,
    exe: &Path,
    workdir: &Path,
    secret: &str,
) -> NodeCommand {
    let spec = &specs[index];
    let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let micros = |d: Duration| format!("{}us", d.as_micros());
    let raft = &config.raft;
    let timing = [
        "--election-timeout-min".to_string(),
        micros(raft.election_timeout_min),
        "--election-timeout-max".into(),
        micros(raft.election_timeout_max),
        "--heartbeat-interval".into(),
        micros(raft.heartbeat_interval),
        "--max-clock-drift".into(),
        raft.max_clock_drift.to_string(),
        "--max-voters".into(),
        raft.max_voters.to_string(),
    ];
    NodeCommand {
        binary: exe.to_path_buf(),
        netns: None,
        name: spec.name.clone(),
        http: local(spec.http_port),
        peer: local(spec.peer_port),
        advertise: local(spec.peer_port),
        peers: Peers::Static(specs.iter().map(NodeSpec::peer_address).collect()),
        bootstrap_expect: Some(specs.len()),
        cluster_id: CLUSTER_ID.into(),
        secret: secret.to_string(),
        state_dir: workdir.join(&spec.name),
        extra_args: timing.into_iter().map(OsString::from).collect(),
    }
}

/// What a node process is going through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Life {
    /// Running normally.
    Running,
    /// Stopped with `SIGSTOP`; gets `SIGCONT` at `thaw_at`.
    Frozen {
        /// When it was frozen.
        since: Instant,
        /// When it will be thawed.
        thaw_at: Instant,
    },
    /// Killed with `kill -9`; restarted at `restart_at`.
    Killed {
        /// When it will be started again.
        restart_at: Instant,
    },
    /// Sent `SIGTERM`; restarted at `restart_at` once it has exited, killed
    /// at `kill_at` if it has not.
    Stopping {
        /// When it will be started again.
        restart_at: Instant,
        /// When it gets `kill -9` if still running.
        kill_at: Instant,
    },
    /// Ended without being asked to; not restarted (it would likely fail again).
    Exited,
}

/// One node process.
#[derive(Debug)]
struct Node {
    spec: NodeSpec,
    command: NodeCommand,
    process: Option<Process>,
    life: Life,
}

/// The running nodes. Dropping it kills and reaps every node.
#[derive(Debug)]
pub struct Cluster {
    nodes: Vec<Node>,
    workdir: PathBuf,
    // Declared after `nodes`: the launcher thread is joined after the kills.
    launcher: Launcher,
}

impl Cluster {
    /// Starts nodes `specs` of `config` as `<exe> run ...` with logs and
    /// state under `workdir`, and returns the cluster with one
    /// [`Event::Started`] per node. Nodes started before a failure are
    /// killed again when the error returns.
    pub async fn start(
        config: &DemoConfig,
        specs: &[NodeSpec],
        exe: &Path,
        workdir: PathBuf,
        secret: &str,
    ) -> Result<(Cluster, Vec<Event>), LaunchError> {
        let mut cluster = Cluster {
            nodes: (0..specs.len())
                .map(|index| Node {
                    spec: specs[index].clone(),
                    command: node_command(config, specs, index, exe, &workdir, secret),
                    process: None,
                    life: Life::Running,
                })
                .collect(),
            workdir,
            launcher: Launcher::new()?,
        };
        let mut events = Vec::new();
        for index in 0..cluster.nodes.len() {
            let process = cluster.spawn(index).await?;
            events.push(Event::Started {
                node: cluster.nodes[index].spec.name.clone(),
                pid: process.pid().unwrap_or_default(),
            });
            cluster.nodes[index].process = Some(process);
        }
        Ok((cluster, events))
    }

    /// Starts node `index` and returns its process.
    async fn spawn(&self, index: usize) -> Result<Process, LaunchError> {
        let node = &self.nodes[index];
        let command = node.command.command(&self.log_path(index))?;
        self.launcher.spawn(&node.spec.name, command).await
    }

    /// Returns the number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Returns whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns where node `index` listens.
    pub fn spec(&self, index: usize) -> Option<&NodeSpec> {
        self.nodes.get(index).map(|node| &node.spec)
    }

    /// Returns node `index`'s process id while it has a process.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.nodes.get(index)?.process.as_ref()?.pid()
    }

    /// Returns what node `index` is going through.
    pub fn life(&self, index: usize) -> Option<Life> {
        self.nodes.get(index).map(|node| node.life)
    }

    /// Returns the log file of node `index`.
    pub fn log_path(&self, index: usize) -> PathBuf {
        let name = self
            .nodes
            .get(index)
            .map_or("node", |n| n.spec.name.as_str());
        self.workdir.join(format!("{name}.log"))
    }

    /// Injects `kind` into node `index` at `now`. Only a running node can be
    /// hit; anything else returns an error and changes nothing.
    pub fn inject(
        &mut self,
        index: usize,
        kind: FaultKind,
        now: Instant,
    ) -> Result<(), LaunchError> {
        let node = self
            .nodes
            .get_mut(index)
            .ok_or(LaunchError::NoSuchNode(index))?;
        let not_running = || LaunchError::NotRunning(node.spec.name.clone());
        if node.life != Life::Running {
            return Err(not_running());
        }
        let process = node.process.as_ref().ok_or_else(not_running)?;
        let (signal, life) = match kind {
            FaultKind::Kill => (
                Signal::SIGKILL,
                Life::Killed {
                    restart_at: now + FAULT_LENGTH,
                },
            ),
            FaultKind::Freeze => (
                Signal::SIGSTOP,
                Life::Frozen {
                    since: now,
                    thaw_at: now + FAULT_LENGTH,
                },
            ),
            FaultKind::Handoff => (
                Signal::SIGTERM,
                Life::Stopping {
                    restart_at: now + FAULT_LENGTH,
                    kill_at: now + HANDOFF_GRACE,
                },
            ),
        };
        process.signal(signal)?;
        node.life = life;
        Ok(())
    }

    /// Moves every node along at `now`: notices unexpected exits, thaws
    /// frozen nodes, restarts killed and stopped ones when due, and kills
    /// those that ignore `SIGTERM`. Returns what happened.
    pub async fn tend(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for index in 0..self.nodes.len() {
            if let Some(event) = self.tend_node(index, now).await {
                events.push(event);
            }
        }
        events
    }

    async fn tend_node(&mut self, index: usize, now: Instant) -> Option<Event> {
        let exited = self.reap(index);
        let node = &mut self.nodes[index];
        let name = node.spec.name.clone();
        if let Some(status) = exited {
            // Killed and stopped nodes are expected to end; the others not.
            if matches!(node.life, Life::Running | Life::Frozen { .. }) {
                node.life = Life::Exited;
                return Some(Event::Exited { node: name, status });
            }
        }
        match node.life {
            Life::Frozen { since, thaw_at } if now >= thaw_at => {
                node.life = Life::Running;
                Some(match node.process.as_ref()?.signal(Signal::SIGCONT) {
                    Ok(()) => Event::Thawed {
                        node: name,
                        after: now.saturating_duration_since(since),
                    },
                    Err(err) => Event::Failed {
                        message: err.to_string(),
                    },
                })
            }
            Life::Stopping { kill_at, .. } if now >= kill_at && node.process.is_some() => {
                node.life = Life::Killed { restart_at: now };
                Some(match node.process.as_ref()?.signal(Signal::SIGKILL) {
                    Ok(()) => Event::Escalated { node: name },
                    Err(err) => Event::Failed {
                        message: err.to_string(),
                    },
                })
            }
            Life::Killed { restart_at } | Life::Stopping { restart_at, .. }
                if now >= restart_at && node.process.is_none() =>
            {
                Some(self.restart(index).await)
            }
            _ => None,
        }
    }

    /// Collects node `index`'s exit status if its process has ended.
    fn reap(&mut self, index: usize) -> Option<String> {
        let node = &mut self.nodes[index];
        let status = node.process.as_mut()?.reap()?;
        node.process = None;
        Some(status.to_string())
    }

    async fn restart(&mut self, index: usize) -> Event {
        let name = self.nodes[index].spec.name.clone();
        match self.spawn(index).await {
            Ok(process) => {
                let pid = process.pid().unwrap_or_default();
                self.nodes[index].process = Some(process);
                self.nodes[index].life = Life::Running;
                Event::Restarted { node: name, pid }
            }
            Err(err) => {
                self.nodes[index].life = Life::Exited;
                Event::Failed {
                    message: err.to_string(),
                }
            }
        }
    }

    /// Kills (`kill -9`, which also ends frozen processes) and reaps every node.
    pub fn shutdown(&mut self) {
        for node in &mut self.nodes {
            node.process = None;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::DemoConfig;
    use crate::raft::Config;
    use std::os::unix::fs::PermissionsExt;

    fn config(nodes: usize) -> DemoConfig {
        DemoConfig {
            nodes,
            base_port: 20000,
            kill_every: None,
            partition_every: None,
            duration: None,
            tui: false,
            raft: Config::default(),
        }
    }

    #[test]
    fn nodes_are_named_from_one_on_paired_ports() {
        let specs = plan(&config(3));
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].name, "node-1");
        assert_eq!((specs[2].http_port, specs[2].peer_port), (20004, 20005));
        assert_eq!(specs[1].is_leader_url(), "http://127.0.0.1:20002/is-leader");
    }

    #[test]
    fn run_arguments_name_every_peer_and_the_timing() {
        let cfg = config(3);
        let specs = plan(&cfg);
        let command = node_command(
            &cfg,
            &specs,
            1,
            Path::new("/bin/x"),
            Path::new("/tmp/x"),
            "s",
        );
        let args: Vec<String> = command
            .args()
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let value = |flag: &str| {
            let at = args.iter().position(|a| a == flag).expect(flag);
            args[at + 1].clone()
        };
        assert_eq!(args[0], "run");
        assert_eq!(value("--id"), "node-2");
        assert_eq!(value("--http-listen"), "127.0.0.1:20002");
        assert_eq!(value("--advertise"), "127.0.0.1:20003");
        assert_eq!(
            value("--peers"),
            "127.0.0.1:20001,127.0.0.1:20003,127.0.0.1:20005"
        );
        assert_eq!(value("--bootstrap-expect"), "3");
        assert_eq!(value("--election-timeout-min"), "150000us");
        assert_eq!(value("--state-dir"), "/tmp/x/node-2");
        assert!(args.contains(&"--no-kubernetes".to_string()));
        assert_eq!(
            crate::cli::parse_duration(&value("--heartbeat-interval")),
            Ok(Duration::from_millis(50))
        );
    }

    /// Kills process `pid` without telling the cluster.
    fn kill_behind_its_back(pid: u32) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid"));
        nix::sys::signal::kill(pid, Signal::SIGKILL).expect("kill");
    }

    /// Returns the state letter of process `pid` (`S` sleeping, `T` stopped),
    /// or `None` once it is gone.
    fn process_state(pid: u32) -> Option<char> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("State:"))?;
        line.split_whitespace().nth(1)?.chars().next()
    }

    /// Waits until `check` holds, for at most two seconds; returns whether it did.
    fn eventually(check: impl Fn() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        check()
    }

    /// Waits until node `index` has started `starts` times (its script logged
    /// its secret: it has set its traps and is about to exec `sleep`).
    fn wait_started(cluster: &Cluster, index: usize, starts: usize) {
        let log = cluster.log_path(index);
        let started = || {
            std::fs::read_to_string(&log)
                .is_ok_and(|text| text.matches("secret:").count() >= starts)
        };
        assert!(eventually(started), "node {index} did not start");
    }

    /// Starts a cluster whose "nodes" are a shell script that logs its
    /// arguments and secret, then sleeps.
    async fn stand_in_cluster(dir: &Path, nodes: usize, prelude: &str) -> (Cluster, Vec<Event>) {
        let exe = dir.join("node.sh");
        std::fs::write(
            &exe,
            format!(
                "#!/bin/sh\n{prelude}\necho \"args: $*\"\necho \"secret: $RAFT_ELECTOR_SECRET\"\nexec sleep 30\n"
            ),
        )
        .expect("write script");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let cfg = config(nodes);
        Cluster::start(
            &cfg,
            &plan(&cfg),
            &exe,
            dir.to_path_buf(),
            "00112233445566778899aabbccddeeff",
        )
        .await
        .expect("start")
    }

    #[tokio::test]
    async fn nodes_are_killed_frozen_stopped_and_restarted_on_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cluster, started) = stand_in_cluster(dir.path(), 2, "").await;
        assert_eq!(started.len(), 2);
        let pid = cluster.pid(0).expect("a pid");
        wait_started(&cluster, 0, 1);
        let t0 = Instant::now();

        cluster.inject(0, FaultKind::Freeze, t0).expect("freeze");
        assert!(eventually(|| process_state(pid) == Some('T')), "stopped");
        assert!(
            cluster.inject(0, FaultKind::Kill, t0).is_err(),
            "one fault at a time"
        );
        assert!(cluster.tend(t0 + FAULT_LENGTH / 2).await.is_empty());
        let events = cluster.tend(t0 + FAULT_LENGTH).await;
        assert!(matches!(&events[..], [Event::Thawed { .. }]), "{events:?}");
        assert_eq!(cluster.life(0), Some(Life::Running));
        assert!(
            eventually(|| process_state(pid) != Some('T')),
            "running again"
        );

        cluster.inject(0, FaultKind::Kill, t0).expect("kill");
        assert!(
            eventually(|| matches!(process_state(pid), Some('Z') | None)),
            "ended"
        );
        assert!(cluster.tend(t0 + FAULT_LENGTH / 2).await.is_empty());
        assert_eq!(cluster.pid(0), None, "reaped");
        let events = cluster.tend(t0 + FAULT_LENGTH).await;
        assert!(
            matches!(&events[..], [Event::Restarted { .. }]),
            "{events:?}"
        );
        let new_pid = cluster.pid(0).expect("a new pid");
        assert_ne!(new_pid, pid);

        // `sleep` ends on SIGTERM: restarted once the grace of the fault is over.
        wait_started(&cluster, 1, 1);
        let term_pid = cluster.pid(1).expect("a pid");
        cluster.inject(1, FaultKind::Handoff, t0).expect("SIGTERM");
        assert!(
            eventually(|| matches!(process_state(term_pid), Some('Z') | None)),
            "ended"
        );
        assert!(cluster.tend(t0).await.is_empty());
        let events = cluster.tend(t0 + FAULT_LENGTH).await;
        assert!(
            matches!(&events[..], [Event::Restarted { .. }]),
            "{events:?}"
        );

        let log = std::fs::read_to_string(cluster.log_path(0)).expect("log");
        assert!(log.contains("args: run --id node-1 "), "{log}");
        assert!(
            log.contains("secret: 00112233445566778899aabbccddeeff"),
            "{log}"
        );

        let pids = [new_pid, cluster.pid(1).expect("pid")];
        drop(cluster);
        assert_eq!(
            pids.map(process_state),
            [None, None],
            "dropping kills every node"
        );
    }

    #[tokio::test]
    async fn a_node_that_dies_on_its_own_is_reported_and_left_down() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cluster, _) = stand_in_cluster(dir.path(), 1, "").await;
        let pid = cluster.pid(0).expect("a pid");
        kill_behind_its_back(pid);
        assert!(
            eventually(|| matches!(process_state(pid), Some('Z') | None)),
            "ended"
        );
        let events = cluster.tend(Instant::now()).await;
        assert_eq!(
            events.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["node-1 exited unexpectedly (signal: 9 (SIGKILL)); see node-1.log"]
        );
        assert_eq!(cluster.life(0), Some(Life::Exited));
        assert!(cluster
            .tend(Instant::now() + HANDOFF_GRACE)
            .await
            .is_empty());
        let err = cluster
            .inject(0, FaultKind::Kill, Instant::now())
            .expect_err("not running");
        assert_eq!(err.to_string(), "node-1 is not running");
    }

    #[tokio::test]
    async fn a_node_ignoring_sigterm_is_killed_after_the_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cluster, _) = stand_in_cluster(dir.path(), 1, "trap '' TERM").await;
        let pid = cluster.pid(0).expect("a pid");
        wait_started(&cluster, 0, 1);
        let t0 = Instant::now();
        cluster.inject(0, FaultKind::Handoff, t0).expect("SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            cluster.tend(t0 + FAULT_LENGTH).await.is_empty(),
            "still running"
        );
        assert!(process_state(pid).is_some());
        let events = cluster.tend(t0 + HANDOFF_GRACE).await;
        assert_eq!(
            events.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["node-1 ignored SIGTERM; killed it (kill -9)"]
        );
        assert!(
            eventually(|| matches!(process_state(pid), Some('Z') | None)),
            "ended"
        );
        let events = cluster.tend(t0 + HANDOFF_GRACE).await;
        assert!(
            matches!(&events[..], [Event::Restarted { .. }]),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn a_frozen_node_that_dies_is_reported_not_thawed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut cluster, _) = stand_in_cluster(dir.path(), 1, "").await;
        let pid = cluster.pid(0).expect("a pid");
        let t0 = Instant::now();
        cluster.inject(0, FaultKind::Freeze, t0).expect("freeze");
        kill_behind_its_back(pid);
        assert!(
            eventually(|| matches!(process_state(pid), Some('Z') | None)),
            "ended"
        );
        let events = cluster.tend(t0 + FAULT_LENGTH).await;
        assert!(matches!(&events[..], [Event::Exited { .. }]), "{events:?}");
        assert_eq!(cluster.life(0), Some(Life::Exited));
    }
}
