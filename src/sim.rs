//! A deterministic simulator for the Raft core (test and benchmark support).
//!
//! N [`RaftCore`]s run over a virtual network and a virtual clock. One seed
//! drives everything: message delay, loss, duplication and reordering,
//! partitions (symmetric and one-way), crashes and restarts with or without
//! state, and a per-node clock rate within the drift bound. The same seed
//! replays the same run, event for event.
//!
//! ```text
//!   event queue (real time, seq) ──► Deliver{msg} / Tick{node} / Membership
//!          ▲                               │
//!          │  schedule at next_deadline    ▼
//!          └──── Ready ◄── RaftCore::{tick, step} on the node's local clock
//!                  │
//!                  └──► invariant checks after every event (see [`Violation`])
//! ```
//!
//! Node clocks: `local = offset + real × rate`, with `rate` drawn once per node
//! from `[1 − drift/2, 1 + drift/2]`, so any two rates differ by at most
//! `drift` relative to each other, which is what the lease assumes.

use crate::raft::{
    Config, Configuration, HardState, Message, MessageBody, NodeId, Payload, RaftCore, Role, Term,
    Time,
};
use crate::runtime::bootstrap::{
    BootstrapAuthority, BootstrapStep, LocalAgreement, LocalView, PeerReport,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;
use std::time::Duration;

/// Settings of one simulated cluster.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Number of node slots ("n0", "n1", ...).
    pub nodes: usize,
    /// Settings of every core.
    pub raft: Config,
    /// One-way message delay, drawn uniformly from `[min, max]`.
    pub delay: (Duration, Duration),
    /// Probability a message is lost.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Relative clock-rate spread between nodes (0.01 = 1%). Must not exceed
    /// `raft.max_clock_drift` for the lease guarantee to hold.
    pub drift: f64,
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Whether a membership driver adds live members and removes retired incarnations.
    pub drive_membership: bool,
    /// Whether nodes see peers' connections end: a crash is reported to each
    /// live peer it can reach, and random faults include spurious reports
    /// about a live leader.
    pub connection_ends: bool,
    /// Probability that one connection-end report after a crash is lost.
    pub connection_end_loss: f64,
    /// Test-only mutation: new leaders skip waiting out the previous lease.
    pub mutate_skip_lease_wait: bool,
    /// Local bootstrap instead of a preset first configuration: nodes start
    /// at random times without state and agree on it themselves.
    pub bootstrap: Option<SimBootstrap>,
}

/// How the nodes of a simulated cluster bootstrap themselves with the
/// runtime's [`LocalAgreement`], exchanging hello-like reports.
#[derive(Clone, Debug)]
pub struct SimBootstrap {
    /// `--bootstrap-expect`.
    pub expect: usize,
    /// Each node starts at a random time in `[0, start_within]`.
    pub start_within: Duration,
    /// Period of each node's hello probes (the runtime probes every 250 ms
    /// until it has joined, then more slowly).
    pub probe_interval: Duration,
}

impl SimConfig {
    /// Returns a config with defaults for `nodes` nodes and `seed`.
    pub fn new(nodes: usize, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            raft: Config::default(),
            delay: (Duration::from_micros(500), Duration::from_micros(1500)),
            loss: 0.0,
            duplicate: 0.0,
            drift: Config::default().max_clock_drift,
            seed,
            drive_membership: true,
            connection_ends: false,
            connection_end_loss: 0.2,
            mutate_skip_lease_wait: false,
            bootstrap: None,
        }
    }
}

/// A broken safety property, with the virtual time it was seen at.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// Real (virtual) time in nanoseconds.
    pub at_nanos: u64,
    /// Which invariant, and the details.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "at {:.3} ms: {}", self.at_nanos as f64 / 1e6, self.what)
    }
}

#[derive(Debug)]
enum Event {
    Deliver {
        to: usize,
        msg: Message,
    },
    Tick {
        slot: usize,
        generation: u64,
    },
    Membership,
    /// `to` sees its connection to `peer` end without a goodbye.
    ConnectionLost {
        to: usize,
        peer: NodeId,
    },
    /// A node's process starts for the first time (bootstrap mode).
    Start {
        slot: usize,
    },
    /// A node asks every peer who it is (bootstrap mode).
    Probe {
        slot: usize,
        generation: u64,
    },
    /// A peer's hello answer arrives.
    Report {
        to: usize,
        generation: u64,
        report: PeerReport,
    },
}

struct Scheduled {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// Counts of what a run did, so tests can show their faults really happened.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Messages delivered to a live node.
    pub delivered: u64,
    /// Node crashes.
    pub crashes: u64,
    /// Connection ends reported to live nodes (after crashes or spurious).
    pub connection_ends: u64,
    /// Spurious connection-end reports about a live leader.
    pub spurious_connection_ends: u64,
    /// Restarts from persisted state.
    pub restarts_with_state: u64,
    /// Restarts with a wiped disk (new incarnations).
    pub restarts_without_state: u64,
    /// Partitions and one-way blocks started.
    pub partitions: u64,
    /// Leadership transfers started.
    pub transfers: u64,
    /// Distinct leaders (terms with a leader).
    pub leaders: u64,
    /// Configuration entries committed after bootstrap.
    pub config_changes_committed: u64,
    /// First configurations installed by local bootstrap.
    pub bootstraps: u64,
    /// Bootstrap attempts given up (new incarnations).
    pub abandons: u64,
}

