//! Where the provider's guests run (docs/architecture.md "Privilege separation"): in
//! this process (a daemon running as root, for development) or in the VMM helper, a
//! separate root process the unprivileged daemon asks over a Unix socket.

use peervm_vmm::helper::HelperHypervisor;
use peervm_vmm::{
    Accel, Hypervisor, LeaseId, QemuHypervisor, ReconcileReport, RunningVm, VmSpec, VmStatus, VmUsage, VmmError,
};

#[derive(Clone)]
pub enum VmmBackend {
    InProcess(QemuHypervisor),
    Helper(HelperHypervisor),
}

impl Hypervisor for VmmBackend {
    fn accel(&self) -> Accel {
        match self {
            VmmBackend::InProcess(h) => h.accel(),
            VmmBackend::Helper(h) => h.accel(),
        }
    }

    async fn start(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.start(spec).await,
            VmmBackend::Helper(h) => h.start(spec).await,
        }
    }

    async fn stop(&self, lease: LeaseId) -> Result<(), VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.stop(lease).await,
            VmmBackend::Helper(h) => h.stop(lease).await,
        }
    }

    async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.isolate(lease).await,
            VmmBackend::Helper(h) => h.isolate(lease).await,
        }
    }

    async fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.throttle(lease, egress_mbit).await,
            VmmBackend::Helper(h) => h.throttle(lease, egress_mbit).await,
        }
    }

    async fn status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.status(lease).await,
            VmmBackend::Helper(h) => h.status(lease).await,
        }
    }

    async fn usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.usage(lease).await,
            VmmBackend::Helper(h) => h.usage(lease).await,
        }
    }

    async fn reconcile(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        match self {
            VmmBackend::InProcess(h) => h.reconcile(live).await,
            VmmBackend::Helper(h) => h.reconcile(live).await,
        }
    }
}
