//! Request signing: HMAC-SHA256 over a canonical string, a timestamp window
//! and a nonce cache against replays.
//!
//! Every peer request, and the answer to `hello`, carries four headers:
//!
//! | header | value |
//! | --- | --- |
//! | [`CLUSTER_HEADER`] | the sender's cluster id |
//! | [`TIMESTAMP_HEADER`] | milliseconds since the UNIX epoch |
//! | [`NONCE_HEADER`] | 32 random hex digits |
//! | [`SIGNATURE_HEADER`] | lowercase hex HMAC-SHA256 of the canonical string |
//!
//! The canonical string is `cluster_id \n timestamp \n nonce \n scope \n body`,
//! where `scope` is `"<METHOD> <path>"` for a request (e.g.
//! `POST /raft/v1/message`) and `RESPONSE <request nonce>` for a response, so
//! a response can only answer the request it was made for.

use super::TransportConfig;
use axum::http;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Header carrying the sender's cluster id.
pub const CLUSTER_HEADER: &str = "x-raft-elector-cluster";
/// Header carrying the signing time in milliseconds since the UNIX epoch.
pub const TIMESTAMP_HEADER: &str = "x-raft-elector-timestamp";
/// Header carrying a random nonce, unique per request.
pub const NONCE_HEADER: &str = "x-raft-elector-nonce";
/// Header carrying the hex HMAC-SHA256 signature.
pub const SIGNATURE_HEADER: &str = "x-raft-elector-signature";

/// Shortest nonce accepted, in characters.
const MIN_NONCE_LEN: usize = 16;
/// Longest nonce accepted, in characters.
const MAX_NONCE_LEN: usize = 64;
/// Length of a hex HMAC-SHA256, in characters.
const SIGNATURE_HEX_LEN: usize = 64;
/// Most nonces remembered at once. Enough for a leader receiving 3 000
/// messages per second over a 30 s window; beyond that the oldest nonces are
/// forgotten and requests as old as them are refused (see [`NonceCache`]).
pub const NONCE_CACHE_CAPACITY: usize = 100_000;

pub(crate) type HmacSha256 = Hmac<Sha256>;

/// The four authentication headers of one request or response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthHeaders {
    /// Cluster id the sender belongs to.
    pub cluster_id: String,
    /// Signing time, milliseconds since the UNIX epoch.
    pub timestamp_ms: u64,
    /// Random per-request value.
    pub nonce: String,
    /// Lowercase hex HMAC-SHA256.
    pub signature: String,
}

impl AuthHeaders {
    /// Returns the headers as `(name, value)` pairs, ready to attach.
    pub fn to_pairs(&self) -> Vec<(String, String)> {
        vec![
            (CLUSTER_HEADER.to_string(), self.cluster_id.clone()),
            (TIMESTAMP_HEADER.to_string(), self.timestamp_ms.to_string()),
            (NONCE_HEADER.to_string(), self.nonce.clone()),
            (SIGNATURE_HEADER.to_string(), self.signature.clone()),
        ]
    }

    /// Adds the four headers to `headers`, replacing any already there.
    /// Skips a value that is not a valid header value (only a cluster id
    /// that failed [`TransportConfig::validate`] can be), so the peer
    /// refuses the message as malformed.
    pub fn insert_into(&self, headers: &mut http::HeaderMap) {
        use http::{HeaderName, HeaderValue};
        headers.insert(
            HeaderName::from_static(TIMESTAMP_HEADER),
            HeaderValue::from(self.timestamp_ms),
        );
        for (name, value) in [
            (CLUSTER_HEADER, &self.cluster_id),
            (NONCE_HEADER, &self.nonce),
            (SIGNATURE_HEADER, &self.signature),
        ] {
            if let Ok(value) = HeaderValue::from_str(value) {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }

    /// Reads the four headers; `Err(AuthFailure::Missing)` when none of the
    /// signature headers is present, `Malformed` when one is absent or invalid.
    pub fn parse(headers: &http::HeaderMap) -> Result<AuthHeaders, AuthFailure> {
        if headers.get(SIGNATURE_HEADER).is_none() && headers.get(CLUSTER_HEADER).is_none() {
            return Err(AuthFailure::Missing);
        }
        let text = |name: &str| -> Result<&str, AuthFailure> {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(AuthFailure::Malformed)
        };
        let cluster_id = text(CLUSTER_HEADER)?;
        let timestamp = text(TIMESTAMP_HEADER)?;
        let nonce = text(NONCE_HEADER)?;
        let signature = text(SIGNATURE_HEADER)?;
        // Canonical decimal only (no sign, no leading zeros), so the
        // signed string is exactly the header.
        let canonical = timestamp.bytes().all(|b| b.is_ascii_digit())
            && (timestamp == "0" || !timestamp.starts_with('0'));
        let timestamp_ms = match timestamp.parse::<u64>() {
            Ok(t) if canonical => t,
            _ => return Err(AuthFailure::Malformed),
        };
        let nonce_ok = (MIN_NONCE_LEN..=MAX_NONCE_LEN).contains(&nonce.len())
            && nonce.bytes().all(|b| b.is_ascii_alphanumeric());
        let signature_ok = signature.len() == SIGNATURE_HEX_LEN
            && signature.bytes().all(|b| b.is_ascii_hexdigit());
        if cluster_id.is_empty() || !nonce_ok || !signature_ok {
            return Err(AuthFailure::Malformed);
        }
        Ok(AuthHeaders {
            cluster_id: cluster_id.to_string(),
            timestamp_ms,
            nonce: nonce.to_string(),
            signature: signature.to_string(),
        })
    }
}

/// Why a signed request or response was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No authentication headers at all.
    Missing,
    /// Some headers are absent or not in the expected format.
    Malformed,
    /// The cluster id is not ours.
    ForeignCluster,
    /// The timestamp is further from our clock than the allowed skew.
    StaleTimestamp,
    /// The HMAC does not match (wrong secret or tampered content).
    BadSignature,
}

/// Returns milliseconds since the UNIX epoch on the wall clock (0 if the
/// clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(u64::MAX as u128) as u64)
        .unwrap_or(0)
}

