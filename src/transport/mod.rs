//! Peer transport: one long-lived, authenticated TCP connection per peer
//! pair on the peer port (4041), carrying every message kind.
//!
//! ```text
//!   node ── Transport::send(to, addr, msg) ──► connection to `to` (dialed on demand)
//!                                                │ sender's task: Frame ─► JSON ─► Noise ─► length-delimited ─► socket
//!                                                ▼
//!   peer's listener ── cap on handshaking connections ─► 2 s deadline ─► Noise NNpsk0
//!                    ─► first frame: the dialer's identity (cluster, NodeId) ─► authenticated
//!                      any refusal: closed, peer_connections_refused_total{reason}++,
//!                      rate-limited warn, nothing forwarded
//!                                                │ reader task: frames in order
//!                                                ▼
//!   node ◄── Inbound::Message / Inbound::ConnectionLost ◄──┘  (answers travel back the same way)
//!
//!   Transport::hello(addr) ── Hello ──► Identity(PeerInfo): who is at `addr` now
//! ```
//!
//! - [`noise`]: the handshake and per-frame encryption (why it is safe).
//! - [`wire`]: the frames and their encoding.
//! - [`connection`]: establishing a connection, its reader and its write side.
//! - [`peers`]: the registry of connections, the listener and its bounds.
//! - [`quiet`]: at idle, heartbeats and their answers wake nobody.
//!
//! **One connection per pair.** Whoever needs to send first dials. When both
//! dial at once, each side ends up with two authenticated connections to the
//! same peer; both keep the one *dialed by the lower [`NodeId`]* and close the
//! other with a goodbye after what was queued on it (nothing is lost, both
//! decide alike without a further message). A single full-duplex connection
//! means a peer's answers and its own requests share one ordered stream, and
//! a crash shows as one connection ending without a goodbye.
//!
//! **Deliberate vs. unexpected ends.** A node closing on purpose (shutdown,
//! the losing side of a double dial) sends [`wire::Frame::Goodbye`] first.
//! An authenticated connection that ends any other way (EOF, reset, the
//! kernel's `TCP_USER_TIMEOUT`) is reported to the node as
//! [`Inbound::ConnectionLost`].

pub mod connection;
pub mod noise;
pub mod peers;
pub mod quiet;
pub mod wire;

pub use self::peers::Transport;

use crate::raft::{self, Message, NodeId};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Shortest accepted shared secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;
/// Longest accepted cluster id, in bytes (a DNS name's length).
pub const MAX_CLUSTER_ID_BYTES: usize = 253;
/// Default time limit of a dial (TCP connect and handshake) and of a hello.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// Default largest frame, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: usize = 1024 * 1024;
/// Default time an accepted connection has to finish the handshake and
/// authenticate its identity.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default most accepted connections still in their handshake; more are
/// closed at once.
pub const DEFAULT_MAX_HANDSHAKING: usize = 64;
/// Default most authenticated connections (a cluster has a few members).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Settings of the peer transport. Check with [`TransportConfig::validate`]
/// before use.
#[derive(Clone)]
pub struct TransportConfig {
    /// Election group; mixed into the handshake key, so another group's
    /// nodes cannot connect at all.
    pub cluster_id: String,
    /// Shared secret, at least [`MIN_SECRET_BYTES`] bytes.
    pub secret: Vec<u8>,
    /// Time limit of a dial (connect + handshake) and of a hello.
    pub request_timeout: Duration,
    /// Largest frame, in bytes, either way.
    pub max_frame_bytes: usize,
    /// Deadline of an accepted connection's handshake and identity.
    pub handshake_timeout: Duration,
    /// Most accepted connections in their handshake at once.
    pub max_handshaking: usize,
    /// Most authenticated connections at once.
    pub max_connections: usize,
}