/// One node slot: a process that can crash and come back.
struct SimNode {
    name: String,
    core: Option<RaftCore>,
    /// What the node last made durable.
    disk: Option<HardState>,
    rate: f64,
    offset: u64,
    incarnations: u64,
    tick_generation: u64,
    scheduled_deadline: Option<Time>,
    /// Real time at which this node's lease ends (0: none).
    lease_end_real: u64,
    /// Highest index whose committed entry was checked against the record.
    checked_commit: u64,
    last_role: Role,
    /// Whether the process was ever started.
    started: bool,
    /// The local bootstrap agreement of the running process (bootstrap mode).
    agreement: Option<LocalAgreement>,
    probe_generation: u64,
}

/// The simulated cluster.
pub struct Sim {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Scheduled>>,
    nodes: Vec<SimNode>,
    slot_of: HashMap<String, usize>,
    rng: SmallRng,
    /// blocked[from][to]: messages from `from` to `to` are dropped.
    blocked: Vec<Vec<bool>>,
    loss: f64,
    // Invariant records.
    /// Leader of each term, per lineage (first configuration's members).
    leaders_by_term: HashMap<(Vec<NodeId>, Term), NodeId>,
    votes: HashMap<(NodeId, Term), NodeId>,
    committed: BTreeMap<u64, (Term, Payload)>,
    /// Term of every committed index seen, including snapshot points.
    committed_terms: BTreeMap<u64, Term>,
    retired: HashMap<NodeId, u64>,
    violations: Vec<Violation>,
    /// Every (real time, node, term) at which a node first held a lease in a term.
    lease_starts: Vec<(u64, NodeId, Term)>,
    stats: SimStats,
    /// The first configuration of each identity's lineage: the one it
    /// bootstrapped with, or its leader's.
    lineage_of: HashMap<NodeId, Configuration>,
    /// First configurations under which some entry beyond them was committed.
    committed_lineages: Vec<Configuration>,
    /// Real time of the last scheduled first start (bootstrap mode).
    last_start: u64,
    /// Lifecycle events (starts, crashes, restarts, bootstraps, abandons), for replaying a seed.
    events: Vec<String>,
}

impl Sim {
    /// Creates a cluster whose every node starts fresh and bootstraps with the
    /// same configuration: the first `max_voters` nodes vote, the rest learn.
    pub fn new(cfg: SimConfig) -> Sim {
        let mut rng = SmallRng::seed_from_u64(cfg.seed);
        let mut nodes = Vec::with_capacity(cfg.nodes);
        let mut slot_of = HashMap::new();
        for i in 0..cfg.nodes {
            let name = format!("n{i}");
            slot_of.insert(name.clone(), i);
            let rate = 1.0 + (rng.random::<f64>() - 0.5) * cfg.drift;
            nodes.push(SimNode {
                name,
                core: None,
                disk: None,
                rate,
                offset: rng.random_range(0..1_000_000_000_000),
                incarnations: 0,
                tick_generation: 0,
                scheduled_deadline: None,
                lease_end_real: 0,
                checked_commit: 0,
                last_role: Role::Follower,
                started: false,
                agreement: None,
                probe_generation: 0,
            });
        }
        let loss = cfg.loss;
        let mut sim = Sim {
            blocked: vec![vec![false; cfg.nodes]; cfg.nodes],
            cfg,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            nodes,
            slot_of,
            rng,
            loss,
            leaders_by_term: HashMap::new(),
            votes: HashMap::new(),
            committed: BTreeMap::new(),
            committed_terms: BTreeMap::new(),
            retired: HashMap::new(),
            violations: Vec::new(),
            lease_starts: Vec::new(),
            stats: SimStats::default(),
            lineage_of: HashMap::new(),
            committed_lineages: Vec::new(),
            last_start: 0,
            events: Vec::new(),
        };
        if let Some(b) = sim.cfg.bootstrap.clone() {
            for slot in 0..sim.cfg.nodes {
                let at = sim.rng.random_range(0..=b.start_within.as_nanos() as u64);
                sim.schedule_at(at, Event::Start { slot });
            }
            if sim.cfg.drive_membership {
                sim.schedule(Duration::from_millis(100), Event::Membership);
            }
            return sim;
        }
        let mut initial = Configuration::default();
        for slot in 0..sim.cfg.nodes {
            sim.start_fresh(slot);
            let id = sim.node_id(slot).expect("just started");
            let addr = format!("{}:4041", id.name);
            if initial.voters.len() < sim.cfg.raft.max_voters {
                initial.voters.insert(id, addr);
            } else {
                initial.learners.insert(id, addr);
            }
        }
        for slot in 0..sim.cfg.nodes {
            let id = sim.node_id(slot).expect("started");
            sim.lineage_of.insert(id.clone(), initial.clone());
            if initial.is_voter(&id) {
                let now = sim.local_now(slot);
                if let Some(core) = sim.nodes[slot].core.as_mut() {
                    // A fresh core always accepts a bootstrap.
                    let _ = core.bootstrap(initial.clone(), now);
                }
                sim.process_ready(slot);
            }
        }
        if sim.cfg.drive_membership {
            sim.schedule(Duration::from_millis(100), Event::Membership);
        }
        sim
    }

    // ----- clocks ----------------------------------------------------------

    /// Returns the current virtual real time in nanoseconds.
    pub fn now_nanos(&self) -> u64 {
        self.now
    }

