//! Recovery at start, before serving (docs/architecture.md, "Leases", "Recovery at
//! start"): running, unexpired leases whose guest survived are re-adopted (and
//! re-isolated if they were), every other lease the store holds is failed or ended, and
//! whatever the hypervisor holds that no live lease owns is removed (SECURITY.md
//! invariant 9).

use std::collections::HashSet;

use peervm_protocol::{LeaseId, LeaseState};
use peervm_vmm::Hypervisor;

use super::db::LeaseRecord;
use super::manager::{LeaseError, LeaseManager, vmm_id};

/// What `recover` found and did at start.
#[derive(Debug, Default, Clone)]
pub struct RecoveryReport {
    pub adopted: Vec<LeaseId>,
    pub failed: Vec<LeaseId>,
    pub ended: Vec<LeaseId>,
    pub removed_objects: Vec<String>,
}

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// At start, before serving: leases whose start was interrupted are failed, running
    /// leases whose guest survived are re-adopted, expired ones are ended, and everything
    /// else the hypervisor holds is cleaned up.
    pub async fn recover(&self) -> Result<RecoveryReport, LeaseError> {
        let now = self.now();
        let mut report = RecoveryReport::default();
        let active = self.inner.db.active()?;
        // Only running, unexpired leases keep their guest; reconcile cleans the rest.
        let vmm_ids: Vec<peervm_vmm::LeaseId> =
            active.iter().filter(|r| may_keep_guest(r, now)).map(|r| vmm_id(&r.id)).collect();
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
            let (state, detail) = without_guest(&record, now);
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
}

/// Whether a lease of the previous run may keep its guest: running and not yet over.
fn may_keep_guest(record: &LeaseRecord, now: u64) -> bool {
    record.state == LeaseState::Running && record.ends_at_unix_ms > now
}

