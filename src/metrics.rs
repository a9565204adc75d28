//! Prometheus metrics, prefix `raft_elector_`. Registered once in a private
//! registry; every adapter gets a clone of [`Metrics`].

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Buckets (seconds) for election and failover durations.
const ELECTION_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0,
];
/// Buckets (seconds) for peer RPC latency.
const RPC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Every metric the sidecar exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// 1 while this node is the leader with a valid lease.
    pub is_leader: IntGauge,
    /// This node's current Raft term.
    pub term: IntGauge,
    /// Times the known leader changed.
    pub leader_changes: IntCounter,
    /// Elections this node started (as candidate, after PreVote).
    pub elections_started: IntCounter,
    /// Elections this node won.
    pub elections_won: IntCounter,
    /// Elections this node lost or abandoned.
    pub elections_lost: IntCounter,
    /// Time from losing contact with a leader to knowing a new one.
    pub election_duration: Histogram,
    /// Seconds since this node last heard from a leader (0 on the leader).
    pub last_leader_contact_seconds: Gauge,
    /// Peers currently returned by discovery.
    pub peers_discovered: IntGauge,
    /// Voters in the latest configuration.
    pub voters: IntGauge,
    /// Learners in the latest configuration.
    pub learners: IntGauge,
    /// Time to dial and authenticate a peer connection (`dial`) and of a
    /// hello round trip (`hello`).
    pub peer_rpc_seconds: HistogramVec,
    /// Failed dials, hellos and sends, by reason.
    pub peer_rpc_errors: IntCounterVec,
    /// Frames refused on authenticated connections, by reason.
    pub rejected_messages: IntCounterVec,
    /// Peer connections closed before they authenticated, by reason.
    pub peer_connections_refused: IntCounterVec,
    /// Authenticated peer connections open now.
    pub peer_connections: IntGauge,
    /// HTTP API connections and requests turned away by its bounds, by reason.
    pub http_refused: IntCounterVec,
    /// Status-file writes that failed.
    pub status_file_errors: IntCounter,
    /// DNS lookups by result (ok, empty, error).
    pub dns_lookups: IntCounterVec,
    /// Configuration changes this node proposed as leader, by kind.
    pub membership_changes: IntCounterVec,
    /// Hard-state writes that failed.
    pub persist_errors: IntCounter,
    /// First configurations this node installed (local bootstrap).
    pub bootstraps: IntCounter,
    /// Bootstrap attempts given up (the node became a new incarnation).
    pub bootstrap_abandons: IntCounter,
    /// Build information (value is always 1).
    pub build_info: IntGaugeVec,
    /// Kubernetes API requests by verb (RBAC's names) and HTTP code ("error" without an answer).
    pub kube_requests: IntCounterVec,
    /// Time from this node's lease starting (or drift being seen) to the
    /// labels, status and Event matching its view.
    pub kube_publish_seconds: Histogram,
    /// Publishing failures by reason (`kube::Error::metric_label`).
    pub kube_publish_errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let m = Metrics {
            is_leader: IntGauge::new(
                "raft_elector_is_leader",
                "1 while this node is the leader with a valid lease",
            )
            .expect("valid metric"),
            term: IntGauge::new("raft_elector_term", "Current Raft term").expect("valid metric"),
            leader_changes: IntCounter::new(
                "raft_elector_leader_changes_total",
                "Times the known leader changed",
            )
            .expect("valid metric"),
            elections_started: IntCounter::new(
                "raft_elector_elections_started_total",
                "Elections this node started as candidate",
            )
            .expect("valid metric"),
            elections_won: IntCounter::new(
                "raft_elector_elections_won_total",
                "Elections this node won",
            )
            .expect("valid metric"),
            elections_lost: IntCounter::new(
                "raft_elector_elections_lost_total",
                "Elections this node lost or abandoned",
            )
            .expect("valid metric"),
            election_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "raft_elector_election_duration_seconds",
                    "Time from losing the leader to knowing a new one",
                )
                .buckets(ELECTION_BUCKETS.to_vec()),
            )
            .expect("valid metric"),
            last_leader_contact_seconds: Gauge::new(
                "raft_elector_last_leader_contact_seconds",
                "Seconds since this node last heard from a leader",
            )
            .expect("valid metric"),
            peers_discovered: IntGauge::new(
                "raft_elector_peers_discovered",
                "Peers currently returned by discovery",
            )
            .expect("valid metric"),
            voters: IntGauge::new("raft_elector_voters", "Voters in the latest configuration")
                .expect("valid metric"),
            learners: IntGauge::new(
                "raft_elector_learners",
                "Learners in the latest configuration",
            )
            .expect("valid metric"),
            peer_rpc_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "raft_elector_peer_rpc_seconds",
                    "Peer dial and hello latency",
                )
                .buckets(RPC_BUCKETS.to_vec()),
                &["kind"],
            )
            .expect("valid metric"),
            peer_rpc_errors: IntCounterVec::new(
                Opts::new("raft_elector_peer_rpc_errors_total", "Peer RPC failures"),
                &["reason"],
            )
            .expect("valid metric"),
            rejected_messages: IntCounterVec::new(
                Opts::new(
                    "raft_elector_rejected_messages_total",
                    "Frames refused on authenticated peer connections",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            peer_connections_refused: IntCounterVec::new(
                Opts::new(
                    "raft_elector_peer_connections_refused_total",
                    "Peer connections closed before they authenticated",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            http_refused: IntCounterVec::new(
                Opts::new(
                    "raft_elector_http_refused_total",
                    "HTTP API connections and requests turned away by its bounds",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            status_file_errors: IntCounter::new(
                "raft_elector_status_file_errors_total",
                "Status-file writes that failed",
            )
            .expect("valid metric"),
            peer_connections: IntGauge::new(
                "raft_elector_peer_connections",
                "Authenticated peer connections open now",
            )
            .expect("valid metric"),
            dns_lookups: IntCounterVec::new(
                Opts::new("raft_elector_dns_lookups_total", "DNS lookups by result"),
                &["result"],
            )
            .expect("valid metric"),
            membership_changes: IntCounterVec::new(
                Opts::new(
                    "raft_elector_membership_changes_total",
                    "Configuration changes proposed as leader",
                ),
                &["kind"],
            )
            .expect("valid metric"),
            persist_errors: IntCounter::new(
                "raft_elector_persist_errors_total",
                "Hard-state writes that failed",
            )
            .expect("valid metric"),
            bootstraps: IntCounter::new(
                "raft_elector_bootstraps_total",
                "First configurations this node installed",
            )
            .expect("valid metric"),
            bootstrap_abandons: IntCounter::new(
                "raft_elector_bootstrap_abandons_total",
                "Bootstrap attempts given up for a new incarnation",
            )
            .expect("valid metric"),
            build_info: IntGaugeVec::new(
                Opts::new("raft_elector_build_info", "Build information"),
                &["version"],
            )
            .expect("valid metric"),
            kube_requests: IntCounterVec::new(
                Opts::new(
                    "raft_elector_kube_requests_total",
                    "Kubernetes API requests by verb and HTTP code",
                ),
                &["verb", "code"],
            )
            .expect("valid metric"),
            kube_publish_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "raft_elector_kube_publish_seconds",
                    "Time from a leader's lease (or seen drift) to labels and status published",
                )
                .buckets(
                    RPC_BUCKETS
                        .iter()
                        .copied()
                        .chain([2.5, 5.0, 10.0, 30.0])
                        .collect(),
                ),
            )
            .expect("valid metric"),
            kube_publish_errors: IntCounterVec::new(
                Opts::new(
                    "raft_elector_kube_publish_errors_total",
                    "Kubernetes publishing failures by reason",
                ),
                &["reason"],
            )
            .expect("valid metric"),
            registry,
        };
        m.register_all();
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    fn register_all(&self) {
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(self.is_leader.clone()),
            Box::new(self.bootstraps.clone()),
            Box::new(self.bootstrap_abandons.clone()),
            Box::new(self.term.clone()),
            Box::new(self.leader_changes.clone()),
            Box::new(self.elections_started.clone()),
            Box::new(self.elections_won.clone()),
            Box::new(self.elections_lost.clone()),
            Box::new(self.election_duration.clone()),
            Box::new(self.last_leader_contact_seconds.clone()),
            Box::new(self.peers_discovered.clone()),
            Box::new(self.voters.clone()),
            Box::new(self.learners.clone()),
            Box::new(self.peer_rpc_seconds.clone()),
            Box::new(self.peer_rpc_errors.clone()),
            Box::new(self.rejected_messages.clone()),
            Box::new(self.peer_connections_refused.clone()),
            Box::new(self.peer_connections.clone()),
            Box::new(self.http_refused.clone()),
            Box::new(self.status_file_errors.clone()),
            Box::new(self.dns_lookups.clone()),
            Box::new(self.membership_changes.clone()),
            Box::new(self.persist_errors.clone()),
            Box::new(self.build_info.clone()),
            Box::new(self.kube_requests.clone()),
            Box::new(self.kube_publish_seconds.clone()),
            Box::new(self.kube_publish_errors.clone()),
        ];
        for c in collectors {
            // Names are unique constants in a fresh registry: this cannot fail.
            self.registry.register(c).expect("metric registered once");
        }
    }

    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_renders_with_the_prefix() {
        let m = Metrics::new();
        m.rejected_messages
            .with_label_values(&["bad_signature"])
            .inc();
        m.dns_lookups.with_label_values(&["ok"]).inc();
        m.peer_rpc_errors.with_label_values(&["timeout"]).inc();
        m.peer_rpc_seconds
            .with_label_values(&["append_entries"])
            .observe(0.001);
        m.membership_changes
            .with_label_values(&["add_learner"])
            .inc();
        let text = m.render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("raft_elector_"), "{line}");
        }
        assert!(text.contains("raft_elector_build_info{version=\"0.1.0\"} 1"));
        assert!(text.contains("raft_elector_rejected_messages_total{reason=\"bad_signature\"} 1"));
    }
}
