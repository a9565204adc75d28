//! A real cluster of `raft-elector run` processes for integration tests and
//! the process benchmark.
//!
//! ```text
//!  Cluster ──spawn──► raft-elector run (one child process per slot)
//!     │                 --http-listen <ip>:<http port>   ◄── Sampler: GET /is-leader every ~2 ms
//!     │                 --peer-listen <ip>:<peer port>        per slot, keep-alive, recorded as
//!     │                 --service nodes.elector.test          Sample{slot, sent, received, status}
//!     ▼                 --dns-server <TestDns>          ──► Timeline: violations, gaps, failover
//!  TestDns (A records = the IPs of the slots published)
//! ```
//!
//! On loopback every slot gets its own IP `127.0.<net>.<slot + 1>` (Linux
//! routes all of 127/8 to `lo`), so one peer port serves every node and the
//! headless-Service DNS answer is just a list of A records. Network-namespace
//! tests place slots themselves with [`Placement`]s. Children are killed
//! when the [`Cluster`] is dropped (and, through `PR_SET_PDEATHSIG`, when
//! the test process dies); their logs stay in a temporary directory and the
//! tail of every log is printed when a test fails.
//!
//! # When are two 200s "at the same instant"?
//!
//! A sample is a request sent at `sent` and answered at `received`; the node
//! decided its answer at some unknown instant inside `[sent, received]`. Two
//! 200s of different nodes whose intervals overlap may or may not have been
//! decided at the same instant: the samples cannot tell, so such a pair is
//! only reported ([`Timeline::ambiguous_overlaps`]), never counted as a
//! violation. What the samples can prove is an *ordering*: `x` was decided
//! before `y` when `x.received < y.sent`.
//!
//! A node leads a given term at most once, in one contiguous tenure (once it
//! steps down from term T it can only lead again in a higher term). So if
//! node A answered 200 in term T at `a1` and again in term T at `a2`, A was
//! the leader of T during all of `[a1, a2]`, and its lease held at both
//! ends. A violation ([`Timeline::violations`]) is a 200 from another node B
//! provably inside such a tenure: `a1.received < b.sent` and
//! `b.received < a2.sent`. Then B claimed a valid lease while A was leader
//! and A still claimed (and had) a valid lease afterwards, i.e. the two
//! leaderships overlapped in time. The rule has no false positives (it never
//! flags a correct handoff, however fast), and it catches every overlap
//! longer than about two sampling periods plus two request latencies.
//!
//! Because a node never leads one term twice, (slot, term) identifies a
//! tenure even across restarts with state; a slot restarted without state
//! is a new incarnation that can only lead in a term above every term it
//! joins with.

#![allow(dead_code)]

use super::dns::TestDns;
use raft_elector::api::LeaderStatus;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_raft-elector");
/// Zone the test DNS server is authoritative for.
pub const ZONE: &str = "elector.test.";
/// The headless-Service name every node resolves.
pub const SERVICE: &str = "nodes.elector.test";
/// Peer secret of every test cluster (32 bytes).
pub const SECRET: &str = "integration-test-secret-32-bytes";
/// Cluster id of every test cluster.
pub const CLUSTER_ID: &str = "itest";
/// Time limit of one sampler request.
const SAMPLE_TIMEOUT: Duration = Duration::from_millis(200);
/// Time limit of one helper request (status, metrics, readiness).
const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a started node may take to open its HTTP listener.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval of the helpers' polling loops.
const POLL: Duration = Duration::from_millis(20);
/// Lines of each node's log printed when a test fails.
const LOG_TAIL_LINES: usize = 40;
/// Ports are picked from here: below Linux's ephemeral range (32768..), so
/// outgoing connections do not take them.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// Tests in one binary share the loopback network and the CPU; one cluster
/// at a time keeps them from disturbing each other's timing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits for the other cluster tests of this binary to finish.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    SERIAL.lock().await
}

/// How nodes find each other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerDiscovery {
    /// `--service` resolved with the in-process [`TestDns`].
    Dns,
    /// `--peers` listing every slot placed at start (itself included).
    Static,
}

