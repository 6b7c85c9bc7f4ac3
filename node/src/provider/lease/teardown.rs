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
        if let Err(e) = self.refresh_capacity() {
            tracing::error!(error = %e, "cannot recompute capacity");
        }
        tracing::info!(lease = %id, %reason, "lease ended");
    }
}
