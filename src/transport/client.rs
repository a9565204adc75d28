//! The peer client: one bounded queue and one sender task per peer address.
//!
//! [`PeerClient::send`] never waits: it puts the message on the peer's queue
//! (dropping it when the queue is full, which Raft tolerates) and the
//! peer's task posts queued messages one at a time, as soon as they arrive,
//! over a keep-alive connection. A task ends when every clone of the client
//! is dropped or its peer has been idle for [`PEER_IDLE_TIMEOUT`].
//!
//! The peer answers each message with the messages its runtime sends back
//! (signed for that request); the task checks the signature and hands them
//! to the `replies` channel given to [`PeerClient::new`].

use super::auth::{self, AuthFailure, AuthHeaders, RateLimitedWarn};
use super::server::{
    valid_node_name, Inbound, ACCEPT_REPLIES_HEADER, HELLO_PATH, HELLO_SCOPE, MESSAGE_PATH,
    MESSAGE_SCOPE,
};
use super::stream::Lanes;
use super::{BoxError, PeerInfo, TransportConfig, TransportError};
use crate::metrics::Metrics;
use crate::raft;
use axum::body::Bytes;
use axum::http::{self, header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Messages waiting per peer; more are dropped and counted as `queue_full`.
pub const PEER_QUEUE_CAPACITY: usize = 256;
/// A peer's sender task ends after this long without a message.
pub const PEER_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Idle keep-alive connections are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest peer address accepted, in bytes.
const MAX_ADDRESS_BYTES: usize = 300;
/// Longest refusal reason kept from a peer's error answer, in bytes.
const MAX_REASON_BYTES: usize = 128;

/// Sends Raft messages to peers and asks them who they are. Cheap to clone;
/// clones share the queues and connections.
#[derive(Clone)]
pub struct PeerClient {
    shared: Arc<Shared>,
}

// Shared between the runtime task and adapters.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<PeerClient>();
};

impl std::fmt::Debug for PeerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerClient")
            .field("cluster_id", &self.shared.ctx.cfg.cluster_id)
            .field("sender_tasks", &self.sender_tasks())
            .finish()
    }
}

/// State of all clones; dropping it closes every queue, which ends the tasks.
struct Shared {
    ctx: SenderContext,
    runtime: tokio::runtime::Handle,
    queues: Mutex<HashMap<String, mpsc::Sender<Queued>>>,
    idle_timeout: Duration,
    live_tasks: Arc<AtomicUsize>,
    /// Streams for messages whose answers may wait (see [`PeerClient::send_streamed`]).
    lanes: Mutex<Lanes>,
}

/// What a sender task needs; deliberately not a handle to [`Shared`], so
/// tasks do not keep the client alive.
#[derive(Clone)]
struct SenderContext {
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    http: reqwest::Client,
    warn: Arc<RateLimitedWarn>,
    /// Where the peers' replies go, as messages nobody waits an answer to.
    replies: mpsc::Sender<Inbound>,
}

/// A message and when it was queued.
struct Queued {
    msg: raft::Message,
    queued_at: Instant,
}

impl PeerClient {
    /// Creates a client; MUST be called inside a tokio runtime, where the
    /// per-peer sender tasks will run. The messages peers answer with are
    /// put on `replies` (dropped and counted as `reply_dropped` when it is
    /// full). Fails when `cfg` is invalid.
    pub fn new(
        cfg: Arc<TransportConfig>,
        metrics: Metrics,
        replies: mpsc::Sender<Inbound>,
    ) -> Result<PeerClient, TransportError> {
        PeerClient::with_idle_timeout(cfg, metrics, replies, PEER_IDLE_TIMEOUT)
    }

    /// Creates a client whose per-peer sender tasks end after
    /// `idle_timeout` without a message (see [`PeerClient::new`]).
    pub fn with_idle_timeout(
        cfg: Arc<TransportConfig>,
        metrics: Metrics,
        replies: mpsc::Sender<Inbound>,
        idle_timeout: Duration,
    ) -> Result<PeerClient, TransportError> {
        cfg.validate()?;
        let runtime =
            tokio::runtime::Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .connect_timeout(cfg.request_timeout)
            .timeout(cfg.request_timeout)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http1_only()
            .build()
            .map_err(TransportError::ClientBuild)?;
        Ok(PeerClient {
            shared: Arc::new(Shared {
                lanes: Mutex::new(Lanes::new(cfg.clone())),
                ctx: SenderContext {
                    cfg,
                    metrics,
                    http,
                    warn: Arc::new(RateLimitedWarn::default()),
                    replies,
                },
                runtime,
                queues: Mutex::new(HashMap::new()),
                idle_timeout,
                live_tasks: Arc::new(AtomicUsize::new(0)),
            }),
        })
    }

