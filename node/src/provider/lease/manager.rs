//! The provider's lease manager: checks every request, persists each state change before
//! acting on it, drives the hypervisor, answers with signed replies, ends leases at their
//! time, and recovers after a restart (DESIGN sections 7 and 9).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use peervm_protocol::advert::hourly_price_micros;
use peervm_protocol::lease::{MAX_REQUEST_VALIDITY_MS, payload_digest};
use peervm_protocol::{
    ControlAction, DenyReason, LeaseControl, LeaseId, LeaseReply, LeaseRequest, LeaseState, LeaseUsage, Payload,
    Pricing, ReplyOutcome, ResourceAmounts, Signed, SigningKey, SshAccess, VerifyError,
};
use peervm_vmm::{AuthorizedKey, EgressPolicy, GuestImage, HostKeySeed, Hypervisor, StartStage, VmSpec};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use super::db::{DbError, LeaseRecord, ProviderDb};
use crate::clock::now_unix_ms;
use crate::metrics::Metrics;
use crate::network::lease_wire::LeaseMessage;
use crate::network::{InboundLease, NodeClient};
use crate::provider::audit::AuditLog;

/// Denial details are for humans; they are capped so a reply always fits its size cap.
const MAX_DETAIL: usize = 300;
/// A seen nonce is kept this long past its message's validity, covering clock skew.
const NONCE_GRACE_MS: u64 = peervm_protocol::advert::MAX_CLOCK_SKEW_MS + 60_000;

/// What the manager offers and enforces: the provider's config, resolved.
#[derive(Debug, Clone)]
pub struct LeaseTerms {
    pub total: ResourceAmounts,
    pub pricing: Pricing,
    /// Offered images by name, verified at start; the advertised sha256 is the manifest's.
    pub images: HashMap<String, Arc<GuestImage>>,
    /// The host requestors connect to.
    pub ssh_host: String,
    /// Most leases at once (network slots).
    pub max_leases: u32,
    pub egress: EgressPolicy,
    pub min_lease_secs: u64,
    pub max_lease_secs: u64,
}

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
    #[error("lease {id} is {state:?}, not running")]
    NotRunning { id: LeaseId, state: LeaseState },
}

/// What `recover` found and did at start.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub adopted: Vec<LeaseId>,
    pub failed: Vec<LeaseId>,
    pub ended: Vec<LeaseId>,
    pub removed_objects: Vec<String>,
}

/// A denial on its way to becoming a signed reply.
#[derive(Debug)]
struct Denial {
    reason: DenyReason,
    detail: String,
}

fn deny(reason: DenyReason, detail: impl Into<String>) -> Denial {
    Denial { reason, detail: detail.into() }
}

/// Who a reply goes to and what it answers.
#[derive(Clone, Copy)]
struct ReplyTo {
    lease_id: LeaseId,
    requestor: PeerId,
    digest: [u8; 32],
}

pub struct LeaseManager<H: Hypervisor + Clone + 'static> {
    inner: Arc<Inner<H>>,
}

impl<H: Hypervisor + Clone + 'static> Clone for LeaseManager<H> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

struct Inner<H> {
    key: SigningKey,
    me: PeerId,
    db: ProviderDb,
    hv: H,
    terms: LeaseTerms,
    capacity: watch::Sender<ResourceAmounts>,
    locked: AtomicBool,
    metrics: Arc<Metrics>,
    network: Option<NodeClient>,
    /// Capacity check and admission happen under this lock, so two requests cannot both
    /// take the last free resources.
    admission: tokio::sync::Mutex<()>,
    /// Leases being ended now (by expiry, the requestor or the operator): ended once.
    ending: Mutex<HashSet<LeaseId>>,
    /// Leases already warned about for sitting at their memory limit.
    memory_warned: Mutex<HashSet<LeaseId>>,
    audit: Option<Arc<AuditLog>>,
    /// Requestors named by block lists this provider trusts.
    list_blocked: Option<crate::network::ListBlocked>,
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
                terms,
                capacity,
                locked: AtomicBool::new(false),
                metrics,
                network,
                admission: tokio::sync::Mutex::new(()),
                ending: Mutex::new(HashSet::new()),
                memory_warned: Mutex::new(HashSet::new()),
                audit: None,
                list_blocked: None,
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

