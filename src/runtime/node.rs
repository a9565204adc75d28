//! The node task: the one owner of the Raft core.
//!
//! ```text
//!   inbound peer messages ─┐
//!   hello answers (seen) ──┤      ┌──────────────┐  persist ─► HardStateStore
//!   raft timer (deadline) ─┼────► │  NodeTask    │  send ────► PeerClient
//!   housekeeping (0.1-1 s) ┤      │  owns core   │  publish ─► watch<LeaderState>
//!   shutdown future ───────┘      └──────────────┘              watch<PeerInfo>
//! ```
//!
//! After every input the task drains the core's `Ready` in order: hard state
//! is saved (and fsynced) before any message that depends on it is sent. A
//! failed save stops the node: sending after it could give a vote twice.
//!
//! A peer message that arrived as a request carries a reply slot: the
//! messages addressed back to its sender in the following `Ready` (after the
//! save) go into the HTTP answer instead of a request of their own.
//!
//! A leader whose lease outlasts its next heartbeat round by a margin sends
//! AppendEntries over peer streams and reads the answers when it next wakes
//! (at the latest for that round), so an idle leader wakes once per round,
//! not once per answer. Should the lease come to end before the next round
//! (answers missing), it wakes just before the end to read what arrived.

use super::membership::{MembershipChange, MembershipDriver, MembershipPolicy};
use super::streams::InboundStreams;
use super::timer::DeadlineTimer;
use crate::leadership::LeaderState;
use crate::metrics::Metrics;
use crate::raft::{Configuration, Leadership, Message, MessageBody, NodeId, RaftCore, Role, Time};
use crate::storage::{HardStateStore, StorageError};
use crate::transport::{AcceptedStream, Inbound, PeerClient, PeerInfo};
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
/// Period of re-sent Leave requests during shutdown.
const LEAVE_RETRY: Duration = Duration::from_millis(200);
/// How long a leader that abdicated keeps running so that its Leave
/// messages are sent before the process exits.
const FAREWELL_LINGER: Duration = Duration::from_millis(30);
/// Longest a retiring node waits before it checks again whether anything
/// is left to wait for (inputs wake it sooner).
const LEAVE_RECHECK: Duration = Duration::from_millis(20);
/// How recently a peer must have answered to count for bootstrap.
const BOOTSTRAP_FRESHNESS: Duration = Duration::from_secs(5);
/// How much longer than the next heartbeat round the lease must last for a
/// leader to send over peer streams, whose answers it reads only at its next
/// wakeup.
const STREAM_LEASE_MARGIN: Duration = Duration::from_millis(10);
/// A leader whose lease would end before its next round wakes this long
/// before the end to read the answers waiting on its peer streams.
const LEASE_RESCUE_LEAD: Duration = Duration::from_millis(3);

/// Settings of the node task.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Election group.
    pub cluster_id: String,
    /// Address peers reach this node at.
    pub advertise: String,
    /// Local bootstrap: form the cluster once this many members (self
    /// included) are seen and none has joined one; the lowest id bootstraps.
    /// `None`: only join a cluster formed elsewhere.
    pub bootstrap_expect: Option<usize>,
    /// Membership debounce and removal grace.
    pub membership: MembershipPolicy,
    /// Longest a graceful shutdown may take before the process exits anyway.
    pub shutdown_timeout: Duration,
    /// Largest frame accepted on a peer stream (the transport's body limit).
    pub max_frame_bytes: usize,
}

/// Why the node stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot persist hard state, stopping so that no vote is given twice: {0}")]
    Persist(#[from] StorageError),
}

/// The task that owns the core. Build with [`NodeTask::new`], then [`NodeTask::run`].
pub struct NodeTask {
    core: RaftCore,
    epoch: Instant,
    opts: NodeOptions,
    store: Box<dyn HardStateStore>,
    client: PeerClient,
    metrics: Metrics,
    state_tx: watch::Sender<LeaderState>,
    identity_tx: watch::Sender<PeerInfo>,
    membership: MembershipDriver,
    /// Addresses of peers that are not (yet) in the configuration.
    directory: HashMap<NodeId, String>,
    last_view: Option<Leadership>,
    /// When the known leader was lost (for the election-duration histogram).
    leader_lost_at: Option<Instant>,
    /// Peers seen by hello, for local bootstrap: (joined a cluster, when).
    bootstrap_seen: HashMap<NodeId, (bool, Instant)>,
    /// The sender of the message just stepped and its reply slot; filled by
    /// the next `handle_ready`, after the save.
    pending_reply: Option<(NodeId, ReplyTo)>,
    shutting_down: bool,
    /// Wakes the task for Raft deadlines and stream polls.
    timer: DeadlineTimer,
    /// Streams leaders opened to this node, read when it wakes.
    streams: InboundStreams,
    /// Where the peer server hands those streams over.
    accepted: Option<mpsc::Receiver<AcceptedStream>>,
}

