//! `/peervm/lease/1`: signed lease requests and control messages in, one signed reply
//! out (DESIGN section 7). The wire carries the signed envelopes as CBOR byte strings;
//! the lease manager verifies them, the swarm only routes and rate limits.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

pub use super::sync::Envelope;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/lease/1");
/// A signed request is well under 1 KiB; the cap leaves room for growth, not for abuse.
pub const MAX_REQUEST_BYTES: u64 = 16 * 1024;
pub const MAX_RESPONSE_BYTES: u64 = 16 * 1024;
/// A grant comes back once the guest's sshd is up: provisioning plus a software-emulated
/// boot can take minutes, so the stream waits that long.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

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
