//! Peer discovery against a real DNS server (in-process, over UDP/TCP sockets).

mod support;

use raft_elector::discovery::{
    self, resolve_once, DiscoveryConfig, DiscoveryError, DiscoverySource,
};
use raft_elector::metrics::Metrics;
use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;
use support::dns::TestDns;
use tokio::sync::{oneshot, watch};

const ZONE: &str = "elector.test.";
const SERVICE: &str = "elector.test";
const SRV_NAME: &str = "_raft._tcp.elector.test";
const PORT: u16 = 4041;
/// Longest wait for something the discovery task should do within a few intervals.
const WAIT: Duration = Duration::from_secs(5);

fn dns_source(server: SocketAddr) -> DiscoverySource {
    DiscoverySource::Dns {
        name: SERVICE.into(),
        port: PORT,
        server: Some(server),
    }
}

fn fast_config(source: DiscoverySource, interval: Duration) -> DiscoveryConfig {
    DiscoveryConfig {
        source,
        interval,
        max_backoff: Duration::from_millis(200),
        pace: None,
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn lookups(metrics: &Metrics, result: &str) -> u64 {
    metrics.dns_lookups.with_label_values(&[result]).get()
}

async fn wait_for_set(rx: &mut watch::Receiver<BTreeSet<String>>, expected: &BTreeSet<String>) {
    let result = tokio::time::timeout(WAIT, rx.wait_for(|peers| peers == expected))
        .await
        .map(|waited| waited.is_ok());
    match result {
        Ok(true) => {}
        Ok(false) => panic!("discovery stopped before publishing {expected:?}"),
        Err(_) => panic!(
            "discovery did not publish {expected:?} within {WAIT:?}; it shows {:?}",
            *rx.borrow()
        ),
    }
}

async fn wait_for_lookups(metrics: &Metrics, result: &str, at_least: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while lookups(metrics, result) < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "fewer than {at_least} {result} lookups within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_records_are_resolved_through_the_given_server() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(2), ip(1), ip(2)]);
    let peers = resolve_once(&dns_source(dns.addr)).await.unwrap();
    assert_eq!(peers, set(&["10.0.0.1:4041", "10.0.0.2:4041"]));
}

#[tokio::test]
async fn aaaa_records_are_published_in_brackets_next_to_a_records() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    dns.set_aaaa(SERVICE, &["fd00::1".parse().unwrap()]);
    let peers = resolve_once(&dns_source(dns.addr)).await.unwrap();
    assert_eq!(peers, set(&["10.0.0.1:4041", "[fd00::1]:4041"]));
}

#[tokio::test]
async fn srv_records_win_over_a_records_and_carry_their_ports() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(9)]);
    dns.set_srv(
        SRV_NAME,
        &[
            ("node-0.elector.test".into(), 5000),
            ("node-1.elector.test".into(), 5001),
        ],
    );
    dns.set_a("node-0.elector.test", &[ip(10)]);
    dns.set_a("node-1.elector.test", &[ip(11)]);
    let peers = resolve_once(&dns_source(dns.addr)).await.unwrap();
    assert_eq!(peers, set(&["10.0.0.10:5000", "10.0.0.11:5001"]));
}

#[tokio::test]
async fn an_unknown_name_resolves_to_an_empty_set() {
    let dns = TestDns::start(ZONE).await;
    let peers = resolve_once(&dns_source(dns.addr)).await.unwrap();
    assert!(peers.is_empty(), "{peers:?}");
    assert!(dns.queries() >= 3, "SRV, A and AAAA were asked");
}

#[tokio::test]
async fn a_failing_server_is_an_error_not_an_empty_set() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    dns.set_failing(true);
    let err = resolve_once(&dns_source(dns.addr)).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Lookup { .. }), "{err}");
    assert!(err.to_string().contains(SRV_NAME), "{err}");
}

