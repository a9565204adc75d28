//! Quiet reads: at idle, nobody is woken by a heartbeat or its answer.
//!
//! An idle leader sends every follower a heartbeat each round (50 ms) and
//! gets an answer back. Were each frame to wake its receiver as it
//! arrives, a 5-node leader would wake about three times a round and every
//! follower once, each wakeup from another CPU; on loopback and small VMs
//! the *sender* even pays for the receiver's wakeup (the receive path runs
//! in its context). Both directions come in a rhythm, so both sides read
//! them when they are awake anyway:
//!
//! ```text
//!   follower (Rhythm): REGULAR heartbeats evenly spaced ─► quiet: after a read finds the
//!     socket empty, SO_RCVLOWAT = QUIET_MARK (a heartbeat's few hundred bytes wake
//!     nobody); a timerfd at round + spacing + lag + GUARD lowers the mark to 1 byte:
//!     the kernel reports the queued heartbeat at once, it is read and answered.
//!     A poll that finds the socket empty leaves it watched until the next frame.
//!   leader (Switch, set by the node while it holds its lease with nothing in
//!     flight; `runtime::node`, "Quiet rounds"): the mark goes up on every connection
//!     it sends heartbeats on; each heartbeat sent on a connection has its reader lower
//!     it, so a round's answers are read in the next round's wakeup.
//! ```
//!
//! Frames that must not wait carry a nudge ([`Pace::sending`]): every
//! frame that is neither a heartbeat, an answer to one nor a probe (hello
//! and its identity answer, which have 500 ms to arrive), sent on a
//! connection that carried heartbeats either way in the last
//! [`NUDGE_WINDOW`], is followed in the same write by a [`Frame::Nudge`] of
//! [`QUIET_MARK`] bytes of padding: the queued bytes reach the mark and the
//! receiver wakes at once.
//!
//! Invariants:
//! 1. **Only heartbeats, their answers and probes (hello, identity) wait,
//!    and at most one round.**
//!    A follower's mark is up only until the heartbeat is due + [`GUARD`];
//!    a leader's only until its next heartbeat on that connection, at most
//!    one interval (its next deadline is its next round), or until the node
//!    ends quiet. (On a connection a quiet leader stops sending rounds on,
//!    a member just removed, what may wait waits until quiet ends or
//!    [`QUIET_MARK`] bytes have queued: see 4.) Everything else is nudged (the mark is up only on
//!    connections that carried heartbeats within the last two spacings, and
//!    the window is a second).
//! 2. **Nothing is stranded.** A mark goes up only after a read found the
//!    socket empty, only while a follower poll is scheduled (at most two
//!    spacings, each ≤ [`MAX_SPACING`], after the last heartbeat read) or
//!    the node says quiet and this side sent a heartbeat within two
//!    spacings; ending quiet wakes every reader to lower its mark.
//! 3. **Ends are never held.** The kernel wakes readers for a FIN, a reset
//!    or a `TCP_USER_TIMEOUT` whatever the mark: a crash is reported as
//!    promptly as without quiet reads.
//! 4. **Bounded.** [`QUIET_MARK`] bytes queued wake the reader anyway.
//! 5. **The follower's lag only shrinks by evidence.** Its polls use the
//!    smallest `arrival − round` of heartbeats that arrived while *watched*
//!    (one read at a poll arrived earlier than it was read, and would push
//!    the polls later each round); every [`RELEARN_EVERY`] quiet heartbeats
//!    one is read watched to follow clock drift.
//! 6. **The lease does not change.** The core counts a round toward the
//!    lease by when the leader *sent* it (answers echo it), so an answer
//!    read a round late renews the same lease later; the node ends quiet
//!    while its lease can still wait for answers read as they come.
//! 7. **A socket whose mark cannot be raised is never quiet**; one whose
//!    mark cannot be lowered is closed (the peer redials).

use super::wire::Frame;
use crate::raft::{Message, MessageBody};
use crate::timer::DeadlineTimer;
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::bytes::BytesMut;
use tokio_util::codec::{Decoder, LengthDelimitedCodec};
use tracing::debug;

