//! `AdvertStore`: the verified adverts a node holds, one live advert per provider.
//!
//! The accept rule (docs/protocol.md, section 4; SECURITY.md, invariant 1) is applied on
//! every insert, whatever the source (gossip, sync, the node's own advert). A withdrawn
//! advert removes its provider at once and leaves a tombstone with its seq, so older
//! adverts still in flight cannot bring the provider back. Expired adverts are removed by
//! [`AdvertStore::sweep`].
//!
//! Queries run over a compact, contiguous table of per-advert summaries (free resources,
//! rates, interned region / currency / image ids, expiry): a filter is a handful of
//! integer comparisons per advert over a few MB of memory, with no pointer chasing, and
//! the cheapest `limit` offers are kept in a bounded heap (BENCHMARKS.md has the figures).
//!
//! Memory (issue 18: 100,000 adverts in under 128 MiB for the whole process): an advert
//! is kept as its exact wire bytes only ([`VerifiedBytes`]), decoded again when a caller
//! reads one (a query's winners, not its scan); providers are keyed by their 32-byte
//! ed25519 key, not the 80-byte `PeerId`, in one ordered index that serves lookups and
//! sync paging; the sweep scans the summaries instead of keeping an expiry index.
//! docs/architecture.md ("The advert store") has the bytes per advert.
//!
//! Refresh tokens (docs/protocol.md section 4a): an advert with a `refresh` chain is kept
//! live past its signed expiry by tokens of its provider. The summary's expiry is the
//! advert's *effective* expiry, so the sweep, queries and sync pages all use it; the
//! chain's state (the highest token accepted) and the index from a record's 6-byte id to
//! the adverts it may name live in side tables that only adverts with a chain pay for.

use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::ops::Bound;

use peervm_protocol::advert::hourly_price_micros;
use peervm_protocol::identity::{ed25519_public_key_bytes, peer_id_from_public_key};
use peervm_protocol::refresh::{RECORD_ID_LEN, check_token};
use peervm_protocol::{
    Accel, AdvertError, Advertisement, HeldToken, IgnoreReason, PeerId, RefreshChain, RefreshOutcome, RefreshRecord,
    RefreshTarget, ResourceAmounts, Verified, VerifiedBytes, VerifyError,
};

/// One advert as the store keeps it: the verified envelope's exact wire bytes (what sync
/// serves), shared so queries do not copy them; `decode()` gives the advert.
pub type StoredAdvert = VerifiedBytes<Advertisement>;

/// A provider as the store's indexes key it: its raw ed25519 public key (every signer is
/// one, `peervm_protocol::identity`). Ordered like the providers' `PeerId`s, whose bytes
/// are a fixed prefix followed by this key.
type Key = [u8; 32];

/// The store's key of `peer`, or `None` for a PeerId that is not an inlined ed25519 key
/// (no advert can come from one).
fn key_of(peer: &PeerId) -> Option<Key> {
    ed25519_public_key_bytes(peer).ok()
}

/// Why the store did not take an advert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InsertError {
    #[error(transparent)]
    Advert(#[from] AdvertError),
    /// This node blocked the provider; not the sender's fault, so not penalised.
    #[error("provider {0} is blocked by this node")]
    Blocked(PeerId),
    /// The owner named in the advert's delegation retired this node key (rotation).
    #[error("node {0} was retired by the owner named in its delegation")]
    Revoked(PeerId),
}

impl InsertError {
    /// Whether the peer that sent the advert should be penalised for it.
    pub fn is_misbehaviour(&self) -> bool {
        matches!(self, InsertError::Advert(e) if e.disposition() == peervm_protocol::Disposition::Reject)
    }

    pub fn reason(&self) -> &'static str {
        match self {
            InsertError::Advert(e) => e.reason(),
            InsertError::Blocked(_) => "blocked",
            InsertError::Revoked(_) => "revoked",
        }
    }
}

/// What inserting an advert did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    /// A provider the store did not hold.
    Added,
    /// A newer advert of a provider already held.
    Replaced,
    /// A withdrawn advert: the provider is gone from the store.
    Withdrawn,
}

/// What [`AdvertStore::insert_with_refresh`] did with an advert and the record sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshedInsert {
    pub advert: Result<InsertOutcome, InsertError>,
    /// The record's outcome, when one was given: a rejected one is its sender's fault
    /// (docs/protocol.md section 10.4), whatever became of the advert.
    pub record: Option<RefreshOutcome>,
}

/// One page of the store for the sync protocol (docs/protocol.md section 9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncPage {
    /// The envelopes, in provider id order.
    pub adverts: Vec<Vec<u8>>,
    /// The cursor of the next page: the last provider on this one, or `None` when this was
    /// the last page.
    pub next: Option<PeerId>,
    /// The page's `refreshes`: for each advert on the page that has accepted a token, the
    /// record of the highest one, in the adverts' order.
    pub refreshes: Vec<RefreshRecord>,
}

/// A requestor's filter. Every field is optional; `spec` is what the price is computed
/// for (and what free resources must cover).
#[derive(Debug, Clone, Default)]
pub struct OfferFilter {
    pub min_vcpus: Option<u32>,
    pub min_memory_mib: Option<u64>,
    pub min_disk_gib: Option<u64>,
    /// Highest acceptable price per hour in micro-units (for `price_spec`).
    pub max_price_micros: Option<u64>,
    pub currency: Option<String>,
    pub region: Option<String>,
    pub accel: Option<Accel>,
    pub image: Option<String>,
    /// Providers to leave out (blocked by this requestor), matched against both the
    /// provider and the owner that delegated to it.
    pub exclude: HashSet<PeerId>,
    /// Only providers delegated by this owner.
    pub owner: Option<PeerId>,
    /// Only providers that let a lease expose at least this many guest ports (their
    /// advert's `network.max_exposed_ports`).
    pub min_exposed_ports: Option<u16>,
}

impl OfferFilter {
    /// The guest the price is quoted for: the requested minimums, at least 1 vCPU.
    pub fn price_spec(&self) -> ResourceAmounts {
        ResourceAmounts {
            vcpus: self.min_vcpus.unwrap_or(1).max(1),
            memory_mib: self.min_memory_mib.unwrap_or(0),
            disk_gib: self.min_disk_gib.unwrap_or(0),
        }
    }
}

/// An advert that matched a query, with its price for the filter's spec.
#[derive(Debug, Clone)]
pub struct Offer {
    pub price_per_hour_micros: u64,
    pub provider: PeerId,
    /// The advert's effective expiry: its signed one, or later with refresh tokens.
    pub expires_at_unix_ms: u64,
    /// The advert's envelope; [`Offer::decode`] gives the advert.
    pub advert: StoredAdvert,
}

impl Offer {
    /// The advert, decoded (its signature was checked when it was stored).
    pub fn decode(&self) -> Result<Verified<Advertisement>, VerifyError> {
        self.advert.decode()
    }
}

/// What a query needs of an advert, packed for a cache-friendly scan.
#[derive(Debug, Clone)]
struct Summary {
    /// The effective expiry: the signed one, raised by each refresh token accepted.
    expires_at_unix_ms: u64,
    free_memory_mib: u64,
    free_disk_gib: u64,
    per_vcpu: u64,
    per_memory_gib: u64,
    per_disk_gib: u64,
    free_vcpus: u32,
    max_exposed_ports: u16,
    region: u32,
    currency: u32,
    accel: Accel,
    /// Bit i set: offers the image interned as id i (ids below 64).
    images: u64,
    /// Offers an image whose id is 64 or more: its ids are in `AdvertStore::more_images`.
    images_overflow: bool,
}

/// What the store keeps of an advert besides its summary (same row, a separate table so
/// the query scan does not read it).
#[derive(Debug, Clone)]
struct Held {
    advert: StoredAdvert,
    seq: u64,
}

/// Adverts a node keeps under one record id and tries a record against; another advert
/// with the same id is stored and shown but not refreshed (docs/protocol.md section 4a).
pub const MAX_ADVERTS_PER_REFRESH_ID: usize = 4;

/// The refresh state of a held advert with a chain: what a token is checked against (the
/// advert's signed times and chain; the seq is in `Held`, the provider is the key) and
/// the highest token accepted. 64 bytes, only for adverts with a chain.
#[derive(Debug, Clone)]
struct ChainState {
    issued_at_unix_ms: u64,
    /// The signed expiry (the effective one is the summary's).
    expires_at_unix_ms: u64,
    /// The delegation's `not_after` (`u64::MAX` without one): no token raises the
    /// effective expiry past it (docs/protocol.md sections 4a, 7b).
    ends_at_unix_ms: u64,
    chain: RefreshChain,
    /// The chain's record id (provider, seq and anchor: docs/protocol.md section 4a).
    id: [u8; RECORD_ID_LEN],
    held: HeldToken,
}

/// The end of an advert's checked delegation, `u64::MAX` for an advert without one.
fn ends_at(delegation: Option<&peervm_protocol::Delegation>) -> u64 {
    delegation.map_or(u64::MAX, |d| d.not_after_unix_ms)
}

/// A token accepted for an advert before it was stored: what it starts from.
#[derive(Debug, Clone, Copy)]
struct Refreshed {
    held: HeldToken,
    effective_expiry_ms: u64,
}

/// Strings seen in adverts, each given a small integer id.
#[derive(Default)]
struct Interner {
    ids: HashMap<String, u32>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.ids.len() as u32;
        self.ids.insert(s.to_string(), id);
        id
    }

    fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

