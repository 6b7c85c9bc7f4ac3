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
        // One snapshot decides the whole request, even if a reload swaps the terms meanwhile.
        let terms = self.terms();
        let plan = admission::check_request(req, standing, &terms)?;
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
            currency: terms.pricing.currency.clone(),
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
            record.slot = match inner.db.admit(&record, req.nonce, nonce_until, terms.max_leases, now) {
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

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::sync::{Arc, RwLock};

    use peervm_protocol::{DenyReason, GuestSpec, LeaseRequest, LeaseState, ReplyOutcome, ResourceAmounts};

    use super::super::fake_hypervisor::Op;
    use super::super::test_harness::{Harness, denial, random_key};

    fn sized(h: &Harness, vcpus: u32) -> LeaseRequest {
        LeaseRequest { spec: GuestSpec { vcpus, ..h.request().spec }, ..h.request() }
    }

    #[tokio::test]
    async fn every_denial_of_a_request_is_signed_typed_and_starts_nothing() {
        let h = Harness::new();
        let blocked_key = random_key();
        h.manager.block(blocked_key.peer_id(), "abuse").await.unwrap();
        let cases: Vec<(&str, LeaseRequest, DenyReason)> = vec![
            (
                "wrong provider",
                LeaseRequest { provider: random_key().peer_id(), ..h.request() },
                DenyReason::WrongProvider,
            ),
            (
                "stale",
                LeaseRequest { valid_until_unix_ms: h.request().issued_at_unix_ms, ..h.request() },
                DenyReason::Stale,
            ),
            ("bad user", LeaseRequest { ssh_user: "Root!".into(), ..h.request() }, DenyReason::InvalidSpec),
            ("too short", LeaseRequest { duration_secs: 59, ..h.request() }, DenyReason::InvalidSpec),
            (
                "unknown image",
                LeaseRequest { spec: GuestSpec { image_name: "other".into(), ..h.request().spec }, ..h.request() },
                DenyReason::UnknownImage,
            ),
            ("cheap", LeaseRequest { max_price_per_hour_micros: 1, ..h.request() }, DenyReason::PriceTooLow),
            ("too big", sized(&h, 5), DenyReason::NoCapacity),
        ];
        for (what, req, want) in cases {
            let outcome = h.send_request(&req).await;
            assert_eq!(denial(&outcome).0, want, "{what}: {outcome:?}");
            assert!(h.db().get(&req.lease_id).unwrap().is_none(), "{what}: nothing is stored");
        }
        let blocked = LeaseRequest { requestor: blocked_key.peer_id(), ..h.request() };
        assert_eq!(denial(&h.send_request_as(&blocked_key, &blocked).await).0, DenyReason::Blocked);
        h.manager.set_locked(true);
        assert_eq!(denial(&h.send_request(&h.request()).await).0, DenyReason::Locked);
        assert!(h.hv.calls().is_empty(), "no denied request reaches the hypervisor: {:?}", h.hv.calls());
        assert!(h.db().list(10).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_requestor_on_a_trusted_block_list_is_denied() {
        let listed = random_key();
        let list = Arc::new(RwLock::new(HashSet::from([listed.peer_id()])));
        let mut h = Harness::new();
        h.manager = h.manager.with_list_blocked(list);
        let req = LeaseRequest { requestor: listed.peer_id(), ..h.request() };
        let outcome = h.send_request_as(&listed, &req).await;
        assert_eq!(denial(&outcome), (DenyReason::Blocked, "this requestor is on a block list the provider trusts"));
        h.grant().await; // others are served
    }

    #[tokio::test]
    async fn the_manager_refuses_a_used_lease_id_itself_before_the_store_is_asked() {
        let h = Harness::new();
        let first = h.grant().await;
        // the same lease id with a new nonce: the manager's own check answers, in its
        // words, and the store never sees the request (its nonce stays unused)
        let again = LeaseRequest { lease_id: first, ..h.request() };
        let outcome = h.send_request(&again).await;
        assert_eq!(denial(&outcome), (DenyReason::Replay, format!("lease id {first} was already used").as_str()));
        assert_eq!(h.hv.calls_of(Op::Start).len(), 1);
        let same_nonce = LeaseRequest { nonce: again.nonce, ..h.request() };
        assert!(matches!(h.send_request(&same_nonce).await, ReplyOutcome::Granted { .. }));
    }

    #[tokio::test]
    async fn a_replayed_nonce_under_a_new_lease_id_is_refused_by_the_store() {
        let h = Harness::new();
        let first = h.request();
        assert!(matches!(h.send_request(&first).await, ReplyOutcome::Granted { .. }));
        let replay = LeaseRequest { nonce: first.nonce, ..h.request() };
        let outcome = h.send_request(&replay).await;
        assert_eq!(denial(&outcome), (DenyReason::Replay, "this request's nonce was already used"));
        assert!(h.db().get(&replay.lease_id).unwrap().is_none());
        assert_eq!(h.hv.calls_of(Op::Start).len(), 1);
    }

    #[tokio::test]
    async fn the_same_signed_request_twice_is_acted_on_once() {
        let h = Harness::new();
        let req = h.request();
        assert!(matches!(h.send_request(&req).await, ReplyOutcome::Granted { .. }));
        assert_eq!(denial(&h.send_request(&req).await).0, DenyReason::Replay);
        assert_eq!(h.hv.calls_of(Op::Start).len(), 1);
    }

    #[tokio::test]
    async fn new_terms_decide_new_requests_and_leave_granted_leases_alone() {
        let h = Harness::new(); // 4 vCPU at 1000 micro-EUR per vCPU-hour
        let first = h.grant().await;
        let before = h.db().get(&first).unwrap().unwrap();
        let mut terms = (*h.manager.terms()).clone();
        terms.pricing.per_vcpu_hour_micros += 1000;
        terms.total.vcpus = 2;
        terms.max_lease_secs = 1800;
        let free = h.manager.set_terms(terms).unwrap();
        assert_eq!(free.vcpus, 1, "the free capacity follows the new total at once");
        assert_eq!(*h.capacity.borrow(), free, "and the advert follows it");
        let long = h.request(); // an hour: now beyond the longest term
        assert_eq!(denial(&h.send_request(&long).await).0, DenyReason::InvalidSpec);
        let second = LeaseRequest { duration_secs: 1800, ..h.request() };
        assert!(matches!(h.send_request(&second).await, ReplyOutcome::Granted { .. }));
        let second = h.db().get(&second.lease_id).unwrap().unwrap();
        assert_eq!(second.price_per_hour_micros, before.price_per_hour_micros + 1000, "priced by the new terms");
        let after = h.db().get(&first).unwrap().unwrap();
        assert_eq!(
            (after.state, after.price_per_hour_micros, after.ends_at_unix_ms),
            (LeaseState::Running, before.price_per_hour_micros, before.ends_at_unix_ms),
            "the running lease keeps what it was granted"
        );
        assert_eq!(h.manager.free_capacity_now().vcpus, 0);
    }

    #[tokio::test]
    async fn capacity_admits_until_full_and_is_freed_when_a_lease_ends() {
        let h = Harness::new(); // 4 vCPU
        let a = sized(&h, 2);
        let b = sized(&h, 2);
        for req in [&a, &b] {
            assert!(matches!(h.send_request(req).await, ReplyOutcome::Granted { .. }));
        }
        assert_eq!(h.manager.free_capacity_now(), ResourceAmounts { vcpus: 0, memory_mib: 1536, disk_gib: 8 });
        assert_eq!(*h.capacity.borrow(), h.manager.free_capacity_now(), "the advert follows");
        let outcome = h.send_request(&sized(&h, 1)).await;
        assert_eq!(denial(&outcome), (DenyReason::NoCapacity, "free now: 0 vCPU, 1536 MiB memory, 8 GiB disk"));
        h.manager.end(a.lease_id, "test").await.unwrap();
        assert_eq!(h.manager.free_capacity_now().vcpus, 2);
        assert!(matches!(h.send_request(&sized(&h, 2)).await, ReplyOutcome::Granted { .. }));
    }

    #[tokio::test]
    async fn slots_are_handed_out_lowest_first_until_none_is_left() {
        let h = Harness::new(); // 3 slots
        let mut leases = Vec::new();
        for slot in 0..3u16 {
            let req = LeaseRequest { spec: GuestSpec { memory_mib: 64, ..h.request().spec }, ..h.request() };
            match h.send_request(&req).await {
                ReplyOutcome::Granted { access, .. } => assert_eq!(access.port, 22_000 + slot),
                other => panic!("{other:?}"),
            }
            leases.push(req.lease_id);
        }
        let outcome = h.send_request(&h.request()).await;
        assert_eq!(denial(&outcome), (DenyReason::NoCapacity, "every lease slot of this provider is taken"));
        h.manager.end(leases[1], "test").await.unwrap();
        match h.send_request(&h.request()).await {
            ReplyOutcome::Granted { access, .. } => assert_eq!(access.port, 22_001, "the freed slot"),
            other => panic!("{other:?}"),
        }
    }

    /// Requests served together (interleaved on one thread) each see the capacity the
    /// others took. Whether the admission mutex holds across threads is not shown here.
    #[tokio::test]
    async fn requests_served_together_never_take_more_than_the_capacity() {
        let h = Harness::new(); // 4 vCPU
        let requests: Vec<_> = (0..4).map(|_| sized(&h, 2)).collect();
        let outcomes = futures::future::join_all(requests.iter().map(|r| h.send_request(r))).await;
        let granted = outcomes.iter().filter(|o| matches!(o, ReplyOutcome::Granted { .. })).count();
        assert_eq!(granted, 2, "{outcomes:?}");
        let live = h.db().active().unwrap();
        assert_eq!(live.iter().map(|r| r.spec.vcpus).sum::<u32>(), 4);
        assert!(live.iter().all(|r| r.state == LeaseState::Running));
    }
}
