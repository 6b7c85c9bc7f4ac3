//! What a running lease looks like: QEMU's run state (over QMP) and the lease's resource
//! use (its cgroup's counters and its SSH forwarder's).

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::QemuHypervisor;
use super::lease_dir::{LeaseRecord, QMP_FILE};
use crate::error::VmmError;
use crate::hypervisor::{GuestState, VmStatus, VmUsage};
use crate::lease_id::LeaseId;
use crate::qmp;

impl QemuHypervisor {
    pub(super) async fn lease_status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        let rt = self.inner.leases.running(lease)?;
        let alive = rt.process.lock().await.is_alive();
        let state = if !alive {
            GuestState::Exited
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
        })
    }
}

fn uptime_of(record: &LeaseRecord) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Duration::from_secs(now.saturating_sub(record.started_at_unix))
}
