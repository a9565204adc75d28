//! Asking nodes `GET /is-leader`, one polling task per node so that a frozen
//! node (which accepts connections but never answers) delays nobody else.
//! The demo's live view and the tests' sampler ([`super::samples`]) both
//! poll through here, with one keep-alive HTTP/1.1 client (hyper).
//!
//! ```text
//!  Probes ──every interval, per node──► Client::ask(url) ──► Observation{node, sent, received, reply}
//!                                                                   │ mpsc
//!                                                                   ▼
//!                                                 demo Timeline / tests' Sampler
//! ```

use crate::api::LeaderStatus;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{StatusCode, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Idle keep-alive connections kept per node: one poll at a time, plus one
/// for a helper request made meanwhile.
const IDLE_PER_NODE: usize = 2;

/// One poll of one node's `GET /is-leader`.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// Index of the polled node (0-based).
    pub node: usize,
    /// When the request was sent.
    pub sent: Instant,
    /// When the answer (or the failure) arrived.
    pub received: Instant,
    /// What the node said.
    pub reply: Reply,
}

/// What a node answered to one poll.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    /// The node answered; `leading` is the HTTP verdict (200 = true, 503 = false).
    Answered {
        /// Whether the node answered 200.
        leading: bool,
        /// The JSON body.
        status: LeaderStatus,
    },
    /// The node did not answer: refused, timed out or garbled.
    NoAnswer {
        /// Why, in a few words (`connection refused`, `no answer in 250 ms`).
        reason: String,
    },
}

impl Reply {
    /// Returns whether this reply is a 200 (leader with a valid lease).
    pub fn is_leading(&self) -> bool {
        matches!(self, Reply::Answered { leading: true, .. })
    }

    /// Returns the status body, if the node answered.
    pub fn status(&self) -> Option<&LeaderStatus> {
        match self {
            Reply::Answered { status, .. } => Some(status),
            Reply::NoAnswer { .. } => None,
        }
    }
}

/// Why a request got no HTTP answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No connection: refused, unreachable or not accepted in time.
    Connect,
    /// No complete answer within the client's time limit.
    Timeout,
    /// The connection broke or the answer was not HTTP.
    Lost,
    /// The URL is not an `http://` URL.
    BadUrl,
}

/// An HTTP/1.1 client with keep-alive, no proxy and one time limit for a
/// whole request; cheap to clone (clones share the connection pool).
#[derive(Clone, Debug)]
pub struct Client {
    inner: hyper_util::client::legacy::Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

impl Client {
    /// Returns a client whose requests (connect, send, read the whole body)
    /// fail after `timeout`.
    pub fn new(timeout: Duration) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let inner = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(IDLE_PER_NODE)
            .build(connector);
        Client { inner, timeout }
    }

    /// GETs `url`; returns the status code and the whole body.
    pub async fn get(&self, url: &str) -> Result<(StatusCode, Bytes), Failure> {
        let uri: Uri = url.parse().map_err(|_| Failure::BadUrl)?;
        let request = async {
            let response = self.inner.get(uri).await.map_err(|err| {
                if err.is_connect() {
                    Failure::Connect
                } else {
                    Failure::Lost
                }
            })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|_| Failure::Lost)?;
            Ok((status, body.to_bytes()))
        };
        tokio::time::timeout(self.timeout, request)
            .await
            .unwrap_or(Err(Failure::Timeout))
    }

    /// GETs `url` and returns the body as text, `None` when it failed.
    pub async fn get_text(&self, url: &str) -> Option<(u16, String)> {
        let (status, body) = self.get(url).await.ok()?;
        let text = String::from_utf8(body.to_vec()).ok()?;
        Some((status.as_u16(), text))
    }

    /// Asks one node's `/is-leader` at `url` once; a failure becomes
    /// [`Reply::NoAnswer`] with a short reason.
    pub async fn ask(&self, url: &str) -> Reply {
        let no_answer = |reason: String| Reply::NoAnswer { reason };
        let (code, body) = match self.get(url).await {
            Ok(answer) => answer,
            Err(Failure::Timeout) => {
                return no_answer(format!("no answer in {} ms", self.timeout.as_millis()))
            }
            Err(Failure::Connect) => return no_answer("connection refused".into()),
            Err(Failure::Lost) => return no_answer("connection lost".into()),
            Err(Failure::BadUrl) => return no_answer(format!("bad URL {url}")),
        };
        if code != StatusCode::OK && code != StatusCode::SERVICE_UNAVAILABLE {
            return no_answer(format!("HTTP {code}"));
        }
        match serde_json::from_slice::<LeaderStatus>(&body) {
            Ok(status) => Reply::Answered {
                leading: code == StatusCode::OK,
                status,
            },
            Err(_) => no_answer("unreadable answer".into()),
        }
    }
}

