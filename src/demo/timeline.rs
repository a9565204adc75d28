//! What the demo saw, and what follows from it: leadership claims from the
//! polls, the faults the demo injected, the events to show, failover times
//! and safety violations. Pure: no I/O, no clock; time arrives with the input.
//!
//! ```text
//!  Observation (one poll of one node) ──► Timeline::observe ──► Vec<Event>
//!  fault injected (kill, freeze, ..)  ──► Timeline::fault   ──► Event
//! ```
//!
//! A poll is known only to have been answered somewhere between sending the
//! request and receiving the answer, so every conclusion here is drawn from
//! those bounds: a failover ends at the first 200 whose request was sent after
//! the fault, and two leaders are reported only when their claims certainly
//! overlapped, never on a mere suspicion. Three rules prove an overlap: two
//! 200s in one term; a 200 inside the lease another leader promised (the
//! demo knows its faults, so it voids the promise of a leader it asked to
//! hand over); and a 200 inside another leader's tenure, the rule of the
//! tests and benchmarks ([`samples::Timeline::violations`]), applied to the
//! 200s of the last [`TENURE_WINDOW`].

pub use super::probe::{Observation, Reply};
use super::samples::{self, Sample};
use crate::api::LeaderStatus;
use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;
use tokio::time::Instant;

/// A fault the demo injects into the current leader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// `kill -9`, restarted from its state directory a little later.
    Kill,
    /// `SIGSTOP` for a while, then `SIGCONT`: to its peers a frozen process
    /// looks exactly like one cut off by a network partition.
    Freeze,
    /// `SIGTERM`: the leader hands leadership over and exits; restarted later.
    Handoff,
}

impl FaultKind {
    /// Returns a one-word name (`kill -9`, `freeze`, `handoff`).
    pub fn short(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill -9",
            FaultKind::Freeze => "freeze",
            FaultKind::Handoff => "handoff",
        }
    }
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FaultKind::Kill => "kill -9",
            FaultKind::Freeze => "freeze (SIGSTOP)",
            FaultKind::Handoff => "graceful handoff (SIGTERM)",
        })
    }
}

/// How far back the tenure rule looks: 200s sent longer ago are dropped,
/// so memory stays bounded however long the demo runs.
pub const TENURE_WINDOW: Duration = Duration::from_secs(10);

/// A completed failover: from injecting a fault into the leader to the first
/// 200 answered to a request sent after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// The fault that started it.
    pub kind: FaultKind,
    /// The leader the fault hit.
    pub from: String,
    /// The node that answered 200 first afterwards (may be `from` again).
    pub to: String,
    /// The term `to` leads in.
    pub term: u64,
    /// From the fault to receiving that 200.
    pub took: Duration,
}

/// A broken promise of the product: at no instant may two nodes answer 200.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Violation {
    /// Two nodes answered 200 in the same term (Raft election safety, §5.2).
    SameTerm {
        /// One leader.
        first: String,
        /// The other.
        second: String,
        /// The term both claimed.
        term: u64,
    },
    /// `second` answered 200 while `first`'s lease certainly still held.
    LeaseOverlap {
        /// The node whose lease was running.
        first: String,
        /// Its term.
        first_term: u64,
        /// The node that answered 200 inside that lease.
        second: String,
        /// Its term.
        second_term: u64,
        /// The least time both claims overlapped.
        overlap: Duration,
    },
    /// `second` answered 200 while `first` led its term: `first` answered
    /// 200 in that term both before and after.
    InsideTenure {
        /// The node whose tenure was intruded on.
        first: String,
        /// Its term.
        first_term: u64,
        /// The node that answered 200 inside it.
        second: String,
        /// Its term.
        second_term: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::SameTerm {
                first,
                second,
                term,
            } => write!(
                f,
                "TWO LEADERS: {first} and {second} both answered 200 in term {term}"
            ),
            Violation::LeaseOverlap {
                first,
                first_term,
                second,
                second_term,
                overlap,
            } => write!(
                f,
                "TWO LEADERS: {second} (term {second_term}) answered 200 while the lease of \
                 {first} (term {first_term}) still held, for at least {}",
                human(*overlap)
            ),
            Violation::InsideTenure {
                first,
                first_term,
                second,
                second_term,
            } => write!(
                f,
                "TWO LEADERS: {second} (term {second_term}) answered 200 while {first} led \
                 term {first_term} ({first} answered 200 in term {first_term} before and after)"
            ),
        }
    }
}

