//! Network faults between real processes, each on its own "host": a network
//! namespace whose `eth0` is a veth on a bridge (in a namespace of its own),
//! plus a management veth to the test's namespace that carries only the
//! `/is-leader` sampling, so faults on the peer network never hide what a
//! node answers.
//!
//! ```text
//!  test process (root ns) ── mgmt veth 10.203.<m>.<4i+1>/30 ──► host i: mgmt0 (HTTP :4040)
//!  bridge ns: br0 ── p<i> ◄─ veth ─► host i: eth0 10.203.<p>.<10+i>/24 (peers :4041)
//! ```
//!
//! Needs root (CI runs as root); every test prints why and passes without
//! doing anything when namespaces cannot be made. Addresses are only from
//! 10.203.0.0/16, only on interfaces these tests create; everything is
//! deleted on drop (and leftovers of a crashed run are deleted first).

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::Duration;
use support::cluster::{Cluster, ClusterConfig, PeerDiscovery, Placement};

/// Hosts per test.
const HOSTS: usize = 5;
/// Peer port inside every host.
const PEER_PORT: u16 = 4041;
/// App API port inside every host.
const HTTP_PORT: u16 = 4040;

/// Runs `ip`/`tc` with `args`; returns stderr on failure.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Five hosts on one bridge; see the module doc. Deleted on drop.
struct Hosts {
    tag: &'static str,
    peer_net: u8,
    mgmt_net: u8,
}

