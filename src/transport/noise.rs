//! The handshake and per-frame encryption: the Noise protocol
//! `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` (noiseprotocol.org, rev. 34) as
//! implemented by the `snow` crate, keyed by the cluster's shared secret.
//!
//! ```text
//!   dialer                                         listener
//!     ── psk, e ──────────────────────────────────────►   (message 1)
//!     ◄────────────────────────────────────── e, ee ──    (message 2)
//!     ══ Identity(PeerInfo) ═══ sealed frames ═══ Identity(PeerInfo) ══
//! ```
//!
//! Why this is safe for a cluster that shares one secret:
//! - **Mutual authentication by the PSK.** The pre-shared key is
//!   HKDF-SHA256(secret, salt, info = cluster id), mixed into the handshake
//!   before the first message (`psk0`), and the prologue binds the protocol
//!   version and cluster id. A side without the secret (or of another
//!   cluster) cannot produce message 1 or 2, nor decrypt or produce a single
//!   transport frame. A replayed message 1 earns the replayer a message 2 it
//!   cannot use: the transport keys also depend on the dialer's ephemeral
//!   private key. So the listener trusts nothing until the first sealed frame
//!   (the dialer's identity) opens, and drops the connection at the deadline
//!   otherwise.
//! - **Forward secrecy.** The transport keys come from a Diffie-Hellman of
//!   two fresh ephemeral keys (`ee`); a secret leaked later does not open
//!   recorded traffic.
//! - **Integrity, order, no replay.** Every frame is ChaCha20-Poly1305 AEAD
//!   under an implicit nonce that counts frames (chunks) in each direction
//!   from zero: a modified, dropped, replayed or reordered frame fails to
//!   open and the connection is closed.
//! - **No reflection or splicing.** Each direction has its own key, so a
//!   frame sent back to its sender does not open; every connection has its
//!   own ephemeral keys, so a frame moved from one connection to another
//!   does not open either (channel binding).
//!
//! Noise messages are at most 65,535 bytes; a larger frame is sealed as
//! consecutive chunks, each with its own tag and nonce.

use super::{TransportConfig, TransportError};
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use snow::StatelessTransportState;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::bytes::Bytes;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// The Noise protocol name; see the module docs for why this pattern.
pub const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// HKDF salt of the pre-shared key; a new version gets a new salt.
const PSK_SALT: &[u8] = b"raft-elector peer psk v1";
/// Prologue prefix: both sides must agree on it and on the cluster id.
const PROLOGUE: &[u8] = b"raft-elector/1\0";
/// Longest Noise message.
const MAX_NOISE_MESSAGE: usize = 65_535;
/// AEAD tag length.
const TAG: usize = 16;
/// Largest handshake message (message 1 and 2 are 48 bytes).
pub const MAX_HANDSHAKE_MESSAGE: usize = 128;

/// Derives the 32-byte pre-shared key from the secret and the cluster id
/// (HKDF-SHA256, RFC 5869, one output block).
pub fn derive_psk(secret: &[u8], cluster_id: &str) -> [u8; 32] {
    let mut extract = <Hmac<Sha256> as Mac>::new_from_slice(PSK_SALT)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    extract.update(secret);
    let prk = extract.finalize().into_bytes();
    let mut expand = <Hmac<Sha256> as Mac>::new_from_slice(&prk)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    expand.update(cluster_id.as_bytes());
    expand.update(&[1]);
    expand.finalize().into_bytes().into()
}

fn builder(
    cfg: &TransportConfig,
    psk: &[u8; 32],
    initiator: bool,
) -> Result<snow::HandshakeState, snow::Error> {
    let params: snow::params::NoiseParams = NOISE_PARAMS.parse()?;
    let mut prologue = PROLOGUE.to_vec();
    prologue.extend_from_slice(cfg.cluster_id.as_bytes());
    let b = snow::Builder::new(params)
        .psk(0, psk)?
        .prologue(&prologue)?;
    if initiator {
        b.build_initiator()
    } else {
        b.build_responder()
    }
}

