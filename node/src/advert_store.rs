//! `AdvertStore`: the verified adverts a node holds, one live advert per provider.
//!
//! The accept rule (DESIGN section 5) is applied on every insert, whatever the source
//! (gossip, sync, the node's own advert). A withdrawn advert removes its provider at
//! once and leaves a tombstone with its seq, so older adverts still in flight cannot
//! bring the provider back. Expired adverts are removed by [`AdvertStore::sweep`].
//!
//! Indexes answer the requestor's filters without scanning everything: free vCPUs,
//! memory and disk are kept in ordered sets (range queries), region, accelerator and
//! image in hash sets; a query starts from its most selective index.

use std::collections::{BTreeSet, BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

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
    /// Providers to leave out (blocked by this requestor).
    pub exclude: HashSet<PeerId>,
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

    fn matches(&self, a: &Advertisement) -> bool {
        let free = &a.resources.free;
        self.min_vcpus.is_none_or(|v| free.vcpus >= v)
            && self.min_memory_mib.is_none_or(|m| free.memory_mib >= m)
            && self.min_disk_gib.is_none_or(|d| free.disk_gib >= d)
            && self.region.as_ref().is_none_or(|r| &a.region == r)
            && self.accel.is_none_or(|x| a.hypervisor.accel == x)
            && self.image.as_ref().is_none_or(|i| a.images.iter().any(|img| &img.name == i))
            && self.currency.as_ref().is_none_or(|c| &a.pricing.currency == c)
            && !self.exclude.contains(&a.provider)
    }
}

/// An advert that matched a query, with its price for the filter's spec.
#[derive(Debug, Clone)]
pub struct Offer {
    pub price_per_hour_micros: u64,
    pub advert: StoredAdvert,
}