/// The store's flat tables, in bytes (capacity times element size; the envelopes, the
/// ordered index and the small maps are not counted). For the `store_bytes` benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableBytes {
    /// The summary rows the query scans.
    pub summaries: usize,
    /// The envelope handle and seq of each row.
    pub held: usize,
}

#[derive(Default)]
pub struct AdvertStore {
    /// Provider -> its row in `table` and `held`, ordered for stable sync paging.
    index: BTreeMap<Key, u32>,
    /// Dense summaries of the live adverts, in no particular order.
    table: Vec<Summary>,
    /// Row for row with `table`: the advert and its seq.
    held: Vec<Held>,
    /// No live advert expires before this (it may be earlier than the earliest: rows
    /// removed since the last sweep are not accounted for).
    next_expiry_unix_ms: u64,
    /// Seq and expiry of withdrawn providers, so stale adverts cannot resurrect them.
    tombstones: HashMap<Key, (u64, u64)>,
    regions: Interner,
    currencies: Interner,
    images: Interner,
    /// Image ids of 64 and more offered by a live advert (rare: only past 64 image names).
    more_images: HashMap<Key, Vec<u32>>,
    /// Providers this node refuses to store, show or forward (incident response).
    blocked: HashSet<PeerId>,
    /// The owner of each live advert that carries a delegation.
    owners: HashMap<Key, Key>,
    /// (owner, node key) pairs an owner retired, until the retiring delegation ends.
    revoked: HashMap<(PeerId, PeerId), u64>,
    /// The refresh state of each live advert with a chain that is indexed in `chain_ids`.
    chains: HashMap<Key, ChainState>,
    /// Record id -> the providers whose chain it names, at most
    /// [`MAX_ADVERTS_PER_REFRESH_ID`] per id (a range of this set is one id's entries).
    chain_ids: BTreeSet<([u8; RECORD_ID_LEN], Key)>,
}

