//! One DNS lookup round for a headless Service:
//!
//! ```text
//!   SRV _raft._tcp.<name> ──records──► A + AAAA of each target ──► { "ip:srv_port" }
//!          │
//!          └──NXDOMAIN / no records──► A + AAAA of <name> ──────► { "ip:port" }
//! ```
//!
//! Every round builds a fresh resolver with its cache turned off, so an
//! answer never outlives the round that asked for it and edits to
//! `/etc/resolv.conf` are picked up. Names without a trailing dot go through
//! the resolv.conf search list (in Kubernetes, `ndots:5` makes
//! `elector.default.svc.cluster.local` try the search domains first; pass
//! `elector.default.svc.cluster.local.` to ask one name only).
//!
//! "No such name" and "no records" are answers (an empty set); SERVFAIL,
//! REFUSED, timeouts and I/O errors are failures, returned as
//! [`DiscoveryError::Lookup`], and a failure on any candidate name wins over
//! "no records" on the others.
//!
//! hickory answers the special-use names of RFC 6761 (`*.invalid`,
//! `localhost`) itself, without asking any server: `does-not-exist.invalid`
//! is an NXDOMAIN (an empty set) even when the server is unreachable.

use super::address::peer_address;
use super::DiscoveryError;
use futures::future::try_join_all;
use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RecordType;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{Name, ResolveError, TokioResolver};
use std::collections::BTreeSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// SRV service label looked up in front of the Service name (`_raft._tcp.<name>`),
/// matching a Service port named `raft`.
const SRV_PREFIX: &str = "_raft._tcp.";
/// How long the resolver waits for one answer from one server.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How many times the resolver retries a query that got no answer.
const QUERY_ATTEMPTS: usize = 2;
/// Upper bound for a whole round (SRV plus every target), so a slow server
/// cannot stall discovery.
const ROUND_DEADLINE: Duration = Duration::from_secs(5);

/// Resolves the peers of the headless Service `name` (see the module doc).
/// `server` replaces the system resolver configuration with this one server
/// (UDP, and TCP for truncated answers).
pub(crate) async fn resolve_service(
    name: &str,
    port: u16,
    server: Option<SocketAddr>,
) -> Result<BTreeSet<String>, DiscoveryError> {
    let resolver = build_resolver(server)?;
    let round = async {
        let srv_names = search_candidates(&resolver, &format!("{SRV_PREFIX}{name}"))?;
        let srv = first_answer(srv_names, |srv_name| srv_targets(&resolver, srv_name)).await?;
        let Some(targets) = srv else {
            let names = search_candidates(&resolver, name)?;
            let peers = first_answer(names, |host| host_addresses(&resolver, host, port)).await?;
            return Ok(peers.unwrap_or_default());
        };
        let per_target = targets
            .into_iter()
            .map(|(target, port)| host_addresses(&resolver, target, port));
        let sets = try_join_all(per_target).await?;
        Ok(sets.into_iter().flatten().flatten().collect())
    };
    match tokio::time::timeout(ROUND_DEADLINE, round).await {
        Ok(result) => result,
        Err(_) => Err(DiscoveryError::RoundTimedOut {
            name: name.to_owned(),
            after: ROUND_DEADLINE,
        }),
    }
}

/// Returns the fully qualified names to try for `name`, in order, by the
/// resolv.conf rules: a trailing dot means exactly that name; otherwise the
/// name itself goes first when it has more than `ndots` labels and last when
/// not, with each search domain appended in between.
///
/// The resolver would expand the search list itself, but it reports only the
/// last name's result, which turns a SERVFAIL on the real name into the
/// NXDOMAIN of a search name; [`first_answer`] keeps failures visible.
fn search_candidates(resolver: &TokioResolver, name: &str) -> Result<Vec<Name>, DiscoveryError> {
    let config = resolver.config();
    let domains = config.domain().into_iter().chain(config.search());
    Ok(candidates(
        parse_name(name)?,
        domains,
        resolver.options().ndots,
    ))
}

/// Builds the candidate list for [`search_candidates`].
fn candidates<'a>(name: Name, domains: impl Iterator<Item = &'a Name>, ndots: usize) -> Vec<Name> {
    let mut absolute = name.clone();
    absolute.set_fqdn(true);
    if name.is_fqdn() {
        return vec![absolute];
    }
    let mut names = Vec::new();
    let raw_first = usize::from(name.num_labels()) > ndots;
    if raw_first {
        names.push(absolute.clone());
    }
    for domain in domains {
        // A too-long combination is skipped, as the system resolver does.
        if let Ok(mut candidate) = name.clone().append_domain(domain) {
            candidate.set_fqdn(true);
            if !names.contains(&candidate) {
                names.push(candidate);
            }
        }
    }
    if !raw_first && !names.contains(&absolute) {
        names.push(absolute);
    }
    names
}

