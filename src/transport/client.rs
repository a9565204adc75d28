//! The peer client: one bounded queue and one sender task per peer address.
//!
//! [`PeerClient::send`] never waits: it puts the message on the peer's queue
//! (dropping it when the queue is full, which Raft tolerates) and the
//! peer's task posts queued messages one at a time, as soon as they arrive,
//! over a keep-alive connection. A task ends when every clone of the client
//! is dropped or its peer has been idle for [`PEER_IDLE_TIMEOUT`].

use super::auth::{self, AuthFailure, AuthHeaders, RateLimitedWarn};
use super::server::{HELLO_PATH, MESSAGE_PATH};
use super::{PeerInfo, TransportConfig, TransportError};
use crate::metrics::Metrics;
use crate::raft;
use axum::http::{header, StatusCode};
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

/// State of all clones; dropping it closes every queue, which ends the tasks.
struct Shared {
    ctx: SenderContext,
    runtime: tokio::runtime::Handle,
    queues: Mutex<HashMap<String, mpsc::Sender<Queued>>>,
    idle_timeout: Duration,
    live_tasks: Arc<AtomicUsize>,
}

/// What a sender task needs; deliberately not a handle to [`Shared`], so
/// tasks do not keep the client alive.
#[derive(Clone)]
struct SenderContext {
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    http: reqwest::Client,
    warn: Arc<RateLimitedWarn>,
}

/// A message and when it was queued.
struct Queued {
    msg: raft::Message,
    queued_at: Instant,
}

