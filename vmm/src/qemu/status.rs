//! What a running lease looks like: QEMU's run state (over QMP) and the lease's resource
//! use (its cgroup's counters, its SSH forwarder's, and its link's traffic).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::lease_dir::{LeaseRecord, QMP_FILE};
use super::{QemuHypervisor, Runner};
use crate::error::VmmError;
use crate::hypervisor::{GuestState, VmStatus, VmUsage};
use crate::lease_id::LeaseId;
use crate::qmp;
use crate::traffic::{self, LeaseLink};

impl QemuHypervisor {
    pub(super) async fn lease_status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        let rt = self.inner.leases.running(lease)?;
        let alive = rt.process.lock().await.is_alive();
        let state = if !alive {
            GuestState::Exited
        } else if let Some(state) = self.domain_state(lease).await {
            state
        } else {
            match qmp::execute(&rt.dir.join(QMP_FILE), "query-status", None).await {
                Ok(v) => match v.get("status").and_then(|s| s.as_str()) {
                    Some("running") => GuestState::Running,
                    Some("paused") => GuestState::Paused,
                    Some(other) => GuestState::Other(other.to_string()),
                    None => GuestState::Other(v.to_string()),
                },
                Err(e) => GuestState::Other(format!("QMP: {e}")),
            }
        };
        Ok(VmStatus { vm: rt.running_vm(), state, uptime: uptime_of(&rt.record) })
    }

    pub(super) async fn lease_usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        let rt = self.inner.leases.running(lease)?;
        let u = rt.cgroup.usage()?;
        let cfg = &self.inner.config;
        let (name, host_if) = (cfg.names.lease_name(&lease), cfg.names.host_if(&lease));
        let link = LeaseLink { netns: &name, host_if: &host_if, table: &name };
        // the config's limits and a throttle say which directions to ask tc about; a
        // guest re-adopted after they changed keeps its own qdiscs (docs/vmm.md
        // "Bandwidth limits"), whose drops then read as 0
        let mut limits = cfg.limits;
        match rt.throttled_mbit.load(Relaxed) {
            0 => {}
            mbit => limits.egress_mbit = Some(mbit),
        }
        let net = match traffic::read(&link, limits).await {
            Ok(n) => Some(n),
            Err(e) => {
                tracing::warn!(%lease, error = %e, "cannot read the guest's traffic counters");
                None
            }
        };
        Ok(VmUsage {
            cpu_time: Duration::from_nanos(u.cpu_usage_ns),
            cpu_throttled: Duration::from_nanos(u.throttled_ns),
            cpu_throttled_periods: u.nr_throttled,
            cpu_periods: u.nr_periods,
            memory_current_bytes: u.memory_current_bytes,
            memory_peak_bytes: u.memory_peak_bytes,
            ssh_bytes_in: rt.counters.bytes_in.load(Relaxed),
            ssh_bytes_out: rt.counters.bytes_out.load(Relaxed),
            ssh_connections: rt.counters.connections.load(Relaxed),
            uptime: uptime_of(&rt.record),
            net,
        })
    }
}

impl QemuHypervisor {
    /// libvirt's view of the lease's domain (`None` for the QEMU backend).
    async fn domain_state(&self, lease: LeaseId) -> Option<GuestState> {
        match &self.inner.runner {
            Runner::Direct => {
                let _ = lease;
                None
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => Some(
                lv.state(&self.inner.config.names.lease_name(&lease))
                    .await
                    .unwrap_or_else(|e| GuestState::Other(e.to_string())),
            ),
        }
    }
}

fn uptime_of(record: &LeaseRecord) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Duration::from_secs(now.saturating_sub(record.started_at_unix))
}
