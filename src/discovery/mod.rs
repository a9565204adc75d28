//! Peer discovery: finds the addresses of the other sidecars and publishes
//! them on a `watch` channel for the membership driver.
//!
//! ```text
//!   DiscoverySource::Dns ── every `interval` ──► resolve (SRV, else A+AAAA) ──┐
//!        ▲                                                                    │
//!        └── on failure: retry after 250 ms, 500 ms, ... ≤ `max_backoff` ◄────┤
//!                                                                             ▼
//!   DiscoverySource::Static ── once ──► validated list ──► PeerSetTracker (debounce)
//!                                                                             │
//!                                        watch::Receiver<BTreeSet<String>> ◄──┘
//! ```
//!
//! The published set only ever changes on an answer from DNS: a failure
//! (timeout, SERVFAIL, refused) keeps the last good set, and an empty answer
//! (NXDOMAIN or no records) empties it only when the next lookup agrees, so a
//! single glitch never makes a node forget its peers.
//!
//! Modules: `address` validates names and `host:port` entries, `dns` runs
//! one lookup round, `task` is the periodic loop.

mod address;
mod dns;
mod task;

use crate::metrics::Metrics;
use hickory_resolver::ResolveError;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;
use thiserror::Error;
use tokio::sync::watch;

pub use self::task::{INITIAL_BACKOFF, MIN_INTERVAL};

/// Default period between two lookups (2 s).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default cap of the retry backoff after failed lookups (30 s).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Where the peer addresses come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiscoverySource {
    /// A headless Service name, e.g. `elector.default.svc.cluster.local`.
    /// SRV records at `_raft._tcp.<name>` win when present (each target's A
    /// and AAAA records with the SRV port); otherwise the A and AAAA records
    /// of `<name>` with `port`.
    Dns {
        /// DNS name of the headless Service; a trailing dot skips the search list.
        name: String,
        /// Peer port used with A/AAAA records (SRV records carry their own).
        port: u16,
        /// Ask only this DNS server (UDP, TCP on truncation) instead of the
        /// system resolver configuration.
        server: Option<SocketAddr>,
    },
    /// A fixed list of `host:port` entries, published as written (sorted and
    /// deduplicated). IPv6 hosts go in brackets: `[fd00::5]:4041`.
    Static(Vec<String>),
}

impl DiscoverySource {
    /// Checks the configuration without any network I/O: the DNS name and
    /// port, or every static entry. Call it at startup to fail fast.
    pub fn validate(&self) -> Result<(), DiscoveryError> {
        match self {
            DiscoverySource::Dns { name, port, .. } => {
                address::validate_dns_name(name)?;
                address::validate_port(*port)
            }
            DiscoverySource::Static(entries) => address::parse_static_peers(entries).map(|_| ()),
        }
    }
}

/// How discovery runs.
#[derive(Clone, Debug)]
pub struct DiscoveryConfig {
    /// Where peers come from.
    pub source: DiscoverySource,
    /// Period between two lookups after an answer (default 2 s; values below
    /// [`MIN_INTERVAL`] are raised to it).
    pub interval: Duration,
    /// Longest wait between retries after failed lookups (default 30 s). The
    /// first retry waits [`INITIAL_BACKOFF`], each next one twice as long.
    pub max_backoff: Duration,
    /// When set, the period between lookups follows this channel instead of
    /// `interval` (the runtime slows lookups down on a joined follower, which
    /// decides nothing from them); a change of pace looks up at once.
    pub pace: Option<watch::Receiver<Duration>>,
}