impl AdvertStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn row(&self, provider: &PeerId) -> Option<usize> {
        self.index.get(&key_of(provider)?).map(|row| *row as usize)
    }

    /// The seq this store holds for `provider` (live or withdrawn).
    pub fn held_seq(&self, provider: &PeerId) -> Option<u64> {
        let key = key_of(provider)?;
        match self.index.get(&key) {
            Some(row) => Some(self.held[*row as usize].seq),
            None => self.tombstones.get(&key).map(|(seq, _)| *seq),
        }
    }

    /// When `provider`'s advert expires: its effective expiry (the signed one, raised by
    /// each refresh token accepted). The advert leaves the store at the first sweep after.
    pub fn expires_at(&self, provider: &PeerId) -> Option<u64> {
        self.row(provider).map(|row| self.table[row].expires_at_unix_ms)
    }

    /// The highest refresh token accepted for `provider`'s advert, as the record that
    /// carries it; `None` when it has no chain, is not refreshed by tokens, or none was
    /// accepted yet.
    pub fn refresh_record(&self, provider: &PeerId) -> Option<RefreshRecord> {
        self.chains.get(&key_of(provider)?).and_then(ChainState::record)
    }

    /// The held advert of `provider`, as its envelope (`decode()` gives the advert). Held
    /// means not swept yet: [`AdvertStore::expires_at`] says until when it is live.
    pub fn get(&self, provider: &PeerId) -> Option<&StoredAdvert> {
        self.row(provider).map(|row| &self.held[row].advert)
    }

    pub fn contains(&self, provider: &PeerId) -> bool {
        self.row(provider).is_some()
    }

    /// The live providers, in id order.
    pub fn providers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.index.keys().map(peer_id_from_public_key)
    }

    /// The store's flat tables, in bytes (for the `store_bytes` benchmark).
    pub fn table_bytes(&self) -> TableBytes {
        TableBytes {
            summaries: self.table.capacity() * size_of::<Summary>(),
            held: self.held.capacity() * size_of::<Held>(),
        }
    }

    /// Checks `advert` against the accept rule and, if it passes, stores it (or removes
    /// its provider when it is a withdrawal).
    pub fn insert(&mut self, advert: Verified<Advertisement>, now_unix_ms: u64) -> Result<InsertOutcome, InsertError> {
        let delegation = self.check(advert.body(), now_unix_ms)?;
        self.store_checked(advert, delegation, None)
    }

    /// Inserts an advert that came with a refresh record (a sync page's `refreshes`,
    /// docs/protocol.md section 9), then applies the record.
    ///
    /// The order that lets an advert whose signed expiry has passed, but whose effective
    /// expiry with the record has not, land: when the accept rule refuses the advert only
    /// as `Expired`, the advert has a chain whose id the record names, and the store has
    /// room for that id, the record is checked against the advert's anchor first (section
    /// 4a), and an accepted token's effective expiry stands in for the signed one in the
    /// rule (`Advertisement::check_acceptable_until`); the advert is stored holding that
    /// token. Otherwise the advert is inserted as by [`AdvertStore::insert`] and the
    /// record is then applied as by [`AdvertStore::apply_refresh`] (to whichever held
    /// advert it names: the same advert already held at this seq takes its token too).
    /// A caller passes each advert the page record whose id is its chain's.
    pub fn insert_with_refresh(
        &mut self,
        advert: Verified<Advertisement>,
        record: Option<&RefreshRecord>,
        now_unix_ms: u64,
    ) -> RefreshedInsert {
        let Some(record) = record else {
            return RefreshedInsert { advert: self.insert(advert, now_unix_ms), record: None };
        };
        let expired = match self.check(advert.body(), now_unix_ms) {
            Err(e @ InsertError::Advert(AdvertError::Expired { .. })) => e,
            checked => {
                let result = checked.and_then(|delegation| self.store_checked(advert, delegation, None));
                return RefreshedInsert { advert: result, record: Some(self.apply_refresh(record, now_unix_ms)) };
            }
        };
        let body = advert.body();
        let refreshable = match (key_of(&body.provider), body.refresh) {
            (Some(key), Some(chain))
                if chain.id(&body.provider, body.seq) == record.id && self.id_has_room(&record.id, &key) =>
            {
                Some(chain)
            }
            _ => None,
        };
        // Every check but the expiry, before any hashing; then the token from the anchor.
        let checked = refreshable.map(|chain| (chain, self.check_until(body, now_unix_ms, u64::MAX)));
        let (chain, delegation) = match checked {
            Some((chain, Ok(delegation))) => (chain, delegation),
            // Refused whatever its expiry (a blocked owner, a retired key): say why.
            Some((_, Err(refused @ (InsertError::Blocked(_) | InsertError::Revoked(_))))) => {
                return RefreshedInsert { advert: Err(refused), record: Some(self.apply_refresh(record, now_unix_ms)) };
            }
            _ => {
                return RefreshedInsert { advert: Err(expired), record: Some(self.apply_refresh(record, now_unix_ms)) };
            }
        };
        let target = RefreshTarget {
            provider: &body.provider,
            seq: body.seq,
            issued_at_unix_ms: body.issued_at_unix_ms,
            expires_at_unix_ms: body.expires_at_unix_ms,
            ends_at_unix_ms: ends_at(delegation.as_ref()),
            chain,
        };
        let outcome = check_token(&target, &HeldToken::anchor(&chain), record.k, &record.token, now_unix_ms);
        let RefreshOutcome::Accepted { k, token, effective_expiry_ms } = outcome else {
            return RefreshedInsert { advert: Err(expired), record: Some(outcome) };
        };
        let refreshed = Refreshed { held: HeldToken { j: k, token }, effective_expiry_ms };
        RefreshedInsert { advert: self.store_checked(advert, delegation, Some(refreshed)), record: Some(outcome) }
    }

    /// Applies a refresh record (docs/protocol.md section 4a) to the held adverts its id
    /// names: `Ignored(Unknown)` when it names none; otherwise the accept table against
    /// each of them (at most [`MAX_ADVERTS_PER_REFRESH_ID`]), an accepted token raising
    /// that advert's token and effective expiry. With several adverts under one id, the
    /// first that accepts the token wins; else an `Ignored` outcome is reported before a
    /// `Rejected` one, since a token that is genuine for one of them is no misbehaviour
    /// of its sender even if it is forged for another.
    pub fn apply_refresh(&mut self, record: &RefreshRecord, now_unix_ms: u64) -> RefreshOutcome {
        self.apply_refresh_naming(record, now_unix_ms).0
    }

    /// [`AdvertStore::apply_refresh`], also naming the provider whose advert took the
    /// token when it was accepted (what the swarm reports: `NodeEvent::AdvertRefreshed`).
    pub fn apply_refresh_naming(
        &mut self,
        record: &RefreshRecord,
        now_unix_ms: u64,
    ) -> (RefreshOutcome, Option<PeerId>) {
        let mut keys = [[0u8; 32]; MAX_ADVERTS_PER_REFRESH_ID];
        let mut n = 0;
        for (_, key) in self.chain_ids.range(id_range(&record.id)).take(MAX_ADVERTS_PER_REFRESH_ID) {
            keys[n] = *key;
            n += 1;
        }
        let mut verdict = RefreshOutcome::Ignored(IgnoreReason::Unknown);
        for key in &keys[..n] {
            let (Some(state), Some(row)) = (self.chains.get_mut(key), self.index.get(key)) else {
                continue;
            };
            let row = *row as usize;
            let provider = peer_id_from_public_key(key);
            let target = RefreshTarget {
                provider: &provider,
                seq: self.held[row].seq,
                issued_at_unix_ms: state.issued_at_unix_ms,
                expires_at_unix_ms: state.expires_at_unix_ms,
                ends_at_unix_ms: state.ends_at_unix_ms,
                chain: state.chain,
            };
            let outcome = check_token(&target, &state.held, record.k, &record.token, now_unix_ms);
            if let RefreshOutcome::Accepted { k, token, effective_expiry_ms } = outcome {
                state.held = HeldToken { j: k, token };
                self.table[row].expires_at_unix_ms = effective_expiry_ms;
                return (outcome, Some(provider));
            }
            verdict = match (verdict, outcome) {
                (RefreshOutcome::Ignored(IgnoreReason::Unknown), first) => first,
                (RefreshOutcome::Rejected(_), ignored @ RefreshOutcome::Ignored(_)) => ignored,
                (kept, _) => kept,
            };
        }
        (verdict, None)
    }

    /// Whether an advert of `key` with a chain of id `id` would be refreshed by tokens:
    /// fewer than [`MAX_ADVERTS_PER_REFRESH_ID`] other providers' adverts hold the id.
    fn id_has_room(&self, id: &[u8; RECORD_ID_LEN], key: &Key) -> bool {
        self.chain_ids.range(id_range(id)).filter(|(_, k)| k != key).count() < MAX_ADVERTS_PER_REFRESH_ID
    }

    /// Stores an advert that passed the accept rule (its delegation checked), starting
    /// from a token accepted before it was stored, if any.
    fn store_checked(
        &mut self,
        advert: Verified<Advertisement>,
        delegation: Option<peervm_protocol::Delegation>,
        refreshed: Option<Refreshed>,
    ) -> Result<InsertOutcome, InsertError> {
        let provider = advert.body().provider;
        // A verified advert's provider is its signer, an ed25519 key (`check` read it too).
        let key = key_of(&provider).ok_or_else(|| AdvertError::Malformed("provider is not an ed25519 key".into()))?;
        let existed = self.remove_live(&key).is_some();
        if advert.body().withdrawn {
            self.tombstones.insert(key, (advert.body().seq, advert.body().expires_at_unix_ms));
            return Ok(InsertOutcome::Withdrawn);
        }
        self.tombstones.remove(&key);
        let ends_at_unix_ms = ends_at(delegation.as_ref());
        if let Some(d) = delegation {
            let owner = key_of(&d.owner);
            // Key rotation: the owner's node keys this delegation replaces are gone.
            for old in &d.replaces {
                if let Some(old_key) = key_of(old)
                    && owner.is_some()
                    && self.owners.get(&old_key) == owner.as_ref()
                {
                    self.remove_live(&old_key);
                }
                self.revoked.insert((d.owner, *old), d.not_after_unix_ms);
            }
            if let Some(owner) = owner {
                self.owners.insert(key, owner);
            }
        }
        self.add_live(key, &advert, refreshed, ends_at_unix_ms);
        Ok(if existed { InsertOutcome::Replaced } else { InsertOutcome::Added })
    }

    /// The owner that delegated to `provider`, if its live advert carries a delegation.
    pub fn owner_of(&self, provider: &PeerId) -> Option<PeerId> {
        self.owners.get(&key_of(provider)?).map(peer_id_from_public_key)
    }

    /// Checks the accept rule without storing (gossip validation uses it to decide
    /// Accept / Reject / Ignore before forwarding).
    /// Returns the advert's checked delegation, if it has one.
    pub fn check(
        &self,
        advert: &Advertisement,
        now_unix_ms: u64,
    ) -> Result<Option<peervm_protocol::Delegation>, InsertError> {
        self.check_until(advert, now_unix_ms, advert.expires_at_unix_ms)
    }

    /// [`AdvertStore::check`] with `expires_at_unix_ms` standing in for the signed expiry
    /// (an effective expiry; `u64::MAX` checks everything but the expiry).
    fn check_until(
        &self,
        advert: &Advertisement,
        now_unix_ms: u64,
        expires_at_unix_ms: u64,
    ) -> Result<Option<peervm_protocol::Delegation>, InsertError> {
        if self.blocked.contains(&advert.provider) {
            return Err(InsertError::Blocked(advert.provider));
        }
        advert.check_acceptable_until(now_unix_ms, self.held_seq(&advert.provider), expires_at_unix_ms)?;
        let delegation = advert.delegation_at(now_unix_ms)?;
        if let Some(d) = &delegation {
            if self.revoked.contains_key(&(d.owner, advert.provider)) {
                return Err(InsertError::Revoked(advert.provider));
            }
            if self.blocked.contains(&d.owner) {
                return Err(InsertError::Blocked(d.owner));
            }
        }
        Ok(delegation)
    }

    /// Removes adverts whose effective expiry has come by `now`, and tombstones that no
    /// longer matter. Returns the providers removed.
    pub fn sweep(&mut self, now_unix_ms: u64) -> Vec<PeerId> {
        // A scan of the summaries (a few MB, as a query) instead of an expiry index, and
        // only when the earliest expiry has come (adverts are usually replaced first).
        let mut expired: Vec<Key> = Vec::new();
        if self.next_expiry_unix_ms <= now_unix_ms {
            let mut next = u64::MAX;
            for (s, h) in self.table.iter().zip(&self.held) {
                if s.expires_at_unix_ms <= now_unix_ms {
                    expired.push(h.advert.signer_public_key());
                } else {
                    next = next.min(s.expires_at_unix_ms);
                }
            }
            self.next_expiry_unix_ms = next;
        }
        for key in &expired {
            self.remove_live(key);
        }
        // Any advert older than a tombstone expired no later than the tombstone's own
        // expiry plus the maximum lifetime; after that the tombstone is dead weight.
        let horizon = peervm_protocol::advert::MAX_ADVERT_LIFETIME_MS;
        self.tombstones.retain(|_, (_, exp)| exp.saturating_add(horizon) > now_unix_ms);
        self.revoked.retain(|_, until| *until > now_unix_ms);
        expired.iter().map(peer_id_from_public_key).collect()
    }

    /// Blocks a provider, or an owner: its advert, and the adverts of every node key it
    /// delegated to, are removed at once (their refresh chains with them), and no later
    /// one is accepted (`check`).
    pub fn block(&mut self, provider: PeerId) -> bool {
        if let Some(key) = key_of(&provider) {
            self.remove_live(&key);
            // Blocks are rare (an operator's command, a trusted list's update): a scan of
            // the owners of the delegated adverts is cheaper than an index kept for them.
            let delegated: Vec<Key> =
                self.owners.iter().filter(|(_, owner)| **owner == key).map(|(node, _)| *node).collect();
            for node in &delegated {
                self.remove_live(node);
            }
        }
        self.blocked.insert(provider)
    }

    pub fn unblock(&mut self, provider: &PeerId) -> bool {
        self.blocked.remove(provider)
    }

    pub fn is_blocked(&self, provider: &PeerId) -> bool {
        self.blocked.contains(provider)
    }

    /// Adverts matching `filter` that are live at `now`, cheapest first (ties among
    /// the returned ones by provider id), at most `limit` of them (0 = all).
    pub fn query(&self, filter: &OfferFilter, now_unix_ms: u64, limit: usize) -> Vec<Offer> {
        let spec = filter.price_spec();
        let limit = if limit == 0 { usize::MAX } else { limit };
        // Categorical filters become ids; a value no advert uses matches nothing.
        let lookup = |interner: &Interner, want: &Option<String>| match want {
            None => Ok(None),
            Some(s) => interner.get(s).map(Some).ok_or(()),
        };
        let (Ok(region), Ok(currency), Ok(image)) = (
            lookup(&self.regions, &filter.region),
            lookup(&self.currencies, &filter.currency),
            lookup(&self.images, &filter.image),
        ) else {
            return Vec::new();
        };
        let min_vcpus = filter.min_vcpus.unwrap_or(0);
        let min_memory = filter.min_memory_mib.unwrap_or(0);
        let min_disk = filter.min_disk_gib.unwrap_or(0);
        let max_price = filter.max_price_micros.unwrap_or(u64::MAX);
        let min_exposed = filter.min_exposed_ports.unwrap_or(0);
        // Providers and owners are matched by key; a PeerId that is no ed25519 key is
        // nobody's key, so it excludes nothing and an owner filter on it matches nothing.
        let exclude: HashSet<Key> = filter.exclude.iter().filter_map(key_of).collect();
        let want_owner = match &filter.owner {
            None => None,
            Some(owner) => match key_of(owner) {
                Some(key) => Some(key),
                None => return Vec::new(),
            },
        };

        // A bounded max-heap keeps the `limit` cheapest without sorting everything.
        // Entries are (price, table index): the provider key is only read for the winners.
        let mut heap: BinaryHeap<(u64, usize)> = BinaryHeap::new();
        for (index, s) in self.table.iter().enumerate() {
            if s.expires_at_unix_ms <= now_unix_ms
                || s.free_vcpus < min_vcpus
                || s.free_memory_mib < min_memory
                || s.free_disk_gib < min_disk
                || s.max_exposed_ports < min_exposed
                || region.is_some_and(|r| s.region != r)
                || currency.is_some_and(|c| s.currency != c)
                || filter.accel.is_some_and(|a| s.accel != a)
            {
                continue;
            }
            if let Some(id) = image {
                let offered = if id < 64 {
                    s.images & (1u64 << id) != 0
                } else {
                    s.images_overflow
                        && self
                            .more_images
                            .get(&self.held[index].advert.signer_public_key())
                            .is_some_and(|ids| ids.contains(&id))
                };
                if !offered {
                    continue;
                }
            }
            let Some(price) = hourly_price_micros(s.per_vcpu, s.per_memory_gib, s.per_disk_gib, &spec) else {
                continue;
            };
            if price > max_price {
                continue;
            }
            if !exclude.is_empty() || want_owner.is_some() {
                let provider = self.held[index].advert.signer_public_key();
                let owner = self.owners.get(&provider);
                if exclude.contains(&provider)
                    || owner.is_some_and(|o| exclude.contains(o))
                    || want_owner.is_some_and(|want| owner != Some(&want))
                {
                    continue;
                }
            }
            let entry = (price, index);
            if heap.len() < limit {
                heap.push(entry);
            } else if heap.peek().is_some_and(|top| entry < *top) {
                heap.pop();
                heap.push(entry);
            }
        }
        let mut winners: Vec<(u64, Key, usize)> = heap
            .into_iter()
            .map(|(price, index)| (price, self.held[index].advert.signer_public_key(), index))
            .collect();
        // Keys order as the PeerIds they are the tail of.
        winners.sort_unstable_by_key(|(price, key, _)| (*price, *key));
        winners
            .into_iter()
            .map(|(price, key, index)| Offer {
                price_per_hour_micros: price,
                provider: peer_id_from_public_key(&key),
                expires_at_unix_ms: self.table[index].expires_at_unix_ms,
                advert: self.held[index].advert.clone(),
            })
            .collect()
    }

    /// A filtered sync's one page (docs/protocol.md section 9, "Filtered sync"): the
    /// adverts [`AdvertStore::query`] gives for `filter`, cheapest first, as many as fit in
    /// `max_items` and `max_bytes` of envelopes, with the records of their highest tokens.
    pub fn query_page(&self, filter: &OfferFilter, max_items: usize, max_bytes: usize, now_unix_ms: u64) -> SyncPage {
        let mut page = SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() };
        let mut bytes = 0usize;
        for offer in self.query(filter, now_unix_ms, max_items.max(1)) {
            let env = offer.advert.as_bytes();
            if bytes + env.len() > max_bytes {
                break;
            }
            bytes += env.len();
            page.adverts.push(env.to_vec());
            page.refreshes.extend(self.refresh_record(&offer.provider));
        }
        page
    }

    /// A fetch by id's one page (docs/protocol.md section 9, "Fetch by id"): the live
    /// adverts whose refresh chain has one of `ids` (a node got tokens for them but not the
    /// advert), with the records of their highest tokens, within `max_items` and
    /// `max_bytes` of envelopes.
    pub fn ids_page(
        &self,
        ids: &[[u8; RECORD_ID_LEN]],
        max_items: usize,
        max_bytes: usize,
        now_unix_ms: u64,
    ) -> SyncPage {
        let mut page = SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() };
        let mut bytes = 0usize;
        let keys = ids.iter().flat_map(|id| self.chain_ids.range(id_range(id)).map(|(_, key)| key));
        for key in keys {
            let Some(row) = self.index.get(key).map(|row| *row as usize) else { continue };
            if self.table[row].expires_at_unix_ms <= now_unix_ms {
                continue;
            }
            let env = self.held[row].advert.as_bytes();
            if page.adverts.len() >= max_items || bytes + env.len() > max_bytes {
                break;
            }
            bytes += env.len();
            page.adverts.push(env.to_vec());
            page.refreshes.extend(self.chains.get(key).and_then(ChainState::record));
        }
        page
    }

    /// A page of adverts for the sync protocol: providers after `after` in id order whose
    /// effective expiry has not come, up to `max_items` and `max_bytes` of envelopes, with
    /// the records of the highest tokens held for them.
    pub fn page(&self, after: Option<&PeerId>, max_items: usize, max_bytes: usize, now_unix_ms: u64) -> SyncPage {
        let start = match after {
            None => Bound::Unbounded,
            Some(p) => match key_of(p) {
                Some(key) => Bound::Excluded(key),
                // Every stored id shares the ed25519 prefix, so a cursor that is not an
                // ed25519 id sorts before all of them or after all of them.
                None if *p < peer_id_from_public_key(&[0; 32]) => Bound::Unbounded,
                None => return SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() },
            },
        };
        let mut page = SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() };
        let mut bytes = 0usize;
        let mut last = None;
        for (key, row) in self.index.range((start, Bound::Unbounded)) {
            let row = *row as usize;
            if self.table[row].expires_at_unix_ms <= now_unix_ms {
                continue;
            }
            let env = self.held[row].advert.as_bytes();
            if page.adverts.len() >= max_items || bytes + env.len() > max_bytes {
                page.next = last.map(|k| peer_id_from_public_key(&k));
                return page;
            }
            bytes += env.len();
            page.adverts.push(env.to_vec());
            page.refreshes.extend(self.chains.get(key).and_then(ChainState::record));
            last = Some(*key);
        }
        page
    }

    /// Adds a checked advert's rows. It lives until its effective expiry, and never past
    /// `ends_at_unix_ms`, its delegation's end (docs/protocol.md section 7b).
    fn add_live(
        &mut self,
        key: Key,
        advert: &Verified<Advertisement>,
        refreshed: Option<Refreshed>,
        ends_at_unix_ms: u64,
    ) {
        let b = advert.body();
        let mut expires_at_unix_ms = b.expires_at_unix_ms.min(ends_at_unix_ms);
        let id = b.refresh.map(|chain| chain.id(&b.provider, b.seq));
        if let (Some(chain), Some(id)) = (b.refresh, id)
            && self.id_has_room(&id, &key)
        {
            let held = refreshed.map_or(HeldToken::anchor(&chain), |r| r.held);
            // `check_token` capped an accepted token's expiry at the same end.
            expires_at_unix_ms = refreshed.map_or(expires_at_unix_ms, |r| r.effective_expiry_ms);
            let state = ChainState {
                issued_at_unix_ms: b.issued_at_unix_ms,
                expires_at_unix_ms: b.expires_at_unix_ms,
                ends_at_unix_ms,
                chain,
                id,
                held,
            };
            self.chains.insert(key, state);
            self.chain_ids.insert((id, key));
        }
        let mut images = 0u64;
        let mut more = Vec::new();
        for img in &b.images {
            match self.images.intern(&img.name) {
                id @ 0..=63 => images |= 1 << id,
                id => more.push(id),
            }
        }
        let summary = Summary {
            expires_at_unix_ms,
            free_memory_mib: b.resources.free.memory_mib,
            free_disk_gib: b.resources.free.disk_gib,
            per_vcpu: b.pricing.per_vcpu_hour_micros,
            per_memory_gib: b.pricing.per_memory_gib_hour_micros,
            per_disk_gib: b.pricing.per_disk_gib_hour_micros,
            free_vcpus: b.resources.free.vcpus,
            max_exposed_ports: b.max_exposed_ports(),
            region: self.regions.intern(&b.region),
            currency: self.currencies.intern(&b.pricing.currency),
            accel: b.hypervisor.accel,
            images,
            images_overflow: !more.is_empty(),
        };
        if !more.is_empty() {
            self.more_images.insert(key, more);
        }
        self.next_expiry_unix_ms = self.next_expiry_unix_ms.min(expires_at_unix_ms);
        self.index.insert(key, self.table.len() as u32);
        self.table.push(summary);
        self.held.push(Held { advert: StoredAdvert::new(advert), seq: b.seq });
    }

    fn remove_live(&mut self, key: &Key) -> Option<StoredAdvert> {
        self.owners.remove(key);
        if let Some(state) = self.chains.remove(key) {
            self.chain_ids.remove(&(state.id, *key));
        }
        let row = self.index.remove(key)? as usize;
        self.more_images.remove(key);
        self.table.swap_remove(row);
        let removed = self.held.swap_remove(row);
        // The last row moved into the hole: point its provider at its new place.
        if let Some(moved) = self.held.get(row)
            && let Some(entry) = self.index.get_mut(&moved.advert.signer_public_key())
        {
            *entry = row as u32;
        }
        Some(removed.advert)
    }
}

