//! Test fixtures: a peer server on 127.0.0.1 and message builders.

use super::{router, serve, Inbound, PeerInfo, TransportConfig};
use crate::metrics::Metrics;
use crate::raft::{self, MessageBody, NodeId, Term};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A running peer server and what it forwards.
pub(crate) struct TestPeer {
    pub addr: SocketAddr,
    pub cfg: Arc<TransportConfig>,
    pub metrics: Metrics,
    pub inbound: mpsc::Receiver<Inbound>,
    pub identity: watch::Sender<PeerInfo>,
    _shutdown: oneshot::Sender<()>,
}

impl TestPeer {
    /// Returns `rejected_messages{reason}`.
    pub fn rejected(&self, reason: &str) -> u64 {
        self.metrics
            .rejected_messages
            .with_label_values(&[reason])
            .get()
    }

    /// Returns the URL of `path` on this peer.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Returns the next forwarded message if one is queued (its reply slot
    /// is dropped, which answers an empty list).
    pub fn try_next(&mut self) -> Option<raft::Message> {
        self.inbound.try_recv().ok().map(|inbound| inbound.msg)
    }

    /// Waits up to 2 s for the next forwarded message (see [`TestPeer::try_next`]).
    pub async fn next(&mut self) -> Option<raft::Message> {
        tokio::time::timeout(Duration::from_secs(2), self.inbound.recv())
            .await
            .ok()
            .flatten()
            .map(|inbound| inbound.msg)
    }

    /// Answers every forwarded message that has a reply slot with
    /// [`response_to`] it, from a background task; returns the messages
    /// received, in order. `inbound` is empty from then on.
    pub fn answer_heartbeats(&mut self) -> mpsc::UnboundedReceiver<raft::Message> {
        let (_, closed) = mpsc::channel(1);
        let mut inbound = std::mem::replace(&mut self.inbound, closed);
        let (seen_tx, seen) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(Inbound { msg, reply }) = inbound.recv().await {
                if let Some(reply) = reply {
                    let _ = reply.send(vec![response_to(&msg)]);
                }
                let _ = seen_tx.send(msg);
            }
        });
        seen
    }
}

/// Returns the AppendEntries response `pod-b` sends to `msg`'s sender.
pub(crate) fn response_to(msg: &raft::Message) -> raft::Message {
    let round = match msg.body {
        MessageBody::AppendEntries { round, .. } => round,
        _ => 0,
    };
    raft::Message {
        from: msg.to.clone(),
        to: msg.from.clone(),
        term: msg.term,
        body: MessageBody::AppendEntriesResponse {
            success: true,
            last_index: 3,
            round,
        },
    }
}

/// Returns a valid configuration of cluster `test` with a 32-byte secret
/// derived from `seed`.
pub(crate) fn config(seed: u8) -> TransportConfig {
    TransportConfig::new("test", vec![seed; 32])
}

/// Returns the identity a test peer advertises.
pub(crate) fn identity(cluster: &str, addr: SocketAddr) -> PeerInfo {
    PeerInfo {
        leaving: false,
        cluster_id: cluster.to_string(),
        id: NodeId::new("pod-b", 0xb),
        address: addr.to_string(),
        joined: true,
        term: 7,
        leader: Some(NodeId::new("pod-a", 0xa)),
        bootstrap_lock: None,
    }
}

/// Starts a peer server with `cfg` whose inbound channel holds `capacity`.
pub(crate) async fn start_peer(cfg: TransportConfig, capacity: usize) -> TestPeer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local addr");
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let (inbound_tx, inbound) = mpsc::channel(capacity);
    let (identity, identity_rx) = watch::channel(self::identity(&cfg.cluster_id, addr));
    let app = router(cfg.clone(), metrics.clone(), inbound_tx, identity_rx);
    let (shutdown, stop) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, async move {
        let _ = stop.await;
    }));
    TestPeer {
        addr,
        cfg,
        metrics,
        inbound,
        identity,
        _shutdown: shutdown,
    }
}

/// Returns an AppendEntries heartbeat from `pod-a` to `pod-b` tagged `round`.
pub(crate) fn heartbeat(round: u64) -> raft::Message {
    raft::Message {
        from: NodeId::new("pod-a", 0xa),
        to: NodeId::new("pod-b", 0xb),
        term: Term(7),
        body: MessageBody::AppendEntries {
            prev_log_index: 3,
            prev_log_term: Term(7),
            entries: Vec::new(),
            leader_commit: 3,
            round,
        },
    }
}

/// Polls `check` every millisecond until it holds or `within` passes.
pub(crate) async fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    check()
}
