//! The leases this backend holds, and the network slot each one occupies.
//!
//! A lease enters as `Busy` (being provisioned: its slot is taken before anything is
//! created, so two starts never share addresses or a port), becomes `Running` with its
//! live parts, is `Busy` again while it is stopped, and leaves once everything is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::lease_dir::LeaseRecord;
use super::process::GuestProcess;
use crate::cgroup::LeaseCgroup;
use crate::error::VmmError;
use crate::forward::{ForwardCounters, SshForwarder};
use crate::hypervisor::RunningVm;
use crate::lease_id::LeaseId;

pub(super) enum Entry {
    /// Being provisioned or torn down: its slot is taken, nothing else is usable.
    Busy {
        slot: u32,
    },
    Running(Arc<LeaseRuntime>),
}

impl Entry {
    fn slot(&self) -> u32 {
        match self {
            Entry::Busy { slot } => *slot,
            Entry::Running(rt) => rt.record.slot,
        }
    }
}

/// The live parts of a running lease.
pub(super) struct LeaseRuntime {
    pub record: LeaseRecord,
    pub dir: std::path::PathBuf,
    pub process: tokio::sync::Mutex<GuestProcess>,
    /// `None` once the port is closed (isolated, or being stopped).
    pub forwarder: Mutex<Option<SshForwarder>>,
    /// The exposed ports' relays; emptied with the SSH port.
    pub exposed: Mutex<Vec<SshForwarder>>,
    pub counters: Arc<ForwardCounters>,
    pub cgroup: LeaseCgroup,
    pub started: Instant,
    pub boot_time: OnceLock<Duration>,
    /// The egress rate abuse detection holds the guest to (0: none), in Mbit/s. Not in the
    /// record: a guest re-adopted by a restarted backend keeps its qdisc, only the drops
    /// of it then read as 0 (like a limit changed since, `status.rs`).
    pub throttled_mbit: std::sync::atomic::AtomicU32,
}

impl LeaseRuntime {
    pub fn running_vm(&self) -> RunningVm {
        RunningVm {
            lease_id: self.record.lease,
            vcpus: self.record.vcpus,
            memory_mib: self.record.memory_mib,
            disk_gib: self.record.disk_gib,
            pid: self.record.pid.unwrap_or_default() as u32,
            accel: self.record.accel,
            ssh_addr: SocketAddr::new(self.record.listen, self.record.port),
            guest_ip: self.record.guest_ip,
            exposed: self.record.exposed.clone(),
            host_key: self.record.host_key.clone(),
            started_at: UNIX_EPOCH + Duration::from_secs(self.record.started_at_unix),
            boot_time: self.boot_time.get().copied(),
        }
    }

    /// Closes the SSH port and every connection through it.
    pub fn close_port(&self) {
        drop(self.forwarder.lock().unwrap_or_else(|p| p.into_inner()).take());
        self.exposed.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Lease id -> entry, behind a mutex held only for short, non-async sections.
#[derive(Default)]
pub(super) struct Registry {
    leases: Mutex<HashMap<LeaseId, Entry>>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, HashMap<LeaseId, Entry>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `slot` for `lease`, which becomes `Busy`; refused if the lease is already
    /// here or another lease holds the slot.
    pub fn reserve(&self, lease: LeaseId, slot: u32) -> Result<(), VmmError> {
        let mut leases = self.lock();
        if leases.contains_key(&lease) {
            return Err(VmmError::LeaseExists(lease));
        }
        if let Some((holder, _)) = leases.iter().find(|(_, e)| e.slot() == slot) {
            return Err(VmmError::SlotInUse { slot, holder: *holder });
        }
        leases.insert(lease, Entry::Busy { slot });
        Ok(())
    }

    pub fn set_running(&self, lease: LeaseId, rt: Arc<LeaseRuntime>) {
        self.lock().insert(lease, Entry::Running(rt));
    }

    /// Adds a re-adopted lease unless the lease is already here.
    pub fn adopt(&self, lease: LeaseId, rt: Arc<LeaseRuntime>) -> bool {
        let mut leases = self.lock();
        if leases.contains_key(&lease) {
            return false;
        }
        leases.insert(lease, Entry::Running(rt));
        true
    }

    /// Marks a running lease `Busy` for its stop and hands out its runtime.
    pub fn begin_stop(&self, lease: LeaseId) -> Result<Arc<LeaseRuntime>, VmmError> {
        let mut leases = self.lock();
        match leases.remove(&lease) {
            Some(Entry::Running(rt)) => {
                leases.insert(lease, Entry::Busy { slot: rt.record.slot });
                Ok(rt)
            }
            Some(busy) => {
                leases.insert(lease, busy);
                Err(VmmError::Busy(lease))
            }
            None => Err(VmmError::UnknownLease(lease)),
        }
    }

    /// Forgets the lease (after its last resource is gone), freeing its slot.
    pub fn release(&self, lease: LeaseId) {
        self.lock().remove(&lease);
    }

    pub fn running(&self, lease: LeaseId) -> Result<Arc<LeaseRuntime>, VmmError> {
        match self.lock().get(&lease) {
            Some(Entry::Running(rt)) => Ok(rt.clone()),
            _ => Err(VmmError::UnknownLease(lease)),
        }
    }

    pub fn all_running(&self) -> Vec<Arc<LeaseRuntime>> {
        self.lock()
            .values()
            .filter_map(|e| match e {
                Entry::Running(rt) => Some(rt.clone()),
                Entry::Busy { .. } => None,
            })
            .collect()
    }

    pub fn contains(&self, lease: LeaseId) -> bool {
        self.lock().contains_key(&lease)
    }

    pub fn slot_taken(&self, slot: u32) -> bool {
        self.lock().values().any(|e| e.slot() == slot)
    }

    pub fn ids(&self) -> Vec<LeaseId> {
        self.lock().keys().copied().collect()
    }

    /// Runs `f` if no lease is here, holding the lock meanwhile: no start can reserve a
    /// lease while `f` runs.
    pub fn when_empty(&self, f: impl FnOnce()) {
        let leases = self.lock();
        if leases.is_empty() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_and_a_lease_are_held_once() {
        let r = Registry::default();
        let (a, b) = (LeaseId::from_bytes([1; 16]), LeaseId::from_bytes([2; 16]));
        r.reserve(a, 3).unwrap();
        assert!(matches!(r.reserve(a, 4), Err(VmmError::LeaseExists(l)) if l == a));
        assert!(matches!(r.reserve(b, 3), Err(VmmError::SlotInUse { slot: 3, holder }) if holder == a));
        assert!(r.slot_taken(3) && r.contains(a));
        // a busy lease is neither running nor stoppable
        assert!(matches!(r.running(a), Err(VmmError::UnknownLease(_))));
        assert!(matches!(r.begin_stop(a), Err(VmmError::Busy(_))));
        assert!(matches!(r.begin_stop(b), Err(VmmError::UnknownLease(_))));
        assert!(r.all_running().is_empty());

        let mut ran = false;
        r.when_empty(|| ran = true);
        assert!(!ran);
        r.release(a);
        assert!(!r.slot_taken(3) && r.ids().is_empty());
        r.when_empty(|| ran = true);
        assert!(ran);
        r.reserve(b, 3).unwrap();
    }
}