impl DiscoveryConfig {
    /// Creates a configuration for `source` with the default interval and backoff.
    pub fn new(source: DiscoverySource) -> DiscoveryConfig {
        DiscoveryConfig {
            source,
            interval: DEFAULT_INTERVAL,
            pace: None,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// Why discovery could not produce a peer set.
#[derive(Debug, Error)]
pub enum DiscoveryError {
    /// The Service name is not a valid DNS name.
    #[error("invalid DNS name {name:?}: {reason}; pass the headless Service name, e.g. elector.default.svc.cluster.local")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The DNS source has port 0.
    #[error("invalid peer port 0; pass the port peers listen on (default 4041)")]
    InvalidPort,
    /// A static entry is not `host:port`.
    #[error("invalid static peer {entry:?}: {reason}; write host:port, e.g. 10.0.0.5:4041, node-0.elector:4041 or [fd00::5]:4041")]
    InvalidStaticPeer {
        /// The entry as given.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The static list has no entries.
    #[error("the static peer list is empty; pass at least one host:port, or use DNS discovery")]
    EmptyStaticList,
    /// The system resolver configuration could not be read.
    #[error("cannot read the system DNS configuration (/etc/resolv.conf): {0}; fix it or pass a DNS server explicitly (--dns-server)")]
    SystemConfig(#[source] ResolveError),
    /// A query failed: no answer, or the server answered with an error code.
    #[error("DNS lookup of {name} ({record_type}) failed: {source}; is the DNS server reachable and serving this name?")]
    Lookup {
        /// The queried name.
        name: String,
        /// The queried record type (`SRV`, `A`, `AAAA`).
        record_type: String,
        /// The resolver's error.
        #[source]
        source: ResolveError,
    },
    /// A whole lookup round took too long.
    #[error("DNS lookups for {name} did not finish within {after:?}; is the DNS server overloaded or unreachable?")]
    RoundTimedOut {
        /// The Service name.
        name: String,
        /// The round deadline.
        after: Duration,
    },
}

impl DiscoveryError {
    /// Tells whether this error is about the configuration (retrying will not
    /// help) rather than about the DNS server.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            DiscoveryError::InvalidName { .. }
                | DiscoveryError::InvalidPort
                | DiscoveryError::InvalidStaticPeer { .. }
                | DiscoveryError::EmptyStaticList
        )
    }
}

/// Spawns the discovery task on the current tokio runtime and returns the
/// channel it publishes on: the current peer addresses (`ip:port`, IPv6 as
/// `[ip]:port`; static entries as written), sorted and deduplicated. The
/// channel starts empty.
///
/// DNS sources are re-resolved every `cfg.interval`. A failed lookup keeps
/// the last good set and is retried with exponential backoff
/// ([`INITIAL_BACKOFF`] doubling up to `cfg.max_backoff`); an empty answer
/// (NXDOMAIN / no records) is published only once two consecutive lookups
/// returned it. Each round counts `metrics.dns_lookups{result="ok"|"empty"|"error"}`;
/// each publish sets `metrics.peers_discovered`. Failures are logged at
/// `warn`, at most once per 30 s. A static source is validated and published
/// once (an invalid one is logged at `error` and publishes nothing).
///
/// The task stops when `shutdown` resolves or every receiver is dropped;
/// receivers then see the sender closed.
///
/// MUST be called from within a tokio runtime.
pub fn spawn(
    cfg: DiscoveryConfig,
    metrics: Metrics,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> watch::Receiver<BTreeSet<String>> {
    let (tx, rx) = watch::channel(BTreeSet::new());
    tokio::spawn(task::run(cfg, metrics, tx, shutdown));
    rx
}

/// Performs one lookup of `source` and returns the peer addresses, sorted and
/// deduplicated; an NXDOMAIN or record-less answer is an empty set, a failure
/// an error. No debounce and no metrics: for startup checks and tests.
pub async fn resolve_once(source: &DiscoverySource) -> Result<BTreeSet<String>, DiscoveryError> {
    source.validate()?;
    match source {
        DiscoverySource::Dns { name, port, server } => {
            dns::resolve_service(name, *port, *server).await
        }
        DiscoverySource::Static(entries) => address::parse_static_peers(entries),
    }
}
