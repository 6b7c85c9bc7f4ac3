//! The default backend: QEMU run directly. docs/vmm.md describes the files, namespaces,
//! cgroups and rules it creates for a lease.
//!
//! `QemuHypervisor` (here) holds the configuration and the leases, and its `Hypervisor`
//! impl delegates. Each step of a lease's life (provision, status, isolate, teardown,
//! reconcile) is a module that adds an `impl QemuHypervisor` block; the others are the
//! parts those steps use:
//!
//! - `config`: `VmmConfig`, the defaults, and a lease's port and cgroup limits
//! - `registry`: the leases held, their slots and their live parts
//! - `lease_dir`: a lease's directory, its files and its state record
//! - `provision`: start: record, overlay, seed, cgroup, network, port, QEMU, readiness
//! - `command_line`: QEMU's arguments
//! - `process`: the QEMU process: spawned with its descriptors, watched, killed
//! - `status`: QEMU's run state and the lease's resource use
//! - `isolate`: cutting a running guest off every network
//! - `throttle`: holding a running guest's outbound traffic to a low rate
//! - `teardown`: stop, and removal of everything a lease has
//! - `reconcile`: after a restart: re-adopt or clean up, then sweep strays
//!
//! The libvirt backend (`Backend::Libvirt`, docs/vmm.md "The libvirt backend") is this
//! same machinery with libvirtd as the one who starts QEMU:
//!
//! - `libvirt`: the connection to libvirtd and the domain operations (feature `libvirt`)
//! - `domain_xml`: a lease's transient domain
//! - `domain_boot`: start: the domain, paused, its limits and tap, then resumed
//! - `domain_cgroup`: where libvirt placed QEMU in the cgroup tree, as the lease cgroup

mod command_line;
mod config;
#[cfg(feature = "libvirt")]
mod domain_boot;
#[cfg(feature = "libvirt")]
mod domain_cgroup;
#[cfg(feature = "libvirt")]
mod domain_xml;
mod isolate;
mod lease_dir;
#[cfg(feature = "libvirt")]
mod libvirt;
mod process;
mod provision;
mod reconcile;
mod registry;
mod status;
mod teardown;
mod throttle;

use std::path::PathBuf;
use std::sync::Arc;

pub use config::{Backend, DEFAULT_TCG_TB_SIZE_MIB, VmmConfig};

use self::lease_dir::create_private_dir;
use self::registry::Registry;
use crate::accel::Accel;
use crate::cgroup::{CPU_PERIOD_US, CgroupLayout, CgroupLimits, LeaseCgroup};
use crate::error::VmmError;
use crate::hypervisor::{Hypervisor, ReconcileReport, RunningVm, VmStatus, VmUsage};
use crate::lease_id::LeaseId;
use crate::qemu_user::QemuUser;
use crate::spec::VmSpec;

/// The QEMU backend.
#[derive(Clone)]
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: VmmConfig,
    user: QemuUser,
    cgroups: CgroupLayout,
    leases: Registry,
    runner: Runner,
}

/// Who starts a guest's QEMU (`VmmConfig::backend`).
enum Runner {
    Direct,
    #[cfg(feature = "libvirt")]
    Libvirt(libvirt::Libvirt),
}

impl QemuHypervisor {
    /// Checks the configuration, the QEMU user and the cgroup hierarchy, and creates the
    /// state directory. Does not touch running guests: call `reconcile` next.
    pub fn new(config: VmmConfig) -> Result<Self, VmmError> {
        let user = QemuUser::lookup(&config.qemu_user)?;
        if user.uid == 0 {
            return Err(VmmError::QemuUser {
                user: config.qemu_user.clone(),
                reason: "is root: QEMU must run as an unprivileged user".into(),
            });
        }
        if config.ssh_port_count == 0 || config.ssh_port_base == 0 {
            return Err(VmmError::InvalidConfig("the SSH port range is empty".into()));
        }
        config.check_nameservers()?;
        let cgroups = match &config.cgroups {
            Some(c) => c.clone(),
            None => CgroupLayout::detect()?,
        };
        let runner = match &config.backend {
            Backend::Qemu => {
                create_private_dir(&config.leases_dir())?;
                Runner::Direct
            }
            Backend::Libvirt { uri } => Self::libvirt_runner(&config, &user, uri)?,
        };
        Ok(QemuHypervisor { inner: Arc::new(Inner { config, user, cgroups, leases: Registry::default(), runner }) })
    }