    fn audit(&self, event: &str, fields: serde_json::Value) {
        if let Some(a) = &self.inner.audit {
            a.record(event, fields);
        }
    }

    pub fn db(&self) -> &ProviderDb {
        &self.inner.db
    }

    pub fn terms(&self) -> &LeaseTerms {
        &self.inner.terms
    }

    /// While locked, the manager accepts no new lease (running ones go on).
    pub fn set_locked(&self, locked: bool) {
        self.inner.locked.store(locked, Ordering::SeqCst);
    }

    pub fn is_locked(&self) -> bool {
        self.inner.locked.load(Ordering::SeqCst)
    }

    /// At start, before serving: leases whose start was interrupted are failed, running
    /// leases whose guest survived are re-adopted, expired ones are ended, and everything
    /// else the hypervisor holds is cleaned up.
    pub async fn recover(&self) -> Result<RecoveryReport, LeaseError> {
        let now = now_unix_ms();
        let mut report = RecoveryReport::default();
        let active = self.inner.db.active()?;
        // Only running, unexpired leases keep their guest; reconcile cleans the rest.
        let vmm_ids: Vec<peervm_vmm::LeaseId> = active
            .iter()
            .filter(|r| r.state == LeaseState::Running && r.ends_at_unix_ms > now)
            .map(|r| vmm_id(&r.id))
            .collect();
        let reconciled = self.inner.hv.reconcile(&vmm_ids).await?;
        let adopted: HashSet<[u8; 16]> = reconciled.adopted.iter().map(|vm| *vm.lease_id.as_bytes()).collect();
        report.removed_objects = reconciled.removed_objects;
        for record in active {
            if adopted.contains(&record.id.0) {
                if record.isolated {
                    // the restart re-opened its port: cut it off again
                    self.inner.hv.isolate(vmm_id(&record.id)).await?;
                }
                report.adopted.push(record.id);
                continue;
            }
            let (state, detail) = match record.state {
                LeaseState::Running if record.ends_at_unix_ms <= now => {
                    (LeaseState::Ended, "expired while the provider was down")
                }
                LeaseState::Stopping => (LeaseState::Ended, "ended; teardown finished after a provider restart"),
                LeaseState::Running => (LeaseState::Failed, "the guest did not survive a provider restart"),
                _ => (LeaseState::Failed, "the start was interrupted by a provider restart"),
            };
            self.inner.db.set_state(&record.id, state, detail, now)?;
            if state == LeaseState::Ended {
                report.ended.push(record.id);
            } else {
                report.failed.push(record.id);
            }
        }
        for failure in reconciled.failed {
            tracing::error!(%failure, "recovery could not remove an object");
        }
        self.refresh_capacity()?;
        Ok(report)
    }

