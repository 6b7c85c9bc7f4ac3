//! Refresh tokens (docs/protocol.md section 4a): 16-byte values of a hash chain whose end,
//! the `anchor`, an advert signs, and which keep that advert live without re-signing it.
//!
//! Why: re-signing and re-gossiping a whole advert (~640 bytes) every minute is what makes
//! gossip cost 7.8 MB/s per node at 100,000 providers (docs/bandwidth.md); a token is a
//! 24-byte record and costs a receiver a few SHA-256 computations instead of an ed25519
//! verification. Only the provider can make the next token (it would otherwise have to
//! invert the step function), exactly as only it can sign an advert.
//!
//! This module holds the provider's side ([`RefreshSecret`]), the wire record
//! ([`RefreshRecord`], batches of them) and the receiver's accept table as a pure function
//! ([`check_token`]); which adverts a node holds, and the "unknown id" row, are the store's.

use std::fmt;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::advert::MAX_CLOCK_SKEW_MS;
use crate::encoding;

/// Domain of the step function: ASCII, then one 0x00 byte (docs/protocol.md section 4a).
pub const REFRESH_DOMAIN: &[u8] = b"peervm/refresh/1\0";
/// Bytes of one token (a chain value).
pub const TOKEN_LEN: usize = 16;
/// Domain of a record's id (docs/protocol.md section 4a, "Records").
pub const REFRESH_ID_DOMAIN: &[u8] = b"peervm/refresh-id/1\0";
/// Bytes of a record's id: the first bytes of a hash of the advert's provider, seq and
/// anchor.
pub const RECORD_ID_LEN: usize = 6;
/// Bytes of one record on the wire: id, k (uint16 big-endian), token.
pub const RECORD_LEN: usize = RECORD_ID_LEN + 2 + TOKEN_LEN;
/// Most records in one batch (`/peervm/refresh/1`, docs/protocol.md section 9a).
pub const MAX_BATCH_RECORDS: usize = 4096;
/// Shortest period between two tokens: a shorter one only adds traffic.
pub const MIN_PERIOD_S: u32 = 10;
/// Most tokens in one chain: what a receiver new to an advert hashes at most to check a
/// token from the anchor (docs/protocol.md, row 19). With a period no longer than the
/// advert's lifetime (300 s at most), a chain covers at most 85 hours.
pub const MAX_COUNT: u32 = 1_024;

/// One token: a value of the chain.
pub type Token = [u8; 16];

/// The `refresh` field of an advert (docs/protocol.md section 4, row 19): the chain whose
/// tokens keep the advert live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RefreshChain {
    /// `t_0`, the end of the chain; the only value published with the advert.
    #[serde(with = "encoding::fixed_bytes")]
    pub anchor: Token,
    /// Seconds between the release times of two tokens.
    pub period_s: u32,
    /// Tokens in the chain (`t_1` to `t_count`).
    pub count: u32,
}

impl RefreshChain {
    /// The id records name this chain by: the anchor's first 6 bytes. Not unique by
    /// construction; a node tries each advert it holds under an id.
    ///
    /// The id is bound to the provider and the advert (docs/protocol.md section 4a): an
    /// advert that copies another provider's `refresh` field gets another id, so it can
    /// neither take that provider's tokens nor crowd its id.
    pub fn id(&self, provider: &PeerId, seq: u64) -> [u8; RECORD_ID_LEN] {
        id_bytes(&provider.to_bytes(), seq, &self.anchor)
    }

    /// The bounds of row 19 that do not depend on the advert's lifetime: `10 ≤ period_s`,
    /// `1 ≤ count ≤ 1,024`.
    fn check_shape(&self) -> Result<(), String> {
        if self.period_s < MIN_PERIOD_S {
            return Err(format!("refresh.period_s {} is under {MIN_PERIOD_S}", self.period_s));
        }
        if self.count == 0 || self.count > MAX_COUNT {
            return Err(format!("refresh.count {} is not within 1..={MAX_COUNT}", self.count));
        }
        Ok(())
    }

    /// Every bound of row 19 for an advert issued at `issued_at` and expiring at
    /// `expires_at`: a period no longer than the signed lifetime, so that consecutive
    /// tokens keep the advert live without a gap. An advert that expires before it is
    /// issued has no lifetime, so its chain fails here (as `Malformed`, the field check
    /// that comes before `ExpiresBeforeIssued` in section 4's order).
    pub fn check_bounds(&self, issued_at_unix_ms: u64, expires_at_unix_ms: u64) -> Result<(), String> {
        self.check_shape()?;
        let lifetime_ms = expires_at_unix_ms.saturating_sub(issued_at_unix_ms);
        if u64::from(self.period_s) * 1000 > lifetime_ms {
            return Err(format!(
                "refresh.period_s {} is longer than the advert's lifetime of {lifetime_ms} ms",
                self.period_s
            ));
        }
        Ok(())
    }
}

