//! A real cluster of `raft-elector run` processes for integration tests and
//! the process benchmark: the test-side layer (DNS, loopback placements,
//! waits that panic with the logs) over the process-cluster harness the demo
//! uses too (`raft_elector::demo::{launch, probe, samples}`: launching,
//! sampling, the two-leader check).
//!
//! ```text
//!  Cluster ──Launcher──► raft-elector run (one child process per slot)
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
//! tail of every log is printed when a test fails. The double-leader rule is
//! documented in `raft_elector::demo::samples`.

#![allow(dead_code)]

use super::dns::TestDns;
use raft_elector::api::LeaderStatus;
use raft_elector::demo::launch::{Launcher, NodeCommand, Peers, Process};
use raft_elector::demo::probe;
use raft_elector::demo::samples::Sampler;
use std::collections::BTreeSet;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

pub use raft_elector::demo::launch::log_tail;
#[allow(unused_imports)]
pub use raft_elector::demo::samples::{LeaseLapse, Sample, Timeline, Violation};

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
    /// `--cluster-id` of slot `i` is `cluster_ids[i % len]`; empty: one
    /// group, [`CLUSTER_ID`].
    pub cluster_ids: Vec<String>,
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
            cluster_ids: Vec::new(),
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
    process: Option<Process>,
    /// Exit status of the last process, once it ended.
    pub exit: Option<ExitStatus>,
    restarts: usize,
}