    /// Serves inbound lease messages and runs the timers (expiry, nonce pruning, usage
    /// monitoring) until the inbox closes.
    pub async fn run(self, mut inbox: mpsc::Receiver<InboundLease>) {
        let mut expiry = tokio::time::interval(Duration::from_secs(1));
        expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut monitor = tokio::time::interval(Duration::from_secs(10));
        monitor.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                _ = expiry.tick() => self.end_expired(),
                _ = monitor.tick() => {
                    let this = self.clone();
                    tokio::spawn(async move { this.monitor().await });
                }
            }
        }
    }

    /// Answers one lease message with a signed reply.
    pub async fn handle(&self, peer: PeerId, message: &LeaseMessage, throttled: bool) -> Vec<u8> {
        let (event, (to, outcome)) = match message {
            LeaseMessage::Request(env) => ("lease_request", self.on_request(peer, &env.0, throttled).await),
            LeaseMessage::Control(env) => ("lease_control", self.on_control(peer, &env.0, throttled).await),
        };
        let label = match &outcome {
            Ok(ReplyOutcome::Granted { .. }) => "granted",
            Ok(ReplyOutcome::Status { .. }) => "status",
            Ok(ReplyOutcome::Extended { .. }) => "extended",
            Ok(ReplyOutcome::Terminated { .. }) => "terminated",
            Ok(ReplyOutcome::Denied { reason, .. }) => reason.as_str(),
            Err(d) => d.reason.as_str(),
        };
        self.inner.metrics.lease_message(label);
        // Throttled messages are counted in metrics, not written one by one: a flood
        // must not become a flood of the audit log.
        if !throttled {
            self.audit(
                event,
                serde_json::json!({
                    "peer": peer.to_string(),
                    "requestor": to.requestor.to_string(),
                    "lease": to.lease_id.to_hex(),
                    "outcome": if outcome.is_ok() { label } else { "denied" },
                    "reason": outcome.as_ref().err().map(|d| d.reason.as_str()),
                    "detail": outcome.as_ref().err().map(|d| d.detail.as_str()),
                }),
            );
        }
        let outcome = outcome.unwrap_or_else(|d| {
            let mut detail = d.detail;
            truncate(&mut detail, MAX_DETAIL);
            ReplyOutcome::Denied { reason: d.reason, detail }
        });
        match self.sign_reply(to, outcome) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Signing our own well-formed reply cannot fail short of a bug; say so.
                tracing::error!(error = %e, "cannot sign a lease reply");
                Vec::new()
            }
        }
    }

    fn sign_reply(&self, to: ReplyTo, outcome: ReplyOutcome) -> Result<Vec<u8>, LeaseError> {
        let reply = LeaseReply {
            version: peervm_protocol::lease::LEASE_VERSION,
            lease_id: to.lease_id,
            provider: self.inner.me,
            requestor: to.requestor,
            in_reply_to: to.digest,
            issued_at_unix_ms: now_unix_ms(),
            outcome,
        };
        Ok(Signed::sign(&self.inner.key, &reply)?.to_bytes())
    }

    /// Opens a signed message: the reply address comes from the verified body, or, when
    /// it does not verify, from the transport peer with an all-zero lease id.
    async fn open<T: Payload>(
        &self,
        peer: PeerId,
        bytes: &[u8],
        throttled: bool,
        ids: impl Fn(&T) -> (LeaseId, PeerId),
    ) -> Result<(ReplyTo, T), (ReplyTo, Denial)> {
        let unknown = |digest| ReplyTo { lease_id: LeaseId([0; 16]), requestor: peer, digest };
        let signed = match Signed::<T>::from_bytes(bytes) {
            Ok(s) => s,
            Err(e) => {
                let to = unknown(Sha256::digest(bytes).into());
                if throttled {
                    return Err((to, deny(DenyReason::RateLimited, "too many lease messages; slow down")));
                }
                self.penalise(peer).await;
                return Err((to, deny(DenyReason::Malformed, e.to_string())));
            }
        };
        let digest = payload_digest(&signed);
        if throttled {
            return Err((unknown(digest), deny(DenyReason::RateLimited, "too many lease messages; slow down")));
        }
        match signed.verify() {
            Ok(verified) => {
                let (signed, body) = verified.into_parts();
                drop(signed);
                let (lease_id, requestor) = ids(&body);
                Ok((ReplyTo { lease_id, requestor, digest }, body))
            }
            Err(e @ VerifyError::UnsupportedVersion { .. }) => {
                Err((unknown(digest), deny(DenyReason::UnsupportedVersion, e.to_string())))
            }
            Err(e) => {
                self.penalise(peer).await;
                let reason = match e {
                    VerifyError::Decode(_) => DenyReason::Malformed,
                    _ => DenyReason::BadSignature,
                };
                Err((unknown(digest), deny(reason, e.to_string())))
            }
        }
    }

    async fn penalise(&self, peer: PeerId) {
        if let Some(network) = &self.inner.network {
            let _ = network.report_invalid(peer).await;
        }
    }

    async fn on_request(&self, peer: PeerId, bytes: &[u8], throttled: bool) -> (ReplyTo, Result<ReplyOutcome, Denial>) {
        let (to, request) = match self.open::<LeaseRequest>(peer, bytes, throttled, |r| (r.lease_id, r.requestor)).await
        {
            Ok(v) => v,
            Err((to, d)) => return (to, Err(d)),
        };
        let result = self.admit_and_start(&request, bytes, to.digest).await;
        if let Err(d) = &result {
            tracing::info!(lease = %request.lease_id, requestor = %request.requestor, reason = %d.reason,
                detail = %d.detail, "lease request denied");
        }
        (to, result)
    }

    /// The checks of DESIGN section 7 in order, then admission, then the guest.
    fn check_request(&self, req: &LeaseRequest, now: u64) -> Result<(Arc<GuestImage>, u64), Denial> {
        let inner = &self.inner;
        if self.is_locked() {
            return Err(deny(DenyReason::Locked, "this provider accepts no new leases right now"));
        }
        req.check_fresh(&inner.me, now).map_err(|e| deny(e.deny_reason(), e.to_string()))?;
        if inner.db.get(&req.lease_id).map_err(internal)?.is_some() {
            return Err(deny(DenyReason::Replay, format!("lease id {} was already used", req.lease_id)));
        }
        if inner.db.is_blocked(&req.requestor).map_err(internal)? {
            return Err(deny(DenyReason::Blocked, "this requestor is blocked by the provider"));
        }
        if inner.list_blocked.as_ref().is_some_and(|l| l.read().map(|s| s.contains(&req.requestor)).unwrap_or(false)) {
            return Err(deny(DenyReason::Blocked, "this requestor is on a block list the provider trusts"));
        }
        req.check_well_formed().map_err(|e| deny(DenyReason::InvalidSpec, e.to_string()))?;
        let terms = &inner.terms;
        if !(terms.min_lease_secs..=terms.max_lease_secs).contains(&req.duration_secs) {
            return Err(deny(
                DenyReason::InvalidSpec,
                format!(
                    "duration {} s is outside this provider's {}..={} s",
                    req.duration_secs, terms.min_lease_secs, terms.max_lease_secs
                ),
            ));
        }
        let image = match terms.images.get(&req.spec.image_name) {
            Some(img) if img.manifest_sha256() == req.spec.image_sha256 => img.clone(),
            Some(_) => {
                return Err(deny(
                    DenyReason::UnknownImage,
                    format!("image `{}` here has a different sha256 than requested", req.spec.image_name),
                ));
            }
            None => {
                return Err(deny(DenyReason::UnknownImage, format!("no image `{}` here", req.spec.image_name)));
            }
        };
        if u32::try_from(req.spec.memory_mib).is_err() || req.spec.memory_mib < 64 {
            return Err(deny(DenyReason::InvalidSpec, "memory must be at least 64 MiB"));
        }
        let p = &terms.pricing;
        let price = hourly_price_micros(
            p.per_vcpu_hour_micros,
            p.per_memory_gib_hour_micros,
            p.per_disk_gib_hour_micros,
            &req.spec.resources(),
        )
        .ok_or_else(|| deny(DenyReason::InvalidSpec, "the requested size overflows the price"))?;
        if req.currency != p.currency || req.max_price_per_hour_micros < price {
            return Err(deny(
                DenyReason::PriceTooLow,
                format!(
                    "this size costs {} {} micro-units per hour; the request offers at most {} {}",
                    price, p.currency, req.max_price_per_hour_micros, req.currency
                ),
            ));
        }
        Ok((image, price))
    }

    async fn admit_and_start(
        &self,
        req: &LeaseRequest,
        bytes: &[u8],
        digest: [u8; 32],
    ) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let now = now_unix_ms();
        let (image, price) = self.check_request(req, now)?;
        let mut seed = zeroize::Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
        let mut record = LeaseRecord {
            id: req.lease_id,
            requestor: req.requestor,
            state: LeaseState::Requested,
            spec: req.spec.clone(),
            ssh_user: req.ssh_user.clone(),
            ssh_public_key: req.ssh_public_key,
            host_key_seed: *seed,
            slot: 0,
            price_per_hour_micros: price,
            currency: inner.terms.pricing.currency.clone(),
            requested_at_unix_ms: now,
            started_at_unix_ms: None,
            ends_at_unix_ms: now.saturating_add(req.duration_secs.saturating_mul(1000)),
            request_digest: digest,
            request: bytes.to_vec(),
            detail: String::new(),
            isolated: false,
        };
        {
            let _admission = inner.admission.lock().await;
            let free = self.free_capacity().map_err(internal)?;
            let want = req.spec.resources();
            if want.vcpus > free.vcpus || want.memory_mib > free.memory_mib || want.disk_gib > free.disk_gib {
                return Err(deny(
                    DenyReason::NoCapacity,
                    format!(
                        "free now: {} vCPU, {} MiB memory, {} GiB disk",
                        free.vcpus, free.memory_mib, free.disk_gib
                    ),
                ));
            }
            let nonce_until = req.valid_until_unix_ms.saturating_add(NONCE_GRACE_MS);
            record.slot = match inner.db.admit(&record, req.nonce, nonce_until, inner.terms.max_leases, now) {
                Ok(slot) => slot,
                Err(DbError::Replay { what }) => {
                    return Err(deny(DenyReason::Replay, format!("this request's {what} was already used")));
                }
                Err(DbError::NoSlot) => {
                    return Err(deny(DenyReason::NoCapacity, "every lease slot of this provider is taken"));
                }
                Err(e) => return Err(internal(e)),
            };
            self.refresh_capacity().map_err(internal)?;
        }
        tracing::info!(lease = %req.lease_id, requestor = %req.requestor, slot = record.slot, "lease admitted");
        self.start_guest(record, image, req.duration_secs).await
    }

    async fn start_guest(
        &self,
        record: LeaseRecord,
        image: Arc<GuestImage>,
        duration_secs: u64,
    ) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let id = record.id;
        inner.db.set_state(&id, LeaseState::Provisioning, "", now_unix_ms()).map_err(internal)?;
        let host_key = HostKeySeed::from_bytes(record.host_key_seed);
        let host_key_raw = host_key.public_raw();
        let spec = VmSpec {
            lease_id: vmm_id(&id),
            vcpus: record.spec.vcpus,
            memory_mib: u32::try_from(record.spec.memory_mib).unwrap_or(u32::MAX),
            disk_gib: u32::try_from(record.spec.disk_gib).unwrap_or(u32::MAX),
            image,
            ssh_user: record.ssh_user.clone(),
            authorized_key: AuthorizedKey::from_ed25519(&record.ssh_public_key, "peervm-lease")
                .map_err(|e| deny(DenyReason::InvalidSpec, e.to_string()))?,
            host_key,
            network_slot: record.slot,
            egress: inner.terms.egress,
            cpu_quota: None,
            progress: None,
        };
        let (progress_tx, mut progress_rx) = watch::channel(StartStage::Provisioning);
        let spec = VmSpec { progress: Some(progress_tx), ..spec };
        // Record the move to booting as it happens, so status shows the stage.
        let db_watch = {
            let this = self.clone();
            tokio::spawn(async move {
                while progress_rx.changed().await.is_ok() {
                    if *progress_rx.borrow() == StartStage::Booting {
                        let current = this.inner.db.get(&id).ok().flatten().map(|r| r.state);
                        if current == Some(LeaseState::Provisioning) {
                            let _ = this.inner.db.set_state(&id, LeaseState::Booting, "", now_unix_ms());
                        }
                        break;
                    }
                }
            })
        };
        let started = inner.hv.start(spec).await;
        let _ = db_watch.await;
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                tracing::warn!(lease = %id, error = %e, "guest failed to start");
                let detail = format!("the guest failed to start: {e}");
                let _ = inner.db.set_state(&id, LeaseState::Failed, &detail, now_unix_ms());
                let _ = self.refresh_capacity();
                return Err(deny(DenyReason::Internal, detail));
            }
        };
        // Ended while it booted (the requestor or the operator terminated it)?
        let current = inner.db.get(&id).map_err(internal)?.map(|r| r.state);
        if current != Some(LeaseState::Provisioning) && current != Some(LeaseState::Booting) {
            self.finish_stop(id, "terminated while starting").await;
            return Err(deny(DenyReason::LeaseEnded, "the lease was terminated while its guest started"));
        }
        let started_at = now_unix_ms();
        let ends_at = started_at.saturating_add(duration_secs.saturating_mul(1000));
        inner.db.set_running(&id, started_at, ends_at, started_at).map_err(internal)?;
        inner.metrics.leases_started.inc();
        tracing::info!(lease = %id, port = vm.ssh_addr.port(), boot_ms = vm.boot_time.map(|d| d.as_millis() as u64),
            "lease running");
        Ok(ReplyOutcome::Granted {
            access: SshAccess { host: inner.terms.ssh_host.clone(), port: vm.ssh_addr.port(), user: record.ssh_user },
            host_key: host_key_raw,
            started_at_unix_ms: started_at,
            ends_at_unix_ms: ends_at,
            price_per_hour_micros: record.price_per_hour_micros,
            currency: record.currency,
        })
    }

    async fn on_control(&self, peer: PeerId, bytes: &[u8], throttled: bool) -> (ReplyTo, Result<ReplyOutcome, Denial>) {
        let (to, control) = match self.open::<LeaseControl>(peer, bytes, throttled, |c| (c.lease_id, c.requestor)).await
        {
            Ok(v) => v,
            Err((to, d)) => return (to, Err(d)),
        };
        (to, self.control(&control).await)
    }

    async fn control(&self, c: &LeaseControl) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let now = now_unix_ms();
        c.check_fresh(&inner.me, now).map_err(|e| deny(e.deny_reason(), e.to_string()))?;
        let record = inner
            .db
            .get(&c.lease_id)
            .map_err(internal)?
            .ok_or_else(|| deny(DenyReason::UnknownLease, format!("no lease {} here", c.lease_id)))?;
        if record.requestor != c.requestor {
            return Err(deny(DenyReason::NotRequestor, "only the lease's requestor may query, extend or end it"));
        }
        let nonce_until = c.valid_until_unix_ms.saturating_add(NONCE_GRACE_MS);
        match inner.db.record_nonce(&c.requestor, c.nonce, nonce_until) {
            Ok(()) => {}
            Err(DbError::Replay { .. }) => {
                return Err(deny(DenyReason::Replay, "this control message was already used"));
            }
            Err(e) => return Err(internal(e)),
        }
        match &c.action {
            ControlAction::Terminate | ControlAction::Extend { .. } if record.isolated => {
                Err(deny(DenyReason::Blocked, "the lease is held by the provider's operator for inspection"))
            }
            ControlAction::Status => {
                let usage = if record.state == LeaseState::Running { self.usage(&record.id).await } else { None };
                Ok(ReplyOutcome::Status { state: record.state, ends_at_unix_ms: record.ends_at_unix_ms, usage })
            }
            ControlAction::Extend { additional_secs } => {
                if record.state != LeaseState::Running {
                    return Err(deny(DenyReason::LeaseEnded, format!("the lease is {:?}, not running", record.state)));
                }
                let started = record.started_at_unix_ms.unwrap_or(record.requested_at_unix_ms);
                let ends_at = record.ends_at_unix_ms.saturating_add(additional_secs.saturating_mul(1000));
                let total_secs = ends_at.saturating_sub(started) / 1000;
                if *additional_secs == 0 || total_secs > inner.terms.max_lease_secs {
                    return Err(deny(
                        DenyReason::InvalidSpec,
                        format!(
                            "extension must be above 0 s and keep the lease within {} s",
                            inner.terms.max_lease_secs
                        ),
                    ));
                }
                inner.db.set_ends_at(&record.id, ends_at).map_err(internal)?;
                tracing::info!(lease = %record.id, ends_at, "lease extended");
                Ok(ReplyOutcome::Extended { ends_at_unix_ms: ends_at })
            }
            ControlAction::Terminate => {
                if matches!(record.state, LeaseState::Ended | LeaseState::Failed) {
                    return Err(deny(DenyReason::LeaseEnded, format!("the lease already {:?}", record.state)));
                }
                self.end(record.id, "terminated by the requestor").await.map_err(internal)?;
                Ok(ReplyOutcome::Terminated { at_unix_ms: now_unix_ms() })
            }
        }
    }

    async fn usage(&self, id: &LeaseId) -> Option<LeaseUsage> {
        let u = self.inner.hv.usage(vmm_id(id)).await.ok()?;
        Some(LeaseUsage {
            cpu_usec: u.cpu_time.as_micros().min(u128::from(u64::MAX)) as u64,
            memory_current_bytes: u.memory_current_bytes,
            memory_peak_bytes: u.memory_peak_bytes.unwrap_or(u.memory_current_bytes),
            net_rx_bytes: u.ssh_bytes_in,
            net_tx_bytes: u.ssh_bytes_out,
            uptime_secs: u.uptime.as_secs(),
        })
    }

    /// Ends a lease: Stopping is committed first, then the guest is stopped and every
    /// resource freed, then Ended is committed. A lease still starting is marked and
    /// stopped by its start task when the start returns.
    pub async fn end(&self, id: LeaseId, reason: &str) -> Result<(), LeaseError> {
        let inner = &self.inner;
        let record = inner.db.get(&id)?.ok_or(LeaseError::UnknownLease(id))?;
        if matches!(record.state, LeaseState::Ended | LeaseState::Failed) {
            return Ok(());
        }
        if !inner.ending.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return Ok(()); // someone else is ending it
        }
        inner.db.set_state(&id, LeaseState::Stopping, reason, now_unix_ms())?;
        if record.state == LeaseState::Running {
            self.finish_stop(id, reason).await;
        }
        inner.ending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(())
    }

    async fn finish_stop(&self, id: LeaseId, reason: &str) {
        let inner = &self.inner;
        let (state, detail) = match inner.hv.stop(vmm_id(&id)).await {
            Ok(()) => (LeaseState::Ended, reason.to_string()),
            Err(e) => {
                tracing::error!(lease = %id, error = %e, "teardown incomplete");
                (LeaseState::Failed, format!("{reason}; teardown incomplete: {e}"))
            }
        };
        if let Err(e) = inner.db.set_state(&id, state, &detail, now_unix_ms()) {
            tracing::error!(lease = %id, error = %e, "cannot record the end of a lease");
        }
        inner.metrics.forget_lease(&id.to_hex());
        inner.memory_warned.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Err(e) = self.refresh_capacity() {
            tracing::error!(error = %e, "cannot recompute capacity");
        }
        tracing::info!(lease = %id, %reason, "lease ended");
    }

    /// Incident response: the requestor's running leases end, its new requests get a
    /// signed `blocked` denial (persisted across restarts), and its adverts, should it
    /// also be a provider, are no longer stored or forwarded.
    pub async fn block(&self, peer: PeerId, reason: &str) -> Result<Vec<LeaseId>, LeaseError> {
        let inner = &self.inner;
        inner.db.block(&peer, reason, now_unix_ms())?;
        if let Some(network) = &inner.network {
            let _ = network.block_adverts(peer, true).await;
        }
        let mut ended = Vec::new();
        for record in inner.db.active()? {
            if record.requestor == peer {
                self.end(record.id, &format!("requestor blocked by the operator: {reason}")).await?;
                ended.push(record.id);
            }
        }
        tracing::warn!(%peer, %reason, ended = ended.len(), "requestor blocked");
        Ok(ended)
    }

    pub async fn unblock(&self, peer: PeerId) -> Result<bool, LeaseError> {
        let was = self.inner.db.unblock(&peer)?;
        if let Some(network) = &self.inner.network {
            let _ = network.block_adverts(peer, false).await;
        }
        Ok(was)
    }

    /// Re-applies the persisted block list to the swarm (at start).
    pub async fn apply_block_list(&self) -> Result<usize, LeaseError> {
        let blocked = self.inner.db.blocked()?;
        if let Some(network) = &self.inner.network {
            for entry in &blocked {
                let _ = network.block_adverts(entry.peer, true).await;
            }
        }
        Ok(blocked.len())
    }

    /// Cuts a running lease's guest off the network and keeps it, its disk and console
    /// log as evidence: it no longer expires, and only the operator can end it.
    pub async fn isolate(&self, id: LeaseId) -> Result<(), LeaseError> {
        let inner = &self.inner;
        let record = inner.db.get(&id)?.ok_or(LeaseError::UnknownLease(id))?;
        if record.state != LeaseState::Running {
            return Err(LeaseError::NotRunning { id, state: record.state });
        }
        inner.db.set_isolated(&id, true)?;
        inner.hv.isolate(vmm_id(&id)).await?;
        Ok(())
    }

    /// Signs this provider's block list (its operator's blocks) for publication.
    pub fn signed_block_list(&self) -> Result<peervm_protocol::Verified<peervm_protocol::BlockList>, LeaseError> {
        let now = now_unix_ms();
        let entries = self
            .inner
            .db
            .blocked()?
            .into_iter()
            .take(peervm_protocol::blocklist::MAX_BLOCK_ENTRIES)
            .map(|entry| {
                let mut reason = entry.reason;
                truncate(&mut reason, peervm_protocol::advert::MAX_TEXT_LEN);
                peervm_protocol::BlockEntry { peer: entry.peer, reason }
            })
            .collect();
        let list = peervm_protocol::BlockList {
            version: peervm_protocol::blocklist::BLOCK_LIST_VERSION,
            signer: self.inner.me,
            seq: now,
            issued_at_unix_ms: now,
            entries,
        };
        Ok(Signed::sign(&self.inner.key, &list)?)
    }

    pub fn network(&self) -> Option<&NodeClient> {
        self.inner.network.as_ref()
    }

    pub fn list(&self, limit: usize) -> Result<Vec<LeaseRecord>, LeaseError> {
        Ok(self.inner.db.list(limit)?)
    }

    fn end_expired(&self) {
        let now = now_unix_ms();
        let active = match self.inner.db.active() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases for expiry");
                return;
            }
        };
        for record in active {
            // An isolated lease is evidence: it waits for the operator.
            if record.state == LeaseState::Running && record.ends_at_unix_ms <= now && !record.isolated {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.end(record.id, "expired").await {
                        tracing::error!(lease = %record.id, error = %e, "cannot end an expired lease");
                    }
                });
            }
        }
        if let Err(e) = self.inner.db.prune_nonces(now) {
            tracing::warn!(error = %e, "cannot prune seen nonces");
        }
    }

    /// Per-lease usage into metrics; warnings for a lease at its memory limit and for a
    /// host short of what it advertises.
    async fn monitor(&self) {
        let inner = &self.inner;
        let Ok(active) = inner.db.active() else { return };
        let mut running = 0;
        for record in active.iter().filter(|r| r.state == LeaseState::Running) {
            running += 1;
            let Some(u) = self.usage(&record.id).await else { continue };
            inner.metrics.record_lease_usage(&record.id.to_hex(), &u);
            let ram = record.spec.memory_mib << 20;
            if u.memory_current_bytes >= ram {
                let first = inner.memory_warned.lock().unwrap_or_else(|p| p.into_inner()).insert(record.id);
                if first {
                    tracing::warn!(lease = %record.id, memory_mib = record.spec.memory_mib,
                        "lease sits at its memory limit (its guest uses all the RAM it leased)");
                }
            }
        }
        inner.metrics.leases_running.set(running);
        let free = *inner.capacity.borrow();
        if let Some(avail) = host_memory_available_mib()
            && avail < free.memory_mib
        {
            tracing::warn!(
                available_mib = avail,
                advertised_free_mib = free.memory_mib,
                "the host has less memory available than this provider advertises as free"
            );
        }
    }

    fn free_capacity(&self) -> Result<ResourceAmounts, DbError> {
        let total = self.inner.terms.total;
        let mut used = ResourceAmounts { vcpus: 0, memory_mib: 0, disk_gib: 0 };
        for r in self.inner.db.active()? {
            used.vcpus = used.vcpus.saturating_add(r.spec.vcpus);
            used.memory_mib = used.memory_mib.saturating_add(r.spec.memory_mib);
            used.disk_gib = used.disk_gib.saturating_add(r.spec.disk_gib);
        }
        Ok(ResourceAmounts {
            vcpus: total.vcpus.saturating_sub(used.vcpus),
            memory_mib: total.memory_mib.saturating_sub(used.memory_mib),
            disk_gib: total.disk_gib.saturating_sub(used.disk_gib),
        })
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
}

/// How long a request or control message stays valid, for requestors building one.
pub const REQUEST_VALIDITY_MS: u64 = MAX_REQUEST_VALIDITY_MS;

fn vmm_id(id: &LeaseId) -> peervm_vmm::LeaseId {
    peervm_vmm::LeaseId::from_bytes(id.0)
}

fn internal(e: impl std::fmt::Display) -> Denial {
    tracing::error!(error = %e, "lease manager error");
    deny(DenyReason::Internal, "internal error on the provider")
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// MemAvailable from /proc/meminfo, in MiB.
fn host_memory_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