/// Tries `lookup` on each name in order and returns the first answer with
/// records. Without one, a failure on any name is the result (the missing
/// records might be behind it); only when every name answered "none" is the
/// result `None`.
async fn first_answer<T, F, Fut>(names: Vec<Name>, lookup: F) -> Result<Option<T>, DiscoveryError>
where
    F: Fn(Name) -> Fut,
    Fut: Future<Output = Result<Option<T>, DiscoveryError>>,
{
    let mut failure = None;
    for name in names {
        match lookup(name).await {
            Ok(Some(answer)) => return Ok(Some(answer)),
            Ok(None) => {}
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// Builds a resolver with short timeouts and no cache: either from the
/// system configuration or pointed at exactly `server`.
fn build_resolver(server: Option<SocketAddr>) -> Result<TokioResolver, DiscoveryError> {
    let mut builder = match server {
        Some(addr) => {
            let servers = NameServerConfigGroup::from_ips_clear(&[addr.ip()], addr.port(), true);
            let config = ResolverConfig::from_parts(None, vec![], servers);
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
        }
        None => TokioResolver::builder_tokio().map_err(DiscoveryError::SystemConfig)?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = QUERY_TIMEOUT;
    opts.attempts = QUERY_ATTEMPTS;
    // A cached answer (positive or negative) would hide membership changes.
    opts.cache_size = 0;
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    Ok(builder.build())
}

/// Parses a name already checked by `validate_dns_name`.
fn parse_name(name: &str) -> Result<Name, DiscoveryError> {
    Name::from_ascii(name).map_err(|e| DiscoveryError::InvalidName {
        name: name.to_owned(),
        reason: e.to_string(),
    })
}

/// Returns the `(target, port)` pairs of the SRV records at `srv_name`, or
/// `None` when there are none. Targets `.` ("no service", RFC 2782) and port
/// 0 are skipped.
async fn srv_targets(
    resolver: &TokioResolver,
    srv_name: Name,
) -> Result<Option<Vec<(Name, u16)>>, DiscoveryError> {
    let answer = resolver.srv_lookup(srv_name.clone()).await;
    let Some(lookup) = answer_or_empty(answer, &srv_name, RecordType::SRV)? else {
        return Ok(None);
    };
    let targets: Vec<(Name, u16)> = lookup
        .iter()
        .filter(|srv| !srv.target().is_root() && srv.port() != 0)
        .map(|srv| (srv.target().clone(), srv.port()))
        .collect();
    Ok((!targets.is_empty()).then_some(targets))
}

/// Returns `ip:port` for every A and AAAA record of `host`, or `None` when
/// it has neither. Both lookups must answer; a failure of either fails the
/// round rather than drop half the peers.
async fn host_addresses(
    resolver: &TokioResolver,
    host: Name,
    port: u16,
) -> Result<Option<BTreeSet<String>>, DiscoveryError> {
    let (v4, v6) = tokio::join!(
        resolver.ipv4_lookup(host.clone()),
        resolver.ipv6_lookup(host.clone())
    );
    let mut ips: Vec<IpAddr> = Vec::new();
    if let Some(lookup) = answer_or_empty(v4, &host, RecordType::A)? {
        ips.extend(lookup.iter().map(|a| IpAddr::V4(a.0)));
    }
    if let Some(lookup) = answer_or_empty(v6, &host, RecordType::AAAA)? {
        ips.extend(lookup.iter().map(|aaaa| IpAddr::V6(aaaa.0)));
    }
    let peers: BTreeSet<String> = ips.into_iter().map(|ip| peer_address(ip, port)).collect();
    Ok((!peers.is_empty()).then_some(peers))
}

/// Sorts a resolver result into an answer (`Some`), "no such name / no
/// records" (`None`) or a failure (`Err`).
fn answer_or_empty<T>(
    result: Result<T, ResolveError>,
    name: &Name,
    record_type: RecordType,
) -> Result<Option<T>, DiscoveryError> {
    match result {
        Ok(lookup) => Ok(Some(lookup)),
        Err(e) if is_empty_answer(&e) => Ok(None),
        Err(source) => Err(DiscoveryError::Lookup {
            name: name.to_string(),
            record_type: record_type.to_string(),
            source,
        }),
    }
}

/// Tells whether the server answered that the name or records do not exist,
/// as opposed to failing to answer (SERVFAIL, REFUSED, timeout, I/O).
fn is_empty_answer(error: &ResolveError) -> bool {
    let Some(proto) = error.proto() else {
        return false;
    };
    matches!(
        proto.kind(),
        ProtoErrorKind::NoRecordsFound {
            response_code: ResponseCode::NXDomain | ResponseCode::NoError,
            ..
        }
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    /// A fake DNS server on `127.0.0.1` (UDP only): answers every query with
    /// `code` and, in the authority section, an SOA for the queried name (as
    /// an authoritative server does for NXDOMAIN and NODATA), or never
    /// answers when `code` is `None`. Runs until the test's runtime stops.
    pub(in crate::discovery) async fn fake_server(code: Option<ResponseCode>) -> SocketAddr {
        use hickory_resolver::proto::op::{Message, MessageType};
        use hickory_resolver::proto::rr::rdata::SOA;
        use hickory_resolver::proto::rr::{RData, Record};
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 4096];
            loop {
                let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let (Some(code), Ok(query)) = (code, Message::from_vec(&buf[..len])) else {
                    continue;
                };
                let mut reply = Message::error_msg(query.id(), query.op_code(), code);
                reply.set_message_type(MessageType::Response);
                reply.set_authoritative(true);
                reply.add_queries(query.queries().to_vec());
                if let Some(q) = query.queries().first() {
                    let soa = SOA::new(name("ns.test."), name("admin.test."), 1, 60, 60, 60, 0);
                    reply.add_name_server(Record::from_rdata(q.name().clone(), 0, RData::SOA(soa)));
                }
                let _ = socket.send_to(&reply.to_vec().unwrap(), from).await;
            }
        });
        addr
    }

    fn texts(names: &[Name]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn failure() -> DiscoveryError {
        DiscoveryError::RoundTimedOut {
            name: "x".into(),
            after: Duration::ZERO,
        }
    }

    #[test]
    fn a_trailing_dot_skips_the_search_list() {
        let search = [name("default.svc.cluster.local")];
        let names = candidates(name("elector.default."), search.iter(), 5);
        assert_eq!(texts(&names), ["elector.default."]);
    }

    #[test]
    fn a_name_with_few_dots_tries_the_search_domains_first() {
        let search = [name("default.svc.cluster.local"), name("svc.cluster.local")];
        let names = candidates(name("elector.default"), search.iter(), 5);
        assert_eq!(
            texts(&names),
            [
                "elector.default.default.svc.cluster.local.",
                "elector.default.svc.cluster.local.",
                "elector.default.",
            ]
        );
    }

    #[test]
    fn a_name_with_more_labels_than_ndots_is_tried_as_is_first() {
        let search = [name("svc.cluster.local")];
        let names = candidates(name("elector.test"), search.iter(), 1);
        assert_eq!(
            texts(&names),
            ["elector.test.", "elector.test.svc.cluster.local."]
        );
    }

    #[tokio::test]
    async fn the_first_answer_with_records_wins_over_earlier_failures() {
        let names = vec![name("a."), name("b."), name("c.")];
        let result = first_answer(names, |n| async move {
            match n.to_string().as_str() {
                "a." => Err(failure()),
                "b." => Ok(Some(n.to_string())),
                _ => Ok(Some("too late".to_string())),
            }
        })
        .await;
        assert_eq!(result.unwrap(), Some("b.".to_string()));
    }

    #[tokio::test]
    async fn a_failure_on_any_name_wins_over_empty_answers() {
        let names = vec![name("a."), name("b.")];
        let result = first_answer(names, |n| async move {
            match n.to_string().as_str() {
                "a." => Err(failure()),
                _ => Ok(None::<String>),
            }
        })
        .await;
        assert!(result.is_err());
    }

    #[tokio::test]
    async fn only_empty_answers_everywhere_make_an_empty_result() {
        let names = vec![name("a."), name("b.")];
        let result = first_answer(names, |_| async { Ok(None::<String>) }).await;
        assert_eq!(result.unwrap(), None);
    }

    #[tokio::test]
    async fn a_server_that_never_answers_is_a_failure() {
        let server = fake_server(None).await;
        // Not `.invalid` nor `localhost`: the resolver answers those itself.
        let result = resolve_service("elector.example", 4041, Some(server)).await;
        assert!(
            matches!(result, Err(DiscoveryError::Lookup { .. })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn servfail_and_refused_are_failures() {
        for code in [ResponseCode::ServFail, ResponseCode::Refused] {
            let server = fake_server(Some(code)).await;
            let result = resolve_service("elector.example", 4041, Some(server)).await;
            assert!(result.is_err(), "{code}: {result:?}");
        }
    }

    #[tokio::test]
    async fn nxdomain_and_nodata_are_empty_answers() {
        for code in [ResponseCode::NXDomain, ResponseCode::NoError] {
            let server = fake_server(Some(code)).await;
            let result = resolve_service("elector.example", 4041, Some(server)).await;
            assert!(result.expect("an answer").is_empty(), "{code}");
        }
    }
}