/// Why refresh data could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RefreshError {
    #[error("a refresh batch holds no record (1 to {MAX_BATCH_RECORDS} records of {RECORD_LEN} bytes)")]
    EmptyBatch,
    #[error("a refresh batch of {len} bytes is not a whole number of {RECORD_LEN}-byte records")]
    BatchLength { len: usize },
    #[error("a refresh batch of {records} records, at most {MAX_BATCH_RECORDS}")]
    TooManyRecords { records: usize },
    #[error("refresh chain cannot be made: {0}")]
    BadChain(String),
}

/// The step function `H_i` (docs/protocol.md section 4a): the first 16 bytes of
/// SHA-256("peervm/refresh/1" || 0x00 || provider || seq (u64 BE) || i (u32 BE) || x).
/// Binding each step to the provider, the advert and the position means one hash
/// computation can only ever attack one position of one chain.
pub fn step(provider: &PeerId, seq: u64, i: u32, x: &Token) -> Token {
    step_bytes(&provider.to_bytes(), seq, i, x)
}

/// A record's id: the first 6 bytes of SHA-256("peervm/refresh-id/1" || 0x00 || provider
/// || seq (u64 BE) || anchor).
fn id_bytes(provider: &[u8], seq: u64, anchor: &Token) -> [u8; RECORD_ID_LEN] {
    let digest = Sha256::new()
        .chain_update(REFRESH_ID_DOMAIN)
        .chain_update(provider)
        .chain_update(seq.to_be_bytes())
        .chain_update(anchor)
        .finalize();
    let mut id = [0u8; RECORD_ID_LEN];
    id.copy_from_slice(&digest[..RECORD_ID_LEN]);
    id
}

/// [`step`] with the provider's PeerId bytes already encoded (a chain walk encodes them once).
fn step_bytes(provider: &[u8], seq: u64, i: u32, x: &Token) -> Token {
    let digest = Sha256::new()
        .chain_update(REFRESH_DOMAIN)
        .chain_update(provider)
        .chain_update(seq.to_be_bytes())
        .chain_update(i.to_be_bytes())
        .chain_update(x)
        .finalize();
    let mut out = [0u8; TOKEN_LEN];
    out.copy_from_slice(&digest[..TOKEN_LEN]);
    out
}

/// When token `k` of an advert issued at `issued_at` may be sent and accepted:
/// `issued_at + k * period_s * 1000` (saturating: a time past the end of u64 never comes).
pub fn release_at_ms(issued_at_unix_ms: u64, period_s: u32, k: u32) -> u64 {
    issued_at_unix_ms.saturating_add(u64::from(k).saturating_mul(u64::from(period_s)).saturating_mul(1000))
}

/// The advert's expiry once token `k` was accepted: `expires_at + k * period_s * 1000`,
/// its signed lifetime counted again from the token's release time (saturating).
pub fn effective_expiry_ms(expires_at_unix_ms: u64, period_s: u32, k: u32) -> u64 {
    release_at_ms(expires_at_unix_ms, period_s, k)
}

/// The provider's side of one advert's chain: every value `t_0` (the anchor) to
/// `t_count`, kept rather than recomputed (at most 65,536 * 16 bytes = 1 MiB, 64 KiB for a
/// week of 150-second periods) so a token is a lookup. Wiped on drop; `Debug` shows the
/// public chain only, since unreleased tokens are what keeps the advert the provider's.
pub struct RefreshSecret {
    chain: RefreshChain,
    /// The chain's record id (provider, seq and anchor hashed).
    id: [u8; RECORD_ID_LEN],
    /// `values[i]` is `t_i`.
    values: Zeroizing<Vec<Token>>,
}

impl fmt::Debug for RefreshSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshSecret").field("chain", &self.chain).finish_non_exhaustive()
    }
}

