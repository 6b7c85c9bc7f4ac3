//! What the helper's guests hold of the host, counted against the host's configured
//! totals: a daemon that lost track (or was taken over) cannot make the helper start more
//! than the operator's provider.toml allows. Reserved before a start, released when the
//! start fails or the guest is stopped.

use std::collections::HashMap;

use crate::hypervisor::RunningVm;
use crate::lease_id::LeaseId;

/// vCPUs, memory and disk of one guest, or of a whole host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Amounts {
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl Amounts {
    pub fn new(vcpus: u32, memory_mib: u32, disk_gib: u32) -> Self {
        Amounts { vcpus: vcpus.into(), memory_mib: memory_mib.into(), disk_gib: disk_gib.into() }
    }

    fn plus(self, o: Amounts) -> Amounts {
        Amounts {
            vcpus: self.vcpus + o.vcpus,
            memory_mib: self.memory_mib + o.memory_mib,
            disk_gib: self.disk_gib + o.disk_gib,
        }
    }

    /// The first amount of `self` over `limit`, named, or `None`.
    pub fn first_over(&self, limit: &Amounts) -> Option<(&'static str, u64, u64)> {
        [("vCPUs", self.vcpus, limit.vcpus), ("MiB of memory", self.memory_mib, limit.memory_mib)]
            .into_iter()
            .chain([("GiB of disk", self.disk_gib, limit.disk_gib)])
            .find(|(_, v, l)| v > l)
    }
}

#[derive(Debug, Default)]
pub struct Ledger {
    held: HashMap<LeaseId, Amounts>,
}

impl Ledger {
    /// Starts from the guests the helper re-adopted.
    pub fn from_running(vms: &[RunningVm]) -> Self {
        Ledger {
            held: vms.iter().map(|vm| (vm.lease_id, Amounts::new(vm.vcpus, vm.memory_mib, vm.disk_gib))).collect(),
        }
    }

    pub fn contains(&self, lease: &LeaseId) -> bool {
        self.held.contains_key(lease)
    }

    pub fn total(&self) -> Amounts {
        self.held.values().fold(Amounts::default(), |a, b| a.plus(*b))
    }

    /// Reserves `amounts` for `lease` if the sum stays within `totals`; else says what
    /// would be over.
    pub fn reserve(&mut self, lease: LeaseId, amounts: Amounts, totals: &Amounts) -> Result<(), String> {
        if self.held.contains_key(&lease) {
            return Err(format!("lease {lease} already has a guest here"));
        }
        let after = self.total().plus(amounts);
        if let Some((what, v, l)) = after.first_over(totals) {
            return Err(format!(
                "the guests would hold {v} {what}, over the host's configured {l} (provider.toml [resources])"
            ));
        }
        self.held.insert(lease, amounts);
        Ok(())
    }

    pub fn release(&mut self, lease: &LeaseId) {
        self.held.remove(lease);
    }

    /// After a reconcile: exactly the adopted guests.
    pub fn replace(&mut self, vms: &[RunningVm]) {
        *self = Ledger::from_running(vms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_against_the_totals_and_release_frees_them() {
        let totals = Amounts::new(4, 4096, 20);
        let mut l = Ledger::default();
        let a = LeaseId::from_bytes([1; 16]);
        let b = LeaseId::from_bytes([2; 16]);
        let c = LeaseId::from_bytes([3; 16]);
        l.reserve(a, Amounts::new(2, 2048, 10), &totals).unwrap();
        assert!(l.reserve(a, Amounts::new(1, 1, 1), &totals).is_err(), "one lease, one guest");
        l.reserve(b, Amounts::new(2, 1024, 5), &totals).unwrap();
        let over = l.reserve(c, Amounts::new(1, 64, 1), &totals).unwrap_err();
        assert!(over.contains("5 vCPUs") && over.contains("configured 4"), "{over}");
        l.release(&a);
        l.reserve(c, Amounts::new(1, 64, 1), &totals).unwrap();
        assert_eq!(l.total(), Amounts::new(3, 1088, 6));
    }
}