/// Receive low-water mark of a quiet socket, and the nudge's padding.
pub const QUIET_MARK: usize = 4096;
/// How long after the heartbeat is due the reader looks for it.
pub const GUARD: Duration = Duration::from_millis(2);
/// Heartbeats with even spacing before a connection goes quiet.
const REGULAR: usize = 4;
/// Most difference between the spacings that count as even.
const JITTER: Duration = Duration::from_millis(2);
/// Spacings outside this range are no rhythm.
const MIN_SPACING: Duration = Duration::from_millis(5);
const MAX_SPACING: Duration = Duration::from_millis(250);
/// Lag samples kept (heartbeats that arrived while watched).
const LAG_SAMPLES: usize = 8;
/// Quiet heartbeats after which one is read watched again.
const RELEARN_EVERY: u32 = 100;
/// A writer nudges urgent frames this long after a heartbeat either way.
pub const NUDGE_WINDOW: Duration = Duration::from_secs(1);

/// Returns whether `frame` is a heartbeat: AppendEntries without entries.
fn heartbeat_round(frame: &Frame) -> Option<u64> {
    match frame {
        Frame::Raft(Message {
            body: MessageBody::AppendEntries { entries, round, .. },
            ..
        }) if entries.is_empty() => Some(*round),
        _ => None,
    }
}

/// Returns whether `frame` may wait for the receiver's next wakeup: a
/// heartbeat or an answer to one, or a hello or identity (membership
/// probes, once per `--dns-interval`, whose answer may take the request
/// timeout, 500 ms: waiting a round each way costs them nothing, while a
/// nudge costs both sides a 4 KiB frame every probe).
/// A goodbye needs no nudge: the FIN behind it wakes the receiver.
fn may_wait(frame: &Frame) -> bool {
    heartbeat_round(frame).is_some()
        || matches!(frame, Frame::Goodbye | Frame::Hello | Frame::Identity(_))
        || matches!(
            frame,
            Frame::Raft(Message {
                body: MessageBody::AppendEntriesResponse { .. },
                ..
            })
        )
}

/// The node's side of quiet reads: whether answers may wait (set on a
/// leader holding its lease with nothing in flight). Shared by every
/// connection of one transport.
#[derive(Clone, Default)]
pub struct Switch(Arc<AtomicBool>);

impl Switch {
    /// Sets whether answers may wait; returns whether that changed.
    pub fn set(&self, quiet: bool) -> bool {
        self.0.swap(quiet, Ordering::SeqCst) != quiet
    }