/// Why a new leadership appeared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The cluster's first leader, this long after the demo started.
    Formed {
        /// Since the demo started.
        after: Duration,
    },
    /// The end of a failover the demo caused.
    Failover(Failover),
    /// An election nobody here caused; `gap` is the time since the last 200
    /// from any node.
    Election {
        /// Since the last 200 seen.
        gap: Duration,
    },
}

/// Something worth a line in the event log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A node process was started.
    Started {
        /// The node.
        node: String,
        /// Its process id.
        pid: u32,
    },
    /// A node process was started again after a fault, with its state directory.
    Restarted {
        /// The node.
        node: String,
        /// Its new process id.
        pid: u32,
    },
    /// The demo injected a fault into a leader.
    Fault {
        /// The leader.
        node: String,
        /// What was done to it.
        kind: FaultKind,
    },
    /// A frozen node was let go on (`SIGCONT`).
    Thawed {
        /// The node.
        node: String,
        /// How long it was frozen.
        after: Duration,
    },
    /// The leader reported every node as a member (voter or learner).
    Joined {
        /// Voters in the leader's configuration.
        voters: usize,
        /// Learners in it.
        learners: usize,
        /// Since the demo started.
        after: Duration,
    },
    /// A fault was asked for but there was no leader to inject it into.
    NoLeader {
        /// The fault asked for.
        kind: FaultKind,
    },
    /// A node stopped answering 200 without the demo doing anything.
    LeaderLost {
        /// The node.
        node: String,
        /// Its term.
        term: u64,
    },
    /// A node answered 200 for a term not seen before.
    Leader {
        /// The node.
        node: String,
        /// Its term.
        term: u64,
        /// Why.
        cause: Cause,
    },
    /// A node process ended without the demo asking it to.
    Exited {
        /// The node.
        node: String,
        /// The exit status as text (`exit status: 1`).
        status: String,
    },
    /// A node did not exit within its grace period after `SIGTERM`.
    Escalated {
        /// The node.
        node: String,
    },
    /// A signal could not be delivered or a node could not be (re)started.
    Failed {
        /// What went wrong and what to do.
        message: String,
    },
    /// Two leaders at once: the demo shows this loudly.
    Violation(Violation),
}

impl Event {
    /// Returns how loudly the view should show this event.
    pub fn severity(&self) -> Severity {
        match self {
            Event::Violation(_) => Severity::Alarm,
            Event::Exited { .. } | Event::Failed { .. } | Event::Escalated { .. } => {
                Severity::Trouble
            }
            Event::Fault { .. } | Event::LeaderLost { .. } => Severity::Fault,
            Event::Leader { .. } => Severity::Leader,
            _ => Severity::Info,
        }
    }
}

