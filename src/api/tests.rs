//! Tests of the router, driven in-process (no sockets) with a paused clock
//! except where a real listener is the point.

use super::*;
use crate::raft::Role;
use axum::body::{to_bytes, Body, BodyDataStream};
use axum::http::{Method, Request};
use futures::StreamExt;
use std::time::Duration;
use tower::ServiceExt;

const BODY_LIMIT: usize = 1 << 20;

fn follower(term: u64, leader: Option<&str>) -> LeaderState {
    let mut s = LeaderState::initial("node-a#7".into(), "node-a".into());
    s.term = term;
    s.leader = leader.map(str::to_string);
    s.leader_id = leader.map(|l| format!("{l}#1"));
    s.leader_address = leader.map(|l| format!("{l}:4041"));
    s.joined = true;
    s.is_voter = true;
    s.voters = 3;
    s.learners = 1;
    s
}

fn leading(term: u64, lease: Duration) -> LeaderState {
    let mut s = follower(term, Some("node-a"));
    s.role = Role::Leader;
    s.lease_until = Some(Instant::now() + lease);
    s
}

fn app(state: LeaderState) -> (watch::Sender<LeaderState>, Router, Metrics) {
    let (tx, rx) = watch::channel(state);
    let metrics = Metrics::new();
    (tx, router(rx, metrics.clone()), metrics)
}

async fn get_path(router: &Router, uri: &str) -> Response {
    let request = Request::builder()
        .uri(uri)
        .body(Body::empty())
        .expect("valid request");
    router.clone().oneshot(request).await.expect("infallible")
}

async fn body_text(response: Response) -> String {
    let bytes = to_bytes(response.into_body(), BODY_LIMIT)
        .await
        .expect("body reads");
    String::from_utf8(bytes.to_vec()).expect("utf-8 body")
}

async fn status_of(response: Response) -> (StatusCode, LeaderStatus) {
    let code = response.status();
    let text = body_text(response).await;
    (
        code,
        serde_json::from_str(&text).expect("LeaderStatus JSON"),
    )
}

#[tokio::test(start_paused = true)]
async fn is_leader_answers_200_with_the_full_body_while_the_lease_holds() {
    let (_tx, router, _) = app(leading(4, Duration::from_millis(140)));
    let response = get_path(&router, "/is-leader").await;
    assert_eq!(
        response.headers().get(header::CACHE_CONTROL),
        Some(&HeaderValue::from_static("no-store"))
    );
    let code = response.status();
    let json: serde_json::Value =
        serde_json::from_str(&body_text(response).await).expect("json body");
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        json,
        serde_json::json!({
            "isLeader": true, "node": "node-a", "nodeId": "node-a#7", "role": "leader",
            "leader": "node-a", "leaderId": "node-a#1", "leaderAddress": "node-a:4041",
            "term": 4, "leaseRemainingMs": 140, "voters": 3, "learners": 1,
        })
    );
}

#[tokio::test(start_paused = true)]
async fn is_leader_answers_503_once_the_lease_has_run_out() {
    let (_tx, router, _) = app(leading(4, Duration::from_millis(140)));
    tokio::time::advance(Duration::from_millis(140)).await;
    let (code, status) = status_of(get_path(&router, "/is-leader").await).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!status.is_leader);
    assert_eq!(
        (status.role.as_str(), status.lease_remaining_ms),
        ("leader", 0)
    );
}

#[tokio::test(start_paused = true)]
async fn is_leader_answers_503_on_a_follower() {
    let (_tx, router, _) = app(follower(2, Some("node-b")));
    let (code, status) = status_of(get_path(&router, "/is-leader").await).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status.leader.as_deref(), Some("node-b"));
}

