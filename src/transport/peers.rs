//! The registry of peer connections, the listener and its bounds.
//!
//! Invariants:
//! - At most one *registered* connection per peer [`NodeId`]; a second one
//!   (both dialed at once, or a redial) is settled by [`prefer`] and the
//!   other closed with a goodbye.
//! - At most one dial per address at a time; messages for it wait in a
//!   bounded queue and go out once it is authenticated (or are dropped).
//! - An accepted connection holds one of `max_handshaking` permits until it
//!   has authenticated, and is closed at the handshake deadline; without a
//!   permit it is closed at once. Every refusal is counted in
//!   `peer_connections_refused_total{reason}` and logged rate-limited.

use super::connection::{self, End, Established, Link, ReaderContext};
use super::quiet::Switch;
use super::wire::Frame;
use super::{Inbound, PeerInfo, SendToPeer, TransportConfig, TransportError};
use crate::metrics::Metrics;
use crate::raft::{Message, NodeId};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Messages waiting for one address's dial.
const DIAL_QUEUE: usize = 64;
/// After a failed dial, the address is not dialed again for this long
/// (messages for it are dropped meanwhile; Raft resends).
const DIAL_BACKOFF: Duration = Duration::from_millis(100);
/// Pause of the accept loop after an accept error (e.g. out of descriptors).
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// At most one warning per reason in this period.
const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// The peer transport of one node; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: Arc<TransportConfig>,
    metrics: Metrics,
    me: watch::Receiver<PeerInfo>,
    inbound: mpsc::Sender<Inbound>,
    registry: Mutex<Registry>,
    handshaking: Arc<Semaphore>,
    warned: Mutex<HashMap<&'static str, (Instant, u64)>>,
    quiet: Switch,
}

#[derive(Default)]
struct Registry {
    links: HashMap<NodeId, Link>,
    /// Address (dialed, or advertised by the peer) → who is there.
    at: HashMap<String, NodeId>,
    dials: HashMap<String, Dial>,
    /// When a dial to an address last failed.
    failed: HashMap<String, Instant>,
    next_serial: u64,
}

#[derive(Default)]
struct Dial {
    queued: Vec<Frame>,
    waiters: Vec<oneshot::Sender<Option<Link>>>,
}

/// Returns whether `new` should replace `old` as the connection to their
/// peer: the one dialed by the lower id wins, so both sides keep the same
/// connection without asking each other; between equals the newer wins (a
/// redial after the old one broke unnoticed).
fn prefer(me: &NodeId, new: &Link, old: &Link) -> bool {
    let by_lower = |l: &Link| l.dialed == (*me < l.peer);
    by_lower(new) || !by_lower(old)
}

