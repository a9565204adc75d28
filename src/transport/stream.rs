//! Peer streams: the leader's heartbeat path.
//!
//! A heartbeat round is one message per follower every 50 ms. Posted as its
//! own HTTP request, each costs a leader more CPU in connection tasks,
//! timers and header handling than the whole idle budget allows, and every
//! answer wakes the leader once more. So while a leader holds its lease it
//! sends AppendEntries over one upgraded connection per follower and reads
//! the answers only when it next wakes anyway (before its next round):
//!
//! ```text
//!   leader (client)                         follower (server)
//!   GET /raft/v1/stream  ──────────────────►  auth headers checked as for a POST
//!   Upgrade: raft-elector-stream/1
//!                        ◄──────────────────  101 Switching Protocols (signed)
//!   frame: one Raft message ──────────────►  handed to the runtime
//!                        ◄──────────────────  frame: the runtime's replies (JSON list)
//! ```
//!
//! Every frame is `u32 big-endian payload length | 32-byte HMAC-SHA256 |
//! payload`. The MAC covers the protocol, the cluster id, the upgrade
//! request's nonce (fresh, checked against the replay cache), the direction
//! and the frame's sequence number in that direction, then the payload: a
//! frame cannot be replayed, reordered, moved to another stream or sent
//! back. The server answers each client frame with exactly one frame, so the
//! client always knows how many answers are still on their way.
//!
//! The client side ([`Lanes`]) uses plain non-blocking sockets that are not
//! registered with the reactor: an answer arriving wakes nobody. A lane that
//! still owes an answer when the next message is due takes no more: the
//! message goes the ordinary POST way instead, so a stalled TCP connection
//! (a lost segment waits ≥ 200 ms for retransmission) never holds up a
//! heartbeat.

use super::auth::{self, HmacSha256};
use super::client::verify_answer;
use super::server::{valid_node_name, Rejection};
use super::{TransportConfig, TransportError};
use crate::raft;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use hmac::Mac;
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Path a peer stream is opened at.
pub const STREAM_PATH: &str = "/raft/v1/stream";
/// Signing scope of the upgrade request.
pub(crate) const STREAM_SCOPE: &str = "GET /raft/v1/stream";
/// Value of the `Upgrade` header on both sides.
pub const STREAM_PROTOCOL: &str = "raft-elector-stream/1";
/// Bytes of a frame before its payload: length and MAC.
pub const FRAME_HEADER_BYTES: usize = 4 + MAC_BYTES;
const MAC_BYTES: usize = 32;
/// Bytes asked of a socket per read.
const READ_CHUNK: usize = 4096;
/// Longest upgrade answer head accepted, in bytes.
const MAX_HANDSHAKE_BYTES: usize = 8 * 1024;
/// A lane nobody sent on for this long is closed.
pub const LANE_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a lane fails, the next attempt waits this long.
pub const LANE_RETRY_BACKOFF: Duration = Duration::from_secs(1);
/// After a peer answers that it has no stream endpoint (an older version
/// during a rolling update), the next attempt waits this long.
pub const NO_STREAMS_BACKOFF: Duration = Duration::from_secs(60);
/// Most unsent bytes a lane keeps when the socket is full; more closes it.
const MAX_PENDING_WRITE_BYTES: usize = 256 * 1024;
/// The server closes a stream that sent nothing for this long.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Who writes a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// The client (the leader): one Raft message per frame.
    ToServer,
    /// The server (the follower): the list of replies to one client frame.
    ToClient,
}

/// The MAC keys of one stream: the shared secret with the stream's context
/// (cluster, upgrade nonce, direction) already absorbed, so a frame costs
/// one clone and its own bytes.
#[derive(Clone)]
pub(crate) struct FrameKeys {
    to_server: HmacSha256,
    to_client: HmacSha256,
}

impl FrameKeys {
    /// Derives the keys of the stream opened by the request signed with `nonce`.
    pub(crate) fn new(cfg: &TransportConfig, nonce: &str) -> FrameKeys {
        let keyed = |direction: &[u8]| {
            let mut mac = <HmacSha256 as Mac>::new_from_slice(&cfg.secret)
                .expect("invariant: HMAC accepts keys of any length");
            mac.update(STREAM_PROTOCOL.as_bytes());
            mac.update(b"\n");
            mac.update(cfg.cluster_id.as_bytes());
            mac.update(b"\n");
            mac.update(nonce.as_bytes());
            mac.update(b"\n");
            mac.update(direction);
            mac.update(b"\n");
            mac
        };
        FrameKeys {
            to_server: keyed(b"to-server"),
            to_client: keyed(b"to-client"),
        }
    }

    fn mac(&self, direction: Direction, seq: u64, payload: &[u8]) -> HmacSha256 {
        let mut mac = match direction {
            Direction::ToServer => self.to_server.clone(),
            Direction::ToClient => self.to_client.clone(),
        };
        mac.update(&seq.to_be_bytes());
        mac.update(payload);
        mac
    }

