//! One peer connection: establishing it (dial or accept, handshake,
//! identities) and running it (a reader task; frames are written by their
//! sender, with a flusher task for what the socket does not take at once).
//!
//! ```text
//!   Link::try_send(frame) ─► outbox: JSON, seal, length (+ a nudge, see `quiet`)
//!                            ─► written at once from the sender's task when nothing
//!                               waits before it; what the socket does not take
//!                               waits (bounded) for the flusher task
//!   socket ─► reader (heartbeats in rhythm read quietly, see `quiet`): open (in order),
//!             decode ─► Raft: checked sender ─► node's inbound queue
//!                                              ─► Hello: our identity back (written at once)
//!                                              ─► Identity: the peer's latest, for hello
//!                                              ─► Goodbye: a deliberate end
//! ```
//!
//! **Writes from the sender's task.** A frame is written by whoever sends
//! it (the node task, or the reader answering a hello), in the same call,
//! whenever the connection has nothing waiting: no task hop, no queue, no
//! copy per frame at idle. The outbox is a `std` mutex held only to encode,
//! seal and write without waiting, so frames keep their order (the Noise
//! nonce counts them) whoever sends them. Only when the socket is full do
//! the rest wait for the flusher task, which writes as the socket drains.
//!
//! Both tasks run on the node's thread, so handing a frame between the
//! reader and the node costs no wakeup of its own.

use super::noise::{self, Opener, Sealer, MAX_HANDSHAKE_MESSAGE};
use super::quiet::{self, set_int_option, Pace, QuietReader, Switch};
use super::wire::{codec, Frame, MAX_IDENTITY_FRAME};
use super::{Inbound, PeerInfo, TransportConfig, TransportError};
use crate::metrics::Metrics;
use crate::raft::{MessageBody, NodeId};
use futures::{SinkExt, StreamExt};
use nix::sys::socket::{setsockopt, shutdown, sockopt, Shutdown};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tracing::debug;

/// Frames waiting for one peer's socket before new ones are dropped.
pub const OUT_QUEUE: usize = 256;
/// An outbox that held more than this once is given back to the allocator
/// when it empties (a large frame's buffer is not kept for heartbeats).
const OUTBOX_KEEP: usize = 64 * 1024;
/// Unacknowledged data older than this closes the connection (the kernel's
/// `TCP_USER_TIMEOUT`): a peer behind a partition is noticed without a
/// timer of ours, and the next send dials afresh instead of waiting for
/// TCP's exponential retransmission back-off.
const USER_TIMEOUT: Duration = Duration::from_millis(1500);
/// Shortest retransmission timeout (`TCP_RTO_MIN_US`, Linux 6.15+; else
/// 200 ms): a lost segment holds back the heartbeats behind it on the one
/// connection until it is resent. Above the delayed-ACK cap below, so late
/// ACKs cause no spurious resends.
const RTO_MIN: Duration = Duration::from_millis(50);
/// Longest delayed ACK (`TCP_DELACK_MAX_US`): keeps RTT samples, and so the
/// retransmission timeout, free of long ACK delays.
const DELACK_MAX: Duration = Duration::from_millis(10);
/// Congestion control of peer connections. A connection carries a few
/// hundred bytes a round, so no algorithm ever limits it, while each one
/// costs CPU per segment: Reno, built into every Linux kernel and open to
/// unprivileged processes, is the simplest. Measured on the test VM, whose
/// default is BBR: an idle 5-node leader 4.64–4.83 millicores with Reno
/// against 4.97–5.31 with BBR (README, "Design in one page", transport).
const CONGESTION_CONTROL: &str = "reno";
/// The two options' numbers in `linux/tcp.h` (not in the libc crate yet).
const TCP_RTO_MIN_US: libc::c_int = 45;
const TCP_DELACK_MAX_US: libc::c_int = 46;

/// A connection whose handshake and identities are done.
pub struct Established {
    /// The peer, as it introduced itself.
    pub peer: PeerInfo,
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    sealer: Sealer,
    opener: Opener,
}