    /// Returns the current virtual time as a Duration since the start.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.now)
    }

    fn local_at(&self, slot: usize, real: u64) -> Time {
        let n = &self.nodes[slot];
        Time::from_nanos(n.offset + (real as f64 * n.rate) as u64)
    }

    fn local_now(&self, slot: usize) -> Time {
        self.local_at(slot, self.now)
    }

    /// Returns the earliest real time at which `slot`'s clock reads at least `local`.
    fn real_at(&self, slot: usize, local: Time) -> u64 {
        let n = &self.nodes[slot];
        let since = local.as_nanos().saturating_sub(n.offset) as f64;
        (since / n.rate).ceil() as u64 + 1
    }

    // ----- queries -----------------------------------------------------------

    /// Returns the number of node slots.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Returns whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Returns the core of a live node.
    pub fn core(&self, slot: usize) -> Option<&RaftCore> {
        self.nodes[slot].core.as_ref()
    }

    /// Returns the current identity of a live node.
    pub fn node_id(&self, slot: usize) -> Option<NodeId> {
        self.core(slot).map(|c| c.id().clone())
    }

    /// Returns whether `slot` holds a valid lease right now.
    pub fn has_lease(&self, slot: usize) -> bool {
        self.core(slot)
            .is_some_and(|c| c.has_lease(self.local_now(slot)))
    }

    /// Returns the slot that holds a valid lease right now, if any.
    pub fn lease_holder(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|s| self.has_lease(*s))
    }

    /// Returns the slot of a live leader of the highest term, if any.
    pub fn leader(&self) -> Option<usize> {
        (0..self.nodes.len())
            .filter(|s| self.core(*s).is_some_and(|c| c.role() == Role::Leader))
            .max_by_key(|s| self.core(*s).map(|c| c.term()))
    }

    /// Returns the highest term of any live node.
    pub fn max_term(&self) -> Term {
        (0..self.nodes.len())
            .filter_map(|s| self.core(s).map(|c| c.term()))
            .max()
            .unwrap_or_default()
    }

    /// Returns what the run did so far.
    pub fn stats(&self) -> SimStats {
        let mut s = self.stats.clone();
        s.leaders = self.leaders_by_term.len() as u64;
        s.config_changes_committed = self
            .committed
            .values()
            .filter(|(_, p)| matches!(p, Payload::Config(_)))
            .count() as u64;
        s
    }

    /// Describes every node's bootstrap state, one line each (for debugging a seed).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for slot in 0..self.nodes.len() {
            let line =
                match self.core(slot) {
                    None => format!("n{slot}: down\n"),
                    Some(c) => format!(
                    "n{slot}: {} {:?} t{} commit {} last {} pristine {} voters {:?} lock {:?}\n",
                    c.id(),
                    c.role(),
                    c.term(),
                    c.commit_index(),
                    c.log().last_index(),
                    c.is_pristine_bootstrap(),
                    c.configuration().0.voters.keys().map(|v| v.to_string()).collect::<Vec<_>>(),
                    c.bootstrap_lock()
                        .map(|l| l.members().map(|(v, _)| v.to_string()).collect::<Vec<_>>()),
                ),
                };
            out.push_str(&line);
        }
        out
    }

    /// Returns the lifecycle events so far, one line each with its time.
    pub fn events(&self) -> &[String] {
        &self.events
    }

    fn note(&mut self, what: String) {
        if self.events.len() < 10_000 {
            self.events
                .push(format!("{:.3} ms: {what}", self.now as f64 / 1e6));
        }
    }

    /// Returns when the last node started for the first time on its own
    /// schedule (bootstrap mode), in virtual time since the start.
    pub fn last_start(&self) -> Duration {
        Duration::from_nanos(self.last_start)
    }

    /// Returns the first configurations under which an entry beyond them
    /// was committed (at most one is safe).
    pub fn committed_first_configurations(&self) -> &[Configuration] {
        &self.committed_lineages
    }

    /// Returns the safety violations seen so far.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Returns when each node first held a lease in each term: (real ns, node, term).
    pub fn lease_starts(&self) -> &[(u64, NodeId, Term)] {
        &self.lease_starts
    }

    /// Returns the real time at which `slot`'s current lease ends (0: none).
    pub fn lease_end_nanos(&self, slot: usize) -> u64 {
        self.nodes[slot].lease_end_real
    }

    /// Returns whether `slot` is alive.
    pub fn is_alive(&self, slot: usize) -> bool {
        self.nodes[slot].core.is_some()
    }

    /// Returns the most advanced configuration (of the node with the highest commit).
    pub fn committed_configuration(&self) -> Option<Configuration> {
        (0..self.nodes.len())
            .filter_map(|s| self.core(s))
            .max_by_key(|c| c.commit_index())
            .map(|c| c.log().config_at(c.commit_index()).1.clone())
    }

    // ----- faults --------------------------------------------------------------

    /// Crashes a node: its volatile state is gone, its disk stays.
    pub fn crash(&mut self, slot: usize) {
        if let Some(c) = self.nodes[slot].core.as_ref() {
            let what = format!("crash {}", c.id());
            self.stats.crashes += 1;
            self.note(what);
            if self.cfg.connection_ends {
                if let Some(peer) = self.node_id(slot) {
                    // The kernel closes the dead process's sockets; each live
                    // peer it can reach sees the end, a report may be lost.
                    for to in (0..self.nodes.len()).filter(|t| *t != slot) {
                        if !self.blocked[slot][to]
                            && self.rng.random::<f64>() >= self.cfg.connection_end_loss
                        {
                            // The end follows whatever the process sent
                            // before it died, as a FIN follows the data.
                            let delay = self.cfg.delay.1 + self.message_delay();
                            let peer = peer.clone();
                            self.schedule(delay, Event::ConnectionLost { to, peer });
                        }
                    }
                }
            }
        }
        let n = &mut self.nodes[slot];
        n.core = None;
        n.lease_end_real = 0;
        n.tick_generation += 1;
        n.scheduled_deadline = None;
        n.agreement = None;
        n.probe_generation += 1;
    }

    /// Restarts a crashed node from what it persisted, or fresh if it never did.
    pub fn restart_with_state(&mut self, slot: usize) {
        if self.nodes[slot].core.is_some() {
            return;
        }
        let Some(state) = self.nodes[slot].disk.clone() else {
            self.start_fresh(slot);
            return;
        };
        self.new_clock_origin(slot);
        let now = self.local_now(slot);
        let seed = self.rng.random();
        let addr = format!("{}:4041", self.nodes[slot].name);
        match RaftCore::restore(self.cfg.raft.clone(), state, addr, seed, now) {
            Ok(mut core) => {
                if self.cfg.mutate_skip_lease_wait {
                    core.mutate_skip_lease_wait();
                }
                self.stats.restarts_with_state += 1;
                self.note(format!("restart with state of {}", core.id()));
                let n = &mut self.nodes[slot];
                n.checked_commit = core.commit_index();
                n.core = Some(core);
                self.process_ready(slot);
                self.start_probing(slot);
            }
            Err(e) => self.violation(format!("n{slot}: persisted state does not restore: {e}")),
        }
    }

    /// Restarts a crashed node with its disk wiped: a new incarnation.
    pub fn restart_without_state(&mut self, slot: usize) {
        if self.nodes[slot].core.is_some() {
            return;
        }
        if let Some(old) = self.nodes[slot].disk.take() {
            self.note(format!("restart without state of {}", old.id));
            self.retired.insert(old.id, self.now);
        }
        self.stats.restarts_without_state += 1;
        self.start_fresh(slot);
    }

    fn start_fresh(&mut self, slot: usize) {
        self.new_clock_origin(slot);
        let now = self.local_now(slot);
        let seed = self.rng.random();
        let n = &mut self.nodes[slot];
        n.incarnations += 1;
        let id = NodeId::new(n.name.clone(), n.incarnations);
        let addr = format!("{}:4041", n.name);
        let mut core = RaftCore::fresh(self.cfg.raft.clone(), id, addr, seed, now);
        if self.cfg.mutate_skip_lease_wait {
            core.mutate_skip_lease_wait();
        }
        n.core = Some(core);
        n.checked_commit = 0;
        n.started = true;
        self.process_ready(slot);
        self.start_probing(slot);
    }

    // ----- local bootstrap ---------------------------------------------------------

    /// Gives a (re)started process a new agreement and starts its probes.
    fn start_probing(&mut self, slot: usize) {
        let Some(b) = self.cfg.bootstrap.clone() else {
            return;
        };
        let n = &mut self.nodes[slot];
        n.agreement = Some(LocalAgreement::new(b.expect, self.cfg.raft.max_voters));
        n.probe_generation += 1;
        let generation = n.probe_generation;
        let first = self
            .rng
            .random_range(0..=b.probe_interval.as_nanos() as u64 / 4);
        self.schedule_at(self.now + first, Event::Probe { slot, generation });
    }

    /// Returns what `slot` answers to hello right now.
    fn report_of(&self, slot: usize) -> Option<PeerReport> {
        let core = self.core(slot)?;
        Some(PeerReport {
            id: core.id().clone(),
            address: format!("{}:4041", self.nodes[slot].name),
            joined: core.configuration().0.contains(core.id()),
            leaving: false,
            lock: core.bootstrap_lock().cloned(),
        })
    }

    fn one_way_delay(&mut self) -> Duration {
        let (lo, hi) = self.cfg.delay;
        if hi > lo {
            lo + Duration::from_nanos(self.rng.random_range(0..(hi - lo).as_nanos() as u64))
        } else {
            lo
        }
    }

    /// Asks every peer reachable both ways for its report, then decides.
    fn probe(&mut self, slot: usize) {
        let Some(b) = self.cfg.bootstrap.clone() else {
            return;
        };
        let generation = self.nodes[slot].probe_generation;
        for peer in 0..self.nodes.len() {
            if peer == slot || self.blocked[slot][peer] || self.blocked[peer][slot] {
                continue;
            }
            if self.rng.random::<f64>() < self.loss || self.rng.random::<f64>() < self.loss {
                continue;
            }
            let Some(report) = self.report_of(peer) else {
                continue;
            };
            let rtt = self.one_way_delay() + self.one_way_delay();
            self.schedule(
                rtt,
                Event::Report {
                    to: slot,
                    generation,
                    report,
                },
            );
        }
        self.run_bootstrap(slot);
        let jitter = self
            .rng
            .random_range(0..=b.probe_interval.as_nanos() as u64 / 10);
        self.schedule(
            b.probe_interval + Duration::from_nanos(jitter),
            Event::Probe { slot, generation },
        );
    }

    /// Applies the agreement's next step to `slot`'s core, as the runtime does.
    fn run_bootstrap(&mut self, slot: usize) {
        let now = self.local_now(slot);
        let n = &mut self.nodes[slot];
        let (Some(core), Some(agreement)) = (n.core.as_mut(), n.agreement.as_mut()) else {
            return;
        };
        let address = format!("{}:4041", n.name);
        let local = LocalView {
            id: core.id(),
            address: &address,
            log_empty: core.log().is_empty(),
            pristine: core.is_pristine_bootstrap(),
            config: core.configuration().0,
            lock: core.bootstrap_lock(),
        };
        let Some(step) = agreement.decide(now, &local) else {
            return;
        };
        let me = core.id().clone();
        match step {
            BootstrapStep::Lock(config) => {
                let what = format!(
                    "{me} promises {:?}",
                    config
                        .members()
                        .map(|(m, _)| m.to_string())
                        .collect::<Vec<_>>()
                );
                if let Err(e) = core.lock_bootstrap(config) {
                    self.violation(format!(
                        "n{slot}: the agreement asked for a refused promise: {e}"
                    ));
                }
                self.note(what);
            }
            BootstrapStep::Bootstrap(config) => match core.bootstrap(config.clone(), now) {
                Ok(()) => {
                    self.stats.bootstraps += 1;
                    self.note(format!("{me} bootstraps"));
                    self.lineage_of.insert(me, config);
                }
                Err(e) => self.violation(format!(
                    "n{slot}: the agreement asked for a refused bootstrap: {e}"
                )),
            },
            BootstrapStep::Abandon(why) => {
                self.events.push(format!(
                    "{:.3} ms: {me} abandons: {why}",
                    self.now as f64 / 1e6
                ));
                agreement.reset();
                self.stats.abandons += 1;
                self.retired.insert(me, self.now);
                n.incarnations += 1;
                let id = NodeId::new(n.name.clone(), n.incarnations);
                let seed = self.rng.random();
                n.core = Some(RaftCore::fresh(
                    self.cfg.raft.clone(),
                    id,
                    address,
                    seed,
                    now,
                ));
                n.checked_commit = 0;
            }
        }
        self.process_ready(slot);
    }

    fn new_clock_origin(&mut self, slot: usize) {
        // A new process has a new monotonic clock origin; the rate is the hardware's.
        let offset = self.rng.random_range(0..1_000_000_000_000u64);
        self.nodes[slot].offset = offset;
    }

    /// Drops messages between the two groups in both directions.
    pub fn partition(&mut self, group: &[usize]) {
        self.stats.partitions += 1;
        for a in 0..self.nodes.len() {
            for b in 0..self.nodes.len() {
                if group.contains(&a) != group.contains(&b) {
                    self.blocked[a][b] = true;
                }
            }
        }
    }

    /// Drops messages from `from` to `to` only.
    pub fn block_one_way(&mut self, from: usize, to: usize) {
        self.stats.partitions += 1;
        self.blocked[from][to] = true;
    }

    /// Removes every partition.
    pub fn heal(&mut self) {
        for row in &mut self.blocked {
            row.iter_mut().for_each(|b| *b = false);
        }
    }

    /// Changes the clock rate of `slot` from now on, keeping its local time
    /// continuous (an adversary choosing drift within the bound).
    pub fn set_clock_rate(&mut self, slot: usize, rate: f64) {
        let local = self.local_now(slot).as_nanos() as f64;
        let offset = local - self.now as f64 * rate;
        let n = &mut self.nodes[slot];
        n.rate = rate;
        n.offset = offset.max(0.0) as u64;
        n.scheduled_deadline = None;
        self.reschedule_tick(slot);
        // The lease deadline in real time moved with the rate.
        self.check_node(slot);
    }

    /// Reports to each node in `observers` that its connection to the node
    /// in `peer` ended without a goodbye, after one message delay, whether or
    /// not `peer` is alive.
    pub fn report_connection_lost(&mut self, observers: &[usize], peer: usize) {
        let Some(id) = self
            .node_id(peer)
            .or_else(|| self.nodes[peer].disk.as_ref().map(|d| d.id.clone()))
        else {
            return;
        };
        for &to in observers {
            let delay = self.message_delay();
            self.schedule(
                delay,
                Event::ConnectionLost {
                    to,
                    peer: id.clone(),
                },
            );
        }
    }

    /// Sets the message loss probability.
    pub fn set_loss(&mut self, loss: f64) {
        self.loss = loss;
    }

    /// Asks the leader in `slot` to hand over leadership.
    pub fn transfer_leadership(&mut self, slot: usize) -> bool {
        let now = self.local_now(slot);
        let ok = self.nodes[slot]
            .core
            .as_mut()
            .is_some_and(|c| c.transfer_leadership(now, None).is_ok());
        if ok {
            self.stats.transfers += 1;
        }
        self.process_ready(slot);
        ok
    }

    /// Changes the election timeout range of every node from now on (the
    /// running cores keep their state; restarted ones use the new range).
    pub fn set_timeouts(&mut self, min: Duration, max: Duration) {
        self.cfg.raft.election_timeout_min = min;
        self.cfg.raft.election_timeout_max = max;
        for n in &mut self.nodes {
            if let Some(core) = n.core.as_mut() {
                core.set_election_timeouts(min, max);
            }
        }
    }

    /// Asks the node in `slot` to leave the cluster (graceful shutdown).
    pub fn leave(&mut self, slot: usize) -> bool {
        let ok = self.nodes[slot].core.as_mut().is_some_and(|c| c.leave());
        self.process_ready(slot);
        ok
    }

    /// Retires the node in `slot` (SIGTERM: it never campaigns or leads
    /// again) as the runtime does: a leader hands over to a voter not known
    /// to be retiring, or abdicates when none is left; anyone else asks to
    /// leave once. Returns whether it was leading.
    pub fn retire(&mut self, slot: usize) -> bool {
        let now = self.local_now(slot);
        let Some(core) = self.nodes[slot].core.as_mut() else {
            return false;
        };
        core.retire(now);
        let leading = core.role() == Role::Leader;
        if !leading {
            core.leave();
        }
        self.process_ready(slot);
        leading
    }

    /// What the runtime does for a retiring leader after every input: hand
    /// over again when a target refused, abdicate when nobody is left.
    fn hand_over_if_retiring(core: &mut RaftCore, now: Time) {
        if core.is_retiring()
            && core.role() == Role::Leader
            && !core.is_transferring()
            && core.transfer_leadership(now, None).is_err()
        {
            core.abdicate(now);
        }
    }

    // ----- running -------------------------------------------------------------

    /// Runs until virtual time `until` (since the start).
    pub fn run_until(&mut self, until: Duration) {
        let limit = until.saturating_sub(self.now());
        self.run_until_condition(limit, |_| false);
    }

    /// Runs for `d` more virtual time.
    pub fn run_for(&mut self, d: Duration) {
        let until = self.now() + d;
        self.run_until(until);
    }

    /// Runs until some node holds a valid lease or `limit` passes; returns the
    /// virtual time it took.
    pub fn run_until_lease(&mut self, limit: Duration) -> Option<Duration> {
        self.run_until_condition(limit, |s| s.lease_holder().is_some())
    }

    /// Runs until `done` returns true (checked after every event) or `limit`
    /// passes; returns the virtual time it took.
    pub fn run_until_condition(
        &mut self,
        limit: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        let until = start + limit.as_nanos() as u64;
        if done(self) {
            return Some(Duration::ZERO);
        }
        while let Some(Reverse(next)) = self.queue.peek() {
            if next.at > until {
                break;
            }
            let Some(Reverse(ev)) = self.queue.pop() else {
                break;
            };
            self.now = ev.at;
            self.handle(ev.event);
            if done(self) {
                return Some(Duration::from_nanos(self.now - start));
            }
        }
        self.now = self.now.max(until);
        None
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.schedule_at(self.now + after.as_nanos() as u64, event);
    }

    fn schedule_at(&mut self, at: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Scheduled {
            at,
            seq: self.seq,
            event,
        }));
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Deliver { to, msg } => {
                let now = self.local_now(to);
                let Some(core) = self.nodes[to].core.as_mut() else {
                    return;
                };
                self.stats.delivered += 1;
                let was_empty = core.log().is_empty();
                let from = msg.from.clone();
                // Refusals (e.g. for an old incarnation) change nothing; that is the point.
                let _ = core.step(now, msg);
                if was_empty && !core.log().is_empty() {
                    // Joined through a leader: the leader's lineage.
                    let me = core.id().clone();
                    if let Some(first) = self.lineage_of.get(&from).cloned() {
                        self.lineage_of.insert(me, first);
                    }
                }
                self.process_ready(to);
            }
            Event::Start { slot } => {
                if !self.nodes[slot].started {
                    self.last_start = self.now;
                    self.start_fresh(slot);
                }
            }
            Event::Probe { slot, generation } => {
                if self.nodes[slot].probe_generation == generation && self.is_alive(slot) {
                    self.probe(slot);
                }
            }
            Event::Report {
                to,
                generation,
                report,
            } => {
                if self.nodes[to].probe_generation != generation {
                    return;
                }
                let now = self.local_now(to);
                if let Some(agreement) = self.nodes[to].agreement.as_mut() {
                    agreement.observe(now, report);
                    self.run_bootstrap(to);
                }
            }
            Event::Tick { slot, generation } => {
                if self.nodes[slot].tick_generation != generation {
                    return;
                }
                self.nodes[slot].scheduled_deadline = None;
                let now = self.local_now(slot);
                if let Some(core) = self.nodes[slot].core.as_mut() {
                    core.tick(now);
                    self.process_ready(slot);
                }
            }
            Event::Membership => {
                self.drive_membership();
                self.schedule(Duration::from_millis(100), Event::Membership);
            }
            Event::ConnectionLost { to, peer } => {
                let now = self.local_now(to);
                let Some(core) = self.nodes[to].core.as_mut() else {
                    return;
                };
                self.stats.connection_ends += 1;
                core.leader_connection_lost(now, &peer);
                self.process_ready(to);
            }
        }
    }

    /// Adds live members missing from the leader's configuration and removes
    /// retired incarnations, one change at a time (what the runtime's
    /// membership driver does from discovery).
    fn drive_membership(&mut self) {
        let Some(leader) = self.leader() else {
            return;
        };
        // Like the runtime: a node holding a bootstrap promise and no log is never added.
        let live: Vec<(NodeId, String)> = (0..self.nodes.len())
            .filter(|s| {
                self.core(*s)
                    .is_some_and(|c| !(c.log().is_empty() && c.bootstrap_lock().is_some()))
            })
            .filter_map(|s| self.node_id(s).map(|id| (id, format!("n{s}:4041"))))
            .collect();
        let Some(core) = self.nodes[leader].core.as_mut() else {
            return;
        };
        let config = core.configuration().0.clone();
        let stale = config
            .members()
            .map(|(id, _)| id.clone())
            .find(|id| !live.iter().any(|(l, _)| l == id) && self.retired.contains_key(id));
        if let Some(id) = stale {
            let _ = core.propose_remove(&id);
        } else if let Some((id, addr)) = live.into_iter().find(|(id, _)| !config.contains(id)) {
            let _ = core.propose_add_learner(id, addr);
        }
        self.process_ready(leader);
    }

    /// Persists, sends and checks what a node produced.
    fn process_ready(&mut self, slot: usize) {
        let now = self.local_now(slot);
        let Some(core) = self.nodes[slot].core.as_mut() else {
            return;
        };
        Sim::hand_over_if_retiring(core, now);
        let ready = core.take_ready();
        if let Some(hs) = ready.hard_state {
            self.nodes[slot].disk = Some(hs);
            self.check_configurations(slot);
        }
        for msg in ready.messages {
            self.check_message(&msg);
            self.send(slot, msg);
        }
        self.check_node(slot);
        self.reschedule_tick(slot);
    }

    /// Draws a one-way delay from the configured range.
    fn message_delay(&mut self) -> Duration {
        let (lo, hi) = self.cfg.delay;
        if hi > lo {
            lo + Duration::from_nanos(self.rng.random_range(0..(hi - lo).as_nanos() as u64))
        } else {
            lo
        }
    }

    fn send(&mut self, from: usize, msg: Message) {
        let Some(&to) = self.slot_of.get(&*msg.to.name) else {
            return;
        };
        if self.blocked[from][to] || self.rng.random::<f64>() < self.loss {
            return;
        }
        let copies = if self.rng.random::<f64>() < self.cfg.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.message_delay();
            self.schedule(
                delay,
                Event::Deliver {
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }

    fn reschedule_tick(&mut self, slot: usize) {
        let Some(deadline) = self.nodes[slot].core.as_ref().map(|c| c.next_deadline()) else {
            return;
        };
        if self.nodes[slot].scheduled_deadline == Some(deadline) {
            return;
        }
        let at = self.real_at(slot, deadline).max(self.now + 1);
        let n = &mut self.nodes[slot];
        n.tick_generation += 1;
        n.scheduled_deadline = Some(deadline);
        let generation = n.tick_generation;
        self.schedule_at(at, Event::Tick { slot, generation });
    }

    // ----- invariants ------------------------------------------------------------

    fn violation(&mut self, what: String) {
        self.violations.push(Violation {
            at_nanos: self.now,
            what,
        });
    }

    fn check_node(&mut self, slot: usize) {
        let Some(core) = self.nodes[slot].core.as_ref() else {
            return;
        };
        let id = core.id().clone();
        let term = core.term();
        let role = core.role();
        let commit = core.commit_index();
        // At most one leader per term.
        if role == Role::Leader {
            // Terms count within one lineage (first configuration); a
            // retired lineage's terms may repeat in a new one.
            let lineage: Vec<NodeId> = self
                .lineage_of
                .get(&id)
                .map(|c| c.members().map(|(m, _)| m.clone()).collect())
                .unwrap_or_default();
            match self.leaders_by_term.get(&(lineage.clone(), term)) {
                Some(other) if *other != id => {
                    let what = format!("two leaders in term {term}: {other} and {id}");
                    self.violation(what);
                }
                Some(_) => {}
                None => {
                    self.leaders_by_term.insert((lineage, term), id.clone());
                }
            }
            if self.nodes[slot].last_role != Role::Leader {
                if self.nodes[slot]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.is_retiring())
                {
                    self.violation(format!(
                        "{id} became leader of term {term} after it retired"
                    ));
                }
                self.check_leader_completeness(slot);
            }
        }
        self.nodes[slot].last_role = role;
        // At most one first configuration ever commits anything beyond itself.
        if commit >= 2 {
            if let Some(first) = self.lineage_of.get(&id) {
                if !self.committed_lineages.contains(first) {
                    self.committed_lineages.push(first.clone());
                    if self.committed_lineages.len() == 2 {
                        let what = format!(
                            "two first configurations committed entries: {:?} and {:?}",
                            self.committed_lineages[0].voters.keys().collect::<Vec<_>>(),
                            self.committed_lineages[1].voters.keys().collect::<Vec<_>>()
                        );
                        self.violation(what);
                    }
                }
            }
        }
        // No two valid leases at any instant.
        let lease_end = match self.nodes[slot].core.as_ref().and_then(|c| c.lease_until()) {
            Some(until) if until > self.local_now(slot) => self.real_at(slot, until) - 1,
            _ => 0,
        };
        let had = self.nodes[slot].lease_end_real > self.now;
        self.nodes[slot].lease_end_real = lease_end;
        if lease_end > self.now {
            if !had {
                self.lease_starts.push((self.now, id.clone(), term));
            }
            for other in 0..self.nodes.len() {
                if other != slot && self.nodes[other].lease_end_real > self.now {
                    let what = format!(
                        "two valid leases: n{slot} (term {term}) and n{other} (until {:.3} ms)",
                        self.nodes[other].lease_end_real as f64 / 1e6
                    );
                    self.violation(what);
                }
            }
        }
        self.check_commits(slot);
    }

    /// Committed entries never diverge: every committed index a node holds
    /// (entries and its snapshot point) matches what any node committed there,
    /// and a node's committed prefix never changes under it.
    fn check_commits(&mut self, slot: usize) {
        let Some(core) = self.nodes[slot].core.as_ref() else {
            return;
        };
        let commit = core.commit_index();
        let log = core.log();
        let snap = log.snapshot();
        let mut found = Vec::new();
        if snap.last_index > 0 {
            found.push((snap.last_index, snap.last_term, None));
        }
        let from = (self.nodes[slot].checked_commit + 1).max(snap.last_index + 1);
        for index in from..=commit {
            if let Some(e) = log.entry(index) {
                found.push((index, e.term, Some(e.payload.clone())));
            }
        }
        // Re-check the newest committed index every time: it must not change.
        if commit > snap.last_index && commit < from {
            if let Some(t) = log.term_at(commit) {
                found.push((commit, t, None));
            }
        }
        self.nodes[slot].checked_commit = commit.max(self.nodes[slot].checked_commit);
        for (index, term, payload) in found {
            match self.committed_terms.get(&index) {
                Some(t) if *t != term => {
                    let what = format!(
                        "n{slot} committed index {index} with term {term}, others with term {t}"
                    );
                    self.violation(what);
                }
                Some(_) => {}
                None => {
                    self.committed_terms.insert(index, term);
                }
            }
            if let Some(p) = payload {
                match self.committed.get(&index) {
                    Some((_, q)) if *q != p => {
                        let what = format!("n{slot} committed a different entry at index {index}");
                        self.violation(what);
                    }
                    Some(_) => {}
                    None => {
                        self.committed.insert(index, (term, p));
                    }
                }
            }
        }
    }

    /// A new leader holds every committed entry (Raft paper §5.4, Leader Completeness).
    fn check_leader_completeness(&mut self, slot: usize) {
        let Some(core) = self.nodes[slot].core.as_ref() else {
            return;
        };
        let snap = core.log().snapshot().last_index;
        let missing = self
            .committed
            .iter()
            .filter(|(i, _)| **i > snap)
            .find(|(i, (t, _))| core.log().term_at(**i) != Some(*t))
            .map(|(i, _)| *i);
        if let Some(index) = missing {
            let what = format!("new leader n{slot} lacks committed index {index}");
            self.violation(what);
        }
    }

    /// A configuration change never lets two disjoint majorities exist: every
    /// configuration in a node's log overlaps the one before it, and a leader
    /// appends a configuration only once the one before it is committed.
    fn check_configurations(&mut self, slot: usize) {
        let Some(core) = self.nodes[slot].core.as_ref() else {
            return;
        };
        let log = core.log();
        let mut prev = &log.snapshot().config;
        let mut prev_index = log.snapshot().last_index;
        let mut problems = Vec::new();
        for e in log.entries() {
            if let Payload::Config(c) = &e.payload {
                if !prev.voters.is_empty() && prev.has_disjoint_majority_with(c) {
                    problems.push(format!(
                        "n{slot}: configuration at {} has a majority disjoint from the previous one",
                        e.index
                    ));
                }
                let own_new = core.role() == Role::Leader
                    && e.term == core.term()
                    && e.index > core.commit_index();
                if own_new && prev_index > core.commit_index() {
                    problems.push(format!(
                        "leader n{slot} appended configuration {} before {} committed",
                        e.index, prev_index
                    ));
                }
                prev = c;
                prev_index = e.index;
            }
        }
        for p in problems {
            self.violation(p);
        }
    }

    /// Each member votes at most once per term, and a retired incarnation never votes.
    fn check_message(&mut self, msg: &Message) {
        if let MessageBody::RequestVoteResponse { granted: true, .. } = msg.body {
            if self.retired.contains_key(&msg.from) {
                let what = format!(
                    "retired incarnation {} voted in term {}",
                    msg.from, msg.term
                );
                self.violation(what);
            }
            let key = (msg.from.clone(), msg.term);
            match self.votes.get(&key) {
                Some(c) if *c != msg.to => {
                    let what = format!(
                        "{} voted twice in term {}: for {} and {}",
                        msg.from, msg.term, c, msg.to
                    );
                    self.violation(what);
                }
                Some(_) => {}
                None => {
                    self.votes.insert(key, msg.to.clone());
                }
            }
        }
    }

    // ----- random faults -----------------------------------------------------------

    /// Runs `duration` of random faults: partitions (symmetric and one-way),
    /// loss, crashes and restarts with and without state. Ends with every
    /// fault still in place; call [`heal_all`](Self::heal_all) afterwards.
    pub fn run_random_faults(&mut self, duration: Duration) {
        let end = self.now + duration.as_nanos() as u64;
        while self.now < end {
            let step = Duration::from_millis(self.rng.random_range(50..400));
            self.run_for(step);
            self.random_fault();
        }
    }

    fn random_fault(&mut self) {
        let n = self.nodes.len();
        if self.cfg.connection_ends && self.rng.random_bool(0.2) {
            // A spurious end of a live leader's connections (a reset, a
            // reconnect), seen by a random subset of the others.
            if let Some(leader) = self.leader() {
                let observers: Vec<usize> = (0..n)
                    .filter(|s| *s != leader && self.rng.random_bool(0.6))
                    .collect();
                self.stats.spurious_connection_ends += 1;
                self.report_connection_lost(&observers, leader);
                return;
            }
        }
        match self.rng.random_range(0..10) {
            0 | 1 => {
                let size = self.rng.random_range(1..=(n / 2).max(1));
                let mut group: Vec<usize> = (0..n).collect();
                for i in (1..n).rev() {
                    let j = self.rng.random_range(0..=i);
                    group.swap(i, j);
                }
                group.truncate(size);
                self.partition(&group);
            }
            2 => {
                let (a, b) = (self.rng.random_range(0..n), self.rng.random_range(0..n));
                if a != b {
                    self.block_one_way(a, b);
                }
            }
            3 | 4 => self.heal(),
            5 => {
                let loss = [0.0, 0.01, 0.05, 0.2][self.rng.random_range(0..4)];
                self.set_loss(loss);
            }
            6 => {
                let slot = self.leader().unwrap_or_else(|| self.rng.random_range(0..n));
                self.crash(slot);
            }
            7 => {
                let slot = self.rng.random_range(0..n);
                self.crash(slot);
            }
            _ => {
                let crashed: Vec<usize> = (0..n).filter(|s| !self.is_alive(*s)).collect();
                if crashed.is_empty() {
                    if let Some(l) = self.leader() {
                        self.transfer_leadership(l);
                    }
                    return;
                }
                let slot = crashed[self.rng.random_range(0..crashed.len())];
                if self.rng.random_bool(0.25) && self.replacement_allowed() {
                    self.restart_without_state(slot);
                } else {
                    self.restart_with_state(slot);
                }
            }
        }
    }

    /// A new incarnation may replace a member only once every earlier
    /// replacement has finished, so a majority of voters is never lost forever.
    fn replacement_allowed(&self) -> bool {
        if self.cfg.bootstrap.is_some() && self.leaders_by_term.is_empty() {
            // Until a first leader is elected, a member may come back as anyone.
            return true;
        }
        self.committed_configuration().is_some_and(|c| {
            c.members().all(|(id, _)| !self.retired.contains_key(id))
                && c.voters.len() == self.cfg.nodes.min(self.cfg.raft.max_voters)
        })
    }

    /// Removes every fault: heals partitions, stops loss, restarts crashed nodes with state.
    pub fn heal_all(&mut self) {
        self.heal();
        self.set_loss(0.0);
        for slot in 0..self.nodes.len() {
            self.restart_with_state(slot);
        }
    }
}
