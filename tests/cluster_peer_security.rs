//! The peer port of a running node refuses every kind of bad message with a
//! 4xx, counts it in `/metrics`, and keeps the cluster's term and leader.

mod support;

use raft_elector::raft::{Message, MessageBody, NodeId, Term};
use raft_elector::transport::auth::sign_at;
use raft_elector::transport::{sign_headers, TransportConfig, MESSAGE_PATH};
use std::time::Duration;
use support::cluster::{http_client, Cluster, ClusterConfig, CLUSTER_ID, SECRET};

/// The scope every message request is signed for.
const SCOPE: &str = "POST /raft/v1/message";
/// One byte more than the peer server's body limit (1 MiB).
const OVERSIZED: usize = 1024 * 1024 + 1;

/// Parses `name#hexincarnation` as the API shows node ids.
fn node_id(text: &str) -> NodeId {
    let (name, incarnation) = text.split_once('#').expect("node id is name#incarnation");
    NodeId::new(
        name,
        u64::from_str_radix(incarnation, 16).expect("hex incarnation"),
    )
}

/// A well-formed message that changes nothing: a stale-term pre-vote
/// answer from a stranger.
fn harmless_message(to: NodeId) -> Vec<u8> {
    let msg = Message {
        from: NodeId::new("intruder", 7),
        to,
        term: Term(0),
        body: MessageBody::PreVoteResponse { granted: false },
    };
    serde_json::to_vec(&msg).expect("encode a message")
}

/// Posts `body` with `headers` to the message path; returns the status.
async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
) -> u16 {
    let mut request = client
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    request
        .send()
        .await
        .expect("peer port answers")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peer_messages_are_refused_counted_and_change_nothing() {
    let mut cluster = Cluster::start(3, ClusterConfig::default()).await;
    let leader = cluster
        .wait_for_single_leader(Duration::from_secs(10))
        .await;
    let before = cluster.status(leader).await.expect("leader answers");
    let url = format!(
        "http://{}{MESSAGE_PATH}",
        cluster.node(leader).placement.peer
    );
    let client = http_client(Duration::from_secs(2));
    let ours = TransportConfig::new(CLUSTER_ID, SECRET.as_bytes().to_vec());
    let body = harmless_message(node_id(&before.node_id));

    let unsigned = post(&client, &url, &[], body.clone()).await;
    let wrong_secret =
        TransportConfig::new(CLUSTER_ID, b"another-secret-of-32-bytes-long!".to_vec());
    let bad_signature = post(
        &client,
        &url,
        &sign_headers(&wrong_secret, SCOPE, &body),
        body.clone(),
    )
    .await;
    let foreign = TransportConfig::new("other-cluster", SECRET.as_bytes().to_vec());
    let foreign_cluster = post(
        &client,
        &url,
        &sign_headers(&foreign, SCOPE, &body),
        body.clone(),
    )
    .await;
    let signed = sign_headers(&ours, SCOPE, &body);
    let original = post(&client, &url, &signed, body.clone()).await;
    let replay = post(&client, &url, &signed, body.clone()).await;
    let big = vec![b' '; OVERSIZED];
    // The server refuses on Content-Length and may close before the client
    // finished writing the body: a reset connection is a refusal too.
    let oversized = {
        let headers = sign_headers(&ours, SCOPE, &big);
        let mut request = client.post(&url).body(big);
        for (name, value) in &headers {
            request = request.header(name.as_str(), value.as_str());
        }
        match request.send().await {
            Ok(answer) => answer.status().as_u16(),
            Err(e) if e.is_request() => 413,
            Err(e) => panic!("oversized request failed oddly: {e}"),
        }
    };
    let junk = b"{\"from\": \"not a message\"".to_vec();
    let malformed = post(&client, &url, &sign_headers(&ours, SCOPE, &junk), junk).await;
    let stale_headers = sign_at(
        &ours,
        SCOPE,
        &body,
        1_000,
        "00112233445566778899aabbccddeeff",
    )
    .to_pairs();
    let stale = post(&client, &url, &stale_headers, body.clone()).await;

    assert_eq!(original, 204, "the well-formed original is accepted");
    let refusals = [
        ("missing_auth", unsigned, 401),
        ("bad_signature", bad_signature, 401),
        ("foreign_cluster", foreign_cluster, 403),
        ("replayed_nonce", replay, 409),
        ("body_too_large", oversized, 413),
        ("malformed_message", malformed, 400),
        ("stale_timestamp", stale, 401),
    ];
    for (reason, status, expected) in refusals {
        assert_eq!(status, expected, "{reason}");
        let series = format!("raft_elector_rejected_messages_total{{reason=\"{reason}\"}}");
        assert_eq!(cluster.metric(leader, &series).await, Some(1.0), "{series}");
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
