//! The peer server: accepts signed Raft messages and answers `hello`.
//!
//! A message is forwarded to the runtime as an [`Inbound`] with a reply
//! slot; the runtime's answers to the sender (e.g. the AppendEntries
//! response) come back in the HTTP response, signed for the request's
//! nonce, so one heartbeat round costs one request per follower.
//!
//! Every refusal answers a 4xx (or 503), increments
//! `rejected_messages{reason}`, logs a rate-limited warning and forwards
//! nothing. Checks run cheapest first and the body is never read past
//! [`TransportConfig::max_body_bytes`].

use super::auth::{
    self, AuthFailure, AuthHeaders, NonceCache, RateLimitedWarn, NONCE_CACHE_CAPACITY,
};
use super::stream::{
    self, AcceptedStream, Direction, FrameBuffer, FrameError, FrameKeys, STREAM_PROTOCOL,
};
use super::{PeerInfo, TransportConfig};
use crate::metrics::Metrics;
use crate::raft;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures::StreamExt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Path Raft messages are posted to.
pub const MESSAGE_PATH: &str = "/raft/v1/message";
/// Path a peer asks "who are you" at.
pub const HELLO_PATH: &str = "/raft/v1/hello";
/// Longest accepted node name in a message, in bytes (a DNS name's length).
pub const MAX_NODE_NAME_BYTES: usize = 253;
/// Longest the server waits for the runtime's replies to a message; also
/// capped at half the request timeout, so the answer beats the client's
/// timeout.
pub const MAX_REPLY_WAIT: Duration = Duration::from_millis(100);
/// Request header by which a client says it takes the runtime's replies in
/// the answer. Without it (a client of an older version) the server answers
/// 204 at once and the runtime sends its replies as requests of its own.
pub const ACCEPT_REPLIES_HEADER: &str = "x-raft-elector-accept-replies";
/// Signing scope of a message request (`"<METHOD> <path>"`).
pub(crate) const MESSAGE_SCOPE: &str = "POST /raft/v1/message";
/// Signing scope of a hello request.
pub(crate) const HELLO_SCOPE: &str = "POST /raft/v1/hello";

/// A peer message handed to the runtime, with a slot for the messages the
/// runtime sends back to that peer in response.
#[derive(Debug)]
pub struct Inbound {
    /// The authenticated message.
    pub msg: raft::Message,
    /// Where the runtime MUST put its messages addressed to `msg.from`,
    /// after persisting the state they depend on; `None` when the message
    /// arrived as a reply itself and nobody waits. Dropping it answers an
    /// empty list.
    pub reply: Option<oneshot::Sender<Vec<raft::Message>>>,
}

impl Inbound {
    /// Wraps a message nobody waits for an answer to.
    pub fn without_reply(msg: raft::Message) -> Inbound {
        Inbound { msg, reply: None }
    }
}

/// Why the server refused a request. Each maps to one status code and one
/// stable `rejected_messages{reason}` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The body is larger than `max_body_bytes` (413).
    BodyTooLarge,
    /// The body could not be read, e.g. the peer hung up (400).
    BodyUnreadable,
    /// The body did not arrive within the request timeout (408).
    BodyTimeout,
    /// No authentication headers (401).
    MissingAuth,
    /// Authentication headers absent or badly formatted (401).
    MalformedAuth,
    /// HMAC mismatch: wrong secret or tampered request (401).
    BadSignature,
    /// Signed for another cluster id (403).
    ForeignCluster,
    /// Timestamp outside the allowed clock skew (401).
    StaleTimestamp,
    /// Nonce seen before: a replayed request (409).
    ReplayedNonce,
    /// The body is not one JSON Raft message (400).
    MalformedMessage,
    /// `from` or `to` has an empty, overlong or unprintable name (400).
    BadNodeName,
    /// The runtime is not keeping up; the message was not queued (503).
    InboundFull,
    /// The runtime has stopped (503).
    InboundClosed,
    /// A stream request without `Upgrade: raft-elector-stream/1` (400).
    BadUpgrade,
}

