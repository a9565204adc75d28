//! An in-process authoritative DNS server for tests, answering one zone from
//! records the test changes while it runs (A, AAAA, SRV; TTL 0).
//!
//! It serves UDP and TCP on the same `127.0.0.1` port, so both this process
//! (`DiscoverySource::Dns { server: Some(dns.addr), .. }`) and child
//! processes (`--dns-server <addr>`) can query it. The server runs in tasks
//! on the tokio runtime that called [`TestDns::start`] and stops when the
//! [`TestDns`] is dropped. With a `current_thread` runtime, do not block the
//! thread (e.g. `std::process::Child::wait`) while the server must answer.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use hickory_server::authority::MessageResponseBuilder;
use hickory_server::proto::op::{Header, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::ServerFuture;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};

/// TTL of every record served: nothing may be cached.
const TTL: u32 = 0;
/// How long an idle TCP connection stays open.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts to find a port free for both UDP and TCP.
const BIND_ATTEMPTS: usize = 20;

/// A running test DNS server; see the module doc.
pub struct TestDns {
    /// Where the server listens, for UDP and TCP.
    pub addr: SocketAddr,
    zone: Name,
    state: Arc<ZoneState>,
    /// Owns the listener tasks; dropping it stops them.
    _server: ServerFuture<ZoneHandler>,
}

/// The records and switches shared between the test and the handler.
#[derive(Default)]
struct ZoneState {
    records: Mutex<HashMap<LowerName, NameRecords>>,
    failing: AtomicBool,
    queries: AtomicU64,
}

/// What one name answers.
#[derive(Clone, Default)]
struct NameRecords {
    a: Vec<Ipv4Addr>,
    aaaa: Vec<Ipv6Addr>,
    srv: Vec<(Name, u16)>,
}

impl NameRecords {
    fn is_empty(&self) -> bool {
        self.a.is_empty() && self.aaaa.is_empty() && self.srv.is_empty()
    }
}