#[tokio::test(start_paused = true)]
async fn answering_is_leader_does_not_touch_the_is_leader_gauge() {
    let (_tx, router, metrics) = app(leading(1, Duration::from_secs(1)));
    let (code, _) = status_of(get_path(&router, "/is-leader").await).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(metrics.is_leader.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn long_poll_returns_as_soon_as_the_term_changes() {
    let (tx, router, _) = app(follower(2, Some("node-b")));
    let start = Instant::now();
    let poll = tokio::spawn({
        let router = router.clone();
        async move { status_of(get_path(&router, "/is-leader?wait=30s").await).await }
    });
    tokio::time::sleep(Duration::from_millis(250)).await;
    tx.send_replace(follower(3, Some("node-c")));
    let (code, status) = poll.await.expect("poll task");
    assert_eq!((code, status.term), (StatusCode::SERVICE_UNAVAILABLE, 3));
    assert_eq!(status.leader.as_deref(), Some("node-c"));
    assert!(Instant::now() - start < Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn long_poll_on_a_leader_returns_503_when_the_lease_expires_unannounced() {
    let (_tx, router, _) = app(leading(5, Duration::from_millis(140)));
    let start = Instant::now();
    let (code, status) = status_of(get_path(&router, "/is-leader?wait=30s").await).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!status.is_leader);
    let waited = Instant::now() - start;
    assert!(waited >= Duration::from_millis(140) && waited < Duration::from_millis(200));
}

#[tokio::test(start_paused = true)]
async fn long_poll_returns_at_once_when_the_client_saw_an_older_answer() {
    let (_tx, router, _) = app(leading(5, Duration::from_secs(10)));
    let start = Instant::now();
    let response = get_path(&router, "/is-leader?wait=30s&term=5&isLeader=false").await;
    let (code, status) = status_of(response).await;
    assert_eq!((code, status.is_leader), (StatusCode::OK, true));
    assert_eq!(Instant::now(), start);
}

#[tokio::test(start_paused = true)]
async fn long_poll_answers_the_unchanged_state_when_the_wait_elapses() {
    let (_tx, router, _) = app(follower(2, Some("node-b")));
    let start = Instant::now();
    let response = get_path(&router, "/is-leader?wait=2&term=2&isLeader=false").await;
    let (code, status) = status_of(response).await;
    assert_eq!((code, status.term), (StatusCode::SERVICE_UNAVAILABLE, 2));
    assert_eq!(Instant::now() - start, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn long_poll_rejects_bad_parameters_with_400_and_a_reason() {
    let (_tx, router, _) = app(follower(2, None));
    for (uri, needle) in [
        ("/is-leader?wait=soon", "wait=\"soon\""),
        ("/is-leader?wait=1s&term=-3", "term=\"-3\""),
        ("/is-leader?wait=1s&isLeader=maybe", "isLeader=\"maybe\""),
        ("/is-leader?wait=1s&wait=2s", "wait"),
    ] {
        let response = get_path(&router, uri).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{uri}");
        let text = body_text(response).await;
        assert!(text.contains(needle), "{uri}: {text}");
    }
}

/// Reads the next `leader` event off an SSE body (one event per chunk).
async fn next_event(body: &mut BodyDataStream) -> LeaderStatus {
    let bytes = body.next().await.expect("stream open").expect("chunk");
    let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
    assert!(text.starts_with("event: leader\n"), "{text}");
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("data line");
    serde_json::from_str(data).expect("status JSON")
}

#[tokio::test(start_paused = true)]
async fn events_send_the_current_answer_then_each_change_including_lease_expiry() {
    let (tx, router, _) = app(follower(1, None));
    let response = get_path(&router, "/events").await;
    assert_eq!(response.status(), StatusCode::OK);
    let content_type = response.headers().get(header::CONTENT_TYPE).cloned();
    assert_eq!(
        content_type,
        Some(HeaderValue::from_static("text/event-stream"))
    );
    let mut body = response.into_body().into_data_stream();
    let first = next_event(&mut body).await;
    assert_eq!((first.term, first.is_leader), (1, false));

    let mut same_answer = follower(1, None);
    same_answer.voters = 5;
    tx.send_replace(same_answer);
    tx.send_replace(leading(2, Duration::from_millis(140)));
    let second = next_event(&mut body).await;
    assert_eq!((second.term, second.is_leader, second.voters), (2, true, 3));

    let third = next_event(&mut body).await;
    assert_eq!((third.term, third.is_leader), (2, false));
}

#[tokio::test(start_paused = true)]
async fn events_end_when_the_runtime_stops_publishing() {
    let (tx, router, _) = app(follower(1, None));
    let response = get_path(&router, "/events").await;
    let mut body = response.into_body().into_data_stream();
    assert!(body.next().await.is_some());
    drop(tx);
    assert!(body.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn leader_answers_the_known_leader_or_503_with_nulls() {
    let (tx, router, _) = app(follower(3, Some("node-b")));
    let response = get_path(&router, "/leader").await;
    assert_eq!(response.status(), StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body_text(response).await).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"leader": "node-b", "leaderId": "node-b#1", "leaderAddress": "node-b:4041", "term": 3})
    );

    tx.send_replace(follower(4, None));
    let response = get_path(&router, "/leader").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let json: serde_json::Value = serde_json::from_str(&body_text(response).await).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"leader": null, "leaderId": null, "leaderAddress": null, "term": 4})
    );
}

#[tokio::test(start_paused = true)]
async fn healthz_is_ok_and_readyz_follows_membership_and_shutdown() {
    let mut state = follower(1, None);
    state.joined = false;
    let (tx, router, _) = app(state);
    let response = get_path(&router, "/healthz").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(body_text(response).await, "ok");

    let response = get_path(&router, "/readyz").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_text(response).await.contains("not a member"));

    tx.send_modify(|s| s.joined = true);
    assert_eq!(get_path(&router, "/readyz").await.status(), StatusCode::OK);

    tx.send_modify(|s| s.shutting_down = true);
    let response = get_path(&router, "/readyz").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(body_text(response).await.contains("shutting down"));
}

