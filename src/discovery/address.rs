//! Validation of what the user configures: DNS names, ports and static
//! `host:port` peer entries. Every check returns a [`DiscoveryError`] that
//! names the bad value and says what a good one looks like.

use super::DiscoveryError;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest DNS name in text form, without the trailing dot (RFC 1035 §2.3.4).
const MAX_NAME_LEN: usize = 253;
/// Longest single DNS label (RFC 1035 §2.3.4).
const MAX_LABEL_LEN: usize = 63;

/// Checks that `name` is a plain DNS host name: dot-separated labels of
/// letters, digits and inner hyphens, at most 253 characters, one optional
/// trailing dot. IP literals are refused (they are not Service names).
pub(crate) fn validate_dns_name(name: &str) -> Result<(), DiscoveryError> {
    let invalid = |reason: String| DiscoveryError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("the name is empty".into()));
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err(invalid(
            "it is an IP address, not a DNS name (use a static peer list for fixed addresses)"
                .into(),
        ));
    }
    let body = name.strip_suffix('.').unwrap_or(name);
    if body.len() > MAX_NAME_LEN {
        return Err(invalid(format!(
            "it is {} characters long, the limit is {MAX_NAME_LEN}",
            body.len()
        )));
    }
    for label in body.split('.') {
        validate_label(label).map_err(invalid)?;
    }
    Ok(())
}

/// Checks one label of a DNS name; the error is the reason, for the caller to wrap.
fn validate_label(label: &str) -> Result<(), String> {
    if label.is_empty() {
        return Err("it has an empty label (two dots in a row, or a leading dot)".into());
    }
    if label.len() > MAX_LABEL_LEN {
        return Err(format!(
            "label {label:?} is {} characters long, the limit is {MAX_LABEL_LEN}",
            label.len()
        ));
    }
    if let Some(bad) = label
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(format!(
            "label {label:?} contains {bad:?}; only letters, digits and '-' are allowed"
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(format!(
            "label {label:?} starts or ends with '-', which DNS does not allow"
        ));
    }
    Ok(())
}

/// Checks that a port to connect to is not 0.
pub(crate) fn validate_port(port: u16) -> Result<(), DiscoveryError> {
    if port == 0 {
        return Err(DiscoveryError::InvalidPort);
    }
    Ok(())
}

/// Validates every static `host:port` entry and returns them sorted and
/// deduplicated, exactly as written. The first bad entry fails the whole list.
pub(crate) fn parse_static_peers(entries: &[String]) -> Result<BTreeSet<String>, DiscoveryError> {
    if entries.is_empty() {
        return Err(DiscoveryError::EmptyStaticList);
    }
    entries
        .iter()
        .map(|entry| validate_static_peer(entry).map(|()| entry.clone()))
        .collect()
}

/// Checks one `host:port` entry: host is an IPv4 address, a bracketed IPv6
/// address or a DNS name; port is 1..=65535.
fn validate_static_peer(entry: &str) -> Result<(), DiscoveryError> {
    let invalid = |reason: String| DiscoveryError::InvalidStaticPeer {
        entry: entry.to_owned(),
        reason,
    };
    let Some((host, port)) = entry.rsplit_once(':') else {
        return Err(invalid("it has no ':port' part".into()));
    };
    match port.parse::<u16>() {
        Ok(0) => return Err(invalid("port 0 cannot be connected to".into())),
        Ok(_) => {}
        Err(_) => {
            return Err(invalid(format!(
                "port {port:?} is not a number between 1 and 65535"
            )))
        }
    }
    validate_static_host(host).map_err(invalid)
}

/// Checks the host part of a static entry; the error is the reason.
fn validate_static_host(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("the host is empty".into());
    }
    if let Some(inner) = host.strip_prefix('[') {
        let Some(ip) = inner.strip_suffix(']') else {
            return Err("it opens '[' without closing ']'".into());
        };
        return match ip.parse::<Ipv6Addr>() {
            Ok(_) => Ok(()),
            Err(_) => Err(format!("{ip:?} inside brackets is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err("IPv6 addresses must be written in brackets, e.g. [fd00::5]:4041".into());
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return Ok(());
    }
    validate_dns_name(host).map_err(|e| match e {
        DiscoveryError::InvalidName { reason, .. } => format!("host {host:?}: {reason}"),
        other => other.to_string(),
    })
}

/// Formats an address as peers expect it: `ip:port`, IPv6 as `[ip]:port`.
pub(crate) fn peer_address(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn service_names_with_and_without_trailing_dot_are_valid() {
        for name in [
            "elector",
            "elector.default.svc.cluster.local",
            "elector.default.svc.cluster.local.",
            "a-1.b2",
        ] {
            assert!(validate_dns_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_the_reason() {
        let cases = [
            ("", "empty"),
            ("a..b", "empty label"),
            (".a", "empty label"),
            ("a b", "contains ' '"),
            ("-a.b", "starts or ends with '-'"),
            ("a_b.c", "contains '_'"),
            ("10.0.0.1", "IP address"),
            ("::1", "IP address"),
        ];
        for (name, reason) in cases {
            let err = validate_dns_name(name).unwrap_err().to_string();
            assert!(err.contains(reason), "{name:?}: {err}");
        }
        let long_label = "a".repeat(64);
        let err = validate_dns_name(&long_label).unwrap_err().to_string();
        assert!(err.contains("limit is 63"), "{err}");
        let long_name = ["a"; 128].join(".");
        let err = validate_dns_name(&long_name).unwrap_err().to_string();
        assert!(err.contains("limit is 253"), "{err}");
    }

    #[test]
    fn static_peers_are_sorted_and_deduplicated_as_written() {
        let peers = parse_static_peers(&strings(&[
            "node-b.elector:4041",
            "10.0.0.1:4041",
            "[fd00::1]:4041",
            "10.0.0.1:4041",
        ]))
        .unwrap();
        let expected: BTreeSet<String> =
            strings(&["10.0.0.1:4041", "[fd00::1]:4041", "node-b.elector:4041"])
                .into_iter()
                .collect();
        assert_eq!(peers, expected);
    }

    #[test]
    fn bad_static_peers_are_refused_with_the_reason() {
        let cases = [
            ("10.0.0.1", "no ':port'"),
            ("10.0.0.1:0", "port 0"),
            ("10.0.0.1:70000", "between 1 and 65535"),
            ("10.0.0.1:http", "between 1 and 65535"),
            (":4041", "host is empty"),
            ("fd00::1:4041", "brackets"),
            ("[fd00::1:4041", "without closing"),
            ("[10.0.0.1]:4041", "not an IPv6"),
            ("bad host:4041", "contains ' '"),
        ];
        for (entry, reason) in cases {
            let err = parse_static_peers(&strings(&["10.0.0.9:1", entry]))
                .unwrap_err()
                .to_string();
            assert!(err.contains(reason), "{entry:?}: {err}");
            assert!(err.contains(entry), "{entry:?}: {err}");
        }
    }

    #[test]
    fn an_empty_static_list_is_refused() {
        assert!(matches!(
            parse_static_peers(&[]),
            Err(DiscoveryError::EmptyStaticList)
        ));
    }

    #[test]
    fn peer_addresses_bracket_ipv6() {
        assert_eq!(
            peer_address("10.1.2.3".parse().unwrap(), 4041),
            "10.1.2.3:4041"
        );
        assert_eq!(
            peer_address("fd00::5".parse().unwrap(), 4041),
            "[fd00::5]:4041"
        );
    }
}