/// Dials `addr` and authenticates both ways; bounded by the request timeout.
pub async fn dial(
    addr: &str,
    cfg: &TransportConfig,
    me: &PeerInfo,
) -> Result<Established, TransportError> {
    let timeout = cfg.request_timeout;
    let attempt = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| TransportError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        tune(&stream);
        let mut framed = Framed::new(stream, codec(MAX_HANDSHAKE_MESSAGE));
        let (mut sealer, mut opener) = noise::initiate(&mut framed, cfg).await?;
        framed.codec_mut().set_max_frame_length(MAX_IDENTITY_FRAME);
        send_sealed(&mut framed, &mut sealer, &Frame::Identity(me.clone())).await?;
        let peer = read_identity(&mut framed, &mut opener, cfg, me).await?;
        framed.codec_mut().set_max_frame_length(cfg.max_frame_bytes);
        Ok(Established {
            peer,
            framed,
            sealer,
            opener,
        })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| TransportError::Timeout {
            addr: addr.to_string(),
            timeout,
        })?
}

/// Runs the listener's side on an accepted stream: handshake, the dialer's
/// identity, then ours. The caller bounds it by the handshake deadline;
/// until it returns, at most a handshake message or an identity frame is
/// buffered.
pub async fn accept(
    stream: TcpStream,
    cfg: &TransportConfig,
    me: &watch::Receiver<PeerInfo>,
) -> Result<Established, TransportError> {
    let mut framed = Framed::with_capacity(stream, codec(MAX_HANDSHAKE_MESSAGE), 256);
    let (mut sealer, mut opener) = noise::respond(&mut framed, cfg).await?;
    framed.codec_mut().set_max_frame_length(MAX_IDENTITY_FRAME);
    let own = me.borrow().clone();
    let peer = read_identity(&mut framed, &mut opener, cfg, &own).await?;
    send_sealed(&mut framed, &mut sealer, &Frame::Identity(own)).await?;
    framed.codec_mut().set_max_frame_length(cfg.max_frame_bytes);
    tune(framed.get_ref());
    Ok(Established {
        peer,
        framed,
        sealer,
        opener,
    })
}

/// Sets TCP_NODELAY (a heartbeat must not wait for Nagle), Reno, the user
/// timeout and the short loss recovery; a failure only costs latency or
/// detection time (older kernels lack the last two), so it is logged.
fn tune(stream: &TcpStream) {
    if let Err(e) = stream.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY on a peer connection");
    }
    let reno = std::ffi::OsString::from(CONGESTION_CONTROL);
    if let Err(e) = setsockopt(stream, sockopt::TcpCongestion, &reno) {
        debug!(error = %e, "cannot set TCP_CONGESTION on a peer connection");
    }
    let ms = USER_TIMEOUT.as_millis() as u32;
    if let Err(e) = setsockopt(stream, sockopt::TcpUserTimeout, &ms) {
        debug!(error = %e, "cannot set TCP_USER_TIMEOUT on a peer connection");
    }
    for (option, name, value) in [
        (TCP_RTO_MIN_US, "TCP_RTO_MIN_US", RTO_MIN),
        (TCP_DELACK_MAX_US, "TCP_DELACK_MAX_US", DELACK_MAX),
    ] {
        let micros = value.as_micros() as libc::c_int;
        if let Err(e) = set_int_option(stream, libc::IPPROTO_TCP, option, micros) {
            debug!(error = %e, "cannot set {name} on a peer connection");
        }
    }
}

async fn send_sealed(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    sealer: &mut Sealer,
    frame: &Frame,
) -> Result<(), TransportError> {
    framed.send(sealer.seal(&frame.encode()?)?).await?;
    Ok(())
}

/// Reads the first sealed frame, which MUST be an acceptable identity.
async fn read_identity(
    framed: &mut Framed<TcpStream, LengthDelimitedCodec>,
    opener: &mut Opener,
    cfg: &TransportConfig,
    me: &PeerInfo,
) -> Result<PeerInfo, TransportError> {
    let sealed = framed.next().await.ok_or(TransportError::Closed)??;
    match Frame::decode(&opener.open(&sealed)?)? {
        Frame::Identity(peer) if peer.cluster_id != cfg.cluster_id => {
            Err(TransportError::Identity(format!(
                "peer is in cluster {:?}, not ours",
                peer.cluster_id
            )))
        }
        Frame::Identity(peer) if peer.id == me.id => Err(TransportError::Identity(
            "the peer is this node itself".into(),
        )),
        Frame::Identity(peer) => Ok(peer),
        other => Err(TransportError::Identity(format!(
            "the first frame must be an identity, not {other:?}"
        ))),
    }
}

