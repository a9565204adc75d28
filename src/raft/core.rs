//! The Raft state machine of one node.
//!
//! ```text
//!            tick(now) ──┐        ┌── step(now, message)
//!                        ▼        ▼
//!                 ┌──────────────────────┐   propose_add_learner / propose_remove
//!                 │       RaftCore       │◄── transfer_leadership / bootstrap / leave
//!                 │ role handlers decide │
//!                 └──────────┬───────────┘
//!                            ▼ take_ready()
//!      Ready { hard_state ─(persist first)─► messages ─(then send)─► leadership }
//! ```
//!
//! Roles: Follower → (timeout) → PreCandidate → (majority pre-votes) →
//! Candidate → (majority votes) → Leader. A leader holds a *lease* while a
//! majority acknowledged a round it sent less than `lease_duration` ago; a
//! node refuses votes while it heard from a leader in the last
//! `election_timeout_min` (stickiness). Together these guarantee that no two
//! nodes hold a lease at the same instant, given bounded clock drift.
//!
//! # Crash failover at the lease floor
//!
//! When a leader's process dies, the kernel closes its connections and each
//! follower sees the leader's connection end without a goodbye. The runtime
//! reports that with [`RaftCore::leader_connection_lost`]; the follower then
//! drops its stickiness for that leader only and campaigns after a short
//! random delay (up to one heartbeat interval, against split votes) instead
//! of waiting for its election timeout. Safety never rested on the timeout
//! here, only on the old leader's lease, so the new leader waits that out:
//!
//! 1. The old leader's lease came from a round `R` a majority acknowledged
//!    and lasts `election_timeout_min × (1 − drift)` from `R`'s send time
//!    on its clock. Every member that acknowledged `R` received it at or
//!    after that send time, so `R`'s lease ends, in real time, no later than
//!    `election_timeout_min` after that member's last leader contact on its
//!    own clock — the same argument that makes stickiness safe.
//! 2. Each granted vote carries the voter's `leader_contact_age` (time since
//!    its last leader contact, its clock). On receiving it, the candidate
//!    knows that voter's window ends at the latest
//!    `(election_timeout_min − age) / (1 − drift)` later on the candidate's
//!    clock (the division covers a rate difference of up to `drift`). Its
//!    own window counts the same way. The maximum over the quorum that
//!    elected it is `lease_not_before`.
//! 3. Any two majorities intersect, so some voter of the winning quorum
//!    acknowledged `R` (or any later round the old leader's lease rests on:
//!    once a voter has voted in the new term it answers the old leader with
//!    the higher term, which deposes it rather than extending its lease).
//!    So the old lease has ended by `lease_not_before`.
//! 4. The new leader counts toward its lease only rounds it *sent* at or
//!    after `lease_not_before`, and sends one at that instant.
//!
//! A spurious connection end while the leader lives therefore costs at most
//! an election, never two leases. A TimeoutNow campaign needs no wait: the
//! old leader forfeited its lease before sending it, and sends it only once
//! its own `lease_not_before` has passed, so no earlier lease holds either. SIGSTOP'd or
//! partitioned leaders close nothing and keep the election-timeout path.
//!
//! Retiring (a node that got SIGTERM, see [`RaftCore::retire`]): it never
//! campaigns, never becomes leader and answers TimeoutNow with Leave (the
//! refusal); a retiring leader hands over to a voter not known to be
//! retiring, or [`abdicates`](RaftCore::abdicate) when none is left.

use super::config::{Config, MAX_ENTRIES_PER_MESSAGE};
use super::log::RaftLog;
use super::message::{Message, MessageBody};
use super::types::{Configuration, HardState, LogIndex, NodeId, Payload, Snapshot, Term, Time};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::Duration;
use thiserror::Error;

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Follows the leader of its term, or waits for one.
    Follower,
    /// Asks whether it could win before disturbing anyone (§9.6).
    PreCandidate,
    /// Campaigns for votes in its term.
    Candidate,
    /// Leads its term.
    Leader,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Role::Follower => "follower",
            Role::PreCandidate => "pre-candidate",
            Role::Candidate => "candidate",
            Role::Leader => "leader",
        };
        f.write_str(s)
    }
}

/// What the node knows about leadership; published whenever it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// This node's role.
    pub role: Role,
    /// This node's current term.
    pub term: Term,
    /// The leader of `term`, if known.
    pub leader: Option<NodeId>,
    /// The leader's peer address, if known.
    pub leader_address: Option<String>,
    /// Until when (on this node's clock) this node holds the leader lease.
    /// `Some` only on a leader; check it against the current time.
    pub lease_until: Option<Time>,
    /// Whether this node votes in its latest configuration.
    pub is_voter: bool,
    /// Number of voters and learners in the latest configuration.
    pub voters: usize,
    /// Number of learners in the latest configuration.
    pub learners: usize,
}

/// Output of the core since the last call to [`RaftCore::take_ready`].
///
/// The caller MUST make `hard_state` durable before sending any message in
/// `messages`: a vote or an acknowledgement sent before it is on disk could be
/// forgotten by a crash and given twice.
#[derive(Debug, Default)]
pub struct Ready {
    /// Hard state to persist, if it changed.
    pub hard_state: Option<HardState>,
    /// Messages to send, after `hard_state` is persisted.
    pub messages: Vec<Message>,
    /// New leadership view, if it changed.
    pub leadership: Option<Leadership>,
}

impl Ready {
    /// Returns whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.hard_state.is_none() && self.messages.is_empty() && self.leadership.is_none()
    }
}

/// Why a peer message was refused without changing any state.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StepError {
    #[error("message is addressed to {to}, this node is {me}")]
    WrongRecipient { to: NodeId, me: NodeId },
    #[error("message from {0} claims to be from this node")]
    FromSelf(NodeId),
    #[error("append entries would truncate committed index {commit} (conflict at {at})")]
    TruncatesCommitted { at: LogIndex, commit: LogIndex },
    #[error("append entries carries entries that do not follow index {prev}")]
    MalformedEntries { prev: LogIndex },
    #[error("snapshot up to {index} is beyond the leader's commit index {commit} or term")]
    MalformedSnapshot { index: LogIndex, commit: LogIndex },
    #[error("a second leader {other} claims term {term}")]
    SecondLeader { other: NodeId, term: Term },
    #[error("{from} is not in the first configuration this node promised to bootstrap with")]
    OutsideBootstrapLock { from: NodeId },
}

impl StepError {
    /// Returns a short label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            StepError::WrongRecipient { .. } => "wrong_recipient",
            StepError::FromSelf(_) => "from_self",
            StepError::TruncatesCommitted { .. } => "truncates_committed",
            StepError::MalformedEntries { .. } => "malformed_entries",
            StepError::MalformedSnapshot { .. } => "malformed_snapshot",
            StepError::SecondLeader { .. } => "second_leader",
            StepError::OutsideBootstrapLock { .. } => "outside_bootstrap_lock",
        }
    }
}

/// Why a membership proposal was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<NodeId> },
    #[error("a configuration change is still in progress")]
    ChangeInProgress,
    #[error("this leader has not committed an entry of its term yet")]
    TermNotCommitted,
    #[error("leadership is being transferred")]
    Transferring,
    #[error("{0} is already a member")]
    AlreadyMember(NodeId),
    #[error("{0} is not a member")]
    NotMember(NodeId),
    #[error("removing {0} would leave no voter")]
    LastVoter(NodeId),
}

/// Why a leadership transfer could not start.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TransferError {
    #[error("not the leader")]
    NotLeader,
    #[error("no other voter to hand leadership to")]
    NoTarget,
    #[error("{0} is not a voter")]
    NotVoter(NodeId),
}

/// Why bootstrapping was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BootstrapError {
    #[error("this node already has state (term {0}); it joins the existing cluster")]
    AlreadyInitialized(Term),
    #[error("the bootstrap configuration must include this node")]
    SelfNotMember,
    #[error("the bootstrap configuration has no voter")]
    NoVoter,
    #[error("this incarnation already promised another first configuration")]
    LockedToAnother,
}

