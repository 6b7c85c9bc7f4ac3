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
