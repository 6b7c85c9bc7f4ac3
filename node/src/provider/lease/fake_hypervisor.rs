//! A hypervisor that runs nothing, for unit tests of the lease manager's decisions. It
//! records every call together with what the lease store had committed for that lease
//! at that moment (read through a connection of its own, so uncommitted state does not
//! count), can be told to fail start, stop or isolate, can hold a start until the test
//! releases it, and hands out host keys and ports as the QEMU backend does: the grant's
//! key is the one provisioned, the port follows the network slot.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use peervm_protocol::LeaseState;
use peervm_vmm::{
    Accel, GuestState, Hypervisor, LeaseId, ReconcileReport, RunningVm, StartStage, VmSpec, VmStatus, VmUsage, VmmError,
};
use tokio::sync::{Notify, Semaphore};

use super::db::ProviderDb;

/// The first SSH port; slot n gets `FIRST_PORT + n`, like a provider's `port_min`.
pub(super) const FIRST_PORT: u16 = 22_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Start,
    Stop,
    Isolate,
    Throttle,
    Reconcile,
}

/// What the lease store held for a lease when the hypervisor was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Committed {
    pub state: LeaseState,
    pub isolated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Call {
    pub op: Op,
    /// The lease of a start, stop or isolate; none for reconcile.
    pub lease: Option<LeaseId>,
    pub committed: Option<Committed>,
    /// For reconcile: the leases the caller said are live.
    pub live: Vec<LeaseId>,
}

#[derive(Default)]
struct State {
    calls: Vec<Call>,
    /// Guests that run now (started, or survivors of a restart), with their VM.
    guests: BTreeMap<LeaseId, RunningVm>,
    fail_start: bool,
    /// The error a start ends with after it reported `booting`, as a real guest that
    /// never becomes ready does.
    boot_error: Option<fn(LeaseId) -> VmmError>,
    fail_stop: bool,
    fail_isolate: bool,
    usage: BTreeMap<LeaseId, VmUsage>,
    isolated: BTreeSet<LeaseId>,
    /// Each throttled guest's egress rate.
    throttled: BTreeMap<LeaseId, u32>,
}

/// Holds every start after it reported `booting` until `release`.
struct Hold {
    entered: Notify,
    permits: Semaphore,
}

#[derive(Clone, Default)]
pub(super) struct FakeHypervisor {
    state: Arc<Mutex<State>>,
    /// A second connection to the manager's store.
    store: Option<Arc<ProviderDb>>,
    hold: Option<Arc<Hold>>,
}

impl FakeHypervisor {
    /// A fake that reads what the store at `store` committed whenever it is called.
    pub fn watching(store: ProviderDb) -> Self {
        FakeHypervisor { store: Some(Arc::new(store)), ..Default::default() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state().calls.clone()
    }

    /// The calls of one kind, in order.
    pub fn calls_of(&self, op: Op) -> Vec<Call> {
        self.calls().into_iter().filter(|c| c.op == op).collect()
    }

    pub fn fail_start(&self, fail: bool) {
        self.state().fail_start = fail;
    }

    pub fn fail_boot(&self, error: Option<fn(LeaseId) -> VmmError>) {
        self.state().boot_error = error;
    }

    pub fn fail_stop(&self, fail: bool) {
        self.state().fail_stop = fail;
    }

    pub fn fail_isolate(&self, fail: bool) {
        self.state().fail_isolate = fail;
    }

    pub fn set_usage(&self, lease: LeaseId, usage: VmUsage) {
        self.state().usage.insert(lease, usage);
    }

    /// Whether a guest of `lease` runs now.
    pub fn is_running(&self, lease: LeaseId) -> bool {
        self.state().guests.contains_key(&lease)
    }

    pub fn is_isolated(&self, lease: LeaseId) -> bool {
        self.state().isolated.contains(&lease)
    }

    /// The egress rate `lease`'s guest was throttled to, if it was.
    pub fn throttled(&self, lease: LeaseId) -> Option<u32> {
        self.state().throttled.get(&lease).copied()
    }

    /// A guest that survived a provider restart: `reconcile` finds it.
    pub fn add_surviving_guest(&self, lease: LeaseId, slot: u32) {
        self.state().guests.insert(lease, vm(lease, slot, String::new(), None));
    }

    /// From now on, every start waits after reporting `booting` until [`release_start`].
    pub fn hold_starts(&mut self) {
        self.hold = Some(Arc::new(Hold { entered: Notify::new(), permits: Semaphore::new(0) }));
    }

    /// Waits until a held start has reported `booting`.
    pub async fn start_entered(&self) {
        if let Some(hold) = &self.hold {
            hold.entered.notified().await;
        }
    }

    /// Lets one held start finish.
    pub fn release_start(&self) {
        if let Some(hold) = &self.hold {
            hold.permits.add_permits(1);
        }
    }

    fn record(&self, op: Op, lease: Option<LeaseId>, live: &[LeaseId]) {
        let committed = lease.and_then(|id| self.committed(id));
        self.state().calls.push(Call { op, lease, committed, live: live.to_vec() });
    }

    /// What the store holds for `lease` now.
    pub fn committed(&self, lease: LeaseId) -> Option<Committed> {
        let record = self.store.as_ref()?.get(&peervm_protocol::LeaseId(*lease.as_bytes())).ok()??;
        Some(Committed { state: record.state, isolated: record.isolated })
    }
}

fn told_to_fail(what: &str) -> VmmError {
    VmmError::Command { command: format!("fake {what}"), detail: "the test told it to fail".into() }
}

fn vm(lease: LeaseId, slot: u32, host_key: String, boot_time: Option<Duration>) -> RunningVm {
    RunningVm {
        lease_id: lease,
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        pid: 4242,
        accel: Accel::Tcg,
        ssh_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, FIRST_PORT + slot as u16)),
        guest_ip: Ipv4Addr::new(10, 77, 0, 2),
        exposed: Vec::new(),
        host_key,
        started_at: SystemTime::UNIX_EPOCH,
        boot_time,
    }
}

