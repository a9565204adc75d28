//! The node task: the one owner of the Raft core.
//!
//! ```text
//!   inbound peer messages ─┐
//!   hello answers (seen) ──┤      ┌──────────────┐  persist ─► HardStateStore
//!   raft timer (deadline) ─┼────► │  NodeTask    │  send ────► SendToPeer (transport)
//!   housekeeping (0.1-1 s) ┤      │  owns core   │  publish ─► watch<LeaderState>
//!   shutdown future ───────┘      └──────────────┘              watch<PeerInfo>
//! ```
//!
//! After every input the task drains the core's `Ready` in order: hard state
//! is saved (and fsynced) before any message that depends on it is sent. A
//! failed save stops the node: sending after it could give a vote twice.
//! The save runs on tokio's blocking pool ([`Persister`]) and the task awaits
//! it, so a slow disk holds up this task only, never the runtime thread that
//! also answers `/is-leader` and carries the peer connections. An input is
//! taken (cancel-safe, raced against shutdown) before it is applied; once
//! applied, its `Ready` is always handled to the end.
//!
//! **Quiet rounds.** While this node leads with its lease, replicates
//! nothing and hands nothing over, it lets its followers' answers wait on
//! their connections until its next round (`transport::quiet`, which lists
//! the invariants): [`SendToPeer::set_quiet`] after every `Ready`, when that
//! changes; each round's heartbeat on a connection has the answers waiting
//! there read. A leader's next deadline is its next heartbeat round, so held
//! answers wait at most one heartbeat interval. A quiet leader also wakes
//! when its lease is down to [`QUIET_LEASE_MARGIN`] (normally the round's
//! answers have renewed it long before), stops being quiet and reads
//! answers as they arrive until the lease is renewed: answers lost or late
//! cost the lease no sooner than without quiet rounds.
//!
//! Every message, answers included, goes to the transport by recipient:
//! the transport puts it on the one connection to that peer (so an answer
//! travels back on the connection its request came on).

use super::bootstrap::{BootstrapAuthority, BootstrapStep, LocalAgreement, LocalView, PeerReport};
use super::membership::{MembershipChange, MembershipDriver, MembershipPolicy};
use crate::leadership::LeaderState;
use crate::metrics::Metrics;
use crate::raft::{
    Configuration, Leadership, LogIndex, Message, MessageBody, NodeId, RaftCore, Role, Time,
};
use crate::storage::{HardStateStore, Persister, StorageError};
use crate::timer::DeadlineTimer;
use crate::transport::{Inbound, PeerInfo, SendToPeer};
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Period of membership decisions, bootstrap checks and gauge updates on a
/// leader, and while a node has not joined a cluster yet.
const HOUSEKEEPING_ACTIVE: Duration = Duration::from_millis(100);
/// Period of gauge updates on a joined follower (it decides nothing).
const HOUSEKEEPING_FOLLOWER: Duration = Duration::from_secs(1);
/// Housekeeping runs at the first wakeup after it is due and forces a
/// wakeup of its own only this much later: a leader's heartbeat rounds and a
/// follower's heartbeats wake the task anyway, and every extra wakeup is
/// idle CPU.
const HOUSEKEEPING_SLACK: Duration = Duration::from_millis(50);
/// Most peer messages stepped before their output is handled
/// (`NodeTask::apply_queued`).
const MAX_BATCH: usize = 16;
/// A peer unseen for this many removal graces is forgotten (the leader's
/// membership driver has removed it from the configuration by then).
const FORGET_UNSEEN_AFTER: u32 = 4;
/// Logs, at info, the messages of a leadership handoff as they go to the
/// transport, with how long the hard-state save before them took (µs): a
/// handoff's time is the sum of these steps on three nodes.
fn trace_handoff(msg: &Message, save_us: u64) {
    let (to, term) = (&msg.to, msg.term.0);
    match &msg.body {
        MessageBody::TimeoutNow => info!(%to, term, save_us, "handoff: TimeoutNow sent"),
        MessageBody::RequestVote { transfer, .. } => {
            info!(%to, term, transfer, save_us, "handoff: vote requested")
        }
        MessageBody::RequestVoteResponse { granted: true, .. } => {
            info!(%to, term, save_us, "handoff: vote granted")
        }
        _ => {}
    }
}

/// Period of re-sent Leave requests during shutdown.
const LEAVE_RETRY: Duration = Duration::from_millis(200);
/// How long a leader that abdicated keeps running so that its Leave
/// messages are sent before the process exits.
const FAREWELL_LINGER: Duration = Duration::from_millis(30);
/// Longest a retiring node waits before it checks again whether anything
/// is left to wait for (inputs wake it sooner).
const LEAVE_RECHECK: Duration = Duration::from_millis(20);
/// Least lease a quiet leader keeps: with less left, answers are read as
/// they arrive again, so a lost or late answer costs the lease no sooner
/// than without quiet rounds. The timing settings must leave at least this
/// at each round (`lease − 2 × heartbeat_interval`, 48.5 ms at the
/// defaults) for a leader to be quiet at all.
const QUIET_LEASE_MARGIN: Duration = Duration::from_millis(30);

/// Settings of the node task.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Election group.
    pub cluster_id: String,
    /// Address peers reach this node at.
    pub advertise: String,
    /// Local bootstrap: the first configuration holds this many members
    /// (self included), agreed on by all of them (`runtime::bootstrap`).
    /// `None`: only join a cluster formed elsewhere.
    pub bootstrap_expect: Option<usize>,
    /// Membership debounce and removal grace.
    pub membership: MembershipPolicy,
    /// Longest a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
}

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot persist hard state, stopping so that no vote is given twice")]
    Persist(#[from] StorageError),
}

/// The task that owns the core. Build with [`NodeTask::new`], then [`NodeTask::run`].
pub struct NodeTask {
    core: RaftCore,
    epoch: Instant,
    opts: NodeOptions,
    store: Persister,
    peers: Box<dyn SendToPeer>,
    metrics: Metrics,
    state_tx: watch::Sender<LeaderState>,
    identity_tx: watch::Sender<PeerInfo>,
    membership: MembershipDriver,
    /// Addresses of peers that are not (yet) in the configuration.
    directory: HashMap<NodeId, String>,
    last_view: Option<Leadership>,
    /// When the known leader was lost (for the election-duration histogram).
    leader_lost_at: Option<Instant>,
    /// When each peer last answered hello (pruned: see `prune_unseen`).
    last_seen: HashMap<NodeId, Instant>,
    /// Who decides the first configuration (`None`: join only).
    bootstrap: Option<Box<dyn BootstrapAuthority>>,
    shutting_down: bool,
    /// Whether the transport was last told that answers may wait (see the
    /// module docs, "Quiet rounds").
    quiet: bool,
    /// [`NodeTask::publish_key`] at the last full publish.
    published: Option<(LogIndex, bool)>,
    /// Wakes the task for Raft deadlines.
    timer: DeadlineTimer,
}