/// The leader's view of one member (Raft paper Figure 2, "volatile state on leaders").
#[derive(Clone, Debug)]
struct Progress {
    /// Next index to send.
    next: LogIndex,
    /// Highest index known to match.
    matched: LogIndex,
    /// Latest heartbeat round (leader send time, ns) the member acknowledged in this term.
    acked_round: Option<u64>,
    /// Whether the member answered since the last CheckQuorum.
    recent_active: bool,
}

/// A leadership transfer in progress (dissertation §3.10).
#[derive(Clone, Debug)]
struct Transfer {
    target: NodeId,
    deadline: Time,
    timeout_now_sent: bool,
}

/// State a node keeps only while leading. Reset when changing role.
#[derive(Clone, Debug)]
struct LeaderState {
    progress: BTreeMap<NodeId, Progress>,
    /// When the next heartbeat round is due.
    heartbeat_due: Time,
    /// When to next check that a majority is still in contact.
    check_quorum_due: Time,
    /// Index of the no-op appended on election; config changes wait for it.
    /// `None` until it is appended: a leader elected by a transfer campaign
    /// appends it only after its first round (see [`RaftCore::become_leader`]).
    noop_index: Option<LogIndex>,
    /// Latest round this leader sent (ns of its clock); its own acknowledgement.
    own_round: u64,
    /// End of the lease, if a majority acknowledged a round.
    lease_until: Option<Time>,
    /// Rounds sent before this time never count toward the lease: the
    /// previous leader's lease may last until then.
    lease_not_before: Time,
    /// Set once a TimeoutNow was sent: no lease for the rest of the term.
    lease_forfeited: bool,
    transfer: Option<Transfer>,
    /// Members that asked to leave and wait for removal.
    leaving: BTreeSet<NodeId>,
    /// Members this leader removed, latest last (at most
    /// [`REMEMBERED_REMOVALS`]): told too when it abdicates, since one may
    /// not have received its removal yet.
    removed: VecDeque<NodeId>,
}

/// How many removals a leader remembers for [`RaftCore::abdicate`].
const REMEMBERED_REMOVALS: usize = 16;

/// One node's Raft state machine: pure, driven by [`tick`](RaftCore::tick)
/// and [`step`](RaftCore::step), its output taken with
/// [`take_ready`](RaftCore::take_ready).
pub struct RaftCore {
    id: NodeId,
    address: String,
    cfg: Config,
    rng: SmallRng,
    // Persistent state.
    term: Term,
    voted_for: Option<NodeId>,
    log: RaftLog,
    /// The first configuration this incarnation promised (persisted).
    bootstrap_lock: Option<Configuration>,
    // Volatile state.
    role: Role,
    leader: Option<NodeId>,
    commit: LogIndex,
    config: Configuration,
    config_index: LogIndex,
    /// When this node campaigns next (followers and candidates).
    election_deadline: Time,
    /// Last time this node heard from a live leader (or led, or started);
    /// votes are refused for `election_timeout_min` after it.
    last_leader_contact: Time,
    /// Voters that answered this campaign, and how.
    votes: BTreeMap<NodeId, bool>,
    /// Set when the known leader's connection ended without a goodbye:
    /// stickiness no longer holds for it. Cleared on hearing from a leader.
    leader_gone: bool,
    /// Whether the current campaign was started by the leader's TimeoutNow.
    transfer_campaign: bool,
    /// Candidate: the latest end of a stickiness window among the votes
    /// granted so far, its own included (see "Crash failover" above).
    lease_not_before: Time,
    /// Test-only mutation: start the lease without waiting out the old one.
    #[cfg(feature = "sim")]
    skip_lease_wait: bool,
    lead: Option<LeaderState>,
    /// Set by [`retire`](Self::retire), never cleared: this node is going
    /// away and must not lead again.
    retiring: bool,
    /// Members known to be going away (they sent Leave, or the runtime saw
    /// them say so); never transfer targets. Only members of the current
    /// configuration are kept.
    retiring_peers: BTreeSet<NodeId>,
    /// The term in which this node's leader left without a successor
    /// ([`abdicate`](Self::abdicate)): the group is going away.
    abdicated_in: Option<Term>,
    /// The latest term this node led. Reset never; volatile.
    led_term: Option<Term>,
    // Output.
    messages: Vec<Message>,
    hard_state_dirty: bool,
    published: Option<Leadership>,
    /// A buffer the leader reuses for per-voter numbers (the lease's and
    /// the commit's order statistics), so a round allocates nothing there.
    scratch: Vec<u64>,
}

impl RaftCore {
    /// Creates a node that starts without state: a new incarnation `id`.
    /// It joins when a leader adds it, or forms a cluster with [`bootstrap`](Self::bootstrap).
    pub fn fresh(cfg: Config, id: NodeId, address: String, seed: u64, now: Time) -> RaftCore {
        let mut core = RaftCore::with_log(cfg, id, address, seed, now, RaftLog::default());
        core.hard_state_dirty = true;
        core
    }

    /// Restores a node from its persisted hard state.
    pub fn restore(
        cfg: Config,
        state: HardState,
        address: String,
        seed: u64,
        now: Time,
    ) -> Result<RaftCore, String> {
        let log = RaftLog::restore(state.snapshot, state.entries)?;
        let mut core = RaftCore::with_log(cfg, state.id, address, seed, now, log);
        core.term = state.term;
        core.voted_for = state.voted_for;
        core.bootstrap_lock = state.bootstrap_lock;
        Ok(core)
    }

    fn with_log(
        cfg: Config,
        id: NodeId,
        address: String,
        seed: u64,
        now: Time,
        log: RaftLog,
    ) -> RaftCore {
        let commit = log.snapshot().last_index;
        let mut core = RaftCore {
            id,
            address,
            cfg,
            rng: SmallRng::seed_from_u64(seed),
            term: Term(0),
            voted_for: None,
            log,
            bootstrap_lock: None,
            role: Role::Follower,
            leader: None,
            commit,
            config: Configuration::default(),
            config_index: 0,
            election_deadline: now,
            // A restarted node may have acknowledged a leader just before it
            // crashed; it must not vote until that acknowledgement is stale.
            last_leader_contact: now,
            votes: BTreeMap::new(),
            leader_gone: false,
            transfer_campaign: false,
            lease_not_before: now,
            #[cfg(feature = "sim")]
            skip_lease_wait: false,
            lead: None,
            retiring: false,
            retiring_peers: BTreeSet::new(),
            abdicated_in: None,
            led_term: None,
            messages: Vec::new(),
            hard_state_dirty: false,
            published: None,
            scratch: Vec::new(),
        };
        core.refresh_config();
        core.reset_election_timer(now);
        core
    }

    // ----- queries -------------------------------------------------------

    /// Returns this node's identity.
    pub fn id(&self) -> &NodeId {
        &self.id
    }

    /// Returns the current term.
    pub fn term(&self) -> Term {
        self.term
    }

    /// Returns the current role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// Returns the leader of the current term, if known.
    pub fn leader(&self) -> Option<&NodeId> {
        self.leader.as_ref()
    }