    /// Queues `msg` for `addr` (`host:port`) and returns at once. Drops the
    /// message and counts `peer_rpc_errors{reason}` when the queue is full
    /// or the address is invalid. The peer's sender task counts delivery
    /// failures, and drops (as `expired`) messages that waited in the queue
    /// longer than the request timeout: Raft would have moved on by then.
    pub fn send(&self, addr: &str, msg: raft::Message) {
        if let Err(err) = self.try_queue(addr, msg) {
            self.shared.ctx.record_error(&err);
        }
    }

    /// Sends `msg` to `addr` over the peer stream when it is open and owes
    /// no answer, else as [`PeerClient::send`] does (and starts opening the
    /// stream). The answer to a streamed message is NOT delivered by itself:
    /// it waits in the socket until [`PeerClient::take_streamed_replies`],
    /// which costs no wakeup. For a leader's AppendEntries while its lease
    /// will outlast the next heartbeat round.
    pub fn send_streamed(&self, addr: &str, msg: raft::Message) {
        let ctx = &self.shared.ctx;
        let payload = match serde_json::to_vec(&msg) {
            Ok(payload) => payload,
            Err(e) => return ctx.record_error(&TransportError::Encode(e)),
        };
        let sent = {
            let mut lanes = match self.shared.lanes.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            lanes.send(addr, &payload, &self.shared.runtime)
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_not_taken)) => self.send(addr, msg),
            Err(err) => {
                ctx.record_error(&err);
                self.send(addr, msg);
            }
        }
    }

    /// Returns the replies that arrived on peer streams since the last call,
    /// without waiting; counts failed streams (each is reopened on a later
    /// send).
    pub fn take_streamed_replies(&self) -> Vec<raft::Message> {
        let (messages, errors) = {
            let mut lanes = match self.shared.lanes.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            lanes.receive()
        };
        for err in &errors {
            self.shared.ctx.record_error(err);
        }
        messages
    }

    /// Returns how many peer streams are open.
    pub fn open_streams(&self) -> usize {
        match self.shared.lanes.lock() {
            Ok(mut lanes) => lanes.open_count(),
            Err(poisoned) => poisoned.into_inner().open_count(),
        }
    }

    /// Asks the peer at `addr` who it is. Both request and answer are
    /// signed; the answer must carry our cluster id and a valid signature
    /// for this very request.
    pub async fn hello(&self, addr: &str) -> Result<PeerInfo, TransportError> {
        let ctx = &self.shared.ctx;
        let started = Instant::now();
        let result = ctx.hello(addr).await;
        match &result {
            Ok(_) => ctx.observe("hello", started.elapsed()),
            Err(err) => ctx.record_error(err),
        }
        result
    }

    /// Returns how many per-peer sender tasks are running.
    pub fn sender_tasks(&self) -> usize {
        self.shared.live_tasks.load(Ordering::Relaxed)
    }

    /// Puts `msg` on the queue of `addr`, starting its sender task if none runs.
    fn try_queue(&self, addr: &str, msg: raft::Message) -> Result<(), TransportError> {
        let mut item = Queued {
            msg,
            queued_at: Instant::now(),
        };
        let mut queues = match self.shared.queues.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(queue) = queues.get(addr) {
            match queue.try_send(item) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return Err(TransportError::QueueFull {
                        addr: addr.to_string(),
                    })
                }
                // The task ended (idle); start a new one below.
                Err(mpsc::error::TrySendError::Closed(back)) => item = back,
            }
        }
        let conn = PeerConnection::new(addr)?;
        queues.retain(|_, queue| !queue.is_closed());
        let (queue, rx) = mpsc::channel(PEER_QUEUE_CAPACITY);
        let task = PeerSender {
            ctx: self.shared.ctx.clone(),
            conn,
            rx,
            idle_timeout: self.shared.idle_timeout,
            _live: LiveTask::new(&self.shared.live_tasks),
        };
        self.shared.runtime.spawn(task.run());
        // A fresh queue has room, so this cannot fail.
        let queued = queue.try_send(item).map_err(|_| TransportError::QueueFull {
            addr: addr.to_string(),
        });
        queues.insert(addr.to_string(), queue);
        queued
    }
}

/// Counts a running sender task for as long as it lives.
struct LiveTask(Arc<AtomicUsize>);