impl TransportConfig {
    /// Creates a configuration with the default limits.
    pub fn new(cluster_id: impl Into<String>, secret: Vec<u8>) -> TransportConfig {
        TransportConfig {
            cluster_id: cluster_id.into(),
            secret,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_handshaking: DEFAULT_MAX_HANDSHAKING,
            max_connections: DEFAULT_MAX_CONNECTIONS,
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
        if self.request_timeout.is_zero() || self.handshake_timeout.is_zero() {
            return invalid("the peer request and handshake timeouts must be positive".into());
        }
        if self.max_frame_bytes < wire::MIN_FRAME_BYTES {
            return invalid(format!(
                "the peer frame limit must be at least {} bytes",
                wire::MIN_FRAME_BYTES
            ));
        }
        if self.max_handshaking == 0 || self.max_connections == 0 {
            return invalid("the peer connection caps must be positive".into());
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
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_handshaking", &self.max_handshaking)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Identity a node tells peers about itself: the first frame each side
/// sends on a connection, and the answer to hello. Carried whole (serde),
/// so fields added here travel without transport changes.
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

/// What the transport hands the node.
#[derive(Debug)]
pub enum Inbound {
    /// A Raft message from an authenticated peer whose `from` matches the
    /// connection's identity.
    Message(Message),
    /// An authenticated connection to `peer` ended without a goodbye: the
    /// peer crashed, or the network between us failed.
    ConnectionLost { peer: NodeId },
}

/// Where the node sends Raft messages; [`Transport`] in production, a
/// recorder in tests.
pub trait SendToPeer: Send {
    /// Queues `msg` for `msg.to`, on its connection if there is one, else on
    /// a new one dialed to `address`. Never blocks; a message that cannot be
    /// queued is dropped and counted (Raft tolerates loss).
    fn send(&self, address: Option<&str>, msg: Message);

    /// Says whether answers may wait for this node's next heartbeat round
    /// instead of waking it as they arrive ([`quiet`]: the node's promises
    /// are in `runtime::node`, "Quiet rounds").
    fn set_quiet(&self, _quiet: bool) {}
}

/// Failures of a connection, a dial or a hello, and invalid settings.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A setting is out of range; the message says which and how to fix it.
    #[error("invalid transport configuration: {0}")]
    InvalidConfig(String),
    /// The peer did not answer within the time limit.
    #[error("peer {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    /// No TCP connection could be made.
    #[error("cannot connect to peer {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("peer connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed the connection before the exchange finished.
    #[error("the peer closed the connection")]
    Closed,
    /// The Noise handshake or a frame's decryption failed: the other side
    /// uses another secret or cluster id, or the bytes were tampered with.
    #[error(
        "peer authentication failed ({0}); check that both use the same secret and cluster id"
    )]
    Crypto(#[from] snow::Error),
    /// A decrypted frame is not a valid frame.
    #[error("malformed peer frame: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The peer's identity is not acceptable (other cluster, ourselves, or
    /// not the first frame).
    #[error("peer identity refused: {0}")]
    Identity(String),
    /// Too many connections.
    #[error("too many peer connections")]
    TooMany,
}

impl TransportError {
    /// Returns a stable snake_case label for the refusal and error metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            TransportError::InvalidConfig(_) => "invalid_config",
            TransportError::Timeout { .. } => "timeout",
            TransportError::Connect { .. } => "connect",
            TransportError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                "frame_too_large"
            }
            TransportError::Io(_) => "io",
            TransportError::Closed => "closed",
            TransportError::Crypto(_) => "bad_handshake",
            TransportError::Malformed(_) => "malformed_frame",
            TransportError::Identity(_) => "bad_identity",
            TransportError::TooMany => "too_many_connections",
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
        let base = TransportConfig::new("prod", vec![7; 32]);
        let mut cfg = base.clone();
        cfg.request_timeout = Duration::ZERO;
        assert!(cfg.validate().is_err());
        let mut cfg = base.clone();
        cfg.handshake_timeout = Duration::ZERO;
        assert!(cfg.validate().is_err());
        let mut cfg = base.clone();
        cfg.max_frame_bytes = 10;
        assert!(cfg.validate().is_err());
        let mut cfg = base;
        cfg.max_handshaking = 0;
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