impl PeerClient {
    /// Creates a client; MUST be called inside a tokio runtime, where the
    /// per-peer sender tasks will run. Fails when `cfg` is invalid.
    pub fn new(cfg: Arc<TransportConfig>, metrics: Metrics) -> Result<PeerClient, TransportError> {
        cfg.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| TransportError::NoRuntime)?;
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
                ctx: SenderContext {
                    cfg,
                    metrics,
                    http,
                    warn: Arc::new(RateLimitedWarn::default()),
                },
                runtime,
                queues: Mutex::new(HashMap::new()),
                idle_timeout: PEER_IDLE_TIMEOUT,
                live_tasks: Arc::new(AtomicUsize::new(0)),
            }),
        })
    }

    /// Queues `msg` for `addr` (`host:port`) and returns at once. Drops the
    /// message and counts `peer_rpc_errors{reason}` when the queue is full
    /// or the address is invalid; delivery failures are counted by the
    /// peer's sender task.
    pub fn send(&self, addr: &str, msg: raft::Message) {
        if let Err(err) = self.try_queue(addr, msg) {
            self.shared.ctx.record_error(&err);
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

    /// Sets how long a peer's sender task waits for a message before it
    /// ends (default [`PEER_IDLE_TIMEOUT`]). Only before the first send.
    pub fn with_peer_idle_timeout(self, idle_timeout: Duration) -> PeerClient {
        match Arc::try_unwrap(self.shared) {
            Ok(mut shared) => {
                shared.idle_timeout = idle_timeout;
                PeerClient {
                    shared: Arc::new(shared),
                }
            }
            // Already cloned: keep the shared state as it is.
            Err(shared) => PeerClient { shared },
        }
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
        let url = peer_url(addr, MESSAGE_PATH)?;
        queues.retain(|_, queue| !queue.is_closed());
        let (queue, rx) = mpsc::channel(PEER_QUEUE_CAPACITY);
        let task = PeerSender {
            ctx: self.shared.ctx.clone(),
            addr: addr.to_string(),
            url,
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

/// The task that posts one peer's queued messages in order.
struct PeerSender {
    ctx: SenderContext,
    addr: String,
    url: reqwest::Url,
    rx: mpsc::Receiver<Queued>,
    idle_timeout: Duration,
    _live: LiveTask,
}

impl PeerSender {
    /// Posts messages until every client clone is dropped or the peer idles.
    async fn run(mut self) {
        loop {
            match tokio::time::timeout(self.idle_timeout, self.rx.recv()).await {
                Ok(Some(item)) => self.deliver(item).await,
                // Every PeerClient clone is gone.
                Ok(None) => return,
                // Idle: refuse new messages, then flush what raced in.
                Err(_) => {
                    self.rx.close();
                    while let Ok(item) = self.rx.try_recv() {
                        self.deliver(item).await;
                    }
                    return;
                }
            }
        }
    }

    /// Posts one message unless it went stale in the queue; records metrics.
    async fn deliver(&self, item: Queued) {
        if item.queued_at.elapsed() > self.ctx.cfg.request_timeout {
            self.ctx.record_error(&TransportError::Expired {
                addr: self.addr.clone(),
            });
            return;
        }
        let started = Instant::now();
        match self.ctx.post_message(&self.addr, &self.url, &item.msg).await {
            Ok(()) => self.ctx.observe(item.msg.body.kind(), started.elapsed()),
            Err(err) => self.ctx.record_error(&err),
        }
    }
}

impl SenderContext {
    /// Posts one signed message and expects 204.
    async fn post_message(&self, addr: &str, url: &reqwest::Url, msg: &raft::Message) -> Result<(), TransportError> {
        let body = serde_json::to_vec(msg).map_err(TransportError::Encode)?;
        let signed = auth::sign(&self.cfg, &format!("POST {MESSAGE_PATH}"), &body);
        let response = self
            .signed_post(url.clone(), &signed, body)
            .send()
            .await
            .map_err(|e| classify(addr, self.cfg.request_timeout, e))?;
        if response.status() != StatusCode::NO_CONTENT {
            return Err(self.rejected(addr, response).await);
        }
        Ok(())
    }

    /// Sends a signed hello and checks the signed answer.
    async fn hello(&self, addr: &str) -> Result<PeerInfo, TransportError> {
        let url = peer_url(addr, HELLO_PATH)?;
        let signed = auth::sign(&self.cfg, &format!("POST {HELLO_PATH}"), b"");
        let response = self
            .signed_post(url, &signed, Vec::new())
            .send()
            .await
            .map_err(|e| classify(addr, self.cfg.request_timeout, e))?;
        if response.status() != StatusCode::OK {
            return Err(self.rejected(addr, response).await);
        }
        let answer = AuthHeaders::parse(response.headers()).map_err(|_| TransportError::BadSignature {
            addr: addr.to_string(),
        })?;
        let body = read_limited(addr, self.cfg.request_timeout, response, self.cfg.max_body_bytes).await?;
        let scope = auth::response_scope(&signed.nonce);
        auth::verify(&self.cfg, &answer, &scope, &body, auth::now_ms()).map_err(|f| match f {
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
        })?;
        let info: PeerInfo = serde_json::from_slice(&body).map_err(|e| TransportError::BadResponse {
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

    /// Builds a POST of `body` with the auth headers attached.
    fn signed_post(&self, url: reqwest::Url, signed: &AuthHeaders, body: Vec<u8>) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in signed.to_pairs() {
            request = request.header(name, value);
        }
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
        self.metrics.peer_rpc_errors.with_label_values(&[reason]).inc();
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

/// Returns the URL of `path` on the peer at `addr`, which must be `host:port`.
fn peer_url(addr: &str, path: &str) -> Result<reqwest::Url, TransportError> {
    let invalid = || TransportError::InvalidAddress {
        addr: addr.chars().take(MAX_ADDRESS_BYTES).collect(),
    };
    if addr.len() > MAX_ADDRESS_BYTES
        || addr.chars().any(|c| c.is_whitespace() || c.is_control() || "/?#@\\".contains(c))
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
        TransportError::Connect { addr, source: err }
    } else {
        TransportError::Request { addr, source: err }
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
    while let Some(chunk) = response.chunk().await.map_err(|e| classify(addr, timeout, e))? {
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
