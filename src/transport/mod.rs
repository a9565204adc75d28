//! Peer transport: Raft messages as signed HTTP/JSON on the peer port (4041).
//!
//! ```text
//!   runtime ── PeerClient::send(addr, msg) ──► per-peer queue (bounded, drops when full)
//!                                                   │ one sender task per address,
//!                                                   │ keep-alive HTTP/1.1, TCP_NODELAY
//!                                                   ▼
//!                          POST /raft/v1/message  (JSON raft::Message, HMAC-signed)
//!                                                   │
//!   peer's router ── size limit ─► auth headers ─► cluster id ─► clock skew ─► HMAC
//!                                ─► nonce (replay) ─► JSON + name checks ─► inbound channel ─► runtime
//!                    any refusal: 4xx/503, rejected_messages{reason}++, rate-limited warn,
//!                    and nothing is forwarded
//!                                                   │ Inbound { msg, reply }: the runtime puts its
//!                                                   ▼ messages to the sender in `reply` (≤ 100 ms)
//!                          200 [raft::Message, ..]  (signed for the request's nonce)
//!                                                   │ checked by the sender task
//!   runtime ◄── replies channel (Inbound { reply: None }) ◄──┘
//!
//!   PeerClient::hello(addr) ── POST /raft/v1/hello ──► signed PeerInfo (the peer's identity)
//! ```
//!
//! Authentication is described in [`auth`]: HMAC-SHA256 with the shared
//! secret over cluster id, timestamp, nonce, method and path, and body.

pub mod auth;
pub mod client;
pub mod server;
pub mod stream;
#[cfg(test)]
pub(crate) mod testing;

pub use self::auth::{sign_headers, AuthHeaders};
pub use self::client::PeerClient;
pub use self::server::router_with_streams;
pub use self::server::{router, serve, Inbound, ACCEPT_REPLIES_HEADER, HELLO_PATH, MESSAGE_PATH};
pub use self::stream::{AcceptedStream, StreamClosed, STREAM_PATH, STREAM_PROTOCOL};

use crate::raft;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Shortest accepted shared secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest accepted cluster id, in bytes (a DNS name's length).
pub const MAX_CLUSTER_ID_BYTES: usize = 253;
/// Default time limit of one peer request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Default largest accepted request body, in bytes (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default largest accepted difference between a request's timestamp and
/// the receiver's clock.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(30);

/// Settings shared by the peer server and client. Check with
/// [`TransportConfig::validate`] before use.
#[derive(Clone)]
pub struct TransportConfig {
    /// Election group; messages signed for another cluster are refused.
    pub cluster_id: String,
    /// Shared HMAC-SHA256 key, at least [`MIN_SECRET_BYTES`] bytes.
    pub secret: Vec<u8>,
    /// Time limit of one peer request, connecting included.
    pub request_timeout: Duration,
    /// Largest accepted request (and hello response) body, in bytes.
    pub max_body_bytes: usize,
    /// Largest accepted |receiver's clock − request timestamp|; also how
    /// long nonces are remembered.
    pub max_clock_skew: Duration,
}

impl TransportConfig {
    /// Creates a configuration with the default timeout, body limit and skew.
    pub fn new(cluster_id: impl Into<String>, secret: Vec<u8>) -> TransportConfig {
        TransportConfig {
            cluster_id: cluster_id.into(),
            secret,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }

    /// Checks that the secret is long enough, the cluster id is a short
    /// token of `[A-Za-z0-9._-]`, and every limit is positive.
    pub fn validate(&self) -> Result<(), TransportError> {
        let invalid = |what: String| Err(TransportError::InvalidConfig(what));
        if self.secret.len() < MIN_SECRET_BYTES {
            return invalid(format!(
                "the peer secret has {} bytes, it needs at least {MIN_SECRET_BYTES}; \
                 put a longer random value in --secret-file or RAFT_ELECTOR_SECRET",
                self.secret.len()
            ));
        }
        let id_ok = !self.cluster_id.is_empty()
            && self.cluster_id.len() <= MAX_CLUSTER_ID_BYTES
            && self
                .cluster_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !id_ok {
            return invalid(format!(
                "cluster id {:?} must be 1 to {MAX_CLUSTER_ID_BYTES} characters of \
                 letters, digits, '.', '_' or '-'; fix --cluster-id",
                self.cluster_id
            ));
        }
        if self.request_timeout.is_zero() {
            return invalid("the peer request timeout must be positive".to_string());
        }
        if self.max_body_bytes == 0 {
            return invalid("the peer body limit must be positive".to_string());
        }
        if self.max_clock_skew.is_zero() {
            return invalid("the allowed clock skew must be positive".to_string());
        }
        Ok(())
    }
}

impl std::fmt::Debug for TransportConfig {
    /// Formats the configuration without the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportConfig")
            .field("cluster_id", &self.cluster_id)
            .field("secret", &format_args!("<{} bytes>", self.secret.len()))
            .field("request_timeout", &self.request_timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_clock_skew", &self.max_clock_skew)
            .finish()
    }
}

/// Identity a node tells peers about itself (answer to hello).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Election group the node belongs to.
    pub cluster_id: String,
    /// The node's identity, with its incarnation.
    pub id: raft::NodeId,
    /// Address peers reach the node at (`host:port`).
    pub address: String,
    /// Whether the node is in a cluster configuration.
    pub joined: bool,
    /// The node's current term.
    pub term: u64,
    /// The leader the node knows of in `term`.
    pub leader: Option<raft::NodeId>,
    /// Whether the node is shutting down; it must not be added again.
    #[serde(default)]
    pub leaving: bool,
    /// The first configuration the node promised to bootstrap with (local
    /// bootstrap agreement, `runtime::bootstrap`); reported only once persisted.
    #[serde(default)]
    pub bootstrap_lock: Option<raft::Configuration>,
}

/// Cause of a connection or request failure (an I/O, hyper or reqwest error).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Failures of the peer client, and invalid transport settings.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A setting is out of range; the message says which and how to fix it.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(String),
    /// The HTTP client could not be created.
    #[error("cannot create the peer HTTP client: {0}")]
    ClientBuild(#[source] reqwest::Error),
    /// `PeerClient::new` was called outside a tokio runtime.
    #[error("the peer client needs a tokio runtime; create it from inside one")]
    NoRuntime,
    /// The peer address is not `host:port`.
    #[error("peer address {addr:?} is not host:port")]
    InvalidAddress { addr: String },
    /// The peer did not answer within the request timeout.
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// No connection could be made.
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: BoxError,
    },
    /// The request failed after connecting.
    #[error("request to peer {addr} failed: {source}")]
    Request {
        addr: String,
        #[source]
        source: BoxError,
    },
    /// The peer refused the request (check that both sides use the same
    /// secret, cluster id and roughly the same clock).
    #[error(
        "peer {addr} refused the request with HTTP {status} ({reason}); \
         check that both use the same secret and cluster id and that clocks agree"
    )]
    Rejected {
        addr: String,
        status: u16,
        reason: String,
    },
    /// The peer's answer is not what the protocol says.
    #[error("peer {addr} sent an invalid answer: {reason}")]
    BadResponse { addr: String, reason: String },
    /// The peer's answer is not signed with our secret.
    #[error("peer {addr} answered without a valid signature; it uses another secret")]
    BadSignature { addr: String },
    /// The peer belongs to another election group.
    #[error("peer {addr} belongs to cluster {cluster:?}, not ours")]
    ForeignCluster { addr: String, cluster: String },
    /// The peer's answer is signed at a time too far from our clock.
    #[error("peer {addr} answered with a timestamp outside the allowed clock skew; check NTP")]
    StaleResponse { addr: String },
    /// The per-peer queue was full and the message was dropped.
    #[error("queue for peer {addr} is full; message dropped")]
    QueueFull { addr: String },
    /// The message waited in the queue longer than the request timeout.
    #[error("message for peer {addr} waited too long in the queue; dropped")]
    Expired { addr: String },
    /// A peer's reply was dropped because the runtime's queue was full.
    #[error("runtime queue is full; a reply from peer {addr} was dropped")]
    ReplyDropped { addr: String },
    /// The message could not be encoded as JSON.
    #[error("cannot encode a peer message: {0}")]
    Encode(#[source] serde_json::Error),
}

