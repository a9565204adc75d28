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
//! `/etc/resolv.conf` are picked up. "No such name" and "no records" are
//! answers (an empty set); SERVFAIL, REFUSED, timeouts and I/O errors are
//! failures, returned as [`DiscoveryError::Lookup`].

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
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// SRV service label looked up in front of the Service name (`_raft._tcp.<name>`),
/// matching a Service port named `raft`.
pub(crate) const SRV_PREFIX: &str = "_raft._tcp.";
/// How long the resolver waits for one answer from one server.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// How many times the resolver retries a query that got no answer.
const QUERY_ATTEMPTS: usize = 2;
/// Upper bound for a whole round (SRV plus every target), so a slow server
/// cannot stall discovery.
pub(crate) const ROUND_DEADLINE: Duration = Duration::from_secs(5);

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
        let srv_name = parse_name(&format!("{SRV_PREFIX}{name}"))?;
        let targets = srv_targets(&resolver, srv_name).await?;
        if targets.is_empty() {
            let name = parse_name(name)?;
            return host_addresses(&resolver, name, port).await;
        }
        let per_target = targets
            .into_iter()
            .map(|(target, port)| host_addresses(&resolver, target, port));
        let sets = try_join_all(per_target).await?;
        Ok(sets.into_iter().flatten().collect())
    };
    match tokio::time::timeout(ROUND_DEADLINE, round).await {
        Ok(result) => result,
        Err(_) => Err(DiscoveryError::RoundTimedOut {
            name: name.to_owned(),
            after: ROUND_DEADLINE,
        }),
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

/// Returns the `(target, port)` pairs of the SRV records at `srv_name`;
/// empty when there are none. Targets `.` ("no service", RFC 2782) and port 0
/// are skipped.
async fn srv_targets(
    resolver: &TokioResolver,
    srv_name: Name,
) -> Result<Vec<(Name, u16)>, DiscoveryError> {
    let answer = resolver.srv_lookup(srv_name.clone()).await;
    let Some(lookup) = answer_or_empty(answer, &srv_name, RecordType::SRV)? else {
        return Ok(Vec::new());
    };
    Ok(lookup
        .iter()
        .filter(|srv| !srv.target().is_root() && srv.port() != 0)
        .map(|srv| (srv.target().clone(), srv.port()))
        .collect())
}

/// Returns `ip:port` for every A and AAAA record of `host`. Both lookups must
/// answer; a failure of either fails the round rather than drop half the peers.
async fn host_addresses(
    resolver: &TokioResolver,
    host: Name,
    port: u16,
) -> Result<BTreeSet<String>, DiscoveryError> {
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
    Ok(ips.into_iter().map(|ip| peer_address(ip, port)).collect())
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