impl Hypervisor for FakeHypervisor {
    fn accel(&self) -> Accel {
        Accel::Tcg
    }

    async fn start(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        let lease = spec.lease_id;
        self.record(Op::Start, Some(lease), &[]);
        if let Some(progress) = &spec.progress {
            let _ = progress.send(StartStage::Booting);
        }
        if let Some(hold) = &self.hold {
            hold.entered.notify_one();
            if let Ok(permit) = hold.permits.acquire().await {
                permit.forget();
            }
        }
        let mut state = self.state();
        if state.fail_start {
            return Err(told_to_fail("start"));
        }
        if let Some(error) = state.boot_error {
            return Err(error(lease));
        }
        if state.guests.contains_key(&lease) {
            return Err(VmmError::LeaseExists(lease));
        }
        let mut running = vm(lease, spec.network_slot, spec.host_key.public_openssh(), Some(Duration::from_millis(5)));
        // a block of 2 host ports per slot from 30000, as the QEMU backend derives them
        running.exposed = spec
            .expose
            .iter()
            .enumerate()
            .map(|(i, g)| (*g, 30_000 + spec.network_slot as u16 * 2 + i as u16))
            .collect();
        state.guests.insert(lease, running.clone());
        Ok(running)
    }

    async fn stop(&self, lease: LeaseId) -> Result<(), VmmError> {
        self.record(Op::Stop, Some(lease), &[]);
        let mut state = self.state();
        if state.fail_stop {
            return Err(told_to_fail("stop"));
        }
        state.guests.remove(&lease);
        state.isolated.remove(&lease);
        state.throttled.remove(&lease);
        Ok(())
    }

    async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
        self.record(Op::Isolate, Some(lease), &[]);
        let mut state = self.state();
        if state.fail_isolate {
            return Err(told_to_fail("isolate"));
        }
        if !state.guests.contains_key(&lease) {
            return Err(VmmError::UnknownLease(lease));
        }
        state.isolated.insert(lease);
        Ok(())
    }

    async fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
        self.record(Op::Throttle, Some(lease), &[]);
        let mut state = self.state();
        if !state.guests.contains_key(&lease) {
            return Err(VmmError::UnknownLease(lease));
        }
        state.throttled.insert(lease, egress_mbit);
        Ok(())
    }

    async fn status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        let state = self.state();
        let vm = state.guests.get(&lease).ok_or(VmmError::UnknownLease(lease))?;
        Ok(VmStatus { vm: vm.clone(), state: GuestState::Running, uptime: Duration::from_secs(1) })
    }

    async fn usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        let state = self.state();
        if !state.guests.contains_key(&lease) {
            return Err(VmmError::UnknownLease(lease));
        }
        Ok(state.usage.get(&lease).cloned().unwrap_or_default())
    }

    /// Adopts the live leases' guests that run; every other guest is removed, as the
    /// QEMU backend does.
    async fn reconcile(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        self.record(Op::Reconcile, None, live);
        let mut state = self.state();
        let mut report = ReconcileReport::default();
        let guests = std::mem::take(&mut state.guests);
        for (lease, vm) in guests {
            if live.contains(&lease) {
                report.adopted.push(vm.clone());
                state.guests.insert(lease, vm);
            } else {
                report.removed_leases.push(lease);
                report.removed_objects.push(format!("guest {lease}"));
                state.isolated.remove(&lease);
            }
        }
        Ok(report)
    }
}
