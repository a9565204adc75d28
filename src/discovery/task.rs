//! The discovery loop: resolve, decide what to publish, wait, repeat.
//! The decisions (debounce, backoff, log rate) are small pure types so they
//! are tested without a clock or a DNS server.

use super::{resolve_once, DiscoveryConfig, DiscoveryError, DiscoverySource};
use crate::metrics::Metrics;
use crate::timer::{next_tick, DeadlineTimer};
use std::collections::BTreeSet;
use std::future::Future;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info, warn};

/// First wait after a failed lookup (250 ms); doubles on each further failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Shortest accepted lookup interval (10 ms), so a zero interval cannot spin.
pub const MIN_INTERVAL: Duration = Duration::from_millis(10);
/// Empty answers needed in a row before the empty set is published.
const EMPTY_ANSWERS_TO_PUBLISH: u32 = 2;
/// Shortest time between two failure warnings (30 s).
const WARN_EVERY: Duration = Duration::from_secs(30);

/// Runs discovery for `cfg` until `shutdown` resolves or nobody listens.
pub(super) async fn run(
    cfg: DiscoveryConfig,
    metrics: Metrics,
    tx: watch::Sender<BTreeSet<String>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let lookups = async {
        match &cfg.source {
            DiscoverySource::Static(_) => publish_static(&cfg.source, &metrics, &tx).await,
            DiscoverySource::Dns { .. } => poll_dns(&cfg, &metrics, &tx).await,
        }
    };
    tokio::select! {
        // Graceful shutdown of the sidecar.
        () = shutdown => {}
        // Every receiver is gone: nobody needs peers any more.
        () = tx.closed() => {}
        // Only ends early when there is nothing left to do.
        () = lookups => {}
    }
}

/// Validates and publishes a static list once, then idles.
async fn publish_static(
    source: &DiscoverySource,
    metrics: &Metrics,
    tx: &watch::Sender<BTreeSet<String>>,
) {
    match resolve_once(source).await {
        Ok(peers) => {
            info!(peers = ?peers, "using static peer list");
            publish(tx, metrics, peers);
        }
        Err(e) => error!(error = %e, "static peer list refused; no peers will be discovered"),
    }
    std::future::pending::<()>().await;
}

/// Resolves the DNS source forever: every `interval` after an answer, with
/// backoff after failures.
async fn poll_dns(cfg: &DiscoveryConfig, metrics: &Metrics, tx: &watch::Sender<BTreeSet<String>>) {
    let mut pace = cfg.pace.clone();
    let mut tracker = PeerSetTracker::default();
    let mut backoff = Backoff::new(INITIAL_BACKOFF, cfg.max_backoff);
    let mut failures = FailureLog::default();
    // A kernel timer (tokio's timer wheel would wake the runtime early to
    // move a 2 s timer between its levels), and regular lookups on shared
    // ticks (`timer::next_tick`): the hello probes go out just after them.
    let mut timer = DeadlineTimer::new();
    loop {
        let result = resolve_once(&cfg.source).await;
        let wake_at = match result {
            Ok(peers) => {
                let label = if peers.is_empty() { "empty" } else { "ok" };
                metrics.dns_lookups.with_label_values(&[label]).inc();
                failures.on_answer();
                backoff.reset();
                if let Some(changed) = tracker.on_answer(peers) {
                    publish(tx, metrics, changed);
                }
                let interval = match &mut pace {
                    Some(pace) => *pace.borrow_and_update(),
                    None => cfg.interval,
                }
                .max(MIN_INTERVAL);
                next_tick(interval)
            }
            Err(e) => {
                metrics.dns_lookups.with_label_values(&["error"]).inc();
                tracker.on_failure();
                let delay = backoff.next_delay();
                failures.on_failure(&e, delay, Instant::now());
                Instant::now() + delay
            }
        };
        match &mut pace {
            Some(pace) => {
                tokio::select! {
                    () = timer.sleep_until(wake_at) => {}
                    // A new pace (this node became leader, say): look now.
                    changed = pace.changed() => if changed.is_err() {
                        // The runtime is gone: keep the last pace.
                        timer.sleep_until(wake_at).await;
                    },
                }
            }
            None => timer.sleep_until(wake_at).await,
        }
    }
}

/// Publishes `peers`, updates the gauge and logs the change.
fn publish(tx: &watch::Sender<BTreeSet<String>>, metrics: &Metrics, peers: BTreeSet<String>) {
    metrics
        .peers_discovered
        .set(i64::try_from(peers.len()).unwrap_or(i64::MAX));
    tx.send_if_modified(|current| {
        if *current == peers {
            return false;
        }
        let added: Vec<&String> = peers.difference(current).collect();
        let removed: Vec<&String> = current.difference(&peers).collect();
        info!(
            ?added,
            ?removed,
            count = peers.len(),
            "discovered peers changed"
        );
        *current = peers;
        true
    });
}

/// Decides what to publish from a sequence of lookup results. The last
/// published set changes only on an answer; an empty answer counts only when
/// [`EMPTY_ANSWERS_TO_PUBLISH`] of them arrive in a row.
#[derive(Debug, Default)]
pub(super) struct PeerSetTracker {
    /// What subscribers currently see.
    published: BTreeSet<String>,
    /// Empty answers in a row; reset by any other result.
    empty_streak: u32,
}

