//! The manager's timers (docs/architecture.md, "Leases", "Timers"): every second, leases
//! past their end are ended (isolated ones wait for the operator) and expired nonces are
//! pruned; every 10 s, per-lease usage goes to metrics with warnings for a lease at its
//! memory limit and for a host short of the memory it advertises.

use peervm_protocol::{LeaseId, LeaseState, LeaseUsage};
use peervm_vmm::Hypervisor;
use tokio::task::JoinHandle;

use super::db::LeaseRecord;
use super::manager::{LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// A lease's resource use, as the hypervisor reports it; `None` if it cannot.
    pub(super) async fn usage(&self, id: &LeaseId) -> Option<LeaseUsage> {
        let u = self.inner.hv.usage(vmm_id(id)).await.ok()?;
        Some(LeaseUsage {
            cpu_usec: u.cpu_time.as_micros().min(u128::from(u64::MAX)) as u64,
            memory_current_bytes: u.memory_current_bytes,
            memory_peak_bytes: u.memory_peak_bytes.unwrap_or(u.memory_current_bytes),
            net_rx_bytes: u.ssh_bytes_in,
            net_tx_bytes: u.ssh_bytes_out,
            uptime_secs: u.uptime.as_secs(),
        })
    }

    /// Ends every lease past its end, each on its own task (returned, for a caller that
    /// waits), and prunes expired nonces.
    pub(super) fn end_expired(&self) -> Vec<JoinHandle<()>> {
        let now = self.now();
        let active = match self.inner.db.active() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases for expiry");
                return Vec::new();
            }
        };
        let ending = expired(&active, now)
            .map(|id| {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.end(id, "expired").await {
                        tracing::error!(lease = %id, error = %e, "cannot end an expired lease");
                    }
                })
            })
            .collect();
        if let Err(e) = self.inner.db.prune_nonces(now) {
            tracing::warn!(error = %e, "cannot prune seen nonces");
        }
        ending
    }

    /// Per-lease usage into metrics; warnings for a lease at its memory limit and for a
    /// host short of what it advertises.
    pub(super) async fn monitor(&self) {
        let inner = &self.inner;
        let Ok(active) = inner.db.active() else { return };
        let mut running = 0;
        for record in active.iter().filter(|r| r.state == LeaseState::Running) {
            running += 1;
            let Some(u) = self.usage(&record.id).await else { continue };
            inner.metrics.record_lease_usage(&record.id.to_hex(), &u);
            let ram = record.spec.memory_mib << 20;
            if u.memory_current_bytes >= ram {
                let first = inner.memory_warned.lock().unwrap_or_else(|p| p.into_inner()).insert(record.id);
                if first {
                    tracing::warn!(lease = %record.id, memory_mib = record.spec.memory_mib,
                        "lease sits at its memory limit (its guest uses all the RAM it leased)");
                }
            }
        }
        inner.metrics.leases_running.set(running);
        let free = *inner.capacity.borrow();
        if let Some(avail) = host_memory_available_mib()
            && avail < free.memory_mib
        {
            tracing::warn!(
                available_mib = avail,
                advertised_free_mib = free.memory_mib,
                "the host has less memory available than this provider advertises as free"
            );
        }
    }
}

/// The running leases whose end is at or before `now`. An isolated lease is evidence: it
/// waits for the operator (SECURITY.md, "Incident response").
fn expired(active: &[LeaseRecord], now: u64) -> impl Iterator<Item = LeaseId> + '_ {
    active
        .iter()
        .filter(move |r| r.state == LeaseState::Running && r.ends_at_unix_ms <= now && !r.isolated)
        .map(|r| r.id)
}

/// MemAvailable from /proc/meminfo, in MiB.
fn host_memory_available_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