impl Hosts {
    /// Builds the hosts, or returns why it cannot (not root, no netns).
    fn build(tag: &'static str, peer_net: u8, mgmt_net: u8) -> Result<Hosts, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".to_string());
        }
        let hosts = Hosts {
            tag,
            peer_net,
            mgmt_net,
        };
        hosts.delete();
        let bridge = hosts.bridge_ns();
        sh("ip", &["netns", "add", &bridge])?;
        sh(
            "ip",
            &["-n", &bridge, "link", "add", "br0", "type", "bridge"],
        )?;
        sh("ip", &["-n", &bridge, "link", "set", "br0", "up"])?;
        for i in 0..HOSTS {
            hosts.build_host(i)?;
        }
        Ok(hosts)
    }

    fn build_host(&self, i: usize) -> Result<(), String> {
        let (bridge, host, port, mgmt) = (
            self.bridge_ns(),
            self.host_ns(i),
            self.port(i),
            self.mgmt_if(i),
        );
        let peer_ip = format!("{}/24", self.peer_ip(i));
        let host_mgmt = format!("{}/30", self.mgmt_ip(i));
        let root_mgmt = format!("{}/30", self.mgmt_root_ip(i));
        sh("ip", &["netns", "add", &host])?;
        sh("ip", &["-n", &host, "link", "set", "lo", "up"])?;
        sh(
            "ip",
            &[
                "-n", &bridge, "link", "add", &port, "type", "veth", "peer", "name", "eth0",
                "netns", &host,
            ],
        )?;
        sh(
            "ip",
            &["-n", &bridge, "link", "set", &port, "master", "br0", "up"],
        )?;
        sh("ip", &["-n", &host, "addr", "add", &peer_ip, "dev", "eth0"])?;
        sh("ip", &["-n", &host, "link", "set", "eth0", "up"])?;
        sh(
            "ip",
            &[
                "link", "add", &mgmt, "type", "veth", "peer", "name", "mgmt0", "netns", &host,
            ],
        )?;
        sh("ip", &["addr", "add", &root_mgmt, "dev", &mgmt])?;
        sh("ip", &["link", "set", &mgmt, "up"])?;
        sh(
            "ip",
            &["-n", &host, "addr", "add", &host_mgmt, "dev", "mgmt0"],
        )?;
        sh("ip", &["-n", &host, "link", "set", "mgmt0", "up"])?;
        Ok(())
    }

    fn bridge_ns(&self) -> String {
        format!("raft-itest-{}-br", self.tag)
    }

    fn host_ns(&self, i: usize) -> String {
        format!("raft-itest-{}-h{i}", self.tag)
    }

    /// The host's bridge port (in the bridge namespace).
    fn port(&self, i: usize) -> String {
        format!("p{i}")
    }

    /// The root-namespace end of the host's management veth.
    fn mgmt_if(&self, i: usize) -> String {
        format!("rit{}m{i}", self.tag)
    }

    fn peer_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 203, self.peer_net, 10 + i as u8)
    }

    fn mgmt_root_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 203, self.mgmt_net, 4 * i as u8 + 1)
    }

    fn mgmt_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 203, self.mgmt_net, 4 * i as u8 + 2)
    }

    fn placements(&self) -> Vec<Placement> {
        (0..HOSTS)
            .map(|i| Placement {
                http: SocketAddr::new(IpAddr::V4(self.mgmt_ip(i)), HTTP_PORT),
                peer: SocketAddr::new(IpAddr::V4(self.peer_ip(i)), PEER_PORT),
                netns: Some(self.host_ns(i)),
            })
            .collect()
    }

    /// Cuts host `i` off the peer network (both directions).
    fn isolate(&self, i: usize) -> Result<(), String> {
        sh(
            "ip",
            &[
                "-n",
                &self.bridge_ns(),
                "link",
                "set",
                &self.port(i),
                "down",
            ],
        )
    }

    /// Delays every peer packet by `delay` and drops `loss` of them, on both
    /// ends of every host's peer link (so each direction is delayed once).
    fn impair(&self, delay: &str, loss: &str) -> Result<(), String> {
        for i in 0..HOSTS {
            for (ns, dev) in [
                (self.host_ns(i), "eth0".to_string()),
                (self.bridge_ns(), self.port(i)),
            ] {
                sh(
                    "ip",
                    &[
                        "netns", "exec", &ns, "tc", "qdisc", "add", "dev", &dev, "root", "netem",
                        "delay", delay, "loss", loss,
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Deletes everything these hosts may have created; ignores what is absent.
    fn delete(&self) {
        for i in 0..HOSTS {
            let _ = sh("ip", &["netns", "del", &self.host_ns(i)]);
            let _ = sh("ip", &["link", "del", &self.mgmt_if(i)]);
        }
        let _ = sh("ip", &["netns", "del", &self.bridge_ns()]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.delete();
    }
}

/// Builds hosts or prints why the test is skipped.
fn hosts_or_skip(test: &str, tag: &'static str, peer_net: u8, mgmt_net: u8) -> Option<Hosts> {
    match Hosts::build(tag, peer_net, mgmt_net) {
        Ok(hosts) => Some(hosts),
        Err(reason) => {
            eprintln!("SKIPPED {test}: cannot build network namespaces ({reason}); run as root with iproute2 to include it");
            None
        }
    }
}

fn static_config() -> ClusterConfig {
    ClusterConfig {
        discovery: PeerDiscovery::Static,
        extra_args: Vec::new(),
        ..ClusterConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_into_a_minority_stops_answering_200_before_the_majority_elects() {
    let test = "a_leader_cut_off_into_a_minority_stops_answering_200_before_the_majority_elects";
    // Declared before the cluster, so the processes die before their hosts.
    let Some(hosts) = hosts_or_skip(test, "pa", 10, 11) else {
        return;
    };
    let mut cluster = Cluster::start_placed(hosts.placements(), static_config()).await;
    let old = cluster
        .wait_for_single_leader(Duration::from_secs(15))
        .await;
    cluster.start_sampling(Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cut_at = cluster.micros(std::time::Instant::now());
    hosts.isolate(old).expect("take the leader's link down");
    cluster
        .wait_until(
            Duration::from_secs(10),
            "the majority elected a new leader",
            || async {
                for slot in 0..HOSTS {
                    if slot != old && cluster.status(slot).await.is_some_and(|s| s.is_leader) {
                        return true;
                    }
                }
                false
            },
        )
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let timeline = cluster.stop_sampling().await;

    let stepped_down = timeline
        .first_after(cut_at, |s| s.slot == old && !s.is_200())
        .expect("the isolated leader stopped answering 200");
    let elected = timeline
        .first_after(cut_at, |s| s.slot != old && s.is_200())
        .expect("a majority node answered 200");
    assert!(
        stepped_down.received_us < elected.sent_us,
        "the old leader's last 200 was not provably before the new leader's first: {stepped_down:?} vs {elected:?}"
    );
    assert!(
        timeline.violations().is_empty(),
        "{:?}",
        timeline.violations()
    );
    eprintln!(
        "isolated leader answered 503 {:?} after the cut; new leader 200 {:?} after the cut",
        Duration::from_micros(stepped_down.received_us - cut_at),
        Duration::from_micros(elected.received_us - cut_at)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_ms_rtt_and_five_percent_loss_cause_no_leader_flapping() {
    let test = "twenty_ms_rtt_and_five_percent_loss_cause_no_leader_flapping";
    let Some(hosts) = hosts_or_skip(test, "ne", 20, 21) else {
        return;
    };
    if let Err(reason) = hosts.impair("10ms", "5%") {
        eprintln!(
            "SKIPPED {test}: cannot add a netem qdisc ({reason}); the kernel needs sch_netem"
        );
        return;
    }
    let mut cluster = Cluster::start_placed(hosts.placements(), static_config()).await;
    cluster
        .wait_for_single_leader(Duration::from_secs(15))
        .await;
    cluster.start_sampling(Duration::from_millis(5));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let timeline = cluster.stop_sampling().await;

    let leaderships = timeline.leaderships();
    assert!(!leaderships.is_empty(), "a leader answered 200");
    assert!(
        leaderships.len() <= 2,
        "the leader changed {} times in 20 s: {leaderships:?}",
        leaderships.len() - 1
    );
    assert!(
        timeline.violations().is_empty(),
        "{:?}",
        timeline.violations()
    );
    eprintln!(
        "leaderships under netem: {leaderships:?}; longest gap {:?}",
        timeline.max_leaderless_gap()
    );
}
