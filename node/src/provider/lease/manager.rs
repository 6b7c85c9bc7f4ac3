//! The lease manager: one handle, cloned into every task, over the provider's lease store,
//! its hypervisor and its terms. What it decides lives beside it, one module per idea
//! (see `mod.rs`); this file wires them: construction, the run loop and the shared state.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use libp2p::PeerId;
use peervm_protocol::{LeaseId, LeaseState, ResourceAmounts, SigningKey};
use peervm_vmm::Hypervisor;
use tokio::sync::{mpsc, watch};

use super::abuse::{AbuseConfig, LeaseWatch};
use super::admission;
use super::db::{DbError, LeaseRecord, ProviderDb};
use super::terms::LeaseTerms;
use crate::clock::{Clock, SystemClock};
use crate::metrics::Metrics;
use crate::network::{InboundLease, NodeClient};
use crate::provider::audit::AuditLog;

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Vmm(#[from] peervm_vmm::VmmError),
    #[error("cannot sign a lease reply: {0}")]
    Sign(#[from] peervm_protocol::SignError),
    #[error("unknown lease {0}")]
    UnknownLease(LeaseId),
    #[error("lease {id} is {state}, not running")]
    NotRunning { id: LeaseId, state: LeaseState },
}

pub struct LeaseManager<H: Hypervisor + Clone + 'static> {
    pub(super) inner: Arc<Inner<H>>,
}

impl<H: Hypervisor + Clone + 'static> Clone for LeaseManager<H> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

