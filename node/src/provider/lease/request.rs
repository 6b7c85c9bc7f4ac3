//! Serving a lease request: the admission checks on the facts the store and the trusted
//! block lists hold, then, under the admission lock, the capacity check and the one
//! transaction that stores the nonce, the lease and its slot (docs/architecture.md,
//! "Leases", steps 2 and 3). The guest start follows (`guest_start.rs`).

use libp2p::PeerId;
use peervm_protocol::{DenyReason, LeaseRequest, LeaseState, ReplyOutcome};
use peervm_vmm::Hypervisor;

use super::admission::{self, Blocked, Standing};
use super::db::{DbError, LeaseRecord};
use super::denial::{Denial, deny, internal};
use super::inbound::ReplyTo;
use super::manager::LeaseManager;

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    pub(super) async fn on_request(
        &self,
        peer: PeerId,
        bytes: &[u8],
        throttled: bool,
    ) -> (ReplyTo, Result<ReplyOutcome, Denial>) {
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

    /// What the store and the trusted block lists say about `req`.
    fn standing(&self, req: &LeaseRequest) -> Result<Standing, DbError> {
        let inner = &self.inner;
        let lease_id_used = inner.db.get(&req.lease_id)?.is_some();
        let blocked = if inner.db.is_blocked(&req.requestor)? {
            Some(Blocked::ByOperator)
        } else if inner
            .list_blocked
            .as_ref()
            .is_some_and(|l| l.read().map(|s| s.contains(&req.requestor)).unwrap_or(false))
        {
            Some(Blocked::ByTrustedList)
        } else {
            None
        };
        Ok(Standing { lease_id_used, blocked })
    }

    async fn admit_and_start(
        &self,
        req: &LeaseRequest,
        bytes: &[u8],
        digest: [u8; 32],
    ) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let now = self.now();
        admission::check_addressed(req, self.is_locked(), &inner.me, now)?;
        let standing = self.standing(req).map_err(internal)?;
        let plan = admission::check_request(req, standing, &inner.terms)?;
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
            price_per_hour_micros: plan.price_per_hour_micros,
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
            admission::check_capacity(&req.spec.resources(), &free)?;
            let nonce_until = admission::nonce_kept_until(req.valid_until_unix_ms);
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
        self.start_guest(record, plan.image, req.duration_secs).await
    }
}
