//! `/peervm/sync/1`: a node that connects pulls a snapshot of the peer's valid adverts,
//! page by page (docs/architecture.md, "Sync"). Pages are capped in items and bytes
//! (1 MiB, docs/protocol.md section 2; the caps are in `tuning.rs`), and the receiver
//! verifies every advert (batch verification) and applies the accept rule, as for gossip
//! (SECURITY.md, invariant 1). Serving is rate limited per peer.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/sync/1");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub version: u32,
    /// Resume after this provider id (bytes of its PeerId); None for the first page.
    #[serde(with = "opt_bytes")]
    pub after: Option<Vec<u8>>,
    pub max_items: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SyncResponse {
    Page {
        /// Signed advert envelopes, each verified by the receiver.
        adverts: Vec<Envelope>,
        /// Cursor for the next page; None when this was the last.
        #[serde(with = "opt_bytes")]
        next: Option<Vec<u8>>,
        /// Signed block lists the server holds (first page only), each verified by the
        /// receiver; absent from older peers.
        #[serde(default)]
        lists: Vec<Envelope>,
        /// The newest refresh record the server holds for each advert on the page, 24
        /// bytes each, concatenated (docs/protocol.md, section 9); left out when none.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refreshes: Option<Envelope>,
    },
    /// The server throttled this peer; try later.
    RateLimited,
}

/// A signed envelope as a CBOR byte string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope(pub Vec<u8>);

impl Serialize for Envelope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Envelope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Envelope;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Envelope, E> {
                Ok(Envelope(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Envelope, E> {
                Ok(Envelope(v))
            }
        }
        d.deserialize_byte_buf(V)
    }
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        v.as_ref().map(|b| super::Envelope(b.clone())).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<super::Envelope>::deserialize(d)?.map(|e| e.0))
    }
}