/// How loudly an event is shown, from quietest to loudest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Routine (processes started, thawed).
    Info,
    /// A fault injected or leadership lost.
    Fault,
    /// A new leader.
    Leader,
    /// Something went wrong with a node or the demo itself.
    Trouble,
    /// Two leaders at once: the product's core promise broken.
    Alarm,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Started { node, pid } => write!(f, "started {node} (pid {pid})"),
            Event::Restarted { node, pid } => {
                write!(f, "restarted {node} from its state dir (pid {pid})")
            }
            Event::Fault { node, kind } => match kind {
                FaultKind::Kill => write!(f, "killed {node} (kill -9)"),
                FaultKind::Freeze => write!(f, "froze {node} (SIGSTOP: to its peers, a partition)"),
                FaultKind::Handoff => write!(f, "stopped {node} (SIGTERM: graceful handoff)"),
            },
            Event::Thawed { node, after } => {
                write!(f, "thawed {node} (SIGCONT) after {}", human(*after))
            }
            Event::Joined {
                voters,
                learners: 0,
                after,
            } => write!(
                f,
                "all {voters} nodes joined as voters, {} after start",
                human(*after)
            ),
            Event::Joined {
                voters,
                learners,
                after,
            } => write!(
                f,
                "all {} nodes joined ({voters} voters, {learners} {}), {} after start",
                voters + learners,
                if *learners == 1 {
                    "learner"
                } else {
                    "learners"
                },
                human(*after)
            ),
            Event::NoLeader { kind } => write!(f, "no leader right now; {kind} skipped"),
            Event::LeaderLost { node, term } => {
                write!(f, "{node} stopped answering 200 (term {term})")
            }
            Event::Leader { node, term, cause } => match cause {
                Cause::Formed { after } => write!(
                    f,
                    "leader {node} (term {term}), {} after start",
                    human(*after)
                ),
                Cause::Failover(failover) if failover.to == failover.from => write!(
                    f,
                    "{node} leads again (term {term}) after {}",
                    human(failover.took)
                ),
                Cause::Failover(failover) => write!(
                    f,
                    "new leader {node} (term {term}) after {}",
                    human(failover.took)
                ),
                Cause::Election { gap } => write!(
                    f,
                    "new leader {node} (term {term}), {} after the last 200",
                    human(*gap)
                ),
            },
            Event::Exited { node, status } => {
                write!(f, "{node} exited unexpectedly ({status}); see {node}.log")
            }
            Event::Escalated { node } => {
                write!(f, "{node} ignored SIGTERM; killed it (kill -9)")
            }
            Event::Failed { message } => f.write_str(message),
            Event::Violation(violation) => violation.fmt(f),
        }
    }
}

/// Formats a duration for people: `182 ms` below a second, else `12.3 s`.
pub fn human(duration: Duration) -> String {
    if duration < Duration::from_secs(1) {
        format!("{} ms", duration.as_millis())
    } else {
        format!("{:.1} s", duration.as_secs_f64())
    }
}

/// A 200 seen from a node: the node led at some instant in `[sent, received]`
/// and promised, by its lease, that nobody else would lead before
/// `promise_until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Claim {
    term: u64,
    sent: Instant,
    received: Instant,
    promise_until: Instant,
}

/// The newest leadership seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Leadership {
    node: usize,
    term: u64,
}

/// A fault injected whose failover has not ended yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    node: usize,
    kind: FaultKind,
    at: Instant,
}

/// Everything the demo concluded from its observations so far.
#[derive(Debug)]
pub struct Timeline {
    names: Vec<String>,
    started: Instant,
    /// Newest observation of each node.
    latest: Vec<Option<Observation>>,
    /// Newest 200 of each node.
    claims: Vec<Option<Claim>>,
    leader: Option<Leadership>,
    /// When the newest 200 of any node arrived.
    last_claim: Option<Instant>,
    pending: Option<Pending>,
    failovers: Vec<Failover>,
    violations: Vec<Violation>,
    /// Violations already reported, so a lasting one is shown once.
    reported: BTreeSet<(usize, usize, u64, u64)>,
    /// The 200s of the last [`TENURE_WINDOW`], timed from `started`.
    recent: samples::Timeline,
    /// Voters of a complete cluster: every node, up to the voter limit.
    full_voters: usize,
    /// Whether a leader has reported the cluster complete.
    joined: bool,
}

impl Timeline {
    /// Starts an empty timeline of the nodes called `names` at `started`;
    /// at most `max_voters` of them vote.
    pub fn new(names: Vec<String>, max_voters: usize, started: Instant) -> Timeline {
        let nodes = names.len();
        Timeline {
            names,
            started,
            latest: vec![None; nodes],
            claims: vec![None; nodes],
            leader: None,
            last_claim: None,
            pending: None,
            failovers: Vec::new(),
            violations: Vec::new(),
            reported: BTreeSet::new(),
            recent: samples::Timeline::default(),
            full_voters: nodes.min(max_voters),
            joined: false,
        }
    }

