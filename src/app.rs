//! Wiring: builds the node and every adapter around it from a validated
//! [`RunConfig`], and runs them until shutdown. This is the only module that
//! knows all the others; each adapter talks to the node through channels.
//!
//! [`run`] takes the shutdown signal as a future, so `main` only wires
//! signals. On shutdown the node hands leadership over and leaves the
//! configuration first; the listeners stop after it.

use crate::api;
use crate::cli::{Discovery, RunConfig};
use crate::discovery::{self, DiscoveryConfig, DiscoverySource};
use crate::kube;
use crate::leadership::LeaderState;
use crate::metrics::Metrics;
use crate::raft::{NodeId, RaftCore, Time};
use crate::runtime::bootstrap::{FirstConfigRecord, RecordAsk, RecordRead, RecordedAgreement};
use crate::runtime::{MembershipPolicy, NodeOptions, NodeTask};
use crate::storage::{FileStore, HardStateStore, MemoryStore};
use crate::timer::{next_tick, DeadlineTimer};
use crate::transport::{PeerInfo, Transport, TransportConfig};
use anyhow::{bail, Context};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

/// How long a new peer must be seen before the leader adds it.
const ADD_AFTER: Duration = Duration::from_secs(1);
/// Longest graceful shutdown; the pod's grace period is 30 s by default.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Period of peer probes while this node has not joined a cluster.
const PROBE_WHILE_JOINING: Duration = Duration::from_millis(250);
/// A joined follower probes this many times less often than a leader.
const FOLLOWER_PROBE_FACTOR: u32 = 10;
/// How long after a lookup tick (`timer::next_tick`) the hello probes go
/// out: the lookup of that tick has answered by then.
const PROBE_AFTER_LOOKUP: Duration = Duration::from_millis(100);
/// Time limit of a peer dial (connect and handshake) and of a hello.
const PEER_REQUEST_TIMEOUT: Duration = Duration::from_millis(500);
/// How long connections get to deliver their goodbyes at shutdown.
const GOODBYE_DRAIN: Duration = Duration::from_millis(100);
/// Accept queue of the peer port (the kernel caps it at `somaxconn`).
const PEER_ACCEPT_BACKLOG: u32 = 4096;
/// Capacity of the inbound peer-message queue.
const INBOUND_QUEUE: usize = 1024;