/// Returns a fresh random nonce of 32 hex digits.
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// Returns the scope string a response to the request with `request_nonce`
/// is signed with.
pub fn response_scope(request_nonce: &str) -> String {
    format!("RESPONSE {request_nonce}")
}

/// Returns the MAC over the canonical string, keyed with `secret`.
fn mac(
    secret: &[u8],
    cluster_id: &str,
    timestamp_ms: u64,
    nonce: &str,
    scope: &str,
    body: &[u8],
) -> HmacSha256 {
    let mut mac =
        HmacSha256::new_from_slice(secret).expect("invariant: HMAC accepts keys of any length");
    mac.update(cluster_id.as_bytes());
    mac.update(b"\n");
    let mut digits = [0u8; 20];
    mac.update(decimal(timestamp_ms, &mut digits));
    mac.update(b"\n");
    mac.update(nonce.as_bytes());
    mac.update(b"\n");
    mac.update(scope.as_bytes());
    mac.update(b"\n");
    mac.update(body);
    mac
}

/// Writes `n` in decimal at the end of `buf`; returns the digits written.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// Signs `body` for `scope` with an explicit timestamp and nonce. Tests use
/// it to forge stale or replayed requests; senders use [`sign`].
pub fn sign_at(
    cfg: &TransportConfig,
    scope: &str,
    body: &[u8],
    timestamp_ms: u64,
    nonce: &str,
) -> AuthHeaders {
    let signature = hex::encode(
        mac(
            &cfg.secret,
            &cfg.cluster_id,
            timestamp_ms,
            nonce,
            scope,
            body,
        )
        .finalize()
        .into_bytes(),
    );
    AuthHeaders {
        cluster_id: cfg.cluster_id.clone(),
        timestamp_ms,
        nonce: nonce.to_string(),
        signature,
    }
}

/// Signs `body` for `scope` now, with a fresh nonce.
pub fn sign(cfg: &TransportConfig, scope: &str, body: &[u8]) -> AuthHeaders {
    sign_at(cfg, scope, body, now_ms(), &new_nonce())
}

/// Returns the authentication headers for a request to `method_path`
/// (e.g. `"POST /raft/v1/message"`) carrying `body`. For integration tests
/// that craft raw requests.
pub fn sign_headers(
    cfg: &TransportConfig,
    method_path: &str,
    body: &[u8],
) -> Vec<(String, String)> {
    sign(cfg, method_path, body).to_pairs()
}

/// Checks cluster id, timestamp window and signature of `auth` (in that
/// order: cheapest first). Does NOT check the nonce for replays; the server
/// does that with its [`NonceCache`] after this passes.
pub fn verify(
    cfg: &TransportConfig,
    auth: &AuthHeaders,
    scope: &str,
    body: &[u8],
    now_ms: u64,
) -> Result<(), AuthFailure> {
    if auth.cluster_id != cfg.cluster_id {
        return Err(AuthFailure::ForeignCluster);
    }
    let skew_ms = cfg.max_clock_skew.as_millis().min(u64::MAX as u128) as u64;
    if now_ms.abs_diff(auth.timestamp_ms) > skew_ms {
        return Err(AuthFailure::StaleTimestamp);
    }
    let mut expected = [0u8; SIGNATURE_HEX_LEN / 2];
    hex::decode_to_slice(&auth.signature, &mut expected).map_err(|_| AuthFailure::Malformed)?;
    mac(
        &cfg.secret,
        &auth.cluster_id,
        auth.timestamp_ms,
        &auth.nonce,
        scope,
        body,
    )
    .verify_slice(&expected)
    .map_err(|_| AuthFailure::BadSignature)
}