impl Transport {
    /// Creates the transport of the node whose identity `me` publishes;
    /// peers' messages go to `inbound`.
    pub fn new(
        cfg: Arc<TransportConfig>,
        metrics: Metrics,
        me: watch::Receiver<PeerInfo>,
        inbound: mpsc::Sender<Inbound>,
    ) -> Transport {
        let handshaking = Arc::new(Semaphore::new(cfg.max_handshaking));
        Transport {
            inner: Arc::new(Inner {
                cfg,
                metrics,
                me,
                inbound,
                registry: Mutex::new(Registry::default()),
                handshaking,
                warned: Mutex::new(HashMap::new()),
                quiet: Switch::default(),
            }),
        }
    }

    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Accepts peers on `listener` until `stop` resolves.
    pub async fn serve(&self, listener: TcpListener, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = &mut stop => return,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    self.refused("accept_error", &e);
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = self.inner.handshaking.clone().try_acquire_owned() else {
                self.refused("handshake_cap", &"too many connections in their handshake");
                continue; // dropping the stream closes it
            };
            let this = self.clone();
            tokio::spawn(async move {
                let cfg = &this.inner.cfg;
                let accepted = tokio::time::timeout(
                    cfg.handshake_timeout,
                    connection::accept(stream, cfg, &this.inner.me),
                )
                .await;
                drop(permit);
                match accepted {
                    Ok(Ok(est)) => {
                        this.register(est, false, None);
                    }
                    Ok(Err(e)) => this.refused(e.metric_label(), &e),
                    Err(_) => this.refused("handshake_timeout", &"no identity within the deadline"),
                }
            });
        }
    }

    /// Counts and logs (rate-limited) a connection refused before it
    /// authenticated.
    fn refused(&self, reason: &'static str, why: &dyn std::fmt::Display) {
        self.inner
            .metrics
            .peer_connections_refused
            .with_label_values(&[reason])
            .inc();
        let now = Instant::now();
        let mut warned = self
            .inner
            .warned
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let entry = warned.entry(reason).or_insert((now - WARN_INTERVAL, 0));
        if now.duration_since(entry.0) >= WARN_INTERVAL {
            warn!(
                reason,
                suppressed = entry.1,
                "refused a peer connection: {why}"
            );
            *entry = (now, 0);
        } else {
            entry.1 += 1;
        }
    }

    /// Makes `est` the connection to its peer unless a preferred one exists.
    fn register(&self, est: Established, dialed: bool, dialed_addr: Option<&str>) -> Option<Link> {
        let me = self.inner.me.borrow().id.clone();
        let advertised = est.peer.address.clone();
        let ctx = ReaderContext {
            inbound: self.inner.inbound.clone(),
            me: self.inner.me.clone(),
            metrics: self.inner.metrics.clone(),
            quiet: self.inner.quiet.clone(),
        };
        let this = self.clone();
        let mut reg = self.registry();
        if reg.links.len() >= self.inner.cfg.max_connections
            && !reg.links.contains_key(&est.peer.id)
        {
            drop(reg);
            self.refused("too_many_connections", &TransportError::TooMany);
            return None;
        }
        reg.next_serial += 1;
        let link = Link::start(est, reg.next_serial, dialed, ctx, move |link, end| {
            this.ended(link, end)
        });
        if let Some(old) = reg.links.get(&link.peer) {
            if !prefer(&me, &link, old) {
                debug!(peer = %link.peer, "a second connection to a peer; closing the new one");
                link.close();
                return reg.links.get(&link.peer).cloned();
            }
            debug!(peer = %link.peer, "a second connection to a peer; closing the old one");
            old.close();
        }
        for addr in dialed_addr.into_iter().chain([advertised.as_str()]) {
            reg.at.insert(addr.to_string(), link.peer.clone());
        }
        reg.links.insert(link.peer.clone(), link.clone());
        self.inner
            .metrics
            .peer_connections
            .set(reg.links.len() as i64);
        Some(link)
    }

    /// Forgets a connection whose reader stopped; reports an unexpected end.
    fn ended(&self, link: &Link, end: End) {
        let mut reg = self.registry();
        if reg.links.get(&link.peer).map(|l| l.serial) != Some(link.serial) {
            return; // superseded: closed on purpose
        }
        reg.links.remove(&link.peer);
        reg.at.retain(|_, id| *id != link.peer);
        self.inner
            .metrics
            .peer_connections
            .set(reg.links.len() as i64);
        drop(reg);
        match end {
            End::Deliberate => debug!(peer = %link.peer, "peer connection closed"),
            End::Lost(e) => {
                info!(peer = %link.peer, error = %e, "peer connection lost");
                let lost = Inbound::ConnectionLost {
                    peer: link.peer.clone(),
                };
                let _ = self.inner.inbound.try_send(lost);
            }
        }
    }

    /// Queues `frame` for the connection at `addr`, dialing it if needed;
    /// `waiter` gets the connection once there is one.
    fn via_dial(
        &self,
        reg: &mut Registry,
        addr: &str,
        frame: Option<Frame>,
        waiter: Option<oneshot::Sender<Option<Link>>>,
    ) {
        if !reg.dials.contains_key(addr) {
            let now = Instant::now();
            reg.failed
                .retain(|_, at| now.duration_since(*at) < DIAL_BACKOFF);
            if reg.failed.contains_key(addr) {
                if let Some(w) = waiter {
                    let _ = w.send(None);
                }
                return;
            }
            reg.dials.insert(addr.to_string(), Dial::default());
            tokio::spawn(self.clone().dial(addr.to_string()));
        }
        let dial = reg.dials.entry(addr.to_string()).or_default();
        if let Some(frame) = frame {
            if dial.queued.len() < DIAL_QUEUE {
                dial.queued.push(frame);
            } else {
                self.error("queue_full");
            }
        }
        dial.waiters.extend(waiter);
    }

    async fn dial(self, addr: String) {
        let me = self.inner.me.borrow().clone();
        let started = Instant::now();
        let dialed = connection::dial(&addr, &self.inner.cfg, &me).await;
        let link = match dialed {
            Ok(est) => {
                self.observe("dial", started);
                self.register(est, true, Some(&addr))
            }
            Err(e) => {
                self.error(e.metric_label());
                debug!(%addr, error = %e, "cannot reach a peer");
                None
            }
        };
        let mut reg = self.registry();
        let dial = reg.dials.remove(&addr).unwrap_or_default();
        if link.is_none() {
            reg.failed.insert(addr, Instant::now());
        }
        drop(reg);
        for frame in dial.queued {
            if let Some(link) = &link {
                self.push(link, frame);
            }
        }
        for w in dial.waiters {
            let _ = w.send(link.clone());
        }
    }

    fn push(&self, link: &Link, frame: Frame) {
        if link.try_send(frame).is_err() {
            self.error("queue_full");
        }
    }

    fn error(&self, reason: &str) {
        self.inner
            .metrics
            .peer_rpc_errors
            .with_label_values(&[reason])
            .inc();
    }

    fn observe(&self, kind: &str, started: Instant) {
        self.inner
            .metrics
            .peer_rpc_seconds
            .with_label_values(&[kind])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Asks whoever is at `addr` who it is: over its connection if there is
    /// one, else the identity it gave when a new connection was made.
    pub async fn hello(&self, addr: &str) -> Result<PeerInfo, TransportError> {
        let started = Instant::now();
        let timeout = self.inner.cfg.request_timeout;
        let existing = {
            let reg = self.registry();
            reg.at
                .get(addr)
                .and_then(|id| reg.links.get(id))
                .filter(|l| l.is_open())
                .cloned()
        };
        let Some(link) = existing else {
            let (tx, rx) = oneshot::channel();
            self.via_dial(&mut self.registry(), addr, None, Some(tx));
            let link = rx.await.ok().flatten().ok_or(TransportError::Closed)?;
            return Ok(link.identity.borrow().clone());
        };
        let mut identity = link.identity.clone();
        identity.mark_unchanged();
        if link.try_send(Frame::Hello).is_err() {
            self.error("queue_full");
            return Err(TransportError::Closed);
        }
        let answered = tokio::time::timeout(timeout, identity.changed()).await;
        match answered {
            Ok(Ok(())) => {
                self.observe("hello", started);
                Ok(identity.borrow().clone())
            }
            Ok(Err(_)) => Err(TransportError::Closed),
            Err(_) => {
                self.error("timeout");
                Err(TransportError::Timeout {
                    addr: addr.to_string(),
                    timeout,
                })
            }
        }
    }

    /// Closes every connection on purpose (goodbye after what is queued),
    /// e.g. on shutdown.
    pub fn close_all(&self) {
        let reg = self.registry();
        for link in reg.links.values() {
            link.close();
        }
    }
}