/// One input of the node task, taken but not applied yet.
enum Input {
    /// A Raft deadline (or the caller's limit) passed.
    Deadline,
    /// From the transport.
    Peer(Inbound),
    /// A peer answered hello: who is where.
    Seen(PeerInfo),
}

impl NodeTask {
    /// Wraps a core whose clock origin is `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: RaftCore,
        epoch: Instant,
        opts: NodeOptions,
        store: Box<dyn HardStateStore>,
        peers: Box<dyn SendToPeer>,
        metrics: Metrics,
        state_tx: watch::Sender<LeaderState>,
        identity_tx: watch::Sender<PeerInfo>,
    ) -> NodeTask {
        let membership = MembershipDriver::new(opts.membership.clone(), Instant::now());
        let bootstrap = opts.bootstrap_expect.map(|expect| {
            Box::new(LocalAgreement::new(expect, core.config().max_voters))
                as Box<dyn BootstrapAuthority>
        });
        NodeTask {
            core,
            epoch,
            opts,
            store: Persister::new(store),
            peers,
            metrics,
            state_tx,
            identity_tx,
            membership,
            directory: HashMap::new(),
            last_view: None,
            leader_lost_at: None,
            last_seen: HashMap::new(),
            bootstrap,
            shutting_down: false,
            quiet: false,
            published: None,
            timer: DeadlineTimer::new(),
        }
    }

    /// Replaces who decides the first configuration when this node
    /// bootstraps (the LeaderElection record when Kubernetes is on).
    pub fn with_bootstrap_authority(mut self, authority: Box<dyn BootstrapAuthority>) -> NodeTask {
        self.bootstrap = Some(authority);
        self
    }

    /// Runs until `shutdown` resolves, then hands over leadership, leaves the
    /// configuration and returns.
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut seen: mpsc::Receiver<PeerInfo>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), NodeError> {
        // The signal future is polled in a task of its own: the loop below
        // polls its stand-in at every wakeup, and a oneshot costs nothing.
        let (stop_tx, mut stop) = oneshot::channel::<()>();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(());
        });
        let mut next_housekeeping = Instant::now();
        self.handle_ready().await?;
        loop {
            let input = tokio::select! {
                // The signal first: an input stepped after it could still
                // make this node leader.
                biased;
                // SIGTERM / Ctrl-C (or the signal task is gone).
                _ = &mut stop => break,
                // Raft timers, peer messages and hello answers, until the
                // next housekeeping is due.
                input = self.next_input(&mut inbound, &mut seen, next_housekeeping + HOUSEKEEPING_SLACK) => input,
            };
            // Outside the race: a save, once begun, is awaited to its end.
            self.apply_queued(input, &mut inbound);
            self.handle_ready().await?;
            // Membership, bootstrap and gauges.
            if Instant::now() >= next_housekeeping {
                self.housekeeping();
                self.handle_ready().await?;
                next_housekeeping = Instant::now() + self.housekeeping_period();
            }
        }
        self.graceful_shutdown(&mut inbound, &mut seen).await
    }

    // ----- clock -----------------------------------------------------------

    fn now(&self) -> Time {
        Time::from_nanos(Instant::now().duration_since(self.epoch).as_nanos() as u64)
    }

    fn instant_of(&self, t: Time) -> Instant {
        self.epoch + Duration::from_nanos(t.as_nanos())
    }

    // ----- inputs ------------------------------------------------------------

    fn step(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Message(msg) => self.step_message(msg),
            // Most likely the peer's process died (the kernel closed its
            // socket without a goodbye). If it was our leader, the core
            // campaigns now and its lease waits out the old one (see the
            // core's "Crash failover").
            Inbound::ConnectionLost { peer } => {
                debug!(%peer, "connection to a peer ended without a goodbye");
                let now = self.now();
                self.core.leader_connection_lost(now, &peer);
            }
        }
    }

    fn step_message(&mut self, msg: Message) {
        let now = self.now();
        let (from, kind) = (msg.from.clone(), msg.body.kind());
        match &msg.body {
            // A handoff's steps are logged at info, with the time of the
            // hard-state save before each (see `trace_handoff`): they tell
            // where a slow handoff spent its time.
            MessageBody::TimeoutNow => {
                info!(%from, term = msg.term.0, "handoff: TimeoutNow received")
            }
            MessageBody::RequestVoteResponse { granted: true, .. }
                if self.core.role() == Role::Candidate =>
            {
                info!(%from, term = msg.term.0, "handoff: vote received")
            }
            MessageBody::Leave => debug!(%from, kind, term = msg.term.0, "lifecycle message"),
            _ => {}
        }
        if let Err(e) = self.core.step(now, msg) {
            self.metrics
                .rejected_messages
                .with_label_values(&[e.metric_label()])
                .inc();
            debug!(%from, kind, error = %e, "refused a peer message");
        }
    }

    fn peer_seen(&mut self, info: PeerInfo) {
        if info.cluster_id != self.opts.cluster_id || info.id == *self.core.id() {
            return;
        }
        let now = Instant::now();
        // A new incarnation replaces the old one: forget the old.
        let replaced: Vec<NodeId> = self
            .last_seen
            .keys()
            .filter(|id| id.name == info.id.name && **id != info.id)
            .cloned()
            .collect();
        for old in replaced {
            self.forget_peer(&old);
        }
        self.directory.insert(info.id.clone(), info.address.clone());
        self.last_seen.insert(info.id.clone(), now);
        // A node holding a bootstrap promise and no log is about to form
        // its own first configuration: never add it (runtime::bootstrap).
        let promised = info.bootstrap_lock.is_some() && !info.joined;
        if info.leaving {
            // A member on its way out is neither added again nor waited for,
            // nor handed leadership.
            self.membership.tombstone(info.id.clone(), now);
            self.core.note_retiring(&info.id);
        } else if promised {
            self.membership.forget(&info.id);
        } else {
            self.membership
                .observe(info.id.clone(), info.address.clone(), now);
        }
        if let Some(authority) = self.bootstrap.as_mut() {
            let t = Time::from_nanos(now.duration_since(self.epoch).as_nanos() as u64);
            authority.observe(
                t,
                PeerReport {
                    id: info.id,
                    address: info.address,
                    joined: info.joined,
                    leaving: info.leaving,
                    lock: info.bootstrap_lock,
                },
            );
            // Decide at once: the agreement advances one hello answer at a time.
            self.run_bootstrap();
        }
    }

    /// Forgets what this node knows of a peer outside the configuration.
    fn forget_peer(&mut self, id: &NodeId) {
        self.directory.remove(id);
        self.last_seen.remove(id);
        self.membership.forget(id);
    }

    /// Forgets peers not seen for [`FORGET_UNSEEN_AFTER`] times the removal
    /// grace: per-peer maps stay as small as the set of live peers.
    fn prune_unseen(&mut self, now: Instant) {
        let limit = self.opts.membership.removal_grace * FORGET_UNSEEN_AFTER;
        let stale: Vec<NodeId> = self
            .last_seen
            .iter()
            .filter(|(_, at)| now.saturating_duration_since(**at) > limit)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            self.forget_peer(&id);
        }
    }

    /// Returns how often housekeeping runs: often where it decides something
    /// (a leader, a node waiting to join), rarely on a joined follower, whose
    /// every wakeup is idle CPU.
    fn housekeeping_period(&self) -> Duration {
        let joined = self.core.configuration().0.contains(self.core.id());
        if self.core.role() == Role::Leader || !joined {
            HOUSEKEEPING_ACTIVE
        } else {
            HOUSEKEEPING_FOLLOWER
        }
    }

    fn housekeeping(&mut self) {
        let now = Instant::now();
        self.prune_unseen(now);
        self.run_bootstrap();
        // Every role tracks removals: a follower that becomes leader must
        // not re-add what its predecessor removed.
        self.membership
            .track_configuration(self.core.id(), self.core.configuration().0, now);
        if self.core.role() == Role::Leader && !self.shutting_down {
            self.drive_membership(now);
        }
        self.update_gauges();
    }
}

