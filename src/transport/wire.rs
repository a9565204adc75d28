//! The frames on a peer connection, before sealing: one JSON value each,
//! sent as one length-delimited frame (big-endian `u32` length) after the
//! Noise handshake.

use super::PeerInfo;
use crate::raft::Message;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Smallest frame limit a configuration may set (an identity and a
/// nudge must fit).
pub const MIN_FRAME_BYTES: usize = 8 * 1024;
/// Largest first frame (the identity) accepted from a connection that has
/// not authenticated yet: bounds what a stranger can make us buffer.
pub const MAX_IDENTITY_FRAME: usize = 16 * 1024;

/// One frame on a peer connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Who the sender is. The first frame either side sends, and the answer
    /// to [`Frame::Hello`].
    Identity(PeerInfo),
    /// Asks for the receiver's current [`Frame::Identity`].
    Hello,
    /// A Raft message; `from` must be the connection's identity.
    Raft(Message),
    /// The sender closes the connection on purpose; the last frame it sends.
    Goodbye,
    /// Padding that wakes a receiver reading quietly; ignored on receipt
    /// (see `transport::quiet`).
    Nudge(String),
}

impl Frame {
    /// Encodes the frame as JSON.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        serde_json::to_vec(self)
    }

    /// Encodes the frame as JSON, appended to `out` (no allocation when
    /// `out` has room).
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(out, self)
    }

    /// Decodes a frame, refusing anything that is not exactly one frame.
    pub fn decode(bytes: &[u8]) -> Result<Frame, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Returns the length-delimited codec with a frame limit of `max` bytes.
pub fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .max_frame_length(max)
        .new_codec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::{MessageBody, NodeId, Term};

    #[test]
    fn every_frame_kind_round_trips() {
        let id = NodeId::new("a", 1);
        let frames = [
            Frame::Identity(PeerInfo {
                cluster_id: "prod".into(),
                id: id.clone(),
                address: "10.0.0.1:4041".into(),
                joined: true,
                term: 3,
                leader: Some(id.clone()),
                leaving: false,
                bootstrap_lock: None,
            }),
            Frame::Hello,
            Frame::Raft(Message {
                from: id.clone(),
                to: NodeId::new("b", 2),
                term: Term(3),
                body: MessageBody::PreVoteResponse { granted: true },
            }),
            Frame::Goodbye,
            Frame::Nudge("...".into()),
        ];
        for frame in frames {
            let bytes = frame.encode().unwrap();
            assert_eq!(Frame::decode(&bytes).unwrap(), frame);
        }
    }

    #[test]
    fn trailing_or_foreign_bytes_are_malformed() {
        assert!(Frame::decode(b"\"Hello\" x").is_err());
        assert!(Frame::decode(b"{\"Shout\":1}").is_err());
        assert!(Frame::decode(&[0xff, 0x00]).is_err());
    }
}