impl LiveTask {
    fn new(counter: &Arc<AtomicUsize>) -> LiveTask {
        counter.fetch_add(1, Ordering::Relaxed);
        LiveTask(counter.clone())
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The task that posts one peer's queued messages.
///
/// Up to [`MAX_IN_FLIGHT`] messages are on the wire at once, each on its own
/// keep-alive connection: a lost TCP segment stalls one connection for a
/// retransmission timeout (≥ 200 ms on Linux), and the next heartbeat must
/// not wait behind it. Raft tolerates the reordering this allows.
struct PeerSender {
    ctx: SenderContext,
    conn: PeerConnection,
    rx: mpsc::Receiver<Queued>,
    idle_timeout: Duration,
    _live: LiveTask,
}

/// Most messages on the wire to one peer at once (one connection each).
pub const MAX_IN_FLIGHT: usize = 4;

/// A finished exchange: the connection to reuse, and what happened.
type Finished = (
    PeerConnection,
    &'static str,
    Instant,
    Result<Vec<raft::Message>, TransportError>,
);

impl PeerSender {
    /// Posts messages until every client clone is dropped or the peer idles.
    async fn run(mut self) {
        let mut in_flight = futures::stream::FuturesUnordered::new();
        let mut idle: Vec<PeerConnection> = Vec::new();
        let mut closed = false;
        loop {
            if closed && in_flight.is_empty() {
                return;
            }
            let room = in_flight.len() < MAX_IN_FLIGHT && !closed;
            tokio::select! {
                // An exchange finished: hand the replies on, keep the connection.
                Some((conn, kind, started, result)) = futures::StreamExt::next(&mut in_flight), if !in_flight.is_empty() => {
                    self.finish(kind, started, result);
                    idle.push(conn);
                }
                // A queued message, while a connection is free or may be opened.
                received = tokio::time::timeout(self.idle_timeout, self.rx.recv()), if room => {
                    match received {
                        Ok(Some(item)) => {
                            if let Some(exchange) = self.start(item, &mut idle) {
                                in_flight.push(exchange);
                            }
                        }
                        // Every PeerClient clone is gone, or the peer idled:
                        // refuse new messages, flush what raced in.
                        Ok(None) | Err(_) if in_flight.is_empty() => {
                            self.rx.close();
                            while let Ok(item) = self.rx.try_recv() {
                                if let Some(exchange) = self.start(item, &mut idle) {
                                    let (_, kind, started, result) = exchange.await;
                                    self.finish(kind, started, result);
                                }
                            }
                            return;
                        }
                        // Closed with exchanges still out: finish them first.
                        Ok(None) => closed = true,
                        Err(_) => {}
                    }
                }
            }
        }
    }

    /// Starts posting one message unless it went stale in the queue.
    fn start(
        &self,
        item: Queued,
        idle: &mut Vec<PeerConnection>,
    ) -> Option<impl std::future::Future<Output = Finished>> {
        if item.queued_at.elapsed() > self.ctx.cfg.request_timeout {
            self.ctx.record_error(&TransportError::Expired {
                addr: self.conn.addr.clone(),
            });
            return None;
        }
        let conn = idle.pop().unwrap_or_else(|| self.conn.fresh());
        let ctx = self.ctx.clone();
        Some(async move {
            let started = Instant::now();
            let kind = item.msg.body.kind();
            let mut conn = conn;
            let result = post_message(&ctx, &mut conn, &item.msg).await;
            (conn, kind, started, result)
        })
    }

    /// Records the outcome of one exchange and hands the replies on.
    fn finish(
        &self,
        kind: &'static str,
        started: Instant,
        result: Result<Vec<raft::Message>, TransportError>,
    ) {
        match result {
            Ok(replies) => {
                self.ctx.observe(kind, started.elapsed());
                self.forward(replies);
            }
            Err(err) => self.ctx.record_error(&err),
        }
    }

    /// Puts the peer's replies on the replies channel without waiting.
    fn forward(&self, replies: Vec<raft::Message>) {
        for msg in replies {
            match self.ctx.replies.try_send(Inbound::without_reply(msg)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.ctx.record_error(&TransportError::ReplyDropped {
                        addr: self.conn.addr.clone(),
                    })
                }
                // The runtime has stopped; nobody needs the replies.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

/// Posts one signed message on `conn`; returns the peer's signed replies
/// (none from a peer that answers 204, as versions before replies did).
async fn post_message(
    ctx: &SenderContext,
    conn: &mut PeerConnection,
    msg: &raft::Message,
) -> Result<Vec<raft::Message>, TransportError> {
    let cfg = &ctx.cfg;
    let body = serde_json::to_vec(msg).map_err(TransportError::Encode)?;
    let signed = auth::sign(cfg, MESSAGE_SCOPE, &body);
    let answer = conn
        .exchange(&signed, body, cfg.request_timeout, cfg.max_body_bytes)
        .await?;
    let addr = conn.addr.as_str();
    match answer.status {
        StatusCode::OK => {}
        StatusCode::NO_CONTENT => return Ok(Vec::new()),
        status => return Err(rejected(addr, status.as_u16(), &answer.body)),
    }
    verify_answer(&ctx.cfg, addr, &signed, &answer.headers, &answer.body)?;
    let bad = |reason: String| TransportError::BadResponse {
        addr: addr.to_string(),
        reason,
    };
    let replies: Vec<raft::Message> = serde_json::from_slice(&answer.body)
        .map_err(|e| bad(format!("answer is not a list of Raft messages: {e}")))?;
    if replies
        .iter()
        .any(|m| !valid_node_name(&m.from.name) || !valid_node_name(&m.to.name))
    {
        return Err(bad("a reply names an invalid node".to_string()));
    }
    Ok(replies)
}

/// One keep-alive HTTP/1.1 connection to a peer's message endpoint, opened
/// on first use and again after any failure. Host header and URI are built
/// once, so a request costs no URL parsing.
struct PeerConnection {
    addr: String,
    host: HeaderValue,
    uri: Uri,
    sender: Option<http1::SendRequest<Full<Bytes>>>,
}

/// Status, headers and body of a peer's answer.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl PeerConnection {
    /// Returns another, not yet connected, connection to the same peer.
    fn fresh(&self) -> PeerConnection {
        PeerConnection {
            addr: self.addr.clone(),
            host: self.host.clone(),
            uri: self.uri.clone(),
            sender: None,
        }
    }

    /// Prepares (without connecting) a connection to `addr`, `host:port`.
    fn new(addr: &str) -> Result<PeerConnection, TransportError> {
        peer_url(addr, MESSAGE_PATH)?;
        let invalid = || TransportError::InvalidAddress {
            addr: addr.to_string(),
        };
        Ok(PeerConnection {
            addr: addr.to_string(),
            host: HeaderValue::from_str(addr).map_err(|_| invalid())?,
            uri: Uri::from_static(MESSAGE_PATH),
            sender: None,
        })
    }

    /// Posts `body` with the auth headers and reads the answer (at most
    /// `limit` bytes of body), all within `timeout`. Any failure closes
    /// the connection, so the next request starts on a fresh one.
    async fn exchange(
        &mut self,
        signed: &AuthHeaders,
        body: Vec<u8>,
        timeout: Duration,
        limit: usize,
    ) -> Result<Answer, TransportError> {
        let result = tokio::time::timeout(timeout, self.try_exchange(signed, body, limit)).await;
        let result = result.unwrap_or_else(|_| {
            Err(TransportError::Timeout {
                addr: self.addr.clone(),
                timeout,
            })
        });
        if result.is_err() {
            self.sender = None;
        }
        result
    }

    async fn try_exchange(
        &mut self,
        signed: &AuthHeaders,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<Answer, TransportError> {
        let request_failed = |e: hyper::Error| TransportError::Request {
            addr: self.addr.clone(),
            source: Box::new(e),
        };
        let mut request = http::Request::new(Full::new(Bytes::from(body)));
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uri.clone();
        let headers = request.headers_mut();
        headers.reserve(7);
        headers.insert(header::HOST, self.host.clone());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(ACCEPT_REPLIES_HEADER, HeaderValue::from_static("1"));
        signed.insert_into(headers);
        let sender = match self.sender.as_mut() {
            Some(sender) if !sender.is_closed() => sender,
            _ => self.sender.insert(self.connect().await?),
        };
        sender.ready().await.map_err(request_failed)?;
        let response = sender.send_request(request).await.map_err(request_failed)?;
        let (parts, body) = response.into_parts();
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    TransportError::BadResponse {
                        addr: self.addr.clone(),
                        reason: format!("answer is larger than {limit} bytes"),
                    }
                } else {
                    TransportError::Request {
                        addr: self.addr.clone(),
                        source: e,
                    }
                }
            })?
            .to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Opens a TCP connection (TCP_NODELAY) and starts its HTTP/1.1 driver
    /// task, which ends when the connection closes.
    async fn connect(&self) -> Result<http1::SendRequest<Full<Bytes>>, TransportError> {
        let failed = |e: BoxError| TransportError::Connect {
            addr: self.addr.clone(),
            source: e,
        };
        let tcp = tokio::net::TcpStream::connect(self.addr.as_str())
            .await
            .map_err(|e| failed(Box::new(e)))?;
        // Small request/response pairs: Nagle would add up to 40 ms each.
        tcp.set_nodelay(true).map_err(|e| failed(Box::new(e)))?;
        let (sender, connection) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| failed(Box::new(e)))?;
        let addr = self.addr.clone();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, peer = %addr, "peer connection closed");
            }
        });
        Ok(sender)
    }
}