#[derive(Default)]
pub struct AdvertStore {
    live: HashMap<PeerId, StoredAdvert>,
    /// Seq and expiry of withdrawn providers, so stale adverts cannot resurrect them.
    tombstones: HashMap<PeerId, (u64, u64)>,
    /// (expires_at, provider) of live adverts, for the sweep.
    expiry: BTreeSet<(u64, PeerId)>,
    /// Ordered provider ids, for stable sync paging.
    order: BTreeSet<PeerId>,
    by_vcpus: BTreeSet<(u32, PeerId)>,
    by_memory: BTreeSet<(u64, PeerId)>,
    by_disk: BTreeSet<(u64, PeerId)>,
    by_region: HashMap<String, HashSet<PeerId>>,
    by_accel: HashMap<Accel, HashSet<PeerId>>,
    by_image: HashMap<String, HashSet<PeerId>>,
    /// Providers this node refuses to store, show or forward (incident response).
    blocked: HashSet<PeerId>,
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
        self.live.get(provider).map(|a| a.body().seq).or_else(|| self.tombstones.get(provider).map(|(seq, _)| *seq))
    }

    pub fn get(&self, provider: &PeerId) -> Option<&StoredAdvert> {
        self.live.get(provider)
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
        self.check(advert.body(), now_unix_ms)?;
        let existed = self.remove_live(&provider).is_some();
        if advert.body().withdrawn {
            self.tombstones.insert(provider, (advert.body().seq, advert.body().expires_at_unix_ms));
            return Ok(InsertOutcome::Withdrawn);
        }
        self.tombstones.remove(&provider);
        self.add_live(Arc::new(advert));
        Ok(if existed { InsertOutcome::Replaced } else { InsertOutcome::Added })
    }

    /// Checks the accept rule without storing (gossip validation uses it to decide
    /// Accept / Reject / Ignore before forwarding).
    pub fn check(&self, advert: &Advertisement, now_unix_ms: u64) -> Result<(), InsertError> {
        if self.blocked.contains(&advert.provider) {
            return Err(InsertError::Blocked(advert.provider));
        }
        advert.check_acceptable(now_unix_ms, self.held_seq(&advert.provider))?;
        Ok(())
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

    /// Adverts matching `filter` that are live at `now`, cheapest first (ties by
    /// provider id), at most `limit` of them (0 = all).
    pub fn query(&self, filter: &OfferFilter, now_unix_ms: u64, limit: usize) -> Vec<Offer> {
        let spec = filter.price_spec();
        let limit = if limit == 0 { usize::MAX } else { limit };
        // A bounded max-heap keeps the `limit` cheapest without sorting everything.
        let mut heap: BinaryHeap<(u64, PeerId)> = BinaryHeap::new();
        let mut consider = |p: &PeerId| {
            let Some(a) = self.live.get(p) else { return };
            let body = a.body();
            if body.expires_at_unix_ms <= now_unix_ms || !filter.matches(body) {
                return;
            }
            let Some(price) = body.price_for(&spec) else { return };
            if filter.max_price_micros.is_some_and(|max| price > max) {
                return;
            }
            if heap.len() < limit {
                heap.push((price, *p));
            } else if let Some(top) = heap.peek()
                && (price, *p) < *top
            {
                heap.pop();
                heap.push((price, *p));
            }
        };
        match self.candidates(filter) {
            Candidates::Set(set) => set.iter().for_each(&mut consider),
            Candidates::Vcpus(v) => self.by_vcpus.range((v, min_peer())..).for_each(|(_, p)| consider(p)),
            Candidates::Memory(m) => self.by_memory.range((m, min_peer())..).for_each(|(_, p)| consider(p)),
            Candidates::Disk(d) => self.by_disk.range((d, min_peer())..).for_each(|(_, p)| consider(p)),
            Candidates::All => self.order.iter().for_each(&mut consider),
            Candidates::None => {}
        }
        let mut out: Vec<(u64, PeerId)> = heap.into_vec();
        out.sort_unstable();
        out.into_iter()
            .filter_map(|(price, p)| {
                self.live.get(&p).map(|a| Offer { price_per_hour_micros: price, advert: a.clone() })
            })
            .collect()
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
            let Some(a) = self.live.get(p) else { continue };
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

    fn candidates(&self, f: &OfferFilter) -> Candidates<'_> {
        // Categorical filters first: their sets are exact and their sizes known.
        let mut best: Option<&HashSet<PeerId>> = None;
        let wanted: [Option<Option<&HashSet<PeerId>>>; 3] = [
            f.region.as_ref().map(|r| self.by_region.get(r)),
            f.accel.as_ref().map(|a| self.by_accel.get(a)),
            f.image.as_ref().map(|i| self.by_image.get(i)),
        ];
        for filter in wanted.into_iter().flatten() {
            match filter {
                // A categorical value nobody offers: nothing can match.
                None => return Candidates::None,
                Some(set) => {
                    if best.is_none_or(|b| set.len() < b.len()) {
                        best = Some(set);
                    }
                }
            }
        }
        if let Some(set) = best {
            return Candidates::Set(set);
        }
        // Otherwise the numeric filter that cuts away the largest share, judged by the
        // threshold's position in its index (a cheap estimate: the index minimum and
        // maximum bound the range).
        let share =
            |lo: u64, hi: u64, v: u64| if hi <= lo { 0.0 } else { (v.saturating_sub(lo)) as f64 / (hi - lo) as f64 };
        let mut choice = Candidates::All;
        let mut cut = 0.0;
        if let (Some(v), Some((lo, _)), Some((hi, _))) = (f.min_vcpus, self.by_vcpus.first(), self.by_vcpus.last()) {
            let s = share(u64::from(*lo), u64::from(*hi), u64::from(v));
            if s > cut {
                cut = s;
                choice = Candidates::Vcpus(v);
            }
        }
        if let (Some(v), Some((lo, _)), Some((hi, _))) =
            (f.min_memory_mib, self.by_memory.first(), self.by_memory.last())
        {
            let s = share(*lo, *hi, v);
            if s > cut {
                cut = s;
                choice = Candidates::Memory(v);
            }
        }
        if let (Some(v), Some((lo, _)), Some((hi, _))) = (f.min_disk_gib, self.by_disk.first(), self.by_disk.last())
            && share(*lo, *hi, v) > cut
        {
            choice = Candidates::Disk(v);
        }
        choice
    }

    fn add_live(&mut self, advert: StoredAdvert) {
        let b = advert.body();
        let p = b.provider;
        self.expiry.insert((b.expires_at_unix_ms, p));
        self.order.insert(p);
        self.by_vcpus.insert((b.resources.free.vcpus, p));
        self.by_memory.insert((b.resources.free.memory_mib, p));
        self.by_disk.insert((b.resources.free.disk_gib, p));
        self.by_region.entry(b.region.clone()).or_default().insert(p);
        self.by_accel.entry(b.hypervisor.accel).or_default().insert(p);
        for img in &b.images {
            self.by_image.entry(img.name.clone()).or_default().insert(p);
        }
        self.live.insert(p, advert);
    }

    fn remove_live(&mut self, p: &PeerId) -> Option<StoredAdvert> {
        let advert = self.live.remove(p)?;
        let b = advert.body();
        self.expiry.remove(&(b.expires_at_unix_ms, *p));
        self.order.remove(p);
        self.by_vcpus.remove(&(b.resources.free.vcpus, *p));
        self.by_memory.remove(&(b.resources.free.memory_mib, *p));
        self.by_disk.remove(&(b.resources.free.disk_gib, *p));
        remove_from(&mut self.by_region, &b.region, p);
        remove_from(&mut self.by_accel, &b.hypervisor.accel, p);
        for img in &b.images {
            remove_from(&mut self.by_image, &img.name, p);
        }
        Some(advert)
    }
}

enum Candidates<'a> {
    Set(&'a HashSet<PeerId>),
    Vcpus(u32),
    Memory(u64),
    Disk(u64),
    All,
    None,
}

fn remove_from<K: std::hash::Hash + Eq>(index: &mut HashMap<K, HashSet<PeerId>>, key: &K, p: &PeerId) {
    if let Some(set) = index.get_mut(key) {
        set.remove(p);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// The smallest PeerId in the total order, for the start of an index range.
fn min_peer() -> PeerId {
    // Identity multihash of empty digest: code 0, length 0.
    PeerId::from_bytes(&[0, 0]).unwrap_or_else(|_| unreachable!("empty identity multihash is a valid PeerId"))
}