#[tokio::test]
async fn a_refused_query_is_an_error() {
    let dns = TestDns::start(ZONE).await;
    let source = DiscoverySource::Dns {
        name: "elector.other".into(),
        port: PORT,
        server: Some(dns.addr),
    };
    let err = resolve_once(&source).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::Lookup { .. }), "{err}");
}

#[tokio::test]
async fn an_invalid_name_is_a_clear_error_without_any_query() {
    let dns = TestDns::start(ZONE).await;
    for name in ["", "bad name.test", "a..test"] {
        let source = DiscoverySource::Dns {
            name: name.into(),
            port: PORT,
            server: Some(dns.addr),
        };
        let err = resolve_once(&source).await.unwrap_err();
        assert!(matches!(err, DiscoveryError::InvalidName { .. }), "{err}");
        assert!(err.is_config_error());
        assert!(err.to_string().contains(&format!("{name:?}")), "{err}");
    }
    assert_eq!(dns.queries(), 0);
}

#[tokio::test]
async fn port_zero_is_refused() {
    let source = DiscoverySource::Dns {
        name: SERVICE.into(),
        port: 0,
        server: None,
    };
    let err = resolve_once(&source).await.unwrap_err();
    assert!(matches!(err, DiscoveryError::InvalidPort), "{err}");
}

#[tokio::test]
async fn static_entries_are_resolved_as_written() {
    let source = DiscoverySource::Static(vec![
        "node-1.elector:4041".into(),
        "10.0.0.1:4041".into(),
        "[fd00::1]:4041".into(),
    ]);
    let peers = resolve_once(&source).await.unwrap();
    assert_eq!(
        peers,
        set(&["10.0.0.1:4041", "[fd00::1]:4041", "node-1.elector:4041"])
    );
}

#[tokio::test]
async fn a_bad_static_entry_fails_the_whole_list() {
    let source = DiscoverySource::Static(vec!["10.0.0.1:4041".into(), "10.0.0.2".into()]);
    let err = resolve_once(&source).await.unwrap_err();
    assert!(
        matches!(err, DiscoveryError::InvalidStaticPeer { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("10.0.0.2"), "{err}");
}

#[tokio::test]
async fn the_spawned_task_publishes_a_static_list_without_counting_dns_lookups() {
    let metrics = Metrics::new();
    let source = DiscoverySource::Static(vec!["10.0.0.2:4041".into(), "10.0.0.1:4041".into()]);
    let mut rx = discovery::spawn(
        fast_config(source, Duration::from_millis(20)),
        metrics.clone(),
        std::future::pending(),
    );
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041", "10.0.0.2:4041"])).await;
    assert_eq!(metrics.peers_discovered.get(), 2);
    assert_eq!(lookups(&metrics, "ok") + lookups(&metrics, "error"), 0);
}

#[tokio::test]
async fn the_watch_follows_record_changes() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    let metrics = Metrics::new();
    let mut rx = discovery::spawn(
        fast_config(dns_source(dns.addr), Duration::from_millis(50)),
        metrics.clone(),
        std::future::pending(),
    );
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041"])).await;
    assert_eq!(metrics.peers_discovered.get(), 1);

    dns.set_a(SERVICE, &[ip(1), ip(2), ip(3)]);
    wait_for_set(
        &mut rx,
        &set(&["10.0.0.1:4041", "10.0.0.2:4041", "10.0.0.3:4041"]),
    )
    .await;
    assert_eq!(metrics.peers_discovered.get(), 3);

    dns.set_srv(SRV_NAME, &[("node-3.elector.test".into(), 5003)]);
    dns.set_a("node-3.elector.test", &[ip(3)]);
    wait_for_set(&mut rx, &set(&["10.0.0.3:5003"])).await;
    assert_eq!(metrics.peers_discovered.get(), 1);
    assert!(lookups(&metrics, "ok") >= 3);
}

#[tokio::test]
async fn servfail_keeps_the_last_good_set_and_counts_errors() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1), ip(2)]);
    let metrics = Metrics::new();
    let mut rx = discovery::spawn(
        fast_config(dns_source(dns.addr), Duration::from_millis(50)),
        metrics.clone(),
        std::future::pending(),
    );
    let good = set(&["10.0.0.1:4041", "10.0.0.2:4041"]);
    wait_for_set(&mut rx, &good).await;
    rx.mark_unchanged();

    dns.set_failing(true);
    wait_for_lookups(&metrics, "error", 3).await;
    assert_eq!(*rx.borrow(), good);
    assert!(
        !rx.has_changed().unwrap(),
        "a failure must not touch the set"
    );
    assert_eq!(metrics.peers_discovered.get(), 2);

    dns.set_a(SERVICE, &[ip(3)]);
    dns.set_failing(false);
    wait_for_set(&mut rx, &set(&["10.0.0.3:4041"])).await;
}