pub(super) struct Inner<H> {
    pub key: SigningKey,
    pub me: PeerId,
    pub db: ProviderDb,
    pub hv: H,
    /// What the provider offers now: swapped whole by [`LeaseManager::set_terms`] when the
    /// operator reloads the config (docs/architecture.md, "Reload"); a request is decided
    /// by one snapshot, so it never mixes old and new terms.
    pub terms: RwLock<Arc<LeaseTerms>>,
    pub capacity: watch::Sender<ResourceAmounts>,
    pub locked: AtomicBool,
    pub metrics: Arc<Metrics>,
    pub network: Option<NodeClient>,
    /// Capacity check and admission happen under this lock, so two requests cannot both
    /// take the last free resources.
    pub admission: tokio::sync::Mutex<()>,
    /// Leases being ended now (by expiry, the requestor or the operator): ended once.
    pub ending: Mutex<HashSet<LeaseId>>,
    /// Leases already warned about for sitting at their memory limit.
    pub memory_warned: Mutex<HashSet<LeaseId>>,
    /// Abuse detection's settings (swapped whole by a reload) and what it remembers of
    /// each running lease (`abuse.rs`).
    pub abuse: RwLock<Arc<AbuseConfig>>,
    pub abuse_watch: Mutex<HashMap<LeaseId, LeaseWatch>>,
    /// Held while the usage monitor runs: a tick that finds it still running skips, so
    /// two rounds never interleave their samples.
    pub monitoring: tokio::sync::Mutex<()>,
    pub audit: Option<Arc<AuditLog>>,
    /// Requestors named by block lists this provider trusts.
    pub list_blocked: Option<crate::network::ListBlocked>,
    /// Every time the manager decides or records by (freshness, expiry, transitions).
    pub clock: Arc<dyn Clock>,
}

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    pub fn new(
        key: SigningKey,
        db: ProviderDb,
        hv: H,
        terms: LeaseTerms,
        capacity: watch::Sender<ResourceAmounts>,
        metrics: Arc<Metrics>,
        network: Option<NodeClient>,
    ) -> Self {
        let me = key.peer_id();
        LeaseManager {
            inner: Arc::new(Inner {
                key,
                me,
                db,
                hv,
                terms: RwLock::new(Arc::new(terms)),
                capacity,
                locked: AtomicBool::new(false),
                metrics,
                network,
                admission: tokio::sync::Mutex::new(()),
                ending: Mutex::new(HashSet::new()),
                memory_warned: Mutex::new(HashSet::new()),
                abuse: RwLock::new(Arc::new(AbuseConfig::default())),
                abuse_watch: Mutex::new(HashMap::new()),
                monitoring: tokio::sync::Mutex::new(()),
                audit: None,
                list_blocked: None,
                clock: Arc::new(SystemClock),
            }),
        }
    }

    /// Records every lease message, its outcome and the operator's actions in `audit`.
    /// Call before the manager is cloned or run.
    pub fn with_audit(mut self, audit: Arc<AuditLog>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.audit = Some(audit);
        }
        self
    }

    /// Also denies requestors that a trusted signed block list names.
    pub fn with_list_blocked(mut self, list_blocked: crate::network::ListBlocked) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.list_blocked = Some(list_blocked);
        }
        self
    }

    /// Reads the time from `clock` instead of the system clock (tests fix and advance it).
    /// Call before the manager is cloned or run.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.clock = clock;
        }
        self
    }

    /// Now, by the manager's clock, in milliseconds since the Unix epoch.
    pub(super) fn now(&self) -> u64 {
        self.inner.clock.now_unix_ms()
    }

    pub(super) fn audit(&self, event: &str, fields: serde_json::Value) {
        if let Some(a) = &self.inner.audit {
            a.record(event, fields);
        }
    }

    pub fn db(&self) -> &ProviderDb {
        &self.inner.db
    }

    /// The terms in force now (a snapshot: a reload swaps them, it never edits them).
    pub fn terms(&self) -> Arc<LeaseTerms> {
        self.inner.terms.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the terms for every request decided from now on; running leases keep the
    /// terms they were granted under (their price and end are in their records). Free
    /// capacity is recomputed against the new total, so the advert follows.
    pub fn set_terms(&self, terms: LeaseTerms) -> Result<ResourceAmounts, DbError> {
        *self.inner.terms.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(terms);
        self.refresh_capacity()
    }

    pub fn network(&self) -> Option<&NodeClient> {
        self.inner.network.as_ref()
    }

    pub fn list(&self, limit: usize) -> Result<Vec<LeaseRecord>, LeaseError> {
        Ok(self.inner.db.list(limit)?)
    }

    /// While locked, the manager accepts no new lease (running ones go on).
    pub fn set_locked(&self, locked: bool) {
        self.inner.locked.store(locked, Ordering::SeqCst);
    }

    pub fn is_locked(&self) -> bool {
        self.inner.locked.load(Ordering::SeqCst)
    }

    /// Serves inbound lease messages and runs the timers (expiry, nonce pruning, usage
    /// monitoring and abuse detection, every `[abuse] interval_secs`) until the inbox
    /// closes.
    pub async fn run(self, mut inbox: mpsc::Receiver<InboundLease>) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let monitor_timer = |period: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut period = self.abuse_config().interval;
        let mut monitor = monitor_timer(period);
        loop {
            tokio::select! {
                inbound = inbox.recv() => {
                    let Some(inbound) = inbound else { break };
                    let this = self.clone();
                    tokio::spawn(async move {
                        let InboundLease { peer, message, throttled, reply } = inbound;
                        let bytes = this.handle(peer, &message, throttled).await;
                        reply.send(bytes).await;
                    });
                }
                _ = expiry.tick() => {
                    // the ends run on their own tasks; the loop goes on serving
                    let _ = self.end_expired();
                }
                _ = monitor.tick() => {
                    let this = self.clone();
                    tokio::spawn(async move { this.monitor().await });
                    // a reload may have changed the interval
                    let now = self.abuse_config().interval;
                    if now != period {
                        period = now;
                        monitor = monitor_timer(period);
                    }
                }
            }
        }
    }

    /// Free capacity as last computed (what the advert shows).
    pub fn free_capacity_now(&self) -> ResourceAmounts {
        *self.inner.capacity.borrow()
    }

    /// Recomputes free capacity from the leases that hold resources; the advert follows.
    pub fn refresh_capacity(&self) -> Result<ResourceAmounts, DbError> {
        let free = self.free_capacity()?;
        self.inner.capacity.send_if_modified(|cur| {
            let changed = *cur != free;
            *cur = free;
            changed
        });
        Ok(free)
    }

    pub(super) fn free_capacity(&self) -> Result<ResourceAmounts, DbError> {
        let active = self.inner.db.active()?;
        Ok(admission::free_capacity(self.terms().total, active.iter().map(|r| &r.spec)))
    }
}

/// The hypervisor's name for a lease: the same 16 bytes.
pub(super) fn vmm_id(id: &LeaseId) -> peervm_vmm::LeaseId {
    peervm_vmm::LeaseId::from_bytes(id.0)
}