/// Nonces of accepted requests, remembered while their timestamp is inside
/// the skew window, at most [`NONCE_CACHE_CAPACITY`] of them.
///
/// When full, the nonce closest to expiry is forgotten and `floor_ms` is
/// raised to its expiry; from then on any request whose own expiry is not
/// after the floor is refused as a replay. A forgotten nonce can therefore
/// never be replayed, and only requests nearly as old as the window are
/// refused under pressure.
#[derive(Debug)]
pub struct NonceCache {
    capacity: usize,
    /// nonce -> expiry (timestamp + skew), ms since the UNIX epoch.
    by_nonce: HashMap<String, u64>,
    /// The same entries ordered by expiry, for eviction.
    by_expiry: BTreeSet<(u64, String)>,
    /// Requests expiring at or before this time (ms) are refused.
    floor_ms: u64,
}

impl NonceCache {
    /// Creates an empty cache holding at most `capacity` nonces (at least 1).
    pub fn new(capacity: usize) -> NonceCache {
        NonceCache {
            capacity: capacity.max(1),
            by_nonce: HashMap::new(),
            by_expiry: BTreeSet::new(),
            floor_ms: 0,
        }
    }

    /// Records `nonce`, which expires at `expiry_ms`; returns `false` (and
    /// changes nothing) when it was seen before or may have been forgotten.
    pub fn insert(&mut self, nonce: &str, expiry_ms: u64, now_ms: u64) -> bool {
        self.purge(now_ms);
        if expiry_ms <= self.floor_ms || self.by_nonce.contains_key(nonce) {
            return false;
        }
        while self.by_nonce.len() >= self.capacity {
            let Some((expiry, oldest)) = self.by_expiry.pop_first() else {
                break;
            };
            self.by_nonce.remove(&oldest);
            self.floor_ms = self.floor_ms.max(expiry);
        }
        self.by_nonce.insert(nonce.to_string(), expiry_ms);
        self.by_expiry.insert((expiry_ms, nonce.to_string()));
        true
    }

    /// Returns how many nonces are remembered.
    pub fn len(&self) -> usize {
        self.by_nonce.len()
    }

    /// Returns whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_nonce.is_empty()
    }

    /// Forgets nonces whose timestamp has left the window.
    fn purge(&mut self, now_ms: u64) {
        while let Some((expiry, _)) = self.by_expiry.first() {
            if *expiry >= now_ms {
                break;
            }
            if let Some((_, nonce)) = self.by_expiry.pop_first() {
                self.by_nonce.remove(&nonce);
            }
        }
    }
}

/// How often a warning is logged per reason at most.
pub const WARN_INTERVAL: Duration = Duration::from_secs(10);

