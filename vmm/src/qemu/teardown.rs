//! Ending a lease: the ACPI power button, a kill after `stop_timeout`, then every
//! resource removed by the names derived from the lease id (docs/vmm.md "Teardown and
//! reconcile"). The same removal runs after a failed start and in reconcile.

use std::fs;

use super::lease_dir::QMP_FILE;
use super::process::kill_guest_processes;
use super::{QemuHypervisor, Runner};
use crate::cgroup::LeaseCgroup;
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::netlink::Netlink;
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
                let acpi = self.power_button(lease, &rt.dir).await;
                if acpi.is_err() || !p.wait_exit(timeout).await {
                    tracing::info!(%lease, "guest did not power off in time: killing QEMU");
                    self.destroy_domain(lease).await;
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
        let mut first_error = None;
        // a domain of the lease's name that this provider did not make is not touched,
        // nor its QEMU; everything else of the lease's name is ours and goes
        match self.destroy_domain_checked(lease).await {
            Err(e @ VmmError::ForeignDomain { .. }) => {
                first_error.get_or_insert(e);
            }
            other => {
                if let Err(e) = other {
                    first_error.get_or_insert(e);
                }
                kill_guest_processes(cfg.names.long(), &name).await;
            }
        }
        if let Err(e) = network::teardown_names(Some(&name), Some(&name), Some(&cfg.names.host_if(&lease))).await {
            first_error.get_or_insert(e);
        }
        // the libvirt backend's tap, if a failed start left it in the host namespace
        if let Err(e) = async { Netlink::host()?.delete(&cfg.names.host_tap(&lease)).await }.await {
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

    /// The ACPI power button: over QMP, or libvirt's for a domain.
    pub(super) async fn power_button(&self, lease: LeaseId, dir: &std::path::Path) -> Result<(), VmmError> {
        match &self.inner.runner {
            Runner::Direct => qmp::execute(&dir.join(QMP_FILE), "system_powerdown", None)
                .await
                .map(drop)
                .map_err(|e| VmmError::Qmp { lease, reason: e.to_string() }),
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => lv.power_button(&self.inner.config.names.lease_name(&lease)).await,
        }
    }

    /// Destroys the lease's domain (libvirt backend), logging a failure: the kill that
    /// follows ends its QEMU anyway.
    async fn destroy_domain(&self, lease: LeaseId) {
        if let Err(e) = self.destroy_domain_checked(lease).await {
            tracing::warn!(%lease, error = %e, "cannot destroy the domain");
        }
    }

    /// Destroys the lease's domain if there is one and it is ours (libvirt backend);
    /// `ForeignDomain` for one of that name that is not.
    async fn destroy_domain_checked(&self, lease: LeaseId) -> Result<(), VmmError> {
        match &self.inner.runner {
            Runner::Direct => {
                let _ = lease;
                Ok(())
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => {
                lv.destroy_ours(&self.inner.config.names.lease_name(&lease), &lease.hex()).await.map(drop)
            }
        }
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