/// Settings of a test cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// How nodes find each other.
    pub discovery: PeerDiscovery,
    /// `--bootstrap-expect`; `None` uses the number of nodes started.
    pub bootstrap_expect: Option<usize>,
    /// Third octet of the loopback IPs (`127.0.<net>.<slot + 1>`).
    pub loopback_net: u8,
    /// Flags added to every node's command line.
    pub extra_args: Vec<String>,
    /// The binary to run: this build's unless a benchmark compares another.
    pub binary: PathBuf,
}

impl Default for ClusterConfig {
    /// Returns DNS discovery with fast DNS polling and a 2 s removal grace.
    fn default() -> ClusterConfig {
        ClusterConfig {
            discovery: PeerDiscovery::Dns,
            bootstrap_expect: None,
            loopback_net: 77,
            extra_args: ["--dns-interval", "200ms", "--removal-grace", "2s"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            binary: PathBuf::from(BIN),
        }
    }
}

/// Where one slot's node listens and runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// App API listener (`--http-listen`), reachable from the test process.
    pub http: SocketAddr,
    /// Peer listener (`--peer-listen`); also the advertised address unless
    /// the cluster was started with [`Cluster::start_placed_advertising`].
    pub peer: SocketAddr,
    /// Network namespace to run in (`ip netns exec`), if any.
    pub netns: Option<String>,
}

/// One slot: a member name, its addresses, its state dir and its process.
#[derive(Debug)]
pub struct Node {
    /// `--id`.
    pub name: String,
    /// Where it listens.
    pub placement: Placement,
    /// `--advertise`: where peers reach it (the placement's peer address
    /// unless overridden, e.g. by a relay in front of the listener).
    pub advertise: SocketAddr,
    /// `--state-dir`; replaced by a fresh one on a restart without state.
    pub state_dir: PathBuf,
    /// stdout and stderr of every process this slot ran.
    pub log: PathBuf,
    child: Option<Child>,
    /// Exit status of the last process, once it ended.
    pub exit: Option<ExitStatus>,
    restarts: usize,
}

impl Node {
    /// Returns the process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Returns whether the slot has a process that was not reaped yet.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

/// A cluster of `raft-elector run` processes; see the module doc.
pub struct Cluster {
    /// Settings it was started with.
    pub config: ClusterConfig,
    /// The DNS server the nodes resolve [`SERVICE`] with (DNS discovery only).
    pub dns: Option<TestDns>,
    nodes: Vec<Node>,
    published: BTreeSet<Ipv4Addr>,
    http_port: u16,
    peer_port: u16,
    static_peers: Vec<String>,
    dir: tempfile::TempDir,
    client: reqwest::Client,
    sampler: Sampler,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// Returns `127.0.<net>.<slot + 1>`.
pub fn loopback_ip(net: u8, slot: usize) -> Ipv4Addr {
    let last = u8::try_from(slot + 1).unwrap_or_else(|_| panic!("slot {slot} exceeds 254"));
    Ipv4Addr::new(127, 0, net, last)
}

/// Returns a TCP port that is free on every address right now.
pub fn free_port() -> u16 {
    for _ in 0..200 {
        let port = PORT_RANGE.start + rand::random::<u16>() % (PORT_RANGE.end - PORT_RANGE.start);
        if TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).is_ok() {
            return port;
        }
    }
    panic!("no free TCP port in {PORT_RANGE:?} after 200 tries");
}

impl Cluster {
    /// Starts `n` nodes `node-0..node-<n-1>` on loopback (one IP each),
    /// publishes them all in DNS first (with DNS discovery), and waits until
    /// every HTTP listener answers. MUST run inside a multi-thread tokio
    /// runtime (the DNS server and the sampler run on it).
    pub async fn start(n: usize, config: ClusterConfig) -> Cluster {
        let mut cluster = Cluster::empty(config, free_port(), free_port()).await;
        let placements = (0..n)
            .map(|i| {
                let placement = cluster.loopback_placement(i);
                let advertise = placement.peer;
                (placement, advertise)
            })
            .collect();
        cluster.launch_all(placements).await;
        cluster
    }