    /// Takes in one poll and returns what it means. An observation of an
    /// unknown node, or older than the newest one of its node, changes nothing.
    pub fn observe(&mut self, observation: Observation) -> Vec<Event> {
        let node = observation.node;
        let Some(slot) = self.latest.get(node) else {
            return Vec::new();
        };
        if slot
            .as_ref()
            .is_some_and(|seen| seen.sent > observation.sent)
        {
            return Vec::new();
        }
        let mut events = Vec::new();
        match &observation.reply {
            Reply::Answered {
                leading: true,
                status,
            } => self.handle_claim(&observation, status, &mut events),
            _ => self.handle_no_claim(node, &mut events),
        }
        self.latest[node] = Some(observation);
        events
    }

    /// Records that the demo injected `kind` into `node` at `at` and returns
    /// the event to log. A graceful handoff releases the leader's lease: it
    /// stops claiming before handing over, so its earlier promise is void.
    pub fn fault(&mut self, node: usize, kind: FaultKind, at: Instant) -> Event {
        if kind == FaultKind::Handoff {
            if let Some(Some(claim)) = self.claims.get_mut(node) {
                claim.promise_until = claim.promise_until.min(at);
            }
        }
        self.pending = Some(Pending { node, kind, at });
        Event::Fault {
            node: self.name(node),
            kind,
        }
    }

    /// Returns the node that leads now: the newest leadership seen, as long
    /// as that node's newest answer is still a 200.
    pub fn current_leader(&self) -> Option<usize> {
        let leader = self.leader?;
        let latest = self.latest.get(leader.node)?.as_ref()?;
        latest.reply.is_leading().then_some(leader.node)
    }

    /// Returns the newest observation of `node`.
    pub fn latest(&self, node: usize) -> Option<&Observation> {
        self.latest.get(node)?.as_ref()
    }

    /// Returns the failovers completed so far, oldest first.
    pub fn failovers(&self) -> &[Failover] {
        &self.failovers
    }

    /// Returns the safety violations seen so far, oldest first.
    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    /// Returns the fault still waiting for a new leader, and when it was injected.
    pub fn pending(&self) -> Option<(FaultKind, Instant)> {
        self.pending.map(|p| (p.kind, p.at))
    }

    /// Returns the median and the longest failover time (`None` before the first).
    pub fn failover_stats(&self) -> Option<(Duration, Duration)> {
        let mut times: Vec<Duration> = self.failovers.iter().map(|f| f.took).collect();
        times.sort();
        let max = *times.last()?;
        let mid = times.len() / 2;
        let median = if times.len() % 2 == 0 {
            (times[mid - 1] + times[mid]) / 2
        } else {
            times[mid]
        };
        Some((median, max))
    }

    fn name(&self, node: usize) -> String {
        self.names
            .get(node)
            .cloned()
            .unwrap_or_else(|| format!("node #{node}"))
    }

    /// Returns whether a leader has reported the cluster complete: every
    /// node a member, and as many voters as allowed.
    pub fn all_joined(&self) -> bool {
        self.joined
    }

    fn handle_claim(&mut self, seen: &Observation, status: &LeaderStatus, events: &mut Vec<Event>) {
        self.handle_leadership(seen, status, events);
        let complete = status.voters >= self.full_voters
            && status.voters + status.learners >= self.names.len();
        if !self.joined && complete {
            self.joined = true;
            events.push(Event::Joined {
                voters: status.voters,
                learners: status.learners,
                after: seen.received.saturating_duration_since(self.started),
            });
        }
    }

