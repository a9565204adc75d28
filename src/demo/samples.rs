//! A record of `/is-leader` answers of every node, and what it proves: the
//! two-leader check of the integration tests, the process benchmark and the
//! demo. The [`Sampler`] records through [`super::probe`].
//!
//! ```text
//!  Sampler ──Probes (every ~2 ms per node)──► Sample{slot, sent, received, status, term}
//!                                                     │ stop()
//!                                                     ▼
//!  Timeline: violations (two leaders), lease lapses, leaderless gaps, failover times
//! ```
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

use super::probe::{Client, Observation, Probes, Reply};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Observations buffered between the polling tasks and the recorder.
const BUFFERED: usize = 1024;

/// Returns `at` in microseconds since `origin` (0 before it).
pub fn micros_since(origin: Instant, at: Instant) -> u64 {
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
    /// Returns the sample of `observation`, timed on `origin`'s clock: the
    /// status is 200 or 503 when the node answered, 0 when it did not.
    pub fn of(observation: &Observation, origin: Instant) -> Sample {
        let (status, term) = match &observation.reply {
            Reply::Answered {
                leading: true,
                status,
            } => (200, status.term),
            Reply::Answered { leading: false, .. } => (503, 0),
            Reply::NoAnswer { .. } => (0, 0),
        };
        Sample {
            slot: observation.node,
            sent_us: micros_since(origin, observation.sent.into_std()),
            received_us: micros_since(origin, observation.received.into_std()),
            status,
            term,
        }
    }

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

/// Records `/is-leader` of a set of nodes while it runs; see the module doc.
#[derive(Debug)]
pub struct Sampler {
    origin: Instant,
    client: Client,
    running: Option<Recording>,
}

/// The polling tasks and the task collecting their samples.
#[derive(Debug)]
struct Recording {
    probes: Probes,
    collector: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Returns a stopped sampler whose requests time out after `timeout`;
    /// its clock starts now.
    pub fn new(timeout: Duration) -> Sampler {
        Sampler {
            origin: Instant::now(),
            client: Client::new(timeout),
            running: None,
        }
    }

    /// Returns the instant the sampler's timestamps count from.
    pub fn origin(&self) -> Instant {
        self.origin
    }

    /// Returns `at` on the sampler's clock, in microseconds.
    pub fn micros(&self, at: Instant) -> u64 {
        micros_since(self.origin, at)
    }

    /// Starts recording every `(slot, url)` of `targets` each `interval`,
    /// one request in flight per slot; forgets an earlier recording. MUST
    /// run inside a tokio runtime.
    pub fn start(
        &mut self,
        interval: Duration,
        targets: impl IntoIterator<Item = (usize, String)>,
    ) {
        self.abort();
        let (out, mut observed) = mpsc::channel::<Observation>(BUFFERED);
        let origin = self.origin;
        let collector = tokio::spawn(async move {
            let mut samples = Vec::new();
            while let Some(observation) = observed.recv().await {
                samples.push(Sample::of(&observation, origin));
            }
            samples
        });
        let probes = Probes::spawn(self.client.clone(), interval, targets, out);
        self.running = Some(Recording { probes, collector });
    }

    /// Records one more slot, if the sampler runs.
    pub fn watch(&mut self, slot: usize, url: String) {
        if let Some(recording) = &mut self.running {
            recording.probes.add(slot, url);
        }
    }

    /// Stops recording and returns what was recorded since the start (an
    /// empty timeline when it did not run).
    pub async fn stop(&mut self) -> Timeline {
        let Some(Recording { probes, collector }) = self.running.take() else {
            return Timeline::default();
        };
        // Aborted tasks drop their senders; the collector ends with the last.
        drop(probes);
        Timeline::new(collector.await.unwrap_or_default())
    }

    /// Stops recording and drops what was recorded.
    pub fn abort(&mut self) {
        if let Some(recording) = self.running.take() {
            recording.collector.abort();
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

    /// Adds `sample` in send order.
    pub fn insert(&mut self, sample: Sample) {
        let key = (sample.sent_us, sample.slot);
        let at = self.samples.partition_point(|s| (s.sent_us, s.slot) <= key);
        self.samples.insert(at, sample);
    }

    /// Drops every sample sent before `sent_us`.
    pub fn forget_before(&mut self, sent_us: u64) {
        let old = self.samples.partition_point(|s| s.sent_us < sent_us);
        self.samples.drain(..old);
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

    /// Returns how long after `from_us` a node other than `old` answered
    /// the first 200 to a request sent at or after it: a failover's length,
    /// to the arrival of the answer.
    pub fn first_200_elsewhere(&self, from_us: u64, old: usize) -> Option<Duration> {
        let first = self.first_after(from_us, |s| s.is_200() && s.slot != old)?;
        Some(Duration::from_micros(
            first.received_us.saturating_sub(from_us),
        ))
    }

    /// Returns an upper bound of the time nobody led in a handoff by `old`
    /// begun at `from_us`: from sending `old`'s last 200 before it stopped
    /// answering 200 to receiving the first 200 of another node after
    /// `from_us`. Says which answer is missing when one is.
    pub fn handoff_gap(&self, from_us: u64, old: usize) -> Result<Duration, &'static str> {
        let stopped = self
            .first_after(from_us, |s| s.slot == old && !s.is_200())
            .ok_or("the old leader never stopped answering 200")?;
        let last_claim = self
            .last_before(stopped.sent_us, |s| s.slot == old && s.is_200())
            .ok_or("the old leader answered no 200 before it stopped")?;
        let took_over = self
            .first_after(from_us, |s| s.slot != old && s.is_200())
            .ok_or("no other node answered 200")?;
        Ok(Duration::from_micros(
            took_over.received_us.saturating_sub(last_claim.sent_us),
        ))
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