impl ChainState {
    /// The record of the highest token accepted, or `None` before the first (the anchor
    /// is in the advert).
    fn record(&self) -> Option<RefreshRecord> {
        (self.held.j > 0).then_some(RefreshRecord { id: self.id, k: self.held.j, token: self.held.token })
    }
}

/// The entries of `chain_ids` under `id`.
fn id_range(id: &[u8; RECORD_ID_LEN]) -> std::ops::RangeInclusive<([u8; RECORD_ID_LEN], Key)> {
    (*id, [0u8; 32])..=(*id, [0xff; 32])
}

#[cfg(test)]
mod tests {
    use super::*;
    use peervm_protocol::{SigningKey, samples};
    use std::collections::BTreeSet;

    const NOW: u64 = samples::T0_UNIX_MS;

    fn put(store: &mut AdvertStore, n: u64, vcpus: u32, price: u64, region: &str, image: &str) -> PeerId {
        let key = samples::numbered_key(n);
        let mut a = samples::advert(&key, 1, NOW);
        a.resources.total.vcpus = vcpus.max(a.resources.total.vcpus);
        a.resources.free.vcpus = vcpus;
        a.pricing.per_vcpu_hour_micros = price;
        a.region = region.into();
        a.images[0].name = image.into();
        store.insert(peervm_protocol::Signed::sign(&key, &a).unwrap(), NOW).unwrap();
        key.peer_id()
    }