    fn handle_leadership(
        &mut self,
        seen: &Observation,
        status: &LeaderStatus,
        events: &mut Vec<Event>,
    ) {
        let node = seen.node;
        let lease = Duration::from_millis(status.lease_remaining_ms);
        let claim = Claim {
            term: status.term,
            sent: seen.sent,
            received: seen.received,
            // The answer was made at or after `sent`, with `lease` left then.
            promise_until: seen.sent + lease,
        };
        self.check_two_leaders(node, claim, events);
        self.check_tenures(seen, events);
        self.claims[node] = Some(claim);
        let gap = self
            .last_claim
            .map(|last| seen.received.saturating_duration_since(last));
        self.last_claim = Some(
            self.last_claim
                .map_or(seen.received, |l| l.max(seen.received)),
        );

        let newer = match self.leader {
            None => true,
            // Another node in the same term is a violation, reported above.
            Some(leader) => status.term > leader.term,
        };
        // A 200 to a request sent after the fault ends the failover, whoever sent it.
        if let Some(pending) = self.pending.filter(|p| seen.sent >= p.at) {
            if newer || self.leader.is_some_and(|l| l.node == node) {
                self.pending = None;
                let failover = Failover {
                    kind: pending.kind,
                    from: self.name(pending.node),
                    to: self.name(node),
                    term: status.term,
                    took: seen.received.saturating_duration_since(pending.at),
                };
                self.failovers.push(failover.clone());
                self.leader = Some(Leadership {
                    node,
                    term: status.term,
                });
                events.push(self.leader_event(node, status.term, Cause::Failover(failover)));
                return;
            }
        }
        if !newer {
            return;
        }
        let cause = match (self.leader, gap) {
            (Some(_), Some(gap)) => Cause::Election { gap },
            _ => Cause::Formed {
                after: seen.received.saturating_duration_since(self.started),
            },
        };
        self.leader = Some(Leadership {
            node,
            term: status.term,
        });
        events.push(self.leader_event(node, status.term, cause));
    }

    fn leader_event(&self, node: usize, term: u64, cause: Cause) -> Event {
        Event::Leader {
            node: self.name(node),
            term,
            cause,
        }
    }

    /// Reports the leader losing its 200 unless the demo caused it.
    fn handle_no_claim(&mut self, node: usize, events: &mut Vec<Event>) {
        let Some(leader) = self.leader.filter(|l| l.node == node) else {
            return;
        };
        let was_leading = self.latest[node]
            .as_ref()
            .is_some_and(|seen| seen.reply.is_leading());
        let caused = self.pending.is_some_and(|p| p.node == node);
        if was_leading && !caused {
            events.push(Event::LeaderLost {
                node: self.name(node),
                term: leader.term,
            });
        }
    }

    /// Compares a new claim of `node` with every other node's newest claim.
    fn check_two_leaders(&mut self, node: usize, claim: Claim, events: &mut Vec<Event>) {
        for other in 0..self.claims.len() {
            let Some(earlier) = self.claims[other].filter(|_| other != node) else {
                continue;
            };
            let found = if earlier.term == claim.term {
                Some(Violation::SameTerm {
                    first: self.name(other),
                    second: self.name(node),
                    term: claim.term,
                })
            } else if let Some(overlap) = certain_overlap(earlier, claim) {
                Some(self.overlap(other, earlier, node, claim, overlap))
            } else {
                certain_overlap(claim, earlier)
                    .map(|overlap| self.overlap(node, claim, other, earlier, overlap))
            };
            let Some(violation) = found else { continue };
            self.report(other, earlier.term, node, claim.term, violation, events);
        }
    }

    /// Adds the 200 `seen` to the recent ones and reports every 200 inside
    /// another node's tenure among them.
    fn check_tenures(&mut self, seen: &Observation, events: &mut Vec<Event>) {
        let sample = Sample::of(seen, self.started.into_std());
        let window = u64::try_from(TENURE_WINDOW.as_micros()).unwrap_or(u64::MAX);
        self.recent.insert(sample);
        self.recent
            .forget_before(sample.sent_us.saturating_sub(window));
        for found in self.recent.violations() {
            let (first, second) = (found.tenure_slot, found.intruder.slot);
            let (first_term, second_term) = (found.tenure_term, found.intruder.term);
            let violation = Violation::InsideTenure {
                first: self.name(first),
                first_term,
                second: self.name(second),
                second_term,
            };
            self.report(first, first_term, second, second_term, violation, events);
        }
    }

    /// Records `violation` of nodes `a` and `b` in their terms and returns
    /// it as an event, unless one of the pair was reported before.
    fn report(
        &mut self,
        a: usize,
        a_term: u64,
        b: usize,
        b_term: u64,
        violation: Violation,
        events: &mut Vec<Event>,
    ) {
        let key = (a.min(b), a.max(b), a_term.min(b_term), a_term.max(b_term));
        if self.reported.insert(key) {
            self.violations.push(violation.clone());
            events.push(Event::Violation(violation));
        }
    }