/// The handle of a running connection; see [`Link::start`].
#[derive(Clone)]
pub struct Link {
    /// The authenticated peer.
    pub peer: NodeId,
    /// Distinguishes connections to the same peer.
    pub serial: u64,
    /// Whether this node dialed it.
    pub dialed: bool,
    out: Arc<Writer>,
    /// The peer's latest identity (from its first frame, then hello answers).
    pub identity: watch::Receiver<PeerInfo>,
    closing: Arc<AtomicBool>,
    /// Shared by the write side and the reader (see [`super::quiet`]).
    pace: Arc<Pace>,
}

/// A frame could not be queued: the peer's queue is full or its writer gone.
#[derive(Debug)]
pub struct QueueFull;

/// How a connection ended, as the reader saw it.
#[derive(Debug)]
pub enum End {
    /// Either side said goodbye first: a deliberate close.
    Deliberate,
    /// Anything else: EOF, a socket error, or a frame that did not open
    /// or decode (the connection is closed at once).
    Lost(TransportError),
}

/// What the reader needs besides the socket.
pub struct ReaderContext {
    /// Where Raft messages go.
    pub inbound: mpsc::Sender<Inbound>,
    /// Our identity, for hello answers.
    pub me: watch::Receiver<PeerInfo>,
    /// For refused frames.
    pub metrics: Metrics,
    /// The transport's quiet switch (see [`super::quiet`]).
    pub quiet: Switch,
}

impl Link {
    /// Starts the reader and the flusher of `est`; `on_end` runs once the reader
    /// stops, with how it ended.
    pub fn start(
        est: Established,
        serial: u64,
        dialed: bool,
        ctx: ReaderContext,
        on_end: impl FnOnce(&Link, End) + Send + 'static,
    ) -> Link {
        let Established {
            peer,
            framed,
            sealer,
            opener,
        } = est;
        let parts = framed.into_parts();
        let (read_half, write_half) = parts.io.into_split();
        let max_frame = parts.codec.max_frame_length();
        // Bytes the peer sent right behind its identity are not lost.
        let reader = QuietReader::new(read_half, parts.codec, &parts.read_buf);
        let (identity_tx, identity) = watch::channel(peer.clone());
        let pace = Pace::new(ctx.quiet.clone());
        let flush = Arc::new(Notify::new());
        let out = Arc::new(Writer {
            half: write_half,
            outbox: Mutex::new(Outbox {
                sealer,
                pending: Vec::new(),
                written: 0,
                frames: 0,
                plain: Vec::new(),
                state: OutState::Open,
                max_frame,
            }),
            flush: flush.clone(),
            pace: pace.clone(),
        });
        tokio::spawn(flush_loop(Arc::downgrade(&out), flush));
        let link = Link {
            peer: peer.id,
            serial,
            dialed,
            out,
            identity,
            closing: Arc::new(AtomicBool::new(false)),
            pace,
        };
        let reading = link.clone();
        tokio::spawn(async move {
            let end = read_loop(reader, opener, &reading, identity_tx, ctx).await;
            let end = match end {
                End::Lost(_) if reading.closing.load(Ordering::Relaxed) => End::Deliberate,
                end => end,
            };
            on_end(&reading, end);
        });
        link
    }

    /// Sends `frame`: written at once when nothing waits before it, else
    /// queued for the flusher. Fails (dropping it) when [`OUT_QUEUE`]
    /// frames wait or the connection is closing or broken.
    pub fn try_send(&self, frame: Frame) -> Result<(), QueueFull> {
        self.out.send(frame)
    }

    /// Closes on purpose: what is queued goes first, then a goodbye. The
    /// peer's end of the connection is then not reported as lost.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Relaxed);
        self.out.close();
    }

    /// Returns whether the connection is still writable.
    pub fn is_open(&self) -> bool {
        self.out.outbox().state == OutState::Open
    }

    /// Returns whether bytes wait for the socket (for tests).
    #[cfg(test)]
    pub fn waiting(&self) -> bool {
        let outbox = self.out.outbox();
        outbox.written < outbox.pending.len()
    }

    /// Has the reader lower its receive mark (quiet ended).
    pub fn wake_reader(&self) {
        self.pace.wake_reader();
    }
}