/// Runs the dialer's side of the handshake on `framed`; returns the keys.
pub async fn initiate<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    cfg: &TransportConfig,
) -> Result<(Sealer, Opener), TransportError> {
    let psk = derive_psk(&cfg.secret, &cfg.cluster_id);
    let mut hs = builder(cfg, &psk, true)?;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    let n = hs.write_message(&[], &mut buf)?;
    framed.send(Bytes::copy_from_slice(&buf[..n])).await?;
    let answer = framed.next().await.ok_or(TransportError::Closed)??;
    hs.read_message(&answer, &mut buf)?;
    split(hs)
}

/// Runs the listener's side of the handshake on `framed`; returns the keys.
/// The dialer is not authenticated until its first frame opens.
pub async fn respond<T: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<T, LengthDelimitedCodec>,
    cfg: &TransportConfig,
) -> Result<(Sealer, Opener), TransportError> {
    let psk = derive_psk(&cfg.secret, &cfg.cluster_id);
    let mut hs = builder(cfg, &psk, false)?;
    let mut buf = [0u8; MAX_HANDSHAKE_MESSAGE];
    let first = framed.next().await.ok_or(TransportError::Closed)??;
    hs.read_message(&first, &mut buf)?;
    let n = hs.write_message(&[], &mut buf)?;
    framed.send(Bytes::copy_from_slice(&buf[..n])).await?;
    split(hs)
}

fn split(hs: snow::HandshakeState) -> Result<(Sealer, Opener), TransportError> {
    let keys = Arc::new(hs.into_stateless_transport_mode()?);
    Ok((
        Sealer {
            keys: keys.clone(),
            nonce: 0,
        },
        Opener { keys, nonce: 0 },
    ))
}

/// Seals the frames of one direction, counting nonces from zero.
pub struct Sealer {
    keys: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    /// Encrypts and authenticates `plain` as the next frame.
    pub fn seal(&mut self, plain: &[u8]) -> Result<Bytes, snow::Error> {
        let mut out = Vec::new();
        self.seal_into(plain, &mut out)?;
        Ok(Bytes::from(out))
    }

    /// Returns the length of `plain` sealed.
    pub fn sealed_len(plain: usize) -> usize {
        plain + plain.div_ceil(MAX_NOISE_MESSAGE - TAG).max(1) * TAG
    }

    /// Encrypts and authenticates `plain` as the next frame, appended to
    /// `out` (no allocation when `out` has room). On an error `out` is as
    /// it was.
    pub fn seal_into(&mut self, plain: &[u8], out: &mut Vec<u8>) -> Result<(), snow::Error> {
        let chunk = MAX_NOISE_MESSAGE - TAG;
        let chunks = plain.len().div_ceil(chunk).max(1);
        let start = out.len();
        out.resize(start + Sealer::sealed_len(plain.len()), 0);
        let mut at = start;
        let nonce = self.nonce;
        for i in 0..chunks {
            let piece = &plain[(i * chunk).min(plain.len())..((i + 1) * chunk).min(plain.len())];
            match self.keys.write_message(self.nonce, piece, &mut out[at..]) {
                Ok(n) => at += n,
                Err(e) => {
                    self.nonce = nonce;
                    out.truncate(start);
                    return Err(e);
                }
            }
            self.nonce += 1;
        }
        out.truncate(at);
        Ok(())
    }
}

/// Opens the frames of the other direction, expecting nonces in order.
pub struct Opener {
    keys: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Opener {
    /// Decrypts and verifies the next frame; fails on any change, replay,
    /// reordering or frame of another connection or direction.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, snow::Error> {
        let mut out = Vec::new();
        self.open_into(sealed, &mut out)?;
        Ok(out)
    }