impl TransportError {
    /// Returns a stable snake_case label for `peer_rpc_errors{reason}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TransportError::InvalidConfig(_) => "invalid_config",
            TransportError::ClientBuild(_) => "client_build",
            TransportError::NoRuntime => "no_runtime",
            TransportError::InvalidAddress { .. } => "invalid_address",
            TransportError::Timeout { .. } => "timeout",
            TransportError::Connect { .. } => "connect",
            TransportError::Request { .. } => "request",
            TransportError::Rejected { .. } => "rejected",
            TransportError::BadResponse { .. } => "bad_response",
            TransportError::BadSignature { .. } => "bad_signature",
            TransportError::ForeignCluster { .. } => "foreign_cluster",
            TransportError::StaleResponse { .. } => "stale_response",
            TransportError::QueueFull { .. } => "queue_full",
            TransportError::Expired { .. } => "expired",
            TransportError::ReplyDropped { .. } => "reply_dropped",
            TransportError::Encode(_) => "encode",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_secret_is_refused_with_advice() {
        let err = TransportConfig::new("prod", b"short".to_vec())
            .validate()
            .expect_err("5-byte secret");
        assert!(err.to_string().contains("at least 16"), "{err}");
    }

    #[test]
    fn cluster_id_must_be_a_plain_token() {
        for bad in ["", "a b", "a\nb", &"x".repeat(254)] {
            let cfg = TransportConfig::new(bad, vec![7; 32]);
            assert!(cfg.validate().is_err(), "{bad:?}");
        }
        assert!(TransportConfig::new("prod-eu.1_a", vec![7; 32])
            .validate()
            .is_ok());
    }

    #[test]
    fn zero_limits_are_refused() {
        let mut cfg = TransportConfig::new("prod", vec![7; 32]);
        cfg.request_timeout = Duration::ZERO;
        assert!(cfg.validate().is_err());
        let mut cfg = TransportConfig::new("prod", vec![7; 32]);
        cfg.max_body_bytes = 0;
        assert!(cfg.validate().is_err());
        let mut cfg = TransportConfig::new("prod", vec![7; 32]);
        cfg.max_clock_skew = Duration::ZERO;
        assert!(cfg.validate().is_err());
    }

    #[test]
    fn debug_output_hides_the_secret() {
        let cfg = TransportConfig::new("prod", b"supersecretvalue!".to_vec());
        let text = format!("{cfg:?}");
        assert!(!text.contains("supersecret"), "{text}");
        assert!(text.contains("17 bytes"), "{text}");
    }
}