impl NodeTask {
    // ----- bootstrap and membership --------------------------------------------

    /// Asks the bootstrap authority for its next step and applies it: a
    /// promise (persisted by the next `handle_ready`, then reported), the
    /// first configuration, or a new incarnation.
    fn run_bootstrap(&mut self) {
        if self.shutting_down {
            return;
        }
        let Some(authority) = self.bootstrap.as_mut() else {
            return;
        };
        let now = Time::from_nanos(Instant::now().duration_since(self.epoch).as_nanos() as u64);
        let core = &self.core;
        let log_empty = core.log().is_empty();
        // Cheap exit for a member of a running cluster (the common case).
        if !log_empty && !core.is_pristine_bootstrap() {
            return;
        }
        let local = LocalView {
            id: core.id(),
            address: &self.opts.advertise,
            log_empty,
            pristine: core.is_pristine_bootstrap(),
            config: core.configuration().0,
            lock: core.bootstrap_lock(),
        };
        let step = authority.decide(now, &local);
        for refusal in authority.take_refusals() {
            warn!("{refusal}");
        }
        let Some(step) = step else {
            return;
        };
        let me = self.core.id().clone();
        match step {
            BootstrapStep::Lock(config) => {
                let members = config.voters.len() + config.learners.len();
                match self.core.lock_bootstrap(config) {
                    Ok(()) => info!(node = %me, members, "promised a first configuration"),
                    Err(e) => warn!(error = %e, "bootstrap promise refused"),
                }
            }
            BootstrapStep::Bootstrap(config) => {
                let (voters, learners) = (config.voters.len(), config.learners.len());
                match self.core.bootstrap(config, now) {
                    Ok(()) => {
                        self.metrics.bootstraps.inc();
                        info!(node = %me, voters, learners, "bootstrapped the first configuration")
                    }
                    Err(e) => warn!(error = %e, "bootstrap refused"),
                }
            }
            BootstrapStep::Abandon(reason) => {
                let id = NodeId::new(me.name.clone(), rand::random());
                info!(old = %me, new = %id, reason, "giving up the bootstrap attempt; continuing as a new incarnation");
                self.metrics.bootstrap_abandons.inc();
                self.core = RaftCore::fresh(
                    self.core.config().clone(),
                    id,
                    self.opts.advertise.clone(),
                    rand::random(),
                    now,
                );
                authority.reset();
            }
        }
    }

    fn drive_membership(&mut self, now: Instant) {
        let (me, config) = (self.core.id(), self.core.configuration().0);
        let Some(change) = self.membership.next_change(me, config, now) else {
            return;
        };
        let (result, kind) = match &change {
            MembershipChange::AddLearner { id, address } => (
                self.core.propose_add_learner(id.clone(), address.clone()),
                "add_learner",
            ),
            MembershipChange::Remove { id, .. } => (self.core.propose_remove(id), "remove"),
        };
        match result {
            Ok(index) => {
                self.metrics
                    .membership_changes
                    .with_label_values(&[kind])
                    .inc();
                info!(?change, index, "proposed a configuration change");
            }
            Err(e) => debug!(?change, error = %e, "configuration change deferred"),
        }
    }

    fn update_gauges(&self) {
        let now = self.now();
        self.metrics
            .is_leader
            .set(i64::from(self.core.has_lease(now) && !self.shutting_down));
        let since = if self.core.role() == Role::Leader {
            0.0
        } else {
            now.saturating_since(self.core.last_leader_contact())
                .as_secs_f64()
        };
        self.metrics.last_leader_contact_seconds.set(since);
    }

    // ----- output ----------------------------------------------------------------

    /// Persists, then sends, then publishes: the order the core requires.
    /// A failed save sends nothing. Not cancel-safe: the messages wait in
    /// this future while the state is saved.
    async fn handle_ready(&mut self) -> Result<(), NodeError> {
        let ready = self.core.take_ready();
        let saved = ready.hard_state.is_some();
        let save_started = Instant::now();
        if let Some(hs) = ready.hard_state {
            if let Err(e) = self.store.save(hs).await {
                self.metrics.persist_errors.inc();
                return Err(NodeError::Persist(e));
            }
        }
        let save_us = save_started.elapsed().as_micros() as u64;
        for msg in ready.messages {
            trace_handoff(&msg, save_us);
            self.send(msg);
        }
        let quiet = self.answers_may_wait();
        if quiet != self.quiet {
            self.quiet = quiet;
            self.peers.set_quiet(quiet);
        }
        match ready.leadership {
            Some(view) => self.on_leadership(view, saved),
            // A saved promise or first configuration is reported at once.
            None if saved => {
                if let Some(view) = self.last_view.clone() {
                    self.publish(&view);
                }
            }
            None => {}
        }
        Ok(())
    }