/// Logs at most one warning per reason per [`WARN_INTERVAL`] and counts the
/// rest, so a misconfigured or hostile peer cannot flood the log.
#[derive(Debug, Default)]
pub struct RateLimitedWarn {
    /// reason -> (time of the last logged warning, warnings suppressed since).
    last: std::sync::Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl RateLimitedWarn {
    /// Returns `Some(suppressed)` when a warning for `reason` should be
    /// logged now (with the number suppressed since the last one), `None`
    /// when it should be suppressed.
    pub fn permit(&self, reason: &'static str, now: Instant) -> Option<u64> {
        let mut last = match self.last.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        match last.get_mut(reason) {
            Some((at, suppressed)) if now.saturating_duration_since(*at) < WARN_INTERVAL => {
                *suppressed += 1;
                None
            }
            Some((at, suppressed)) => {
                let n = *suppressed;
                *at = now;
                *suppressed = 0;
                Some(n)
            }
            None => {
                last.insert(reason, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(cluster: &str, secret: &[u8]) -> TransportConfig {
        TransportConfig::new(cluster, secret.to_vec())
    }

    #[test]
    fn signed_headers_verify_with_the_same_config() {
        let c = cfg("prod", b"0123456789abcdef");
        let h = sign(&c, "POST /x", b"body");
        assert_eq!(verify(&c, &h, "POST /x", b"body", h.timestamp_ms), Ok(()));
    }

    #[test]
    fn signature_covers_body_scope_and_secret() {
        let c = cfg("prod", b"0123456789abcdef");
        let h = sign(&c, "POST /x", b"body");
        let now = h.timestamp_ms;
        assert_eq!(
            verify(&c, &h, "POST /x", b"bodY", now),
            Err(AuthFailure::BadSignature)
        );
        assert_eq!(
            verify(&c, &h, "POST /y", b"body", now),
            Err(AuthFailure::BadSignature)
        );
        let other = cfg("prod", b"fedcba9876543210");
        assert_eq!(
            verify(&other, &h, "POST /x", b"body", now),
            Err(AuthFailure::BadSignature)
        );
    }

    #[test]
    fn foreign_cluster_and_stale_timestamps_are_refused() {
        let c = cfg("prod", b"0123456789abcdef");
        let h = sign_at(
            &c,
            "POST /x",
            b"",
            1_000_000,
            "00112233445566778899aabbccddeeff",
        );
        let foreign = cfg("staging", b"0123456789abcdef");
        assert_eq!(
            verify(&foreign, &h, "POST /x", b"", 1_000_000),
            Err(AuthFailure::ForeignCluster)
        );
        assert_eq!(
            verify(&c, &h, "POST /x", b"", 1_000_000 + 30_001),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(
            verify(&c, &h, "POST /x", b"", 1_000_000 - 30_001),
            Err(AuthFailure::StaleTimestamp)
        );
        assert_eq!(verify(&c, &h, "POST /x", b"", 1_000_000 + 30_000), Ok(()));
    }

    #[test]
    fn timestamps_are_signed_in_canonical_decimal() {
        let mut buf = [0u8; 20];
        for n in [0, 7, 10, 1_700_000_000_123, u64::MAX] {
            assert_eq!(decimal(n, &mut buf), n.to_string().as_bytes());
        }
    }

    #[test]
    fn inserted_headers_parse_back_to_the_same_values() {
        let c = cfg("prod", b"0123456789abcdef");
        let h = sign(&c, "POST /x", b"body");
        let mut map = http::HeaderMap::new();
        h.insert_into(&mut map);
        assert_eq!(AuthHeaders::parse(&map), Ok(h));
    }

    #[test]
    fn header_parsing_tells_missing_from_malformed() {
        let c = cfg("prod", b"0123456789abcdef");
        let mut map = http::HeaderMap::new();
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Missing));
        for (k, v) in sign_headers(&c, "POST /x", b"") {
            map.insert(
                http::HeaderName::from_bytes(k.as_bytes()).expect("valid name"),
                http::HeaderValue::from_str(&v).expect("valid value"),
            );
        }
        assert!(AuthHeaders::parse(&map).is_ok());
        map.insert(TIMESTAMP_HEADER, http::HeaderValue::from_static("-5"));
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Malformed));
        map.insert(TIMESTAMP_HEADER, http::HeaderValue::from_static("05"));
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Malformed));
        map.insert(TIMESTAMP_HEADER, http::HeaderValue::from_static("+5"));
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Malformed));
        map.insert(TIMESTAMP_HEADER, http::HeaderValue::from_static("5"));
        map.insert(NONCE_HEADER, http::HeaderValue::from_static("short"));
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Malformed));
        map.remove(NONCE_HEADER);
        assert_eq!(AuthHeaders::parse(&map), Err(AuthFailure::Malformed));
    }

    #[test]
    fn nonce_cache_refuses_repeats_and_forgets_expired_nonces() {
        let mut cache = NonceCache::new(10);
        assert!(cache.insert("a", 100, 0));
        assert!(!cache.insert("a", 100, 50));
        assert!(cache.insert("a", 300, 101), "expired nonce is forgotten");
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn full_nonce_cache_never_lets_a_forgotten_nonce_replay() {
        let mut cache = NonceCache::new(2);
        assert!(cache.insert("a", 100, 0));
        assert!(cache.insert("b", 200, 0));
        assert!(cache.insert("c", 300, 0), "evicts a, floor becomes 100");
        assert_eq!(cache.len(), 2);
        assert!(
            !cache.insert("a", 100, 0),
            "a replay of the evicted nonce is refused"
        );
        assert!(cache.insert("d", 400, 0));
        assert!(!cache.insert("b", 200, 0));
    }

    #[test]
    fn warnings_are_rate_limited_per_reason_and_count_suppressed_ones() {
        let warn = RateLimitedWarn::default();
        let t0 = Instant::now();
        assert_eq!(warn.permit("bad_signature", t0), Some(0));
        assert_eq!(
            warn.permit("bad_signature", t0 + Duration::from_secs(1)),
            None
        );
        assert_eq!(
            warn.permit("bad_signature", t0 + Duration::from_secs(2)),
            None
        );
        assert_eq!(
            warn.permit("stale_timestamp", t0 + Duration::from_secs(2)),
            Some(0)
        );
        assert_eq!(warn.permit("bad_signature", t0 + WARN_INTERVAL), Some(2));
    }
}