    #[test]
    fn query_filters_sorts_and_limits() {
        let mut s = AdvertStore::new();
        let a = put(&mut s, 1, 2, 300, "eu", "minimal");
        let b = put(&mut s, 2, 8, 100, "us", "minimal");
        let c = put(&mut s, 3, 4, 200, "eu", "debian");
        let ids = |v: Vec<Offer>| v.into_iter().map(|o| o.provider).collect::<Vec<_>>();
        assert_eq!(ids(s.query(&OfferFilter::default(), NOW, 0)), vec![b, c, a]);
        assert_eq!(ids(s.query(&OfferFilter::default(), NOW, 2)), vec![b, c]);
        assert_eq!(ids(s.query(&OfferFilter { min_vcpus: Some(4), ..Default::default() }, NOW, 0)), vec![b, c]);
        assert_eq!(ids(s.query(&OfferFilter { region: Some("eu".into()), ..Default::default() }, NOW, 0)), vec![c, a]);
        assert_eq!(ids(s.query(&OfferFilter { image: Some("debian".into()), ..Default::default() }, NOW, 0)), vec![c]);
        assert!(s.query(&OfferFilter { region: Some("mars".into()), ..Default::default() }, NOW, 0).is_empty());
        // Removing from the middle of the table keeps the others findable.
        assert!(s.block(c));
        assert_eq!(ids(s.query(&OfferFilter::default(), NOW, 0)), vec![b, a]);
        assert_eq!(s.sweep(NOW + 400_000).len(), 2);
        assert!(s.is_empty() && s.table.is_empty());
    }

    /// `offers --exposed-ports N`: only providers whose advert lets a lease expose N
    /// ports; an advert without network terms exposes none.
    #[test]
    fn query_filters_on_the_ports_a_lease_may_expose() {
        let mut s = AdvertStore::new();
        let none = put(&mut s, 1, 2, 100, "eu", "minimal");
        let key = samples::numbered_key(2);
        let mut a = samples::advert(&key, 1, NOW);
        a.network = Some(peervm_protocol::advert::NetworkOffer {
            max_exposed_ports: 4,
            privileged_ports: false,
            egress_mbit: None,
            ingress_mbit: None,
        });
        s.insert(peervm_protocol::Signed::sign(&key, &a).unwrap(), NOW).unwrap();
        let four = key.peer_id();
        let ids = |v: Vec<Offer>| v.into_iter().map(|o| o.provider).collect::<Vec<_>>();
        let at_least = |n| OfferFilter { min_exposed_ports: Some(n), ..Default::default() };
        assert_eq!(ids(s.query(&at_least(0), NOW, 0)), vec![none, four]);
        assert_eq!(ids(s.query(&at_least(1), NOW, 0)), vec![four]);
        assert_eq!(ids(s.query(&at_least(4), NOW, 0)), vec![four]);
        assert!(s.query(&at_least(5), NOW, 0).is_empty());
    }

    /// Every live provider is found at its own row, by lookup, by query and by sync
    /// paging, after removals from the middle of the table (the last row moves into the
    /// hole and its index entry must follow it).
    fn assert_consistent(s: &AdvertStore, live: &BTreeMap<PeerId, u64>) {
        assert_eq!(s.len(), live.len());
        assert_eq!(s.table.len(), live.len());
        assert_eq!(s.held.len(), live.len());
        for (p, seq) in live {
            assert_eq!(s.get(p).map(|a| a.signer()), Some(*p), "{p} is found at its own row");
            assert_eq!(s.get(p).map(|a| a.decode().unwrap().body().seq), Some(*seq));
            assert_eq!(s.held_seq(p), Some(*seq));
        }
        let mut shown: Vec<PeerId> = s.query(&OfferFilter::default(), NOW, 0).into_iter().map(|o| o.provider).collect();
        shown.sort();
        assert_eq!(shown, live.keys().copied().collect::<Vec<_>>());
        assert_eq!(s.providers().collect::<Vec<_>>(), live.keys().copied().collect::<Vec<_>>());
    }

    #[test]
    fn the_index_follows_rows_moved_by_removals() {
        let mut s = AdvertStore::new();
        let mut live = BTreeMap::new();
        let keys: Vec<_> = (0..12).map(samples::numbered_key).collect();
        for (i, key) in keys.iter().enumerate() {
            let seq = 1 + i as u64;
            s.insert(peervm_protocol::Signed::sign(key, &samples::advert(key, seq, NOW)).unwrap(), NOW).unwrap();
            live.insert(key.peer_id(), seq);
        }
        assert_consistent(&s, &live);
        // Block one in the middle, withdraw the first row's, replace one, block the last.
        assert!(s.block(keys[5].peer_id()));
        live.remove(&keys[5].peer_id());
        assert_consistent(&s, &live);
        let mut w = samples::advert(&keys[0], 50, NOW);
        w.withdrawn = true;
        assert_eq!(s.insert(peervm_protocol::Signed::sign(&keys[0], &w).unwrap(), NOW), Ok(InsertOutcome::Withdrawn));
        live.remove(&keys[0].peer_id());
        assert_consistent(&s, &live);
        assert_eq!(s.held_seq(&keys[0].peer_id()), Some(50), "the tombstone keeps the seq");
        let newer = samples::advert(&keys[3], 40, NOW);
        assert_eq!(
            s.insert(peervm_protocol::Signed::sign(&keys[3], &newer).unwrap(), NOW),
            Ok(InsertOutcome::Replaced)
        );
        live.insert(keys[3].peer_id(), 40);
        assert_consistent(&s, &live);
        assert!(s.block(keys[11].peer_id()));
        live.remove(&keys[11].peer_id());
        assert_consistent(&s, &live);
    }

    #[test]
    fn sweep_removes_exactly_the_expired_adverts() {
        let mut s = AdvertStore::new();
        let mut expected = Vec::new();
        let mut live = BTreeMap::new();
        for n in 0..10u64 {
            let key = samples::numbered_key(n);
            let mut a = samples::advert(&key, 1, NOW);
            // Odd ones live 100 s, even ones the full 300 s.
            if n % 2 == 1 {
                a.expires_at_unix_ms = NOW + 100_000;
                expected.push(key.peer_id());
            } else {
                live.insert(key.peer_id(), 1);
            }
            s.insert(peervm_protocol::Signed::sign(&key, &a).unwrap(), NOW).unwrap();
        }
        let mut removed = s.sweep(NOW + 100_000);
        removed.sort();
        expected.sort();
        assert_eq!(removed, expected);
        assert_consistent(&s, &live);
        assert!(s.sweep(NOW + 100_001).is_empty());
        // An advert that expires before the others, added after a sweep, is swept on time.
        let key = samples::numbered_key(20);
        let mut a = samples::advert(&key, 1, NOW + 100_000);
        a.expires_at_unix_ms = NOW + 150_000;
        s.insert(peervm_protocol::Signed::sign(&key, &a).unwrap(), NOW + 100_000).unwrap();
        assert!(s.sweep(NOW + 149_999).is_empty());
        assert_eq!(s.sweep(NOW + 150_000), vec![key.peer_id()]);
        assert_consistent(&s, &live);
        assert_eq!(s.sweep(NOW + 300_000).len(), live.len());
        assert!(s.is_empty());
    }