    /// Returns whether followers' answers may wait on their connections
    /// until the next round (module docs, "Quiet rounds"): only on a leader
    /// holding more than [`QUIET_LEASE_MARGIN`] of lease, with every entry
    /// committed and every member caught up, not handing over and not
    /// shutting down. Then nothing but heartbeat answers is expected, and
    /// none is urgent.
    fn answers_may_wait(&self) -> bool {
        let core = &self.core;
        let cfg = core.config();
        if core.role() != Role::Leader
            || self.shutting_down
            || core.is_transferring()
            || cfg.lease_duration() < cfg.heartbeat_interval * 2 + QUIET_LEASE_MARGIN
            || core.lease_remaining(self.now()) <= QUIET_LEASE_MARGIN
        {
            return false;
        }
        let last = core.log().last_index();
        let (config, _) = core.configuration();
        let me = core.id();
        core.commit_index() == last
            && config
                .voters
                .keys()
                .chain(config.learners.keys())
                .filter(|id| *id != me)
                .all(|id| core.member_progress(id).is_some_and(|(m, _)| m == last))
    }

    /// Hands `msg` to the transport with the address to dial should there be
    /// no connection to its recipient yet.
    fn send(&mut self, msg: Message) {
        let address = self
            .core
            .configuration()
            .0
            .address(&msg.to)
            .or_else(|| self.directory.get(&msg.to).map(String::as_str));
        self.peers.send(address, msg);
    }

    /// Counts and logs what changed since the last view, then publishes
    /// `view`. `saved`: the same output saved hard state (a promise that
    /// the identity reports), so everything is published afresh.
    fn on_leadership(&mut self, view: Leadership, saved: bool) {
        let now = Instant::now();
        let prev = self.last_view.take();
        let prev_role = prev.as_ref().map_or(Role::Follower, |p| p.role);
        let prev_term = prev.as_ref().map(|p| p.term);
        let prev_leader = prev.as_ref().and_then(|p| p.leader.as_ref());
        let m = &self.metrics;
        m.term.set(view.term.0 as i64);
        m.voters.set(view.voters as i64);
        m.learners.set(view.learners as i64);
        if view.role == Role::Candidate
            && (prev_role != Role::Candidate || prev_term != Some(view.term))
        {
            if prev_role == Role::Candidate {
                m.elections_lost.inc();
            }
            m.elections_started.inc();
        }
        if prev_role == Role::Candidate && view.role != Role::Candidate {
            if view.role == Role::Leader {
                m.elections_won.inc();
            } else {
                m.elections_lost.inc();
            }
        }
        if view.role == Role::Leader
            && view.lease_until.is_some()
            && (prev_role != Role::Leader || prev.as_ref().is_some_and(|p| p.lease_until.is_none()))
        {
            info!(term = %view.term, "handoff: lease held, /is-leader answers 200");
        }
        if view.role == Role::Leader && prev_role != Role::Leader {
            info!(term = %view.term, "became leader");
            self.membership.restart_grace(now);
        } else if prev_role == Role::Leader && view.role != Role::Leader {
            info!(term = %view.term, "stepped down");
        }
        match (prev_leader, &view.leader) {
            (Some(_), None) => {
                self.leader_lost_at = Some(self.instant_of(self.core.last_leader_contact()));
            }
            (old, Some(new)) if old != Some(new) => {
                m.leader_changes.inc();
                if let Some(lost) = self.leader_lost_at.take() {
                    m.election_duration
                        .observe(now.saturating_duration_since(lost).as_secs_f64());
                }
                info!(leader = %new, term = %view.term, "leader known");
            }
            _ => {}
        }
        let lease_only = !saved
            && prev.as_ref().is_some_and(|p| same_but_lease(p, &view))
            && self.published == Some(self.publish_key());
        if !(lease_only && self.publish_lease(&view)) {
            self.publish(&view);
        }
        self.last_view = Some(view);
    }

    /// What, besides the view, goes into a published state: the
    /// configuration (members, whether this node joined) and whether this
    /// node is shutting down. (The bootstrap promise changes only with a
    /// save.)
    fn publish_key(&self) -> (LogIndex, bool) {
        (self.core.configuration().1, self.shutting_down)
    }

    /// Stores a new lease deadline, the one thing a leader's view changes
    /// at every round, in the published state without rebuilding it and
    /// without waking anyone (readers see it when they look; waiters look
    /// again when the lease they saw runs out). Only for a view that differs
    /// from the last published one in nothing else, and only while the
    /// published lease has not run out: a lease regained is news. Returns
    /// whether it stored the deadline; if not, publish in full.
    fn publish_lease(&self, view: &Leadership) -> bool {
        let now = Instant::now();
        let Some(until) = view.lease_until.map(|t| self.instant_of(t)) else {
            return false;
        };
        if self.shutting_down {
            return false;
        }
        let mut stored = false;
        self.state_tx.send_if_modified(|current| {
            if current.is_leader_at(now) {
                current.lease_until = Some(until);
                stored = true;
            }
            false
        });
        if stored {
            self.metrics.is_leader.set(i64::from(now < until));
        }
        stored
    }