impl Rejection {
    /// Returns the HTTP status answered for this refusal.
    pub fn status(self) -> StatusCode {
        match self {
            Rejection::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Rejection::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Rejection::BodyUnreadable
            | Rejection::MalformedMessage
            | Rejection::BadNodeName
            | Rejection::BadUpgrade => StatusCode::BAD_REQUEST,
            Rejection::MissingAuth
            | Rejection::MalformedAuth
            | Rejection::BadSignature
            | Rejection::StaleTimestamp => StatusCode::UNAUTHORIZED,
            Rejection::ForeignCluster => StatusCode::FORBIDDEN,
            Rejection::ReplayedNonce => StatusCode::CONFLICT,
            Rejection::InboundFull | Rejection::InboundClosed => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Returns the stable snake_case label for `rejected_messages{reason}`.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::BodyTooLarge => "body_too_large",
            Rejection::BodyUnreadable => "body_unreadable",
            Rejection::BodyTimeout => "body_timeout",
            Rejection::MissingAuth => "missing_auth",
            Rejection::MalformedAuth => "malformed_auth",
            Rejection::BadSignature => "bad_signature",
            Rejection::ForeignCluster => "foreign_cluster",
            Rejection::StaleTimestamp => "stale_timestamp",
            Rejection::ReplayedNonce => "replayed_nonce",
            Rejection::MalformedMessage => "malformed_message",
            Rejection::BadNodeName => "bad_node_name",
            Rejection::InboundFull => "inbound_full",
            Rejection::InboundClosed => "inbound_closed",
            Rejection::BadUpgrade => "bad_upgrade",
        }
    }
}

impl From<AuthFailure> for Rejection {
    fn from(f: AuthFailure) -> Rejection {
        match f {
            AuthFailure::Missing => Rejection::MissingAuth,
            AuthFailure::Malformed => Rejection::MalformedAuth,
            AuthFailure::ForeignCluster => Rejection::ForeignCluster,
            AuthFailure::StaleTimestamp => Rejection::StaleTimestamp,
            AuthFailure::BadSignature => Rejection::BadSignature,
        }
    }
}

/// Everything the handlers share.
struct PeerServer {
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    inbound: mpsc::Sender<Inbound>,
    /// Where upgraded streams go to be read by the runtime when it wakes;
    /// `None`: a task of the server reads each one as frames arrive.
    accepted: Option<mpsc::Sender<AcceptedStream>>,
    identity: watch::Receiver<PeerInfo>,
    nonces: Mutex<NonceCache>,
    warn: RateLimitedWarn,
}

/// Builds the peer router: `POST /raft/v1/message` (body: one JSON
/// [`raft::Message`]) queues the message on `inbound` as an [`Inbound`],
/// waits for its reply (at most [`MAX_REPLY_WAIT`] or half the request
/// timeout, else an empty list) and answers 200 with a JSON array of
/// [`raft::Message`] signed for that request (a request without
/// [`ACCEPT_REPLIES_HEADER`] is answered 204 once queued, without a reply slot);
/// `POST /raft/v1/hello` (signed, empty body) answers 200 with a signed JSON
/// [`PeerInfo`] read from `identity`.
///
/// `cfg` MUST have passed [`TransportConfig::validate`]. Serve it with
/// [`serve`] (or with `into_make_service_with_connect_info::<SocketAddr>()`
/// so refusals are logged with the peer's address).
pub fn router(
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    inbound: mpsc::Sender<Inbound>,
    identity: watch::Receiver<PeerInfo>,
) -> Router {
    router_with_streams(cfg, metrics, inbound, identity, None)
}