impl Node {
    /// Returns the process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(Process::pid)
    }

    /// Returns whether the slot has a process that was not reaped yet.
    pub fn is_running(&self) -> bool {
        self.process.as_ref().is_some_and(Process::is_running)
    }

    /// Collects the exit status if the process has ended.
    fn reap(&mut self) -> Option<ExitStatus> {
        let status = self.process.as_mut()?.reap()?;
        self.process = None;
        self.exit = Some(status);
        Some(status)
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
    client: probe::Client,
    sampler: Sampler,
    /// Kills done by [`Cluster::kill_leader_trial`] (spreads their phase).
    kill_trials: u64,
    // Declared after `nodes`: the launcher thread is joined after the kills.
    launcher: Launcher,
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

fn is_leader_url(http: SocketAddr) -> String {
    format!("http://{http}/is-leader")
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
            client: probe::Client::new(REQUEST_TIMEOUT),
            sampler: Sampler::new(SAMPLE_TIMEOUT),
            kill_trials: 0,
            launcher: Launcher::new().expect("start the node launcher thread"),
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
            self.add_slot(format!("node-{slot}"), placement, advertise)
                .await;
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
        self.add_slot(name.to_string(), placement, advertise).await;
        self.wait_listening(slot).await;
        slot
    }

    async fn add_slot(&mut self, name: String, placement: Placement, advertise: SocketAddr) {
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
            process: None,
            exit: None,
            restarts: 0,
        });
        self.spawn(slot).await;
        let url = is_leader_url(self.nodes[slot].placement.http);
        self.sampler.watch(slot, url);
    }

    /// Returns the command of slot `slot`'s node.
    fn command(&self, slot: usize) -> NodeCommand {
        let node = &self.nodes[slot];
        let peers = match (&self.dns, self.config.discovery) {
            (Some(dns), PeerDiscovery::Dns) => Peers::Service {
                name: SERVICE.into(),
                dns_server: dns.addr,
            },
            _ => Peers::Static(self.static_peers.clone()),
        };
        NodeCommand {
            binary: self.config.binary.clone(),
            netns: node.placement.netns.clone(),
            name: node.name.clone(),
            http: node.placement.http,
            peer: node.placement.peer,
            advertise: node.advertise,
            peers,
            bootstrap_expect: self.config.bootstrap_expect,
            cluster_id: match self.config.cluster_ids.len() {
                0 => CLUSTER_ID.into(),
                n => self.config.cluster_ids[slot % n].clone(),
            },
            secret: SECRET.into(),
            state_dir: node.state_dir.clone(),
            extra_args: self.config.extra_args.iter().map(Into::into).collect(),
        }
    }

    async fn spawn(&mut self, slot: usize) {
        let node = &self.nodes[slot];
        let mut log = std::fs::OpenOptions::new()
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
        let mut command = self
            .command(slot)
            .command(&node.log)
            .unwrap_or_else(|e| panic!("{e}"));
        command.env_remove("RUST_LOG");
        let process = self
            .launcher
            .spawn(&node.name, command)
            .await
            .unwrap_or_else(|e| panic!("{e} ({})", self.config.binary.display()));
        let node = &mut self.nodes[slot];
        node.process = Some(process);
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
            if let Some(status) = self.nodes[slot].reap() {
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

    /// Kills slot `slot` with SIGKILL and reaps it; returns when it is dead.
    pub fn kill9(&mut self, slot: usize) -> Instant {
        let node = &mut self.nodes[slot];
        let mut process = node
            .process
            .take()
            .unwrap_or_else(|| panic!("{} is not running", node.name));
        let at = Instant::now();
        node.exit = process.kill();
        at
    }

    /// Sends SIGTERM to slot `slot`; returns the instant it was sent.
    pub fn sigterm(&mut self, slot: usize) -> Instant {
        let node = &self.nodes[slot];
        let process = node
            .process
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", node.name));
        let at = Instant::now();
        if let Err(err) = process.signal(nix::sys::signal::Signal::SIGTERM) {
            panic!("{err}");
        }
        at
    }

    /// Waits up to `timeout` for slot `slot` to exit; returns its status.
    pub async fn wait_exit(&mut self, slot: usize, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.nodes[slot].reap() {
                return status;
            }
            if let (None, Some(status)) = (&self.nodes[slot].process, self.nodes[slot].exit) {
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
        self.spawn(slot).await;
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
        self.client.get_text(&url).await
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
        let targets: Vec<(usize, String)> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(slot, node)| (slot, is_leader_url(node.placement.http)))
            .collect();
        self.sampler.start(interval, targets);
    }

    /// Stops recording and returns what was recorded since the start.
    pub async fn stop_sampling(&mut self) -> Timeline {
        self.sampler.stop().await
    }

    /// Returns the sampler's clock: the instant its timestamps count from.
    pub fn sample_origin(&self) -> Instant {
        self.sampler.origin()
    }

    /// Returns `at` on the sampler's clock, in microseconds.
    pub fn micros(&self, at: Instant) -> u64 {
        self.sampler.micros(at)
    }

    /// Kills leader `old` with `kill -9` while sampling `/is-leader` every
    /// `every`, from `before` ahead of the kill until one leader is agreed
    /// again (within `steady`), then restarts it with its state. Returns the
    /// time from the kill to the first 200 of another node, and the samples.
    pub async fn kill_leader_trial(
        &mut self,
        old: usize,
        every: Duration,
        before: Duration,
        steady: Duration,
    ) -> (Duration, Timeline) {
        self.start_sampling(every);
        // Crashes come at any point of the leader's heartbeat cycle, and the
        // failover time depends on it (the old lease ends 150 ms after the
        // last round). This process's wakeups can line up with the leader's
        // rounds on a small machine, so the kill is moved on by a phase that
        // walks the default 50 ms cycle evenly (golden-ratio steps), as the
        // simulator's crashes do.
        self.kill_trials += 1;
        let phase = (self.kill_trials as f64 * 0.618_033_988_75).fract();
        tokio::time::sleep(before + Duration::from_millis(50).mul_f64(phase)).await;
        let killed = self.kill9(old);
        let killed_us = self.micros(killed);
        self.wait_for_single_leader(steady).await;
        // The sampler's next rounds see what the status poll just saw.
        tokio::time::sleep(every * 5).await;
        let timeline = self.stop_sampling().await;
        let took = timeline
            .first_200_elsewhere(killed_us, old)
            .expect("another node answered 200 after the kill");
        self.restart(old, true).await;
        (took, timeline)
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
            node.process = None;
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

/// Returns a reqwest client with keep-alive, no proxy and `timeout`, for
/// tests that sample pods they did not start (`tests/testbed_deployment.rs`).
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
