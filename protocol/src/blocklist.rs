//! Signed block lists: an operator's public warning about peers it blocked. Anyone may
//! publish one and every node relays valid ones, but a node applies a list only when its
//! own operator chose to trust that signer, so nobody can censor the market for others.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::advert::{MAX_CLOCK_SKEW_MS, MAX_TEXT_LEN};
use crate::identity::peer_id_serde;
use crate::signed::{Kind, Payload};

pub const BLOCK_LIST_VERSION: u32 = 1;
/// Most entries one list may carry (the 64 KiB envelope cap holds them with room).
pub const MAX_BLOCK_ENTRIES: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockEntry {
    #[serde(with = "peer_id_serde")]
    pub peer: PeerId,
    /// Why, for humans (at most 128 bytes).
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockList {
    pub version: u32,
    #[serde(with = "peer_id_serde")]
    pub signer: PeerId,
    /// Strictly increasing per signer: a newer list replaces the older one whole.
    pub seq: u64,
    pub issued_at_unix_ms: u64,
    pub entries: Vec<BlockEntry>,
}

impl Payload for BlockList {
    const KIND: Kind = Kind::BlockList;
    const VERSION: u32 = BLOCK_LIST_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.signer
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BlockListError {
    #[error("block list has {0} entries, over the {MAX_BLOCK_ENTRIES} limit")]
    TooManyEntries(usize),
    #[error("block list entry for {peer}: reason is {len} bytes, over {MAX_TEXT_LEN}")]
    ReasonTooLong { peer: String, len: usize },
    #[error("block list issued at {issued_at_unix_ms}, more than {MAX_CLOCK_SKEW_MS} ms after now ({now_unix_ms})")]
    IssuedInFuture { issued_at_unix_ms: u64, now_unix_ms: u64 },
    #[error("block list names {0} twice")]
    Duplicate(String),
}

impl BlockList {
    /// The checks every receiver applies after the signature: sizes, no duplicates, not
    /// issued in the future.
    pub fn check(&self, now_unix_ms: u64) -> Result<(), BlockListError> {
        if self.entries.len() > MAX_BLOCK_ENTRIES {
            return Err(BlockListError::TooManyEntries(self.entries.len()));
        }
        let mut seen = std::collections::HashSet::new();
        for e in &self.entries {
            if e.reason.len() > MAX_TEXT_LEN {
                return Err(BlockListError::ReasonTooLong { peer: e.peer.to_string(), len: e.reason.len() });
            }
            if !seen.insert(e.peer) {
                return Err(BlockListError::Duplicate(e.peer.to_string()));
            }
        }
        if self.issued_at_unix_ms > now_unix_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(BlockListError::IssuedInFuture { issued_at_unix_ms: self.issued_at_unix_ms, now_unix_ms });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples;
    use crate::signed::Signed;

    fn list(key: &crate::SigningKey, entries: Vec<BlockEntry>) -> BlockList {
        BlockList { version: 1, signer: key.peer_id(), seq: 1, issued_at_unix_ms: samples::T0_UNIX_MS, entries }
    }

    #[test]
    fn a_signed_list_round_trips_and_its_checks_hold() {
        let key = samples::provider_key();
        let bad = samples::requestor_key().peer_id();
        let l = list(&key, vec![BlockEntry { peer: bad, reason: "abuse".into() }]);
        let bytes = Signed::sign(&key, &l).unwrap().to_bytes();
        let opened = Signed::<BlockList>::open(&bytes).unwrap();
        assert_eq!(opened.body(), &l);
        assert!(opened.body().check(samples::T0_UNIX_MS).is_ok());

        let dup = list(
            &key,
            vec![BlockEntry { peer: bad, reason: "a".into() }, BlockEntry { peer: bad, reason: "b".into() }],
        );
        assert!(matches!(dup.check(samples::T0_UNIX_MS), Err(BlockListError::Duplicate(_))));
        let long = list(&key, vec![BlockEntry { peer: bad, reason: "x".repeat(200) }]);
        assert!(matches!(long.check(samples::T0_UNIX_MS), Err(BlockListError::ReasonTooLong { .. })));
        let future = BlockList { issued_at_unix_ms: samples::T0_UNIX_MS + 60_000, ..l.clone() };
        assert!(future.check(samples::T0_UNIX_MS).is_err());
    }

    #[test]
    fn nobody_can_sign_a_list_for_another_signer() {
        let l = list(&samples::provider_key(), vec![]);
        assert!(Signed::sign(&samples::requestor_key(), &l).is_err());
    }
}