/// The write side of a connection, shared by its [`Link`]s (whoever sends)
/// and the flusher task.
struct Writer {
    half: OwnedWriteHalf,
    outbox: Mutex<Outbox>,
    /// Wakes the flusher: bytes wait for the socket, or the write side ends.
    flush: Arc<Notify>,
    pace: Arc<Pace>,
}

/// Sealed frames not yet taken by the socket, and the sealer (frames are
/// sealed in the order they are written).
struct Outbox {
    sealer: Sealer,
    /// Length-prefixed sealed frames; `written` bytes of it are sent.
    pending: Vec<u8>,
    written: usize,
    /// Frames appended since `pending` was last empty.
    frames: usize,
    /// Scratch space for a frame's JSON.
    plain: Vec<u8>,
    state: OutState,
    /// Largest sealed frame.
    max_frame: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OutState {
    Open,
    /// A goodbye is the last frame; the write side shuts once it is out.
    Closing,
    /// A write or a frame failed; the write side shuts at once.
    Failed,
}

impl Writer {
    fn outbox(&self) -> MutexGuard<'_, Outbox> {
        self.outbox
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn send(&self, frame: Frame) -> Result<(), QueueFull> {
        let mut outbox = self.outbox();
        if outbox.state != OutState::Open || outbox.frames >= OUT_QUEUE {
            return Err(QueueFull);
        }
        let nudge = self.pace.sending(&frame);
        let round =
            matches!(&frame, Frame::Raft(m) if matches!(m.body, MessageBody::AppendEntries { .. }));
        let appended = outbox.append(&frame).and_then(|()| {
            // The nudge goes out in the same write as the frame it wakes for.
            match nudge {
                true => outbox.append(&quiet::nudge()),
                false => Ok(()),
            }
        });
        if let Err(e) = appended {
            debug!(error = %e, "cannot send a frame; closing");
            self.fail(&mut outbox);
            return Err(QueueFull);
        }
        self.write(&mut outbox);
        drop(outbox);
        if round {
            // A round went out: the answers the last one left are read now.
            self.pace.wake_reader();
        }
        Ok(())
    }

    fn close(&self) {
        let mut outbox = self.outbox();
        if outbox.state != OutState::Open {
            return;
        }
        // The goodbye MUST be the last frame: past the queue bound, never dropped.
        match outbox.append(&Frame::Goodbye) {
            Ok(()) => outbox.state = OutState::Closing,
            Err(e) => {
                debug!(error = %e, "cannot send a goodbye; closing");
                return self.fail(&mut outbox);
            }
        }
        self.write(&mut outbox);
        self.flush.notify_one();
    }

    /// Writes what waits, without waiting; what the socket does not take
    /// is left to the flusher.
    fn write(&self, outbox: &mut Outbox) {
        if outbox.state == OutState::Failed {
            return;
        }
        match outbox.write_to(self.half.as_ref()) {
            Ok(true) => {}
            Ok(false) => self.flush.notify_one(),
            Err(e) => {
                debug!(error = %e, "cannot write to a peer; closing");
                self.fail(outbox);
            }
        }
    }

    fn fail(&self, outbox: &mut Outbox) {
        outbox.state = OutState::Failed;
        outbox.pending = Vec::new();
        outbox.written = 0;
        self.flush.notify_one();
    }