/// Runs the sidecar until `shutdown` resolves and the node has left.
pub async fn run(
    cfg: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    for w in &cfg.warnings {
        warn!("{w}");
    }
    let metrics = Metrics::new();
    let (store, core) = open_core(&cfg)?;
    let epoch = Instant::now();
    info!(
        id = %core.id(),
        restored = !core.log().is_empty(),
        advertise = %cfg.advertise,
        "starting raft-elector"
    );

    let mut tcfg = TransportConfig::new(cfg.cluster_id.clone(), cfg.secret.clone());
    // Long enough for one TCP retransmission (Linux's minimum RTO is
    // 200 ms) during a dial.
    tcfg.request_timeout = PEER_REQUEST_TIMEOUT;
    tcfg.validate().context("invalid transport settings")?;
    let tcfg = Arc::new(tcfg);
    // Peers' messages, answers included, arrive on the node's inbound queue.
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };

    let peer_listener = bind_peer_listener(cfg.peer_listen).with_context(|| {
        format!(
            "cannot listen for peers on {}: is the port in use? set --peer-listen",
            cfg.peer_listen
        )
    })?;
    let http_listener = TcpListener::bind(cfg.http_listen).await.with_context(|| {
        format!(
            "cannot listen for the HTTP API on {}: is the port in use? set --http-listen",
            cfg.http_listen
        )
    })?;

    if let Some(path) = &cfg.status_file {
        api::check_status_file(path).with_context(|| {
            format!(
                "cannot keep the status file at {}: set --status-file to a file in an existing, writable directory",
                path.display()
            )
        })?;
    }

    let (seen_tx, seen_rx) = mpsc::channel(256);
    let (identity_tx, identity_rx) = watch::channel(PeerInfo {
        cluster_id: cfg.cluster_id.clone(),
        id: core.id().clone(),
        address: cfg.advertise.clone(),
        joined: false,
        term: core.term().0,
        leader: None,
        leaving: false,
        bootstrap_lock: core.bootstrap_lock().cloned(),
    });
    let (state_tx, state_rx) = watch::channel(LeaderState::initial(
        core.id().to_string(),
        core.id().name.to_string(),
    ));

    let mut tasks = JoinSet::new();
    let transport = Transport::new(tcfg, metrics.clone(), identity_rx.clone(), inbound_tx);
    let serving = transport.clone();
    let peer_stop = stopped();
    tasks.spawn(async move { serving.serve(peer_listener, peer_stop).await });
    let app = api::router(state_rx.clone(), metrics.clone());
    let http_stop = stopped();
    let http_metrics = metrics.clone();
    tasks.spawn(async move { api::serve(http_listener, app, http_metrics, http_stop).await });
    if let Some(path) = cfg.status_file.clone() {
        let handle = api::spawn_status_file(path, state_rx.clone(), metrics.clone(), stopped());
        tasks.spawn(async move {
            let _ = handle.await;
        });
    }

    let source = match &cfg.discovery {
        Discovery::Dns { name, port, server } => DiscoverySource::Dns {
            name: name.clone(),
            port: *port,
            server: *server,
        },
        Discovery::Static(list) => DiscoverySource::Static(list.clone()),
    };
    source
        .validate()
        .context("invalid discovery settings (--service / --peers)")?;
    let mut dcfg = DiscoveryConfig::new(source);
    dcfg.interval = cfg.dns_interval;
    let (pace_tx, pace) = watch::channel(cfg.dns_interval);
    dcfg.pace = Some(pace);
    let peers = discovery::spawn(dcfg, metrics.clone(), stopped());
    tasks.spawn(probe_peers(
        transport.clone(),
        peers,
        cfg.advertise.clone(),
        seen_tx,
        cfg.dns_interval,
        identity_rx,
        pace_tx,
        stopped(),
    ));

    let recorder = if cfg.kubernetes {
        start_kube(&cfg, &state_rx, &metrics, &stopped, &mut tasks).await?
    } else {
        None
    };
    if cfg.bootstrap_expect.is_none() && core.log().is_empty() {
        info!("no --bootstrap-expect: this node joins an existing cluster when its leader adds it");
    }
    let opts = NodeOptions {
        cluster_id: cfg.cluster_id.clone(),
        advertise: cfg.advertise.clone(),
        bootstrap_expect: cfg.bootstrap_expect,
        membership: MembershipPolicy {
            add_after: ADD_AFTER,
            removal_grace: cfg.removal_grace,
        },
        shutdown_timeout: SHUTDOWN_TIMEOUT,
    };
    let max_voters = core.config().max_voters;
    let mut node = NodeTask::new(
        core,
        epoch,
        opts,
        store,
        Box::new(transport.clone()),
        metrics,
        state_tx,
        identity_tx,
    );
    if let (Some(handle), Some(expect)) = (recorder, cfg.bootstrap_expect) {
        // With Kubernetes on, the LeaderElection record decides the first
        // configuration instead of the members' local agreement.
        info!("the first configuration is recorded in the LeaderElection by compare-and-swap");
        node = node
            .with_bootstrap_authority(Box::new(RecordedAgreement::new(expect, max_voters, handle)));
    }
    // A spawned task, not the runtime's main future: waking the main future
    // goes through the driver's eventfd, one more syscall and wakeup for
    // every message, which is most of a sidecar's idle CPU.
    let result = match tokio::spawn(node.run(inbound_rx, seen_rx, shutdown)).await {
        Ok(result) => result.map_err(anyhow::Error::from),
        Err(e) => Err(anyhow::anyhow!("the node task failed: {e}")),
    };
    let _ = stop_tx.send(true);
    // Peers learn that this end is deliberate, not a crash.
    transport.close_all();
    tokio::time::sleep(GOODBYE_DRAIN).await;
    // Listeners drain briefly; nothing they do matters once the node is gone.
    let drained = tokio::time::timeout(Duration::from_millis(200), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tasks.abort_all();
    }
    result
}

