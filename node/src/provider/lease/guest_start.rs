//! The start of an admitted lease's guest, each state committed before the step it names:
//! `provisioning` before the hypervisor starts, `booting` as QEMU is spawned, `running`
//! once the guest's sshd presents the per-lease host key; then the signed grant
//! (docs/architecture.md, "Leases", step 4). A lease ended while it started is stopped
//! here when the start returns.

use std::sync::Arc;

use peervm_protocol::{DenyReason, LeaseState, ReplyOutcome, SshAccess};
use peervm_vmm::{AuthorizedKey, GuestImage, HostKeySeed, Hypervisor, StartStage, VmSpec};
use tokio::sync::watch;

use super::db::LeaseRecord;
use super::denial::{Denial, deny, internal};
use super::manager::{LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    pub(super) async fn start_guest(
        &self,
        record: LeaseRecord,
        image: Arc<GuestImage>,
        duration_secs: u64,
    ) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let id = record.id;
        inner.db.set_state(&id, LeaseState::Provisioning, "", self.now()).map_err(internal)?;
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
                            let _ = this.inner.db.set_state(&id, LeaseState::Booting, "", this.now());
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
                let _ = inner.db.set_state(&id, LeaseState::Failed, &detail, self.now());
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
        let started_at = self.now();
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
}
