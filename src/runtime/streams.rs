//! Streams that leaders opened to this node, read when the node task wakes.
//!
//! Were the reactor to wake this node for every heartbeat frame, each
//! heartbeat would cost the leader a cross-CPU wakeup of this process: on a
//! small VM about a fifth of an idle leader's CPU. So once heartbeats arrive
//! in rhythm, a stream is *unwatched* and the node wakes on its own timer
//! just after the next heartbeat is due, reads it, and answers at once; the
//! leader reads the answer at its next round. The rhythm comes from the
//! frames themselves: each AppendEntries carries its send time (`round`, on
//! the leader's clock), and the smallest lag seen while watching maps it to
//! this node's clock.
//!
//! ```text
//!   watched ──(REGULAR_BEFORE_UNWATCH heartbeats)──► unwatched: poll at round + interval + lag + GUARD
//!      ▲                                                  │
//!      └──────── nothing there when polled, or every RELEARN_EVERY rounds
//! ```
//!
//! A late heartbeat is therefore never missed: the stream is watched again
//! and the frame wakes the node as it arrives. Refused frames close the
//! stream and are counted like refused requests.

use crate::metrics::Metrics;
use crate::raft::{Message, MessageBody};
use crate::transport::auth::{RateLimitedWarn, WARN_INTERVAL};
use crate::transport::{AcceptedStream, StreamClosed};
use std::collections::VecDeque;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// Most streams kept; a new one beyond it closes the oldest.
const MAX_STREAMS: usize = 8;
/// Watched lag samples kept per stream.
const LAG_SAMPLES: usize = 16;
/// Heartbeats received while watched before a stream is unwatched.
const REGULAR_BEFORE_UNWATCH: usize = 4;
/// How long after a heartbeat's expected arrival the node looks for it.
const GUARD: Duration = Duration::from_millis(3);
/// A stream without a frame for this long is closed (a leader that
/// vanished without closing its connection).
const SILENT_STREAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Unwatched rounds after which one is watched again to refresh the lag.
const RELEARN_EVERY: u32 = 200;

/// One accepted stream and what is known of its rhythm.
struct Tracked {
    id: u64,
    stream: AcceptedStream,
    /// Lags (local receive time − round, in ns) seen while watched.
    lags: VecDeque<i128>,
    /// Round of the newest AppendEntries.
    last_round: Option<u64>,
    /// While unwatched: when to look for the next heartbeat.
    poll_at: Option<Instant>,
    /// Unwatched rounds since the lag was last refreshed.
    unwatched_rounds: u32,
    /// When the last frame arrived (or the stream was taken in).
    last_frame: Instant,
}

/// The accepted streams of one node; see the module docs.
pub struct InboundStreams {
    streams: Vec<Tracked>,
    next_id: u64,
    epoch: Instant,
    interval: Duration,
    limit: usize,
    metrics: Metrics,
    warn: RateLimitedWarn,
}

impl InboundStreams {
    /// Creates an empty set for heartbeats every `interval`, frames of at
    /// most `limit` bytes.
    pub fn new(interval: Duration, limit: usize, metrics: Metrics) -> InboundStreams {
        InboundStreams {
            streams: Vec::new(),
            next_id: 0,
            epoch: Instant::now(),
            interval,
            limit,
            metrics,
            warn: RateLimitedWarn::default(),
        }
    }

    /// Returns how many streams are open.
    pub fn len(&self) -> usize {
        self.streams.len()
    }

    /// Returns whether no stream is open.
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Returns how many streams are unwatched (read on a timer).
    pub fn unwatched(&self) -> usize {
        self.streams
            .iter()
            .filter(|t| !t.stream.is_watched())
            .count()
    }

    /// Takes a new stream in, watched until its rhythm is known.
    pub fn add(&mut self, mut stream: AcceptedStream) {
        if let Err(err) = stream.set_watched(true) {
            tracing::warn!(%err, peer = ?stream.peer(), "cannot watch a peer stream; closing it");
            return;
        }
        if self.streams.len() >= MAX_STREAMS {
            self.streams.remove(0);
        }
        self.next_id += 1;
        self.streams.push(Tracked {
            id: self.next_id,
            stream,
            lags: VecDeque::with_capacity(LAG_SAMPLES),
            last_round: None,
            poll_at: None,
            unwatched_rounds: 0,
            last_frame: Instant::now(),
        });
    }

    /// Returns when the node must wake to look for a heartbeat.
    pub fn next_poll(&self) -> Option<Instant> {
        self.streams.iter().filter_map(|t| t.poll_at).min()
    }