    fn publish(&mut self, view: &Leadership) {
        self.published = Some(self.publish_key());
        let joined = self.core.configuration().0.contains(self.core.id());
        let lease_until = if self.shutting_down {
            None
        } else {
            view.lease_until.map(|t| self.instant_of(t))
        };
        let me = self.core.id();
        let state = LeaderState {
            node_id: me.to_string(),
            node_name: me.name.to_string(),
            role: view.role,
            term: view.term.0,
            leader: view.leader.as_ref().map(|l| l.name.to_string()),
            leader_id: view.leader.as_ref().map(|l| l.to_string()),
            leader_address: view.leader_address.clone(),
            lease_until,
            is_voter: view.is_voter,
            voters: view.voters,
            learners: view.learners,
            joined,
            shutting_down: self.shutting_down,
            members: members_of(self.core.configuration().0),
        };
        self.metrics
            .is_leader
            .set(i64::from(state.is_leader_at(Instant::now())));
        // A lease extension alone wakes nobody (20 times a second on a
        // leader): readers see the new deadline when they look, and waiters
        // look again when the lease they saw runs out.
        let now = Instant::now();
        self.state_tx.send_if_modified(|current| {
            let lease_only = current.lease_until.is_some_and(|until| until > now)
                && state.lease_until.is_some()
                && LeaderState {
                    lease_until: current.lease_until,
                    ..state.clone()
                } == *current;
            *current = state;
            !lease_only
        });
        let info = PeerInfo {
            cluster_id: self.opts.cluster_id.clone(),
            id: me.clone(),
            address: self.opts.advertise.clone(),
            joined,
            term: view.term.0,
            leader: view.leader.clone(),
            leaving: self.shutting_down,
            bootstrap_lock: self.core.bootstrap_lock().cloned(),
        };
        // Only real changes wake the identity's readers (not lease renewals).
        self.identity_tx.send_if_modified(|current| {
            if *current == info {
                false
            } else {
                *current = info;
                true
            }
        });
    }

    // ----- shutdown ------------------------------------------------------------------

    /// Retires the core (it never campaigns or leads again), hands
    /// leadership over (TimeoutNow to the most up-to-date voter not known to
    /// be leaving, the next one when a target refuses), asks the leader to
    /// remove this member, then returns. Whether there is anything left to
    /// wait for is checked again after every input, not once: the group may
    /// be going away around this node. Bounded by `shutdown_timeout`.
    async fn graceful_shutdown(
        mut self,
        inbound: &mut mpsc::Receiver<Inbound>,
        seen: &mut mpsc::Receiver<PeerInfo>,
    ) -> Result<(), NodeError> {
        let started = Instant::now();
        let deadline = started + self.opts.shutdown_timeout;
        self.shutting_down = true;
        let now = self.now();
        self.core.retire(now);
        // Stop claiming leadership at once: /is-leader answers 503 from here on.
        let view = self.core.leadership();
        self.publish(&view);
        self.metrics.is_leader.set(0);
        info!(role = %self.core.role(), "shutting down: retiring, never leading again");
        self.handle_ready().await?;
        let mut next_leave = Instant::now();
        // The leader last asked: a new one (or none) is asked at once.
        let mut asked: Option<Option<NodeId>> = None;
        let reason = loop {
            if let Some(reason) = self.nothing_left_to_wait_for() {
                break reason;
            }
            if Instant::now() >= deadline {
                break "shutdown timeout";
            }
            if self.core.role() == Role::Leader {
                if !self.core.is_transferring() {
                    let now = self.now();
                    match self.core.transfer_leadership(now, None) {
                        Ok(target) => info!(%target, "shutting down: handing leadership over"),
                        Err(e) => {
                            info!(error = %e, "shutting down: nobody left to hand leadership over to");
                            self.core.abdicate(now);
                            self.handle_ready().await?;
                            // The client sends from tasks of its own: give
                            // the farewell Leaves a moment to leave the
                            // process, or the members wait for nothing.
                            let linger = Instant::now() + FAREWELL_LINGER;
                            while Instant::now() < linger {
                                self.pump(inbound, seen, linger).await?;
                            }
                            break "nobody left to hand leadership over to";
                        }
                    }
                }
            } else if Instant::now() >= next_leave
                || asked.as_ref() != Some(&self.core.leader().cloned())
            {
                asked = Some(self.core.leader().cloned());
                if self.core.leave() {
                    debug!("asked the leader to remove this member");
                }
                next_leave = Instant::now() + LEAVE_RETRY;
            }
            self.handle_ready().await?;
            // Never a wakeup in the past: that would spin without yielding
            // and starve the tasks that carry this node's messages.
            let now = Instant::now();
            let mut wake = (now + LEAVE_RECHECK).min(deadline);
            if next_leave > now {
                wake = wake.min(next_leave);
            }
            self.pump(inbound, seen, wake).await?;
        };
        let removed = !self.core.configuration().0.contains(self.core.id());
        info!(
            removed,
            reason,
            took_ms = started.elapsed().as_millis() as u64,
            "left the cluster"
        );
        Ok(())
    }

    /// Returns why a retiring node may exit now, if it may: it is no longer
    /// a member (removed, or never joined); it is the only voter; or, not
    /// leading, the group is going away: its leader left without a
    /// successor, or every other voter is leaving and no leader was heard
    /// for an election timeout (none will be elected to remove it).
    fn nothing_left_to_wait_for(&self) -> Option<&'static str> {
        let (config, _) = self.core.configuration();
        let me = self.core.id();
        if !config.contains(me) {
            return Some("not a member");
        }
        if config.voters.len() == 1 && config.is_voter(me) {
            return Some("the only voter");
        }
        if self.core.role() == Role::Leader {
            return None;
        }
        if self.core.leader_abdicated() {
            return Some("the leader left without a successor: the group is going away");
        }
        let silent = self.now().saturating_since(self.core.last_leader_contact())
            >= self.core.config().election_timeout_max;
        if self.core.others_retiring() && silent {
            return Some("every other voter is leaving and no leader is left");
        }
        None
    }

    /// Processes one input, or ticks the core at its next deadline or at
    /// `until`, whichever comes first, and handles what follows. Not
    /// cancel-safe (see [`NodeTask::handle_ready`]).
    async fn pump(
        &mut self,
        inbound: &mut mpsc::Receiver<Inbound>,
        seen: &mut mpsc::Receiver<PeerInfo>,
        until: Instant,
    ) -> Result<(), NodeError> {
        let input = self.next_input(inbound, seen, until).await;
        self.apply(input);
        self.handle_ready().await
    }

    /// Returns when to wake without input: the core's next deadline,
    /// `until`, or on a quiet leader the moment its lease is down to
    /// [`QUIET_LEASE_MARGIN`], whichever comes first.
    fn deadline(&self, until: Instant) -> Instant {
        let deadline = self.instant_of(self.core.next_deadline()).min(until);
        match self.core.lease_until().filter(|_| self.quiet) {
            // Quiet ends when the lease runs low. A round's answers renew
            // it long before, so normally this deadline never comes.
            Some(lease_until) => deadline.min(self.instant_of(lease_until) - QUIET_LEASE_MARGIN),
            None => deadline,
        }
    }

    /// Waits for the next input, or for the core's next deadline or
    /// `until`, whichever comes first. Cancel-safe: changes nothing.
    async fn next_input(
        &mut self,
        inbound: &mut mpsc::Receiver<Inbound>,
        seen: &mut mpsc::Receiver<PeerInfo>,
        until: Instant,
    ) -> Input {
        let deadline = self.deadline(until);
        tokio::select! {
            // A Raft timer (heartbeat round, election timeout, CheckQuorum;
            // a tick before the core's deadline does nothing).
            _ = self.timer.sleep_until(deadline) => Input::Deadline,
            // A peer message, already authenticated by the transport.
            Some(msg) = inbound.recv() => Input::Peer(msg),
            // A peer answered hello: who is where.
            Some(info) = seen.recv() => Input::Seen(info),
        }
    }

    /// Applies `input` and the peer messages already queued behind it, so
    /// that one `handle_ready` handles them all: one save, one set of
    /// sends, one view (an idle leader's answers arrive together, one per
    /// follower). Persisting before sending holds for the batch as for one
    /// input. Only what waits already is taken, at most [`MAX_BATCH`], so
    /// nothing is delayed and the timers stay served.
    fn apply_queued(&mut self, input: Input, inbound: &mut mpsc::Receiver<Inbound>) {
        self.apply(input);
        for _ in 1..MAX_BATCH {
            let Ok(msg) = inbound.try_recv() else { break };
            self.apply(Input::Peer(msg));
        }
    }

    /// Feeds an input to the core (its output is left for `handle_ready`).
    fn apply(&mut self, input: Input) {
        match input {
            Input::Deadline => {
                let now = self.now();
                self.core.tick(now);
            }
            Input::Peer(msg) => self.step(msg),
            Input::Seen(info) => self.peer_seen(info),
        }
    }
}