impl RefreshSecret {
    /// Makes the chain of the advert `(provider, seq)` from `t_count`, which the caller
    /// draws at random from a cryptographic generator, one per advert, and never reuses:
    /// `t_{i-1} = H_i(t_i)` down to the anchor. Refuses a `period_s` or `count` that no
    /// advert may carry (row 19; the bound against the advert's lifetime is the advert's).
    pub fn generate(
        provider: &PeerId,
        seq: u64,
        period_s: u32,
        count: u32,
        t_count: Token,
    ) -> Result<(RefreshChain, RefreshSecret), RefreshError> {
        let mut chain = RefreshChain { anchor: [0; TOKEN_LEN], period_s, count };
        chain.check_shape().map_err(RefreshError::BadChain)?;
        let provider = provider.to_bytes();
        // count ≤ 1,024 was just checked, so this is at most 16 KiB.
        let mut values = Zeroizing::new(vec![[0u8; TOKEN_LEN]; count as usize + 1]);
        values[count as usize] = t_count;
        for i in (1..=count).rev() {
            values[i as usize - 1] = step_bytes(&provider, seq, i, &values[i as usize]);
        }
        chain.anchor = values[0];
        let id = id_bytes(&provider, seq, &chain.anchor);
        Ok((chain, RefreshSecret { chain, id, values }))
    }

    /// The public chain (the advert's `refresh` field).
    pub fn chain(&self) -> RefreshChain {
        self.chain
    }

    /// The id of the chain's records.
    pub fn id(&self) -> [u8; RECORD_ID_LEN] {
        self.id
    }

    /// Token `k` (`t_k`), for 1 ≤ k ≤ count; `None` otherwise. Send it at
    /// [`RefreshSecret::release_at_ms`], not before: a receiver ignores an early one.
    pub fn token(&self, k: u32) -> Option<Token> {
        if k == 0 {
            return None;
        }
        self.values.get(k as usize).copied()
    }

    /// The 24-byte record that carries token `k`.
    pub fn record(&self, k: u32) -> Option<RefreshRecord> {
        let token = self.token(k)?;
        Some(RefreshRecord { id: self.id, k: u16::try_from(k).ok()?, token })
    }

    /// When token `k` of the advert issued at `issued_at` is released.
    pub fn release_at_ms(&self, issued_at_unix_ms: u64, k: u32) -> u64 {
        release_at_ms(issued_at_unix_ms, self.chain.period_s, k)
    }
}

/// One token on the wire (docs/protocol.md section 4a, "Records"): `id` (the first 6
/// bytes of the advert's anchor), `k` (uint16 big-endian), `t_k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RefreshRecord {
    pub id: [u8; RECORD_ID_LEN],
    pub k: u16,
    pub token: Token,
}

impl RefreshRecord {
    pub fn to_bytes(&self) -> [u8; RECORD_LEN] {
        let mut out = [0u8; RECORD_LEN];
        out[..RECORD_ID_LEN].copy_from_slice(&self.id);
        out[RECORD_ID_LEN..RECORD_ID_LEN + 2].copy_from_slice(&self.k.to_be_bytes());
        out[RECORD_ID_LEN + 2..].copy_from_slice(&self.token);
        out
    }

    /// Every 24 bytes are a record; whether it means anything is [`check_token`]'s question.
    pub fn from_bytes(bytes: &[u8; RECORD_LEN]) -> Self {
        let mut id = [0u8; RECORD_ID_LEN];
        id.copy_from_slice(&bytes[..RECORD_ID_LEN]);
        let k = u16::from_be_bytes([bytes[RECORD_ID_LEN], bytes[RECORD_ID_LEN + 1]]);
        let mut token = [0u8; TOKEN_LEN];
        token.copy_from_slice(&bytes[RECORD_ID_LEN + 2..]);
        RefreshRecord { id, k, token }
    }
}

/// Reads a batch: 1 to [`MAX_BATCH_RECORDS`] records, concatenated (docs/protocol.md
/// section 9a). Anything else is a malformed frame.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<RefreshRecord>, RefreshError> {
    if bytes.is_empty() {
        return Err(RefreshError::EmptyBatch);
    }
    if !bytes.len().is_multiple_of(RECORD_LEN) {
        return Err(RefreshError::BatchLength { len: bytes.len() });
    }
    let records = bytes.len() / RECORD_LEN;
    if records > MAX_BATCH_RECORDS {
        return Err(RefreshError::TooManyRecords { records });
    }
    Ok(bytes
        .chunks_exact(RECORD_LEN)
        .map(|chunk| {
            let mut record = [0u8; RECORD_LEN];
            record.copy_from_slice(chunk);
            RefreshRecord::from_bytes(&record)
        })
        .collect())
}

