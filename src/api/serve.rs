//! The HTTP API's server: the router on hyper's HTTP/1.1 connections, with
//! bounds, so that no client of the port can take the sidecar's memory, file
//! descriptors or thread (the Raft node runs on the same thread: a stall here
//! is a stall of the election).
//!
//! Invariants:
//! 1. **At most [`MAX_CONNECTIONS`] connections are open at once.** One
//!    accepted past the cap is closed at once, counted
//!    (`raft_elector_http_refused_total{reason="connection_cap"}`) and logged
//!    rate-limited; accepting it first keeps the kernel's backlog from
//!    filling, so the client learns at once instead of hanging.
//! 2. **A request head arrives whole within [`HEADER_READ_TIMEOUT`]** of the
//!    connection opening or going idle after a response (hyper's header-read
//!    timeout, which is also the keep-alive idle timeout), else the
//!    connection is closed: idle, slow and half-sent connections do not stay.
//! 3. **A request head is at most [`MAX_HEAD_BYTES`]** (hyper's read buffer;
//!    larger heads are answered 431): memory per connection is bounded.
//! 4. Requests that wait (long-polls, event streams) are bounded in the
//!    router ([`super::MAX_WAITERS`]), so they cannot take every connection.
//! 5. **Shutdown**: accepting stops, every connection is told to finish its
//!    response and close, and `serve` returns once all have (waiting requests
//!    end when the runtime drops the leadership sender).

use crate::metrics::Metrics;
use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Connections open at once (probes, the app, Prometheus, waiters).
pub const MAX_CONNECTIONS: usize = 256;
/// Longest wait for a whole request head, and the keep-alive idle timeout.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (hyper's minimum read buffer is 8 KiB).
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Pause after a failed accept (e.g. out of file descriptors), which would
/// otherwise fail again at once.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// Shortest interval between two warnings of one kind.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` within the bounds above until `shutdown`
/// resolves, then lets open connections finish.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut cap_warning = Warning::new("HTTP connections over the cap closed");
    let mut accept_warning = Warning::new("cannot accept an HTTP connection");
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    metrics.http_refused.with_label_values(&["accept_error"]).inc();
                    accept_warning.note(&e);
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            },
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            metrics
                .http_refused
                .with_label_values(&["connection_cap"])
                .inc();
            cap_warning.note(&format_args!("{MAX_CONNECTIONS} are open"));
            drop(stream);
            continue;
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "cannot set TCP_NODELAY on an HTTP connection");
        }
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|request: hyper::Request<Incoming>| request.map(Body::new)),
        );
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let _place = place;
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = async { stop.wait_for(|stopping| *stopping).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a place until it ends.
    let _ = places.acquire_many(MAX_CONNECTIONS as u32).await;
}

/// A warning logged at most once per [`WARN_INTERVAL`], with how many were
/// left out since the last one.
struct Warning {
    what: &'static str,
    last: Option<Instant>,
    suppressed: u64,
}

impl Warning {
    fn new(what: &'static str) -> Warning {
        Warning {
            what,
            last: None,
            suppressed: 0,
        }
    }

    fn note(&mut self, why: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < WARN_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        warn!(suppressed = self.suppressed, "{}: {why}", self.what);
        self.last = Some(now);
        self.suppressed = 0;
    }
}
