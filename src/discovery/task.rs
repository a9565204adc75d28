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
/// Shortest time between two failure warnings, and between two "no
/// records" warnings (30 s).
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
    let name = match &cfg.source {
        DiscoverySource::Dns { name, .. } => name.as_str(),
        DiscoverySource::Static(_) => "",
    };
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
                if peers.is_empty() {
                    failures.on_empty_answer(name, Instant::now());
                }
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

/// Allows one warning per [`WARN_EVERY`] and counts the ones held back.
#[derive(Debug, Default)]
pub(super) struct RateLimit {
    /// When the last warning was written.
    last_warning: Option<Instant>,
    /// Warnings held back since the last one written.
    suppressed: u64,
}

impl RateLimit {
    /// Returns `Some(held back since the last warning)` when a warning may be
    /// written at `now` (and records it as written), `None` when it must be
    /// held back (and counts it).
    fn allow(&mut self, now: Instant) -> Option<u64> {
        let due = self
            .last_warning
            .is_none_or(|last| now.duration_since(last) >= WARN_EVERY);
        if !due {
            self.suppressed += 1;
            return None;
        }
        self.last_warning = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Rate-limits lookup warnings to one per [`WARN_EVERY`] for failures
/// (counted as `result="error"`) and, separately, one per [`WARN_EVERY`] for
/// answers without records (`result="empty"`), counting the ones in between;
/// logs once when lookups answer again after failures. Every failure and
/// every empty answer is either logged or counted as suppressed.
#[derive(Debug, Default)]
pub(super) struct FailureLog {
    /// Rate limit of the failure warnings.
    failure_warnings: RateLimit,
    /// Rate limit of the "no records" warnings; kept across answers so a
    /// name that flaps between records and none still warns at most once
    /// per period.
    empty_warnings: RateLimit,
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
        let Some(suppressed) = self.failure_warnings.allow(now) else {
            return false;
        };
        warn!(
            error = %error,
            failures_in_a_row = self.in_a_row,
            suppressed_since_last_warning = suppressed,
            ?retry_in,
            "peer discovery lookup failed; keeping the last known peers"
        );
        true
    }

    /// Records an answer without records for `name` (NXDOMAIN or NODATA) and
    /// logs it unless such a warning was written less than [`WARN_EVERY`]
    /// ago. Returns whether it logged. Call [`FailureLog::on_answer`] too.
    pub(super) fn on_empty_answer(&mut self, name: &str, now: Instant) -> bool {
        let Some(suppressed) = self.empty_warnings.allow(now) else {
            return false;
        };
        warn!(
            name,
            suppressed_since_last_warning = suppressed,
            "peer discovery: the DNS name has no records (NXDOMAIN or no SRV/A/AAAA); \
             check --service, or the Service has no ready pods yet"
        );
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
        self.in_a_row = 0;
        self.failure_warnings = RateLimit::default();
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

    #[test]
    fn no_records_warnings_are_written_at_most_once_per_period() {
        let mut log = FailureLog::default();
        let start = Instant::now();
        assert!(log.on_empty_answer("elector.test", start));
        log.on_answer();
        assert!(!log.on_empty_answer("elector.test", start + Duration::from_secs(2)));
        assert!(!log.on_empty_answer("elector.test", start + Duration::from_secs(4)));
        assert_eq!(log.empty_warnings.suppressed, 2);
        assert!(log.on_empty_answer("elector.test", start + WARN_EVERY));
        assert_eq!(log.empty_warnings.suppressed, 0);
        // The two kinds of warnings have separate budgets.
        let error = DiscoveryError::InvalidPort;
        assert!(log.on_failure(&error, Duration::ZERO, start + WARN_EVERY));
    }

    /// Runs the DNS loop against `server` until `until` holds on the
    /// lookup counters, or panics after 10 s.
    async fn lookups_until(server: std::net::SocketAddr, until: impl Fn(&Metrics) -> bool) {
        let metrics = Metrics::new();
        let mut cfg = DiscoveryConfig::new(DiscoverySource::Dns {
            name: "elector.example".into(),
            port: 4041,
            server: Some(server),
        });
        cfg.interval = Duration::from_millis(20);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let rx = super::super::spawn(cfg, metrics.clone(), async {
            let _ = stopped.await;
        });
        let give_up = Instant::now() + Duration::from_secs(10);
        while !until(&metrics) {
            assert!(
                Instant::now() < give_up,
                "the lookup counters never matched"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        drop(rx);
    }

    fn lookups(metrics: &Metrics, result: &str) -> u64 {
        metrics.dns_lookups.with_label_values(&[result]).get()
    }

    #[tokio::test]
    async fn a_server_that_never_answers_counts_as_error() {
        let server = super::super::dns::tests::fake_server(None).await;
        lookups_until(server, |m| {
            assert_eq!(lookups(m, "empty"), 0);
            lookups(m, "error") >= 1
        })
        .await;
    }

    #[tokio::test]
    async fn a_name_without_records_counts_as_empty() {
        use hickory_resolver::proto::op::ResponseCode;
        let server = super::super::dns::tests::fake_server(Some(ResponseCode::NXDomain)).await;
        lookups_until(server, |m| {
            assert_eq!(lookups(m, "error"), 0);
            lookups(m, "empty") >= 2
        })
        .await;
    }
}
