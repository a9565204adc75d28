//! A flood of unauthenticated connections against the leader's peer port
//! (10,000 idle, 1,000 slow partial handshakes, 1,000 garbage frames)
//! while every node's `/is-leader` is sampled every 2 ms: the leader stays,
//! its lease never lapses, its memory stays bounded, every flood connection
//! is closed within the handshake deadline, and the flood shows in
//! `raft_elector_peer_connections_refused_total`.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::cluster::{metric_value, Cluster, ClusterConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

const IDLE: usize = 10_000;
const SLOW: usize = 1_000;
const GARBAGE: usize = 1_000;
/// The node's handshake deadline, and how late a close may be observed
/// (scheduling on a loaded 2-CPU machine).
const DEADLINE: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_millis(1500);
/// Connections being opened at once.
const CONCURRENT_CONNECTS: usize = 256;
/// Largest allowed growth of the leader's resident memory.
const MAX_RSS_GROWTH_KIB: u64 = 30 * 1024;

/// Raises the soft open-file limit so the flood fits (children inherit it).
fn raise_nofile(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a valid struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        if lim.rlim_cur >= want {
            return;
        }
        // Root may raise the hard limit too; others get what the hard limit allows.
        let raised = libc::rlimit {
            rlim_cur: want,
            rlim_max: lim.rlim_max.max(want),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return;
        }
        lim.rlim_cur = lim.rlim_max.min(want);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    assert!(
        lim.rlim_cur >= want,
        "RLIMIT_NOFILE hard limit {} is below the {want} the flood needs",
        lim.rlim_max
    );
}

/// Returns the kernel's count of connections dropped from full accept
/// queues (machine-wide; printed to tell a slow accept loop from ours).
fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[derive(Clone, Copy)]
enum Kind {
    Idle,
    Slow,
    Garbage,
}

/// Opens one flood connection of `kind`, then waits for the node to close
/// it; returns how long after connecting it closed (None: still open at
/// the limit, or the connect failed).
async fn flood_one(addr: String, kind: Kind, seed: u64) -> Result<Duration, String> {
    let mut stream = TcpStream::connect(&addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connected = Instant::now();
    let limit = DEADLINE + SLACK;
    let mut buf = [0u8; 64];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    match kind {
        Kind::Idle => {}
        Kind::Garbage => {
            let len = 32 + (rand() % 64) as usize;
            let mut frame = (len as u32).to_be_bytes().to_vec();
            frame.extend((0..len).map(|_| rand() as u8));
            let _ = stream.write_all(&frame).await;
        }
        Kind::Slow => {
            // A handshake message's length prefix, then a byte now and then.
            let _ = stream.write_all(&[0, 0, 0, 48]).await;
            loop {
                tokio::select! {
                    read = stream.read(&mut buf) => {
                        if matches!(read, Ok(0) | Err(_)) { return Ok(connected.elapsed()) }
                    }
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {
                        if stream.write_all(&[rand() as u8]).await.is_err() {
                            return Ok(connected.elapsed());
                        }
                    }
                }
                if connected.elapsed() > limit {
                    return Err("slow handshake still open".into());
                }
            }
        }
    }
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(connected.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(connected.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return Err("still open after the deadline".into()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_neither_moves_the_leader_nor_grows_its_memory() {
    raise_nofile((IDLE + SLOW + GARBAGE + 2048) as u64);
    let mut cluster = Cluster::start(3, ClusterConfig::default()).await;
    let leader = cluster
        .wait_for_single_leader(Duration::from_secs(10))
        .await;
    let before = cluster.status(leader).await.expect("leader answers");
    let pid = cluster.node(leader).pid().expect("leader runs");
    let addr = cluster.node(leader).placement.peer.to_string();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = rss_kib(pid);
    cluster.start_sampling(Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let overflows_before = listen_overflows();
    let started = Instant::now();
    let gate = Arc::new(Semaphore::new(CONCURRENT_CONNECTS));
    let max_rss = Arc::new(AtomicU64::new(rss_before));
    let watcher = {
        let max_rss = max_rss.clone();
        tokio::spawn(async move {
            loop {
                max_rss.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let mut tasks = Vec::new();
    let kinds = (0..IDLE)
        .map(|_| Kind::Idle)
        .chain((0..SLOW).map(|_| Kind::Slow))
        .chain((0..GARBAGE).map(|_| Kind::Garbage));
    // Interleaved so slow and garbage connections arrive during the idle flood.
    let mut kinds: Vec<Kind> = kinds.collect();
    let seed = 0x5eed_f100d_u64;
    println!("flood seed {seed:#x}");
    let n = kinds.len();
    for i in 0..n {
        kinds.swap(i, (i * 7919 + seed as usize) % n);
    }
    for (i, kind) in kinds.into_iter().enumerate() {
        let permit = gate.clone().acquire_owned().await.unwrap();
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            // The gate bounds connects in flight, not connections held.
            let held = flood_one(addr, kind, seed + i as u64);
            tokio::pin!(held);
            tokio::select! {
                out = &mut held => { drop(permit); out }
                _ = tokio::time::sleep(Duration::from_millis(20)) => { drop(permit); held.await }
            }
        }));
    }
    let mut closed = 0;
    let mut problems = Vec::new();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        match t.await.expect("flood task") {
            Ok(took) => {
                closed += 1;
                slowest = slowest.max(took);
            }
            Err(e) => problems.push(e),
        }
    }
    let flood_took = started.elapsed();
    watcher.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let timeline = cluster.stop_sampling().await;
    let after = cluster
        .status(leader)
        .await
        .expect("leader answers after the flood");
    let metrics = cluster.get(leader, "/metrics").await.expect("metrics").1;
    let refused: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("raft_elector_peer_connections_refused_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    let rss_growth = max_rss.load(Ordering::Relaxed).saturating_sub(rss_before);
    println!(
        "flood of {n} connections took {flood_took:?}; closed {closed}, slowest close {slowest:?}; \
         refused {refused}; leader RSS {rss_before} KiB, growth at most {rss_growth} KiB; \
         accept-queue overflows {}; lease lapses {:?}; leaderships {:?}",
        listen_overflows() - overflows_before,
        timeline.lease_lapses(),
        timeline.leaderships()
    );
    let problem_sample: Vec<_> = problems.iter().take(5).collect();
    assert!(
        problems.is_empty(),
        "{} flood connections misbehaved, e.g. {problem_sample:?}",
        problems.len()
    );
    assert!(
        slowest <= DEADLINE + SLACK,
        "a connection lived {slowest:?}"
    );
    assert!(
        refused >= n as f64,
        "the flood shows in the metric: {refused} < {n}"
    );
    assert!(
        metric_value(
            &metrics,
            "raft_elector_peer_connections_refused_total{reason=\"handshake_cap\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "connections beyond the cap were closed at once"
    );
    assert!(
        rss_growth <= MAX_RSS_GROWTH_KIB,
        "leader RSS grew {rss_growth} KiB"
    );
    assert_eq!(after.term, before.term, "the term stayed");
    assert_eq!(after.leader, before.leader, "the leader stayed");
    assert_eq!(
        timeline.leaderships(),
        vec![(leader, before.term)],
        "one leadership throughout"
    );
    assert!(
        timeline.lease_lapses().is_empty(),
        "lease lapses: {:?}",
        timeline.lease_lapses()
    );
    assert!(timeline.violations().is_empty());
}