/// The polling tasks, one per node; dropping this stops them.
#[derive(Debug)]
pub struct Probes {
    client: Client,
    interval: Duration,
    out: mpsc::Sender<Observation>,
    tasks: Vec<JoinHandle<()>>,
}

impl Probes {
    /// Starts polling every `(node, url)` of `targets` each `interval`
    /// with `client`, sending each result to `out`.
    pub fn spawn(
        client: Client,
        interval: Duration,
        targets: impl IntoIterator<Item = (usize, String)>,
        out: mpsc::Sender<Observation>,
    ) -> Probes {
        let mut probes = Probes {
            client,
            interval,
            out,
            tasks: Vec::new(),
        };
        for (node, url) in targets {
            probes.add(node, url);
        }
        probes
    }

    /// Starts polling one more node.
    pub fn add(&mut self, node: usize, url: String) {
        self.tasks.push(tokio::spawn(poll_node(
            self.client.clone(),
            self.interval,
            node,
            url,
            self.out.clone(),
        )));
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Polls one node until the receiver of `out` is gone.
async fn poll_node(
    client: Client,
    interval: Duration,
    node: usize,
    url: String,
    out: mpsc::Sender<Observation>,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let sent = Instant::now();
        let reply = client.ask(&url).await;
        let observation = Observation {
            node,
            sent,
            received: Instant::now(),
            reply,
        };
        if out.send(observation).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::{Json, Router};

    /// The demo's poll time limit, which the reasons below name.
    const TIMEOUT: Duration = Duration::from_millis(250);

    fn status(leading: bool) -> LeaderStatus {
        LeaderStatus {
            is_leader: leading,
            node: "node-1".into(),
            node_id: "node-1#1".into(),
            role: "leader".into(),
            leader: Some("node-1".into()),
            leader_id: None,
            leader_address: None,
            term: 7,
            lease_remaining_ms: 120,
            voters: 3,
            learners: 0,
        }
    }

    async fn serve(router: Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router).await });
        format!("http://{addr}/is-leader")
    }

    #[tokio::test]
    async fn a_200_is_leading_and_a_503_is_not() {
        let leading =
            serve(Router::new().route("/is-leader", get(|| async { Json(status(true)) }))).await;
        let following = serve(Router::new().route(
            "/is-leader",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, Json(status(false))) }),
        ))
        .await;
        let client = Client::new(TIMEOUT);
        let reply = client.ask(&leading).await;
        assert!(reply.is_leading(), "{reply:?}");
        assert_eq!(reply.status().map(|s| s.term), Some(7));
        let reply = client.ask(&following).await;
        assert!(!reply.is_leading() && reply.status().is_some(), "{reply:?}");
    }

    #[tokio::test]
    async fn silence_refusal_and_garbage_are_no_answer_with_a_reason() {
        let slow = serve(Router::new().route(
            "/is-leader",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Json(status(true))
            }),
        ))
        .await;
        let client = Client::new(TIMEOUT);
        let no_answer = |reason: &str| Reply::NoAnswer {
            reason: reason.into(),
        };
        assert_eq!(client.ask(&slow).await, no_answer("no answer in 250 ms"));
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let refused = client.ask(&format!("http://{closed}/is-leader")).await;
        assert_eq!(refused, no_answer("connection refused"));
        let garbled = serve(Router::new().route("/is-leader", get(|| async { "not json" }))).await;
        assert_eq!(client.ask(&garbled).await, no_answer("unreadable answer"));
        let missing = serve(Router::new()).await;
        assert_eq!(client.ask(&missing).await, no_answer("HTTP 404 Not Found"));
    }

    #[tokio::test]
    async fn probes_send_observations_until_dropped() {
        let url =
            serve(Router::new().route("/is-leader", get(|| async { Json(status(true)) }))).await;
        let (tx, mut rx) = mpsc::channel(16);
        let probes = Probes::spawn(
            Client::new(TIMEOUT),
            Duration::from_millis(20),
            [(0, url)],
            tx,
        );
        let first = rx.recv().await.expect("an observation");
        assert_eq!(first.node, 0);
        assert!(first.received >= first.sent);
        assert!(first.reply.is_leading());
        drop(probes);
        // The task is aborted: the channel closes once buffered items are read.
        while rx.recv().await.is_some() {}
    }
}
