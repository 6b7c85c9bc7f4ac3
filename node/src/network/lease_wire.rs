//! `/peervm/lease/1`: signed lease requests and control messages in, one signed reply
//! out (docs/protocol.md, sections 5-7 and "Transport: /peervm/lease/1"). The wire carries
//! the signed envelopes as CBOR byte strings; the lease manager verifies them, the swarm
//! only routes and rate limits. Sizes and the timeout are in `tuning.rs`.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

pub use super::sync::Envelope;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/lease/1");

/// What a requestor sends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseMessage {
    /// A `Signed<LeaseRequest>`.
    Request(Envelope),
    /// A `Signed<LeaseControl>`.
    Control(Envelope),
}

impl LeaseMessage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            LeaseMessage::Request(e) | LeaseMessage::Control(e) => &e.0,
        }
    }
}