/// Binds the peer port with a long accept queue: during a connection flood
/// the accept loop closes strangers at once, and a short queue would only
/// make the kernel hold (and retry) connections the loop has not seen yet.
fn bind_peer_listener(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(PEER_ACCEPT_BACKLOG)
}

/// Starts Kubernetes publishing and, when this member bootstraps
/// (`--bootstrap-expect`), the recorder of the first configuration in the
/// LeaderElection; returns the recorder's handle for the node. Publishing
/// failures never reach the node: only an unusable `--kubeconfig` the user
/// asked for stops startup; without any configuration the sidecar runs
/// unpublished (and bootstraps by local agreement) and says so.
async fn start_kube<F>(
    cfg: &RunConfig,
    state: &watch::Receiver<LeaderState>,
    metrics: &Metrics,
    stopped: &impl Fn() -> F,
    tasks: &mut JoinSet<()>,
) -> anyhow::Result<Option<kube::bootstrap::RecorderHandle>>
where
    F: Future<Output = ()> + Send + 'static,
{
    let settings = kube::KubeSettings {
        kubeconfig: cfg.kubeconfig.clone(),
        namespace: cfg.pod.namespace.clone(),
        me: cfg.id.clone(),
        pod_uid: cfg.pod.uid.clone(),
        cluster_id: cfg.cluster_id.clone(),
        pod_selector: cfg.pod_selector.clone(),
        spec: kube_spec(cfg),
    };
    let conn = match kube::connect(settings, metrics).await {
        Ok(conn) => conn,
        Err(e) if cfg.kubeconfig.is_some() => return Err(e).context("Kubernetes publishing"),
        Err(e) => {
            warn!(error = %e, "Kubernetes publishing off; /is-leader, /leader and the status file still carry leadership");
            return Ok(None);
        }
    };
    tasks.spawn(conn.publisher(state.clone(), metrics.clone(), stopped()));
    if cfg.bootstrap_expect.is_none() {
        return Ok(None);
    }
    let (handle, recorder) = conn.bootstrap_recorder(state.clone(), stopped());
    tasks.spawn(recorder);
    Ok(Some(handle))
}

/// The node's bootstrap authority reads and asks the LeaderElection record
/// through the Kubernetes recorder (the two sides' types mirror each other,
/// so neither module imports the other).
impl FirstConfigRecord for kube::bootstrap::RecorderHandle {
    fn read(&self) -> RecordRead {
        match kube::bootstrap::RecorderHandle::read(self) {
            kube::bootstrap::Known::Unread => RecordRead::Unread,
            kube::bootstrap::Known::Empty => RecordRead::Empty,
            kube::bootstrap::Known::Members {
                members,
                max_voters,
            } => RecordRead::Members {
                members,
                max_voters,
            },
        }
    }

    fn ask(&mut self, ask: RecordAsk) {
        let ask = match ask {
            RecordAsk::Read => kube::bootstrap::Ask::Read,
            RecordAsk::Record { members, by } => kube::bootstrap::Ask::Record { members, by },
            RecordAsk::Forget { recorded, replaced } => {
                kube::bootstrap::Ask::Forget { recorded, replaced }
            }
        };
        kube::bootstrap::RecorderHandle::ask(self, ask);
    }
}

/// Returns the LeaderElection spec this member writes if it creates the CR.
fn kube_spec(cfg: &RunConfig) -> kube::crd::LeaderElectionSpec {
    let ms = |d: Duration| Some(format!("{}ms", d.as_millis()));
    kube::crd::LeaderElectionSpec {
        service: match &cfg.discovery {
            Discovery::Dns { name, .. } => Some(name.clone()),
            Discovery::Static(_) => None,
        },
        peer_port: cfg.peer_listen.port(),
        pod_selector: cfg.pod_selector.clone(),
        expected_members: cfg.bootstrap_expect.and_then(|n| u32::try_from(n).ok()),
        max_voters: u32::try_from(cfg.raft.max_voters).unwrap_or(u32::MAX),
        election_timeout_min: ms(cfg.raft.election_timeout_min),
        election_timeout_max: ms(cfg.raft.election_timeout_max),
        heartbeat_interval: ms(cfg.raft.heartbeat_interval),
    }
}