#[tokio::test]
async fn nxdomain_empties_the_set_only_after_two_consecutive_lookups() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    let metrics = Metrics::new();
    // A longer interval makes "published after the first empty answer" visible
    // as an empty count of 1 at the moment of the change.
    let mut rx = discovery::spawn(
        fast_config(dns_source(dns.addr), Duration::from_millis(300)),
        metrics.clone(),
        std::future::pending(),
    );
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041"])).await;

    dns.clear(SERVICE);
    wait_for_set(&mut rx, &BTreeSet::new()).await;
    assert!(
        lookups(&metrics, "empty") >= 2,
        "published empty after {} empty answer(s)",
        lookups(&metrics, "empty")
    );
    assert_eq!(metrics.peers_discovered.get(), 0);
}

#[tokio::test]
async fn the_task_stops_when_shutdown_resolves() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    let (stop, stopped) = oneshot::channel::<()>();
    let mut rx = discovery::spawn(
        fast_config(dns_source(dns.addr), Duration::from_millis(20)),
        Metrics::new(),
        async move {
            let _ = stopped.await;
        },
    );
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041"])).await;
    stop.send(()).unwrap();
    let closed = tokio::time::timeout(WAIT, async { while rx.changed().await.is_ok() {} }).await;
    assert!(closed.is_ok(), "the sender was not dropped after shutdown");
}

#[tokio::test]
async fn the_test_server_answers_over_tcp_too() {
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::name_server::TokioConnectionProvider;
    use hickory_resolver::proto::xfer::Protocol;
    use hickory_resolver::TokioResolver;

    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(7)]);
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(dns.addr, Protocol::Tcp));
    let resolver =
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default()).build();
    let answer = resolver.ipv4_lookup("elector.test.").await.unwrap();
    let ips: Vec<Ipv4Addr> = answer.iter().map(|a| a.0).collect();
    assert_eq!(ips, [ip(7)]);
}

#[tokio::test]
async fn a_slower_pace_spaces_lookups_out_and_a_new_pace_looks_up_at_once() {
    let dns = TestDns::start(ZONE).await;
    dns.set_a(SERVICE, &[ip(1)]);
    let metrics = Metrics::new();
    // A joined follower's pace: one lookup, then nothing for a long time.
    let (pace_tx, pace) = watch::channel(Duration::from_secs(60));
    let mut cfg = fast_config(dns_source(dns.addr), Duration::from_millis(20));
    cfg.pace = Some(pace);
    let mut rx = discovery::spawn(cfg, metrics.clone(), std::future::pending());
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041"])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lookups(&metrics, "ok"),
        1,
        "the pace, not the interval, spaces lookups"
    );

    // Leader now: the new set is looked up at once and then often.
    dns.set_a(SERVICE, &[ip(1), ip(2)]);
    pace_tx.send_replace(Duration::from_millis(20));
    wait_for_set(&mut rx, &set(&["10.0.0.1:4041", "10.0.0.2:4041"])).await;
    wait_for_lookups(&metrics, "ok", 4).await;
}