    fn is_on(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What one connection's writer and reader share.
pub struct Pace {
    switch: Switch,
    /// Wakes the reader: a heartbeat went out, or quiet ended.
    read_now: Notify,
    stamps: Mutex<Stamps>,
}

/// When this side last sent and received a heartbeat on the connection.
#[derive(Default)]
struct Stamps {
    sent: Option<Instant>,
    received: Option<Instant>,
}

impl Pace {
    /// Creates the pace of a new connection of the transport with `switch`.
    pub fn new(switch: Switch) -> Arc<Pace> {
        Arc::new(Pace {
            switch,
            read_now: Notify::new(),
            stamps: Mutex::new(Stamps::default()),
        })
    }

    fn stamps(&self) -> MutexGuard<'_, Stamps> {
        self.stamps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Called for every frame sent; returns whether a [`nudge`]
    /// must follow it in the same write.
    pub fn sending(&self, frame: &Frame) -> bool {
        let now = Instant::now();
        let mut stamps = self.stamps();
        if heartbeat_round(frame).is_some() {
            stamps.sent = Some(now);
        }
        let recent = |at: Option<Instant>| at.is_some_and(|at| now - at < NUDGE_WINDOW);
        !may_wait(frame) && (recent(stamps.sent) || recent(stamps.received))
    }

    /// Wakes the reader: after a write that held a heartbeat it reads the
    /// answers the last round left waiting; after quiet ended it lowers its
    /// mark.
    pub fn wake_reader(&self) {
        self.read_now.notify_waiters();
    }

    /// Returns whether the leader's side may hold answers on this
    /// connection: the node says quiet and this side sends heartbeats here.
    fn answers_may_wait(&self) -> bool {
        self.switch.is_on()
            && self
                .stamps()
                .sent
                .is_some_and(|at| at.elapsed() < 2 * MAX_SPACING)
    }
}

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 4096;

/// A connection's read side: the socket, the bytes read and not yet
/// decoded, the heartbeat rhythm and the socket's mark. Reads go through
/// the reactor when it reported the socket readable, and straight to the
/// socket (`recv`, non-blocking) at a poll or round, which the reactor
/// does not see while the mark is up.
pub struct QuietReader {
    half: OwnedReadHalf,
    codec: LengthDelimitedCodec,
    buf: BytesMut,
    eof: bool,
    /// The last read took less than it could: the socket held no more
    /// then, so the next one waits first (one `recv` less per wakeup).
    drained: bool,
    rhythm: Rhythm,
    /// Whether the mark is at [`QUIET_MARK`].
    raised: bool,
    /// Set when the mark cannot be raised: this connection stays watched.
    disabled: bool,
    timer: Option<DeadlineTimer>,
}

/// The rhythm of the heartbeats a connection receives.
#[derive(Debug)]
struct Rhythm {
    /// Local clock of the lags, in nanoseconds since this instant.
    epoch: Instant,
    /// Round of the newest heartbeat (the leader's clock, ns).
    last_round: Option<u64>,
    /// Round differences of consecutive heartbeats, newest last.
    spacings: VecDeque<u64>,
    /// `arrival − round` of heartbeats that arrived while watched.
    lags: VecDeque<i128>,
    /// When to look for the next heartbeat; `None` while watched.
    poll_at: Option<Instant>,
    /// The last poll found bytes: the next heartbeat is no lag sample.
    polled: bool,
    /// Heartbeats read at a poll since the last lag sample.
    quiet_reads: u32,
}

impl Default for Rhythm {
    fn default() -> Rhythm {
        Rhythm {
            epoch: Instant::now(),
            last_round: None,
            spacings: VecDeque::with_capacity(REGULAR),
            lags: VecDeque::with_capacity(LAG_SAMPLES),
            poll_at: None,
            polled: false,
            quiet_reads: 0,
        }
    }
}

impl QuietReader {
    /// Reads frames of `codec` from `half`, starting with the bytes in
    /// `read` (what arrived behind the handshake).
    pub fn new(half: OwnedReadHalf, codec: LengthDelimitedCodec, read: &[u8]) -> QuietReader {
        QuietReader {
            half,
            codec,
            buf: BytesMut::from(read),
            eof: false,
            drained: false,
            rhythm: Rhythm::default(),
            raised: false,
            disabled: false,
            timer: None,
        }
    }

    /// Returns the next sealed frame, waiting quietly while a heartbeat or
    /// the next round is expected (see the module docs); `None` at a clean
    /// end of the stream.
    pub async fn next(&mut self, pace: &Pace) -> Option<io::Result<BytesMut>> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => return Some(Ok(frame)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.eof {
                return (!self.buf.is_empty())
                    .then(|| Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            if !self.drained {
                match self.read_now() {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => return Some(Err(e)),
                }
            }
            self.drained = false;
            if let Err(e) = self.wait(pace).await {
                return Some(Err(e));
            }
        }
    }

    /// Reads what the socket holds without waiting; returns whether that
    /// was anything (bytes or the end).
    fn read_now(&mut self) -> io::Result<bool> {
        self.buf.reserve(READ_CHUNK);
        let room = self.buf.capacity() - self.buf.len();
        // Through the reactor first, so a readiness it reported is used up.
        let got = match self.half.try_read_buf(&mut self.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                recv_into(self.half.as_ref().as_raw_fd(), &mut self.buf)
            }
            got => got,
        };
        match got {
            Ok(0) => {
                self.eof = true;
                Ok(true)
            }
            Ok(n) => {
                self.drained = n < room;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Waits until the socket may hold something: readable as the reactor
    /// sees it, the follower's poll time, or this side's next round.
    async fn wait(&mut self, pace: &Pace) -> io::Result<()> {
        let poll_at = self.rhythm.poll_at.filter(|_| !self.disabled);
        let collect = !self.disabled && pace.answers_may_wait();
        if poll_at.is_none() && !collect {
            self.set_mark(false)?;
            return self.half.readable().await;
        }
        if let Err(e) = self.set_mark(true) {
            debug!(error = %e, "cannot raise a peer socket's receive mark; reading it as frames come");
            self.disabled = true;
            return Ok(());
        }
        let timer = self.timer.get_or_insert_with(DeadlineTimer::new);
        let half = &self.half;
        let at = poll_at.unwrap_or_else(|| Instant::now() + MAX_SPACING);
        let woke = tokio::select! {
            // A nudged frame, a full mark or an end.
            ready = half.readable() => return ready,
            _ = timer.sleep_until(at), if poll_at.is_some() => Woke::Poll,
            // A round went out (its answers are read next), or quiet ended.
            _ = pace.read_now.notified() => Woke::Round,
        };
        if let Woke::Poll = woke {
            self.rhythm.poll_at = None;
            self.rhythm.polled = self.read_now()?;
            if !self.rhythm.polled {
                // The heartbeat is late: read it as it comes.
                self.set_mark(false)?;
            }
        }
        Ok(())
    }

    /// Takes note of a frame that was read (see [`Rhythm::observe`]).
    pub fn observe(&mut self, frame: &Frame, pace: &Pace) {
        self.rhythm.observe(frame, pace);
    }

    /// Sets the socket's receive low-water mark to [`QUIET_MARK`] or 1.
    fn set_mark(&mut self, raised: bool) -> io::Result<()> {
        if self.raised == raised {
            return Ok(());
        }
        let mark = if raised { QUIET_MARK } else { 1 } as libc::c_int;
        let socket = self.half.as_ref();
        set_int_option(socket, libc::SOL_SOCKET, libc::SO_RCVLOWAT, mark)?;
        self.raised = raised;
        Ok(())
    }
}

impl Rhythm {
    /// Takes note of a frame that was read; a heartbeat schedules the poll
    /// for the next one when the rhythm is regular.
    pub fn observe(&mut self, frame: &Frame, pace: &Pace) {
        let Some(round) = heartbeat_round(frame) else {
            return;
        };
        pace.stamps().received = Some(Instant::now());
        let arrival = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_nanos() as i128;
        if std::mem::take(&mut self.polled) {
            self.quiet_reads += 1;
        } else {
            if self.lags.len() == LAG_SAMPLES {
                self.lags.pop_front();
            }
            self.lags.push_back(arrival - round as i128);
            self.quiet_reads = 0;
        }
        if let Some(last) = self.last_round {
            if self.spacings.len() == REGULAR {
                self.spacings.pop_front();
            }
            self.spacings.push_back(round.saturating_sub(last));
        }
        self.last_round = Some(round);
        self.poll_at = self.predict(Instant::now());
    }

    /// Returns when to look for the next heartbeat, or `None` to wait for
    /// it watched: no regular rhythm yet, time for a fresh lag sample, or a
    /// prediction that is already past or too far ahead.
    fn predict(&self, now: Instant) -> Option<Instant> {
        if self.spacings.len() < REGULAR || self.quiet_reads >= RELEARN_EVERY {
            return None;
        }
        let lo = *self.spacings.iter().min()?;
        let hi = *self.spacings.iter().max()?;
        let even = hi - lo <= JITTER.as_nanos() as u64;
        let in_range = (MIN_SPACING.as_nanos() as u64..=MAX_SPACING.as_nanos() as u64)
            .contains(&lo)
            && hi <= MAX_SPACING.as_nanos() as u64;
        if !even || !in_range {
            return None;
        }
        let lag = *self.lags.iter().min()?;
        let due = self.last_round? as i128 + hi as i128 + lag;
        let at = self.epoch + Duration::from_nanos(u64::try_from(due).ok()?) + GUARD;
        (at > now && at <= now + 2 * Duration::from_nanos(hi)).then_some(at)
    }

    /// Returns whether a poll is scheduled (for tests).
    #[cfg(test)]
    pub fn is_quiet(&self) -> bool {
        self.poll_at.is_some()
    }
}

/// What ended a quiet wait other than readiness.
enum Woke {
    /// The follower's poll time.
    Poll,
    /// A round went out, or quiet ended.
    Round,
}

/// Sets an integer socket option (for those nix does not have).
pub(super) fn set_int_option(
    socket: &TcpStream,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `socket` is open for the borrow, and the pointer and length
    // describe one live `c_int`.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Receives what the socket holds into the spare capacity of `buf`,
/// without waiting.
fn recv_into(fd: RawFd, buf: &mut BytesMut) -> io::Result<usize> {
    let spare = buf.spare_capacity_mut();
    // SAFETY: `fd` is open for the call; recv writes at most `spare.len()`
    // bytes to the spare capacity the pointer and length describe.
    let n = unsafe {
        libc::recv(
            fd,
            spare.as_mut_ptr().cast(),
            spare.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recv initialized the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n as usize) };
    Ok(n as usize)
}

/// Returns a nudge: a frame of [`QUIET_MARK`] bytes of padding.
pub fn nudge() -> Frame {
    Frame::Nudge(".".repeat(QUIET_MARK))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{NodeId, Term};

    fn heartbeat(round: u64) -> Frame {
        Frame::Raft(Message {
            from: NodeId::new("a", 1),
            to: NodeId::new("b", 1),
            term: Term(1),
            body: MessageBody::AppendEntries {
                prev_log_index: 0,
                prev_log_term: Term(0),
                entries: Vec::new(),
                leader_commit: 0,
                round,
            },
        })
    }

    const MS: u64 = 1_000_000;

    fn pace() -> Arc<Pace> {
        Pace::new(Switch::default())
    }

    fn answer() -> Frame {
        let Frame::Raft(mut msg) = heartbeat(1) else {
            unreachable!()
        };
        msg.body = MessageBody::AppendEntriesResponse {
            success: true,
            last_index: 0,
            round: 1,
        };
        Frame::Raft(msg)
    }

    /// A rhythm that saw `n` heartbeats `spacing_ms` apart, the last one now.
    fn after_heartbeats(n: u64, spacing_ms: u64) -> Rhythm {
        let mut rhythm = Rhythm::default();
        // Rounds on a clock 1 s ahead of the local one, so lags are negative.
        let start = 1_000 * MS;
        for i in 0..n {
            rhythm.observe(&heartbeat(start + i * spacing_ms * MS), &pace());
        }
        rhythm
    }

    #[test]
    fn regular_heartbeats_schedule_a_poll_just_after_the_next_one_is_due() {
        assert!(
            !after_heartbeats(REGULAR as u64, 50).is_quiet(),
            "one spacing short"
        );
        let rhythm = after_heartbeats(REGULAR as u64 + 1, 50);
        let at = rhythm.poll_at.expect("quiet after REGULAR even spacings");
        let ahead = at.saturating_duration_since(Instant::now());
        // The rounds came in faster than their spacing here, so the
        // smallest lag is the first one's; the poll is within a spacing.
        assert!(ahead <= Duration::from_millis(50) + GUARD, "{ahead:?}");
    }

    #[test]
    fn uneven_or_out_of_range_spacing_keeps_a_connection_watched() {
        assert!(
            !after_heartbeats(8, 1).is_quiet(),
            "1 ms is below MIN_SPACING"
        );
        assert!(
            !after_heartbeats(8, 400).is_quiet(),
            "400 ms is above MAX_SPACING"
        );
        let mut rhythm = after_heartbeats(6, 50);
        assert!(rhythm.is_quiet());
        let last = rhythm.last_round.unwrap();
        rhythm.observe(&heartbeat(last + 80 * MS), &pace());
        assert!(!rhythm.is_quiet(), "a late round breaks the rhythm");
    }

    #[test]
    fn frames_other_than_heartbeats_leave_the_rhythm_alone() {
        let mut rhythm = after_heartbeats(6, 50);
        let at = rhythm.poll_at;
        rhythm.observe(&Frame::Hello, &pace());
        rhythm.observe(&urgent(), &pace());
        assert_eq!(rhythm.poll_at, at);
    }

    #[test]
    fn heartbeats_read_at_polls_are_no_lag_samples_and_a_fresh_one_is_taken_in_time() {
        let mut rhythm = after_heartbeats(6, 50);
        let samples = rhythm.lags.len();
        let mut round = rhythm.last_round.unwrap();
        for _ in 0..RELEARN_EVERY {
            rhythm.polled = true;
            round += 50 * MS;
            rhythm.observe(&heartbeat(round), &pace());
        }
        assert_eq!(rhythm.lags.len(), samples, "polled reads add no lag");
        assert!(!rhythm.is_quiet(), "the next heartbeat is read watched");
        round += 50 * MS;
        rhythm.observe(&heartbeat(round), &pace());
        assert_eq!(rhythm.lags.len(), (samples + 1).min(LAG_SAMPLES));
        assert_eq!(rhythm.quiet_reads, 0);
    }

    /// A frame that must not wait: a leadership handoff's TimeoutNow.
    fn urgent() -> Frame {
        let Frame::Raft(mut msg) = heartbeat(1) else {
            unreachable!()
        };
        msg.body = MessageBody::TimeoutNow;
        Frame::Raft(msg)
    }

    #[test]
    fn urgent_frames_are_nudged_only_shortly_after_heartbeats_either_way() {
        let sender = pace();
        assert!(!sender.sending(&urgent()), "no heartbeat yet");
        assert!(!sender.sending(&heartbeat(1)));
        assert!(sender.sending(&urgent()), "after a heartbeat sent");
        assert!(!sender.sending(&answer()), "answers may wait");
        assert!(!sender.sending(&Frame::Goodbye), "the FIN wakes");
        sender.stamps().sent = Some(Instant::now() - NUDGE_WINDOW);
        assert!(!sender.sending(&urgent()), "window over");
        // A follower nudges what it sends to the leader it hears from.
        let follower = pace();
        let mut rhythm = Rhythm::default();
        rhythm.observe(&heartbeat(1), &follower);
        assert!(follower.sending(&urgent()));
        assert!(!follower.sending(&answer()));
    }

    #[test]
    fn probes_wait_for_the_next_round_without_a_nudge() {
        let sender = pace();
        sender.sending(&heartbeat(1));
        assert!(!sender.sending(&Frame::Hello), "a hello waits");
        let info = crate::transport::PeerInfo {
            cluster_id: "prod".into(),
            id: crate::raft::NodeId::new("a", 1),
            address: "10.0.0.1:4041".into(),
            joined: true,
            term: 1,
            leader: None,
            leaving: false,
            bootstrap_lock: None,
        };
        assert!(!sender.sending(&Frame::Identity(info)), "its answer waits");
    }

    #[test]
    fn a_leader_holds_answers_only_while_the_node_says_quiet_and_it_sends_rounds() {
        let switch = Switch::default();
        let leader = Pace::new(switch.clone());
        leader.sending(&heartbeat(1));
        assert!(!leader.answers_may_wait(), "the node has not said quiet");
        assert!(
            switch.set(true) && !switch.set(true),
            "set reports a change once"
        );
        assert!(leader.answers_may_wait());
        let silent = Pace::new(switch.clone());
        assert!(!silent.answers_may_wait(), "no heartbeats sent here");
        leader.stamps().sent = Some(Instant::now() - 2 * MAX_SPACING);
        assert!(!leader.answers_may_wait(), "rounds stopped");
    }

    /// A connected pair: the reader's side and a writer's raw socket.
    async fn pair() -> (QuietReader, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (read_half, _write_half) = accepted.unwrap().0.into_split();
        std::mem::forget(_write_half); // keep the socket open both ways
        let reader = QuietReader::new(read_half, super::super::wire::codec(1 << 20), &[]);
        (reader, dialed.unwrap())
    }

    async fn write(socket: &mut tokio::net::TcpStream, frame: &Frame) {
        use tokio::io::AsyncWriteExt;
        let body = frame.encode().unwrap();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        socket.write_all(&bytes).await.unwrap();
    }

    /// Reads the next frame as the connection's reader does.
    async fn read(reader: &mut QuietReader, pace: &Pace) -> Frame {
        let sealed = tokio::time::timeout(Duration::from_secs(2), reader.next(pace))
            .await
            .expect("a frame within 2 s")
            .expect("not the end")
            .expect("no error");
        let frame = Frame::decode(&sealed).unwrap();
        reader.observe(&frame, pace);
        frame
    }

    /// Runs the reader as a connection does; reports each frame with when
    /// it was read and whether the mark was up before the read.
    fn run(
        mut reader: QuietReader,
        pace: Arc<Pace>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<(Frame, Instant, bool)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let Some(Ok(sealed)) = reader.next(&pace).await else {
                    return;
                };
                let raised = reader.raised;
                let frame = Frame::decode(&sealed).unwrap();
                reader.observe(&frame, &pace);
                if tx.send((frame, Instant::now(), raised)).is_err() {
                    return;
                }
            }
        });
        rx
    }

    async fn got(
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<(Frame, Instant, bool)>,
    ) -> (Frame, Instant, bool) {
        tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a frame within 2 s")
            .expect("the reader runs")
    }

    #[tokio::test]
    async fn a_quiet_follower_reads_each_heartbeat_at_its_poll_and_an_urgent_frame_at_once() {
        let (reader, mut leader) = pair().await;
        let mut frames = run(reader, pace());
        let spacing = Duration::from_millis(20);
        let start = Instant::now();
        let round_of = |at: Instant| at.duration_since(start).as_nanos() as u64 + 1_000 * MS;
        let mut next = start;
        let mut quiet = 0;
        for i in 0..12 {
            tokio::time::sleep_until(next).await;
            write(&mut leader, &heartbeat(round_of(next))).await;
            let (frame, at, raised) = got(&mut frames).await;
            assert_eq!(frame, heartbeat(round_of(next)), "heartbeat {i}");
            assert!(
                at - next < spacing,
                "heartbeat {i} read {:?} after it was sent",
                at - next
            );
            quiet += usize::from(raised);
            next += spacing;
        }
        assert!(quiet >= 6, "in rhythm the mark is up: {quiet} of 12");
        // Halfway to the next heartbeat, an urgent frame and its nudge.
        tokio::time::sleep_until(next - spacing / 2).await;
        let sent = Instant::now();
        write(&mut leader, &urgent()).await;
        write(&mut leader, &nudge()).await;
        let (frame, at, raised) = got(&mut frames).await;
        assert_eq!(frame, urgent());
        assert!(raised, "it was held by the mark");
        assert!(
            at - sent < spacing / 4,
            "read {:?} after it was sent",
            at - sent
        );
    }

    #[tokio::test]
    async fn a_quiet_leader_reads_answers_when_its_next_round_goes_out_or_quiet_ends() {
        let (reader, mut follower) = pair().await;
        let switch = Switch::default();
        let pace = Pace::new(switch.clone());
        pace.sending(&heartbeat(1));
        switch.set(true);
        let mut frames = run(reader, pace.clone());
        tokio::time::sleep(Duration::from_millis(20)).await;
        write(&mut follower, &answer()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            frames.try_recv().is_err(),
            "the answer waits for the next round"
        );
        let round = Instant::now();
        pace.sending(&heartbeat(2));
        pace.wake_reader();
        let (frame, at, raised) = got(&mut frames).await;
        assert!(frame == answer() && raised && at >= round);
        // Quiet ends: a held answer is read at once, later ones as they come.
        write(&mut follower, &answer()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(frames.try_recv().is_err(), "held");
        let ended = Instant::now();
        switch.set(false);
        pace.wake_reader();
        let (_, at, _) = got(&mut frames).await;
        assert!(at >= ended && at - ended < Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = Instant::now();
        write(&mut follower, &answer()).await;
        let (_, at, raised) = got(&mut frames).await;
        assert!(!raised && at - sent < Duration::from_millis(20));
    }

    #[tokio::test]
    async fn an_end_is_seen_at_once_while_quiet() {
        let (mut reader, mut follower) = pair().await;
        let switch = Switch::default();
        let pace = Pace::new(switch.clone());
        pace.sending(&heartbeat(1));
        switch.set(true);
        write(&mut follower, &answer()).await;
        read(&mut reader, &pace).await;
        let closed = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(follower);
        };
        let (end, ()) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(200), reader.next(&pace)),
            closed
        );
        assert!(matches!(end, Ok(None)), "{end:?}");
    }

    #[test]
    fn a_nudge_fills_the_mark() {
        let bytes = nudge().encode().unwrap();
        assert!(bytes.len() >= QUIET_MARK);
        assert!(bytes.len() + 64 <= super::super::wire::MIN_FRAME_BYTES);
    }
}