impl PeerSetTracker {
    /// Records an answer and returns the set to publish if it changes.
    pub(super) fn on_answer(&mut self, peers: BTreeSet<String>) -> Option<BTreeSet<String>> {
        if peers.is_empty() {
            self.empty_streak = self.empty_streak.saturating_add(1);
            if self.empty_streak < EMPTY_ANSWERS_TO_PUBLISH {
                return None;
            }
        } else {
            self.empty_streak = 0;
        }
        if peers == self.published {
            return None;
        }
        self.published = peers.clone();
        Some(peers)
    }

    /// Records a failed lookup: the published set stays and the empty
    /// streak restarts, since the lookups around a failure are not consecutive.
    pub(super) fn on_failure(&mut self) {
        self.empty_streak = 0;
    }
}

/// Exponential backoff: `initial`, then doubling, never above `max`.
#[derive(Debug)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Creates a backoff whose first delay is `initial` (capped at `max`).
    pub(super) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial.min(max),
        }
    }

    /// Returns the delay before the next retry and doubles the one after.
    pub(super) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        delay
    }

    /// Starts over at the initial delay (after a successful lookup).
    pub(super) fn reset(&mut self) {
        self.next = self.initial.min(self.max);
    }
}

/// Rate-limits failure warnings to one per [`WARN_EVERY`], counting the
/// failures in between, and logs once when lookups recover.
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    /// When the last warning was written.
    last_warning: Option<Instant>,
    /// Failures not logged since the last warning.
    suppressed: u64,
    /// Failures since the last answer.
    in_a_row: u64,
}

impl FailureLog {
    /// Records a failure and logs it unless a warning was written less than
    /// [`WARN_EVERY`] ago. Returns whether it logged.
    pub(super) fn on_failure(
        &mut self,
        error: &DiscoveryError,
        retry_in: Duration,
        now: Instant,
    ) -> bool {
        self.in_a_row += 1;
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARN_EVERY);
        if !due {
            self.suppressed += 1;
            return false;
        }
        warn!(
            error = %error,
            failures_in_a_row = self.in_a_row,
            suppressed_since_last_warning = self.suppressed,
            ?retry_in,
            "peer discovery lookup failed; keeping the last known peers"
        );
        self.last_warning = Some(now);
        self.suppressed = 0;
        true
    }

    /// Records an answer; logs a recovery if failures came before it.
    pub(super) fn on_answer(&mut self) {
        if self.in_a_row > 0 {
            info!(
                failures = self.in_a_row,
                "peer discovery lookups answer again"
            );
        }
        *self = FailureLog::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_new_answer_is_published_and_a_repeated_one_is_not() {
        let mut tracker = PeerSetTracker::default();
        assert_eq!(tracker.on_answer(set(&["a:1"])), Some(set(&["a:1"])));
        assert_eq!(tracker.on_answer(set(&["a:1"])), None);
        assert_eq!(
            tracker.on_answer(set(&["a:1", "b:1"])),
            Some(set(&["a:1", "b:1"]))
        );
    }

    #[test]
    fn an_empty_answer_is_published_only_on_the_second_in_a_row() {
        let mut tracker = PeerSetTracker::default();
        tracker.on_answer(set(&["a:1"]));
        assert_eq!(tracker.on_answer(set(&[])), None);
        assert_eq!(tracker.on_answer(set(&[])), Some(set(&[])));
        assert_eq!(tracker.on_answer(set(&[])), None, "already published");
    }

    #[test]
    fn a_single_empty_answer_between_answers_changes_nothing() {
        let mut tracker = PeerSetTracker::default();
        tracker.on_answer(set(&["a:1"]));
        assert_eq!(tracker.on_answer(set(&[])), None);
        assert_eq!(tracker.on_answer(set(&["a:1"])), None);
        assert_eq!(tracker.on_answer(set(&[])), None, "streak restarted");
    }

    #[test]
    fn a_failure_between_empty_answers_restarts_the_streak() {
        let mut tracker = PeerSetTracker::default();
        tracker.on_answer(set(&["a:1"]));
        assert_eq!(tracker.on_answer(set(&[])), None);
        tracker.on_failure();
        assert_eq!(tracker.on_answer(set(&[])), None);
        assert_eq!(tracker.on_answer(set(&[])), Some(set(&[])));
    }

    #[test]
    fn failures_never_change_the_published_set() {
        let mut tracker = PeerSetTracker::default();
        tracker.on_answer(set(&["a:1"]));
        for _ in 0..5 {
            tracker.on_failure();
        }
        assert_eq!(tracker.published, set(&["a:1"]));
        assert_eq!(tracker.on_answer(set(&["a:1"])), None);
    }

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), Duration::from_millis(250));
    }

    #[test]
    fn backoff_never_exceeds_a_cap_below_the_initial_delay() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
        assert_eq!(backoff.next_delay(), Duration::from_millis(100));
    }

    #[test]
    fn failure_warnings_are_written_at_most_once_per_period() {
        let mut log = FailureLog::default();
        let error = DiscoveryError::InvalidPort;
        let start = Instant::now();
        let retry = Duration::from_millis(250);
        assert!(log.on_failure(&error, retry, start));
        assert!(!log.on_failure(&error, retry, start + Duration::from_secs(1)));
        assert!(!log.on_failure(&error, retry, start + Duration::from_secs(29)));
        assert!(log.on_failure(&error, retry, start + WARN_EVERY));
        assert_eq!(log.in_a_row, 4);
        log.on_answer();
        assert!(log.on_failure(&error, retry, start + WARN_EVERY + Duration::from_secs(1)));
    }
}