    /// Starts one node per placement (static peers or DNS as configured);
    /// for hosts the test built itself, e.g. network namespaces.
    pub async fn start_placed(placements: Vec<Placement>, config: ClusterConfig) -> Cluster {
        let advertise = placements.iter().map(|p| p.peer).collect();
        Cluster::start_placed_advertising(placements, advertise, config).await
    }

    /// Starts one node per placement like [`Cluster::start_placed`], but
    /// node `i` advertises `advertise[i]` (and static peer lists and DNS
    /// name that address) while it listens on its placement's peer address;
    /// for tests that put a relay in front of every peer listener.
    pub async fn start_placed_advertising(
        placements: Vec<Placement>,
        advertise: Vec<SocketAddr>,
        config: ClusterConfig,
    ) -> Cluster {
        assert_eq!(
            placements.len(),
            advertise.len(),
            "give one advertised address per placement"
        );
        let mut cluster = Cluster::empty(config, 0, 0).await;
        cluster
            .launch_all(placements.into_iter().zip(advertise).collect())
            .await;
        cluster
    }

    async fn empty(config: ClusterConfig, http_port: u16, peer_port: u16) -> Cluster {
        let serial = serial().await;
        let dns = match config.discovery {
            PeerDiscovery::Dns => Some(TestDns::start(ZONE).await),
            PeerDiscovery::Static => None,
        };
        let dir = tempfile::Builder::new()
            .prefix("raft-elector-cluster-")
            .tempdir()
            .expect("create a temporary directory for node state and logs");
        Cluster {
            config,
            dns,
            nodes: Vec::new(),
            published: BTreeSet::new(),
            http_port,
            peer_port,
            static_peers: Vec::new(),
            dir,
            client: http_client(REQUEST_TIMEOUT),
            sampler: Sampler::new(),
            _serial: serial,
        }
    }

    /// Returns the loopback placement of `slot`.
    fn loopback_placement(&self, slot: usize) -> Placement {
        let ip = IpAddr::V4(loopback_ip(self.config.loopback_net, slot));
        Placement {
            http: SocketAddr::new(ip, self.http_port),
            peer: SocketAddr::new(ip, self.peer_port),
            netns: None,
        }
    }

    /// Starts one node per (placement, advertised address).
    async fn launch_all(&mut self, placements: Vec<(Placement, SocketAddr)>) {
        let n = placements.len();
        self.static_peers = placements.iter().map(|(_, a)| a.to_string()).collect();
        if self.config.bootstrap_expect.is_none() {
            self.config.bootstrap_expect = Some(n);
        }
        for (_, advertise) in &placements {
            if let IpAddr::V4(ip) = advertise.ip() {
                self.published.insert(ip);
            }
        }
        self.publish_dns();
        for (slot, (placement, advertise)) in placements.into_iter().enumerate() {
            self.add_slot(format!("node-{slot}"), placement, advertise);
        }
        for slot in 0..n {
            self.wait_listening(slot).await;
        }
    }

    /// Returns the number of slots (running or not).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Returns whether no slot exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns slot `slot`.
    pub fn node(&self, slot: usize) -> &Node {
        &self.nodes[slot]
    }

    /// Returns the slots whose process runs.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect()
    }

    /// Adds a node named `name` on the next loopback IP, publishes it in DNS
    /// and waits for its HTTP listener; returns its slot.
    pub async fn add_node(&mut self, name: &str) -> usize {
        let slot = self.nodes.len();
        let placement = self.loopback_placement(slot);
        if let IpAddr::V4(ip) = placement.peer.ip() {
            self.published.insert(ip);
        }
        self.publish_dns();
        let advertise = placement.peer;
        self.add_slot(name.to_string(), placement, advertise);
        self.wait_listening(slot).await;
        slot
    }

    fn add_slot(&mut self, name: String, placement: Placement, advertise: SocketAddr) {
        let slot = self.nodes.len();
        let state_dir = self.dir.path().join(format!("state-{slot}-0"));
        std::fs::create_dir_all(&state_dir).expect("create a state directory");
        let log = self.dir.path().join(format!("{slot}-{name}.log"));
        self.nodes.push(Node {
            name,
            placement,
            advertise,
            state_dir,
            log,
            child: None,
            exit: None,
            restarts: 0,
        });
        self.spawn(slot);
        self.sampler.watch(slot, self.nodes[slot].placement.http);
    }

