//! Ending a lease: the ACPI power button, a kill after `stop_timeout`, then every
//! resource removed by the names derived from the lease id (docs/vmm.md "Teardown and
//! reconcile"). The same removal runs after a failed start and in reconcile.

use std::fs;

use super::QemuHypervisor;
use super::lease_dir::QMP_FILE;
use super::process::kill_guest_processes;
use crate::cgroup::LeaseCgroup;
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::network;
use crate::qmp;

impl QemuHypervisor {
    pub(super) async fn stop_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let rt = self.inner.leases.begin_stop(lease)?;
        let timeout = self.inner.config.stop_timeout;
        {
            let mut p = rt.process.lock().await;
            if p.is_alive() {
                // ACPI power button first: the guest gets to flush and unmount
                let acpi = qmp::execute(&rt.dir.join(QMP_FILE), "system_powerdown", None).await;
                if acpi.is_err() || !p.wait_exit(timeout).await {
                    tracing::info!(%lease, "guest did not power off in time: killing QEMU");
                    p.kill().await;
                }
            }
        }
        rt.close_port();
        let result = self.cleanup_lease(lease).await;
        self.inner.leases.release(lease);
        self.remove_cgroup_parent_if_unused();
        result
    }

    /// Removes every resource a lease may have, by the names derived from its id.
    /// Idempotent; used after a failed start, by stop and by reconcile.
    pub(super) async fn cleanup_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let cfg = &self.inner.config;
        let name = cfg.names.lease_name(&lease);
        kill_guest_processes(cfg.names.long(), &name).await;
        let mut first_error = None;
        if let Err(e) = network::teardown_names(Some(&name), Some(&name), Some(&cfg.names.host_if(&lease))).await {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.lease_cgroup(&lease).destroy().await {
            first_error.get_or_insert(e);
        }
        let dir = self.lease_dir(lease);
        // on a blocking thread: unlinking a large overlay can take a while
        if dir.exists()
            && let Err(e) = tokio::fs::remove_dir_all(&dir).await
        {
            first_error.get_or_insert(VmmError::io("cannot remove", &dir, e));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes the (empty) parent cgroup directories once no lease is left, so that a
    /// provider without guests leaves no trace in the cgroup tree. Under the lease lock:
    /// a concurrent start cannot be between creating the parent and its child.
    pub(super) fn remove_cgroup_parent_if_unused(&self) {
        self.inner.leases.when_empty(|| {
            let parent = LeaseCgroup::new(self.inner.cgroups.clone(), "", self.inner.config.names.long());
            for dir in parent.dirs() {
                let _ = fs::remove_dir(dir);
            }
        });
    }
}
