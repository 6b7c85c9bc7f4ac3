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

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

use peervm_protocol::advert::hourly_price_micros;
use peervm_protocol::{Accel, AdvertError, Advertisement, PeerId, ResourceAmounts, Verified};

/// One advert as the store keeps it: the verified message (exact wire bytes and the
/// decoded body), shared so queries and sync pages do not copy it.
pub type StoredAdvert = Arc<Verified<Advertisement>>;

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
    pub advert: StoredAdvert,
}

/// What a query needs of an advert, packed for a cache-friendly scan.
#[derive(Debug, Clone)]
struct Summary {
    /// The advert itself: read only for the few that match.
    advert: StoredAdvert,
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
    /// Offers an image whose id is 64 or more: checked on the advert itself.
    images_overflow: bool,
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

#[derive(Default)]
pub struct AdvertStore {
    /// Provider -> (index in `table`, the advert).
    live: HashMap<PeerId, (usize, StoredAdvert)>,
    /// Dense summaries of the live adverts, in no particular order.
    table: Vec<Summary>,
    /// Seq and expiry of withdrawn providers, so stale adverts cannot resurrect them.
    tombstones: HashMap<PeerId, (u64, u64)>,
    /// (expires_at, provider) of live adverts, for the sweep.
    expiry: BTreeSet<(u64, PeerId)>,
    /// Ordered provider ids, for stable sync paging.
    order: BTreeSet<PeerId>,
    regions: Interner,
    currencies: Interner,
    images: Interner,
    /// Providers this node refuses to store, show or forward (incident response).
    blocked: HashSet<PeerId>,
    /// The owner of each live advert that carries a delegation.
    owners: HashMap<PeerId, PeerId>,
    /// (owner, node key) pairs an owner retired, until the retiring delegation ends.
    revoked: HashMap<(PeerId, PeerId), u64>,
}

impl AdvertStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }

    /// The seq this store holds for `provider` (live or withdrawn).
    pub fn held_seq(&self, provider: &PeerId) -> Option<u64> {
        self.live
            .get(provider)
            .map(|(_, a)| a.body().seq)
            .or_else(|| self.tombstones.get(provider).map(|(seq, _)| *seq))
    }

    pub fn get(&self, provider: &PeerId) -> Option<&StoredAdvert> {
        self.live.get(provider).map(|(_, a)| a)
    }

    pub fn contains(&self, provider: &PeerId) -> bool {
        self.live.contains_key(provider)
    }

    pub fn providers(&self) -> impl Iterator<Item = &PeerId> {
        self.order.iter()
    }

    /// Checks `advert` against the accept rule and, if it passes, stores it (or removes
    /// its provider when it is a withdrawal).
    pub fn insert(&mut self, advert: Verified<Advertisement>, now_unix_ms: u64) -> Result<InsertOutcome, InsertError> {
        let provider = advert.body().provider;
        let delegation = self.check(advert.body(), now_unix_ms)?;
        let existed = self.remove_live(&provider).is_some();
        if advert.body().withdrawn {
            self.tombstones.insert(provider, (advert.body().seq, advert.body().expires_at_unix_ms));
            return Ok(InsertOutcome::Withdrawn);
        }
        self.tombstones.remove(&provider);
        if let Some(d) = delegation {
            // Key rotation: the owner's node keys this delegation replaces are gone.
            for old in &d.replaces {
                if self.owners.get(old) == Some(&d.owner) {
                    self.remove_live(old);
                }
                self.revoked.insert((d.owner, *old), d.not_after_unix_ms);
            }
            self.owners.insert(provider, d.owner);
        }
        self.add_live(Arc::new(advert));
        Ok(if existed { InsertOutcome::Replaced } else { InsertOutcome::Added })
    }

    /// The owner that delegated to `provider`, if its live advert carries a delegation.
    pub fn owner_of(&self, provider: &PeerId) -> Option<PeerId> {
        self.owners.get(provider).copied()
    }

    /// Checks the accept rule without storing (gossip validation uses it to decide
    /// Accept / Reject / Ignore before forwarding).
    /// Returns the advert's checked delegation, if it has one.
    pub fn check(
        &self,
        advert: &Advertisement,
        now_unix_ms: u64,
    ) -> Result<Option<peervm_protocol::Delegation>, InsertError> {
        if self.blocked.contains(&advert.provider) {
            return Err(InsertError::Blocked(advert.provider));
        }
        advert.check_acceptable(now_unix_ms, self.held_seq(&advert.provider))?;
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

    /// Removes adverts that expired by `now` and tombstones that no longer matter.
    /// Returns the providers removed.
    pub fn sweep(&mut self, now_unix_ms: u64) -> Vec<PeerId> {
        let expired: Vec<PeerId> =
            self.expiry.iter().take_while(|(at, _)| *at <= now_unix_ms).map(|(_, p)| *p).collect();
        for p in &expired {
            self.remove_live(p);
        }
        // Any advert older than a tombstone expired no later than the tombstone's own
        // expiry plus the maximum lifetime; after that the tombstone is dead weight.
        let horizon = peervm_protocol::advert::MAX_ADVERT_LIFETIME_MS;
        self.tombstones.retain(|_, (_, exp)| exp.saturating_add(horizon) > now_unix_ms);
        self.revoked.retain(|_, until| *until > now_unix_ms);
        expired
    }

    /// Blocks a provider: its advert is removed and no later one is accepted.
    pub fn block(&mut self, provider: PeerId) -> bool {
        self.remove_live(&provider);
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

        // A bounded max-heap keeps the `limit` cheapest without sorting everything.
        // Entries are (price, table index): the provider id is only read for the winners.
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
                    s.images_overflow && s.advert.body().images.iter().any(|i| Some(&i.name) == filter.image.as_ref())
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
            if !filter.exclude.is_empty() || filter.owner.is_some() {
                let provider = &s.advert.body().provider;
                let owner = self.owners.get(provider);
                if filter.exclude.contains(provider)
                    || owner.is_some_and(|o| filter.exclude.contains(o))
                    || filter.owner.is_some_and(|want| owner != Some(&want))
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
        let mut out: Vec<Offer> = heap
            .into_iter()
            .map(|(price, index)| Offer { price_per_hour_micros: price, advert: self.table[index].advert.clone() })
            .collect();
        out.sort_unstable_by(|a, b| {
            (a.price_per_hour_micros, a.advert.body().provider)
                .cmp(&(b.price_per_hour_micros, b.advert.body().provider))
        });
        out
    }

    /// A page of adverts for the sync protocol: providers after `after` in id order,
    /// up to `max_items` and `max_bytes` of envelopes. Returns the envelopes and the
    /// cursor of the next page (None when this was the last).
    pub fn page(
        &self,
        after: Option<&PeerId>,
        max_items: usize,
        max_bytes: usize,
        now_unix_ms: u64,
    ) -> (Vec<Vec<u8>>, Option<PeerId>) {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let iter: Box<dyn Iterator<Item = &PeerId>> = match after {
            Some(a) => Box::new(self.order.range((std::ops::Bound::Excluded(*a), std::ops::Bound::Unbounded))),
            None => Box::new(self.order.iter()),
        };
        let mut last = None;
        for p in iter {
            let Some(a) = self.get(p) else { continue };
            if a.body().expires_at_unix_ms <= now_unix_ms {
                continue;
            }
            let env = a.to_bytes();
            if out.len() >= max_items || bytes + env.len() > max_bytes {
                return (out, last);
            }
            bytes += env.len();
            out.push(env);
            last = Some(*p);
        }
        (out, None)
    }

    fn add_live(&mut self, advert: StoredAdvert) {
        let b = advert.body();
        let p = b.provider;
        let mut images = 0u64;
        let mut images_overflow = false;
        for img in &b.images {
            match self.images.intern(&img.name) {
                id @ 0..=63 => images |= 1 << id,
                _ => images_overflow = true,
            }
        }
        let summary = Summary {
            advert: advert.clone(),
            expires_at_unix_ms: b.expires_at_unix_ms,
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
            images_overflow,
        };
        self.expiry.insert((b.expires_at_unix_ms, p));
        self.order.insert(p);
        self.table.push(summary);
        self.live.insert(p, (self.table.len() - 1, advert));
    }

    fn remove_live(&mut self, p: &PeerId) -> Option<StoredAdvert> {
        self.owners.remove(p);
        let (index, advert) = self.live.remove(p)?;
        self.expiry.remove(&(advert.body().expires_at_unix_ms, *p));
        self.order.remove(p);
        self.table.swap_remove(index);
        if let Some(moved) = self.table.get(index)
            && let Some(entry) = self.live.get_mut(&moved.advert.body().provider)
        {
            entry.0 = index;
        }
        Some(advert)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peervm_protocol::samples;

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
        let ids = |v: Vec<Offer>| v.into_iter().map(|o| o.advert.body().provider).collect::<Vec<_>>();
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
        let ids = |v: Vec<Offer>| v.into_iter().map(|o| o.advert.body().provider).collect::<Vec<_>>();
        let at_least = |n| OfferFilter { min_exposed_ports: Some(n), ..Default::default() };
        assert_eq!(ids(s.query(&at_least(0), NOW, 0)), vec![none, four]);
        assert_eq!(ids(s.query(&at_least(1), NOW, 0)), vec![four]);
        assert_eq!(ids(s.query(&at_least(4), NOW, 0)), vec![four]);
        assert!(s.query(&at_least(5), NOW, 0).is_empty());
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
}