    /// Appends the frame `seq` of `direction` carrying `payload` to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>, direction: Direction, seq: u64, payload: &[u8]) {
        let len =
            u32::try_from(payload.len()).expect("invariant: payloads are capped far below 4 GiB");
        out.reserve(FRAME_HEADER_BYTES + payload.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&self.mac(direction, seq, payload).finalize().into_bytes());
        out.extend_from_slice(payload);
    }
}

/// Why a stream was closed on reading a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    /// The declared payload is longer than the body limit.
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// The MAC does not match: another secret, a tampered, replayed,
    /// reordered or foreign frame.
    #[error("frame MAC does not match")]
    BadMac,
}

/// Bytes read from a stream and not yet taken as frames.
#[derive(Debug, Default)]
pub(crate) struct FrameBuffer {
    data: Vec<u8>,
    start: usize,
}

impl FrameBuffer {
    /// Returns a buffer that already holds `bytes`.
    pub(crate) fn with(bytes: Vec<u8>) -> FrameBuffer {
        FrameBuffer {
            data: bytes,
            start: 0,
        }
    }

    /// Returns the spare room to read into, at least `min` bytes, after
    /// moving unread bytes to the front.
    fn spare(&mut self, min: usize) -> &mut Vec<u8> {
        if self.start > 0 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.reserve(min);
        &mut self.data
    }