/// Opens the state store and builds the core: restored from disk, or a new
/// incarnation when there is no state.
fn open_core(cfg: &RunConfig) -> anyhow::Result<(Box<dyn HardStateStore>, RaftCore)> {
    let store: Box<dyn HardStateStore> = match &cfg.state_dir {
        Some(dir) => Box::new(FileStore::open(dir)?),
        None => Box::new(MemoryStore::default()),
    };
    let seed = rand::random();
    let core = match store.load()? {
        Some(state) => {
            if *state.id.name != *cfg.id {
                bail!(
                    "the state in {:?} belongs to member {:?}, not {:?}: give each member its own --state-dir",
                    cfg.state_dir,
                    state.id.name,
                    cfg.id
                );
            }
            RaftCore::restore(
                cfg.raft.clone(),
                state,
                cfg.advertise.clone(),
                seed,
                Time::ZERO,
            )
            .map_err(|e| {
                anyhow::anyhow!(
                    "persisted state is inconsistent ({e}); move it away to start as a new member"
                )
            })?
        }
        None => {
            let id = NodeId::new(cfg.id.clone(), rand::random());
            RaftCore::fresh(
                cfg.raft.clone(),
                id,
                cfg.advertise.clone(),
                seed,
                Time::ZERO,
            )
        }
    };
    Ok((store, core))
}

/// Asks every discovered address who it is, each `interval` and whenever
/// discovery changes, and hands the answers to the node.
#[allow(clippy::too_many_arguments)]
async fn probe_peers(
    transport: Transport,
    mut peers: watch::Receiver<BTreeSet<String>>,
    own: String,
    seen: mpsc::Sender<PeerInfo>,
    interval: Duration,
    mut identity: watch::Receiver<PeerInfo>,
    dns_pace: watch::Sender<Duration>,
    stop: impl Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut timer = DeadlineTimer::new();
    loop {
        let addrs: Vec<String> = peers
            .borrow_and_update()
            .iter()
            .filter(|a| **a != own)
            .cloned()
            .collect();
        let mut asks = JoinSet::new();
        for addr in addrs {
            let t = transport.clone();
            asks.spawn(async move { t.hello(&addr).await });
        }
        while let Some(answer) = asks.join_next().await {
            if let Ok(Ok(info)) = answer {
                if seen.send(info).await.is_err() {
                    return;
                }
            }
        }
        // Until this node has joined, ask often: bootstrap and joining wait
        // on it. A leader asks every interval: membership decides from it. A
        // joined follower decides nothing, so it asks rarely (idle CPU).
        // DNS follows the same pace, except that it never goes faster than
        // the configured interval.
        let (wait, dns_wait) = {
            let me = identity.borrow();
            if !me.joined {
                (interval.min(PROBE_WHILE_JOINING), interval)
            } else if me.leader.as_ref() == Some(&me.id) {
                (interval, interval)
            } else {
                let slow = interval * FOLLOWER_PROBE_FACTOR;
                (slow, slow)
            }
        };
        dns_pace.send_if_modified(|pace| std::mem::replace(pace, dns_wait) != dns_wait);
        tokio::select! {
            // Re-ask on a timer: membership needs to know who is still there.
            // A kernel timer (no wakeups of tokio's timer wheel), a little
            // after discovery's lookup on the same tick, so the probes ask
            // the addresses that lookup found, not the ones before it.
            _ = timer.sleep_until(next_tick(wait) + PROBE_AFTER_LOOKUP.min(wait / 2)) => {}
            // Discovery changed: ask the new set at once.
            changed = peers.changed() => if changed.is_err() { return },
            // Joined, or became or stopped being leader: the pace changes.
            changed = identity.changed() => if changed.is_err() { return },
            _ = &mut stop => return,
        }
    }
}