    /// Sync pages walk every live provider once, in PeerId order, resuming after the
    /// cursor; caps on items and bytes cut pages; a cursor that is no ed25519 id sorts
    /// before or after all of them, as PeerIds compare.
    #[test]
    fn sync_pages_walk_the_providers_in_id_order() {
        let mut s = AdvertStore::new();
        for n in 0..25u64 {
            let key = samples::numbered_key(n);
            s.insert(peervm_protocol::Signed::sign(&key, &samples::advert(&key, 1, NOW)).unwrap(), NOW).unwrap();
        }
        let all: Vec<PeerId> =
            (0..25u64).map(|n| samples::numbered_key(n).peer_id()).collect::<BTreeSet<_>>().into_iter().collect();
        let signer = |env: &Vec<u8>| peervm_protocol::Signed::<Advertisement>::open(env).unwrap().body().provider;
        let one_size = s.page(None, 1, usize::MAX, NOW).adverts[0].len();
        for (max_items, max_bytes) in [(4, usize::MAX), (100, 3 * one_size), (1, usize::MAX)] {
            let mut seen = Vec::new();
            let mut cursor = None;
            loop {
                let SyncPage { adverts: page, next, refreshes } = s.page(cursor.as_ref(), max_items, max_bytes, NOW);
                assert!(refreshes.is_empty(), "no advert has a chain");
                assert!(page.len() <= max_items && page.iter().map(Vec::len).sum::<usize>() <= max_bytes);
                seen.extend(page.iter().map(signer));
                match next {
                    Some(n) => {
                        assert_eq!(Some(&n), seen.last(), "the cursor is the last provider sent");
                        cursor = Some(n);
                    }
                    None => break,
                }
            }
            assert_eq!(seen, all, "items {max_items}, bytes {max_bytes}");
        }
        // The ids compare as PeerIds: a short identity multihash before, sha256 after.
        let short = PeerId::from_bytes(&[0x00, 0x04, 1, 2, 3, 4]).unwrap();
        let hashed = PeerId::from_bytes(&[&[0x12, 0x20][..], &[7u8; 32]].concat()).unwrap();
        assert!(short < all[0] && hashed > all[24]);
        assert_eq!(s.page(Some(&short), 100, usize::MAX, NOW).adverts.len(), 25);
        assert_eq!(
            s.page(Some(&hashed), 100, usize::MAX, NOW),
            SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() }
        );
        // Expired adverts are not served.
        assert!(s.page(None, 100, usize::MAX, NOW + 300_000).adverts.is_empty());
    }

    /// Past 64 image names the summary's bitmap overflows to a side table: a query for a
    /// late image finds exactly its providers, also after rows move.
    #[test]
    fn images_past_the_64th_name_are_found() {
        let mut s = AdvertStore::new();
        let mut late = Vec::new();
        for n in 0..70u64 {
            let p = put(&mut s, n, 2, 100 + n, "eu", &format!("image-{n}"));
            if n >= 66 {
                late.push(p);
            }
        }
        // A second advert offering image-68, past the bitmap too.
        let key = samples::numbered_key(200);
        let mut a = samples::advert(&key, 1, NOW);
        a.images.push(peervm_protocol::ImageOffer { name: "image-68".into(), sha256: [1; 32] });
        s.insert(peervm_protocol::Signed::sign(&key, &a).unwrap(), NOW).unwrap();
        fn with(s: &AdvertStore, name: &str) -> Vec<PeerId> {
            let f = OfferFilter { image: Some(name.into()), ..Default::default() };
            s.query(&f, NOW, 0).into_iter().map(|o| o.provider).collect()
        }
        assert_eq!(with(&s, "image-68"), vec![late[2], key.peer_id()]);
        assert_eq!(with(&s, "image-69"), vec![late[3]]);
        assert_eq!(with(&s, "image-3"), vec![samples::numbered_key(3).peer_id()]);
        assert!(s.block(samples::numbered_key(1).peer_id()));
        assert_eq!(with(&s, "image-68"), vec![late[2], key.peer_id()]);
        assert!(s.block(late[2]));
        assert_eq!(with(&s, "image-68"), vec![key.peer_id()]);
        // Names 64-69 and the extra advert's two overflowed, less the one just blocked.
        assert_eq!(s.more_images.len(), 6, "a removed advert leaves no overflow entry");
    }

    /// Puts `owner`'s delegation to `node`, ending at `not_after`, into `advert`.
    fn delegate(owner: &SigningKey, node: &SigningKey, replaces: Vec<PeerId>, not_after: u64, a: &mut Advertisement) {
        let d = peervm_protocol::Delegation {
            version: peervm_protocol::delegation::DELEGATION_VERSION,
            owner: owner.peer_id(),
            node: node.peer_id(),
            not_before_unix_ms: NOW - 1_000,
            not_after_unix_ms: not_after,
            beneficiary: None,
            replaces,
        };
        a.delegation = Some(peervm_protocol::Signed::sign(owner, &d).unwrap().to_bytes());
    }

    fn delegated(owner: &SigningKey, node: &SigningKey, replaces: Vec<PeerId>, seq: u64) -> Verified<Advertisement> {
        let mut a = samples::advert(node, seq, NOW);
        delegate(owner, node, replaces, NOW + 3_600_000, &mut a);
        peervm_protocol::Signed::sign(node, &a).unwrap()
    }

    /// Owners are kept by key: `owner_of`, the owner and exclude filters, and a rotation
    /// that retires an owner's old node key.
    #[test]
    fn owners_filter_exclude_and_rotate() {
        let mut s = AdvertStore::new();
        let owner = samples::owner_key();
        let (n1, n2, n3) = (samples::numbered_key(1), samples::numbered_key(2), samples::numbered_key(3));
        let plain = put(&mut s, 4, 2, 100, "eu", "minimal");
        s.insert(delegated(&owner, &n1, vec![], 1), NOW).unwrap();
        s.insert(delegated(&owner, &n2, vec![], 1), NOW).unwrap();
        assert_eq!(s.owner_of(&n1.peer_id()), Some(owner.peer_id()));
        assert_eq!(s.owner_of(&plain), None);
        let ids = |f: OfferFilter| {
            let mut v: Vec<PeerId> = s.query(&f, NOW, 0).into_iter().map(|o| o.provider).collect();
            v.sort();
            v
        };
        let mut owned = vec![n1.peer_id(), n2.peer_id()];
        owned.sort();
        assert_eq!(ids(OfferFilter { owner: Some(owner.peer_id()), ..Default::default() }), owned);
        let by_owner = OfferFilter { exclude: [owner.peer_id()].into(), ..Default::default() };
        assert_eq!(ids(by_owner), vec![plain]);
        let by_node = OfferFilter { exclude: [n1.peer_id()].into(), ..Default::default() };
        assert_eq!(ids(by_node).len(), 2);
        // n3 replaces n1: n1 is removed and cannot come back under this owner.
        s.insert(delegated(&owner, &n3, vec![n1.peer_id()], 1), NOW).unwrap();
        assert!(!s.contains(&n1.peer_id()) && s.owner_of(&n1.peer_id()).is_none());
        assert_eq!(s.insert(delegated(&owner, &n1, vec![], 2), NOW), Err(InsertError::Revoked(n1.peer_id())));
        assert_eq!(s.query(&OfferFilter { owner: Some(owner.peer_id()), ..Default::default() }, NOW, 0).len(), 2);
    }

    #[test]
    fn withdrawal_leaves_a_tombstone() {
        let mut s = AdvertStore::new();
        let key = samples::numbered_key(9);
        let sign = |a: &Advertisement| peervm_protocol::Signed::sign(&key, a).unwrap();
        s.insert(sign(&samples::advert(&key, 5, NOW)), NOW).unwrap();
        let mut w = samples::advert(&key, 6, NOW);
        w.withdrawn = true;
        assert_eq!(s.insert(sign(&w), NOW), Ok(InsertOutcome::Withdrawn));
        assert!(!s.contains(&key.peer_id()));
        assert!(s.insert(sign(&samples::advert(&key, 5, NOW)), NOW).is_err());
        assert_eq!(s.insert(sign(&samples::advert(&key, 7, NOW)), NOW), Ok(InsertOutcome::Added));
    }

    /// Provider `n`'s advert issued at NOW, living 300 s, with a chain of 100 tokens every
    /// 150 s: token k is released at NOW + k * 150 s and keeps the advert until
    /// NOW + 300 s + k * 150 s.
    fn chained(n: u64, seq: u64) -> (Verified<Advertisement>, peervm_protocol::RefreshSecret) {
        let (key, a, secret) = chained_body(n, seq);
        (peervm_protocol::Signed::sign(&key, &a).unwrap(), secret)
    }

    /// [`chained`]'s key, advert body (not signed yet) and secret.
    fn chained_body(n: u64, seq: u64) -> (SigningKey, Advertisement, peervm_protocol::RefreshSecret) {
        let key = samples::numbered_key(n);
        let (chain, secret) =
            peervm_protocol::RefreshSecret::generate(&key.peer_id(), seq, 150, 100, [n as u8; 16]).unwrap();
        let mut a = samples::advert(&key, seq, NOW);
        a.refresh = Some(chain);
        (key, a, secret)
    }

    /// [`chained`]'s advert of node key `n`, delegated by `owner` until `not_after`, with
    /// the delegation retiring `replaces`.
    fn delegated_chained(
        owner: &SigningKey,
        n: u64,
        replaces: Vec<PeerId>,
        not_after: u64,
    ) -> (Verified<Advertisement>, peervm_protocol::RefreshSecret) {
        let (key, mut a, secret) = chained_body(n, 1);
        delegate(owner, &key, replaces, not_after, &mut a);
        (peervm_protocol::Signed::sign(&key, &a).unwrap(), secret)
    }

    /// When token k is released, and the effective expiry it gives.
    fn release(k: u64) -> u64 {
        NOW + k * 150_000
    }
    fn effective(k: u64) -> u64 {
        NOW + 300_000 + k * 150_000
    }

    fn accepted(k: u16, secret: &peervm_protocol::RefreshSecret) -> RefreshOutcome {
        RefreshOutcome::Accepted {
            k,
            token: secret.token(u32::from(k)).unwrap(),
            effective_expiry_ms: effective(u64::from(k)),
        }
    }

    fn shown(s: &AdvertStore, now: u64) -> Vec<PeerId> {
        s.query(&OfferFilter::default(), now, 0).into_iter().map(|o| o.provider).collect()
    }

    #[test]
    fn a_refreshed_advert_outlives_its_signed_expiry_and_is_swept_at_its_effective_one() {
        let mut s = AdvertStore::new();
        let (advert, secret) = chained(1, 1);
        let p = advert.body().provider;
        let plain = put(&mut s, 2, 2, 100, "eu", "minimal");
        s.insert(advert, NOW).unwrap();
        assert_eq!(s.expires_at(&p), Some(NOW + 300_000));
        assert_eq!(s.refresh_record(&p), None, "no token yet");
        assert_eq!(s.apply_refresh(&secret.record(1).unwrap(), release(1)), accepted(1, &secret));
        assert_eq!(s.apply_refresh(&secret.record(2).unwrap(), release(2)), accepted(2, &secret));
        assert_eq!(s.expires_at(&p), Some(effective(2)));
        assert_eq!(s.refresh_record(&p), secret.record(2));
        // Past the signed expiry: the plain advert is gone, the refreshed one is everywhere.
        let later = NOW + 300_000;
        assert_eq!(s.sweep(later), vec![plain]);
        assert!(s.contains(&p) && s.get(&p).is_some());
        assert_eq!(shown(&s, later), vec![p]);
        assert_eq!(s.query(&OfferFilter::default(), later, 0)[0].expires_at_unix_ms, effective(2));
        assert_eq!(s.page(None, 10, usize::MAX, later).adverts.len(), 1);
        // Until its effective expiry, to the millisecond.
        assert!(s.sweep(effective(2) - 1).is_empty());
        assert_eq!(shown(&s, effective(2) - 1), vec![p]);
        assert!(shown(&s, effective(2)).is_empty());
        assert!(s.page(None, 10, usize::MAX, effective(2)).adverts.is_empty());
        assert_eq!(s.sweep(effective(2)), vec![p]);
        assert!(s.is_empty() && s.chains.is_empty() && s.chain_ids.is_empty());
    }

    /// Anyone can copy a provider's `refresh` field into adverts of their own keys; the
    /// copies get ids of their own (docs/protocol.md section 4a, "Records"), so stored
    /// first they neither turn the provider's genuine tokens into "forged" ones (which
    /// would get honest relays banned) nor crowd the provider's id.
    #[test]
    fn adverts_copying_another_providers_chain_neither_take_its_tokens_nor_crowd_its_id() {
        let mut s = AdvertStore::new();
        let (victim, secret) = chained(1, 1);
        let chain = victim.body().refresh;
        let v = victim.body().provider;
        for n in 2..=6 {
            let key = samples::numbered_key(n);
            let mut copy = samples::advert(&key, 1, NOW);
            copy.refresh = chain;
            s.insert(peervm_protocol::Signed::sign(&key, &copy).unwrap(), NOW).unwrap();
        }
        s.insert(victim, NOW).unwrap();
        assert_eq!(s.apply_refresh(&secret.record(1).unwrap(), release(1)), accepted(1, &secret));
        assert_eq!(s.expires_at(&v), Some(effective(1)));
    }

    #[test]
    fn a_forged_or_out_of_range_token_changes_nothing_and_is_rejected() {
        let mut s = AdvertStore::new();
        let (advert, secret) = chained(1, 1);
        let p = advert.body().provider;
        s.insert(advert, NOW).unwrap();
        let genuine = secret.record(1).unwrap();
        let forged = RefreshRecord { token: [0xaa; 16], ..genuine };
        assert_eq!(
            s.apply_refresh(&forged, release(1)),
            RefreshOutcome::Rejected(peervm_protocol::RejectReason::Forged)
        );
        let too_far = RefreshRecord { k: 101, ..genuine };
        assert_eq!(
            s.apply_refresh(&too_far, release(101)),
            RefreshOutcome::Rejected(peervm_protocol::RejectReason::OutOfRange)
        );
        assert_eq!(s.expires_at(&p), Some(NOW + 300_000));
        assert_eq!(s.refresh_record(&p), None);
        // The genuine one still goes through from the anchor.
        assert_eq!(s.apply_refresh(&genuine, release(1)), accepted(1, &secret));
    }

    #[test]
    fn stale_early_and_unknown_tokens_are_ignored() {
        let mut s = AdvertStore::new();
        let (advert, secret) = chained(1, 1);
        let p = advert.body().provider;
        s.insert(advert, NOW).unwrap();
        assert_eq!(s.apply_refresh(&secret.record(2).unwrap(), release(2)), accepted(2, &secret));
        for k in [1, 2] {
            assert_eq!(
                s.apply_refresh(&secret.record(k).unwrap(), release(3)),
                RefreshOutcome::Ignored(IgnoreReason::Stale),
                "k {k}"
            );
        }
        assert_eq!(
            s.apply_refresh(&secret.record(4).unwrap(), release(4) - 30_001),
            RefreshOutcome::Ignored(IgnoreReason::FromTheFuture)
        );
        let unknown = RefreshRecord { id: [0; 6], ..secret.record(3).unwrap() };
        assert_eq!(s.apply_refresh(&unknown, release(3)), RefreshOutcome::Ignored(IgnoreReason::Unknown));
        assert_eq!(s.expires_at(&p), Some(effective(2)), "nothing ignored moved the expiry");
        assert_eq!(s.refresh_record(&p), secret.record(2));
    }

    #[test]
    fn a_replaced_or_removed_advert_forgets_its_chain() {
        let mut s = AdvertStore::new();
        let (first, old) = chained(1, 1);
        let p = first.body().provider;
        s.insert(first, NOW).unwrap();
        assert_eq!(s.apply_refresh(&old.record(1).unwrap(), release(1)), accepted(1, &old));
        let (second, new) = chained(1, 2);
        assert_ne!(new.id(), old.id());
        assert_eq!(s.insert(second, release(1)), Ok(InsertOutcome::Replaced));
        assert_eq!(s.expires_at(&p), Some(NOW + 300_000), "the new advert's own expiry");
        assert_eq!(s.refresh_record(&p), None);
        assert_eq!(s.chains.len(), 1);
        assert_eq!(
            s.apply_refresh(&old.record(2).unwrap(), release(2)),
            RefreshOutcome::Ignored(IgnoreReason::Unknown),
            "the old chain is no longer indexed"
        );
        assert!(matches!(s.apply_refresh(&new.record(2).unwrap(), release(2)), RefreshOutcome::Accepted { .. }));
        // Withdrawal and blocking drop the chain too.
        let mut w = samples::advert(&samples::numbered_key(1), 3, release(2));
        w.withdrawn = true;
        let w = peervm_protocol::Signed::sign(&samples::numbered_key(1), &w).unwrap();
        assert_eq!(s.insert(w, release(2)), Ok(InsertOutcome::Withdrawn));
        assert!(s.chains.is_empty() && s.chain_ids.is_empty());
        let (third, _) = chained(2, 1);
        s.insert(third, NOW).unwrap();
        assert!(s.block(samples::numbered_key(2).peer_id()));
        assert!(s.chains.is_empty() && s.chain_ids.is_empty());
    }

    #[test]
    fn a_page_carries_the_records_of_its_adverts() {
        let mut s = AdvertStore::new();
        let (a, secret_a) = chained(1, 1);
        let (b, _) = chained(2, 1);
        let (pa, pb) = (a.body().provider, b.body().provider);
        s.insert(a, NOW).unwrap();
        s.insert(b, NOW).unwrap();
        let plain = put(&mut s, 3, 2, 100, "eu", "minimal");
        assert!(s.page(None, 10, usize::MAX, NOW).refreshes.is_empty(), "no token accepted yet");
        s.apply_refresh(&secret_a.record(1).unwrap(), release(1) - 30_000);
        s.apply_refresh(&secret_a.record(2).unwrap(), release(2) - 30_000);
        let now = release(2) - 30_000; // everything live
        let page = s.page(None, 10, usize::MAX, now);
        assert_eq!(page.adverts.len(), 3);
        assert_eq!(page.refreshes, vec![secret_a.record(2).unwrap()], "the highest token, for a only");
        // A page without `a` carries no record; one with only `a` carries its record.
        let mut ids = [pa, pb, plain];
        ids.sort();
        let at = ids.iter().position(|p| *p == pa).unwrap();
        let before_a = if at == 0 { None } else { Some(ids[at - 1]) };
        let only_a = s.page(before_a.as_ref(), 1, usize::MAX, now);
        assert_eq!(only_a.refreshes, vec![secret_a.record(2).unwrap()]);
        let after_a = s.page(Some(&pa), 10, usize::MAX, now);
        assert!(after_a.refreshes.is_empty());
        // Past the signed expiry only the refreshed advert is on a page.
        let page = s.page(None, 10, usize::MAX, NOW + 300_000);
        assert_eq!((page.adverts.len(), page.refreshes.len()), (1, 1));
    }

    /// A sync page's advert whose signed expiry has passed lands with the record that
    /// names it; with a bad record, or none, it is expired.
    #[test]
    fn an_expired_advert_lands_with_its_record() {
        let now = NOW + 400_000; // after the signed expiry, token 2 released
        let (advert, secret) = chained(1, 1);
        let p = advert.body().provider;
        let record = secret.record(2).unwrap();

        let mut s = AdvertStore::new();
        assert!(matches!(s.insert(advert.clone(), now), Err(InsertError::Advert(AdvertError::Expired { .. }))));
        let forged = RefreshRecord { token: [1; 16], ..record };
        let done = s.insert_with_refresh(advert.clone(), Some(&forged), now);
        assert!(matches!(done.advert, Err(InsertError::Advert(AdvertError::Expired { .. }))));
        assert_eq!(done.record, Some(RefreshOutcome::Rejected(peervm_protocol::RejectReason::Forged)));
        let early = secret.record(3).unwrap(); // released at NOW + 450 s
        let done = s.insert_with_refresh(advert.clone(), Some(&early), now);
        assert_eq!(done.record, Some(RefreshOutcome::Ignored(IgnoreReason::FromTheFuture)));
        assert!(s.is_empty());

        let done = s.insert_with_refresh(advert.clone(), Some(&record), now);
        assert_eq!(done, RefreshedInsert { advert: Ok(InsertOutcome::Added), record: Some(accepted(2, &secret)) });
        assert_eq!(s.expires_at(&p), Some(effective(2)));
        assert_eq!(s.refresh_record(&p), Some(record));
        assert_eq!(shown(&s, now), vec![p]);
        // The same advert again (another page, another server) with a newer record: the
        // advert is not taken again (expired by its signed expiry, which the rule checks
        // before the seq), the record still raises the token held.
        let done = s.insert_with_refresh(advert.clone(), Some(&secret.record(3).unwrap()), release(3));
        assert!(matches!(done.advert, Err(InsertError::Advert(AdvertError::Expired { .. }))));
        assert_eq!(done.record, Some(accepted(3, &secret)));
        assert_eq!(s.expires_at(&p), Some(effective(3)));

        // Not expired yet: inserted, then the record applied.
        let mut s = AdvertStore::new();
        let done = s.insert_with_refresh(advert.clone(), Some(&secret.record(1).unwrap()), release(1));
        assert_eq!(done, RefreshedInsert { advert: Ok(InsertOutcome::Added), record: Some(accepted(1, &secret)) });
        // No record: as insert.
        let mut s = AdvertStore::new();
        let done = s.insert_with_refresh(advert, None, now);
        assert!(matches!(done.advert, Err(InsertError::Advert(AdvertError::Expired { .. }))) && done.record.is_none());
    }

    /// A delegated advert lives until its delegation ends and no longer, refreshed or not
    /// (docs/protocol.md sections 4a and 7b): tokens still accepted before the end raise
    /// the expiry only up to it; after it the advert is swept and its tokens are unknown.
    #[test]
    fn a_delegated_advert_ends_with_its_delegation_however_it_is_refreshed() {
        let owner = samples::owner_key();
        let ends = NOW + 400_000; // after token 1's expiry (NOW + 300 s), before token 2's
        let (advert, secret) = delegated_chained(&owner, 1, vec![], ends);
        let p = advert.body().provider;
        let mut s = AdvertStore::new();
        s.insert(advert.clone(), NOW).unwrap();
        let capped = |k: u16| RefreshOutcome::Accepted {
            k,
            token: secret.token(u32::from(k)).unwrap(),
            effective_expiry_ms: ends,
        };
        assert_eq!(s.apply_refresh(&secret.record(1).unwrap(), release(1)), capped(1));
        assert_eq!(s.expires_at(&p), Some(ends), "token 1 alone would give NOW + 450 s");
        assert_eq!(s.apply_refresh(&secret.record(2).unwrap(), release(2)), capped(2));
        assert_eq!(s.expires_at(&p), Some(ends));
        assert_eq!(shown(&s, ends - 1), vec![p]);
        assert!(shown(&s, ends).is_empty() && s.page(None, 10, usize::MAX, ends).adverts.is_empty());
        assert_eq!(s.sweep(ends), vec![p]);
        assert_eq!(
            s.apply_refresh(&secret.record(3).unwrap(), release(3)),
            RefreshOutcome::Ignored(IgnoreReason::Unknown)
        );
        // By sync after the end, with its newest record: refused (the window is over).
        let done = s.insert_with_refresh(advert.clone(), Some(&secret.record(3).unwrap()), release(3));
        assert!(done.advert.is_err() && s.is_empty(), "{done:?}");
        // By sync before the end, after its signed expiry: capped as well.
        let now = NOW + 350_000;
        let done = s.insert_with_refresh(advert, Some(&secret.record(2).unwrap()), now);
        assert_eq!(done.advert, Ok(InsertOutcome::Added));
        assert_eq!(s.expires_at(&p), Some(ends));
        // An advert without a chain whose delegation ends before its signed expiry.
        let n2 = samples::numbered_key(2);
        let mut plain = samples::advert(&n2, 1, NOW);
        delegate(&owner, &n2, vec![], NOW + 100_000, &mut plain);
        s.insert(peervm_protocol::Signed::sign(&n2, &plain).unwrap(), NOW).unwrap();
        assert_eq!(s.expires_at(&n2.peer_id()), Some(NOW + 100_000));
    }

    /// Blocking an owner removes the adverts of every node key it delegated to at once,
    /// their chains with them: later tokens are unknown, later adverts refused.
    #[test]
    fn blocking_an_owner_removes_its_nodes_adverts_and_their_refresh_chains_at_once() {
        let owner = samples::owner_key();
        let mut s = AdvertStore::new();
        let (a1, secret) = delegated_chained(&owner, 1, vec![], NOW + 3_600_000);
        let (a2, _) = delegated_chained(&owner, 2, vec![], NOW + 3_600_000);
        let plain = put(&mut s, 3, 2, 100, "eu", "minimal");
        s.insert(a1.clone(), NOW).unwrap();
        s.insert(a2, NOW).unwrap();
        assert_eq!(s.apply_refresh(&secret.record(1).unwrap(), release(1)), accepted(1, &secret));
        assert!(s.block(owner.peer_id()));
        assert_eq!(shown(&s, release(1)), vec![plain]);
        assert!(s.chains.is_empty() && s.chain_ids.is_empty() && s.owners.is_empty());
        assert_eq!(
            s.apply_refresh(&secret.record(2).unwrap(), release(2)),
            RefreshOutcome::Ignored(IgnoreReason::Unknown)
        );
        assert_eq!(s.insert(a1.clone(), release(1)), Err(InsertError::Blocked(owner.peer_id())));
        let done = s.insert_with_refresh(a1, Some(&secret.record(2).unwrap()), release(2));
        assert_eq!(done.advert, Err(InsertError::Blocked(owner.peer_id())));
        assert_eq!(shown(&s, release(1)), vec![plain]);
    }

    /// A node key its owner retires (rotation, `replaces`) loses its chained advert when
    /// the replacing advert arrives, and takes no token after.
    #[test]
    fn a_retired_node_keys_chained_advert_is_removed_and_takes_no_token() {
        let owner = samples::owner_key();
        let mut s = AdvertStore::new();
        let (old, secret) = delegated_chained(&owner, 1, vec![], NOW + 3_600_000);
        let retired = old.body().provider;
        s.insert(old.clone(), NOW).unwrap();
        assert_eq!(s.apply_refresh(&secret.record(1).unwrap(), release(1)), accepted(1, &secret));
        let (new, _) = delegated_chained(&owner, 2, vec![retired], NOW + 3_600_000);
        s.insert(new, release(1)).unwrap();
        assert!(!s.contains(&retired) && s.chains.len() == 1);
        assert_eq!(
            s.apply_refresh(&secret.record(2).unwrap(), release(2)),
            RefreshOutcome::Ignored(IgnoreReason::Unknown)
        );
        let done = s.insert_with_refresh(old, Some(&secret.record(2).unwrap()), release(2));
        assert_eq!(done.advert, Err(InsertError::Revoked(retired)));
        assert!(!s.contains(&retired));
    }

    /// A filtered sync's page: the query's cheapest matches, in its order, cut at the byte
    /// cap, with the records of the refreshed ones.
    #[test]
    fn a_query_page_holds_the_cheapest_matches_within_its_caps_and_their_records() {
        let mut s = AdvertStore::new();
        let (chained_advert, secret) = chained(1, 1);
        let p = chained_advert.body().provider;
        s.insert(chained_advert, NOW).unwrap();
        s.apply_refresh(&secret.record(1).unwrap(), release(1));
        for n in 2..8 {
            put(&mut s, n, 2, 100 * n, "eu", "minimal");
        }
        put(&mut s, 9, 2, 1, "us", "minimal");
        let eu = OfferFilter { region: Some("eu".into()), ..Default::default() };
        let now = release(1);
        let order: Vec<PeerId> = s.query(&eu, now, 4).into_iter().map(|o| o.provider).collect();
        let page = s.query_page(&eu, 4, usize::MAX, now);
        let providers: Vec<PeerId> = page
            .adverts
            .iter()
            .map(|e| peervm_protocol::Signed::<Advertisement>::from_bytes(e).unwrap().signer())
            .collect();
        assert_eq!(providers, order);
        assert_eq!(page.next, None);
        let all = s.query_page(&OfferFilter::default(), 20, usize::MAX, now);
        assert_eq!(all.adverts.len(), 8);
        assert_eq!(all.refreshes, vec![secret.record(1).unwrap()], "the record of {p}");
        let one = page.adverts[0].len();
        assert_eq!(s.query_page(&eu, 4, 2 * one + one / 2, now).adverts.len(), 2, "cut at the byte cap");
        let none = OfferFilter { region: Some("mars".into()), ..Default::default() };
        assert!(s.query_page(&none, 4, usize::MAX, now).adverts.is_empty());
    }

    /// A fetch by id finds the adverts whose chains have the ids asked for, with their
    /// records, and nothing else.
    #[test]
    fn an_ids_page_holds_the_adverts_of_the_ids_asked_for() {
        let mut s = AdvertStore::new();
        let (a, secret_a) = chained(1, 1);
        let (b, secret_b) = chained(2, 1);
        let pa = a.body().provider;
        s.insert(a, NOW).unwrap();
        s.insert(b, NOW).unwrap();
        put(&mut s, 3, 2, 100, "eu", "minimal");
        s.apply_refresh(&secret_a.record(1).unwrap(), release(1));
        let page = s.ids_page(&[secret_a.id(), [9; 6]], 10, usize::MAX, release(1));
        assert_eq!(page.adverts.len(), 1);
        assert_eq!(peervm_protocol::Signed::<Advertisement>::from_bytes(&page.adverts[0]).unwrap().signer(), pa);
        assert_eq!(page.refreshes, vec![secret_a.record(1).unwrap()]);
        assert_eq!(s.ids_page(&[secret_a.id(), secret_b.id()], 10, usize::MAX, release(1)).adverts.len(), 2);
        assert_eq!(s.ids_page(&[secret_a.id(), secret_b.id()], 1, usize::MAX, release(1)).adverts.len(), 1);
        assert!(s.ids_page(&[secret_b.id()], 10, usize::MAX, NOW + 300_000).adverts.is_empty(), "expired");
    }
}
