//! The peer port of a running node refuses every kind of bad connection and
//! frame, counts it in `/metrics`, and keeps the cluster's term and leader.

mod support;

use futures::{SinkExt, StreamExt};
use raft_elector::raft::{Message, MessageBody, NodeId, Term};
use raft_elector::transport::noise::{self, Opener, Sealer};
use raft_elector::transport::wire::{codec, Frame};
use raft_elector::transport::{PeerInfo, TransportConfig};
use std::time::Duration;
use support::cluster::{Cluster, ClusterConfig, CLUSTER_ID, SECRET};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

type Conn = Framed<TcpStream, LengthDelimitedCodec>;

/// One byte more than the frame limit (1 MiB).
const OVERSIZED: usize = 1024 * 1024 + 1;

fn intruder() -> NodeId {
    NodeId::new("intruder", 7)
}

fn identity(cluster: &str) -> Frame {
    Frame::Identity(PeerInfo {
        cluster_id: cluster.to_string(),
        id: intruder(),
        address: "127.0.0.1:9".into(),
        joined: false,
        term: 0,
        leader: None,
        leaving: false,
    })
}

/// A well-formed message that changes nothing: a stale-term pre-vote
/// answer, sent as `from`.
fn harmless(from: NodeId, to: NodeId) -> Frame {
    Frame::Raft(Message {
        from,
        to,
        term: Term(0),
        body: MessageBody::PreVoteResponse { granted: false },
    })
}

async fn connect(addr: &str) -> Conn {
    let stream = TcpStream::connect(addr).await.expect("peer port accepts");
    Framed::new(stream, codec(2 * 1024 * 1024))
}

/// Handshakes with `cfg`; returns the connection and its keys.
async fn handshake(addr: &str, cfg: &TransportConfig) -> Option<(Conn, Sealer, Opener)> {
    let mut conn = connect(addr).await;
    let (sealer, opener) =
        tokio::time::timeout(Duration::from_secs(3), noise::initiate(&mut conn, cfg))
            .await
            .ok()?
            .ok()?;
    Some((conn, sealer, opener))
}

async fn send(conn: &mut Conn, sealer: &mut Sealer, frame: &Frame) {
    let sealed = sealer.seal(&frame.encode().unwrap()).unwrap();
    conn.send(sealed).await.expect("send a frame");
}

