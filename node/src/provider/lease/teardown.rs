//! Ending a lease, whoever asks (expiry, its requestor, the operator): `stopping` is
//! committed first, then the guest is stopped and every resource freed, then `ended` (or
//! `failed`, if the teardown was incomplete) is committed, so a crash at any point leaves
//! a record the next start finishes from (SECURITY.md invariant 9).

use peervm_protocol::{LeaseId, LeaseState};
use peervm_vmm::Hypervisor;

use super::manager::{LeaseError, LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// Ends a lease: Stopping is committed first, then the guest is stopped and every
    /// resource freed, then Ended is committed. A lease still starting is marked and
    /// stopped by its start task when the start returns.
    pub async fn end(&self, id: LeaseId, reason: &str) -> Result<(), LeaseError> {
        let inner = &self.inner;
        let record = inner.db.get(&id)?.ok_or(LeaseError::UnknownLease(id))?;
        if record.state.is_finished() {
            return Ok(());
        }
        if !inner.ending.lock().unwrap_or_else(|p| p.into_inner()).insert(id) {
            return Ok(()); // someone else is ending it
        }
        inner.db.set_state(&id, LeaseState::Stopping, reason, self.now())?;
        if record.state == LeaseState::Running {
            self.finish_stop(id, reason).await;
        }
        inner.ending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(())
    }

    /// Stops the guest, commits how the lease ended and frees its capacity.
    pub(super) async fn finish_stop(&self, id: LeaseId, reason: &str) {
        let inner = &self.inner;
        let (state, detail) = match inner.hv.stop(vmm_id(&id)).await {
            Ok(()) => (LeaseState::Ended, reason.to_string()),
            Err(e) => {
                tracing::error!(lease = %id, error = %e, "teardown incomplete");
                (LeaseState::Failed, format!("{reason}; teardown incomplete: {e}"))
            }
        };
        if let Err(e) = inner.db.set_state(&id, state, &detail, self.now()) {
            tracing::error!(lease = %id, error = %e, "cannot record the end of a lease");
        }
        inner.metrics.forget_lease(&id.to_hex());
        inner.memory_warned.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        inner.abuse_watch.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        if let Err(e) = self.refresh_capacity() {
            tracing::error!(error = %e, "cannot recompute capacity");
        }
        tracing::info!(lease = %id, %reason, "lease ended");
    }
}

#[cfg(test)]
mod tests {
    use peervm_protocol::{LeaseId, LeaseState};

    use super::super::fake_hypervisor::Op;
    use super::super::manager::{LeaseError, vmm_id};
    use super::super::test_harness::Harness;

    #[tokio::test]
    async fn an_incomplete_teardown_fails_the_lease_saying_why_and_frees_its_capacity() {
        let h = Harness::new();
        let id = h.grant().await;
        h.hv.fail_stop(true);
        h.manager.end(id, "expired").await.unwrap();
        let record = h.record(id);
        assert_eq!(record.state, LeaseState::Failed);
        assert!(record.detail.starts_with("expired; teardown incomplete: "), "{}", record.detail);
        assert_eq!(h.states(id).last(), Some(&LeaseState::Failed));
        assert_eq!(h.states(id).iter().rev().nth(1), Some(&LeaseState::Stopping));
        assert_eq!(h.manager.free_capacity_now(), h.terms.total);
    }

    #[tokio::test]
    async fn a_lease_is_ended_once() {
        let h = Harness::new();
        let id = h.grant().await;
        h.manager.end(id, "first").await.unwrap();
        h.manager.end(id, "second").await.unwrap();
        assert_eq!(h.hv.calls_of(Op::Stop).len(), 1);
        assert_eq!(h.record(id).detail, "first");
        assert!(!h.hv.is_running(vmm_id(&id)));
    }

    #[tokio::test]
    async fn ending_an_unknown_lease_is_an_error_naming_it() {
        let h = Harness::new();
        let err = h.manager.end(LeaseId([3; 16]), "test").await.unwrap_err();
        assert!(matches!(err, LeaseError::UnknownLease(id) if id == LeaseId([3; 16])), "{err}");
    }
}