    fn overlap(
        &self,
        first: usize,
        first_claim: Claim,
        second: usize,
        second_claim: Claim,
        overlap: Duration,
    ) -> Violation {
        Violation::LeaseOverlap {
            first: self.name(first),
            first_term: first_claim.term,
            second: self.name(second),
            second_term: second_claim.term,
            overlap,
        }
    }
}

/// Returns how long `later` certainly overlapped `earlier`'s lease, if it did:
/// `earlier` was answered before `later` was asked, and `later` was answered
/// before `earlier`'s promise ran out.
fn certain_overlap(earlier: Claim, later: Claim) -> Option<Duration> {
    (earlier.received <= later.sent && later.received < earlier.promise_until)
        .then(|| earlier.promise_until.duration_since(later.received))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A timeline of three nodes started at `t0`, fed observations by time offset.
    struct Script {
        timeline: Timeline,
        t0: Instant,
        /// Voters the nodes report; the rest are learners.
        voters: usize,
    }

    impl Script {
        fn new() -> Script {
            let t0 = Instant::now();
            let names = (1..=3).map(|i| format!("node-{i}")).collect();
            Script {
                timeline: Timeline::new(names, 5, t0),
                t0,
                voters: 1,
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Node `node` answers a poll sent at `sent` ms, 2 ms later.
        fn answer(&mut self, node: usize, sent: u64, leading: bool, term: u64) -> Vec<Event> {
            let lease_remaining_ms = if leading { 140 } else { 0 };
            let status = LeaderStatus {
                is_leader: leading,
                node: format!("node-{}", node + 1),
                node_id: format!("node-{}#1", node + 1),
                role: if leading { "leader" } else { "follower" }.into(),
                leader: None,
                leader_id: None,
                leader_address: None,
                term,
                lease_remaining_ms,
                voters: self.voters,
                learners: 3 - self.voters,
            };
            self.timeline.observe(Observation {
                node,
                sent: self.at(sent),
                received: self.at(sent + 2),
                reply: Reply::Answered { leading, status },
            })
        }

        fn silent(&mut self, node: usize, sent: u64) -> Vec<Event> {
            self.timeline.observe(Observation {
                node,
                sent: self.at(sent),
                received: self.at(sent + 250),
                reply: Reply::NoAnswer {
                    reason: "no answer in 250 ms".into(),
                },
            })
        }

        fn fault(&mut self, node: usize, kind: FaultKind, at: u64) -> Event {
            self.timeline.fault(node, kind, self.at(at))
        }
    }

    fn texts(events: &[Event]) -> Vec<String> {
        events.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn the_first_leader_is_reported_with_the_time_since_start() {
        let mut s = Script::new();
        assert!(s.answer(1, 100, false, 1).is_empty());
        let events = s.answer(0, 600, true, 2);
        assert_eq!(
            texts(&events),
            ["leader node-1 (term 2), 602 ms after start"]
        );
        assert_eq!(s.timeline.current_leader(), Some(0));
        assert!(s.answer(0, 620, true, 2).is_empty(), "same leader again");
    }

    #[test]
    fn joining_is_reported_once_when_the_leader_counts_every_node() {
        let mut s = Script::new();
        assert!(s.answer(0, 500, true, 2).len() == 1, "only the leader");
        s.voters = 2;
        assert!(s.answer(0, 550, true, 2).is_empty(), "one still a learner");
        assert!(!s.timeline.all_joined());
        s.voters = 3;
        let events = s.answer(0, 600, true, 2);
        assert_eq!(
            texts(&events),
            ["all 3 nodes joined as voters, 602 ms after start"]
        );
        assert!(s.timeline.all_joined());
        assert!(s.answer(0, 620, true, 2).is_empty());
        let joined = Event::Joined {
            voters: 2,
            learners: 1,
            after: Duration::from_secs(3),
        };
        assert_eq!(
            joined.to_string(),
            "all 3 nodes joined (2 voters, 1 learner), 3.0 s after start"
        );
    }

    #[test]
    fn failover_time_runs_from_the_fault_to_the_first_200_asked_after_it() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        let fault = s.fault(0, FaultKind::Kill, 1000);
        assert_eq!(fault.to_string(), "killed node-1 (kill -9)");
        assert!(
            s.silent(0, 1010).is_empty(),
            "an expected silence is no news"
        );
        assert!(s.answer(1, 1100, false, 3).is_empty());
        let events = s.answer(1, 1180, true, 3);
        assert_eq!(texts(&events), ["new leader node-2 (term 3) after 182 ms"]);
        let failover = &s.timeline.failovers()[0];
        assert_eq!(
            (failover.from.as_str(), failover.to.as_str()),
            ("node-1", "node-2")
        );
        assert_eq!(failover.took, 182 * MS);
        assert_eq!(s.timeline.pending(), None);
    }

    #[test]
    fn a_200_asked_before_the_fault_does_not_end_the_failover() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.fault(0, FaultKind::Freeze, 1000);
        // Node 2 answered a request sent before the fault: it cannot have been
        // elected because of it, so the failover is still running.
        let events = s.answer(1, 999, true, 3);
        assert!(matches!(
            &events[..],
            [Event::Leader {
                cause: Cause::Election { .. },
                ..
            }]
        ));
        assert!(s.timeline.pending().is_some());
        assert!(s.timeline.failovers().is_empty());
    }

    #[test]
    fn the_old_leader_coming_back_ends_the_failover_as_leading_again() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.fault(0, FaultKind::Freeze, 1000);
        let events = s.answer(0, 3000, true, 2);
        assert_eq!(texts(&events), ["node-1 leads again (term 2) after 2.0 s"]);
        assert_eq!(s.timeline.failovers().len(), 1);
    }

    #[test]
    fn a_stale_200_of_an_older_term_does_not_move_the_leader_back() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.answer(1, 600, true, 3);
        // node-1's poll sent at 300 is processed late (its lease ended at 440).
        assert!(s.answer(0, 300, true, 2).is_empty());
        assert_eq!(s.timeline.current_leader(), Some(1));
    }

    #[test]
    fn losing_leadership_unprovoked_is_reported_then_the_election_gap() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        assert_eq!(
            texts(&s.answer(0, 120, false, 2)),
            ["node-1 stopped answering 200 (term 2)"]
        );
        assert!(s.answer(0, 140, false, 3).is_empty(), "reported once");
        assert_eq!(s.timeline.current_leader(), None);
        let events = s.answer(2, 400, true, 3);
        assert_eq!(
            texts(&events),
            ["new leader node-3 (term 3), 300 ms after the last 200"]
        );
    }

    #[test]
    fn two_leaders_in_one_term_are_flagged_once() {
        let mut s = Script::new();
        s.answer(0, 100, true, 4);
        let events = s.answer(1, 1000, true, 4);
        assert_eq!(
            texts(&events),
            ["TWO LEADERS: node-1 and node-2 both answered 200 in term 4"]
        );
        assert_eq!(events[0].severity(), Severity::Alarm);
        assert!(s.answer(1, 1020, true, 4).is_empty(), "reported once");
        assert_eq!(s.timeline.violations().len(), 1);
    }

    #[test]
    fn a_200_inside_another_leaders_lease_is_flagged() {
        let mut s = Script::new();
        // node-1: answered in [100, 102] with 140 ms of lease: promised until 240.
        s.answer(0, 100, true, 2);
        let events = s.answer(1, 150, true, 3);
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(
            events[0].to_string(),
            "TWO LEADERS: node-2 (term 3) answered 200 while the lease of node-1 (term 2) \
             still held, for at least 88 ms"
        );
    }

    #[test]
    fn an_overlap_found_out_of_order_is_flagged_too() {
        let mut s = Script::new();
        // node-2's poll (sent 150) is processed before node-1's older one (sent 100).
        s.answer(1, 150, true, 3);
        let events = s.answer(0, 100, true, 2);
        assert!(
            matches!(&events[..], [Event::Violation(Violation::LeaseOverlap { first, .. })] if first == "node-1"),
            "{events:?}"
        );
    }

    #[test]
    fn a_200_inside_another_leaders_tenure_is_flagged_after_its_lease_ran_out() {
        let mut s = Script::new();
        // node-1 promised until 240, node-2 until 440; each 200 comes after
        // the other's promise ran out, but node-1 answers 200 in its term 2
        // both before and after node-2's.
        s.answer(0, 100, true, 2);
        s.answer(1, 300, true, 3);
        let events = s.answer(0, 450, true, 2);
        assert_eq!(
            texts(&events),
            [
                "TWO LEADERS: node-2 (term 3) answered 200 while node-1 led term 2 \
              (node-1 answered 200 in term 2 before and after)"
            ]
        );
        assert!(s.answer(0, 470, true, 2).is_empty(), "reported once");
    }

    #[test]
    fn the_tenure_rule_forgets_200s_older_than_its_window() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.answer(1, 300, true, 3);
        let late = 300 + TENURE_WINDOW.as_millis() as u64 + 1;
        assert!(
            s.answer(0, late, true, 2).is_empty(),
            "node-1's first 200 is forgotten: no tenure left to intrude on"
        );
        assert_eq!(s.timeline.recent.samples.len(), 1, "bounded");
    }

    #[test]
    fn a_200_after_the_lease_ran_out_is_no_violation() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        let events = s.answer(1, 240, true, 3);
        assert_eq!(
            texts(&events),
            ["new leader node-2 (term 3), 140 ms after the last 200"]
        );
        assert!(s.timeline.violations().is_empty());
    }

    #[test]
    fn polls_that_may_have_been_answered_in_either_order_are_no_violation() {
        let mut s = Script::new();
        // node-2 was asked (99) before node-1's answer arrived (102): node-1
        // may have stepped down and node-2 been elected in between.
        s.answer(0, 100, true, 2);
        s.answer(1, 99, true, 3);
        assert!(s.timeline.violations().is_empty());
    }

    #[test]
    fn a_graceful_handoff_releases_the_old_leaders_lease() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.fault(0, FaultKind::Handoff, 110);
        let events = s.answer(1, 130, true, 3);
        assert_eq!(texts(&events), ["new leader node-2 (term 3) after 22 ms"]);
        assert!(s.timeline.violations().is_empty());
    }

    #[test]
    fn a_killed_leaders_lease_still_binds_the_others() {
        let mut s = Script::new();
        s.answer(0, 100, true, 2);
        s.fault(0, FaultKind::Kill, 110);
        let events = s.answer(1, 130, true, 3);
        assert!(matches!(events[0], Event::Violation(_)), "{events:?}");
    }

    #[test]
    fn failover_stats_give_the_median_and_the_maximum() {
        let mut s = Script::new();
        assert_eq!(s.timeline.failover_stats(), None);
        s.answer(0, 0, true, 1);
        for (i, took) in [300u64, 100, 200, 500].into_iter().enumerate() {
            let at = 1000 * (i as u64 + 1);
            let (old, new) = (i % 3, (i + 1) % 3);
            s.fault(old, FaultKind::Kill, at);
            s.answer(new, at + took - 2, true, i as u64 + 2);
            if i == 2 {
                assert_eq!(s.timeline.failover_stats(), Some((200 * MS, 300 * MS)));
            }
        }
        assert_eq!(s.timeline.failover_stats(), Some((250 * MS, 500 * MS)));
    }

    #[test]
    fn observations_of_unknown_nodes_or_out_of_order_change_nothing() {
        let mut s = Script::new();
        assert!(s.answer(7, 100, true, 2).is_empty());
        assert_eq!(s.timeline.current_leader(), None);
        s.answer(0, 200, false, 1);
        assert!(
            s.answer(0, 100, true, 2).is_empty(),
            "older than the newest"
        );
        assert_eq!(s.timeline.current_leader(), None);
    }

    #[test]
    fn durations_read_as_milliseconds_then_seconds() {
        assert_eq!(human(182 * MS), "182 ms");
        assert_eq!(human(Duration::from_millis(12_340)), "12.3 s");
    }
}