    /// Sends the FIN (after the last frame).
    fn shut(&self) {
        if let Err(e) = shutdown(self.half.as_ref().as_raw_fd(), Shutdown::Write) {
            debug!(error = %e, "cannot shut a peer connection's write side");
        }
    }
}

impl Drop for Writer {
    /// Lets the flusher end with the connection.
    fn drop(&mut self) {
        self.flush.notify_one();
    }
}

impl Outbox {
    /// Encodes, seals and appends `frame` with its length prefix.
    fn append(&mut self, frame: &Frame) -> Result<(), TransportError> {
        self.plain.clear();
        frame.encode_into(&mut self.plain)?;
        let sealed = Sealer::sealed_len(self.plain.len());
        if sealed > self.max_frame {
            return Err(TransportError::Io(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "a frame of {sealed} bytes is over the limit of {}",
                    self.max_frame
                ),
            )));
        }
        let start = self.pending.len();
        self.pending
            .extend_from_slice(&(sealed as u32).to_be_bytes());
        if let Err(e) = self.sealer.seal_into(&self.plain, &mut self.pending) {
            self.pending.truncate(start);
            return Err(e.into());
        }
        self.frames += 1;
        Ok(())
    }

    /// Writes what waits without waiting; returns whether all of it went.
    fn write_to(&mut self, socket: &TcpStream) -> io::Result<bool> {
        while self.written < self.pending.len() {
            match socket.try_write(&self.pending[self.written..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.written = 0;
        self.frames = 0;
        if self.pending.capacity() > OUTBOX_KEEP {
            self.pending = Vec::new();
        } else {
            self.pending.clear();
        }
        if self.plain.capacity() > OUTBOX_KEEP {
            self.plain = Vec::new();
        }
        Ok(true)
    }
}

/// Writes what the socket did not take at once, as it drains; shuts the
/// write side after a goodbye or a failure. Ends with the connection.
async fn flush_loop(writer: Weak<Writer>, flush: Arc<Notify>) {
    loop {
        flush.notified().await;
        loop {
            let Some(writer) = writer.upgrade() else {
                return; // every link is gone: dropping the half sent the FIN
            };
            let state = {
                let mut outbox = writer.outbox();
                writer.write(&mut outbox);
                let waiting = outbox.written < outbox.pending.len();
                (outbox.state, waiting)
            };
            match state {
                (OutState::Failed, _) | (OutState::Closing, false) => return writer.shut(),
                (_, false) => break,
                (_, true) => {
                    if writer.half.as_ref().writable().await.is_err() {
                        writer.fail(&mut writer.outbox());
                        return writer.shut();
                    }
                }
            }
        }
    }
}

async fn read_loop(
    mut frames: QuietReader,
    mut opener: Opener,
    link: &Link,
    identity: watch::Sender<PeerInfo>,
    ctx: ReaderContext,
) -> End {
    // One buffer for every frame's plaintext (a large frame's is not kept).
    let mut plain = Vec::new();
    loop {
        if plain.capacity() > OUTBOX_KEEP {
            plain = Vec::new();
        }
        let sealed = match frames.next(&link.pace).await {
            Some(Ok(sealed)) => sealed,
            Some(Err(e)) => {
                let e = TransportError::from(e);
                if e.metric_label() == "frame_too_large" {
                    refuse(&ctx.metrics, "frame_too_large");
                }
                return End::Lost(e);
            }
            None => return End::Lost(TransportError::Closed),
        };
        // A frame that does not open (changed, replayed, reordered, of
        // another connection) or decode closes the connection.
        let frame = match opener.open_into(&sealed, &mut plain) {
            Ok(()) => match Frame::decode(&plain) {
                Ok(frame) => frame,
                Err(e) => {
                    refuse(&ctx.metrics, "malformed_frame");
                    return End::Lost(e.into());
                }
            },
            Err(e) => {
                refuse(&ctx.metrics, "bad_frame");
                return End::Lost(e.into());
            }
        };
        frames.observe(&frame, &link.pace);
        match frame {
            Frame::Raft(msg) if msg.from != link.peer => {
                // Authenticated but inconsistent: refused, the connection kept.
                refuse(&ctx.metrics, "wrong_sender");
                debug!(peer = %link.peer, from = %msg.from, "refused a message sent in another's name");
            }
            Frame::Raft(msg) => {
                if ctx.inbound.send(Inbound::Message(msg)).await.is_err() {
                    return End::Deliberate; // the node is gone
                }
            }
            Frame::Hello => {
                let me = ctx.me.borrow().clone();
                let _ = link.try_send(Frame::Identity(me));
            }
            Frame::Identity(info) if info.id == link.peer => {
                identity.send_replace(info);
            }
            Frame::Identity(info) => {
                refuse(&ctx.metrics, "wrong_sender");
                debug!(peer = %link.peer, claimed = %info.id, "refused a changed identity");
            }
            Frame::Goodbye => return End::Deliberate,
            Frame::Nudge(_) => {}
        }
    }
}

fn refuse(metrics: &Metrics, reason: &str) {
    metrics.rejected_messages.with_label_values(&[reason]).inc();
}
