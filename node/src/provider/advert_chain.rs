//! The provider's side of refresh tokens (docs/protocol.md, section 4a): the hash chain
//! its current advert carries, and what the publish loop does next: release token `k`
//! at its release time, or, once the chain is spent, sign a new advert with a new chain.

use libp2p::PeerId;
use peervm_protocol::{RefreshChain, RefreshError, RefreshRecord, RefreshSecret};
use rand::RngCore;

use crate::provider::config::RefreshTerms;

/// The chain of the advert the provider published last, and the next token due.
pub struct AdvertChain {
    secret: RefreshSecret,
    issued_at_ms: u64,
    period_ms: u64,
    count: u32,
    next_k: u32,
}

/// What the publish loop does at `at_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Release token `k` (its release time, never earlier: nodes refuse an early one).
    Token { k: u16, at_ms: u64 },
    /// The chain is spent: sign a new advert, in the place of the token that would come
    /// next (the last token keeps the advert live for its lifetime after that).
    Resign { at_ms: u64 },
}

impl AdvertChain {
    /// A chain for the advert `seq` of `provider`, issued at `issued_at_ms`, from a seed
    /// drawn from the OS: the field the advert signs, and the provider's side. Terms the
    /// config checked (`config.rs`, `refresh_terms`) always make one.
    pub fn new(
        terms: RefreshTerms,
        provider: &PeerId,
        seq: u64,
        issued_at_ms: u64,
    ) -> Result<(RefreshChain, AdvertChain), RefreshError> {
        let mut seed = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        Self::from_seed(terms, provider, seq, issued_at_ms, seed)
    }

    fn from_seed(
        terms: RefreshTerms,
        provider: &PeerId,
        seq: u64,
        issued_at_ms: u64,
        seed: [u8; 16],
    ) -> Result<(RefreshChain, AdvertChain), RefreshError> {
        let (chain, secret) = RefreshSecret::generate(provider, seq, terms.period_secs, terms.count, seed)?;
        let period_ms = u64::from(terms.period_secs) * 1000;
        Ok((chain, AdvertChain { secret, issued_at_ms, period_ms, count: terms.count, next_k: 1 }))
    }

    pub fn next(&self) -> Next {
        let at_ms = self.issued_at_ms.saturating_add(u64::from(self.next_k).saturating_mul(self.period_ms));
        match u16::try_from(self.next_k) {
            Ok(k) if self.next_k <= self.count => Next::Token { k, at_ms },
            _ => Next::Resign { at_ms },
        }
    }

    /// The record of token `k`, for the node to check and send.
    pub fn record(&self, k: u16) -> Option<RefreshRecord> {
        self.secret.record(u32::from(k))
    }

    /// Token `next_k` went out: the one after it is next.
    pub fn advance(&mut self) {
        self.next_k = self.next_k.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_one_period_apart_and_a_spent_chain_asks_for_a_new_advert() {
        let provider = peervm_protocol::samples::numbered_key(1).peer_id();
        let terms = RefreshTerms { period_secs: 100, count: 3 };
        let (chain, mut ac) = AdvertChain::from_seed(terms, &provider, 7, 1_000_000, [9; 16]).expect("chain");
        assert_eq!((chain.period_s, chain.count), (100, 3));
        let mut seen = Vec::new();
        loop {
            let next = ac.next();
            seen.push(next);
            if let Next::Token { k, .. } = next {
                let record = ac.record(k).expect("a token within the chain");
                assert_eq!((record.k, record.id), (k, chain.id(&provider, 7)));
                ac.advance();
            } else {
                break;
            }
        }
        assert_eq!(
            seen,
            [
                Next::Token { k: 1, at_ms: 1_100_000 },
                Next::Token { k: 2, at_ms: 1_200_000 },
                Next::Token { k: 3, at_ms: 1_300_000 },
                Next::Resign { at_ms: 1_400_000 },
            ]
        );
    }

    #[test]
    fn two_chains_of_the_same_advert_share_no_token() {
        let provider = peervm_protocol::samples::numbered_key(1).peer_id();
        let terms = RefreshTerms { period_secs: 100, count: 3 };
        let (a, ac) = AdvertChain::new(terms, &provider, 7, 0).expect("chain");
        let (b, bc) = AdvertChain::new(terms, &provider, 7, 0).expect("chain");
        assert_ne!(a.anchor, b.anchor, "the seed comes from the OS, fresh each time");
        assert_ne!(ac.record(1).map(|r| r.token), bc.record(1).map(|r| r.token));
    }
}