    /// Resolves when data arrives on a watched stream.
    pub async fn arrival(&self) {
        std::future::poll_fn(|cx| {
            for t in &self.streams {
                if t.stream.poll_arrival(cx).is_ready() {
                    return Poll::Ready(());
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Reads every stream without blocking; returns the messages that
    /// arrived, by stream. Each MUST be answered with [`InboundStreams::answer`],
    /// in order. Closes (and counts) streams that ended or sent a bad frame.
    pub fn receive(&mut self) -> Vec<(u64, Vec<Message>)> {
        let now = Instant::now();
        let local = now.saturating_duration_since(self.epoch).as_nanos() as i128;
        let mut out = Vec::new();
        let mut closed = Vec::new();
        for t in &mut self.streams {
            let messages = match t.stream.receive(self.limit) {
                Ok(messages) => messages,
                Err(reason) => {
                    closed.push((t.id, t.stream.peer(), reason));
                    continue;
                }
            };
            // The newest frame's round, not the largest ever seen: one wild
            // round must not throw the rhythm off for good.
            let newest_round = messages.iter().rev().find_map(|m| match m.body {
                MessageBody::AppendEntries { round, .. } => Some(round),
                _ => None,
            });
            if messages.is_empty() {
                if now.saturating_duration_since(t.last_frame) > SILENT_STREAM_TIMEOUT {
                    let silent = std::io::Error::other("no frame for a minute");
                    closed.push((t.id, t.stream.peer(), StreamClosed::Ended(silent)));
                    continue;
                }
            } else {
                t.last_frame = now;
            }
            let watched = t.stream.is_watched();
            if let Some(round) = newest_round {
                if watched {
                    if t.lags.len() == LAG_SAMPLES {
                        t.lags.pop_front();
                    }
                    t.lags.push_back(local - round as i128);
                } else {
                    t.unwatched_rounds += 1;
                }
                t.last_round = Some(round);
            }
            let rhythm_known = t.lags.len() >= REGULAR_BEFORE_UNWATCH;
            let missed =
                !watched && newest_round.is_none() && t.poll_at.is_some_and(|at| now >= at);
            let relearn = t.unwatched_rounds >= RELEARN_EVERY;
            let want_watched = missed || relearn || !rhythm_known;
            if want_watched {
                t.poll_at = None;
                if relearn && newest_round.is_some() {
                    t.unwatched_rounds = 0;
                }
            } else if newest_round.is_some() || t.poll_at.is_none() {
                t.poll_at =
                    expected(self.epoch, self.interval, t.last_round, &t.lags).map(|at| at + GUARD);
            }
            // A prediction already in the past, or further ahead than two
            // rounds (a wild round), is no prediction: watch.
            let horizon = now + 2 * self.interval;
            let want_watched = want_watched || t.poll_at.is_none_or(|at| at <= now || at > horizon);
            if want_watched {
                t.poll_at = None;
            }
            if let Err(err) = t.stream.set_watched(want_watched) {
                closed.push((t.id, t.stream.peer(), StreamClosed::Ended(err)));
                continue;
            }
            if !messages.is_empty() {
                out.push((t.id, messages));
            }
        }
        for (id, peer, reason) in closed {
            self.close(id, peer, reason);
        }
        out
    }

    /// Answers the oldest unanswered message of stream `id`.
    pub fn answer(&mut self, id: u64, replies: &[Message]) {
        let Some(t) = self.streams.iter_mut().find(|t| t.id == id) else {
            return; // closed meanwhile
        };
        if let Err(err) = t.stream.answer(replies) {
            let peer = t.stream.peer();
            self.close(id, peer, StreamClosed::Ended(err));
        }
    }

    fn close(&mut self, id: u64, peer: Option<std::net::SocketAddr>, reason: StreamClosed) {
        self.streams.retain(|t| t.id != id);
        match reason {
            StreamClosed::Ended(err) => tracing::debug!(%err, ?peer, "peer stream closed"),
            StreamClosed::Refused(rejection) => {
                let reason = rejection.reason();
                self.metrics
                    .rejected_messages
                    .with_label_values(&[reason])
                    .inc();
                if let Some(suppressed) = self.warn.permit(reason, std::time::Instant::now()) {
                    tracing::warn!(
                        reason,
                        ?peer,
                        suppressed,
                        "refused a peer stream frame and closed the stream ({suppressed} more like it suppressed in the last {}s)",
                        WARN_INTERVAL.as_secs()
                    );
                }
            }
        }
    }
}

/// Returns when the next heartbeat should arrive, on the clock that
/// started at `epoch`: the newest round, one interval on, plus the smallest
/// lag seen.
fn expected(
    epoch: Instant,
    interval: Duration,
    last_round: Option<u64>,
    lags: &VecDeque<i128>,
) -> Option<Instant> {
    let lag = *lags.iter().min()?;
    let at = last_round? as i128 + interval.as_nanos() as i128 + lag;
    let at = u64::try_from(at).ok()?;
    Some(epoch + Duration::from_nanos(at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::{config, heartbeat, identity, response_to};
    use crate::transport::{router_with_streams, serve, PeerClient};
    use std::sync::Arc;
    use tokio::sync::{mpsc, watch};

    /// Sends heartbeat `round` on the client's stream, reads it on the
    /// follower side the way the node does, answers it and returns what
    /// the leader got back.
    async fn round_trip(
        client: &PeerClient,
        addr: &str,
        streams: &mut InboundStreams,
        round: u64,
    ) -> Vec<Message> {
        client.send_streamed(addr, heartbeat(round));
        if streams.unwatched() == 0 {
            tokio::time::timeout(Duration::from_secs(2), streams.arrival())
                .await
                .expect("a watched stream wakes the node");
        } else {
            let poll = streams
                .next_poll()
                .expect("an unwatched stream has a poll time");
            tokio::time::sleep_until(poll).await;
        }
        let got = streams.receive();
        assert_eq!(got.len(), 1, "round {round}: one stream delivered");
        let (id, messages) = &got[0];
        assert_eq!(messages, &vec![heartbeat(round)], "round {round}");
        streams.answer(*id, &[response_to(&heartbeat(round))]);
        for _ in 0..2000 {
            let answers = client.take_streamed_replies();
            if !answers.is_empty() {
                return answers;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Vec::new()
    }

    #[tokio::test]
    async fn heartbeats_in_rhythm_are_read_on_a_timer_and_a_late_one_rewatches() {
        let interval = Duration::from_millis(50);
        let cfg = Arc::new(config(1));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let (inbound_tx, _inbound) = mpsc::channel(64);
        let (accepted_tx, mut accepted) = mpsc::channel(4);
        let (_identity, identity_rx) =
            watch::channel(identity("test", listener.local_addr().expect("addr")));
        let router = router_with_streams(
            cfg.clone(),
            Metrics::new(),
            inbound_tx,
            identity_rx,
            Some(accepted_tx),
        );
        tokio::spawn(serve(listener, router, std::future::pending()));
        let (replies_tx, _replies) = mpsc::channel(64);
        let client = PeerClient::new(cfg, Metrics::new(), replies_tx).expect("client");

        // The first message is posted and opens the stream, which the server
        // hands over instead of reading it itself.
        client.send_streamed(&addr, heartbeat(0));
        let stream = tokio::time::timeout(Duration::from_secs(2), accepted.recv())
            .await
            .ok()
            .flatten()
            .expect("the upgraded stream is handed over");
        let mut streams = InboundStreams::new(interval, 1 << 20, Metrics::new());
        streams.add(stream);
        assert_eq!((streams.len(), streams.unwatched()), (1, 0));
        for _ in 0..2000 {
            if client.open_streams() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(client.open_streams(), 1, "the leader's lane is open");

        // Rounds every 50 ms, `round` on a clock of the leader's own.
        let leader_epoch = Instant::now();
        for k in 1..=8u32 {
            let round = leader_epoch.elapsed().as_nanos() as u64 + 1;
            let answers = round_trip(&client, &addr, &mut streams, round).await;
            assert_eq!(answers, vec![response_to(&heartbeat(round))], "round {k}");
            tokio::time::sleep_until(leader_epoch + interval * k).await;
        }
        assert_eq!(streams.unwatched(), 1, "in rhythm: read on a timer");
        let poll = streams.next_poll().expect("a poll time");
        let ahead = poll.saturating_duration_since(Instant::now());
        assert!(
            ahead <= interval + GUARD,
            "polls within a round, not {ahead:?}"
        );

        // The leader skips a round: nothing is there at the poll time, so the
        // stream is watched again and the late heartbeat wakes the node.
        tokio::time::sleep_until(poll).await;
        assert!(streams.receive().is_empty());
        assert_eq!(streams.unwatched(), 0, "a missed heartbeat rewatches");
        let round = leader_epoch.elapsed().as_nanos() as u64;
        let answers = round_trip(&client, &addr, &mut streams, round).await;
        assert_eq!(answers, vec![response_to(&heartbeat(round))]);
    }

    #[test]
    fn the_next_heartbeat_is_expected_one_interval_on_with_the_smallest_lag() {
        let epoch = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let lags = VecDeque::from([ms(7).as_nanos() as i128, ms(5).as_nanos() as i128]);
        // Round at 100 ms of the leader's clock; seen 5 ms later at best.
        let at = expected(epoch, ms(50), Some(ms(100).as_nanos() as u64), &lags);
        assert_eq!(at, Some(epoch + ms(155)));
        // A leader clock far ahead of ours: a negative lag is fine.
        let lags = VecDeque::from([-(ms(1000).as_nanos() as i128)]);
        let at = expected(epoch, ms(50), Some(ms(1100).as_nanos() as u64), &lags);
        assert_eq!(at, Some(epoch + ms(150)));
        // Before our epoch, or nothing known yet: no prediction.
        assert_eq!(expected(epoch, ms(50), Some(0), &lags), None);
        assert_eq!(expected(epoch, ms(50), None, &lags), None);
        assert_eq!(expected(epoch, ms(50), Some(1), &VecDeque::new()), None);
    }
}