impl SendToPeer for Transport {
    fn send(&self, address: Option<&str>, msg: Message) {
        let mut reg = self.registry();
        if let Some(link) = reg.links.get(&msg.to) {
            // Written under the lock (a non-blocking write that takes no
            // other lock): no clone of the link per message.
            return self.push(link, Frame::Raft(msg));
        }
        let Some(addr) = address else {
            self.error("unknown_address");
            return debug!(to = %msg.to, "no address known for peer");
        };
        if reg.at.get(addr).is_some_and(|id| *id != msg.to) {
            // Another incarnation answers there now: the addressee is gone.
            self.error("stale_peer");
            return;
        }
        self.via_dial(&mut reg, addr, Some(Frame::Raft(msg)), None);
    }

    fn set_quiet(&self, quiet: bool) {
        if self.inner.quiet.set(quiet) && !quiet {
            // Held answers are read now, and later ones as they come.
            self.registry().links.values().for_each(Link::wake_reader);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{MessageBody, Term};

    /// One transport on a loopback port and what it hands its node.
    struct TestNode {
        transport: Transport,
        inbound: mpsc::Receiver<Inbound>,
        addr: String,
        id: NodeId,
        me: watch::Sender<PeerInfo>,
        _stop: oneshot::Sender<()>,
    }

    fn cfg() -> Arc<TransportConfig> {
        Arc::new(TransportConfig::new("test", b"0123456789abcdef".to_vec()))
    }

    async fn start(name: &str) -> TestNode {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let id = NodeId::new(name, 1);
        let (me, me_rx) = watch::channel(PeerInfo {
            cluster_id: "test".into(),
            id: id.clone(),
            address: addr.clone(),
            joined: true,
            term: 1,
            leader: None,
            leaving: false,
            bootstrap_lock: None,
        });
        let (tx, inbound) = mpsc::channel(64);
        let transport = Transport::new(cfg(), Metrics::new(), me_rx, tx);
        let (stop_tx, stop) = oneshot::channel::<()>();
        let serving = transport.clone();
        tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stop.await;
                })
                .await
        });
        TestNode {
            transport,
            inbound,
            addr,
            id,
            me,
            _stop: stop_tx,
        }
    }

    fn msg(from: &TestNode, to: &TestNode) -> Message {
        Message {
            from: from.id.clone(),
            to: to.id.clone(),
            term: Term(1),
            body: MessageBody::PreVoteResponse { granted: true },
        }
    }

    async fn next(node: &mut TestNode) -> Inbound {
        tokio::time::timeout(Duration::from_secs(2), node.inbound.recv())
            .await
            .expect("something arrives")
            .expect("channel open")
    }

    /// Returns (peer, dialed by this side) of every registered connection.
    fn links(node: &TestNode) -> Vec<(NodeId, bool)> {
        let reg = node.transport.registry();
        reg.links
            .values()
            .map(|l| (l.peer.clone(), l.dialed))
            .collect()
    }

    #[tokio::test]
    async fn an_answer_travels_back_on_the_connection_its_request_came_on() {
        let (mut a, mut b) = (start("a").await, start("b").await);
        a.transport.send(Some(&b.addr), msg(&a, &b));
        assert!(matches!(next(&mut b).await, Inbound::Message(m) if m.from == a.id));
        // No address: only the existing connection can carry it.
        b.transport.send(None, msg(&b, &a));
        assert!(matches!(next(&mut a).await, Inbound::Message(m) if m.from == b.id));
        assert_eq!(links(&a), vec![(b.id.clone(), true)]);
        assert_eq!(links(&b), vec![(a.id.clone(), false)]);
    }

    #[tokio::test]
    async fn both_dialing_at_once_settles_on_the_connection_the_lower_id_dialed() {
        let (mut a, mut b) = (start("a").await, start("b").await);
        a.transport.send(Some(&b.addr), msg(&a, &b));
        b.transport.send(Some(&a.addr), msg(&b, &a));
        assert!(matches!(next(&mut a).await, Inbound::Message(_)));
        assert!(matches!(next(&mut b).await, Inbound::Message(_)));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(links(&a), vec![(b.id.clone(), true)], "a < b: a's dial");
        assert_eq!(links(&b), vec![(a.id.clone(), false)]);
        // Closing the loser was deliberate on both sides.
        assert!(a.inbound.try_recv().is_err() && b.inbound.try_recv().is_err());
        // And the kept connection carries both ways.
        b.transport.send(None, msg(&b, &a));
        assert!(matches!(next(&mut a).await, Inbound::Message(_)));
    }

    #[tokio::test]
    async fn a_goodbye_ends_a_connection_without_a_loss_report() {
        let (a, mut b) = (start("a").await, start("b").await);
        a.transport.send(Some(&b.addr), msg(&a, &b));
        assert!(matches!(next(&mut b).await, Inbound::Message(_)));
        a.transport.close_all();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(links(&b).is_empty() && links(&a).is_empty());
        assert!(b.inbound.try_recv().is_err(), "no ConnectionLost");
    }

    #[tokio::test]
    async fn an_end_without_goodbye_is_reported_as_a_lost_connection() {
        let mut b = start("b").await;
        let crasher = PeerInfo {
            cluster_id: "test".into(),
            id: NodeId::new("crasher", 9),
            address: "127.0.0.1:9".into(),
            joined: true,
            term: 1,
            leader: None,
            leaving: false,
            bootstrap_lock: None,
        };
        let est = connection::dial(&b.addr, &cfg(), &crasher).await.unwrap();
        assert_eq!(est.peer.id, b.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(est); // the socket closes without a goodbye, as in a crash
        match next(&mut b).await {
            Inbound::ConnectionLost { peer } => assert_eq!(peer, crasher.id),
            other => panic!("expected ConnectionLost, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn hello_answers_the_peers_current_identity() {
        let (a, b) = (start("a").await, start("b").await);
        let first = a.transport.hello(&b.addr).await.unwrap();
        assert_eq!((first.id.clone(), first.term), (b.id.clone(), 1));
        b.me.send_modify(|me| me.term = 5);
        let second = a.transport.hello(&b.addr).await.unwrap();
        assert_eq!(second.term, 5, "asked again on the same connection");
        assert_eq!(links(&a).len(), 1);
    }

    #[tokio::test]
    async fn frames_the_socket_cannot_take_wait_bounded_and_arrive_in_order() {
        // Large frames (a long sender name) to a node that reads nothing
        // yet: its socket fills, the rest waits in the outbox.
        let (a, mut b) = (start(&"a".repeat(12_000)).await, start("b").await);
        let template = msg(&a, &b);
        let numbered = |i: u64| Message {
            term: Term(i),
            ..template.clone()
        };
        a.transport.send(Some(&b.addr), numbered(0));
        assert!(matches!(next(&mut b).await, Inbound::Message(_)));
        let (mut sent, mut waited) = (1, false);
        while sent < 10 * connection::OUT_QUEUE as u64 {
            a.transport.send(None, numbered(sent));
            let link = a.transport.registry().links.get(&b.id).cloned().unwrap();
            if link.waiting() {
                waited = true;
            }
            sent += 1;
        }
        assert!(waited, "the socket never filled");
        let dropped = a
            .transport
            .inner
            .metrics
            .peer_rpc_errors
            .with_label_values(&["queue_full"])
            .get();
        assert!(dropped > 0, "the outbox is bounded");
        // Once read, what was not dropped arrives whole and in order.
        let mut last = 0;
        let mut got = 1;
        while let Ok(Some(Inbound::Message(m))) =
            tokio::time::timeout(Duration::from_millis(500), b.inbound.recv()).await
        {
            assert!(m.term.0 > last, "term {} after {last}", m.term.0);
            last = m.term.0;
            got += 1;
        }
        assert_eq!(got + dropped, sent, "every frame arrived or was counted");
    }

    #[tokio::test]
    async fn a_message_for_an_unknown_peer_without_address_is_dropped_and_counted() {
        let (a, b) = (start("a").await, start("b").await);
        a.transport.send(None, msg(&a, &b));
        let errors = a
            .transport
            .inner
            .metrics
            .peer_rpc_errors
            .with_label_values(&["unknown_address"]);
        assert_eq!(errors.get(), 1);
    }
}
