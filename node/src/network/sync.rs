//! `/peervm/sync/1`: a node that connects pulls a snapshot of the peer's valid adverts,
//! page by page (docs/architecture.md, "Sync"). Pages are capped in items and bytes
//! (1 MiB, docs/protocol.md section 2; the caps are in `tuning.rs`), and the receiver
//! verifies every advert (batch verification) and applies the accept rule, as for gossip
//! (SECURITY.md, invariant 1). Serving is rate limited per peer. A request with a
//! [`SyncFilter`] is a light client's query: one page of the cheapest matching adverts.

use libp2p::{PeerId, StreamProtocol};
use peervm_protocol::Accel;
use serde::{Deserialize, Serialize};

use crate::advert_store::OfferFilter;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/sync/1");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    pub version: u32,
    /// Resume after this provider id (bytes of its PeerId); None for the first page.
    #[serde(with = "opt_bytes")]
    pub after: Option<Vec<u8>>,
    pub max_items: u32,
    /// A light client's query (docs/protocol.md section 9, "Filtered sync"): when given,
    /// the server answers one page of the `max_items` cheapest matching adverts instead
    /// of a page of its whole store. Left out of a full sync's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<SyncFilter>,
    /// A fetch by id (docs/protocol.md section 9): refresh record ids (section 4a), 6
    /// bytes each, concatenated, at most [`MAX_FETCH_IDS`]; when given, the server answers
    /// one page of the adverts whose chains have them. A node sends it for the tokens it
    /// got without their advert (a gossip it missed). Left out otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ids: Option<Envelope>,
}

/// The most ids one fetch by id asks for (a request stays under 1,024 bytes).
pub const MAX_FETCH_IDS: usize = 64;

/// The ids of a fetch by id, each once: `None` unless the bytes are 1 to
/// [`MAX_FETCH_IDS`] whole ids.
pub fn decode_ids(bytes: &[u8]) -> Option<Vec<[u8; 6]>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(6) || bytes.len() / 6 > MAX_FETCH_IDS {
        return None;
    }
    let mut ids: Vec<[u8; 6]> = bytes.chunks_exact(6).map(|c| [c[0], c[1], c[2], c[3], c[4], c[5]]).collect();
    // A repeated id would put its adverts on the page again.
    ids.sort_unstable();
    ids.dedup();
    Some(ids)
}

/// The part of a requestor's [`OfferFilter`] a server can apply, each key left out when
/// not set. A requestor's own exclusions (its block list) stay with it: it asks for that
/// many more adverts instead.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_memory_mib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_disk_gib: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price_micros: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<Accel>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The owner's PeerId bytes.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub owner: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_exposed_ports: Option<u16>,
}

impl From<&OfferFilter> for SyncFilter {
    fn from(f: &OfferFilter) -> Self {
        SyncFilter {
            min_vcpus: f.min_vcpus,
            min_memory_mib: f.min_memory_mib,
            min_disk_gib: f.min_disk_gib,
            max_price_micros: f.max_price_micros,
            currency: f.currency.clone(),
            region: f.region.clone(),
            accel: f.accel,
            image: f.image.clone(),
            owner: f.owner.map(|o| o.to_bytes()),
            min_exposed_ports: f.min_exposed_ports,
        }
    }
}

impl SyncFilter {
    /// The store's filter for this query; `None` when `owner` is not a PeerId (then no
    /// advert matches).
    pub fn to_offer_filter(&self) -> Option<OfferFilter> {
        let owner = match self.owner.as_deref() {
            None => None,
            Some(bytes) => Some(PeerId::from_bytes(bytes).ok()?),
        };
        Some(OfferFilter {
            min_vcpus: self.min_vcpus,
            min_memory_mib: self.min_memory_mib,
            min_disk_gib: self.min_disk_gib,
            max_price_micros: self.max_price_micros,
            currency: self.currency.clone(),
            region: self.region.clone(),
            accel: self.accel,
            image: self.image.clone(),
            exclude: Default::default(),
            owner,
            min_exposed_ports: self.min_exposed_ports,
        })
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use peervm_protocol::encoding::{from_cbor, to_cbor};

    /// The filtered sync request of docs/protocol.md section 9, byte for byte: a filter
    /// carries only the keys that are set, in this order.
    #[test]
    fn the_documented_filtered_request() {
        let filter = OfferFilter { min_vcpus: Some(2), region: Some("eu".into()), ..Default::default() };
        let request =
            SyncRequest { version: 1, after: None, max_items: 20, filter: Some(SyncFilter::from(&filter)), ids: None };
        let bytes = to_cbor(&request);
        assert_eq!(
            hex::encode(&bytes),
            "a46776657273696f6e01656166746572f6696d61785f6974656d7314\
             6666696c746572a2696d696e5f76637075730266726567696f6e626575"
        );
        let back: SyncRequest = from_cbor(&bytes, "sync request").unwrap();
        assert_eq!(back.filter, request.filter);
        // A full sync's request has no `filter` key: it encodes as before.
        let full = SyncRequest { version: 1, after: None, max_items: 1024, filter: None, ids: None };
        assert_eq!(hex::encode(to_cbor(&full)), "a36776657273696f6e01656166746572f6696d61785f6974656d73190400");
    }

    #[test]
    fn a_filter_round_trips_and_an_owner_that_is_no_peer_id_matches_nothing() {
        let owner = peervm_protocol::samples::owner_key().peer_id();
        let filter = OfferFilter {
            min_vcpus: Some(4),
            min_memory_mib: Some(8192),
            min_disk_gib: Some(20),
            max_price_micros: Some(90_000),
            currency: Some("EUR".into()),
            region: Some("eu-west".into()),
            accel: Some(Accel::Kvm),
            image: Some("debian-12".into()),
            exclude: [owner].into(),
            owner: Some(owner),
            min_exposed_ports: Some(2),
        };
        let wire = SyncFilter::from(&filter);
        let back: SyncFilter = from_cbor(&to_cbor(&wire), "filter").unwrap();
        let local = back.to_offer_filter().unwrap();
        assert_eq!(format!("{local:?}"), format!("{:?}", OfferFilter { exclude: Default::default(), ..filter }));
        let bad = SyncFilter { owner: Some(vec![1, 2, 3]), ..wire };
        assert!(bad.to_offer_filter().is_none());
    }

    #[test]
    fn fetch_ids_are_1_to_64_whole_ids() {
        assert_eq!(decode_ids(&[7; 12]), Some(vec![[7; 6]]), "each id once");
        assert_eq!(decode_ids(&[[2; 6], [1; 6]].concat()), Some(vec![[1; 6], [2; 6]]));
        let most: Vec<u8> = (0..MAX_FETCH_IDS as u8).flat_map(|i| [i; 6]).collect();
        assert_eq!(decode_ids(&most).map(|ids| ids.len()), Some(MAX_FETCH_IDS));
        for bad in [0, 5, 13, 6 * (MAX_FETCH_IDS + 1)] {
            assert_eq!(decode_ids(&vec![1; bad]), None, "{bad} bytes");
        }
    }
}