/// Lists a configuration's members for the leadership watch, voters first.
fn members_of(config: &Configuration) -> Vec<crate::leadership::MemberInfo> {
    let member = |(id, address): (&NodeId, &String), voter| crate::leadership::MemberInfo {
        name: id.name.to_string(),
        id: id.to_string(),
        address: address.clone(),
        voter,
    };
    let voters = config.voters.iter().map(|m| member(m, true));
    let learners = config.learners.iter().map(|m| member(m, false));
    voters.chain(learners).collect()
}

/// Returns whether two views differ at most in the lease's end.
fn same_but_lease(a: &Leadership, b: &Leadership) -> bool {
    let Leadership {
        role,
        term,
        leader,
        leader_address,
        lease_until: _,
        is_voter,
        voters,
        learners,
    } = a;
    *role == b.role
        && *term == b.term
        && *leader == b.leader
        && *leader_address == b.leader_address
        && *is_voter == b.is_voter
        && *voters == b.voters
        && *learners == b.learners
}

#[cfg(test)]
mod tests {
    //! The node task with a recording store and transport: what it saves,
    //! what it sends and where, in which order, and what it forgets.
    use super::*;
    use crate::raft::{Config, HardState, Term};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    #[derive(Debug, PartialEq)]
    enum Event {
        Saved {
            term: u64,
        },
        Sent {
            to: NodeId,
            address: Option<String>,
            kind: &'static str,
        },
        /// The node told the transport whether answers may wait.
        Quiet(bool),
    }

    type Log = Arc<Mutex<Vec<Event>>>;

    #[derive(Default)]
    struct Store {
        log: Log,
        fail: bool,
        slow: Option<SlowDisk>,
    }

    /// A disk on which a save takes `delay`; counts what `ticks` (advanced
    /// by another task) moved on meanwhile in `ticks_during_save`.
    struct SlowDisk {
        delay: Duration,
        ticks: Arc<AtomicUsize>,
        ticks_during_save: Arc<AtomicUsize>,
    }

    impl HardStateStore for Store {
        fn load(&self) -> Result<Option<HardState>, StorageError> {
            Ok(None)
        }
        fn save(&mut self, state: &HardState) -> Result<(), StorageError> {
            if self.fail {
                return Err(StorageError::Io {
                    action: "write",
                    path: "/full-disk".into(),
                    source: std::io::Error::other("disk full"),
                });
            }
            if let Some(slow) = &self.slow {
                let before = slow.ticks.load(Ordering::SeqCst);
                std::thread::sleep(slow.delay);
                let moved = slow.ticks.load(Ordering::SeqCst) - before;
                slow.ticks_during_save.store(moved, Ordering::SeqCst);
            }
            self.log
                .lock()
                .unwrap()
                .push(Event::Saved { term: state.term.0 });
            Ok(())
        }
    }

    struct Peers(Log);

    impl SendToPeer for Peers {
        fn send(&self, address: Option<&str>, msg: Message) {
            self.0.lock().unwrap().push(Event::Sent {
                to: msg.to.clone(),
                address: address.map(str::to_owned),
                kind: msg.body.kind(),
            });
        }

        fn set_quiet(&self, quiet: bool) {
            self.0.lock().unwrap().push(Event::Quiet(quiet));
        }
    }

    fn id(name: &str) -> NodeId {
        NodeId::new(name, 1)
    }

    /// Node `a` of {a, b, c}, its initial state saved; the log is empty.
    async fn node(fail_saves: bool) -> (NodeTask, Log, watch::Receiver<LeaderState>) {
        let (mut task, log, state_rx) = node_of(&["a", "b", "c"]).await;
        if fail_saves {
            task.store = Persister::new(Box::new(Store {
                log: log.clone(),
                fail: true,
                slow: None,
            }));
        }
        (task, log, state_rx)
    }

    /// Node `a` of a first configuration of `voters`, its initial state
    /// saved; the log is empty.
    async fn node_of(voters: &[&str]) -> (NodeTask, Log, watch::Receiver<LeaderState>) {
        let log: Log = Arc::default();
        let mut core = RaftCore::fresh(Config::default(), id("a"), "a:4041".into(), 7, Time::ZERO);
        let voters = voters.iter().map(|n| (id(n), format!("{n}:4041")));
        core.bootstrap(Configuration::with_voters(voters), Time::ZERO)
            .unwrap();
        let (state_tx, state_rx) = watch::channel(LeaderState::initial("a#1".into(), "a".into()));
        let (identity_tx, _) = watch::channel(PeerInfo {
            cluster_id: "test".into(),
            id: id("a"),
            address: "a:4041".into(),
            joined: false,
            term: 0,
            leader: None,
            leaving: false,
            bootstrap_lock: None,
        });
        let opts = NodeOptions {
            cluster_id: "test".into(),
            advertise: "a:4041".into(),
            bootstrap_expect: None,
            membership: MembershipPolicy {
                add_after: Duration::from_secs(1),
                removal_grace: Duration::from_secs(2),
            },
            shutdown_timeout: Duration::from_secs(1),
        };
        let store = Store {
            log: log.clone(),
            ..Store::default()
        };
        let mut task = NodeTask::new(
            core,
            Instant::now(),
            opts,
            Box::new(store),
            Box::new(Peers(log.clone())),
            Metrics::new(),
            state_tx,
            identity_tx,
        );
        task.handle_ready().await.unwrap();
        log.lock().unwrap().clear();
        (task, log, state_rx)
    }