/// Concatenates `records` (a sender keeps a batch to 1..=[`MAX_BATCH_RECORDS`] of them;
/// [`decode_batch`] refuses other counts).
pub fn encode_batch(records: &[RefreshRecord]) -> Vec<u8> {
    let mut out = Vec::with_capacity(records.len() * RECORD_LEN);
    for record in records {
        out.extend_from_slice(&record.to_bytes());
    }
    out
}

/// What a token is checked against: the facts of the held advert its chain is bound to.
#[derive(Debug, Clone, Copy)]
pub struct RefreshTarget<'a> {
    pub provider: &'a PeerId,
    pub seq: u64,
    pub issued_at_unix_ms: u64,
    /// The signed expiry (not the effective one).
    pub expires_at_unix_ms: u64,
    /// The end of the advert's delegation (its `not_after`, section 7b), or `u64::MAX`
    /// for an advert without one: no token keeps the advert live past it.
    pub ends_at_unix_ms: u64,
    pub chain: RefreshChain,
}

/// The highest token a node accepted for an advert: `(j, t_j)`, the anchor (`j` = 0)
/// before the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldToken {
    pub j: u16,
    pub token: Token,
}

impl HeldToken {
    /// What a node holds for a chain it has accepted no token of: `(0, anchor)`.
    pub fn anchor(chain: &RefreshChain) -> Self {
        HeldToken { j: 0, token: chain.anchor }
    }
}

/// Why a record was dropped quietly (docs/protocol.md section 4a: "ignore").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IgnoreReason {
    /// The record's id names no held advert with a chain (the store's row).
    Unknown,
    /// `k ≤ j`: a token already accepted, or an older one.
    Stale,
    /// The token's release time is more than 30 s ahead of this node's clock.
    FromTheFuture,
    /// The advert's effective expiry with this token has passed.
    Expired,
}

impl IgnoreReason {
    /// A short stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            IgnoreReason::Unknown => "unknown",
            IgnoreReason::Stale => "stale",
            IgnoreReason::FromTheFuture => "future",
            IgnoreReason::Expired => "expired",
        }
    }
}

/// Why a record was refused as misbehaviour of its sender (docs/protocol.md section 4a:
/// "reject"; section 9a counts it as an invalid message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// `k` beyond the chain's `count`.
    OutOfRange,
    /// Hashing the token down to position `j` does not give `t_j`.
    Forged,
}

impl RejectReason {
    /// A short stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            RejectReason::OutOfRange => "out_of_range",
            RejectReason::Forged => "forged",
        }
    }
}

/// What a node does with a refresh record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// The token is the advert's new `(j, t_j)`, and the advert lives until
    /// `effective_expiry_ms`.
    Accepted {
        k: u16,
        token: Token,
        effective_expiry_ms: u64,
    },
    Ignored(IgnoreReason),
    Rejected(RejectReason),
}

impl RefreshOutcome {
    /// A short stable label for metrics and logs (`accepted` or the reason's).
    pub fn label(&self) -> &'static str {
        match self {
            RefreshOutcome::Accepted { .. } => "accepted",
            RefreshOutcome::Ignored(r) => r.label(),
            RefreshOutcome::Rejected(r) => r.label(),
        }
    }
}