impl NodeTask {
    /// Wraps a core whose clock origin is `epoch`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        core: RaftCore,
        epoch: Instant,
        opts: NodeOptions,
        store: Box<dyn HardStateStore>,
        client: PeerClient,
        metrics: Metrics,
        state_tx: watch::Sender<LeaderState>,
        identity_tx: watch::Sender<PeerInfo>,
    ) -> NodeTask {
        let membership = MembershipDriver::new(opts.membership.clone(), Instant::now());
        let heartbeat = core.config().heartbeat_interval;
        let max_frame = opts.max_frame_bytes;
        let metrics_for_streams = metrics.clone();
        NodeTask {
            core,
            epoch,
            opts,
            store,
            client,
            metrics,
            state_tx,
            identity_tx,
            membership,
            directory: HashMap::new(),
            last_view: None,
            leader_lost_at: None,
            bootstrap_seen: HashMap::new(),
            pending_reply: None,
            shutting_down: false,
            timer: DeadlineTimer::new(),
            streams: InboundStreams::new(heartbeat, max_frame, metrics_for_streams),
            accepted: None,
        }
    }

    /// Reads the peer streams the server hands over on `accepted` (built
    /// with `transport::router_with_streams`).
    pub fn with_accepted_streams(mut self, accepted: mpsc::Receiver<AcceptedStream>) -> NodeTask {
        self.accepted = Some(accepted);
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
        self.handle_ready()?;
        loop {
            tokio::select! {
                // The signal first: an input stepped after it could still
                // make this node leader.
                biased;
                // SIGTERM / Ctrl-C (or the signal task is gone).
                _ = &mut stop => break,
                // Raft timers, peer messages and hello answers, until the
                // next housekeeping is due.
                pumped = self.pump(&mut inbound, &mut seen, next_housekeeping + HOUSEKEEPING_SLACK) => pumped?,
            }
            // Membership, bootstrap and gauges.
            if Instant::now() >= next_housekeeping {
                self.housekeeping();
                self.handle_ready()?;
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
        let Inbound { msg, reply } = inbound;
        self.pending_reply = reply.map(|reply| (msg.from.clone(), ReplyTo::Request(reply)));
        self.step_message(msg);
    }

    /// Steps what waits on peer streams: messages on streams leaders opened
    /// to this node (each answered on its stream, after the save), then the
    /// answers to this node's own streamed messages.
    fn read_streams(&mut self) -> Result<(), NodeError> {
        if !self.streams.is_empty() {
            for (stream, messages) in self.streams.receive() {
                for msg in messages {
                    self.pending_reply = Some((msg.from.clone(), ReplyTo::Stream(stream)));
                    self.step_message(msg);
                    self.handle_ready()?;
                }
            }
        }
        for msg in self.client.take_streamed_replies() {
            self.step_message(msg);
        }
        Ok(())
    }

    fn step_message(&mut self, msg: Message) {
        let now = self.now();
        let (from, kind) = (msg.from.clone(), msg.body.kind());
        if matches!(msg.body, MessageBody::Leave | MessageBody::TimeoutNow) {
            debug!(%from, kind, term = msg.term.0, "lifecycle message");
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
        self.directory.insert(info.id.clone(), info.address.clone());
        if info.leaving {
            // A member on its way out is neither added again nor waited for,
            // nor handed leadership.
            self.membership.tombstone(info.id.clone(), now);
            self.core.note_retiring(&info.id);
        } else {
            self.membership
                .observe(info.id.clone(), info.address.clone(), now);
        }
        self.bootstrap_seen
            .insert(info.id.clone(), (info.joined, now));
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
        self.maybe_bootstrap(now);
        // Every role tracks removals: a follower that becomes leader must
        // not re-add what its predecessor removed.
        let me = self.core.id().clone();
        self.membership
            .track_configuration(&me, self.core.configuration().0, now);
        if self.core.role() == Role::Leader && !self.shutting_down {
            self.drive_membership(now);
        }
        self.update_gauges();
    }
}

impl NodeTask {
    // ----- bootstrap and membership --------------------------------------------

    /// Local bootstrap: once `bootstrap_expect` members (self included) answer
    /// and none of them has joined a cluster, the lowest id forms a cluster of
    /// itself; everyone else is then added by its membership driver.
    fn maybe_bootstrap(&mut self, now: Instant) {
        let Some(expect) = self.opts.bootstrap_expect else {
            return;
        };
        if !self.core.log().is_empty() || self.shutting_down {
            return;
        }
        let fresh: Vec<(&NodeId, bool)> = self
            .bootstrap_seen
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) <= BOOTSTRAP_FRESHNESS)
            .map(|(id, (joined, _))| (id, *joined))
            .collect();
        if fresh.iter().any(|(_, joined)| *joined) {
            return; // a cluster exists: wait to be added to it
        }
        if fresh.len() + 1 < expect {
            return;
        }
        let me = self.core.id().clone();
        if fresh.iter().any(|(id, _)| **id < me) {
            return; // a lower id bootstraps
        }
        let config = Configuration::with_voters([(me.clone(), self.opts.advertise.clone())]);
        let t = self.now();
        match self.core.bootstrap(config, t) {
            Ok(()) => {
                info!(node = %me, seen = fresh.len() + 1, "bootstrapped a new cluster as its first voter")
            }
            Err(e) => warn!(error = %e, "bootstrap refused"),
        }
    }

    fn drive_membership(&mut self, now: Instant) {
        let me = self.core.id().clone();
        let config = self.core.configuration().0.clone();
        let Some(change) = self.membership.next_change(&me, &config, now) else {
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
    /// Messages to the sender of a message waiting for its answer go into
    /// that answer; a failed save drops it unanswered.
    fn handle_ready(&mut self) -> Result<(), NodeError> {
        let pending_reply = self.pending_reply.take();
        let ready = self.core.take_ready();
        if let Some(hs) = &ready.hard_state {
            if let Err(e) = self.store.save(hs) {
                self.metrics.persist_errors.inc();
                return Err(NodeError::Persist(e));
            }
        }
        let streams = self.streams_allowed();
        match pending_reply {
            Some((requester, reply)) => {
                let (answer, others): (Vec<Message>, Vec<Message>) = ready
                    .messages
                    .into_iter()
                    .partition(|msg| msg.to == requester);
                match reply {
                    // The peer stopped waiting (timed out): Raft tolerates the loss.
                    ReplyTo::Request(reply) => {
                        let _ = reply.send(answer);
                    }
                    ReplyTo::Stream(stream) => self.streams.answer(stream, &answer),
                }
                for msg in others {
                    self.send(msg, streams);
                }
            }
            None => {
                for msg in ready.messages {
                    self.send(msg, streams);
                }
            }
        }
        if let Some(view) = ready.leadership {
            self.on_leadership(view);
        }
        Ok(())
    }

    /// Returns whether AppendEntries may go over peer streams now: this node
    /// leads and its lease lasts past the next round by a margin, so
    /// answers read at the next wakeup renew it in time.
    fn streams_allowed(&self) -> bool {
        if self.core.role() != Role::Leader || self.shutting_down {
            return false;
        }
        let needed = self.now() + self.core.config().heartbeat_interval + STREAM_LEASE_MARGIN;
        self.core.lease_until().is_some_and(|until| until >= needed)
    }

    /// Returns when a leader should wake to read its peer streams because
    /// its lease ends before anything else would wake it.
    fn lease_rescue_at(&self) -> Option<Instant> {
        if self.core.role() != Role::Leader {
            return None;
        }
        let until = self.instant_of(self.core.lease_until()?);
        let at = until.checked_sub(LEASE_RESCUE_LEAD)?;
        (at > Instant::now()).then_some(at)
    }

    fn send(&mut self, msg: Message, streams: bool) {
        let address = self
            .core
            .configuration()
            .0
            .address(&msg.to)
            .map(str::to_owned)
            .or_else(|| self.directory.get(&msg.to).cloned());
        match address {
            Some(addr) if streams && matches!(msg.body, MessageBody::AppendEntries { .. }) => {
                self.client.send_streamed(&addr, msg)
            }
            Some(addr) => self.client.send(&addr, msg),
            None => {
                self.metrics
                    .peer_rpc_errors
                    .with_label_values(&["unknown_address"])
                    .inc();
                debug!(to = %msg.to, kind = msg.body.kind(), "no address known for peer");
            }
        }
    }

    fn on_leadership(&mut self, view: Leadership) {
        let now = Instant::now();
        let prev = self.last_view.take();
        let prev_role = prev.as_ref().map_or(Role::Follower, |p| p.role);
        let prev_term = prev.as_ref().map(|p| p.term);
        let prev_leader = prev.as_ref().and_then(|p| p.leader.clone());
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
        if view.role == Role::Leader && prev_role != Role::Leader {
            info!(term = %view.term, "became leader");
            self.membership.restart_grace(now);
        } else if prev_role == Role::Leader && view.role != Role::Leader {
            info!(term = %view.term, "stepped down");
        }
        match (&prev_leader, &view.leader) {
            (Some(_), None) => {
                self.leader_lost_at = Some(self.instant_of(self.core.last_leader_contact()));
            }
            (old, Some(new)) if old.as_ref() != Some(new) => {
                m.leader_changes.inc();
                if let Some(lost) = self.leader_lost_at.take() {
                    m.election_duration
                        .observe(now.saturating_duration_since(lost).as_secs_f64());
                }
                info!(leader = %new, term = %view.term, "leader known");
            }
            _ => {}
        }
        self.publish(&view);
        self.last_view = Some(view);
    }

    fn publish(&self, view: &Leadership) {
        let joined = self.core.configuration().0.contains(self.core.id());
        let lease_until = if self.shutting_down {
            None
        } else {
            view.lease_until.map(|t| self.instant_of(t))
        };
        let me = self.core.id();
        let state = LeaderState {
            node_id: me.to_string(),
            node_name: me.name.clone(),
            role: view.role,
            term: view.term.0,
            leader: view.leader.as_ref().map(|l| l.name.clone()),
            leader_id: view.leader.as_ref().map(|l| l.to_string()),
            leader_address: view.leader_address.clone(),
            lease_until,
            is_voter: view.is_voter,
            voters: view.voters,
            learners: view.learners,
            joined,
            shutting_down: self.shutting_down,
        };
        self.metrics
            .is_leader
            .set(i64::from(state.is_leader_at(Instant::now())));
        self.state_tx.send_replace(state);
        let info = PeerInfo {
            cluster_id: self.opts.cluster_id.clone(),
            id: me.clone(),
            address: self.opts.advertise.clone(),
            joined,
            term: view.term.0,
            leader: view.leader.clone(),
            leaving: self.shutting_down,
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
        self.handle_ready()?;
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
                            self.handle_ready()?;
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
            self.handle_ready()?;
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
    /// `until`, whichever comes first. Cancel-safe: state changes only after
    /// the wait.
    async fn pump(
        &mut self,
        inbound: &mut mpsc::Receiver<Inbound>,
        seen: &mut mpsc::Receiver<PeerInfo>,
        until: Instant,
    ) -> Result<(), NodeError> {
        let mut deadline = self.instant_of(self.core.next_deadline()).min(until);
        if let Some(rescue) = self.lease_rescue_at() {
            deadline = deadline.min(rescue);
        }
        if let Some(poll) = self.streams.next_poll() {
            deadline = deadline.min(poll);
        }
        // Whatever woke the task, what waits on peer streams is read first:
        // heartbeats from a leader, then answers to this leader's rounds.
        tokio::select! {
            // A Raft timer (heartbeat round, election timeout, CheckQuorum;
            // a tick before the core's deadline does nothing) or a stream poll.
            _ = self.timer.sleep_until(deadline) => {
                self.read_streams()?;
                let now = self.now();
                self.core.tick(now);
            }
            // A peer message, already authenticated by the transport.
            Some(msg) = inbound.recv() => {
                self.read_streams()?;
                self.step(msg);
            }
            // A peer answered hello: who is where.
            Some(info) = seen.recv() => {
                self.read_streams()?;
                self.peer_seen(info);
            }
            // A leader opened a stream to this node.
            Some(stream) = next_accepted(&mut self.accepted) => {
                self.streams.add(stream);
                self.read_streams()?;
            }
            // A frame arrived on a watched stream.
            _ = self.streams.arrival() => self.read_streams()?,
        }
        self.handle_ready()
    }
}

/// Where the answer to the message being stepped goes.
enum ReplyTo {
    /// Into the HTTP answer of the request that carried it.
    Request(oneshot::Sender<Vec<Message>>),
    /// As the next answer frame on this accepted stream.
    Stream(u64),
}

/// Waits for the next stream handed over, forever when there is no channel.
async fn next_accepted(
    accepted: &mut Option<mpsc::Receiver<AcceptedStream>>,
) -> Option<AcceptedStream> {
    match accepted {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}