    /// Reads what the non-blocking `src` holds, a chunk at a time, until it
    /// runs dry or `cap` unread bytes wait here (a sender cannot make this
    /// buffer grow past one frame and a chunk). An orderly close is
    /// `UnexpectedEof`.
    pub(crate) fn fill_from(&mut self, mut src: impl Read, cap: usize) -> std::io::Result<()> {
        while self.data.len() - self.start < cap {
            let room = self.spare(READ_CHUNK);
            let filled = room.len();
            room.resize(filled + READ_CHUNK, 0);
            let result = src.read(&mut room[filled..]);
            let n = *result.as_ref().unwrap_or(&0);
            room.truncate(filled + n);
            match result {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                // A short read took all there was; nobody waits on these
                // sockets' readiness, so there is no need to see EAGAIN.
                Ok(n) if n < READ_CHUNK => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Takes the next complete frame (`seq` of `direction`, at most `limit`
    /// payload bytes) and returns its payload, or `None` until more bytes
    /// arrive. A bad frame is an error: the stream must be closed.
    pub(crate) fn next_frame(
        &mut self,
        keys: &FrameKeys,
        direction: Direction,
        seq: u64,
        limit: usize,
    ) -> Result<Option<&[u8]>, FrameError> {
        let unread = &self.data[self.start..];
        if unread.len() < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let len = u32::from_be_bytes([unread[0], unread[1], unread[2], unread[3]]) as usize;
        if len > limit {
            return Err(FrameError::TooLarge(len));
        }
        if unread.len() < FRAME_HEADER_BYTES + len {
            return Ok(None);
        }
        let (mac, payload) = unread[4..FRAME_HEADER_BYTES + len].split_at(MAC_BYTES);
        keys.mac(direction, seq, payload)
            .verify_slice(mac)
            .map_err(|_| FrameError::BadMac)?;
        let begin = self.start + FRAME_HEADER_BYTES;
        self.start = begin + len;
        Ok(Some(&self.data[begin..begin + len]))
    }
}

// ----- server side -------------------------------------------------------------

/// Reads bytes from `io` into `buf`; returns how many (0 at end of stream).
pub(crate) async fn read_more<R: tokio::io::AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut FrameBuffer,
) -> std::io::Result<usize> {
    io.read_buf(buf.spare(4096)).await
}

/// Writes one frame to `io`.
pub(crate) async fn write_frame<W: tokio::io::AsyncWrite + Unpin>(
    io: &mut W,
    keys: &FrameKeys,
    direction: Direction,
    seq: u64,
    payload: &[u8],
    scratch: &mut Vec<u8>,
) -> std::io::Result<()> {
    scratch.clear();
    keys.encode(scratch, direction, seq, payload);
    io.write_all(scratch).await
}

/// A stream a peer (a leader) opened to this node, taken out of the HTTP
/// server as its plain socket so that the runtime reads it when it chooses:
/// unwatched, a frame arriving wakes nobody (see `runtime::streams`).
/// Every frame read MUST be answered, in order, with [`AcceptedStream::answer`].
pub struct AcceptedStream {
    socket: Socket,
    keys: FrameKeys,
    read: FrameBuffer,
    received: u64,
    sent: u64,
    unanswered: usize,
    unsent: Vec<u8>,
    /// Reused for encoding answers.
    scratch: Vec<u8>,
    peer: Option<SocketAddr>,
}

/// The socket of an accepted stream, watched by the reactor or not.
enum Socket {
    Unwatched(std::net::TcpStream),
    Watched(AsyncFd<std::net::TcpStream>),
    /// Only while switching.
    Gone,
}

impl Socket {
    fn tcp(&self) -> Option<&std::net::TcpStream> {
        match self {
            Socket::Unwatched(tcp) => Some(tcp),
            Socket::Watched(fd) => Some(fd.get_ref()),
            Socket::Gone => None,
        }
    }
}

/// Writes what the non-blocking `tcp` takes of `unsent` and keeps the rest;
/// fails when the peer lets more than [`MAX_PENDING_WRITE_BYTES`] pile up.
fn write_unsent(mut tcp: &std::net::TcpStream, unsent: &mut Vec<u8>) -> std::io::Result<()> {
    while !unsent.is_empty() {
        match tcp.write(unsent) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                unsent.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if unsent.len() > MAX_PENDING_WRITE_BYTES {
        return Err(std::io::Error::other("peer is not reading its stream"));
    }
    Ok(())
}

/// Why an accepted stream was closed while reading.
#[derive(Debug)]
pub enum StreamClosed {
    /// The peer closed it, or the socket failed.
    Ended(std::io::Error),
    /// A frame was refused; count it under this reason.
    Refused(Rejection),
}

impl AcceptedStream {
    /// Takes the TCP socket out of an upgraded connection; gives the
    /// connection back when it is not a plain TCP one.
    pub(crate) fn take(
        upgraded: hyper::upgrade::Upgraded,
        keys: FrameKeys,
        peer: Option<SocketAddr>,
    ) -> Result<Option<AcceptedStream>, hyper::upgrade::Upgraded> {
        let parts = upgraded.downcast::<TokioIo<tokio::net::TcpStream>>()?;
        let tcp = match parts.io.into_inner().into_std() {
            Ok(tcp) => tcp,
            Err(err) => {
                tracing::debug!(%err, ?peer, "cannot take over a peer stream's socket");
                return Ok(None);
            }
        };
        Ok(Some(AcceptedStream {
            socket: Socket::Unwatched(tcp),
            keys,
            read: FrameBuffer::with(parts.read_buf.to_vec()),
            received: 0,
            sent: 0,
            unanswered: 0,
            unsent: Vec::new(),
            scratch: Vec::new(),
            peer,
        }))
    }

    /// Returns the peer's address, when known.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// Returns whether the reactor wakes the runtime when data arrives.
    pub fn is_watched(&self) -> bool {
        matches!(self.socket, Socket::Watched(_))
    }

    /// Has the reactor wake the runtime when data arrives (`true`) or not.
    pub fn set_watched(&mut self, watched: bool) -> std::io::Result<()> {
        if watched == self.is_watched() {
            return Ok(());
        }
        self.socket = match std::mem::replace(&mut self.socket, Socket::Gone) {
            Socket::Unwatched(tcp) => {
                // SAFETY: the AsyncFd owns the socket until `into_inner`, and
                // a TcpStream's raw fd never changes.
                let fd = unsafe { AsyncFd::register_with_interest(tcp, Interest::READABLE) };
                Socket::Watched(fd.map_err(std::io::Error::from)?)
            }
            Socket::Watched(fd) => Socket::Unwatched(fd.into_inner()),
            Socket::Gone => Socket::Gone,
        };
        Ok(())
    }

    /// Ready when the reactor saw data arrive on a watched stream (the
    /// readiness is consumed: read with [`AcceptedStream::receive`] next).
    /// Pending forever when unwatched.
    pub fn poll_arrival(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let Socket::Watched(fd) = &self.socket else {
            return std::task::Poll::Pending;
        };
        match fd.poll_read_ready(cx) {
            std::task::Poll::Ready(Ok(mut guard)) => {
                guard.clear_ready();
                std::task::Poll::Ready(())
            }
            // A reactor error: report it as an arrival, the read fails.
            std::task::Poll::Ready(Err(_)) => std::task::Poll::Ready(()),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }

    /// Reads what arrived, without blocking; returns the messages of the
    /// complete frames. Any error closes the stream.
    pub fn receive(&mut self, limit: usize) -> Result<Vec<raft::Message>, StreamClosed> {
        let ended = |e: std::io::Error| StreamClosed::Ended(e);
        // An answer the socket did not take in full goes out first.
        self.flush().map_err(ended)?;
        let Some(tcp) = self.socket.tcp() else {
            return Err(ended(ErrorKind::NotConnected.into()));
        };
        self.read
            .fill_from(tcp, FRAME_HEADER_BYTES + limit)
            .map_err(ended)?;
        let mut messages = Vec::new();
        loop {
            let payload =
                match self
                    .read
                    .next_frame(&self.keys, Direction::ToServer, self.received, limit)
                {
                    Ok(Some(payload)) => payload,
                    Ok(None) => return Ok(messages),
                    Err(FrameError::TooLarge(_)) => {
                        return Err(StreamClosed::Refused(Rejection::BodyTooLarge))
                    }
                    Err(FrameError::BadMac) => {
                        return Err(StreamClosed::Refused(Rejection::BadSignature))
                    }
                };
            let msg: raft::Message = serde_json::from_slice(payload)
                .map_err(|_| StreamClosed::Refused(Rejection::MalformedMessage))?;
            if !valid_node_name(&msg.from.name) || !valid_node_name(&msg.to.name) {
                return Err(StreamClosed::Refused(Rejection::BadNodeName));
            }
            self.received += 1;
            self.unanswered += 1;
            messages.push(msg);
        }
    }

    /// Answers the oldest unanswered frame with `replies`, without blocking.
    pub fn answer(&mut self, replies: &[raft::Message]) -> std::io::Result<()> {
        if self.unanswered == 0 {
            return Err(std::io::Error::other("no frame to answer"));
        }
        self.scratch.clear();
        serde_json::to_writer(&mut self.scratch, replies).map_err(std::io::Error::other)?;
        self.keys.encode(
            &mut self.unsent,
            Direction::ToClient,
            self.sent,
            &self.scratch,
        );
        self.sent += 1;
        self.unanswered -= 1;
        self.flush()
    }

    /// Writes what the socket takes of the unsent answers; never blocks.
    fn flush(&mut self) -> std::io::Result<()> {
        let Some(tcp) = self.socket.tcp() else {
            return Err(ErrorKind::NotConnected.into());
        };
        write_unsent(tcp, &mut self.unsent)
    }
}

// ----- client side ---------------------------------------------------------------

/// An open stream to one peer, owned by the node task through [`Lanes`].
pub(crate) struct Connected {
    tcp: std::net::TcpStream,
    keys: FrameKeys,
    sent: u64,
    received: u64,
    read: FrameBuffer,
    /// Bytes the socket did not take yet.
    unsent: Vec<u8>,
    /// When each unanswered frame was sent, oldest first.
    outstanding: VecDeque<Instant>,
    last_used: Instant,
}

/// Opens a stream to `addr`: connects, sends the signed upgrade request and
/// checks the signed 101 answer, all within the request timeout.
pub(crate) async fn open(
    cfg: Arc<TransportConfig>,
    addr: String,
) -> Result<Connected, TransportError> {
    let timeout = cfg.request_timeout;
    match tokio::time::timeout(timeout, handshake(&cfg, &addr)).await {
        Ok(result) => result,
        Err(_) => Err(TransportError::Timeout { addr, timeout }),
    }
}

async fn handshake(cfg: &TransportConfig, addr: &str) -> Result<Connected, TransportError> {
    let connect_failed = |e: std::io::Error| TransportError::Connect {
        addr: addr.to_string(),
        source: Box::new(e),
    };
    let request_failed = |e: std::io::Error| TransportError::Request {
        addr: addr.to_string(),
        source: Box::new(e),
    };
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(connect_failed)?;
    tcp.set_nodelay(true).map_err(connect_failed)?;
    let signed = auth::sign(cfg, STREAM_SCOPE, b"");
    let mut request = format!(
        "GET {STREAM_PATH} HTTP/1.1\r\nhost: {addr}\r\nconnection: upgrade\r\nupgrade: {STREAM_PROTOCOL}\r\n"
    );
    for (name, value) in signed.to_pairs() {
        request.push_str(&name);
        request.push_str(": ");
        request.push_str(&value);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes())
        .await
        .map_err(request_failed)?;

    let bad = |reason: String| TransportError::BadResponse {
        addr: addr.to_string(),
        reason,
    };
    let mut head = Vec::with_capacity(1024);
    let (status, headers, head_len) = loop {
        let n = tcp.read_buf(&mut head).await.map_err(request_failed)?;
        let mut parsed = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut parsed);
        match answer.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                let status = answer.code.unwrap_or(0);
                let mut headers = HeaderMap::with_capacity(answer.headers.len());
                for h in answer.headers.iter() {
                    if let (Ok(name), Ok(value)) = (
                        HeaderName::from_bytes(h.name.as_bytes()),
                        HeaderValue::from_bytes(h.value),
                    ) {
                        headers.append(name, value);
                    }
                }
                break (status, headers, len);
            }
            Ok(httparse::Status::Partial) if n > 0 && head.len() <= MAX_HANDSHAKE_BYTES => {}
            Ok(httparse::Status::Partial) if n == 0 => {
                return Err(bad("closed during the stream upgrade".to_string()))
            }
            Ok(httparse::Status::Partial) => {
                return Err(bad(format!(
                    "upgrade answer head is over {MAX_HANDSHAKE_BYTES} bytes"
                )))
            }
            Err(e) => return Err(bad(format!("upgrade answer is not HTTP: {e}"))),
        }
    };
    if status != 101 {
        let reason: String = String::from_utf8_lossy(&head[head_len..])
            .chars()
            .filter(|c| !c.is_control())
            .take(128)
            .collect();
        return Err(TransportError::Rejected {
            addr: addr.to_string(),
            status,
            reason,
        });
    }
    let upgraded_to = headers
        .get(axum::http::header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgraded_to != Some(STREAM_PROTOCOL) {
        return Err(bad(format!(
            "upgraded to {upgraded_to:?}, not {STREAM_PROTOCOL}"
        )));
    }
    verify_answer(cfg, addr, &signed, &headers, b"")?;
    let leftover = head.split_off(head_len);
    let tcp = tcp.into_std().map_err(request_failed)?;
    // into_std keeps O_NONBLOCK; say so anyway, reads must never block.
    tcp.set_nonblocking(true).map_err(request_failed)?;
    Ok(Connected {
        tcp,
        keys: FrameKeys::new(cfg, &signed.nonce),
        sent: 0,
        received: 0,
        read: FrameBuffer::with(leftover),
        unsent: Vec::new(),
        outstanding: VecDeque::new(),
        last_used: Instant::now(),
    })
}

impl Connected {
    /// Writes what the socket takes of the unsent bytes; never blocks.
    fn flush(&mut self) -> std::io::Result<()> {
        write_unsent(&self.tcp, &mut self.unsent)
    }

    /// Frames `payload` and writes it without blocking.
    fn send(&mut self, payload: &[u8], now: Instant) -> std::io::Result<()> {
        self.keys
            .encode(&mut self.unsent, Direction::ToServer, self.sent, payload);
        self.sent += 1;
        self.outstanding.push_back(now);
        self.last_used = now;
        self.flush()
    }

    /// Reads every answer that arrived, without blocking, and appends the
    /// Raft messages in them to `out`.
    fn receive(
        &mut self,
        addr: &str,
        limit: usize,
        out: &mut Vec<raft::Message>,
    ) -> Result<(), TransportError> {
        let failed = |e: std::io::Error| TransportError::Request {
            addr: addr.to_string(),
            source: Box::new(e),
        };
        self.flush().map_err(failed)?;
        self.read
            .fill_from(&self.tcp, FRAME_HEADER_BYTES + limit)
            .map_err(|e| match e.kind() {
                ErrorKind::UnexpectedEof => {
                    failed(std::io::Error::new(e.kind(), "peer closed the stream"))
                }
                _ => failed(e),
            })?;
        let bad = |reason: String| TransportError::BadResponse {
            addr: addr.to_string(),
            reason,
        };
        while let Some(payload) = self
            .read
            .next_frame(&self.keys, Direction::ToClient, self.received, limit)
            .map_err(|e| match e {
                FrameError::BadMac => TransportError::BadSignature {
                    addr: addr.to_string(),
                },
                FrameError::TooLarge(_) => bad(e.to_string()),
            })?
        {
            let replies: Vec<raft::Message> = serde_json::from_slice(payload)
                .map_err(|e| bad(format!("frame is not a list of Raft messages: {e}")))?;
            if replies
                .iter()
                .any(|m| !valid_node_name(&m.from.name) || !valid_node_name(&m.to.name))
            {
                return Err(bad("a reply names an invalid node".to_string()));
            }
            if self.outstanding.pop_front().is_none() {
                return Err(bad("an answer to a frame that was never sent".to_string()));
            }
            self.received += 1;
            out.extend(replies);
        }
        Ok(())
    }
}

/// Returns how long to wait before opening a stream again after `err`.
fn retry_after(err: &TransportError) -> Duration {
    match err {
        TransportError::Rejected {
            status: 404 | 405, ..
        } => NO_STREAMS_BACKOFF,
        _ => LANE_RETRY_BACKOFF,
    }
}

/// Moves a finished upgrade into place: the lane opens, or goes down and
/// returns why.
fn settle(lane: &mut Lane, now: Instant) -> Option<TransportError> {
    let Lane::Opening(rx) = lane else {
        return None;
    };
    match rx.try_recv() {
        Ok(Ok(conn)) => {
            *lane = Lane::Open(Box::new(conn));
            None
        }
        Ok(Err(e)) => {
            *lane = Lane::Down(now + retry_after(&e));
            Some(e)
        }
        Err(oneshot::error::TryRecvError::Empty) => None,
        Err(oneshot::error::TryRecvError::Closed) => {
            *lane = Lane::Down(now + LANE_RETRY_BACKOFF);
            None
        }
    }
}

/// One peer's stream, as the client sees it.
enum Lane {
    /// The upgrade is under way in a task of its own.
    Opening(oneshot::Receiver<Result<Connected, TransportError>>),
    Open(Box<Connected>),
    /// Failed; not tried again before the instant.
    Down(Instant),
}

/// Why [`Lanes::send`] did not take a message; the caller posts it instead.
#[derive(Debug)]
pub(crate) enum NotTaken {
    /// No open stream (yet): opening, backing off, or just failed.
    NoStream,
    /// The stream still owes an answer to an earlier frame.
    Busy,
}

/// The client's streams, keyed by peer address. Only the node task uses
/// them (through the `PeerClient`), so nothing here waits or wakes anyone.
pub(crate) struct Lanes {
    cfg: Arc<TransportConfig>,
    lanes: HashMap<String, Lane>,
    /// Failed upgrades noticed outside `receive`, reported by it.
    failures: Vec<TransportError>,
}

impl Lanes {
    pub(crate) fn new(cfg: Arc<TransportConfig>) -> Lanes {
        Lanes {
            cfg,
            lanes: HashMap::new(),
            failures: Vec::new(),
        }
    }

    /// Returns how many streams are open (after taking in finished upgrades).
    pub(crate) fn open_count(&mut self) -> usize {
        let now = Instant::now();
        for lane in self.lanes.values_mut() {
            self.failures.extend(settle(lane, now));
        }
        self.lanes
            .values()
            .filter(|lane| matches!(lane, Lane::Open(_)))
            .count()
    }

    /// Writes `payload` (one encoded Raft message) on the stream to `addr`
    /// if it is open and owes no answer. Otherwise starts opening it when
    /// needed and returns why not; a write failure closes the stream and is
    /// returned as the error to count.
    pub(crate) fn send(
        &mut self,
        addr: &str,
        payload: &[u8],
        runtime: &tokio::runtime::Handle,
    ) -> Result<Result<(), NotTaken>, TransportError> {
        let now = Instant::now();
        if let Some(failure) = self.settle(addr, now) {
            self.failures.push(failure);
        }
        let lane = self
            .lanes
            .entry(addr.to_string())
            .or_insert_with(|| Lane::Down(now));
        match lane {
            Lane::Open(conn) if conn.outstanding.is_empty() && conn.unsent.is_empty() => {
                match conn.send(payload, now) {
                    Ok(()) => Ok(Ok(())),
                    Err(e) => {
                        *lane = Lane::Down(now + LANE_RETRY_BACKOFF);
                        Err(TransportError::Request {
                            addr: addr.to_string(),
                            source: Box::new(e),
                        })
                    }
                }
            }
            Lane::Open(conn) => {
                if conn
                    .outstanding
                    .front()
                    .is_some_and(|sent| now.duration_since(*sent) > self.cfg.request_timeout)
                {
                    *lane = Lane::Down(now + LANE_RETRY_BACKOFF);
                    return Err(TransportError::Timeout {
                        addr: addr.to_string(),
                        timeout: self.cfg.request_timeout,
                    });
                }
                Ok(Err(NotTaken::Busy))
            }
            Lane::Opening(_) => Ok(Err(NotTaken::NoStream)),
            Lane::Down(retry_at) if now >= *retry_at => {
                let (done, rx) = oneshot::channel();
                let (cfg, addr) = (self.cfg.clone(), addr.to_string());
                runtime.spawn(async move {
                    let _ = done.send(open(cfg, addr).await);
                });
                *lane = Lane::Opening(rx);
                Ok(Err(NotTaken::NoStream))
            }
            Lane::Down(_) => Ok(Err(NotTaken::NoStream)),
        }
    }

    /// Moves a finished upgrade of `addr` into place.
    fn settle(&mut self, addr: &str, now: Instant) -> Option<TransportError> {
        settle(self.lanes.get_mut(addr)?, now)
    }

    /// Reads every answer that arrived on any stream, without blocking;
    /// returns the Raft messages and the failures to count (each closes its
    /// stream). Closes streams idle for [`LANE_IDLE_TIMEOUT`].
    pub(crate) fn receive(&mut self) -> (Vec<raft::Message>, Vec<TransportError>) {
        let now = Instant::now();
        let mut messages = Vec::new();
        let mut errors = std::mem::take(&mut self.failures);
        let limit = self.cfg.max_body_bytes;
        self.lanes.retain(|addr, lane| match lane {
            Lane::Opening(_) => {
                errors.extend(settle(lane, now));
                true
            }
            Lane::Open(conn) => {
                if let Err(e) = conn.receive(addr, limit, &mut messages) {
                    errors.push(e);
                    *lane = Lane::Down(now + LANE_RETRY_BACKOFF);
                    return true;
                }
                now.duration_since(conn.last_used) < LANE_IDLE_TIMEOUT
            }
            Lane::Down(retry_at) => now < *retry_at + LANE_IDLE_TIMEOUT,
        });
        (messages, errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::transport::testing::{config, eventually, heartbeat, response_to, start_peer};
    use crate::transport::{Inbound, PeerClient};
    use tokio::sync::mpsc;

    fn client(cfg: &Arc<TransportConfig>) -> (PeerClient, Metrics, mpsc::Receiver<Inbound>) {
        let metrics = Metrics::new();
        let (replies_tx, replies) = mpsc::channel(64);
        let client =
            PeerClient::new(cfg.clone(), metrics.clone(), replies_tx).expect("valid client");
        (client, metrics, replies)
    }

    /// Polls `take_streamed_replies` for up to 2 s until something arrives.
    async fn streamed(client: &PeerClient) -> Vec<raft::Message> {
        for _ in 0..2000 {
            let got = client.take_streamed_replies();
            if !got.is_empty() {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Vec::new()
    }

    #[tokio::test]
    async fn streamed_messages_arrive_and_their_answers_wait_to_be_taken() {
        let mut peer = start_peer(config(1), 64).await;
        let mut seen = peer.answer_heartbeats();
        let (client, metrics, mut replies) = client(&peer.cfg);
        let addr = peer.addr.to_string();
        // No stream yet: the message is posted, and the stream starts opening.
        client.send_streamed(&addr, heartbeat(0));
        assert_eq!(seen.recv().await, Some(heartbeat(0)));
        let posted = tokio::time::timeout(Duration::from_secs(2), replies.recv()).await;
        assert_eq!(
            posted.ok().flatten().map(|r| r.msg),
            Some(response_to(&heartbeat(0)))
        );
        assert!(eventually(Duration::from_secs(2), || client.open_streams() == 1).await);
        // Let the background upgrade land in the lane.
        client.take_streamed_replies();
        for round in 1..4 {
            client.send_streamed(&addr, heartbeat(round));
            assert_eq!(seen.recv().await, Some(heartbeat(round)));
            assert_eq!(
                streamed(&client).await,
                vec![response_to(&heartbeat(round))]
            );
        }
        assert!(
            replies.try_recv().is_err(),
            "streamed answers are not posted back"
        );
        for reason in ["bad_signature", "bad_response", "request", "timeout"] {
            assert_eq!(
                metrics.peer_rpc_errors.with_label_values(&[reason]).get(),
                0
            );
        }
    }

    #[tokio::test]
    async fn a_lane_that_owes_an_answer_posts_the_next_message() {
        let mut peer = start_peer(config(1), 64).await;
        let mut seen = peer.answer_heartbeats();
        let (client, _, mut replies) = client(&peer.cfg);
        let addr = peer.addr.to_string();
        client.send_streamed(&addr, heartbeat(0));
        assert!(eventually(Duration::from_secs(2), || client.open_streams() == 1).await);
        client.take_streamed_replies();
        while replies.try_recv().is_ok() {}
        client.send_streamed(&addr, heartbeat(1)); // on the stream, answer not taken
        client.send_streamed(&addr, heartbeat(2)); // the lane is busy: posted
        let got = [seen.recv().await, seen.recv().await, seen.recv().await];
        assert!(got.contains(&Some(heartbeat(1))) && got.contains(&Some(heartbeat(2))));
        let posted = tokio::time::timeout(Duration::from_secs(2), replies.recv()).await;
        assert_eq!(
            posted.ok().flatten().map(|r| r.msg),
            Some(response_to(&heartbeat(2)))
        );
        assert_eq!(streamed(&client).await, vec![response_to(&heartbeat(1))]);
    }

    #[tokio::test]
    async fn an_upgrade_signed_with_another_secret_is_refused_and_counted() {
        let peer = start_peer(config(1), 64).await;
        let err = open(Arc::new(config(2)), peer.addr.to_string())
            .await
            .err()
            .expect("refused");
        assert!(
            matches!(err, TransportError::Rejected { status: 401, .. }),
            "{err}"
        );
        assert_eq!(peer.rejected("bad_signature"), 1);
    }

    #[tokio::test]
    async fn a_stream_request_without_the_upgrade_header_is_refused() {
        let peer = start_peer(config(1), 64).await;
        let mut req = reqwest::Client::new().get(peer.url(STREAM_PATH));
        for (k, v) in auth::sign_headers(&peer.cfg, STREAM_SCOPE, b"") {
            req = req.header(k, v);
        }
        let status = req.send().await.expect("answered").status().as_u16();
        assert_eq!(status, 400);
        assert_eq!(peer.rejected("bad_upgrade"), 1);
    }

    // Blocking reads below: the server needs threads of its own.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bad_frame_closes_the_stream_and_reaches_nobody() {
        type Forge = fn(&FrameKeys) -> Vec<u8>;
        let cases: [(&str, Forge); 4] = [
            ("bad_signature", |_| {
                FrameKeys::new(&config(1), "another stream's nonce").encoded(0, b"{}")
            }),
            ("bad_signature", |keys| {
                let mut wire = keys.encoded(0, &serde_json::to_vec(&heartbeat(1)).expect("json"));
                *wire.last_mut().expect("payload") ^= 1;
                wire
            }),
            ("malformed_message", |keys| keys.encoded(0, b"not json")),
            ("body_too_large", |_| {
                let mut wire = (u32::MAX).to_be_bytes().to_vec();
                wire.extend_from_slice(&[0u8; MAC_BYTES]);
                wire
            }),
        ];
        for (reason, frame) in cases {
            let mut peer = start_peer(config(1), 64).await;
            let mut conn = open(peer.cfg.clone(), peer.addr.to_string())
                .await
                .expect("stream opens");
            conn.tcp.set_nonblocking(false).expect("blocking");
            conn.tcp.write_all(&frame(&conn.keys)).expect("written");
            conn.tcp
                .set_read_timeout(Some(Duration::from_secs(2)))
                .expect("timeout set");
            let mut buf = [0u8; 64];
            let read = conn.tcp.read(&mut buf);
            assert!(
                matches!(read, Ok(0)),
                "{reason}: the server closes the stream, read {read:?}"
            );
            assert_eq!(peer.rejected(reason), 1, "{reason}");
            assert!(peer.try_next().is_none(), "{reason}: nothing forwarded");
        }
    }

    #[tokio::test]
    async fn a_valid_frame_on_a_raw_stream_is_answered_with_one_frame() {
        let mut peer = start_peer(config(1), 64).await;
        let mut seen = peer.answer_heartbeats();
        let mut conn = open(peer.cfg.clone(), peer.addr.to_string())
            .await
            .expect("stream opens");
        let payload = serde_json::to_vec(&heartbeat(5)).expect("json");
        conn.send(&payload, Instant::now()).expect("sent");
        assert_eq!(seen.recv().await, Some(heartbeat(5)));
        let mut out = Vec::new();
        for _ in 0..2000 {
            conn.receive("peer", 1 << 20, &mut out)
                .expect("valid answer");
            if !out.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(out, vec![response_to(&heartbeat(5))]);
        assert!(conn.outstanding.is_empty());
    }

    impl FrameKeys {
        /// Returns client frame `seq` carrying `payload`.
        fn encoded(&self, seq: u64, payload: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            self.encode(&mut out, Direction::ToServer, seq, payload);
            out
        }
    }

    fn frames(keys: &FrameKeys, direction: Direction, payloads: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for (seq, payload) in payloads.iter().enumerate() {
            keys.encode(&mut out, direction, seq as u64, payload);
        }
        out
    }

    #[test]
    fn frames_round_trip_in_order_and_split_anywhere() {
        let keys = FrameKeys::new(&config(1), "nonce-1");
        let wire = frames(&keys, Direction::ToServer, &[b"one", b"", b"three"]);
        // Feed the bytes one at a time: frames appear only when complete.
        let mut buf = FrameBuffer::default();
        let mut got = Vec::new();
        for byte in wire {
            buf.spare(1).push(byte);
            while let Some(p) = buf
                .next_frame(&keys, Direction::ToServer, got.len() as u64, 1024)
                .expect("valid frames")
            {
                got.push(p.to_vec());
            }
        }
        assert_eq!(got, vec![b"one".to_vec(), Vec::new(), b"three".to_vec()]);
    }

    #[test]
    fn tampered_reordered_replayed_reflected_or_foreign_frames_are_refused() {
        let cfg = config(1);
        let keys = FrameKeys::new(&cfg, "nonce-1");
        let check = |wire: Vec<u8>, keys: &FrameKeys, direction, seq| {
            FrameBuffer::with(wire)
                .next_frame(keys, direction, seq, 1024)
                .map(|p| p.map(<[u8]>::to_vec))
        };
        let good = frames(&keys, Direction::ToServer, &[b"hello"]);
        assert_eq!(
            check(good.clone(), &keys, Direction::ToServer, 0),
            Ok(Some(b"hello".to_vec()))
        );
        let mut tampered = good.clone();
        *tampered.last_mut().expect("payload") ^= 1;
        assert_eq!(
            check(tampered, &keys, Direction::ToServer, 0),
            Err(FrameError::BadMac)
        );
        // The same frame again (seq 1 expected) is a replay.
        assert_eq!(
            check(good.clone(), &keys, Direction::ToServer, 1),
            Err(FrameError::BadMac)
        );
        // Sent back to its writer.
        assert_eq!(
            check(good.clone(), &keys, Direction::ToClient, 0),
            Err(FrameError::BadMac)
        );
        // Moved to another stream, or signed with another secret.
        let other_stream = FrameKeys::new(&cfg, "nonce-2");
        assert_eq!(
            check(good.clone(), &other_stream, Direction::ToServer, 0),
            Err(FrameError::BadMac)
        );
        let other_secret = FrameKeys::new(&config(2), "nonce-1");
        assert_eq!(
            check(good, &other_secret, Direction::ToServer, 0),
            Err(FrameError::BadMac)
        );
    }

    #[test]
    fn oversized_frame_is_refused_before_its_payload_arrives() {
        let keys = FrameKeys::new(&config(1), "n");
        let mut wire = frames(&keys, Direction::ToServer, &[&[7u8; 2000]]);
        wire.truncate(FRAME_HEADER_BYTES);
        assert_eq!(
            FrameBuffer::with(wire)
                .next_frame(&keys, Direction::ToServer, 0, 1000)
                .map(|p| p.map(<[u8]>::to_vec)),
            Err(FrameError::TooLarge(2000))
        );
    }
}
