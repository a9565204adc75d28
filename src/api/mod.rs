//! The app-facing HTTP API (default `0.0.0.0:4040`): what the app next to the
//! sidecar and Prometheus ask.
//!
//! ```text
//!  runtime ──watch<LeaderState>──► router ──► GET /is-leader   200 leader (valid lease) / 503
//!                                    │        GET /is-leader?wait=30s&term=N&isLeader=b  long-poll
//!                                    │        GET /events      SSE `leader` event per change
//!                                    │        GET /leader      known leader / 503
//!                                    │        GET /healthz, /readyz, /metrics
//!                                    └──────► status file (same JSON as /is-leader)
//! ```
//!
//! The API only reads the leadership channel; it never changes Raft state and
//! sets no metric but the count of what its bounds turn away (the runtime
//! owns `raft_elector_is_leader`). The lease is a deadline, so every answer
//! is computed against `Instant::now()` at the moment of the answer, and
//! every wait also wakes when the lease runs out.
//!
//! Bounded (see [`serve`] for connections): at most [`MAX_WAITERS`]
//! long-polls and event streams wait at once; one more is answered 429 at
//! once, so waiters can never take every connection a probe needs.

mod serve;
pub mod status;
mod status_file;
pub mod wait;

pub use serve::serve;
pub use status::{Answer, LeaderInfo, LeaderStatus};
pub use status_file::{check_status_file, spawn_status_file};

use crate::leadership::LeaderState;
use crate::metrics::Metrics;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::Stream;
use std::sync::Arc;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use wait::{wait_for_change, IsLeaderQuery, WaitOutcome, WaitRequest};

/// Content type of the Prometheus text exposition format.
const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";
/// Name of the server-sent event carrying a [`LeaderStatus`].
const LEADER_EVENT: &str = "leader";
/// Long-polls and event streams that may wait at once.
pub const MAX_WAITERS: usize = 128;

/// What every handler reads.
#[derive(Clone)]
struct ApiState {
    leadership: watch::Receiver<LeaderState>,
    metrics: Metrics,
    waiters: Arc<Semaphore>,
}

impl ApiState {
    /// A place among the waiters, or `None` (counted) when all are taken.
    fn waiter(&self) -> Option<OwnedSemaphorePermit> {
        let place = self.waiters.clone().try_acquire_owned().ok();
        if place.is_none() {
            self.metrics
                .http_refused
                .with_label_values(&["waiter_cap"])
                .inc();
        }
        place
    }
}

/// The answer to a wait when every place among the waiters is taken.
fn too_many_waiters() -> Response {
    let text = format!("too many waiting requests (at most {MAX_WAITERS}); retry later");
    (StatusCode::TOO_MANY_REQUESTS, no_store(), text).into_response()
}

/// Builds the app-facing router. Reads leadership from `state` (the runtime's
/// watch channel) and never mutates it; renders `metrics` on `/metrics`.
///
/// Long-polls and event streams end when the runtime drops its sender (and
/// any lease left has run out), so dropping it lets a graceful shutdown finish.
pub fn router(state: watch::Receiver<LeaderState>, metrics: Metrics) -> Router {
    Router::new()
        .route("/is-leader", get(is_leader))
        .route("/events", get(events))
        .route("/leader", get(leader))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(ApiState {
            leadership: state,
            metrics,
            waiters: Arc::new(Semaphore::new(MAX_WAITERS)),
        })
}

/// Answers 200 while this node leads with a valid lease, else 503; with
/// `wait`, first waits for the answer to differ from what the client saw.
async fn is_leader(
    State(api): State<ApiState>,
    query: Result<Query<IsLeaderQuery>, QueryRejection>,
) -> Response {
    let request = match query
        .map_err(|rejection| rejection.body_text())
        .and_then(|Query(q)| WaitRequest::parse(&q).map_err(|e| e.to_string()))
    {
        Ok(request) => request,
        Err(message) => return (StatusCode::BAD_REQUEST, no_store(), message).into_response(),
    };
    let mut rx = api.leadership.clone();
    let state = match request {
        None => rx.borrow().clone(),
        Some(request) => {
            let Some(_place) = api.waiter() else {
                return too_many_waiters();
            };
            let now = Instant::now();
            let seen = request.seen(&Answer::of(&rx.borrow_and_update(), now));
            wait_for_change(&mut rx, &seen, Some(now + request.wait))
                .await
                .0
        }
    };
    let status = LeaderStatus::at(&state, Instant::now());
    (leader_code(status.is_leader), no_store(), Json(status)).into_response()
}

/// Streams one `leader` event now and one on every change of the answer.
async fn events(State(api): State<ApiState>) -> Response {
    let Some(place) = api.waiter() else {
        return too_many_waiters();
    };
    let stream = leader_events(api.leadership.clone(), place);
    (
        no_store(),
        Sse::new(stream).keep_alive(KeepAlive::default()),
    )
        .into_response()
}

/// Where an event stream is: the receiver and the answer last sent.
struct EventCursor {
    rx: watch::Receiver<LeaderState>,
    sent: Option<Answer>,
    finished: bool,
    /// The stream's place among the waiters, given back when it ends.
    _place: OwnedSemaphorePermit,
}

fn leader_events(
    rx: watch::Receiver<LeaderState>,
    place: OwnedSemaphorePermit,
) -> impl Stream<Item = Result<Event, axum::Error>> + Send + 'static {
    let cursor = EventCursor {
        rx,
        sent: None,
        finished: false,
        _place: place,
    };
    futures::stream::unfold(cursor, |mut cursor| async move {
        if cursor.finished {
            return None;
        }
        let state = match &cursor.sent {
            None => cursor.rx.borrow_and_update().clone(),
            Some(sent) => {
                let (state, outcome) = wait_for_change(&mut cursor.rx, sent, None).await;
                if outcome == WaitOutcome::Closed {
                    // Nothing can change any more: send nothing further.
                    return None;
                }
                state
            }
        };
        let status = LeaderStatus::at(&state, Instant::now());
        cursor.sent = Some(Answer::from(&status));
        let event = Event::default().event(LEADER_EVENT).json_data(&status);
        cursor.finished = event.is_err();
        Some((event, cursor))
    })
}

/// Answers the known leader (200), or nulls (503) while none is known.
async fn leader(State(api): State<ApiState>) -> Response {
    let info = LeaderInfo::of(&api.leadership.borrow());
    let code = if info.leader.is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, no_store(), Json(info)).into_response()
}

/// Answers 200 for as long as the process serves.
async fn healthz() -> &'static str {
    "ok"
}

/// Answers 200 once the node has joined a cluster and is not shutting down.
async fn readyz(State(api): State<ApiState>) -> Response {
    let (joined, shutting_down) = {
        let state = api.leadership.borrow();
        (state.joined, state.shutting_down)
    };
    let (code, text) = if shutting_down {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: shutting down")
    } else if !joined {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not a member of a cluster yet (waiting for peers or to be added)",
        )
    } else {
        (StatusCode::OK, "ready")
    };
    (code, no_store(), text).into_response()
}

/// Renders every metric in the Prometheus text format.
async fn metrics_text(State(api): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
        )],
        api.metrics.render(),
    )
        .into_response()
}

fn leader_code(is_leader: bool) -> StatusCode {
    if is_leader {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// Forbids caches from keeping an answer that is only true for a moment.
fn no_store() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]
}

#[cfg(test)]
mod tests;