    /// Like [`Opener::open`], into `out` (cleared first; no allocation
    /// when it has room).
    pub fn open_into(&mut self, sealed: &[u8], out: &mut Vec<u8>) -> Result<(), snow::Error> {
        out.clear();
        if sealed.len() < TAG {
            return Err(snow::Error::Decrypt);
        }
        out.resize(sealed.len(), 0);
        let mut at = 0;
        for piece in sealed.chunks(MAX_NOISE_MESSAGE) {
            at += self.keys.read_message(self.nonce, piece, &mut out[at..])?;
            self.nonce += 1;
        }
        out.truncate(at);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    fn cfg(cluster: &str, secret: &[u8]) -> TransportConfig {
        TransportConfig::new(cluster, secret.to_vec())
    }

    fn codec() -> LengthDelimitedCodec {
        LengthDelimitedCodec::builder()
            .max_frame_length(1 << 20)
            .new_codec()
    }

    /// Handshakes a pair in memory; returns (dialer keys, listener keys).
    async fn pair(
        a: &TransportConfig,
        b: &TransportConfig,
    ) -> (
        Result<(Sealer, Opener), TransportError>,
        Result<(Sealer, Opener), TransportError>,
    ) {
        let (x, y) = duplex(4096);
        // Each side drops its end when done, so a failed side ends the other's wait.
        let dial = async move { initiate(&mut Framed::new(x, codec()), a).await };
        let listen = async move { respond(&mut Framed::new(y, codec()), b).await };
        tokio::join!(dial, listen)
    }

    #[test]
    fn the_psk_depends_on_secret_and_cluster() {
        let base = derive_psk(b"0123456789abcdef", "prod");
        assert_eq!(base, derive_psk(b"0123456789abcdef", "prod"));
        assert_ne!(base, derive_psk(b"0123456789abcdeX", "prod"));
        assert_ne!(base, derive_psk(b"0123456789abcdef", "prod2"));
    }

    #[tokio::test]
    async fn frames_round_trip_both_ways_including_large_ones() {
        let c = cfg("prod", b"0123456789abcdef");
        let (a, b) = pair(&c, &c).await;
        let ((mut a_seal, mut a_open), (mut b_seal, mut b_open)) = (a.unwrap(), b.unwrap());
        for plain in [b"x".to_vec(), vec![7u8; 200_000], Vec::new()] {
            let sealed = a_seal.seal(&plain).unwrap();
            assert_eq!(b_open.open(&sealed).unwrap(), plain);
            let sealed = b_seal.seal(&plain).unwrap();
            assert_eq!(a_open.open(&sealed).unwrap(), plain);
        }
    }

    #[tokio::test]
    async fn tampered_replayed_reordered_and_reflected_frames_do_not_open() {
        let c = cfg("prod", b"0123456789abcdef");
        let (a, b) = pair(&c, &c).await;
        let ((mut a_seal, mut a_open), (_, mut b_open)) = (a.unwrap(), b.unwrap());
        let first = a_seal.seal(b"first").unwrap();
        let second = a_seal.seal(b"second").unwrap();
        // Reordered: the second frame first.
        let mut fresh = Opener {
            keys: b_open.keys.clone(),
            nonce: 0,
        };
        assert!(fresh.open(&second).is_err(), "reordered");
        // Tampered.
        let mut bad = first.to_vec();
        bad[0] ^= 1;
        assert!(b_open.open(&bad).is_err(), "tampered");
        assert_eq!(b_open.open(&first).unwrap(), b"first");
        // Replayed.
        assert!(b_open.open(&first).is_err(), "replayed");
        // Reflected back to its sender.
        assert!(a_open.open(&second).is_err(), "reflected");
    }

    #[tokio::test]
    async fn frames_of_one_connection_do_not_open_on_another() {
        let c = cfg("prod", b"0123456789abcdef");
        let (one, _) = pair(&c, &c).await;
        let (_, two) = pair(&c, &c).await;
        let (mut seal_one, _) = one.unwrap();
        let (_, mut open_two) = two.unwrap();
        let sealed = seal_one.seal(b"spliced").unwrap();
        assert!(open_two.open(&sealed).is_err());
    }

    #[tokio::test]
    async fn a_wrong_secret_or_cluster_fails_the_handshake() {
        let c = cfg("prod", b"0123456789abcdef");
        for other in [
            cfg("prod", b"0123456789abcdeX"),
            cfg("staging", b"0123456789abcdef"),
        ] {
            let (a, b) = pair(&other, &c).await;
            // The listener cannot read message 1.
            assert!(
                matches!(b, Err(TransportError::Crypto(_))),
                "listener: {:?}",
                b.err()
            );
            assert!(a.is_err(), "the dialer gets no message 2");
        }
    }
}