impl TestDns {
    /// Starts a server authoritative for `zone` (e.g. `"elector.test."`) on
    /// `127.0.0.1`, the same free port for UDP and TCP. Names in the zone
    /// without records answer NXDOMAIN; names outside it answer REFUSED.
    pub async fn start(zone: &str) -> TestDns {
        let zone = fqdn(zone);
        let state = Arc::new(ZoneState::default());
        let (udp, tcp) = bind_same_port().await;
        let addr = udp.local_addr().expect("bound UDP socket has an address");
        let mut server = ServerFuture::new(ZoneHandler {
            zone: LowerName::new(&zone),
            soa: soa_record(&zone),
            state: state.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE_TIMEOUT);
        TestDns {
            addr,
            zone,
            state,
            _server: server,
        }
    }

    /// Replaces the A records of `name` (absolute, inside the zone).
    pub fn set_a(&self, name: &str, ips: &[Ipv4Addr]) {
        self.edit(name, |records| records.a = ips.to_vec());
    }

    /// Replaces the AAAA records of `name` (absolute, inside the zone).
    pub fn set_aaaa(&self, name: &str, ips: &[Ipv6Addr]) {
        self.edit(name, |records| records.aaaa = ips.to_vec());
    }

    /// Replaces the SRV records of `name` (e.g. `_raft._tcp.elector.test`)
    /// with one record per `(target host, port)`.
    pub fn set_srv(&self, name: &str, targets: &[(String, u16)]) {
        let targets = targets
            .iter()
            .map(|(host, port)| (fqdn(host), *port))
            .collect();
        self.edit(name, |records| records.srv = targets);
    }

    /// Removes every record of `name`, which then answers NXDOMAIN.
    pub fn clear(&self, name: &str) {
        self.edit(name, |records| *records = NameRecords::default());
    }

    /// Makes the server answer SERVFAIL to every query while `on`.
    pub fn set_failing(&self, on: bool) {
        self.state.failing.store(on, Ordering::SeqCst);
    }

    /// Returns how many queries the server has received.
    pub fn queries(&self) -> u64 {
        self.state.queries.load(Ordering::SeqCst)
    }

    fn edit(&self, name: &str, change: impl FnOnce(&mut NameRecords)) {
        let name = fqdn(name);
        assert!(
            self.zone.zone_of(&name),
            "{name} is outside the test zone {}",
            self.zone
        );
        let mut records = self.state.lock();
        let key = LowerName::new(&name);
        let entry = records.entry(key.clone()).or_default();
        change(entry);
        if entry.is_empty() {
            records.remove(&key);
        }
    }
}

impl ZoneState {
    fn lock(&self) -> MutexGuard<'_, HashMap<LowerName, NameRecords>> {
        // A test that panicked while editing leaves plain data behind: keep serving it.
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Binds UDP on a free port, then TCP on the same one; retries when another
/// process holds that port for TCP.
async fn bind_same_port() -> (UdpSocket, TcpListener) {
    for _ in 0..BIND_ATTEMPTS {
        let udp = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind UDP on 127.0.0.1");
        let addr = udp.local_addr().expect("bound UDP socket has an address");
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port on 127.0.0.1 was free for both UDP and TCP after {BIND_ATTEMPTS} tries");
}

fn fqdn(name: &str) -> Name {
    let mut name = Name::from_ascii(name).unwrap_or_else(|e| panic!("bad DNS name {name:?}: {e}"));
    name.set_fqdn(true);
    name
}

/// The zone's SOA, sent with negative answers; minimum 0 so no negative caching.
fn soa_record(zone: &Name) -> Record {
    let mname = Name::from_ascii("ns").and_then(|n| n.append_domain(zone));
    let rname = Name::from_ascii("hostmaster").and_then(|n| n.append_domain(zone));
    let soa = SOA::new(
        mname.expect("valid SOA mname"),
        rname.expect("valid SOA rname"),
        1,
        60,
        60,
        60,
        TTL,
    );
    Record::from_rdata(zone.clone(), TTL, RData::SOA(soa))
}

/// Answers queries from [`ZoneState`].
struct ZoneHandler {
    zone: LowerName,
    soa: Record,
    state: Arc<ZoneState>,
}

/// What the handler decided to send.
struct Answer {
    code: ResponseCode,
    records: Vec<Record>,
    with_soa: bool,
}

impl ZoneHandler {
    fn answer(&self, name: &LowerName, record_type: RecordType) -> Answer {
        let refuse = |code| Answer {
            code,
            records: Vec::new(),
            with_soa: false,
        };
        if self.state.failing.load(Ordering::SeqCst) {
            return refuse(ResponseCode::ServFail);
        }
        if !self.zone.zone_of(name) {
            return refuse(ResponseCode::Refused);
        }
        let Some(entry) = self.state.lock().get(name).cloned() else {
            return Answer {
                code: ResponseCode::NXDomain,
                records: Vec::new(),
                with_soa: true,
            };
        };
        let owner = Name::from(name.clone());
        let records: Vec<Record> = match record_type {
            RecordType::A => entry.a.iter().map(|ip| RData::A(A(*ip))).collect(),
            RecordType::AAAA => entry.aaaa.iter().map(|ip| RData::AAAA(AAAA(*ip))).collect(),
            RecordType::SRV => entry
                .srv
                .iter()
                .map(|(target, port)| RData::SRV(SRV::new(10, 10, *port, target.clone())))
                .collect(),
            _ => Vec::new(),
        }
        .into_iter()
        .map(|rdata| Record::from_rdata(owner.clone(), TTL, rdata))
        .collect();
        let with_soa = records.is_empty();
        Answer {
            code: ResponseCode::NoError,
            records,
            with_soa,
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for ZoneHandler {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        self.state.queries.fetch_add(1, Ordering::SeqCst);
        let builder = MessageResponseBuilder::from_message_request(request);
        let Ok(info) = request.request_info() else {
            let response = builder.error_msg(request.header(), ResponseCode::FormErr);
            return send(&mut response_handle, response, request.header()).await;
        };
        let answer = self.answer(info.query.name(), info.query.query_type());
        let mut header = Header::response_from_request(request.header());
        header.set_authoritative(true);
        header.set_response_code(answer.code);
        let soa = answer.with_soa.then_some(&self.soa);
        let response = builder.build(header, answer.records.iter(), [], soa, []);
        send(&mut response_handle, response, request.header()).await
    }
}

async fn send<'a, R: ResponseHandler>(
    handle: &mut R,
    response: hickory_server::authority::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request_header: &Header,
) -> ResponseInfo {
    match handle.send_response(response).await {
        Ok(info) => info,
        Err(_) => {
            let mut header = Header::response_from_request(request_header);
            header.set_response_code(ResponseCode::ServFail);
            header.into()
        }
    }
}