    /// Returns the highest index known to be committed.
    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }

    /// Returns the log.
    pub fn log(&self) -> &RaftLog {
        &self.log
    }

    /// Returns the latest configuration (committed or not) and its index.
    pub fn configuration(&self) -> (&Configuration, LogIndex) {
        (&self.config, self.config_index)
    }

    /// Returns the settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Returns the end of this node's lease, if it is a leader holding one
    /// (it may already be in the past: compare with the time).
    pub fn lease_until(&self) -> Option<Time> {
        self.lead.as_ref().and_then(|l| l.lease_until)
    }

    /// Answers "is this node the leader right now, with a valid lease, at `now`?"
    /// This is what `/is-leader` serves.
    pub fn has_lease(&self, now: Time) -> bool {
        self.lease_until().is_some_and(|until| now < until)
    }

    /// Returns how much of the lease is left at `now` (zero if none).
    pub fn lease_remaining(&self, now: Time) -> Duration {
        self.lease_until()
            .map_or(Duration::ZERO, |until| until.saturating_since(now))
    }

    /// Returns the leadership view as of now.
    pub fn leadership(&self) -> Leadership {
        Leadership {
            role: self.role,
            term: self.term,
            leader: self.leader.clone(),
            leader_address: self.leader_address().map(str::to_owned),
            lease_until: self.lease_until(),
            is_voter: self.config.is_voter(&self.id),
            voters: self.config.voters.len(),
            learners: self.config.learners.len(),
        }
    }

    /// Returns the known leader's peer address.
    fn leader_address(&self) -> Option<&str> {
        self.leader.as_ref().and_then(|l| {
            if *l == self.id {
                Some(self.address.as_str())
            } else {
                self.config.address(l)
            }
        })
    }

    /// Returns whether [`leadership`](Self::leadership) would equal the view
    /// last reported, without building a new one (this runs after every
    /// input; most change nothing a view shows).
    fn leadership_unchanged(&self) -> bool {
        let Some(p) = &self.published else {
            return false;
        };
        let Leadership {
            role,
            term,
            leader,
            leader_address,
            lease_until,
            is_voter,
            voters,
            learners,
        } = p;
        *role == self.role
            && *term == self.term
            && *leader == self.leader
            && leader_address.as_deref() == self.leader_address()
            && *lease_until == self.lease_until()
            && *is_voter == self.config.is_voter(&self.id)
            && *voters == self.config.voters.len()
            && *learners == self.config.learners.len()
    }

    /// Returns the earliest time at which [`tick`](Self::tick) has work to do.
    pub fn next_deadline(&self) -> Time {
        match &self.lead {
            Some(l) => {
                // CheckQuorum runs with the first round at or after it is
                // due (at most one heartbeat interval late), so an idle
                // leader wakes once per round.
                let mut t = l.heartbeat_due;
                if let Some(tr) = &l.transfer {
                    t = t.min(tr.deadline);
                }
                t
            }
            None => self.election_deadline,
        }
    }

    /// Returns when this node last heard from a live leader (or led a round).
    pub fn last_leader_contact(&self) -> Time {
        self.last_leader_contact
    }

    /// Returns whether [`retire`](Self::retire) was called.
    pub fn is_retiring(&self) -> bool {
        self.retiring
    }

    /// Returns whether every voter other than this node is known to be
    /// retiring: nobody is left to hand leadership over to, or to remove
    /// this node.
    pub fn others_retiring(&self) -> bool {
        self.config
            .voters
            .keys()
            .filter(|v| **v != self.id)
            .all(|v| self.retiring_peers.contains(v))
    }

    /// Returns whether the leader of the current term left without a
    /// successor ([`abdicate`](Self::abdicate)): every voter it knew of was
    /// going away.
    pub fn leader_abdicated(&self) -> bool {
        self.lead.is_none() && self.abdicated_in == Some(self.term)
    }

    /// Returns whether a leader transfer is under way.
    pub fn is_transferring(&self) -> bool {
        self.lead.as_ref().is_some_and(|l| l.transfer.is_some())
    }

    /// Returns a member's replication progress (leader only): (match index, acknowledged recently).
    pub fn member_progress(&self, id: &NodeId) -> Option<(LogIndex, bool)> {
        let l = self.lead.as_ref()?;
        l.progress.get(id).map(|p| (p.matched, p.recent_active))
    }

    /// Returns the current hard state.
    pub fn hard_state(&self) -> HardState {
        HardState {
            id: self.id.clone(),
            term: self.term,
            voted_for: self.voted_for.clone(),
            snapshot: self.log.snapshot().clone(),
            entries: self.log.entries().to_vec(),
            bootstrap_lock: self.bootstrap_lock.clone(),
        }
    }

    /// Returns the first configuration this incarnation promised to
    /// bootstrap with, if any (see [`lock_bootstrap`](Self::lock_bootstrap)).
    pub fn bootstrap_lock(&self) -> Option<&Configuration> {
        self.bootstrap_lock.as_ref()
    }

    /// Returns whether this node knows of nothing committed beyond its
    /// bootstrap configuration: as far as it can tell, its cluster never
    /// finished a first election.
    pub fn is_pristine_bootstrap(&self) -> bool {
        let snap = self.log.snapshot();
        snap.last_index == 1 && snap.last_term == Term(0) && self.commit == 1
    }

    /// Takes what the caller must do: persist, then send, then publish.
    pub fn take_ready(&mut self) -> Ready {
        let hard_state = if self.hard_state_dirty {
            self.hard_state_dirty = false;
            Some(self.hard_state())
        } else {
            None
        };
        let leadership = if self.leadership_unchanged() {
            None
        } else {
            let now_view = self.leadership();
            self.published = Some(now_view.clone());
            Some(now_view)
        };
        Ready {
            hard_state,
            messages: std::mem::take(&mut self.messages),
            leadership,
        }
    }

    // ----- inputs --------------------------------------------------------

    /// Advances the node's clock to `now` and fires due timers: heartbeats,
    /// CheckQuorum and transfer timeout on a leader, the election timeout
    /// elsewhere. Call it at or after [`next_deadline`](Self::next_deadline).
    pub fn tick(&mut self, now: Time) {
        if self.lead.is_some() {
            self.tick_leader(now);
        } else if now >= self.election_deadline {
            self.election_timeout(now);
        }
    }

    /// Checks that `config` can be this node's first configuration: no log
    /// yet, this node a member, at least one voter.
    fn check_first_configuration(&self, config: &Configuration) -> Result<(), BootstrapError> {
        if !self.log.is_empty() {
            return Err(BootstrapError::AlreadyInitialized(self.term));
        }
        if !config.contains(&self.id) {
            return Err(BootstrapError::SelfNotMember);
        }
        if config.voters.is_empty() {
            return Err(BootstrapError::NoVoter);
        }
        Ok(())
    }

    /// Promises, durably, that this incarnation bootstraps with no other
    /// first configuration than `config`; the promise is in the next
    /// `Ready`'s hard state and MUST be persisted before it is reported to
    /// a peer. While promised and without a log, messages from outside
    /// `config` are refused, so no other cluster can adopt this node.
    /// An incarnation promises at most once (the agreement's safety rests on
    /// it): a node that gives up its promise continues as a new incarnation.
    pub fn lock_bootstrap(&mut self, config: Configuration) -> Result<(), BootstrapError> {
        self.check_first_configuration(&config)?;
        match &self.bootstrap_lock {
            Some(locked) if *locked == config => Ok(()),
            Some(_) => Err(BootstrapError::LockedToAnother),
            None => {
                self.bootstrap_lock = Some(config);
                self.hard_state_dirty = true;
                Ok(())
            }
        }
    }

    /// Forms a new cluster from `config` if this node has no log yet (its
    /// term may have moved: a member of the same first configuration may
    /// already have asked for its vote). Every node bootstrapped this way
    /// MUST be given the same configuration, and a node that promised one
    /// with [`lock_bootstrap`](Self::lock_bootstrap) bootstraps with no other.
    pub fn bootstrap(&mut self, config: Configuration, now: Time) -> Result<(), BootstrapError> {
        self.check_first_configuration(&config)?;
        if self.bootstrap_lock.as_ref().is_some_and(|l| *l != config) {
            return Err(BootstrapError::LockedToAnother);
        }
        self.log.install_snapshot(Snapshot {
            last_index: 1,
            last_term: Term(0),
            config,
        });
        self.commit = 1;
        self.refresh_config();
        self.hard_state_dirty = true;
        self.reset_election_timer(now);
        Ok(())
    }

    /// Handles one message from a peer. A refused message changes no state.
    pub fn step(&mut self, now: Time, msg: Message) -> Result<(), StepError> {
        if msg.to != self.id {
            return Err(StepError::WrongRecipient {
                to: msg.to,
                me: self.id.clone(),
            });
        }
        if msg.from == self.id {
            return Err(StepError::FromSelf(msg.from));
        }
        if self.log.is_empty() {
            if let Some(lock) = &self.bootstrap_lock {
                if !lock.contains(&msg.from) {
                    return Err(StepError::OutsideBootstrapLock { from: msg.from });
                }
            }
        }
        if msg.term > self.term {
            if !self.accept_higher_term(now, &msg) {
                return Ok(());
            }
        } else if msg.term < self.term {
            self.answer_stale(msg);
            return Ok(());
        }
        match msg.body {
            MessageBody::PreVote {
                last_log_index,
                last_log_term,
            } => self.handle_pre_vote(now, msg.from, msg.term, last_log_index, last_log_term),
            MessageBody::PreVoteResponse { granted } => {
                self.handle_pre_vote_response(now, msg.from, msg.term, granted)
            }
            MessageBody::RequestVote {
                last_log_index,
                last_log_term,
                transfer,
            } => self.handle_request_vote(now, msg.from, last_log_index, last_log_term, transfer),
            MessageBody::RequestVoteResponse {
                granted,
                leader_contact_age,
            } => self.handle_vote_response(now, msg.from, granted, leader_contact_age),
            MessageBody::AppendEntries {
                prev_log_index,
                prev_log_term,
                entries,
                leader_commit,
                round,
            } => {
                return self.handle_append_entries(
                    now,
                    msg.from,
                    prev_log_index,
                    prev_log_term,
                    entries,
                    leader_commit,
                    round,
                )
            }
            MessageBody::AppendEntriesResponse {
                success,
                last_index,
                round,
            } => self.handle_append_response(now, msg.from, success, last_index, round),
            MessageBody::InstallSnapshot {
                snapshot,
                leader_commit,
                round,
            } => {
                return self.handle_install_snapshot(now, msg.from, snapshot, leader_commit, round)
            }
            MessageBody::TimeoutNow => self.handle_timeout_now(now, msg.from),
            MessageBody::Leave => self.handle_leave(msg.from),
        }
        Ok(())
    }

    /// Proposes adding `id` (reachable at `address`) as a learner. It is
    /// promoted to voter once caught up, while voters are below `max_voters`.
    pub fn propose_add_learner(
        &mut self,
        id: NodeId,
        address: String,
    ) -> Result<LogIndex, ProposeError> {
        self.check_can_change_config()?;
        if self.config.contains(&id) {
            return Err(ProposeError::AlreadyMember(id));
        }
        let mut next = self.config.clone();
        next.learners.insert(id, address);
        Ok(self.append_config(next))
    }

    /// Proposes removing member `id`. A leader that removes itself steps down
    /// once the change commits.
    pub fn propose_remove(&mut self, id: &NodeId) -> Result<LogIndex, ProposeError> {
        self.check_can_change_config()?;
        if !self.config.contains(id) {
            return Err(ProposeError::NotMember(id.clone()));
        }
        if self.config.is_voter(id) && self.config.voters.len() == 1 {
            return Err(ProposeError::LastVoter(id.clone()));
        }
        let mut next = self.config.clone();
        next.voters.remove(id);
        next.learners.remove(id);
        if let Some(lead) = self.lead.as_mut() {
            if lead.removed.len() == REMEMBERED_REMOVALS {
                lead.removed.pop_front();
            }
            lead.removed.push_back(id.clone());
        }
        Ok(self.append_config(next))
    }

    /// Hands leadership to `target`, or else to the voter that joined the
    /// configuration last among those caught up, recently active and not
    /// known to be retiring (see [`member_since`](Self::member_since)).
    /// The lease is given up at once and not regained in this term; if the
    /// target has not taken over within `election_timeout_min`, this node
    /// steps down and a normal election follows.
    pub fn transfer_leadership(
        &mut self,
        now: Time,
        target: Option<NodeId>,
    ) -> Result<NodeId, TransferError> {
        let Some(lead) = self.lead.as_ref() else {
            return Err(TransferError::NotLeader);
        };
        if let Some(tr) = &lead.transfer {
            // Already handing over: keep the first target and deadline.
            return Ok(tr.target.clone());
        }
        let target = match target {
            Some(t) if !self.config.is_voter(&t) || t == self.id => {
                return Err(TransferError::NotVoter(t))
            }
            Some(t) => t,
            // Active and caught up first (TimeoutNow waits for the target
            // to catch up), then the newest member: a rolling update replaces the
            // old members, so handing over to an old one would make it lead
            // until its own replacement and cost a second handoff; the
            // newest member is the one least likely to be replaced next.
            // Ties (members of the same configuration entry) go by id.
            None => self
                .config
                .voters
                .keys()
                .filter(|v| **v != self.id && !self.retiring_peers.contains(*v))
                .max_by_key(|v| {
                    let p = lead.progress.get(*v);
                    let matched = p.map_or(0, |p| p.matched);
                    (
                        p.is_some_and(|p| p.recent_active),
                        matched >= self.log.last_index(),
                        self.member_since(v),
                        matched,
                    )
                })
                .cloned()
                .ok_or(TransferError::NoTarget)?,
        };
        // TimeoutNow waits for `lease_not_before` (see "Crash failover");
        // the target gets the usual time to take over after that.
        let deadline = now.max(lead.lease_not_before) + self.cfg.election_timeout_min;
        if let Some(lead) = self.lead.as_mut() {
            lead.transfer = Some(Transfer {
                target: target.clone(),
                deadline,
                timeout_now_sent: false,
            });
            lead.lease_until = None;
        }
        self.maybe_send_timeout_now(now);
        Ok(target)
    }

    /// Returns the index of the configuration entry from which `id` has been
    /// a member without a break (as learner or voter), or the snapshot's
    /// index if it already was a member there: a later index means a newer
    /// member. Scans the log's configuration entries.
    pub fn member_since(&self, id: &NodeId) -> LogIndex {
        let snapshot = self.log.snapshot();
        let mut since = snapshot.config.contains(id).then_some(snapshot.last_index);
        for e in self.log.entries() {
            if let Payload::Config(c) = &e.payload {
                if !c.contains(id) {
                    since = None;
                } else if since.is_none() {
                    since = Some(e.index);
                }
            }
        }
        since.unwrap_or(0)
    }

    /// Asks the leader to remove this node (graceful leave). Returns whether a
    /// leader was known to ask. Without one, tells every other voter
    /// instead: whoever leads next removes this node and never hands
    /// leadership to it, and a group going away learns who is leaving.
    /// Except a leader that stepped down in this term: its followers may
    /// still take it for their leader, and Leave from their leader means it
    /// [abdicated](Self::abdicate); it asks the next leader instead.
    pub fn leave(&mut self) -> bool {
        match self.leader.clone() {
            Some(l) if l != self.id => {
                self.send(l, MessageBody::Leave);
                true
            }
            Some(_) => {
                if let Some(lead) = self.lead.as_mut() {
                    lead.leaving.insert(self.id.clone());
                }
                true
            }
            None if self.led_term == Some(self.term) => false,
            None => {
                self.send_to_voters(self.term, MessageBody::Leave);
                false
            }
        }
    }

    /// Reports that `peer`'s connection ended without a goodbye (its process
    /// most likely died). If `peer` is this follower's leader, stickiness is
    /// dropped for it and this node campaigns within one heartbeat interval
    /// instead of its election timeout. A report about anyone else, or on a
    /// node that is not a following voter, changes nothing.
    pub fn leader_connection_lost(&mut self, now: Time, peer: &NodeId) {
        if self.role != Role::Follower
            || self.leader.as_ref() != Some(peer)
            || !self.config.is_voter(&self.id)
        {
            return;
        }
        self.leader_gone = true;
        // Every follower sees the end at about the same time. Campaigns
        // staggered by rank (this node's place among the other voters, by
        // id) let the first one win before the next starts, instead of
        // splitting the vote; a little randomness covers equal views. All
        // start within one heartbeat interval, well before the old lease
        // can have ended, so the stagger costs no failover time.
        let others: Vec<&NodeId> = self.config.voters.keys().filter(|v| *v != peer).collect();
        let rank = others.iter().position(|v| **v == self.id).unwrap_or(0) as u64;
        let slot = self.cfg.heartbeat_interval.as_nanos() as u64 / (others.len().max(1) as u64);
        let jitter = self.rng.random_range(0..(slot / 4).max(1));
        let soon = now + Duration::from_nanos(rank * slot + jitter);
        self.election_deadline = self.election_deadline.min(soon);
    }

    /// Test-only mutation: a new leader that does not wait out the previous
    /// lease. The simulator's invariants must catch it.
    #[cfg(feature = "sim")]
    pub fn mutate_skip_lease_wait(&mut self) {
        self.skip_lease_wait = true;
    }

    /// Marks this node as going away for good (SIGTERM). From here on it
    /// never starts a pre-vote or an election, never becomes leader, and
    /// answers TimeoutNow with Leave (a refusal the leader acts on at once).
    /// A pre-candidate or candidate gives up its campaign at once; a leader
    /// keeps leading until it hands over ([`transfer_leadership`](Self::transfer_leadership))
    /// or [`abdicate`](Self::abdicate)s. It still votes for others: a
    /// retiring voter's vote may be what lets the rest elect a successor.
    pub fn retire(&mut self, now: Time) {
        self.retiring = true;
        if matches!(self.role, Role::PreCandidate | Role::Candidate) {
            let term = self.term;
            self.become_follower(now, term, None);
        }
    }

    /// Records that member `id` is going away (e.g. its hello said so): it
    /// is no longer a transfer target. Non-members are ignored.
    pub fn note_retiring(&mut self, id: &NodeId) {
        if self.config.contains(id) && *id != self.id {
            self.retiring_peers.insert(id.clone());
        }
    }

    /// Steps down without a successor and sends Leave to every other member,
    /// so that retiring followers stop waiting for a leader that will never
    /// remove them. Only a retiring leader abdicates (returns whether it
    /// did); call it when [`transfer_leadership`](Self::transfer_leadership)
    /// finds nobody to hand over to.
    pub fn abdicate(&mut self, now: Time) -> bool {
        let Some(lead) = self.lead.as_ref().filter(|_| self.retiring) else {
            return false;
        };
        // Members it removed too: one may not have its removal yet and
        // would otherwise wait for a leader that is gone.
        let others: BTreeSet<NodeId> = self
            .config
            .members()
            .map(|(id, _)| id)
            .chain(lead.removed.iter())
            .filter(|id| **id != self.id)
            .cloned()
            .collect();
        for id in others {
            self.send(id, MessageBody::Leave);
        }
        self.step_down(now);
        true
    }

    /// Changes the election timeout range; takes effect at the next timer reset.
    /// The range MUST keep `min <= max` and `heartbeat < min`.
    pub fn set_election_timeouts(&mut self, min: Duration, max: Duration) {
        self.cfg.election_timeout_min = min;
        self.cfg.election_timeout_max = max.max(min);
        // A lease computed with a longer window must not outlive the new one.
        if let Some(lead) = self.lead.as_mut() {
            lead.lease_until = None;
        }
        self.update_lease();
    }

    // ----- timers --------------------------------------------------------

    fn reset_election_timer(&mut self, now: Time) {
        let min = self.cfg.election_timeout_min;
        let max = self.cfg.election_timeout_max;
        let timeout = if max > min {
            let span = (max - min).as_nanos() as u64;
            min + Duration::from_nanos(self.rng.random_range(0..span))
        } else {
            min
        };
        self.election_deadline = now + timeout;
    }

    /// Returns whether this node heard from a live leader (or is one) too
    /// recently to grant a vote or pre-vote (dissertation §4.2.3, §9.6).
    fn in_stickiness(&self, now: Time) -> bool {
        self.role == Role::Leader
            || (!self.leader_gone
                && now.saturating_since(self.last_leader_contact) < self.cfg.election_timeout_min)
    }

    /// Returns the latest time, on this node's clock, at which the lease of
    /// a leader that a member heard from `age` ago may still hold, given that
    /// this member's answer is being handled at `now`.
    fn stickiness_end(&self, now: Time, age: Duration) -> Time {
        let left = self.cfg.election_timeout_min.saturating_sub(age);
        now + left.div_f64(1.0 - self.cfg.max_clock_drift)
    }

    fn election_timeout(&mut self, now: Time) {
        if !self.config.is_voter(&self.id) || self.retiring {
            // Learners, non-members and retiring nodes never campaign.
            self.reset_election_timer(now);
            return;
        }
        if self.cfg.pre_vote {
            self.campaign_pre_vote(now);
        } else {
            self.campaign(now, false);
        }
    }

    fn tick_leader(&mut self, now: Time) {
        let Some(lead) = self.lead.as_ref() else {
            return;
        };
        if lead.transfer.as_ref().is_some_and(|t| now >= t.deadline) {
            self.step_down(now);
            return;
        }
        if now >= lead.check_quorum_due && !self.check_quorum(now) {
            self.step_down(now);
            return;
        }
        if self.lead.as_ref().is_some_and(|l| now >= l.heartbeat_due) {
            self.append_deferred_noop();
            self.broadcast_append(now);
        }
        self.maybe_send_timeout_now(now);
        // A sole voter commits its own entries: no answer would trigger it
        // (e.g. a learner added and gone before it ever answered).
        self.maybe_commit(now);
        self.drive_membership();
    }

    /// CheckQuorum: returns whether a majority answered since the last check.
    fn check_quorum(&mut self, now: Time) -> bool {
        let quorum = self.config.quorum();
        let me = self.id.clone();
        let Some(lead) = self.lead.as_mut() else {
            return false;
        };
        let active = self
            .config
            .voters
            .keys()
            .filter(|v| **v == me || lead.progress.get(*v).is_some_and(|p| p.recent_active))
            .count();
        for p in lead.progress.values_mut() {
            p.recent_active = false;
        }
        lead.check_quorum_due = now + self.cfg.election_timeout_min;
        active >= quorum
    }

    // ----- elections -----------------------------------------------------

    fn campaign_pre_vote(&mut self, now: Time) {
        self.role = Role::PreCandidate;
        self.leader = None;
        self.votes.clear();
        self.reset_election_timer(now);
        self.record_vote(now, self.id.clone(), true, Role::PreCandidate);
        if self.role != Role::PreCandidate {
            return;
        }
        let term = self.term.next();
        let body = MessageBody::PreVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
        };
        self.send_to_voters(term, body);
    }

    /// Starts an election in the next term (Raft paper §5.2).
    fn campaign(&mut self, now: Time, transfer: bool) {
        if self.retiring {
            return;
        }
        self.term = self.term.next();
        self.voted_for = Some(self.id.clone());
        self.hard_state_dirty = true;
        self.role = Role::Candidate;
        self.leader = None;
        self.votes.clear();
        self.transfer_campaign = transfer;
        self.lease_not_before = if transfer {
            now
        } else {
            let age = now.saturating_since(self.last_leader_contact);
            self.stickiness_end(now, age)
        };
        self.reset_election_timer(now);
        self.record_vote(now, self.id.clone(), true, Role::Candidate);
        if self.role != Role::Candidate {
            return;
        }
        let body = MessageBody::RequestVote {
            last_log_index: self.log.last_index(),
            last_log_term: self.log.last_term(),
            transfer,
        };
        self.send_to_voters(self.term, body);
    }

    fn send_to_voters(&mut self, term: Term, body: MessageBody) {
        let to: Vec<NodeId> = self
            .config
            .voters
            .keys()
            .filter(|v| **v != self.id)
            .cloned()
            .collect();
        for v in to {
            self.messages.push(Message {
                from: self.id.clone(),
                to: v,
                term,
                body: body.clone(),
            });
        }
    }

    /// Counts a (pre-)vote answer and wins or gives up when a majority is clear.
    fn record_vote(&mut self, now: Time, from: NodeId, granted: bool, role: Role) {
        if self.role != role || !self.config.is_voter(&from) {
            return;
        }
        self.votes.insert(from, granted);
        let quorum = self.config.quorum();
        let yes = self.votes.values().filter(|g| **g).count();
        let no = self.votes.len() - yes;
        if yes >= quorum && self.retiring {
            // A node going away never accepts leadership.
            let term = self.term;
            self.become_follower(now, term, None);
        } else if yes >= quorum {
            match role {
                Role::PreCandidate => self.campaign(now, false),
                _ => self.become_leader(now),
            }
        } else if no >= quorum {
            self.become_follower(now, self.term, None);
        }
    }

    /// Decides what a message from a higher term does. Returns whether the
    /// message should then be handled in the (possibly new) current term.
    fn accept_higher_term(&mut self, now: Time, msg: &Message) -> bool {
        match &msg.body {
            MessageBody::PreVote { .. } => {
                // Answered without changing the term (§9.6); stickiness applies there.
                true
            }
            MessageBody::RequestVote { transfer, .. } if !transfer && self.in_stickiness(now) => {
                // A live leader exists: ignore the disruptive candidate (§4.2.3).
                false
            }
            MessageBody::PreVoteResponse { granted: true } => true,
            MessageBody::PreVoteResponse { granted: false } => {
                // A rejection from a higher term: that term exists, join it.
                self.become_follower(now, msg.term, None);
                false
            }
            MessageBody::AppendEntries { .. } | MessageBody::InstallSnapshot { .. } => {
                self.become_follower(now, msg.term, Some(msg.from.clone()));
                true
            }
            MessageBody::TimeoutNow => {
                // Only the known leader of our own term may hand its term over.
                self.become_follower(now, msg.term, None);
                false
            }
            _ => {
                self.become_follower(now, msg.term, None);
                true
            }
        }
    }

    /// Answers a message from an older term so its sender learns the new one.
    fn answer_stale(&mut self, msg: Message) {
        let body = match msg.body {
            MessageBody::AppendEntries { round, .. }
            | MessageBody::InstallSnapshot { round, .. } => MessageBody::AppendEntriesResponse {
                success: false,
                last_index: self.log.last_index(),
                round,
            },
            MessageBody::PreVote { .. } => MessageBody::PreVoteResponse { granted: false },
            MessageBody::RequestVote { .. } => MessageBody::RequestVoteResponse {
                granted: false,
                leader_contact_age: 0,
            },
            _ => return,
        };
        self.send(msg.from, body);
    }

    fn handle_pre_vote(
        &mut self,
        now: Time,
        from: NodeId,
        term: Term,
        last_log_index: LogIndex,
        last_log_term: Term,
    ) {
        let granted = term > self.term
            && !self.in_stickiness(now)
            && self.log.is_up_to_date(last_log_index, last_log_term);
        let reply_term = if granted { term } else { self.term };
        self.messages.push(Message {
            from: self.id.clone(),
            to: from,
            term: reply_term,
            body: MessageBody::PreVoteResponse { granted },
        });
    }

    fn handle_pre_vote_response(&mut self, now: Time, from: NodeId, term: Term, granted: bool) {
        if self.role == Role::PreCandidate && term == self.term.next() {
            self.record_vote(now, from, granted, Role::PreCandidate);
        }
    }

    fn handle_request_vote(
        &mut self,
        now: Time,
        from: NodeId,
        last_log_index: LogIndex,
        last_log_term: Term,
        transfer: bool,
    ) {
        let can_vote = match &self.voted_for {
            Some(v) => *v == from,
            None => {
                self.leader.is_none()
                    && (transfer || !self.in_stickiness(now))
                    && self.log.is_up_to_date(last_log_index, last_log_term)
            }
        };
        if can_vote && self.voted_for.is_none() {
            self.voted_for = Some(from.clone());
            self.hard_state_dirty = true;
            self.reset_election_timer(now);
        }
        let age = now.saturating_since(self.last_leader_contact);
        self.send(
            from,
            MessageBody::RequestVoteResponse {
                granted: can_vote,
                leader_contact_age: age.as_nanos() as u64,
            },
        );
    }

    fn handle_vote_response(&mut self, now: Time, from: NodeId, granted: bool, age: u64) {
        if granted && self.role == Role::Candidate && !self.transfer_campaign {
            let end = self.stickiness_end(now, Duration::from_nanos(age));
            self.lease_not_before = self.lease_not_before.max(end);
        }
        self.record_vote(now, from, granted, Role::Candidate);
    }

    fn handle_timeout_now(&mut self, now: Time, from: NodeId) {
        if self.lead.is_some() || !self.config.is_voter(&self.id) {
            return;
        }
        if self.leader.as_ref() != Some(&from) {
            // Only the leader of this term may hand over its term.
            return;
        }
        if self.retiring {
            // Refuse: Leave tells the leader to pick another target now
            // rather than wait out the transfer deadline.
            self.send(from, MessageBody::Leave);
            return;
        }
        self.campaign(now, true);
    }

    /// A member is going away: a leader removes it (and picks another
    /// transfer target if it was the target); a follower whose own leader
    /// sends Leave learns that the leader left without a successor.
    fn handle_leave(&mut self, from: NodeId) {
        if !self.config.contains(&from) {
            return;
        }
        self.retiring_peers.insert(from.clone());
        if let Some(lead) = self.lead.as_mut() {
            if lead.transfer.as_ref().is_some_and(|t| t.target == from) {
                // The target refused; the lease stays forfeited if
                // TimeoutNow went out.
                lead.transfer = None;
            }
            lead.leaving.insert(from);
        } else if self.leader.as_ref() == Some(&from) {
            self.abdicated_in = Some(self.term);
        }
    }

    // ----- role changes ---------------------------------------------------

    fn become_follower(&mut self, now: Time, term: Term, leader: Option<NodeId>) {
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            self.hard_state_dirty = true;
        }
        if self.role == Role::Leader {
            // Stickiness continues from the last round this node led.
            self.last_leader_contact = self.last_leader_contact.max(now);
        }
        self.role = Role::Follower;
        self.leader = leader;
        self.lead = None;
        self.votes.clear();
        self.reset_election_timer(now);
    }

    fn step_down(&mut self, now: Time) {
        let term = self.term;
        self.become_follower(now, term, None);
    }

    fn become_leader(&mut self, now: Time) {
        self.role = Role::Leader;
        self.led_term = Some(self.term);
        self.leader = Some(self.id.clone());
        self.votes.clear();
        self.leader_gone = false;
        #[allow(unused_mut)]
        let mut lease_not_before = self.lease_not_before.max(now);
        #[cfg(feature = "sim")]
        if self.skip_lease_wait {
            lease_not_before = now;
        }
        // Probe from the log as it was before the no-op, so the first append
        // carries the no-op and usually succeeds at once.
        let before_noop = self.log.last_index();
        // A leader that may hold a lease at once (a transfer campaign: the
        // old leader forfeited its lease) sends its first round as a bare
        // heartbeat and appends the no-op only after it. Otherwise the no-op
        // would be saved (fsync) here before the round could leave, and
        // saved again by each follower before it could answer: two disk
        // writes in series between the handoff and the lease. Measured in
        // the test bed's rolling updates, these saves took 2–75 ms each and
        // were most of a 60–145 ms handoff. A leader that waits out an old
        // lease anyway appends it at once, off that path.
        let noop_index = if self.transfer_campaign && self.config.voters.len() > 1 {
            None
        } else {
            self.hard_state_dirty = true;
            Some(self.log.append(self.term, Payload::Noop))
        };
        let progress = self
            .config
            .members()
            .filter(|(id, _)| **id != self.id)
            .map(|(id, _)| (id.clone(), Progress::new(before_noop)))
            .collect();
        self.lead = Some(LeaderState {
            progress,
            heartbeat_due: now,
            check_quorum_due: now + self.cfg.election_timeout_min,
            noop_index,
            own_round: now.as_nanos(),
            lease_until: None,
            lease_not_before,
            lease_forfeited: false,
            transfer: None,
            leaving: BTreeSet::new(),
            removed: VecDeque::new(),
        });
        self.broadcast_append(now);
        self.maybe_commit(now);
    }

    // ----- replication ----------------------------------------------------

    /// Sends a heartbeat round (with any missing entries) to every member.
    fn broadcast_append(&mut self, now: Time) {
        let members: Vec<NodeId> = match self.lead.as_mut() {
            Some(lead) => {
                lead.heartbeat_due = now + self.cfg.heartbeat_interval;
                if lead.lease_not_before > now {
                    // The first round the lease may rest on goes out the
                    // moment the previous lease has surely ended.
                    lead.heartbeat_due = lead.heartbeat_due.min(lead.lease_not_before);
                }
                lead.own_round = now.as_nanos();
                lead.progress.keys().cloned().collect()
            }
            None => return,
        };
        self.last_leader_contact = now;
        for to in members {
            self.send_append(now, to);
        }
        self.update_lease();
    }

    fn send_append(&mut self, now: Time, to: NodeId) {
        let Some(p) = self.lead.as_ref().and_then(|l| l.progress.get(&to)) else {
            return;
        };
        let round = now.as_nanos();
        let body = match self.log.term_at(p.next - 1) {
            Some(prev_log_term) if p.next > self.log.snapshot().last_index => {
                MessageBody::AppendEntries {
                    prev_log_index: p.next - 1,
                    prev_log_term,
                    entries: self.log.slice(p.next, MAX_ENTRIES_PER_MESSAGE),
                    leader_commit: self.commit,
                    round,
                }
            }
            _ => MessageBody::InstallSnapshot {
                snapshot: self.log.snapshot().clone(),
                leader_commit: self.commit,
                round,
            },
        };
        self.send(to, body);
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_append_entries(
        &mut self,
        now: Time,
        from: NodeId,
        prev_log_index: LogIndex,
        prev_log_term: Term,
        entries: Vec<crate::raft::types::Entry>,
        leader_commit: LogIndex,
        round: u64,
    ) -> Result<(), StepError> {
        if self.role == Role::Leader {
            return Err(StepError::SecondLeader {
                other: from,
                term: self.term,
            });
        }
        if !entries_follow(prev_log_index, prev_log_term, self.term, &entries) {
            return Err(StepError::MalformedEntries {
                prev: prev_log_index,
            });
        }
        self.check_same_leader(&from)?;
        // Entries up to our snapshot are committed, hence equal to the leader's.
        let snapshot_index = self.log.snapshot().last_index;
        let matches = prev_log_index < snapshot_index
            || self.log.term_at(prev_log_index) == Some(prev_log_term);
        // Find the first entry we do not already hold; refuse before touching state.
        let mut conflict = None;
        if matches {
            for e in entries.iter().filter(|e| e.index > snapshot_index) {
                match self.log.term_at(e.index) {
                    Some(t) if t == e.term => continue,
                    Some(_) if e.index <= self.commit => {
                        return Err(StepError::TruncatesCommitted {
                            at: e.index,
                            commit: self.commit,
                        });
                    }
                    _ => {
                        conflict = Some(e.index);
                        break;
                    }
                }
            }
        }
        self.hear_from_leader(now, &from);
        if !matches {
            let hint = self.log.last_index().min(prev_log_index.saturating_sub(1));
            self.send(
                from,
                MessageBody::AppendEntriesResponse {
                    success: false,
                    last_index: hint,
                    round,
                },
            );
            return Ok(());
        }
        // Cannot overflow: entries_follow checked every index.
        let last_new = prev_log_index + entries.len() as u64;
        if let Some(at) = conflict {
            self.log.truncate_from(at);
            for e in entries.into_iter().filter(|e| e.index >= at) {
                self.log.append(e.term, e.payload);
            }
            self.hard_state_dirty = true;
            self.refresh_config();
        }
        self.advance_commit(leader_commit.min(last_new));
        self.send(
            from,
            MessageBody::AppendEntriesResponse {
                success: true,
                last_index: last_new,
                round,
            },
        );
        Ok(())
    }

    fn handle_install_snapshot(
        &mut self,
        now: Time,
        from: NodeId,
        snapshot: Snapshot,
        leader_commit: LogIndex,
        round: u64,
    ) -> Result<(), StepError> {
        if self.role == Role::Leader {
            return Err(StepError::SecondLeader {
                other: from,
                term: self.term,
            });
        }
        if snapshot.last_index > leader_commit || snapshot.last_term > self.term {
            return Err(StepError::MalformedSnapshot {
                index: snapshot.last_index,
                commit: leader_commit,
            });
        }
        self.check_same_leader(&from)?;
        self.hear_from_leader(now, &from);
        let last_index = snapshot.last_index;
        if last_index > self.commit {
            self.log.install_snapshot(snapshot);
            self.commit = last_index;
            self.hard_state_dirty = true;
            self.refresh_config();
        }
        // Entries we kept after the snapshot were not checked against the
        // leader's log: commit only what the snapshot itself vouches for.
        self.advance_commit(leader_commit.min(last_index));
        self.send(
            from,
            MessageBody::AppendEntriesResponse {
                success: true,
                last_index,
                round,
            },
        );
        Ok(())
    }

    /// Refuses a second leader in the same term (evidence of a bug or a forgery).
    fn check_same_leader(&self, from: &NodeId) -> Result<(), StepError> {
        match &self.leader {
            Some(l) if l != from && self.role == Role::Follower => Err(StepError::SecondLeader {
                other: from.clone(),
                term: self.term,
            }),
            _ => Ok(()),
        }
    }

    fn hear_from_leader(&mut self, now: Time, leader: &NodeId) {
        if self.role != Role::Follower || self.leader.as_ref() != Some(leader) {
            let term = self.term;
            self.become_follower(now, term, Some(leader.clone()));
        }
        self.last_leader_contact = now;
        self.leader_gone = false;
        self.reset_election_timer(now);
    }

    fn handle_append_response(
        &mut self,
        now: Time,
        from: NodeId,
        success: bool,
        last_index: LogIndex,
        round: u64,
    ) {
        let last = self.log.last_index();
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        let Some(p) = lead.progress.get_mut(&from) else {
            return;
        };
        p.recent_active = true;
        // Any answer in this term means the member reset its stickiness when
        // it received `round`: it counts toward the lease either way.
        if round <= lead.own_round {
            p.acked_round = Some(p.acked_round.map_or(round, |r| r.max(round)));
        }
        let resend = if success {
            if last_index > p.matched {
                p.matched = last_index.min(last);
            }
            p.next = p.next.max(p.matched + 1);
            p.next <= last
        } else {
            // Move next down to just past the follower's hint, never below
            // what it already matched; a stale or duplicate reply changes nothing.
            let hinted = last_index.saturating_add(1).max(p.matched + 1);
            if hinted < p.next {
                p.next = hinted;
                true
            } else {
                false
            }
        };
        self.update_lease();
        if let Some(lead) = self.lead.as_mut() {
            if lead.noop_index.is_none() && lead.lease_until.is_some() {
                // The lease holds: the deferred no-op goes out with a round
                // at the next tick, in a Ready of its own, so its save never
                // delays the publication of this lease.
                lead.heartbeat_due = lead.heartbeat_due.min(now);
            }
        }
        self.maybe_commit(now);
        if resend && self.lead.is_some() {
            self.send_append(now, from);
        }
        self.maybe_send_timeout_now(now);
        self.drive_membership();
    }

    fn maybe_commit(&mut self, now: Time) {
        let Some(lead) = self.lead.as_ref() else {
            return;
        };
        let mut matched = std::mem::take(&mut self.scratch);
        matched.clear();
        matched.extend(self.config.voters.keys().map(|v| {
            if *v == self.id {
                self.log.last_index()
            } else {
                lead.progress.get(v).map_or(0, |p| p.matched)
            }
        }));
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_matched = matched.get(self.config.quorum() - 1).copied();
        self.scratch = matched;
        let Some(n) = quorum_matched else {
            return;
        };
        if n > self.commit && self.log.term_at(n) == Some(self.term) {
            self.advance_commit(n);
            // Tell followers promptly so a new configuration takes hold fast.
            self.broadcast_commit(now);
            if self.config_index <= self.commit {
                let config = &self.config;
                if let Some(lead) = self.lead.as_mut() {
                    lead.progress.retain(|id, _| config.contains(id));
                }
            }
        }
        if self.config_index <= self.commit && !self.config.is_voter(&self.id) {
            // Removed from the configuration and the removal is committed (§4.2.2).
            self.step_down(now);
        }
    }

    fn broadcast_commit(&mut self, now: Time) {
        let members: Vec<NodeId> = self
            .lead
            .as_ref()
            .map(|l| l.progress.keys().cloned().collect())
            .unwrap_or_default();
        for to in members {
            self.send_append(now, to);
        }
    }

    fn advance_commit(&mut self, to: LogIndex) {
        if to <= self.commit {
            return;
        }
        self.commit = to.min(self.log.last_index());
        if self.commit - self.log.snapshot().last_index >= self.cfg.compaction_threshold {
            self.log.compact_to(self.commit);
            self.hard_state_dirty = true;
        }
    }

    /// Recomputes the lease from the rounds a majority of voters acknowledged.
    fn update_lease(&mut self) {
        let duration = self.cfg.lease_duration();
        let quorum = self.config.quorum();
        let me_voter = self.config.is_voter(&self.id);
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        if lead.lease_forfeited || lead.transfer.is_some() || !me_voter {
            lead.lease_until = None;
            return;
        }
        let mut rounds = std::mem::take(&mut self.scratch);
        rounds.clear();
        rounds.extend(self.config.voters.keys().filter_map(|v| {
            if *v == self.id {
                Some(lead.own_round)
            } else {
                lead.progress.get(v).and_then(|p| p.acked_round)
            }
        }));
        rounds.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_round = rounds.get(quorum - 1).copied();
        self.scratch = rounds;
        let Some(start) = quorum_round.map(Time::from_nanos) else {
            return;
        };
        if start < lead.lease_not_before {
            // Sent while the previous leader's lease may still hold.
            return;
        }
        let until = start + duration;
        if lead.lease_until.is_none_or(|u| until > u) {
            lead.lease_until = Some(until);
        }
    }

    /// Appends the no-op that [`become_leader`](Self::become_leader)
    /// deferred, if it did; call it just before a round goes out.
    fn append_deferred_noop(&mut self) {
        if self.lead.as_ref().is_some_and(|l| l.noop_index.is_none()) {
            let index = self.log.append(self.term, Payload::Noop);
            self.hard_state_dirty = true;
            if let Some(lead) = self.lead.as_mut() {
                lead.noop_index = Some(index);
            }
        }
    }

    fn maybe_send_timeout_now(&mut self, now: Time) {
        let last = self.log.last_index();
        let Some(lead) = self.lead.as_mut() else {
            return;
        };
        let Some(tr) = lead.transfer.as_mut() else {
            return;
        };
        if tr.timeout_now_sent || now < lead.lease_not_before {
            // The target's campaign skips the lease wait, so the previous
            // leader's lease must be over before it may start.
            return;
        }
        if lead
            .progress
            .get(&tr.target)
            .is_some_and(|p| p.matched >= last)
        {
            tr.timeout_now_sent = true;
            lead.lease_forfeited = true;
            lead.lease_until = None;
            let target = tr.target.clone();
            self.send(target, MessageBody::TimeoutNow);
        }
    }

    // ----- membership ------------------------------------------------------

    fn check_can_change_config(&self) -> Result<(), ProposeError> {
        let Some(lead) = self.lead.as_ref() else {
            return Err(ProposeError::NotLeader {
                leader: self.leader.clone(),
            });
        };
        if lead.transfer.is_some() {
            return Err(ProposeError::Transferring);
        }
        if lead.noop_index.is_none_or(|noop| self.commit < noop) {
            return Err(ProposeError::TermNotCommitted);
        }
        if self.config_index > self.commit {
            return Err(ProposeError::ChangeInProgress);
        }
        Ok(())
    }

    fn append_config(&mut self, config: Configuration) -> LogIndex {
        let index = self.log.append(self.term, Payload::Config(config));
        self.hard_state_dirty = true;
        self.refresh_config();
        index
    }

    /// Promotes caught-up learners while voters are below `max_voters`, and
    /// removes members that asked to leave. One change at a time.
    fn drive_membership(&mut self) {
        if self.check_can_change_config().is_err() {
            return;
        }
        let Some(lead) = self.lead.as_ref() else {
            return;
        };
        if let Some(gone) = lead
            .leaving
            .iter()
            .find(|id| self.config.contains(id) && **id != self.id)
            .cloned()
        {
            if self.propose_remove(&gone).is_ok() {
                if let Some(l) = self.lead.as_mut() {
                    l.leaving.remove(&gone);
                }
            }
            return;
        }
        let voters = self.config.voters.len();
        if voters >= self.cfg.max_voters {
            return;
        }
        let last = self.log.last_index();
        let ready: Vec<(&NodeId, &String)> = self
            .config
            .learners
            .iter()
            .filter(|(id, _)| {
                lead.progress
                    .get(*id)
                    .is_some_and(|p| p.matched >= last && p.recent_active)
            })
            .collect();
        // Grow the voter set in pairs to an odd size: an even size tolerates
        // no more failures than the odd size below it, and two voters would
        // wedge for good if either were lost.
        let promote = if voters % 2 == 0 {
            !ready.is_empty()
        } else {
            ready.len() >= 2 && voters + 2 <= self.cfg.max_voters
        };
        if let Some((id, addr)) = ready.first().filter(|_| promote) {
            let (id, addr) = ((*id).clone(), (*addr).clone());
            let mut next = self.config.clone();
            next.learners.remove(&id);
            next.voters.insert(id, addr);
            self.append_config(next);
        }
    }

    /// Reloads the configuration in force from the log and fits the leader's
    /// progress table to it.
    fn refresh_config(&mut self) {
        let (index, config) = self.log.latest_config();
        self.config_index = index;
        self.config = config.clone();
        let config = &self.config;
        self.retiring_peers.retain(|id| config.contains(id));
        let last = self.log.last_index();
        let me = self.id.clone();
        // A member removed by a still-uncommitted change keeps receiving
        // appends until the change commits, so it learns of its removal.
        let pending = self.config_index > self.commit;
        if let Some(lead) = self.lead.as_mut() {
            lead.progress
                .retain(|id, _| pending || self.config.contains(id));
            for (id, _) in self.config.members() {
                if *id != me && !lead.progress.contains_key(id) {
                    lead.progress.insert(id.clone(), Progress::new(last));
                }
            }
        }
        self.update_lease();
    }

    fn send(&mut self, to: NodeId, body: MessageBody) {
        self.messages.push(Message {
            from: self.id.clone(),
            to,
            term: self.term,
            body,
        });
    }
}

impl Progress {
    fn new(last_index: LogIndex) -> Progress {
        Progress {
            next: last_index + 1,
            matched: 0,
            acked_round: None,
            recent_active: false,
        }
    }
}

/// Returns whether `entries` directly follow (`prev_index`, `prev_term`):
/// consecutive indexes without overflow, terms never falling and never above
/// the sender's term `term`.
fn entries_follow(
    prev_index: LogIndex,
    prev_term: Term,
    term: Term,
    entries: &[crate::raft::types::Entry],
) -> bool {
    let mut expected = prev_index;
    let mut last_term = prev_term;
    for e in entries {
        match expected.checked_add(1) {
            Some(next) if e.index == next => expected = next,
            _ => return false,
        }
        if e.term < last_term || e.term > term {
            return false;
        }
        last_term = e.term;
    }
    true
}