#[tokio::test(start_paused = true)]
async fn metrics_are_served_in_the_prometheus_text_format() {
    let (_tx, router, metrics) = app(follower(1, None));
    metrics.term.set(9);
    let response = get_path(&router, "/metrics").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers().get(header::CONTENT_TYPE),
        Some(&HeaderValue::from_static("text/plain; version=0.0.4"))
    );
    assert!(body_text(response).await.contains("raft_elector_term 9"));
}

#[tokio::test(start_paused = true)]
async fn unknown_paths_are_404_and_wrong_methods_405() {
    let (_tx, router, _) = app(follower(1, None));
    assert_eq!(
        get_path(&router, "/nope").await.status(),
        StatusCode::NOT_FOUND
    );
    let post = Request::builder()
        .method(Method::POST)
        .uri("/is-leader")
        .body(Body::empty())
        .expect("valid request");
    let response = router.oneshot(post).await.expect("infallible");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
}

/// Serves `state` on a free loopback port with the production server;
/// dropping the returned sender stops it.
async fn serving(
    state: LeaderState,
) -> (
    std::net::SocketAddr,
    watch::Sender<LeaderState>,
    Metrics,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, router, metrics) = app(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        let _ = stop_rx.await;
    };
    tokio::spawn(serve(listener, router, metrics.clone(), stop));
    (addr, tx, metrics, stop_tx)
}

/// Reads until the server closes the connection; returns what it sent.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {within:?}"
    );
    got
}

fn refused(metrics: &Metrics, reason: &str) -> u64 {
    metrics.http_refused.with_label_values(&[reason]).get()
}