    /// Connects to libvirtd (and has it probe QEMU now, not at the first lease), and makes
    /// the lease root one the QEMU user can traverse to: libvirt's QEMU opens the
    /// overlay and the seed by path (docs/vmm.md "The libvirt backend").
    #[cfg(feature = "libvirt")]
    fn libvirt_runner(config: &VmmConfig, user: &QemuUser, uri: &str) -> Result<Runner, VmmError> {
        // first: a libvirtd that does not answer leaves nothing behind
        let lv = libvirt::Libvirt::connect(uri)?;
        let root = config.leases_dir();
        if let Some(parent) = root.parent() {
            create_private_dir(parent)?;
        }
        self::lease_dir::create_traversable_dir(&root, user.gid)?;
        self::lease_dir::check_traversable(&root, user)?;
        Ok(Runner::Libvirt(lv))
    }

    #[cfg(not(feature = "libvirt"))]
    fn libvirt_runner(_: &VmmConfig, _: &QemuUser, _: &str) -> Result<Runner, VmmError> {
        Err(VmmError::InvalidConfig(
            "[hypervisor] backend = \"libvirt\", but this build has no libvirt support (vmm feature `libvirt`)".into(),
        ))
    }

    /// Which backend runs the guests.
    pub fn backend(&self) -> &Backend {
        &self.inner.config.backend
    }

    pub fn config(&self) -> &VmmConfig {
        &self.inner.config
    }

    pub fn cgroup_layout(&self) -> &CgroupLayout {
        &self.inner.cgroups
    }

    /// The guests this backend manages.
    pub fn list(&self) -> Vec<RunningVm> {
        self.inner.leases.all_running().iter().map(|rt| rt.running_vm()).collect()
    }

    /// The lease's cgroup (its limits and counters).
    pub fn cgroup(&self, lease: LeaseId) -> Result<LeaseCgroup, VmmError> {
        Ok(self.inner.leases.running(lease)?.cgroup.clone())
    }

    /// Changes a running lease's CPU quota (cores, fractional allowed; `None`: no quota).
    pub fn set_cpu_quota(&self, lease: LeaseId, cores: Option<f64>) -> Result<(), VmmError> {
        if let Some(c) = cores
            && !(c.is_finite() && c >= 0.01)
        {
            return Err(VmmError::InvalidSpec(format!("cpu quota {c} is not a positive number of cores")));
        }
        let rt = self.inner.leases.running(lease)?;
        // the domain's own cgroup for the libvirt backend (domain_cgroup.rs), where its
        // <cputune> global quota is
        rt.cgroup.set_cpu_quota(cores.map(CgroupLimits::quota_for_cores), CPU_PERIOD_US)
    }

    /// The leases this host has a directory for: what a VMM helper re-adopts at its
    /// start (`reconcile` with all of them keeps every guest still alive).
    pub fn recorded_leases(&self) -> Result<Vec<LeaseId>, VmmError> {
        let dir = self.inner.config.leases_dir();
        let entries = std::fs::read_dir(&dir).map_err(|e| VmmError::io("cannot list", &dir, e))?;
        Ok(entries.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok())).collect())
    }

    /// The lease's directory (state file, overlay, seed disk, console log).
    pub fn lease_dir(&self, lease: LeaseId) -> PathBuf {
        self.inner.config.leases_dir().join(lease.hex())
    }

    fn lease_cgroup(&self, lease: &LeaseId) -> LeaseCgroup {
        let names = &self.inner.config.names;
        LeaseCgroup::new(self.inner.cgroups.clone(), names.long(), &names.lease_name(lease))
    }
}

impl Hypervisor for QemuHypervisor {
    fn accel(&self) -> Accel {
        self.inner.config.accel
    }

    /// Runs in a task of its own: a caller that stops waiting (a timeout, a dropped
    /// request) does not leave a half-provisioned lease behind.
    async fn start(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        let hv = self.clone();
        let lease = spec.lease_id;
        tokio::spawn(async move { hv.start_lease(spec).await })
            .await
            .map_err(|e| VmmError::Spawn { lease, reason: format!("start task failed: {e}") })?
    }

    async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
        self.isolate_lease(lease).await
    }

    async fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
        self.throttle_lease(lease, egress_mbit).await
    }

    /// Runs in a task of its own, like `start`.
    async fn stop(&self, lease: LeaseId) -> Result<(), VmmError> {
        let hv = self.clone();
        tokio::spawn(async move { hv.stop_lease(lease).await })
            .await
            .map_err(|e| VmmError::Spawn { lease, reason: format!("stop task failed: {e}") })?
    }

    async fn status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        self.lease_status(lease).await
    }

    async fn usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        self.lease_usage(lease).await
    }

    async fn reconcile(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        self.reconcile_leases(live).await
    }
}