/// Turns a non-success answer into an error carrying the peer's reason.
fn rejected(addr: &str, status: u16, body: &[u8]) -> TransportError {
    let reason = String::from_utf8_lossy(&body[..body.len().min(MAX_REASON_BYTES)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    TransportError::Rejected {
        addr: addr.to_string(),
        status,
        reason,
    }
}

impl SenderContext {
    /// Sends a signed hello and checks the signed answer.
    async fn hello(&self, addr: &str) -> Result<PeerInfo, TransportError> {
        let url = peer_url(addr, HELLO_PATH)?;
        let signed = auth::sign(&self.cfg, HELLO_SCOPE, b"");
        let response = self
            .http
            .execute(self.signed_post(url, &signed, Vec::new()))
            .await
            .map_err(|e| classify(addr, self.cfg.request_timeout, e))?;
        if response.status() != StatusCode::OK {
            return Err(self.rejected(addr, response).await);
        }
        let headers = response.headers().clone();
        let body = read_limited(
            addr,
            self.cfg.request_timeout,
            response,
            self.cfg.max_body_bytes,
        )
        .await?;
        verify_answer(&self.cfg, addr, &signed, &headers, &body)?;
        let info: PeerInfo =
            serde_json::from_slice(&body).map_err(|e| TransportError::BadResponse {
                addr: addr.to_string(),
                reason: format!("hello answer is not a PeerInfo: {e}"),
            })?;
        if info.cluster_id != self.cfg.cluster_id {
            return Err(TransportError::ForeignCluster {
                addr: addr.to_string(),
                cluster: info.cluster_id,
            });
        }
        Ok(info)
    }

    /// Builds a POST of `body` to `url` with the auth headers attached.
    fn signed_post(
        &self,
        url: reqwest::Url,
        signed: &AuthHeaders,
        body: Vec<u8>,
    ) -> reqwest::Request {
        let mut request = reqwest::Request::new(Method::POST, url);
        let headers: &mut HeaderMap = request.headers_mut();
        headers.reserve(6);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        signed.insert_into(headers);
        *request.body_mut() = Some(body.into());
        request
    }

    /// Turns a non-success answer into an error carrying the peer's reason.
    async fn rejected(&self, addr: &str, response: reqwest::Response) -> TransportError {
        let status = response.status().as_u16();
        let reason = read_limited(addr, self.cfg.request_timeout, response, MAX_REASON_BYTES)
            .await
            .map(|body| {
                String::from_utf8_lossy(&body)
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect::<String>()
            })
            .unwrap_or_default();
        TransportError::Rejected {
            addr: addr.to_string(),
            status,
            reason,
        }
    }

    /// Records a successful RPC's latency.
    fn observe(&self, kind: &str, elapsed: Duration) {
        self.metrics
            .peer_rpc_seconds
            .with_label_values(&[kind])
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a failure and logs it, at most once per reason per interval.
    fn record_error(&self, err: &TransportError) {
        let reason = err.metric_label();
        self.metrics
            .peer_rpc_errors
            .with_label_values(&[reason])
            .inc();
        if let Some(suppressed) = self.warn.permit(reason, std::time::Instant::now()) {
            tracing::warn!(
                reason,
                suppressed,
                "peer RPC failed: {err} ({suppressed} more like it suppressed in the last {}s)",
                auth::WARN_INTERVAL.as_secs()
            );
        }
    }
}

/// Checks that the peer signed its answer (`headers`, `body`) for the
/// request signed as `request`, with our secret and cluster id.
pub(crate) fn verify_answer(
    cfg: &TransportConfig,
    addr: &str,
    request: &AuthHeaders,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), TransportError> {
    let answer = AuthHeaders::parse(headers).map_err(|_| TransportError::BadSignature {
        addr: addr.to_string(),
    })?;
    let scope = auth::response_scope(&request.nonce);
    auth::verify(cfg, &answer, &scope, body, auth::now_ms()).map_err(|f| match f {
        AuthFailure::ForeignCluster => TransportError::ForeignCluster {
            addr: addr.to_string(),
            cluster: answer.cluster_id.clone(),
        },
        AuthFailure::StaleTimestamp => TransportError::StaleResponse {
            addr: addr.to_string(),
        },
        _ => TransportError::BadSignature {
            addr: addr.to_string(),
        },
    })
}

/// Returns the URL of `path` on the peer at `addr`, which must be `host:port`.
fn peer_url(addr: &str, path: &str) -> Result<reqwest::Url, TransportError> {
    let invalid = || TransportError::InvalidAddress {
        addr: addr.chars().take(MAX_ADDRESS_BYTES).collect(),
    };
    if addr.len() > MAX_ADDRESS_BYTES
        || addr
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#@\\".contains(c))
    {
        return Err(invalid());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(invalid)?;
    if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p != 0) {
        return Err(invalid());
    }
    let url = reqwest::Url::parse(&format!("http://{addr}{path}")).map_err(|_| invalid())?;
    if url.host_str().is_none() || url.path() != path {
        return Err(invalid());
    }
    Ok(url)
}

/// Classifies a reqwest failure.
fn classify(addr: &str, timeout: Duration, err: reqwest::Error) -> TransportError {
    let addr = addr.to_string();
    if err.is_timeout() {
        TransportError::Timeout { addr, timeout }
    } else if err.is_connect() {
        TransportError::Connect {
            addr,
            source: Box::new(err),
        }
    } else {
        TransportError::Request {
            addr,
            source: Box::new(err),
        }
    }
}

/// Reads a response body, failing once it exceeds `limit` bytes.
async fn read_limited(
    addr: &str,
    timeout: Duration,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, TransportError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| classify(addr, timeout, e))?
    {
        if body.len() + chunk.len() > limit {
            return Err(TransportError::BadResponse {
                addr: addr.to_string(),
                reason: format!("answer is larger than {limit} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::testing::{
        config, eventually, heartbeat, identity, response_to, start_peer,
    };
    use axum::http::HeaderMap;
    use std::net::SocketAddr;

    fn client(cfg: &Arc<TransportConfig>) -> (PeerClient, Metrics) {
        let (client, metrics, _) = client_with_replies(cfg);
        (client, metrics)
    }

    fn client_with_replies(
        cfg: &Arc<TransportConfig>,
    ) -> (PeerClient, Metrics, mpsc::Receiver<Inbound>) {
        let metrics = Metrics::new();
        let (replies_tx, replies) = mpsc::channel(64);
        let client =
            PeerClient::new(cfg.clone(), metrics.clone(), replies_tx).expect("valid client");
        (client, metrics, replies)
    }

    fn errors(metrics: &Metrics, reason: &str) -> u64 {
        metrics.peer_rpc_errors.with_label_values(&[reason]).get()
    }

    /// Returns an address on which nothing listens.
    async fn dead_address() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        listener.local_addr().expect("local addr")
    }

    /// Serves a hello endpoint that answers with a PeerInfo signed by
    /// `signer`, for the request's nonce or, when `wrong_nonce`, another one.
    async fn forged_hello_server(signer: TransportConfig, wrong_nonce: bool) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let signer = Arc::new(signer);
        let handler = move |headers: HeaderMap| {
            let signer = signer.clone();
            async move {
                let nonce = match headers
                    .get(auth::NONCE_HEADER)
                    .and_then(|v| v.to_str().ok())
                {
                    Some(n) if !wrong_nonce => n.to_string(),
                    _ => auth::new_nonce(),
                };
                let body =
                    serde_json::to_vec(&identity(&signer.cluster_id, addr)).expect("encodes");
                let signed = auth::sign(&signer, &auth::response_scope(&nonce), &body);
                let mut out = HeaderMap::new();
                for (k, v) in signed.to_pairs() {
                    out.insert(
                        axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                        axum::http::HeaderValue::from_str(&v).expect("value"),
                    );
                }
                (out, body)
            }
        };
        let app = axum::Router::new().route(HELLO_PATH, axum::routing::post(handler));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// How a fake peer signs its answer to a message.
    #[derive(Clone, Copy)]
    enum AnswerSigning {
        /// With this secret, for the request's nonce.
        Secret(u8),
        /// With the right secret, but for another request's nonce.
        OtherNonce,
        /// Not at all.
        Unsigned,
    }

    /// Serves a message endpoint that answers 200 with `body` signed as
    /// `signing` says.
    async fn fake_message_server(signing: AnswerSigning, body: Vec<u8>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let handler = move |headers: HeaderMap| {
            let body = body.clone();
            async move {
                let request_nonce = headers
                    .get(auth::NONCE_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let mut out = HeaderMap::new();
                let signed = match signing {
                    AnswerSigning::Secret(seed) => Some(auth::sign(
                        &config(seed),
                        &auth::response_scope(&request_nonce),
                        &body,
                    )),
                    AnswerSigning::OtherNonce => Some(auth::sign(
                        &config(1),
                        &auth::response_scope(&auth::new_nonce()),
                        &body,
                    )),
                    AnswerSigning::Unsigned => None,
                };
                if let Some(signed) = signed {
                    signed.insert_into(&mut out);
                }
                (out, body)
            }
        };
        let app = axum::Router::new().route(MESSAGE_PATH, axum::routing::post(handler));
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    #[tokio::test]
    async fn replies_in_the_answer_arrive_on_the_replies_channel() {
        let mut peer = start_peer(config(1), 64).await;
        let mut seen = peer.answer_heartbeats();
        let (client, metrics, mut replies) = client_with_replies(&peer.cfg);
        for round in 0..3 {
            client.send(&peer.addr.to_string(), heartbeat(round));
        }
        for round in 0..3 {
            assert_eq!(seen.recv().await, Some(heartbeat(round)));
            let reply = tokio::time::timeout(Duration::from_secs(2), replies.recv())
                .await
                .ok()
                .flatten()
                .expect("reply forwarded");
            assert_eq!(reply.msg, response_to(&heartbeat(round)));
            assert!(
                reply.reply.is_none(),
                "nobody waits for an answer to a reply"
            );
        }
        assert_eq!(errors(&metrics, "bad_signature"), 0);
    }

    #[tokio::test]
    async fn forged_unsigned_or_replayed_answers_are_refused_and_counted() {
        let body = serde_json::to_vec(&vec![response_to(&heartbeat(1))]).expect("encodes");
        for signing in [
            AnswerSigning::Secret(2),
            AnswerSigning::Unsigned,
            AnswerSigning::OtherNonce,
        ] {
            let addr = fake_message_server(signing, body.clone()).await;
            let (client, metrics, mut replies) = client_with_replies(&Arc::new(config(1)));
            client.send(&addr.to_string(), heartbeat(1));
            assert!(
                eventually(Duration::from_secs(2), || errors(&metrics, "bad_signature")
                    == 1)
                .await,
                "bad_signature counted"
            );
            assert!(replies.try_recv().is_err(), "nothing forwarded");
        }
    }

    #[tokio::test]
    async fn answer_that_is_not_a_list_of_messages_is_refused_as_bad_response() {
        let addr = fake_message_server(AnswerSigning::Secret(1), b"{\"x\":1}".to_vec()).await;
        let (client, metrics, mut replies) = client_with_replies(&Arc::new(config(1)));
        client.send(&addr.to_string(), heartbeat(1));
        assert!(
            eventually(Duration::from_secs(2), || errors(&metrics, "bad_response")
                == 1)
            .await,
            "bad_response counted"
        );
        assert!(replies.try_recv().is_err(), "nothing forwarded");
    }

    #[tokio::test]
    async fn every_sent_message_arrives_once() {
        let mut peer = start_peer(config(1), 64).await;
        let (client, metrics) = client(&peer.cfg);
        for round in 0..50 {
            client.send(&peer.addr.to_string(), heartbeat(round));
        }
        // Several connections carry them, so the order may change; Raft
        // tolerates that.
        let mut got = Vec::new();
        for _ in 0..50 {
            got.push(peer.next().await.expect("a message"));
        }
        let mut expected: Vec<_> = (0..50).map(heartbeat).collect();
        let key = |m: &raft::Message| format!("{m:?}");
        got.sort_by_key(key);
        expected.sort_by_key(key);
        assert_eq!(got, expected);
        let samples = || {
            metrics
                .peer_rpc_seconds
                .with_label_values(&["append_entries"])
                .get_sample_count()
        };
        assert!(
            eventually(Duration::from_secs(1), || samples() == 50).await,
            "latency recorded per message: {}",
            samples()
        );
        assert_eq!(client.sender_tasks(), 1, "one task per peer address");
    }

    #[tokio::test]
    async fn hello_round_trip_returns_the_identity() {
        let peer = start_peer(config(1), 8).await;
        let (client, metrics) = client(&peer.cfg);
        let info = client
            .hello(&peer.addr.to_string())
            .await
            .expect("hello answered");
        assert_eq!(info, identity("test", peer.addr));
        let mut changed = info.clone();
        changed.term = 9;
        peer.identity.send_replace(changed.clone());
        let info = client
            .hello(&peer.addr.to_string())
            .await
            .expect("hello answered");
        assert_eq!(info, changed, "answers the current identity");
        assert_eq!(
            metrics
                .peer_rpc_seconds
                .with_label_values(&["hello"])
                .get_sample_count(),
            2
        );
    }

    #[tokio::test]
    async fn hello_to_a_server_with_another_secret_fails() {
        let peer = start_peer(config(1), 8).await;
        let (client, metrics) = client(&Arc::new(config(2)));
        let err = client
            .hello(&peer.addr.to_string())
            .await
            .expect_err("other secret");
        assert!(
            matches!(&err, TransportError::Rejected { status: 401, reason, .. } if reason == "bad_signature"),
            "{err}"
        );
        assert_eq!(errors(&metrics, "rejected"), 1);
    }

    #[tokio::test]
    async fn hello_answer_signed_with_another_secret_is_refused() {
        let addr = forged_hello_server(config(2), false).await;
        let (client, metrics) = client(&Arc::new(config(1)));
        let err = client
            .hello(&addr.to_string())
            .await
            .expect_err("forged answer");
        assert!(matches!(err, TransportError::BadSignature { .. }), "{err}");
        assert_eq!(errors(&metrics, "bad_signature"), 1);
    }

    #[tokio::test]
    async fn hello_answer_signed_for_another_request_is_refused() {
        let addr = forged_hello_server(config(1), true).await;
        let (client, _) = client(&Arc::new(config(1)));
        let err = client
            .hello(&addr.to_string())
            .await
            .expect_err("replayed answer");
        assert!(matches!(err, TransportError::BadSignature { .. }), "{err}");
    }

    #[tokio::test]
    async fn hello_answer_from_another_cluster_is_refused() {
        let addr = forged_hello_server(TransportConfig::new("other", vec![1; 32]), false).await;
        let (client, _) = client(&Arc::new(config(1)));
        let err = client
            .hello(&addr.to_string())
            .await
            .expect_err("foreign answer");
        assert!(
            matches!(err, TransportError::ForeignCluster { ref cluster, .. } if cluster == "other"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn send_to_a_dead_address_counts_an_error_and_does_not_block() {
        let addr = dead_address().await.to_string();
        let (client, metrics) = client(&Arc::new(config(1)));
        let started = std::time::Instant::now();
        for round in 0..10 {
            client.send(&addr, heartbeat(round));
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "send returned at once"
        );
        assert!(
            eventually(Duration::from_secs(2), || errors(&metrics, "connect") == 10).await,
            "connect errors: {}",
            errors(&metrics, "connect")
        );
    }

    #[tokio::test]
    async fn full_queue_drops_messages_and_counts_them() {
        // A peer that accepts connections and never answers.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let (client, metrics) = client(&Arc::new(config(1)));
        let extra = 40;
        for round in 0..(PEER_QUEUE_CAPACITY + MAX_IN_FLIGHT + extra) as u64 {
            client.send(&addr, heartbeat(round));
        }
        // At most MAX_IN_FLIGHT are on the wire, the queue holds the capacity.
        assert!(
            errors(&metrics, "queue_full") >= extra as u64,
            "{}",
            errors(&metrics, "queue_full")
        );
        drop(silent);
    }

    #[tokio::test]
    async fn stale_queued_messages_are_dropped_not_sent() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr").to_string();
        let mut cfg = config(1);
        cfg.request_timeout = Duration::from_millis(100);
        let (client, metrics) = client(&Arc::new(cfg));
        for round in 0..(MAX_IN_FLIGHT + 5) as u64 {
            client.send(&addr, heartbeat(round));
        }
        // The first MAX_IN_FLIGHT time out after 100 ms; the other five have
        // waited as long by then.
        assert!(
            eventually(Duration::from_secs(2), || errors(&metrics, "timeout")
                == MAX_IN_FLIGHT as u64
                && errors(&metrics, "expired") == 5)
            .await,
            "timeout {} expired {}",
            errors(&metrics, "timeout"),
            errors(&metrics, "expired")
        );
    }

    #[tokio::test]
    async fn invalid_addresses_are_counted_and_start_no_task() {
        let (client, metrics) = client(&Arc::new(config(1)));
        for addr in [
            "",
            "nohost",
            ":4041",
            "host:0",
            "host:99999",
            "a/b:1",
            "user@h:1",
            "h:1/x",
            "h:1 ",
        ] {
            client.send(addr, heartbeat(1));
        }
        assert_eq!(errors(&metrics, "invalid_address"), 9);
        assert_eq!(client.sender_tasks(), 0);
        let err = client.hello("no-port").await.expect_err("invalid");
        assert!(
            matches!(err, TransportError::InvalidAddress { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn sender_tasks_end_when_every_client_clone_is_dropped() {
        let peer = start_peer(config(1), 64).await;
        let (client, _) = client(&peer.cfg);
        let live = client.shared.live_tasks.clone();
        let clone = client.clone();
        client.send(&peer.addr.to_string(), heartbeat(1));
        clone.send(&dead_address().await.to_string(), heartbeat(2));
        assert_eq!(live.load(Ordering::Relaxed), 2);
        drop(client);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            live.load(Ordering::Relaxed),
            2,
            "a clone still holds the queues"
        );
        drop(clone);
        assert!(eventually(Duration::from_secs(2), || live.load(Ordering::Relaxed) == 0).await);
    }

    #[tokio::test]
    async fn idle_sender_task_ends_and_the_next_send_starts_a_new_one() {
        let mut peer = start_peer(config(1), 64).await;
        let (replies, _) = mpsc::channel(1);
        let client = PeerClient::with_idle_timeout(
            peer.cfg.clone(),
            Metrics::new(),
            replies,
            Duration::from_millis(50),
        )
        .expect("valid client");
        let addr = peer.addr.to_string();
        client.send(&addr, heartbeat(1));
        assert_eq!(peer.next().await, Some(heartbeat(1)));
        assert!(eventually(Duration::from_secs(2), || client.sender_tasks() == 0).await);
        client.send(&addr, heartbeat(2));
        assert_eq!(client.sender_tasks(), 1);
        assert_eq!(peer.next().await, Some(heartbeat(2)));
    }

    #[tokio::test]
    async fn client_refuses_an_invalid_config() {
        let (replies, _) = mpsc::channel(1);
        let err = PeerClient::new(
            Arc::new(TransportConfig::new("test", vec![1; 4])),
            Metrics::new(),
            replies,
        )
        .expect_err("short secret refused");
        assert_eq!(err.metric_label(), "invalid_config");
    }

    #[test]
    fn client_outside_a_runtime_is_refused() {
        let (replies, _) = mpsc::channel(1);
        let err =
            PeerClient::new(Arc::new(config(1)), Metrics::new(), replies).expect_err("no runtime");
        assert!(matches!(err, TransportError::NoRuntime));
    }

    #[tokio::test]
    async fn loopback_delivery_takes_well_under_a_millisecond() {
        let mut peer = start_peer(config(1), 64).await;
        let (client, _) = client(&peer.cfg);
        let addr = peer.addr.to_string();
        let mut samples = Vec::new();
        for round in 0..300 {
            let started = std::time::Instant::now();
            client.send(&addr, heartbeat(round));
            assert_eq!(peer.next().await, Some(heartbeat(round)));
            if round >= 50 {
                samples.push(started.elapsed());
            }
        }
        samples.sort();
        let p50 = samples[samples.len() / 2];
        println!(
            "loopback send->inbound p50 {p50:?} p90 {:?}",
            samples[samples.len() * 9 / 10]
        );
        // Generous bound so a busy CI machine passes; typical is ~100 µs.
        assert!(p50 < Duration::from_millis(2), "p50 {p50:?}");
    }
}