/// Waits until the node closes `conn`; returns how long that took.
async fn closed_within(conn: &mut Conn, limit: Duration) -> bool {
    let closed = async {
        loop {
            match conn.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            }
        }
    };
    tokio::time::timeout(limit, closed).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_connections_and_frames_are_refused_counted_and_change_nothing() {
    let mut cluster = Cluster::start(3, ClusterConfig::default()).await;
    let leader = cluster
        .wait_for_single_leader(Duration::from_secs(10))
        .await;
    let before = cluster.status(leader).await.expect("leader answers");
    let leader_id: NodeId = before.node_id.parse().expect("node id");
    let addr = cluster.node(leader).placement.peer.to_string();
    let ours = TransportConfig::new(CLUSTER_ID, SECRET.as_bytes().to_vec());
    let limit = Duration::from_secs(3);

    // Another secret, another cluster: the handshake fails, the node closes.
    let wrong_secret =
        TransportConfig::new(CLUSTER_ID, b"another-secret-of-32-bytes-long!".to_vec());
    let foreign = TransportConfig::new("other-cluster", SECRET.as_bytes().to_vec());
    for cfg in [&wrong_secret, &foreign] {
        assert!(
            handshake(&addr, cfg).await.is_none(),
            "{cfg:?} must not handshake"
        );
    }

    // Garbage instead of a handshake.
    let mut garbage = connect(&addr).await;
    garbage
        .send(Bytes::from_static(b"GET / HTTP/1.1\r\n\r\n"))
        .await
        .unwrap();
    assert!(closed_within(&mut garbage, limit).await, "garbage closed");

    // A length prefix larger than any handshake message.
    let mut raw = TcpStream::connect(&addr).await.unwrap();
    raw.write_all(&(OVERSIZED as u32).to_be_bytes())
        .await
        .unwrap();
    let mut raw = Framed::new(raw, codec(16));
    assert!(closed_within(&mut raw, limit).await, "oversized closed");

    // Silent after connecting: closed at the handshake deadline (2 s).
    let mut silent = connect(&addr).await;
    assert!(closed_within(&mut silent, limit).await, "silent closed");

    // Handshake right, but an identity of another cluster.
    let (mut conn, mut sealer, _) = handshake(&addr, &ours).await.expect("handshake");
    send(&mut conn, &mut sealer, &identity("other-cluster")).await;
    assert!(
        closed_within(&mut conn, limit).await,
        "foreign identity closed"
    );

    // Handshake right, but a Raft message before any identity.
    let (mut conn, mut sealer, _) = handshake(&addr, &ours).await.expect("handshake");
    send(
        &mut conn,
        &mut sealer,
        &harmless(intruder(), leader_id.clone()),
    )
    .await;
    assert!(closed_within(&mut conn, limit).await, "no identity closed");

    // Authenticated: a message in another's name is refused, the rest passes.
    let (mut conn, mut sealer, mut opener) = handshake(&addr, &ours).await.expect("handshake");
    send(&mut conn, &mut sealer, &identity(CLUSTER_ID)).await;
    let answer = conn.next().await.expect("identity answer").unwrap();
    match Frame::decode(&opener.open(&answer).unwrap()).unwrap() {
        Frame::Identity(info) => assert_eq!(info.id, leader_id),
        other => panic!("expected the leader's identity, got {other:?}"),
    }
    send(
        &mut conn,
        &mut sealer,
        &harmless(NodeId::new("someone-else", 1), leader_id.clone()),
    )
    .await;
    send(
        &mut conn,
        &mut sealer,
        &harmless(intruder(), leader_id.clone()),
    )
    .await;
    // A replayed frame (the same sealed bytes twice) closes the connection.
    let replayed = sealer.seal(&Frame::Hello.encode().unwrap()).unwrap();
    conn.send(replayed.clone()).await.unwrap();
    conn.send(replayed).await.unwrap();
    assert!(closed_within(&mut conn, limit).await, "replay closed");

    // Authenticated, then a tampered frame.
    let (mut conn, mut sealer, _) = handshake(&addr, &ours).await.expect("handshake");
    send(&mut conn, &mut sealer, &identity(CLUSTER_ID)).await;
    let mut tampered = sealer
        .seal(&Frame::Hello.encode().unwrap())
        .unwrap()
        .to_vec();
    tampered[3] ^= 0x40;
    conn.send(Bytes::from(tampered)).await.unwrap();
    assert!(closed_within(&mut conn, limit).await, "tampered closed");

    // Authenticated, then an oversized frame.
    let (mut conn, mut sealer, _) = handshake(&addr, &ours).await.expect("handshake");
    send(&mut conn, &mut sealer, &identity(CLUSTER_ID)).await;
    conn.send(Bytes::from(vec![0u8; OVERSIZED]))
        .await
        .unwrap_or(());
    assert!(
        closed_within(&mut conn, limit).await,
        "oversized frame closed"
    );

    let refused = [
        ("bad_handshake", 3.0), // wrong secret, foreign cluster, garbage
        ("frame_too_large", 1.0),
        ("handshake_timeout", 1.0),
        ("bad_identity", 2.0), // foreign identity, message first
    ];
    for (reason, count) in refused {
        let series = format!("raft_elector_peer_connections_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(
            cluster.metric(leader, &series).await,
            Some(count),
            "{series}"
        );
    }
    let rejected = [
        ("wrong_sender", 1.0),
        ("bad_frame", 2.0),
        ("frame_too_large", 1.0),
    ];
    for (reason, count) in rejected {
        let series = format!("raft_elector_rejected_messages_total{{reason=\"{reason}\"}}");
        assert_eq!(
            cluster.metric(leader, &series).await,
            Some(count),
            "{series}"
        );
    }

    // Longer than an election timeout: a disturbed cluster would have moved on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cluster.steady_leader().await, Some(leader));
    for (slot, status) in cluster.statuses().await {
        let status = status.unwrap_or_else(|| panic!("node-{slot} answers"));
        assert_eq!(status.term, before.term, "node-{slot} kept the term");
        assert_eq!(status.leader, before.leader, "node-{slot} kept the leader");
    }
}