/// How a lease of the previous run that has no guest now ends, and why.
fn without_guest(record: &LeaseRecord, now: u64) -> (LeaseState, &'static str) {
    match record.state {
        LeaseState::Running if record.ends_at_unix_ms <= now => {
            (LeaseState::Ended, "expired while the provider was down")
        }
        LeaseState::Stopping => (LeaseState::Ended, "ended; teardown finished after a provider restart"),
        LeaseState::Running => (LeaseState::Failed, "the guest did not survive a provider restart"),
        _ => (LeaseState::Failed, "the start was interrupted by a provider restart"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use peervm_protocol::{LeaseId, LeaseRequest, LeaseState, ReplyOutcome, ResourceAmounts};

    use super::super::admission::free_capacity;
    use super::super::db::LeaseRecord;
    use super::super::fake_hypervisor::Op;
    use super::super::manager::vmm_id;
    use super::super::test_harness::{Harness, T0};

    /// Stores a lease as a crash would have left it in `state`, without a guest.
    fn stored_in(h: &Harness, like: &LeaseRecord, state: LeaseState) -> LeaseId {
        let record = LeaseRecord { id: LeaseId(rand::random()), ..like.clone() };
        h.db().admit(&record, rand::random(), T0 + 1_000_000, 10, T0).unwrap();
        if state != LeaseState::Requested {
            h.db().set_state(&record.id, LeaseState::Provisioning, "", T0).unwrap();
        }
        if state != LeaseState::Provisioning && state != LeaseState::Requested {
            h.db().set_state(&record.id, state, "", T0).unwrap();
        }
        record.id
    }

    #[tokio::test]
    async fn a_restart_adopts_surviving_guests_and_ends_or_fails_every_other_lease() {
        let h = Harness::build(
            |terms| {
                terms.max_leases = 10;
                terms.total = ResourceAmounts { vcpus: 16, memory_mib: 8192, disk_gib: 100 };
            },
            |_| {},
        );
        let survivor = h.grant().await;
        let dead = h.grant().await;
        let isolated = h.grant().await;
        h.manager.isolate(isolated).await.unwrap();
        let short = LeaseRequest { duration_secs: 60, ..h.request() };
        assert!(matches!(h.send_request(&short).await, ReplyOutcome::Granted { .. }));
        let expired = short.lease_id;
        let stopping = h.grant().await;
        h.db().set_state(&stopping, LeaseState::Stopping, "expired", T0).unwrap();
        let finished = h.grant().await;
        h.manager.end(finished, "test").await.unwrap();
        let like = h.record(survivor);
        let requested = stored_in(&h, &like, LeaseState::Requested);
        let provisioning = stored_in(&h, &like, LeaseState::Provisioning);
        let booting = stored_in(&h, &like, LeaseState::Booting);
        let finished_transitions = h.db().transitions(&finished).unwrap();

        h.clock.set(T0 + 60_000); // `expired` is over
        let slot = |id: &LeaseId| h.record(*id).slot;
        let survivors: Vec<_> =
            [survivor, isolated, expired, stopping, booting].iter().map(|id| (*id, slot(id))).collect();
        let h = h.restart(|hv| {
            for (id, slot) in survivors {
                hv.add_surviving_guest(vmm_id(&id), slot);
            }
        });
        let report = h.manager.recover().await.unwrap();

        // only running, unexpired leases are offered to reconcile
        let reconciles = h.hv.calls_of(Op::Reconcile);
        assert_eq!(reconciles.len(), 1);
        let live: BTreeSet<_> = reconciles[0].live.iter().copied().collect();
        assert_eq!(live, [survivor, dead, isolated].iter().map(vmm_id).collect());

        let set = |ids: &[LeaseId]| ids.iter().copied().collect::<BTreeSet<_>>();
        assert_eq!(set(&report.adopted), set(&[survivor, isolated]));
        assert_eq!(set(&report.ended), set(&[expired, stopping]));
        assert_eq!(set(&report.failed), set(&[dead, requested, provisioning, booting]));
        assert_eq!(report.removed_objects.len(), 3, "{:?}", report.removed_objects);

        let outcome = |id: LeaseId| {
            let r = h.record(id);
            (r.state, r.detail)
        };
        assert_eq!(outcome(survivor).0, LeaseState::Running);
        assert_eq!(outcome(isolated).0, LeaseState::Running);
        assert_eq!(outcome(expired), (LeaseState::Ended, "expired while the provider was down".into()));
        assert_eq!(outcome(stopping), (LeaseState::Ended, "ended; teardown finished after a provider restart".into()));
        assert_eq!(outcome(dead), (LeaseState::Failed, "the guest did not survive a provider restart".into()));
        for id in [requested, provisioning, booting] {
            assert_eq!(outcome(id), (LeaseState::Failed, "the start was interrupted by a provider restart".into()));
        }
        assert_eq!(h.db().transitions(&finished).unwrap(), finished_transitions, "a finished lease is left alone");

        // the isolated guest is cut off again; the others' guests are gone
        let isolates = h.hv.calls_of(Op::Isolate);
        assert_eq!(isolates.iter().map(|c| c.lease).collect::<Vec<_>>(), [Some(vmm_id(&isolated))]);
        assert!(h.hv.is_isolated(vmm_id(&isolated)));
        for id in [expired, stopping, booting] {
            assert!(!h.hv.is_running(vmm_id(&id)));
        }
        let held = [h.record(survivor).spec, h.record(isolated).spec];
        assert_eq!(h.manager.free_capacity_now(), free_capacity(h.terms.total, &held));
    }

    #[tokio::test]
    async fn a_lease_adopted_after_a_restart_still_expires_and_can_be_ended() {
        let h = Harness::new();
        let id = h.grant().await;
        let h = h.restart(|hv| hv.add_surviving_guest(vmm_id(&id), 0));
        assert_eq!(h.manager.recover().await.unwrap().adopted, [id]);
        h.clock.set(T0 + 3_600_000);
        for end in h.manager.end_expired() {
            end.await.unwrap();
        }
        assert_eq!(h.state(id), LeaseState::Ended);
        assert!(!h.hv.is_running(vmm_id(&id)));
    }
}