    /// Returns the command line of slot `slot`'s node.
    fn command(&self, slot: usize) -> Command {
        let node = &self.nodes[slot];
        let mut cmd = match &node.placement.netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&self.config.binary);
                cmd
            }
            None => Command::new(&self.config.binary),
        };
        cmd.arg("run")
            .args(["--id", &node.name])
            .args(["--http-listen", &node.placement.http.to_string()])
            .args(["--peer-listen", &node.placement.peer.to_string()])
            .args(["--advertise", &node.advertise.to_string()])
            .args(["--cluster-id", CLUSTER_ID])
            .arg("--state-dir")
            .arg(&node.state_dir)
            .args(["--no-kubernetes", "--log-format", "json"]);
        if let Some(expect) = self.config.bootstrap_expect {
            cmd.args(["--bootstrap-expect", &expect.to_string()]);
        }
        match (&self.dns, self.config.discovery) {
            (Some(dns), PeerDiscovery::Dns) => {
                cmd.args(["--service", SERVICE])
                    .args(["--dns-server", &dns.addr.to_string()]);
            }
            _ => {
                cmd.args(["--peers", &self.static_peers.join(",")]);
            }
        }
        cmd.args(&self.config.extra_args);
        for (key, _) in std::env::vars() {
            if key.starts_with("RAFT_ELECTOR_") || key.starts_with("POD_") || key == "RUST_LOG" {
                cmd.env_remove(key);
            }
        }
        cmd.env("RAFT_ELECTOR_SECRET", SECRET);
        cmd
    }

    fn spawn(&mut self, slot: usize) {
        let mut cmd = self.command(slot);
        let node = &mut self.nodes[slot];
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)
            .expect("open the node's log file");
        let _ = writeln!(
            log,
            "==== harness: start #{} of {} (state dir {}) ====",
            node.restarts,
            node.name,
            node.state_dir.display()
        );
        let err_log = log.try_clone().expect("clone the log file handle");
        cmd.stdin(Stdio::null()).stdout(log).stderr(err_log);
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // SIGKILL the child when this thread dies, so no node outlives a
        // crashed test.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| {
            let bin = self.config.binary.display();
            panic!("cannot start {bin} for {}: {e}", node.name)
        });
        node.child = Some(child);
        node.exit = None;
    }

    /// Waits until slot `slot` answers HTTP (any status); panics with its
    /// log when the process exits or stays silent for [`START_TIMEOUT`].
    pub async fn wait_listening(&mut self, slot: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.get(slot, "/healthz").await.is_some() {
                return;
            }
            if let Some(status) = self.reap(slot) {
                panic!(
                    "{} exited with {status} before listening; log:\n{}",
                    self.nodes[slot].name,
                    log_tail(&self.nodes[slot].log, LOG_TAIL_LINES)
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not answer on {} within {START_TIMEOUT:?}; log:\n{}",
                    self.nodes[slot].name,
                    self.nodes[slot].placement.http,
                    log_tail(&self.nodes[slot].log, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Collects the exit status of slot `slot` if its process has ended.
    fn reap(&mut self, slot: usize) -> Option<ExitStatus> {
        let node = &mut self.nodes[slot];
        let child = node.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                node.child = None;
                node.exit = Some(status);
                Some(status)
            }
            _ => None,
        }
    }

    /// Kills slot `slot` with SIGKILL and reaps it; returns when it is dead.
    pub fn kill9(&mut self, slot: usize) -> Instant {
        let node = &mut self.nodes[slot];
        let mut child = node
            .child
            .take()
            .unwrap_or_else(|| panic!("{} is not running", node.name));
        let at = Instant::now();
        let _ = child.kill();
        node.exit = child.wait().ok();
        at
    }

    /// Sends SIGTERM to slot `slot`; returns the instant it was sent.
    pub fn sigterm(&mut self, slot: usize) -> Instant {
        let node = &self.nodes[slot];
        let pid = node
            .pid()
            .unwrap_or_else(|| panic!("{} is not running", node.name));
        let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
        let at = Instant::now();
        // SAFETY: plain kill(2) on our own child, which was not reaped yet.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed for {}", node.name);
        at
    }

    /// Waits up to `timeout` for slot `slot` to exit; returns its status.
    pub async fn wait_exit(&mut self, slot: usize, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.reap(slot) {
                return status;
            }
            if let (None, Some(status)) = (&self.nodes[slot].child, self.nodes[slot].exit) {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "{} did not exit within {timeout:?}; log:\n{}",
                    self.nodes[slot].name,
                    log_tail(&self.nodes[slot].log, LOG_TAIL_LINES)
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Starts slot `slot` again (same name and addresses) after it stopped:
    /// with its state dir (same incarnation) or with a fresh, empty one (a
    /// new incarnation). Waits for its HTTP listener.
    pub async fn restart(&mut self, slot: usize, with_state: bool) {
        assert!(
            !self.nodes[slot].is_running(),
            "{} still runs; stop it first",
            self.nodes[slot].name
        );
        let node = &mut self.nodes[slot];
        node.restarts += 1;
        if !with_state {
            node.state_dir = self
                .dir
                .path()
                .join(format!("state-{slot}-{}", node.restarts));
            std::fs::create_dir_all(&node.state_dir).expect("create a state directory");
        }
        self.spawn(slot);
        self.wait_listening(slot).await;
    }

    /// Publishes slot `slot`'s IP in DNS (again).
    pub fn dns_add(&mut self, slot: usize) {
        if let IpAddr::V4(ip) = self.nodes[slot].advertise.ip() {
            self.published.insert(ip);
        }
        self.publish_dns();
    }

    /// Removes slot `slot`'s IP from DNS, as when a pod goes away.
    pub fn dns_remove(&mut self, slot: usize) {
        if let IpAddr::V4(ip) = self.nodes[slot].advertise.ip() {
            self.published.remove(&ip);
        }
        self.publish_dns();
    }

    fn publish_dns(&self) {
        if let Some(dns) = &self.dns {
            let ips: Vec<Ipv4Addr> = self.published.iter().copied().collect();
            if ips.is_empty() {
                dns.clear(SERVICE);
            } else {
                dns.set_a(SERVICE, &ips);
            }
        }
    }

    /// GETs `path` from slot `slot`; returns status and body, `None` when
    /// the request failed.
    pub async fn get(&self, slot: usize, path: &str) -> Option<(u16, String)> {
        let url = format!("http://{}{path}", self.nodes[slot].placement.http);
        let response = self.client.get(url).send().await.ok()?;
        let status = response.status().as_u16();
        let body = response.text().await.ok()?;
        Some((status, body))
    }

    /// Returns slot `slot`'s `/is-leader` document, `None` when unreachable.
    pub async fn status(&self, slot: usize) -> Option<LeaderStatus> {
        let (_, body) = self.get(slot, "/is-leader").await?;
        serde_json::from_str(&body).ok()
    }

    /// Returns whether slot `slot` answers `/readyz` with 200.
    pub async fn is_ready(&self, slot: usize) -> bool {
        matches!(self.get(slot, "/readyz").await, Some((200, _)))
    }

    /// Returns the value of the metric line that starts with `series`
    /// (e.g. `raft_elector_term` or
    /// `raft_elector_rejected_messages_total{reason="bad_signature"}`).
    pub async fn metric(&self, slot: usize, series: &str) -> Option<f64> {
        let (_, text) = self.get(slot, "/metrics").await?;
        metric_value(&text, series)
    }

    /// Returns the `/is-leader` documents of every running slot, or `None`
    /// for those that did not answer.
    pub async fn statuses(&self) -> Vec<(usize, Option<LeaderStatus>)> {
        let mut out = Vec::new();
        for slot in self.running() {
            out.push((slot, self.status(slot).await));
        }
        out
    }

    /// Returns the leader's slot when the cluster is in steady state: every
    /// running node answers, exactly one answers `isLeader`, and all name it
    /// as leader in the same term.
    pub async fn steady_leader(&self) -> Option<usize> {
        let statuses = self.statuses().await;
        let mut leaders = statuses
            .iter()
            .filter(|(_, s)| s.as_ref().is_some_and(|s| s.is_leader));
        let (slot, leader) = leaders.next()?;
        if leaders.next().is_some() {
            return None;
        }
        let leader = leader.as_ref()?;
        let agreed = statuses.iter().all(|(_, s)| {
            s.as_ref().is_some_and(|s| {
                s.term == leader.term && s.leader.as_deref() == Some(leader.node.as_str())
            })
        });
        agreed.then_some(*slot)
    }

    /// Waits up to `timeout` for [`Cluster::steady_leader`]; returns its slot
    /// or panics with every node's status and log tail.
    pub async fn wait_for_single_leader(&mut self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(slot) = self.steady_leader().await {
                return slot;
            }
            if Instant::now() > deadline {
                let statuses = self.statuses().await;
                panic!("no single agreed leader within {timeout:?}; statuses: {statuses:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits up to `timeout` for `check` to hold, polling; panics with
    /// `what` and the statuses otherwise.
    pub async fn wait_until<F, Fut>(&self, timeout: Duration, what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if check().await {
                return;
            }
            if Instant::now() > deadline {
                let statuses = self.statuses().await;
                panic!("{what}: not reached within {timeout:?}; statuses: {statuses:#?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Starts recording `/is-leader` of every slot (present and added
    /// later) every `interval`, one request in flight per slot.
    pub fn start_sampling(&mut self, interval: Duration) {
        let targets: Vec<(usize, SocketAddr)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(slot, node)| (slot, node.placement.http))
            .collect();
        self.sampler.start(interval, &targets);
    }

    /// Stops recording and returns what was recorded since the start.
    pub async fn stop_sampling(&mut self) -> Timeline {
        self.sampler.stop().await
    }

    /// Returns the sampler's clock: the instant its timestamps count from.
    pub fn sample_origin(&self) -> Instant {
        self.sampler.origin
    }

    /// Returns `at` on the sampler's clock, in microseconds.
    pub fn micros(&self, at: Instant) -> u64 {
        micros_since(self.sampler.origin, at)
    }

    /// Prints the last lines of every node's log to stderr.
    pub fn print_logs(&self) {
        for node in &self.nodes {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                node.name,
                node.log.display(),
                log_tail(&node.log, LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.sampler.abort();
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::thread::panicking() {
            self.print_logs();
            // Keep the logs for a closer look.
            let dir = std::mem::replace(
                &mut self.dir,
                tempfile::tempdir().expect("create a temporary directory"),
            );
            eprintln!("node logs kept in {}", dir.keep().display());
        }
    }
}

/// Returns an HTTP client with keep-alive, no proxy and `timeout`.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(2)
        .build()
        .expect("build the test HTTP client")
}

/// Returns the value of the first line of Prometheus `text` whose series is
/// exactly `series` (name plus labels as rendered).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
}

/// Returns the last `lines` lines of the file at `path`.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = file.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn micros_since(origin: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX)
}

/// One `/is-leader` request of the sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Slot asked.
    pub slot: usize,
    /// When the request was sent, µs on the sampler's clock.
    pub sent_us: u64,
    /// When the answer arrived (or the request failed), µs.
    pub received_us: u64,
    /// HTTP status; 0 when the request failed (refused, timed out).
    pub status: u16,
    /// The answer's term (0 unless the status is 200).
    pub term: u64,
}

impl Sample {
    /// Returns whether the node claimed leadership.
    pub fn is_200(&self) -> bool {
        self.status == 200
    }

    /// Returns whether `self` was provably decided before `other`.
    pub fn before(&self, other: &Sample) -> bool {
        self.received_us < other.sent_us
    }

    /// Returns whether the two request intervals intersect.
    pub fn overlaps(&self, other: &Sample) -> bool {
        !self.before(other) && !other.before(self)
    }
}

/// Per-slot sampling tasks writing into one shared list.
struct Sampler {
    origin: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    running: Arc<AtomicBool>,
    interval: Duration,
    tasks: Vec<JoinHandle<()>>,
    client: reqwest::Client,
}

impl Sampler {
    fn new() -> Sampler {
        Sampler {
            origin: Instant::now(),
            samples: Arc::new(Mutex::new(Vec::new())),
            running: Arc::new(AtomicBool::new(false)),
            interval: Duration::from_millis(2),
            tasks: Vec::new(),
            client: http_client(SAMPLE_TIMEOUT),
        }
    }

    fn start(&mut self, interval: Duration, targets: &[(usize, SocketAddr)]) {
        self.abort();
        self.interval = interval;
        self.samples = Arc::new(Mutex::new(Vec::new()));
        self.running = Arc::new(AtomicBool::new(true));
        for &(slot, addr) in targets {
            self.watch(slot, addr);
        }
    }

    /// Starts sampling `slot` if the sampler runs.
    fn watch(&mut self, slot: usize, addr: SocketAddr) {
        if !self.running.load(Ordering::SeqCst) {
            return;
        }
        let url = format!("http://{addr}/is-leader");
        let client = self.client.clone();
        let samples = self.samples.clone();
        let running = self.running.clone();
        let origin = self.origin;
        let interval = self.interval;
        self.tasks.push(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while running.load(Ordering::SeqCst) {
                ticker.tick().await;
                let sent = Instant::now();
                let (status, term) = match client.get(&url).send().await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let term = match response.json::<LeaderStatus>().await {
                            Ok(doc) if status == 200 => doc.term,
                            _ => 0,
                        };
                        (status, term)
                    }
                    Err(_) => (0, 0),
                };
                let received = Instant::now();
                let sample = Sample {
                    slot,
                    sent_us: micros_since(origin, sent),
                    received_us: micros_since(origin, received),
                    status,
                    term,
                };
                samples
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .push(sample);
            }
        }));
    }

    async fn stop(&mut self) -> Timeline {
        self.running.store(false, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
        let mut samples = std::mem::take(
            &mut *self
                .samples
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        samples.sort_by_key(|s| (s.sent_us, s.slot));
        Timeline { samples }
    }

    fn abort(&mut self) {
        self.running.store(false, Ordering::SeqCst);
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

/// Two leaderships provably overlapping in time (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The node whose tenure was intruded on, and the tenure's term.
    pub tenure_slot: usize,
    /// Term of that tenure.
    pub tenure_term: u64,
    /// The other node's 200 inside the tenure.
    pub intruder: Sample,
}

/// A leader's lease lapse seen by the sampler ([`Timeline::lease_lapses`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeaseLapse {
    /// The leader.
    pub slot: usize,
    /// Its term, the same before and after the lapse.
    pub term: u64,
    /// Send time of its last 200 before the lapse, µs on the sampler's clock.
    pub from_us: u64,
    /// Receive time of its first 200 after the lapse, µs.
    pub until_us: u64,
}

impl LeaseLapse {
    /// Returns an upper bound of how long the lease lapsed.
    pub fn at_most(&self) -> Duration {
        Duration::from_micros(self.until_us.saturating_sub(self.from_us))
    }
}

/// Recorded samples, ordered by send time, and what they show.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Every sample, ordered by `sent_us`.
    pub samples: Vec<Sample>,
}

impl Timeline {
    /// Builds a timeline from samples in any order.
    pub fn new(mut samples: Vec<Sample>) -> Timeline {
        samples.sort_by_key(|s| (s.sent_us, s.slot));
        Timeline { samples }
    }

    /// Returns the 200 answers in send order.
    pub fn leader_samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter(|s| s.is_200())
    }

    /// Returns every 200 of one node that lies provably inside another
    /// node's tenure (module doc: the double-leader rule).
    pub fn violations(&self) -> Vec<Violation> {
        // (slot, term) -> (earliest received, latest sent) of its 200s.
        let mut tenures: BTreeMap<(usize, u64), (u64, u64)> = BTreeMap::new();
        for s in self.leader_samples() {
            let span = tenures
                .entry((s.slot, s.term))
                .or_insert((s.received_us, s.sent_us));
            span.0 = span.0.min(s.received_us);
            span.1 = span.1.max(s.sent_us);
        }
        let mut out = Vec::new();
        for (&(slot, term), &(first_received, last_sent)) in &tenures {
            for b in self.leader_samples().filter(|b| b.slot != slot) {
                if first_received < b.sent_us && b.received_us < last_sent {
                    out.push(Violation {
                        tenure_slot: slot,
                        tenure_term: term,
                        intruder: *b,
                    });
                }
            }
        }
        out
    }

    /// Returns how many pairs of 200s from different nodes have overlapping
    /// request intervals: possibly, not provably, simultaneous.
    pub fn ambiguous_overlaps(&self) -> usize {
        let leaders: Vec<&Sample> = self.leader_samples().collect();
        let mut count = 0;
        for (i, a) in leaders.iter().enumerate() {
            for b in &leaders[i + 1..] {
                if b.sent_us > a.received_us {
                    break;
                }
                if a.slot != b.slot && a.overlaps(b) {
                    count += 1;
                }
            }
        }
        count
    }

    /// Returns the first sample sent at or after `from_us` matching `pred`.
    pub fn first_after(&self, from_us: u64, pred: impl Fn(&Sample) -> bool) -> Option<Sample> {
        self.samples
            .iter()
            .find(|s| s.sent_us >= from_us && pred(s))
            .copied()
    }

    /// Returns the last sample sent before `until_us` matching `pred`.
    pub fn last_before(&self, until_us: u64, pred: impl Fn(&Sample) -> bool) -> Option<Sample> {
        self.samples
            .iter()
            .rev()
            .find(|s| s.sent_us < until_us && pred(s))
            .copied()
    }

    /// Returns the longest time without a 200 between the first and the
    /// last 200, as an upper bound: a node led at some instant inside each
    /// 200's request interval, so between two 200s consecutive in send
    /// order nobody led for at most `next.received - previous.sent`.
    pub fn max_leaderless_gap(&self) -> Duration {
        let leaders: Vec<&Sample> = self.leader_samples().collect();
        let max = leaders
            .windows(2)
            .map(|pair| pair[1].received_us.saturating_sub(pair[0].sent_us))
            .max()
            .unwrap_or(0);
        Duration::from_micros(max)
    }

    /// Returns every lapse of a lease inside a tenure: a run of 503s from a
    /// node that answered 200 in the same term before and after it, i.e.
    /// moments when the leader stayed leader but could not prove its lease.
    /// Runs of failed requests only (status 0) are not lapses.
    pub fn lease_lapses(&self) -> Vec<LeaseLapse> {
        let mut out = Vec::new();
        // slot -> (its last 200, whether a 503 came after it)
        let mut last: BTreeMap<usize, (Sample, bool)> = BTreeMap::new();
        for s in &self.samples {
            if s.is_200() {
                if let Some((previous, true)) = last.get(&s.slot) {
                    if previous.term == s.term {
                        out.push(LeaseLapse {
                            slot: s.slot,
                            term: s.term,
                            from_us: previous.sent_us,
                            until_us: s.received_us,
                        });
                    }
                }
                last.insert(s.slot, (*s, false));
            } else if s.status == 503 {
                if let Some((_, lapsed)) = last.get_mut(&s.slot) {
                    *lapsed = true;
                }
            }
        }
        out
    }

    /// Returns the sequence of distinct (slot, term) leaderships seen in
    /// 200 answers, in order.
    pub fn leaderships(&self) -> Vec<(usize, u64)> {
        let mut out: Vec<(usize, u64)> = Vec::new();
        for s in self.leader_samples() {
            if out.last() != Some(&(s.slot, s.term)) && !out.contains(&(s.slot, s.term)) {
                out.push((s.slot, s.term));
            }
        }
        out
    }

    /// Returns the slots that answered 200 at least once.
    pub fn leader_slots(&self) -> BTreeSet<usize> {
        self.leader_samples().map(|s| s.slot).collect()
    }

    /// Returns how many samples of `slot` there are, and how many were 200.
    pub fn counts(&self, slot: usize) -> (usize, usize) {
        let mine = self.samples.iter().filter(|s| s.slot == slot);
        let (mut all, mut ok) = (0, 0);
        for s in mine {
            all += 1;
            ok += usize::from(s.is_200());
        }
        (all, ok)
    }
}