/// Builds the peer router (see [`router`]); upgraded peer streams go to
/// `accepted` as [`AcceptedStream`]s, which the runtime reads when it wakes
/// (served with [`serve`]; elsewhere a server task reads them).
pub fn router_with_streams(
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    inbound: mpsc::Sender<Inbound>,
    identity: watch::Receiver<PeerInfo>,
    accepted: Option<mpsc::Sender<AcceptedStream>>,
) -> Router {
    let limit = cfg.max_body_bytes;
    let state = Arc::new(PeerServer {
        cfg,
        metrics,
        inbound,
        accepted,
        identity,
        nonces: Mutex::new(NonceCache::new(NONCE_CACHE_CAPACITY)),
        warn: RateLimitedWarn::default(),
    });
    Router::new()
        .route(MESSAGE_PATH, post(handle_message))
        .route(HELLO_PATH, post(handle_hello))
        .route(stream::STREAM_PATH, get(handle_stream))
        // The handlers read the body themselves with the same limit (to
        // count refusals); this layer keeps any future extractor bounded too.
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Pause after a failed accept (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` with TCP_NODELAY on every connection until
/// `shutdown` completes, then lets open requests finish. HTTP/1.1 with
/// upgrades, so that an upgraded peer stream can be taken back as its TCP
/// socket (see [`AcceptedStream`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::pin!(shutdown);
    let (stop_tx, stop) = watch::channel(false);
    // Each connection task holds a clone; `recv` returns None once all ended.
    let (alive, mut all_ended) = mpsc::channel::<()>(1);
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(%err, "cannot accept a peer connection");
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            },
            _ = &mut shutdown => break,
        };
        // Small request/response pairs: Nagle would add up to 40 ms each.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY on a peer connection");
        }
        let service = hyper_util::service::TowerToHyperService::new(
            router.clone().layer(axum::Extension(ConnectInfo(remote))),
        );
        let (mut stop, alive) = (stop.clone(), alive.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades();
            tokio::pin!(conn);
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = ended {
                tracing::debug!(%err, peer = %remote, "peer connection ended");
            }
            drop(alive);
        });
    }
    // No new connections while the open ones finish.
    drop(listener);
    let _ = stop_tx.send(true);
    drop(alive);
    let _ = all_ended.recv().await;
    Ok(())
}

/// Handles `POST /raft/v1/message`.
async fn handle_message(State(server): State<Arc<PeerServer>>, req: Request) -> Response {
    let peer = peer_addr(&req);
    match server.accept_message(req).await {
        Ok((auth, Some(replies))) => server.answer_message(&auth, replies).await,
        Ok((_, None)) => StatusCode::NO_CONTENT.into_response(),
        Err(rejection) => server.refuse(rejection, peer),
    }
}

/// Handles `POST /raft/v1/hello`.
async fn handle_hello(State(server): State<Arc<PeerServer>>, req: Request) -> Response {
    let peer = peer_addr(&req);
    match server.authenticate(req, HELLO_SCOPE).await {
        Ok((auth, _body)) => server.answer_hello(&auth),
        Err(rejection) => server.refuse(rejection, peer),
    }
}

/// Handles `GET /raft/v1/stream`: authenticates the upgrade request like a
/// message (empty body), answers 101 signed for it, and serves the stream
/// in a task of its own once the connection is handed over.
async fn handle_stream(State(server): State<Arc<PeerServer>>, mut req: Request) -> Response {
    let peer = peer_addr(&req);
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok());
    if upgrade != Some(STREAM_PROTOCOL) {
        return server.refuse(Rejection::BadUpgrade, peer);
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let auth = match server.authenticate(req, stream::STREAM_SCOPE).await {
        Ok((auth, _empty)) => auth,
        Err(rejection) => return server.refuse(rejection, peer),
    };
    let keys = FrameKeys::new(&server.cfg, &auth.nonce);
    let streaming = server.clone();
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => return tracing::debug!(%err, ?peer, "peer stream upgrade failed"),
        };
        let upgraded = match &streaming.accepted {
            Some(accepted) => match AcceptedStream::take(upgraded, keys.clone(), peer) {
                Ok(None) => return,
                Ok(Some(stream)) => {
                    if let Err(e) = accepted.try_send(stream) {
                        let rejection = match e {
                            mpsc::error::TrySendError::Full(_) => Rejection::InboundFull,
                            mpsc::error::TrySendError::Closed(_) => Rejection::InboundClosed,
                        };
                        streaming.count_refusal(rejection, peer);
                    }
                    return;
                }
                // Not a plain TCP connection: serve it here instead.
                Err(upgraded) => upgraded,
            },
            None => upgraded,
        };
        streaming
            .serve_stream(hyper_util::rt::TokioIo::new(upgraded), keys, peer)
            .await
    });
    let signed = auth::sign(&server.cfg, &auth::response_scope(&auth.nonce), b"");
    let mut headers = HeaderMap::with_capacity(6);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static(STREAM_PROTOCOL));
    signed.insert_into(&mut headers);
    (StatusCode::SWITCHING_PROTOCOLS, headers).into_response()
}

/// Returns the peer's socket address when the server records it.
fn peer_addr(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| *addr)
}

impl PeerServer {
    /// Authenticates, decodes, checks and queues one message; returns the
    /// request's auth headers and, when the client takes replies in the
    /// answer, where the runtime's replies will arrive.
    async fn accept_message(
        &self,
        req: Request,
    ) -> Result<(AuthHeaders, Option<oneshot::Receiver<Vec<raft::Message>>>), Rejection> {
        let takes_replies = req.headers().contains_key(ACCEPT_REPLIES_HEADER);
        let (auth, body) = self.authenticate(req, MESSAGE_SCOPE).await?;
        let msg: raft::Message =
            serde_json::from_slice(&body).map_err(|_| Rejection::MalformedMessage)?;
        if !valid_node_name(&msg.from.name) || !valid_node_name(&msg.to.name) {
            return Err(Rejection::BadNodeName);
        }
        let (reply, replies) = if takes_replies {
            let (reply, replies) = oneshot::channel();
            (Some(reply), Some(replies))
        } else {
            (None, None)
        };
        self.inbound
            .try_send(Inbound { msg, reply })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => Rejection::InboundFull,
                mpsc::error::TrySendError::Closed(_) => Rejection::InboundClosed,
            })?;
        Ok((auth, replies))
    }

    /// Waits (bounded) for the runtime's replies and answers them, signed
    /// for the request; a late or dropped reply answers an empty list.
    async fn answer_message(
        &self,
        request: &AuthHeaders,
        replies: oneshot::Receiver<Vec<raft::Message>>,
    ) -> Response {
        let wait = MAX_REPLY_WAIT.min(self.cfg.request_timeout / 2);
        let messages = match tokio::time::timeout(wait, replies).await {
            Ok(Ok(messages)) => messages,
            // Timed out, or the runtime dropped the request unanswered.
            Ok(Err(_)) | Err(_) => Vec::new(),
        };
        match serde_json::to_vec(&messages) {
            Ok(body) => self.signed_answer(request, body),
            Err(err) => {
                tracing::error!(%err, "cannot encode replies to a peer message");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        }
    }

    /// Serves one upgraded stream: each client frame is checked and handed to
    /// the runtime like a posted message, and answered with exactly one frame
    /// holding the runtime's replies. A bad frame is counted and closes the
    /// stream; so does a stream silent for [`stream::SERVER_IDLE_TIMEOUT`].
    async fn serve_stream<S>(&self, mut io: S, keys: FrameKeys, peer: Option<SocketAddr>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let limit = self.cfg.max_body_bytes;
        let mut buf = FrameBuffer::default();
        let mut scratch = Vec::new();
        let (mut received, mut sent) = (0u64, 0u64);
        loop {
            loop {
                let accepted = match buf.next_frame(&keys, Direction::ToServer, received, limit) {
                    Ok(None) => break,
                    Ok(Some(payload)) => self.accept_frame(payload),
                    Err(e) => Err(match e {
                        FrameError::TooLarge(_) => Rejection::BodyTooLarge,
                        FrameError::BadMac => Rejection::BadSignature,
                    }),
                };
                received += 1;
                let replies = match accepted {
                    // Dropped unanswered by the runtime: an empty answer.
                    Ok(replies) => replies.await.unwrap_or_default(),
                    // Not queued, but the stream stays in step: answer empty.
                    Err(rejection @ Rejection::InboundFull) => {
                        self.count_refusal(rejection, peer);
                        Vec::new()
                    }
                    Err(rejection) => {
                        self.count_refusal(rejection, peer);
                        return;
                    }
                };
                let body = match serde_json::to_vec(&replies) {
                    Ok(body) => body,
                    Err(err) => {
                        tracing::error!(%err, "cannot encode replies to a peer message");
                        return;
                    }
                };
                let written = stream::write_frame(
                    &mut io,
                    &keys,
                    Direction::ToClient,
                    sent,
                    &body,
                    &mut scratch,
                )
                .await;
                if let Err(err) = written {
                    tracing::debug!(%err, ?peer, "peer stream closed while answering");
                    return;
                }
                sent += 1;
            }
            let read = tokio::time::timeout(
                stream::SERVER_IDLE_TIMEOUT,
                stream::read_more(&mut io, &mut buf),
            )
            .await;
            match read {
                Ok(Ok(n)) if n > 0 => {}
                // Closed, failed, or silent for too long.
                _ => return,
            }
        }
    }

    /// Decodes, checks and queues one stream frame's message; returns where
    /// the runtime's replies will arrive.
    fn accept_frame(
        &self,
        payload: &[u8],
    ) -> Result<oneshot::Receiver<Vec<raft::Message>>, Rejection> {
        let msg: raft::Message =
            serde_json::from_slice(payload).map_err(|_| Rejection::MalformedMessage)?;
        if !valid_node_name(&msg.from.name) || !valid_node_name(&msg.to.name) {
            return Err(Rejection::BadNodeName);
        }
        let (reply, replies) = oneshot::channel();
        self.inbound
            .try_send(Inbound {
                msg,
                reply: Some(reply),
            })
            .map_err(|err| match err {
                mpsc::error::TrySendError::Full(_) => Rejection::InboundFull,
                mpsc::error::TrySendError::Closed(_) => Rejection::InboundClosed,
            })?;
        Ok(replies)
    }

    /// Checks size, headers, cluster, clock, signature and nonce of a
    /// request signed for `scope`; returns its auth headers and body.
    async fn authenticate(
        &self,
        req: Request,
        scope: &str,
    ) -> Result<(AuthHeaders, Bytes), Rejection> {
        let (parts, body) = req.into_parts();
        if declared_length(&parts.headers).is_some_and(|n| n > self.cfg.max_body_bytes as u64) {
            return Err(Rejection::BodyTooLarge);
        }
        let auth = AuthHeaders::parse(&parts.headers)?;
        // A real peer sends its whole request within its request timeout;
        // a slow trickle only holds memory, so it gets no longer.
        let body = tokio::time::timeout(
            self.cfg.request_timeout,
            read_limited(body, self.cfg.max_body_bytes),
        )
        .await
        .map_err(|_| Rejection::BodyTimeout)??;
        let now = auth::now_ms();
        auth::verify(&self.cfg, &auth, scope, &body, now)?;
        let expiry = auth
            .timestamp_ms
            .saturating_add(self.cfg.max_clock_skew.as_millis().min(u64::MAX as u128) as u64);
        let fresh = match self.nonces.lock() {
            Ok(mut cache) => cache.insert(&auth.nonce, expiry, now),
            Err(poisoned) => poisoned.into_inner().insert(&auth.nonce, expiry, now),
        };
        if !fresh {
            return Err(Rejection::ReplayedNonce);
        }
        Ok((auth, body))
    }

    /// Answers a verified hello with our identity, signed for that request.
    fn answer_hello(&self, request: &AuthHeaders) -> Response {
        let info = self.identity.borrow().clone();
        let body = match serde_json::to_vec(&info) {
            Ok(body) => body,
            Err(err) => {
                tracing::error!(%err, "cannot encode this node's identity for hello");
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
        };
        self.signed_answer(request, body)
    }

    /// Answers 200 with the JSON `body`, signed for the request `request`.
    fn signed_answer(&self, request: &AuthHeaders, body: Vec<u8>) -> Response {
        let signed = auth::sign(&self.cfg, &auth::response_scope(&request.nonce), &body);
        let mut headers = HeaderMap::with_capacity(5);
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        signed.insert_into(&mut headers);
        (StatusCode::OK, headers, body).into_response()
    }

    /// Counts, logs (rate-limited) and answers a refusal.
    fn refuse(&self, rejection: Rejection, peer: Option<SocketAddr>) -> Response {
        self.count_refusal(rejection, peer);
        (rejection.status(), rejection.reason()).into_response()
    }

    /// Counts and logs (rate-limited) a refusal.
    fn count_refusal(&self, rejection: Rejection, peer: Option<SocketAddr>) {
        let reason = rejection.reason();
        self.metrics
            .rejected_messages
            .with_label_values(&[reason])
            .inc();
        if let Some(suppressed) = self.warn.permit(reason, Instant::now()) {
            tracing::warn!(
                reason,
                peer = ?peer,
                suppressed,
                "refused a peer request ({suppressed} more like it suppressed in the last {}s)",
                auth::WARN_INTERVAL.as_secs()
            );
        }
    }
}

/// Returns the Content-Length the client declared, if any and valid.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Reads `body`, stopping as soon as it exceeds `limit` bytes.
async fn read_limited(body: Body, limit: usize) -> Result<Bytes, Rejection> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| Rejection::BodyUnreadable)?;
        if buf.len() + chunk.len() > limit {
            return Err(Rejection::BodyTooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Returns whether `name` is a plausible member name.
pub(crate) fn valid_node_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_NODE_NAME_BYTES && !name.chars().any(char::is_control)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::auth::{sign_at, sign_headers};
    use crate::transport::testing::{config, heartbeat, response_to, start_peer, TestPeer};
    use crate::transport::TransportConfig;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SCOPE: &str = "POST /raft/v1/message";

    /// Posts `body` with `headers` to the message path; returns the status.
    async fn post(peer: &TestPeer, headers: &[(String, String)], body: Vec<u8>) -> u16 {
        let mut req = reqwest::Client::new()
            .post(peer.url(MESSAGE_PATH))
            .body(body);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        req.send().await.expect("request sent").status().as_u16()
    }

    fn json(round: u64) -> Vec<u8> {
        serde_json::to_vec(&heartbeat(round)).expect("encodes")
    }

    /// Asserts a refusal: status, exactly one count of `reason`, nothing forwarded.
    fn assert_refused(peer: &mut TestPeer, status: u16, expected: u16, reason: &str) {
        assert_eq!(status, expected, "status for {reason}");
        assert_eq!(
            peer.rejected(reason),
            1,
            "rejected_messages{{reason={reason}}}"
        );
        assert!(peer.try_next().is_none(), "nothing forwarded for {reason}");
    }

    #[tokio::test]
    async fn signed_message_is_delivered_to_inbound() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &body), body).await;
        assert_eq!(status, 204);
        assert_eq!(peer.try_next(), Some(heartbeat(1)));
    }

    /// Posts a signed `msg` that takes replies; returns status, the
    /// request's auth headers, the answer's headers and body, and how long
    /// the answer took.
    async fn post_taking_replies(
        peer: &TestPeer,
        msg: &raft::Message,
    ) -> (u16, AuthHeaders, HeaderMap, Vec<u8>, Duration) {
        post_to(peer.cfg.clone(), peer.url(MESSAGE_PATH), msg.clone()).await
    }

    /// [`post_taking_replies`] without holding the peer.
    async fn post_to(
        cfg: Arc<TransportConfig>,
        url: String,
        msg: raft::Message,
    ) -> (u16, AuthHeaders, HeaderMap, Vec<u8>, Duration) {
        let body = serde_json::to_vec(&msg).expect("encodes");
        let signed = auth::sign(&cfg, SCOPE, &body);
        let mut req = reqwest::Client::new()
            .post(url)
            .header(ACCEPT_REPLIES_HEADER, "1")
            .body(body);
        for (k, v) in signed.to_pairs() {
            req = req.header(k, v);
        }
        let started = Instant::now();
        let response = req.send().await.expect("request sent");
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let answer = response.bytes().await.expect("body read").to_vec();
        (status, signed, headers, answer, started.elapsed())
    }

    /// Checks the answer's signature for `request` and decodes the replies.
    fn verified_replies(
        peer: &TestPeer,
        request: &AuthHeaders,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Vec<raft::Message> {
        let answer = AuthHeaders::parse(headers).expect("answer is signed");
        let scope = auth::response_scope(&request.nonce);
        auth::verify(&peer.cfg, &answer, &scope, body, auth::now_ms()).expect("valid signature");
        serde_json::from_slice(body).expect("a list of messages")
    }

    #[tokio::test]
    async fn replies_of_the_node_come_back_signed_in_the_answer() {
        let mut peer = start_peer(config(1), 8).await;
        let mut seen = peer.answer_heartbeats();
        let (status, signed, headers, body, _) = post_taking_replies(&peer, &heartbeat(4)).await;
        assert_eq!(status, 200);
        assert_eq!(
            verified_replies(&peer, &signed, &headers, &body),
            vec![response_to(&heartbeat(4))]
        );
        assert_eq!(seen.recv().await, Some(heartbeat(4)));
    }

    #[tokio::test]
    async fn answer_is_an_empty_list_when_the_node_drops_the_reply_slot() {
        let mut peer = start_peer(config(1), 8).await;
        let post = post_to(peer.cfg.clone(), peer.url(MESSAGE_PATH), heartbeat(1));
        // Receives the message and drops its reply slot at once.
        let drop_reply = async { peer.inbound.recv().await.map(|i| i.reply.is_some()) };
        let ((status, signed, headers, body, took), had_slot) = tokio::join!(post, drop_reply);
        assert_eq!(had_slot, Some(true), "has a reply slot");
        assert_eq!(status, 200);
        assert!(verified_replies(&peer, &signed, &headers, &body).is_empty());
        assert!(
            took < MAX_REPLY_WAIT,
            "answered without waiting out the reply time: {took:?}"
        );
    }

    #[tokio::test]
    async fn answer_is_an_empty_list_when_the_node_does_not_reply_in_time() {
        let mut cfg = config(1);
        cfg.request_timeout = Duration::from_millis(60);
        let mut peer = start_peer(cfg, 8).await;
        let (status, signed, headers, body, took) = post_taking_replies(&peer, &heartbeat(1)).await;
        // Still queued, reply slot held: the node never answered.
        let held = peer.inbound.try_recv().expect("message queued");
        assert_eq!(status, 200);
        assert!(verified_replies(&peer, &signed, &headers, &body).is_empty());
        assert!(
            took >= Duration::from_millis(30) && took < Duration::from_millis(500),
            "waited half the request timeout, took {took:?}"
        );
        assert!(
            held.reply.is_some_and(|r| r.is_closed()),
            "the server stopped waiting"
        );
    }

    #[tokio::test]
    async fn message_without_accept_replies_is_answered_204_with_no_reply_slot() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &body), body).await;
        assert_eq!(status, 204);
        let inbound = peer.inbound.try_recv().expect("forwarded");
        assert_eq!(inbound.msg, heartbeat(1));
        assert!(inbound.reply.is_none());
    }

    #[test]
    fn signing_scopes_match_method_and_path() {
        assert_eq!(MESSAGE_SCOPE, format!("POST {MESSAGE_PATH}"));
        assert_eq!(HELLO_SCOPE, format!("POST {HELLO_PATH}"));
    }

    #[tokio::test]
    async fn request_without_auth_headers_is_refused_with_401() {
        let mut peer = start_peer(config(1), 8).await;
        let status = post(&peer, &[], json(1)).await;
        assert_refused(&mut peer, status, 401, "missing_auth");
    }

    #[tokio::test]
    async fn request_with_malformed_auth_headers_is_refused_with_401() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let mut headers = sign_headers(&peer.cfg, SCOPE, &body);
        headers.retain(|(k, _)| k != auth::NONCE_HEADER);
        let status = post(&peer, &headers, body).await;
        assert_refused(&mut peer, status, 401, "malformed_auth");
    }

    #[tokio::test]
    async fn tampered_body_is_refused_with_401() {
        let mut peer = start_peer(config(1), 8).await;
        let headers = sign_headers(&peer.cfg, SCOPE, &json(1));
        let status = post(&peer, &headers, json(2)).await;
        assert_refused(&mut peer, status, 401, "bad_signature");
    }

    #[tokio::test]
    async fn request_signed_with_another_secret_is_refused_with_401() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let status = post(&peer, &sign_headers(&config(2), SCOPE, &body), body).await;
        assert_refused(&mut peer, status, 401, "bad_signature");
    }

    #[tokio::test]
    async fn request_for_another_cluster_is_refused_with_403() {
        let mut peer = start_peer(config(1), 8).await;
        let foreign = TransportConfig::new("other", vec![1; 32]);
        let body = json(1);
        let status = post(&peer, &sign_headers(&foreign, SCOPE, &body), body).await;
        assert_refused(&mut peer, status, 403, "foreign_cluster");
    }

    #[tokio::test]
    async fn request_with_stale_timestamp_is_refused_with_401() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let old = auth::now_ms() - 31_000;
        let headers = sign_at(&peer.cfg, SCOPE, &body, old, &auth::new_nonce()).to_pairs();
        let status = post(&peer, &headers, body).await;
        assert_refused(&mut peer, status, 401, "stale_timestamp");
    }

    #[tokio::test]
    async fn replayed_request_is_refused_with_409() {
        let mut peer = start_peer(config(1), 8).await;
        let body = json(1);
        let headers = sign_headers(&peer.cfg, SCOPE, &body);
        assert_eq!(post(&peer, &headers, body.clone()).await, 204);
        assert_eq!(peer.try_next(), Some(heartbeat(1)));
        let status = post(&peer, &headers, body).await;
        assert_refused(&mut peer, status, 409, "replayed_nonce");
    }

    #[tokio::test]
    async fn oversized_body_is_refused_with_413() {
        let mut cfg = config(1);
        cfg.max_body_bytes = 1024;
        let mut peer = start_peer(cfg, 8).await;
        let body = vec![b' '; 2048];
        let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &body), body).await;
        assert_refused(&mut peer, status, 413, "body_too_large");
    }

    #[tokio::test]
    async fn huge_declared_body_is_refused_before_it_is_sent() {
        let mut peer = start_peer(config(1), 8).await;
        let headers = sign_headers(&peer.cfg, SCOPE, b"");
        let mut head = format!(
            "POST {MESSAGE_PATH} HTTP/1.1\r\nhost: {}\r\ncontent-length: 1000000000\r\n",
            peer.addr
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut tcp = tokio::net::TcpStream::connect(peer.addr)
            .await
            .expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write head");
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut answer))
            .await
            .expect("answered without waiting for the body")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert_refused(&mut peer, 413, 413, "body_too_large");
    }

    #[tokio::test]
    async fn chunked_body_over_the_limit_is_refused_with_413() {
        let mut cfg = config(1);
        cfg.max_body_bytes = 1024;
        let mut peer = start_peer(cfg, 8).await;
        let headers = sign_headers(&peer.cfg, SCOPE, b"");
        let mut head = format!(
            "POST {MESSAGE_PATH} HTTP/1.1\r\nhost: {}\r\ntransfer-encoding: chunked\r\n",
            peer.addr
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut tcp = tokio::net::TcpStream::connect(peer.addr)
            .await
            .expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write head");
        // Two 800-byte chunks and no terminating chunk: the server must stop early.
        let chunk = format!("320\r\n{}\r\n", " ".repeat(800));
        tcp.write_all(chunk.as_bytes()).await.expect("chunk 1");
        tcp.write_all(chunk.as_bytes()).await.expect("chunk 2");
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut answer))
            .await
            .expect("answered before the body ended")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        assert_refused(&mut peer, 413, 413, "body_too_large");
    }

    #[tokio::test]
    async fn body_that_never_arrives_is_refused_with_408() {
        let mut cfg = config(1);
        cfg.request_timeout = Duration::from_millis(100);
        let mut peer = start_peer(cfg, 8).await;
        let mut head = format!(
            "POST {MESSAGE_PATH} HTTP/1.1\r\nhost: {}\r\ncontent-length: 100\r\n",
            peer.addr
        );
        for (k, v) in sign_headers(&peer.cfg, SCOPE, b"") {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let mut tcp = tokio::net::TcpStream::connect(peer.addr)
            .await
            .expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write head");
        let mut answer = vec![0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut answer))
            .await
            .expect("answered after the body timeout")
            .expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]).to_string();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert_refused(&mut peer, 408, 408, "body_timeout");
    }

    #[tokio::test]
    async fn malformed_json_is_refused_with_400() {
        let mut peer = start_peer(config(1), 8).await;
        let body = b"{\"from\": ".to_vec();
        let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &body), body).await;
        assert_refused(&mut peer, status, 400, "malformed_message");
    }

    #[tokio::test]
    async fn message_with_empty_or_overlong_node_name_is_refused_with_400() {
        // An empty name is not even a node id ("name#incarnation") in JSON.
        for (name, reason) in [
            (String::new(), "malformed_message"),
            ("x".repeat(MAX_NODE_NAME_BYTES + 1), "bad_node_name"),
            ("a\nb".to_string(), "bad_node_name"),
        ] {
            let mut peer = start_peer(config(1), 8).await;
            let mut msg = heartbeat(1);
            msg.to.name = name;
            let body = serde_json::to_vec(&msg).expect("encodes");
            let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &body), body).await;
            assert_refused(&mut peer, status, 400, reason);
        }
    }

    #[tokio::test]
    async fn full_inbound_channel_answers_503() {
        let mut peer = start_peer(config(1), 1).await;
        let first = json(1);
        assert_eq!(
            post(&peer, &sign_headers(&peer.cfg, SCOPE, &first), first).await,
            204
        );
        let second = json(2);
        let status = post(&peer, &sign_headers(&peer.cfg, SCOPE, &second), second).await;
        assert_eq!(status, 503);
        assert_eq!(peer.rejected("inbound_full"), 1);
        assert_eq!(peer.try_next(), Some(heartbeat(1)));
        assert!(
            peer.try_next().is_none(),
            "the refused message is not queued"
        );
    }

    #[tokio::test]
    async fn hello_signed_with_another_secret_is_refused_with_401() {
        let peer = start_peer(config(1), 8).await;
        let mut req = reqwest::Client::new().post(peer.url(HELLO_PATH));
        for (k, v) in sign_headers(&config(2), "POST /raft/v1/hello", b"") {
            req = req.header(k, v);
        }
        let response = req.send().await.expect("request sent");
        assert_eq!(response.status().as_u16(), 401);
        assert!(response.headers().get(auth::SIGNATURE_HEADER).is_none());
        assert_eq!(peer.rejected("bad_signature"), 1);
    }

    #[tokio::test]
    async fn message_signature_does_not_authorize_hello() {
        let peer = start_peer(config(1), 8).await;
        let mut req = reqwest::Client::new().post(peer.url(HELLO_PATH));
        for (k, v) in sign_headers(&peer.cfg, SCOPE, b"") {
            req = req.header(k, v);
        }
        let status = req.send().await.expect("request sent").status().as_u16();
        assert_eq!(status, 401);
        assert_eq!(peer.rejected("bad_signature"), 1);
    }

    #[test]
    fn every_rejection_has_a_distinct_reason_and_an_error_status() {
        let all = [
            Rejection::BodyTooLarge,
            Rejection::BodyUnreadable,
            Rejection::BodyTimeout,
            Rejection::MissingAuth,
            Rejection::MalformedAuth,
            Rejection::BadSignature,
            Rejection::ForeignCluster,
            Rejection::StaleTimestamp,
            Rejection::ReplayedNonce,
            Rejection::MalformedMessage,
            Rejection::BadNodeName,
            Rejection::InboundFull,
            Rejection::InboundClosed,
        ];
        let reasons: std::collections::HashSet<_> = all.iter().map(|r| r.reason()).collect();
        assert_eq!(reasons.len(), all.len());
        for r in all {
            assert!(
                r.status().is_client_error() || r.status().is_server_error(),
                "{r:?}"
            );
        }
    }
}