#[tokio::test]
async fn long_poll_works_over_a_real_listener() {
    let (addr, tx, _metrics, _stop) = serving(follower(1, Some("node-b"))).await;
    let url = format!("http://{addr}/is-leader?wait=5s&term=1&isLeader=false");
    let poll = tokio::spawn(async move { reqwest::get(url).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    tx.send_replace(leading(2, Duration::from_secs(5)));
    let response = poll.await.expect("poll task").expect("http ok");
    assert_eq!(response.status().as_u16(), 200);
    let status: LeaderStatus = response.json().await.expect("json");
    assert_eq!((status.term, status.is_leader), (2, true));
}

#[tokio::test]
async fn idle_and_half_sent_connections_are_closed_after_the_header_timeout() {
    use tokio::io::AsyncWriteExt;
    let (addr, _tx, _metrics, _stop) = serving(follower(1, None)).await;
    let started = Instant::now();
    let mut idle = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut half = tokio::net::TcpStream::connect(addr).await.expect("connect");
    half.write_all(b"GET /is-leader HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    // A keep-alive connection that had a request is closed once idle too.
    let mut kept = tokio::net::TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let within = serve::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    read_until_closed(&mut idle, within).await;
    read_until_closed(&mut half, within).await;
    let answered = read_until_closed(&mut kept, within).await;
    assert!(
        String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"),
        "{answered:?}"
    );
    assert!(
        started.elapsed() >= serve::HEADER_READ_TIMEOUT - Duration::from_millis(200),
        "closed after {:?}, before the timeout",
        started.elapsed()
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once_and_counted() {
    let (addr, _tx, metrics, _stop) = serving(follower(1, None)).await;
    let mut held = Vec::new();
    for _ in 0..serve::MAX_CONNECTIONS {
        held.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    // The server accepts them in its own time; the next one is past the cap
    // once every one of them holds a place.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut extra = tokio::net::TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
        if refused(&metrics, "connection_cap") > 0 {
            read_until_closed(&mut extra, Duration::from_secs(1)).await;
            break;
        }
        assert!(Instant::now() < deadline, "no connection was refused");
        held.push(extra);
    }
    drop(held);
    // Places come back as the connections close: the API answers again.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Ok(response) = reqwest::get(format!("http://{addr}/is-leader")).await {
            assert_eq!(response.status().as_u16(), 503);
            break;
        }
        assert!(Instant::now() < deadline, "the API never answered again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_head_over_the_limit_is_refused_without_buffering_it() {
    use tokio::io::AsyncWriteExt;
    let (addr, _tx, _metrics, _stop) = serving(follower(1, None)).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let big = format!(
        "GET /is-leader HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(serve::MAX_HEAD_BYTES * 2)
    );
    // The server may close before all of it is written.
    let _ = stream.write_all(big.as_bytes()).await;
    let answer = read_until_closed(&mut stream, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn waiters_past_the_cap_get_429_and_are_counted_until_places_free() {
    let (tx, router, metrics) = app(follower(1, Some("node-b")));
    let mut waiting = Vec::new();
    for i in 0..MAX_WAITERS {
        let router = router.clone();
        let uri = match i % 2 {
            0 => "/is-leader?wait=60s&term=1&isLeader=false",
            _ => "/events",
        };
        waiting.push(tokio::spawn(async move { get_path(&router, uri).await }));
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let full = get_path(&router, "/is-leader?wait=60s&term=1&isLeader=false").await;
    assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        get_path(&router, "/events").await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(refused(&metrics, "waiter_cap"), 2);
    // Questions that do not wait are answered whatever the waiters.
    assert_eq!(
        get_path(&router, "/is-leader").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    // A change answers the long-polls; dropping the streams frees theirs.
    tx.send_replace(follower(2, Some("node-c")));
    for task in waiting {
        drop(task.await.expect("waiter task"));
    }
    let again = tokio::spawn({
        let router = router.clone();
        async move { get_path(&router, "/is-leader?wait=60s&term=2&isLeader=false").await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    tx.send_replace(follower(3, Some("node-c")));
    assert_eq!(
        again.await.expect("poll task").status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(refused(&metrics, "waiter_cap"), 2);
}