/// The accept table of docs/protocol.md section 4a, from its second row (the first,
/// "unknown id", is the store's), in its order; the first failing check decides.
///
/// Work is bounded: the `k − j` hash steps run only after the time check, which bounds
/// `k` by the time elapsed since the advert was issued (and `k ≤ count ≤ 1,024` always: one token costs at most 1,024 hash steps).
pub fn check_token(
    target: &RefreshTarget<'_>,
    held: &HeldToken,
    k: u16,
    token: &Token,
    now_unix_ms: u64,
) -> RefreshOutcome {
    let chain = &target.chain;
    let k32 = u32::from(k);
    if k32 > chain.count {
        return RefreshOutcome::Rejected(RejectReason::OutOfRange);
    }
    if k <= held.j {
        return RefreshOutcome::Ignored(IgnoreReason::Stale);
    }
    if release_at_ms(target.issued_at_unix_ms, chain.period_s, k32) > now_unix_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return RefreshOutcome::Ignored(IgnoreReason::FromTheFuture);
    }
    // Before any hashing: a token that would not keep the advert live is not worth one,
    // and none keeps it past its delegation's end (docs/protocol.md sections 4a, 7b).
    let effective_expiry_ms =
        effective_expiry_ms(target.expires_at_unix_ms, chain.period_s, k32).min(target.ends_at_unix_ms);
    if effective_expiry_ms <= now_unix_ms {
        return RefreshOutcome::Ignored(IgnoreReason::Expired);
    }
    let provider = target.provider.to_bytes();
    let mut x = *token;
    // t_{i-1} = H_i(t_i): from t_k down to t_j.
    for i in (u32::from(held.j) + 1..=k32).rev() {
        x = step_bytes(&provider, target.seq, i, &x);
    }
    if x != held.token {
        return RefreshOutcome::Rejected(RejectReason::Forged);
    }
    RefreshOutcome::Accepted { k, token: *token, effective_expiry_ms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::samples::{self, T0_UNIX_MS};

    const PERIOD: u32 = 150;
    const COUNT: u32 = 4;
    /// `t_4` of the test vector (docs/protocol.md section 11): bytes 0x00 to 0x0f.
    const T4: Token = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

    fn provider() -> PeerId {
        samples::provider_key().peer_id()
    }

    fn vector() -> (RefreshChain, RefreshSecret) {
        RefreshSecret::generate(&provider(), 1, PERIOD, COUNT, T4).unwrap()
    }

    /// An advert issued at T0, living 300 s, with the vector's chain.
    fn target(provider: &PeerId, chain: RefreshChain) -> RefreshTarget<'_> {
        RefreshTarget {
            provider,
            seq: 1,
            issued_at_unix_ms: T0_UNIX_MS,
            expires_at_unix_ms: T0_UNIX_MS + 300_000,
            ends_at_unix_ms: u64::MAX,
            chain,
        }
    }

    /// The values printed in docs/protocol.md section 11 ("Refresh chain"), so that a
    /// second implementation can check its step function against them.
    #[test]
    fn the_documented_vector() {
        let (chain, secret) = vector();
        let hex = |t: Token| hex::encode(t);
        assert_eq!(hex(secret.token(4).unwrap()), "000102030405060708090a0b0c0d0e0f");
        assert_eq!(hex(secret.token(3).unwrap()), "0a433c68bb2729a864c675d7ab02dd6e");
        assert_eq!(hex(secret.token(2).unwrap()), "fe50a5423e7f93905fc04345f6abbfe8");
        assert_eq!(hex(secret.token(1).unwrap()), "bfcdf2c981f134c3a811fe6581fc6389");
        assert_eq!(hex(chain.anchor), "202a94c6d211d53b9670b8169dc0f85a");
        assert_eq!(chain.id(&provider(), 1), [0x86, 0x18, 0xd2, 0x04, 0xbb, 0xba]);
        assert_eq!(secret.id(), chain.id(&provider(), 1));
        assert_eq!(
            hex::encode(secret.record(1).unwrap().to_bytes()),
            "8618d204bbba0001bfcdf2c981f134c3a811fe6581fc6389"
        );
    }

    #[test]
    fn step_is_the_documented_hash() {
        let p = provider();
        let mut input = b"peervm/refresh/1\0".to_vec();
        input.extend_from_slice(&p.to_bytes());
        input.extend_from_slice(&1u64.to_be_bytes());
        input.extend_from_slice(&4u32.to_be_bytes());
        input.extend_from_slice(&T4);
        let digest = Sha256::digest(&input);
        assert_eq!(step(&p, 1, 4, &T4)[..], digest[..16]);
        let (_, secret) = vector();
        assert_eq!(secret.token(3).unwrap()[..], digest[..16]);
    }

    #[test]
    fn a_generated_chain_verifies_at_every_k_from_any_j() {
        let p = provider();
        let (chain, secret) = RefreshSecret::generate(&p, 1, PERIOD, 10, [7; 16]).unwrap();
        let mut t = target(&p, chain);
        t.chain = chain;
        for k in 1..=10u16 {
            // At its release time, when it is due and its advert is live.
            let now = T0_UNIX_MS + u64::from(k) * 150_000;
            for j in 0..k {
                let held = if j == 0 {
                    HeldToken::anchor(&chain)
                } else {
                    HeldToken { j, token: secret.token(u32::from(j)).unwrap() }
                };
                let token = secret.token(u32::from(k)).unwrap();
                assert_eq!(
                    check_token(&t, &held, k, &token, now),
                    RefreshOutcome::Accepted {
                        k,
                        token,
                        effective_expiry_ms: T0_UNIX_MS + 300_000 + u64::from(k) * 150_000
                    },
                    "k {k} from j {j}"
                );
            }
        }
        assert_eq!(secret.token(0), None);
        assert_eq!(secret.token(11), None);
        assert_eq!(secret.record(11), None);
        assert_eq!(secret.release_at_ms(T0_UNIX_MS, 3), T0_UNIX_MS + 450_000);
    }

    /// Each row of the accept table, at its boundary: the case one past the boundary is
    /// accepted, so removing the check makes the test fail.
    #[test]
    fn row_out_of_range_rejects() {
        let p = provider();
        let (chain, secret) = vector();
        let t = target(&p, chain);
        let held = HeldToken::anchor(&chain);
        let late = T0_UNIX_MS + 10_000_000;
        assert_eq!(
            check_token(&t, &held, 5, &[0; 16], late),
            RefreshOutcome::Rejected(RejectReason::OutOfRange),
            "k = count + 1"
        );
        assert_eq!(
            check_token(&t, &held, u16::MAX, &[0; 16], late),
            RefreshOutcome::Rejected(RejectReason::OutOfRange)
        );
        // k = count is in range (and genuine: accepted while its expiry holds).
        let at = T0_UNIX_MS + 4 * 150_000;
        assert!(matches!(
            check_token(&t, &held, 4, &secret.token(4).unwrap(), at),
            RefreshOutcome::Accepted { k: 4, .. }
        ));
        // Checked before staleness: an out-of-range k is rejected whatever is held.
        let held4 = HeldToken { j: 4, token: secret.token(4).unwrap() };
        assert_eq!(check_token(&t, &held4, 5, &[0; 16], late), RefreshOutcome::Rejected(RejectReason::OutOfRange));
    }

    #[test]
    fn row_stale_or_duplicate_ignores() {
        let p = provider();
        let (chain, secret) = vector();
        let t = target(&p, chain);
        let now = T0_UNIX_MS + 3 * 150_000;
        let held = HeldToken { j: 2, token: secret.token(2).unwrap() };
        for k in [0u16, 1, 2] {
            let token = secret.token(u32::from(k)).unwrap_or(chain.anchor);
            assert_eq!(check_token(&t, &held, k, &token, now), RefreshOutcome::Ignored(IgnoreReason::Stale), "k {k}");
        }
        // A garbage token at a stale k is stale, not forged: staleness comes first.
        assert_eq!(check_token(&t, &held, 2, &[9; 16], now), RefreshOutcome::Ignored(IgnoreReason::Stale));
        assert!(matches!(
            check_token(&t, &held, 3, &secret.token(3).unwrap(), now),
            RefreshOutcome::Accepted { k: 3, .. }
        ));
    }

    #[test]
    fn row_from_the_future_ignores() {
        let p = provider();
        let (chain, secret) = vector();
        let t = target(&p, chain);
        let held = HeldToken::anchor(&chain);
        let token = secret.token(2).unwrap();
        // Token 2 is released at T0 + 300 s; accepted from 30 s before that.
        let edge = T0_UNIX_MS + 300_000 - MAX_CLOCK_SKEW_MS;
        assert_eq!(check_token(&t, &held, 2, &token, edge - 1), RefreshOutcome::Ignored(IgnoreReason::FromTheFuture));
        assert!(matches!(check_token(&t, &held, 2, &token, edge), RefreshOutcome::Accepted { k: 2, .. }));
        // Checked before the hash: a garbage early token is not even hashed.
        assert_eq!(check_token(&t, &held, 2, &[9; 16], edge - 1), RefreshOutcome::Ignored(IgnoreReason::FromTheFuture));
    }

    #[test]
    fn row_forged_rejects() {
        let p = provider();
        let (chain, secret) = vector();
        let t = target(&p, chain);
        // Token 3 is released (within the skew) and every token's expiry is ahead.
        let now = T0_UNIX_MS + 3 * 150_000 - MAX_CLOCK_SKEW_MS;
        let held = HeldToken::anchor(&chain);
        assert_eq!(check_token(&t, &held, 1, &[9; 16], now), RefreshOutcome::Rejected(RejectReason::Forged));
        // A genuine token at the wrong position.
        assert_eq!(
            check_token(&t, &held, 2, &secret.token(3).unwrap(), now),
            RefreshOutcome::Rejected(RejectReason::Forged)
        );
        assert_eq!(
            check_token(&t, &held, 3, &secret.token(2).unwrap(), now),
            RefreshOutcome::Rejected(RejectReason::Forged)
        );
        // Checked against what is held: from j = 2, t_3 must hash to t_2, not to the anchor.
        let held2 = HeldToken { j: 2, token: secret.token(2).unwrap() };
        assert!(matches!(
            check_token(&t, &held2, 3, &secret.token(3).unwrap(), now),
            RefreshOutcome::Accepted { k: 3, .. }
        ));
        let wrong_held = HeldToken { j: 2, token: secret.token(1).unwrap() };
        assert_eq!(
            check_token(&t, &wrong_held, 3, &secret.token(3).unwrap(), now),
            RefreshOutcome::Rejected(RejectReason::Forged)
        );
        // A token that would not keep its advert live is ignored before any hashing,
        // forged or not: expiry comes before forgery.
        assert_eq!(
            check_token(&t, &held, 1, &[9; 16], T0_UNIX_MS + 10_000_000),
            RefreshOutcome::Ignored(IgnoreReason::Expired)
        );
    }

    /// The same t_count under another seq or another provider makes another chain: a
    /// token of one advert is forged for every other.
    #[test]
    fn a_token_of_another_advert_is_forged() {
        let p = provider();
        let other = samples::requestor_key().peer_id();
        let (chain, _) = vector();
        let now = T0_UNIX_MS + 150_000;
        let (other_seq_chain, other_seq) = RefreshSecret::generate(&p, 2, PERIOD, COUNT, T4).unwrap();
        let (other_provider_chain, other_provider) = RefreshSecret::generate(&other, 1, PERIOD, COUNT, T4).unwrap();
        assert_ne!(other_seq_chain.anchor, chain.anchor);
        assert_ne!(other_provider_chain.anchor, chain.anchor);
        let t = target(&p, chain);
        let held = HeldToken::anchor(&chain);
        for foreign in [other_seq.token(1).unwrap(), other_provider.token(1).unwrap()] {
            assert_eq!(check_token(&t, &held, 1, &foreign, now), RefreshOutcome::Rejected(RejectReason::Forged));
        }
        // And the other advert's own token checked against this advert's facts (its seq,
        // its provider) fails too, even with the other chain's anchor held.
        let held_other = HeldToken::anchor(&other_seq_chain);
        assert_eq!(
            check_token(&t, &held_other, 1, &other_seq.token(1).unwrap(), now),
            RefreshOutcome::Rejected(RejectReason::Forged)
        );
        let mut t_other_provider = target(&p, other_provider_chain);
        t_other_provider.chain = other_provider_chain;
        assert_eq!(
            check_token(
                &t_other_provider,
                &HeldToken::anchor(&other_provider_chain),
                1,
                &other_provider.token(1).unwrap(),
                now
            ),
            RefreshOutcome::Rejected(RejectReason::Forged)
        );
    }

    #[test]
    fn row_expired_ignores() {
        let p = provider();
        let (chain, secret) = vector();
        let t = target(&p, chain);
        let held = HeldToken::anchor(&chain);
        let token = secret.token(1).unwrap();
        // Token 1: effective expiry T0 + 300 s + 150 s.
        let expiry = T0_UNIX_MS + 450_000;
        assert_eq!(check_token(&t, &held, 1, &token, expiry), RefreshOutcome::Ignored(IgnoreReason::Expired));
        assert_eq!(
            check_token(&t, &held, 1, &token, expiry - 1),
            RefreshOutcome::Accepted { k: 1, token, effective_expiry_ms: expiry }
        );
    }

    /// A delegated advert's tokens never keep it live past the delegation's end: the
    /// effective expiry is capped there, and a token whose capped expiry has come is
    /// ignored as expired before any hashing (a forged one too).
    #[test]
    fn no_token_keeps_an_advert_past_its_delegations_end() {
        let p = provider();
        let (chain, secret) = vector();
        let ends = T0_UNIX_MS + 400_000;
        let t = RefreshTarget { ends_at_unix_ms: ends, ..target(&p, chain) };
        let held = HeldToken::anchor(&chain);
        let token = secret.token(1).unwrap();
        // Token 1 would give T0 + 450 s; the delegation ends at T0 + 400 s.
        let released = T0_UNIX_MS + 150_000;
        assert_eq!(
            check_token(&t, &held, 1, &token, released),
            RefreshOutcome::Accepted { k: 1, token, effective_expiry_ms: ends }
        );
        assert_eq!(check_token(&t, &held, 1, &token, ends), RefreshOutcome::Ignored(IgnoreReason::Expired));
        assert_eq!(check_token(&t, &held, 1, &[0; 16], ends), RefreshOutcome::Ignored(IgnoreReason::Expired));
        // Without the cap the same token is good until T0 + 450 s.
        let uncapped = target(&p, chain);
        assert!(matches!(check_token(&uncapped, &held, 1, &token, ends), RefreshOutcome::Accepted { .. }));
    }

    #[test]
    fn records_round_trip_and_batches_are_checked() {
        let (_, secret) = vector();
        let records: Vec<RefreshRecord> = (1..=4).map(|k| secret.record(k).unwrap()).collect();
        for r in &records {
            assert_eq!(RefreshRecord::from_bytes(&r.to_bytes()), *r);
        }
        let bytes = encode_batch(&records);
        assert_eq!(bytes.len(), 4 * RECORD_LEN);
        assert_eq!(decode_batch(&bytes), Ok(records.clone()));
        // k is big-endian after the 6-byte id.
        let r = RefreshRecord { id: [1, 2, 3, 4, 5, 6], k: 0x0102, token: [0xee; 16] };
        assert_eq!(r.to_bytes()[..8], [1, 2, 3, 4, 5, 6, 1, 2]);

        assert_eq!(decode_batch(&[]), Err(RefreshError::EmptyBatch));
        for len in [1, 23, 25, 47] {
            assert_eq!(decode_batch(&vec![0; len]), Err(RefreshError::BatchLength { len }));
        }
        let full = vec![0u8; MAX_BATCH_RECORDS * RECORD_LEN];
        assert_eq!(decode_batch(&full).map(|v| v.len()), Ok(MAX_BATCH_RECORDS));
        let over = vec![0u8; (MAX_BATCH_RECORDS + 1) * RECORD_LEN];
        assert_eq!(decode_batch(&over), Err(RefreshError::TooManyRecords { records: MAX_BATCH_RECORDS + 1 }));
    }

    #[test]
    fn chain_bounds() {
        let ok = RefreshChain { anchor: [0; 16], period_s: 150, count: 4 };
        let (issued, expires) = (T0_UNIX_MS, T0_UNIX_MS + 300_000);
        assert_eq!(ok.check_bounds(issued, expires), Ok(()));
        let with = |period_s: u32, count: u32| RefreshChain { anchor: ok.anchor, period_s, count };
        assert!(with(9, 4).check_bounds(issued, expires).is_err());
        assert_eq!(with(10, 4).check_bounds(issued, expires), Ok(()));
        assert!(with(150, 0).check_bounds(issued, expires).is_err());
        assert_eq!(with(10, 1_024).check_bounds(issued, expires), Ok(()), "the most tokens");
        assert!(with(10, 1_025).check_bounds(issued, expires).is_err());
        assert!(with(u32::MAX, u32::MAX).check_bounds(issued, expires).is_err());
        assert_eq!(with(300, 4).check_bounds(issued, expires), Ok(()), "a period of the whole lifetime");
        assert!(with(300, 4).check_bounds(issued, expires - 1).is_err());
        assert!(ok.check_bounds(expires, issued).is_err(), "no lifetime at all");
        assert!(matches!(RefreshSecret::generate(&provider(), 1, 150, 0, T4), Err(RefreshError::BadChain(_))));
        assert!(matches!(RefreshSecret::generate(&provider(), 1, 150, 1_025, T4), Err(RefreshError::BadChain(_))));
    }

    #[test]
    fn expiry_arithmetic_saturates() {
        assert_eq!(effective_expiry_ms(1_000, 150, 2), 301_000);
        assert_eq!(effective_expiry_ms(u64::MAX - 1, 150, 2), u64::MAX);
        assert_eq!(release_at_ms(u64::MAX, u32::MAX, u32::MAX), u64::MAX);
        // A target with absurd numbers (not checked by the advert rule) neither panics
        // nor accepts.
        let p = provider();
        let chain = RefreshChain { anchor: [0; 16], period_s: u32::MAX, count: u32::MAX };
        let t = RefreshTarget {
            provider: &p,
            seq: 1,
            issued_at_unix_ms: u64::MAX,
            expires_at_unix_ms: u64::MAX,
            ends_at_unix_ms: u64::MAX,
            chain,
        };
        assert_eq!(
            check_token(&t, &HeldToken::anchor(&chain), 1, &[0; 16], T0_UNIX_MS),
            RefreshOutcome::Ignored(IgnoreReason::FromTheFuture)
        );
        let t = RefreshTarget { issued_at_unix_ms: 0, ..t };
        assert_eq!(
            check_token(&t, &HeldToken::anchor(&chain), 1, &[0; 16], u64::MAX),
            RefreshOutcome::Ignored(IgnoreReason::Expired)
        );
    }

    #[test]
    fn debug_hides_the_secret() {
        let (_, secret) = vector();
        let shown = format!("{secret:?}");
        assert!(!shown.contains("values") && !shown.contains(&format!("{:?}", secret.token(4).unwrap())));
    }
}
