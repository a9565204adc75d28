//! Polling every node's `GET /is-leader`, one task per node so that a frozen
//! node (which accepts connections but never answers) delays nobody else.

use super::timeline::{Observation, Reply};
use super::DemoError;
use crate::api::LeaderStatus;
use reqwest::StatusCode;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Interval between two polls of one node: the resolution of failover times.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long one poll may take before the node counts as not answering.
pub const POLL_TIMEOUT: Duration = Duration::from_millis(250);

/// The polling tasks; dropping this stops them.
#[derive(Debug)]
pub struct Probes {
    tasks: Vec<JoinHandle<()>>,
}

impl Probes {
    /// Starts polling `urls` (node `i` at `urls[i]`), sending each result to `out`.
    pub fn spawn(urls: Vec<String>, out: mpsc::Sender<Observation>) -> Result<Probes, DemoError> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(POLL_TIMEOUT)
            .connect_timeout(POLL_TIMEOUT)
            .build()
            .map_err(DemoError::HttpClient)?;
        let tasks = urls
            .into_iter()
            .enumerate()
            .map(|(node, url)| tokio::spawn(poll_node(client.clone(), node, url, out.clone())))
            .collect();
        Ok(Probes { tasks })
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
    client: reqwest::Client,
    node: usize,
    url: String,
    out: mpsc::Sender<Observation>,
) {
    let mut ticks = tokio::time::interval(POLL_INTERVAL);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let sent = Instant::now();
        let reply = ask(&client, &url).await;
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

/// Asks one node once; a failure becomes [`Reply::NoAnswer`] with a short reason.
async fn ask(client: &reqwest::Client, url: &str) -> Reply {
    let response = match client.get(url).send().await {
        Ok(response) => response,
        Err(err) => return no_answer(&err),
    };
    let code = response.status();
    if code != StatusCode::OK && code != StatusCode::SERVICE_UNAVAILABLE {
        return Reply::NoAnswer {
            reason: format!("HTTP {code}"),
        };
    }
    match response.json::<LeaderStatus>().await {
        Ok(status) => Reply::Answered {
            leading: code == StatusCode::OK,
            status,
        },
        Err(err) => no_answer(&err),
    }
}

fn no_answer(err: &reqwest::Error) -> Reply {
    let reason = if err.is_timeout() {
        format!("no answer in {} ms", POLL_TIMEOUT.as_millis())
    } else if err.is_connect() {
        "connection refused".to_string()
    } else if err.is_decode() {
        "unreadable answer".to_string()
    } else {
        "connection lost".to_string()
    };
    Reply::NoAnswer { reason }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use axum::{Json, Router};

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

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .no_proxy()
            .timeout(POLL_TIMEOUT)
            .build()
            .expect("client")
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
        let reply = ask(&client(), &leading).await;
        assert!(reply.is_leading(), "{reply:?}");
        assert_eq!(reply.status().map(|s| s.term), Some(7));
        let reply = ask(&client(), &following).await;
        assert!(!reply.is_leading() && reply.status().is_some(), "{reply:?}");
    }

    #[tokio::test]
    async fn silence_and_refusal_are_no_answer_with_a_reason() {
        let slow = serve(Router::new().route(
            "/is-leader",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Json(status(true))
            }),
        ))
        .await;
        let reply = ask(&client(), &slow).await;
        assert_eq!(
            reply,
            Reply::NoAnswer {
                reason: "no answer in 250 ms".into()
            }
        );
        let closed = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.local_addr().expect("addr")
        };
        let reply = ask(&client(), &format!("http://{closed}/is-leader")).await;
        assert_eq!(
            reply,
            Reply::NoAnswer {
                reason: "connection refused".into()
            }
        );
        let garbled = serve(Router::new().route("/is-leader", get(|| async { "not json" }))).await;
        assert!(matches!(
            ask(&client(), &garbled).await,
            Reply::NoAnswer { .. }
        ));
    }

    #[tokio::test]
    async fn probes_send_observations_until_dropped() {
        let url =
            serve(Router::new().route("/is-leader", get(|| async { Json(status(true)) }))).await;
        let (tx, mut rx) = mpsc::channel(16);
        let probes = Probes::spawn(vec![url], tx).expect("probes");
        let first = rx.recv().await.expect("an observation");
        assert_eq!(first.node, 0);
        assert!(first.received >= first.sent);
        assert!(first.reply.is_leading());
        drop(probes);
        // The task is aborted: the channel closes once buffered items are read.
        while rx.recv().await.is_some() {}
    }
}