    /// A vote request from `from` in `term` (a transfer, so stickiness does
    /// not apply) with a log as long as anyone's.
    fn vote_request(from: &str, term: u64) -> Inbound {
        Inbound::Message(Message {
            from: id(from),
            to: id("a"),
            term: Term(term),
            body: MessageBody::RequestVote {
                last_log_index: 100,
                last_log_term: Term(term - 1),
                transfer: true,
            },
        })
    }

    fn seen(name: &str, incarnation: u64) -> PeerInfo {
        PeerInfo {
            cluster_id: "test".into(),
            id: NodeId::new(name, incarnation),
            address: format!("{name}:4041"),
            joined: false,
            term: 0,
            leader: None,
            leaving: false,
            bootstrap_lock: None,
        }
    }

    #[tokio::test]
    async fn the_new_term_and_vote_are_saved_before_the_answer_is_sent() {
        let (mut task, log, _) = node(false).await;
        task.step(vote_request("b", 5));
        task.handle_ready().await.unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log.first(), Some(&Event::Saved { term: 5 }), "{log:?}");
        assert_eq!(
            log.get(1),
            Some(&Event::Sent {
                to: id("b"),
                address: Some("b:4041".into()),
                kind: "request_vote_response",
            }),
            "the answer goes to the requester at its configured address: {log:?}"
        );
        assert_eq!(log.len(), 2, "{log:?}");
    }

    #[tokio::test]
    async fn messages_queued_together_are_saved_once_before_any_answer_is_sent() {
        let (mut task, log, _) = node(false).await;
        let (tx, mut inbound) = mpsc::channel(4);
        tx.try_send(vote_request("c", 6)).unwrap();
        tx.try_send(vote_request("c", 7)).unwrap();
        task.apply_queued(Input::Peer(vote_request("b", 5)), &mut inbound);
        task.handle_ready().await.unwrap();
        let log = log.lock().unwrap();
        let kinds: Vec<_> = log
            .iter()
            .map(|e| match e {
                Event::Saved { term } => format!("saved {term}"),
                Event::Sent { to, kind, .. } => format!("{kind} to {}", to.name),
                Event::Quiet(q) => format!("quiet {q}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "saved 7",
                "request_vote_response to b",
                "request_vote_response to c",
                "request_vote_response to c"
            ],
            "one save of the last term and vote, then every answer"
        );
        assert!(inbound.try_recv().is_err(), "the queue was taken");
    }

    #[tokio::test]
    async fn a_failed_save_sends_nothing_and_stops_the_node() {
        let (mut task, log, _) = node(true).await;
        task.step(vote_request("b", 5));
        assert!(matches!(
            task.handle_ready().await,
            Err(NodeError::Persist(_))
        ));
        assert!(log.lock().unwrap().is_empty());
        assert_eq!(task.metrics.persist_errors.get(), 1);
    }

    #[tokio::test]
    async fn an_answer_to_a_stranger_goes_to_the_address_it_was_seen_at() {
        let (mut task, log, _) = node(false).await;
        task.peer_seen(seen("d", 1));
        task.step(vote_request("d", 5));
        task.handle_ready().await.unwrap();
        let log = log.lock().unwrap();
        let sent: Vec<_> = log
            .iter()
            .filter_map(|e| match e {
                Event::Sent { to, address, .. } => Some((to.clone(), address.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(sent, vec![(NodeId::new("d", 1), Some("d:4041".into()))]);
    }

    #[tokio::test]
    async fn a_new_incarnation_replaces_the_old_one_in_every_peer_map() {
        let (mut task, _, _) = node(false).await;
        task.peer_seen(seen("d", 1));
        task.peer_seen(seen("d", 2));
        let old = NodeId::new("d", 1);
        assert!(!task.directory.contains_key(&old));
        assert!(!task.last_seen.contains_key(&old));
        assert_eq!(task.membership.address_of(&old), None);
        assert!(task.directory.contains_key(&NodeId::new("d", 2)));
    }

    #[tokio::test]
    async fn peers_unseen_for_long_are_forgotten() {
        let (mut task, _, _) = node(false).await;
        task.peer_seen(seen("d", 1));
        task.prune_unseen(Instant::now() + Duration::from_secs(1));
        assert_eq!(task.directory.len(), 1, "recently seen: kept");
        task.prune_unseen(Instant::now() + Duration::from_secs(2) * (FORGET_UNSEEN_AFTER + 1));
        assert!(task.directory.is_empty());
        assert!(task.last_seen.is_empty());
        assert_eq!(task.membership.address_of(&NodeId::new("d", 1)), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_lease_end_alone_is_stored_in_place_and_wakes_no_waiter() {
        let (mut task, _, mut rx) = node(false).await;
        let now = task.now();
        let view = |lease_ms: u64| Leadership {
            role: Role::Leader,
            term: Term(3),
            leader: Some(id("a")),
            leader_address: Some("a:4041".into()),
            lease_until: Some(now + Duration::from_millis(lease_ms)),
            is_voter: true,
            voters: 3,
            learners: 0,
        };
        // Blanks the published members without waking anyone: a full
        // publish rebuilds them, storing a new lease end in place does not.
        let mark = |task: &NodeTask| {
            task.state_tx.send_if_modified(|s| {
                s.members.clear();
                false
            });
        };
        task.on_leadership(view(100), false);
        assert!(rx.has_changed().unwrap(), "becoming leader is news");
        assert_eq!(rx.borrow_and_update().members.len(), 3);

        mark(&task);
        task.on_leadership(view(300), false);
        assert!(!rx.has_changed().unwrap(), "an extension is not news");
        {
            let state = rx.borrow();
            assert!(state.members.is_empty(), "stored in place, nothing rebuilt");
            let until = state.lease_until.expect("lease");
            assert!(
                until >= Instant::now() + Duration::from_millis(250),
                "readers see the new end at once"
            );
        }
        assert_eq!(task.metrics.is_leader.get(), 1);

        // A save in the same output (a bootstrap promise) republishes it all.
        task.on_leadership(view(400), true);
        assert_eq!(rx.borrow_and_update().members.len(), 3, "published in full");

        // A lease that ran out and came back is news, published in full.
        tokio::time::advance(Duration::from_millis(500)).await;
        mark(&task);
        task.on_leadership(view(900), false);
        assert!(rx.has_changed().unwrap(), "a lease regained is news");
        assert_eq!(rx.borrow_and_update().members.len(), 3);

        // So is shutting down: the lease is no longer claimed.
        mark(&task);
        task.shutting_down = true;
        task.on_leadership(view(1000), false);
        assert!(rx.has_changed().unwrap(), "shutting down is news");
        let state = rx.borrow_and_update();
        assert_eq!(state.members.len(), 3);
        assert_eq!(state.lease_until, None);
        assert!(state.shutting_down);
    }

    #[tokio::test]
    async fn a_lease_extension_alone_wakes_no_waiter() {
        let (mut task, _, mut rx) = node(false).await;
        let now = task.now();
        let view = |lease_ms: u64| Leadership {
            role: Role::Leader,
            term: Term(3),
            leader: Some(id("a")),
            leader_address: Some("a:4041".into()),
            lease_until: Some(now + Duration::from_millis(lease_ms)),
            is_voter: true,
            voters: 3,
            learners: 0,
        };
        task.publish(&view(100));
        assert!(rx.has_changed().unwrap(), "becoming leader is news");
        rx.borrow_and_update();
        task.publish(&view(200));
        assert!(!rx.has_changed().unwrap(), "an extension is not news");
        let until = rx.borrow().lease_until.expect("lease");
        assert!(
            until >= Instant::now() + Duration::from_millis(150),
            "but readers see it"
        );
        let mut other = view(200);
        other.voters = 4;
        task.publish(&other);
        assert!(rx.has_changed().unwrap(), "anything else is news");
    }

    #[tokio::test]
    async fn a_slow_save_holds_up_the_send_but_not_the_runtime_thread() {
        let (mut task, log, _) = node(false).await;
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticks_during_save = Arc::new(AtomicUsize::new(0));
        task.store = Persister::new(Box::new(Store {
            log: log.clone(),
            fail: false,
            slow: Some(SlowDisk {
                delay: Duration::from_millis(300),
                ticks: ticks.clone(),
                ticks_during_save: ticks_during_save.clone(),
            }),
        }));
        // Another task on this (single-threaded) runtime, as the API is.
        let ticker = tokio::spawn(async move {
            loop {
                ticks.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        task.step(vote_request("b", 5));
        task.handle_ready().await.unwrap();
        ticker.abort();
        let moved = ticks_during_save.load(Ordering::SeqCst);
        assert!(
            moved >= 10,
            "the runtime thread ran other tasks only {moved} times during a 300 ms save"
        );
        let log = log.lock().unwrap();
        let kinds: Vec<_> = log
            .iter()
            .filter(|e| matches!(e, Event::Saved { .. } | Event::Sent { .. }))
            .collect();
        assert!(
            matches!(
                kinds.as_slice(),
                [Event::Saved { term: 5 }, Event::Sent { .. }]
            ),
            "the vote is durable before the answer leaves: {log:?}"
        );
    }

    #[tokio::test]
    async fn an_interrupted_save_stops_every_later_one() {
        let (mut task, log, _) = node(false).await;
        task.store = Persister::new(Box::new(Store {
            log,
            fail: false,
            slow: Some(SlowDisk {
                delay: Duration::from_millis(200),
                ticks: Arc::default(),
                ticks_during_save: Arc::default(),
            }),
        }));
        let state = task.core.hard_state();
        // Dropped before it finishes: the store goes with the unfinished save.
        let save = task.store.save(state.clone());
        drop(save);
        let later = task.store.save(state.clone()).await;
        assert!(matches!(later, Ok(())), "a save never begun loses nothing");
        {
            let mut save = Box::pin(task.store.save(state.clone()));
            // Polled once: the blocking save is under way.
            assert!(futures::poll!(save.as_mut()).is_pending());
        }
        let later = task.store.save(state).await;
        assert!(
            matches!(later, Err(StorageError::Interrupted)),
            "no second save may race the unfinished one: {later:?}"
        );
    }

    #[tokio::test]
    async fn a_follower_never_lets_answers_wait() {
        let (mut task, log, _) = node(false).await;
        task.step(vote_request("b", 5));
        task.handle_ready().await.unwrap();
        task.apply(Input::Deadline);
        task.handle_ready().await.unwrap();
        let log = log.lock().unwrap();
        assert!(!log.iter().any(|e| matches!(e, Event::Quiet(_))), "{log:?}");
    }

    #[tokio::test]
    async fn a_leader_with_its_lease_lets_answers_wait_until_it_shuts_down() {
        let (mut task, log, _) = node_of(&["a"]).await;
        // A sole voter elects itself at its election deadline.
        let t = task.core.next_deadline();
        task.core.tick(t);
        task.handle_ready().await.unwrap();
        assert_eq!(task.core.role(), Role::Leader);
        assert_eq!(log.lock().unwrap().last(), Some(&Event::Quiet(true)));
        task.apply(Input::Deadline);
        task.handle_ready().await.unwrap();
        let told = |log: &Log| {
            log.lock()
                .unwrap()
                .iter()
                .filter(|e| matches!(e, Event::Quiet(_)))
                .count()
        };
        assert_eq!(told(&log), 1, "told once, not at every round");
        task.shutting_down = true;
        task.handle_ready().await.unwrap();
        assert_eq!(log.lock().unwrap().last(), Some(&Event::Quiet(false)));
    }

    #[tokio::test]
    async fn a_quiet_leader_wakes_when_its_lease_runs_low() {
        let (mut task, _log, _) = node_of(&["a"]).await;
        let t = task.core.next_deadline();
        task.core.tick(t);
        task.handle_ready().await.unwrap();
        assert!(task.quiet);
        let lease_until = task.core.lease_until().expect("a sole voter holds a lease");
        let wake = task.deadline(Instant::now() + Duration::from_secs(60));
        assert!(
            wake <= task.instant_of(lease_until) - QUIET_LEASE_MARGIN,
            "the node wakes before its lease is down to the margin"
        );
    }
}
