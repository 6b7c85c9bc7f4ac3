//! The default backend: QEMU run directly (DESIGN section 8). See docs/vmm.md for the
//! layout of files, namespaces, cgroups and rules it creates for a lease.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::AsyncBufReadExt;
use tokio::process::Child;

use crate::accel::Accel;
use crate::cgroup::{CPU_PERIOD_US, CgroupLayout, CgroupLimits, LeaseCgroup};
use crate::error::VmmError;
use crate::forward::{ForwardCounters, SshForwarder};
use crate::host_command::run;
use crate::hypervisor::{GuestState, Hypervisor, ReconcileReport, RunningVm, VmStatus, VmUsage};
use crate::image::MachineKind;
use crate::launch::{Launch, TapAttach, reserve_fd};
use crate::network::{self, AddressPool, LeaseNetwork, NS_TAP, NamePrefix, SLOT_PREFIX_LEN};
use crate::qemu_user::{DEFAULT_QEMU_USER, QemuUser};
use crate::qmp;
use crate::readiness::{SshProbe, probe_ssh};
use crate::seed::{SeedConfig, write_seed_disk};
use crate::spec::{LeaseId, VmSpec};
use crate::state::{
    LeaseRecord, RecordState, create_private_dir, find_guest_processes, leases_dir, process_start_ticks, read_record,
    write_record,
};

const OVERLAY_FILE: &str = "overlay.qcow2";
const SEED_FILE: &str = "seed.img";
const CONSOLE_FILE: &str = "console.log";
const QMP_FILE: &str = "qmp.sock";

/// Configuration of the QEMU backend. `VmmConfig::new` gives the defaults documented in
/// docs/vmm.md.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    /// Lease directories live in `<state_dir>/leases/<lease hex>/` (0700).
    pub state_dir: PathBuf,
    /// The accelerator every guest uses (from `select_accel`).
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    pub qemu_img: PathBuf,
    /// The unprivileged user QEMU runs as (never root).
    pub qemu_user: String,
    pub names: NamePrefix,
    /// One /30 per network slot.
    pub address_pool: AddressPool,
    /// The address the SSH forwarders listen on.
    pub ssh_listen: IpAddr,
    /// Slot `n` is reached on port `ssh_port_base + n`; `ssh_port_count` ports in all.
    pub ssh_port_base: u16,
    pub ssh_port_count: u16,
    /// From QEMU start to SSH-ready at most.
    pub ready_timeout: Duration,
    /// From the ACPI power button to QEMU's exit at most; then it is killed.
    pub stop_timeout: Duration,
    /// Host memory QEMU may use beyond the guest's RAM (device emulation, TCG's
    /// translation cache, page cache of the overlay); the cgroup limit is RAM + this.
    pub memory_overhead_mib: u32,
    /// Task limit of the cgroup beyond one per vCPU (QEMU's own threads and its I/O
    /// worker pool of up to 64 threads).
    pub pids_base: u32,
    /// TCG translation cache size.
    pub tcg_tb_size_mib: u32,
    /// `None`: detect from /proc/self/mountinfo.
    pub cgroups: Option<CgroupLayout>,
}

impl VmmConfig {
    pub fn new(state_dir: impl Into<PathBuf>, accel: Accel) -> Self {
        VmmConfig {
            state_dir: state_dir.into(),
            accel,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            qemu_user: DEFAULT_QEMU_USER.into(),
            names: NamePrefix::default(),
            address_pool: AddressPool::default(),
            ssh_listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ssh_port_base: 22000,
            ssh_port_count: 1000,
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(20),
            memory_overhead_mib: 256,
            pids_base: 128,
            tcg_tb_size_mib: 128,
            cgroups: None,
        }
    }

    fn port_for(&self, slot: u32) -> Result<u16, VmmError> {
        let port = u32::from(self.ssh_port_base) + slot;
        if slot >= u32::from(self.ssh_port_count) || port > u32::from(u16::MAX) {
            return Err(VmmError::InvalidSpec(format!(
                "network slot {slot} is outside the SSH port range {}+{}",
                self.ssh_port_base, self.ssh_port_count
            )));
        }
        Ok(port as u16)
    }
}

/// The QEMU backend.
#[derive(Clone)]
pub struct QemuHypervisor {
    inner: Arc<Inner>,
}

struct Inner {
    config: VmmConfig,
    user: QemuUser,
    cgroups: CgroupLayout,
    leases: Mutex<HashMap<LeaseId, Entry>>,
}

enum Entry {
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

struct LeaseRuntime {
    record: LeaseRecord,
    dir: PathBuf,
    process: tokio::sync::Mutex<GuestProcess>,
    forwarder: Mutex<Option<SshForwarder>>,
    counters: Arc<ForwardCounters>,
    cgroup: LeaseCgroup,
    started: Instant,
    boot_time: std::sync::OnceLock<Duration>,
}

impl LeaseRuntime {
    fn running_vm(&self) -> RunningVm {
        RunningVm {
            lease_id: self.record.lease,
            pid: self.record.pid.unwrap_or_default() as u32,
            accel: self.record.accel,
            ssh_addr: SocketAddr::new(self.record.listen, self.record.port),
            guest_ip: self.record.guest_ip,
            host_key: self.record.host_key.clone(),
            started_at: UNIX_EPOCH + Duration::from_secs(self.record.started_at_unix),
            boot_time: self.boot_time.get().copied(),
        }
    }
}

/// QEMU as our child (started here) or as a process we re-adopted after a restart.
enum GuestProcess {
    Child(Child),
    Adopted { pid: i32, start_ticks: u64 },
}

impl GuestProcess {
    fn is_alive(&mut self) -> bool {
        match self {
            GuestProcess::Child(c) => matches!(c.try_wait(), Ok(None)),
            GuestProcess::Adopted { pid, start_ticks } => process_start_ticks(*pid) == Some(*start_ticks),
        }
    }

    fn exit_status(&mut self) -> String {
        match self {
            GuestProcess::Child(c) => match c.try_wait() {
                Ok(Some(s)) => s.to_string(),
                _ => "running".into(),
            },
            GuestProcess::Adopted { .. } => "exited".into(),
        }
    }

    /// Waits up to `timeout` for QEMU to exit.
    async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        match self {
            GuestProcess::Child(c) => tokio::time::timeout(timeout, c.wait()).await.is_ok(),
            GuestProcess::Adopted { .. } => loop {
                if !self.is_alive() {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }

    async fn kill(&mut self) {
        match self {
            GuestProcess::Child(c) => {
                let _ = c.start_kill();
            }
            GuestProcess::Adopted { pid, start_ticks } => {
                if process_start_ticks(*pid) == Some(*start_ticks) {
                    // SAFETY: kill(2) on the pid we verified is our QEMU
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                    }
                }
            }
        }
        self.wait_exit(Duration::from_secs(5)).await;
    }
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
        let cgroups = match &config.cgroups {
            Some(c) => c.clone(),
            None => CgroupLayout::detect()?,
        };
        create_private_dir(&leases_dir(&config.state_dir))?;
        Ok(QemuHypervisor { inner: Arc::new(Inner { config, user, cgroups, leases: Mutex::new(HashMap::new()) }) })
    }

    pub fn config(&self) -> &VmmConfig {
        &self.inner.config
    }

    pub fn cgroup_layout(&self) -> &CgroupLayout {
        &self.inner.cgroups
    }

    /// The guests this backend manages.
    pub fn list(&self) -> Vec<RunningVm> {
        self.leases()
            .values()
            .filter_map(|e| match e {
                Entry::Running(rt) => Some(rt.running_vm()),
                Entry::Busy { .. } => None,
            })
            .collect()
    }

    /// The lease's cgroup (its limits and counters).
    pub fn cgroup(&self, lease: LeaseId) -> Result<LeaseCgroup, VmmError> {
        Ok(self.runtime(lease)?.cgroup.clone())
    }

    /// Changes a running lease's CPU quota (cores, fractional allowed; `None`: no quota).
    pub fn set_cpu_quota(&self, lease: LeaseId, cores: Option<f64>) -> Result<(), VmmError> {
        if let Some(c) = cores
            && !(c.is_finite() && c >= 0.01)
        {
            return Err(VmmError::InvalidSpec(format!("cpu quota {c} is not a positive number of cores")));
        }
        let rt = self.runtime(lease)?;
        rt.cgroup.set_cpu_quota(cores.map(CgroupLimits::quota_for_cores), CPU_PERIOD_US)
    }

    /// The lease's directory (state file, overlay, seed disk, console log).
    pub fn lease_dir(&self, lease: LeaseId) -> PathBuf {
        leases_dir(&self.inner.config.state_dir).join(lease.hex())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Entry>> {
        self.inner.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn runtime(&self, lease: LeaseId) -> Result<Arc<LeaseRuntime>, VmmError> {
        match self.leases().get(&lease) {
            Some(Entry::Running(rt)) => Ok(rt.clone()),
            _ => Err(VmmError::UnknownLease(lease)),
        }
    }

    fn limits_for(&self, vcpus: u32, memory_mib: u32, cores: f64) -> CgroupLimits {
        let c = &self.inner.config;
        CgroupLimits {
            cpu_quota_us: Some(CgroupLimits::quota_for_cores(cores)),
            cpu_period_us: CPU_PERIOD_US,
            memory_max_bytes: (u64::from(memory_mib) + u64::from(c.memory_overhead_mib)) << 20,
            pids_max: u64::from(c.pids_base) + u64::from(vcpus),
        }
    }

    fn lease_cgroup(&self, lease: &LeaseId) -> LeaseCgroup {
        let names = &self.inner.config.names;
        LeaseCgroup::new(self.inner.cgroups.clone(), names.long(), &names.lease_name(lease))
    }

    async fn start_lease(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        spec.validate()?;
        let cfg = &self.inner.config;
        let lease = spec.lease_id;
        let slot = spec.network_slot;
        cfg.address_pool.slot(slot).ok_or_else(|| {
            VmmError::InvalidSpec(format!("network slot {slot} is outside the address pool {}", cfg.address_pool))
        })?;
        cfg.port_for(slot)?;
        {
            let mut leases = self.leases();
            if leases.contains_key(&lease) {
                return Err(VmmError::LeaseExists(lease));
            }
            if let Some((holder, _)) = leases.iter().find(|(_, e)| e.slot() == slot) {
                return Err(VmmError::SlotInUse { slot, holder: *holder });
            }
            leases.insert(lease, Entry::Busy { slot });
        }
        if self.lease_dir(lease).exists() {
            self.leases().remove(&lease);
            return Err(VmmError::LeaseExists(lease));
        }
        match self.provision_and_boot(&spec).await {
            Ok(rt) => {
                let vm = rt.running_vm();
                self.leases().insert(lease, Entry::Running(rt));
                Ok(vm)
            }
            Err(e) => {
                tracing::warn!(%lease, error = %e, "start failed: removing what was created");
                if let Err(ce) = self.cleanup_lease(lease).await {
                    tracing::error!(%lease, error = %ce, "cleanup after a failed start is incomplete");
                }
                self.leases().remove(&lease);
                self.remove_cgroup_parent_if_unused();
                Err(e)
            }
        }
    }

    async fn provision_and_boot(&self, spec: &VmSpec) -> Result<Arc<LeaseRuntime>, VmmError> {
        let cfg = &self.inner.config;
        let lease = spec.lease_id;
        let t0 = Instant::now();
        let addrs = cfg
            .address_pool
            .slot(spec.network_slot)
            .ok_or_else(|| VmmError::InvalidSpec(format!("network slot {} is outside the pool", spec.network_slot)))?;
        let port = cfg.port_for(spec.network_slot)?;
        let image = spec.image.clone();
        // hashes again only when a file changed since it last verified
        tokio::task::spawn_blocking(move || image.verify())
            .await
            .map_err(|e| VmmError::InvalidSpec(format!("image check did not finish: {e}")))??;

        let dir = self.lease_dir(lease);
        create_private_dir(&dir)?;
        let mut record = LeaseRecord {
            version: LeaseRecord::new_version(),
            lease,
            state: RecordState::Provisioning,
            pid: None,
            pid_start_ticks: None,
            slot: spec.network_slot,
            listen: cfg.ssh_listen,
            port,
            host_ip: addrs.host,
            guest_ip: addrs.guest,
            accel: cfg.accel,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_gib: spec.disk_gib,
            cpu_quota: spec.cpu_quota,
            egress: spec.egress,
            host_key: spec.host_key.public_openssh(),
            image_sha256: spec.image.manifest_sha256_hex(),
            started_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        };
        // the record exists before any other resource: reconcile finds every lease that
        // may have left something behind
        write_record(&dir, &record)?;

        // per-lease copy-on-write overlay of the leased size over the read-only base;
        // created 0600 first so that qemu-img only fills it
        let overlay = dir.join(OVERLAY_FILE);
        create_private_file(&overlay)?;
        let base = spec.image.base_disk().display().to_string();
        let size = format!("{}G", spec.disk_gib);
        let overlay_s = overlay.display().to_string();
        let qemu_img = cfg.qemu_img.display().to_string();
        run(&qemu_img, &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &overlay_s, &size], None).await?;

        let mac = [0x52, 0x54, 0x00, lease.as_bytes()[0], lease.as_bytes()[1], lease.as_bytes()[2]];
        let seed = dir.join(SEED_FILE);
        write_seed_disk(
            &seed,
            &SeedConfig {
                lease,
                user: &spec.ssh_user,
                authorized_key: &spec.authorized_key,
                host_key: &spec.host_key,
                mac,
                guest_addr: addrs.guest,
                prefix_len: SLOT_PREFIX_LEN,
                gateway: addrs.host,
            },
        )?;

        let cgroup = self.lease_cgroup(&lease);
        cgroup.create(&self.limits_for(spec.vcpus, spec.memory_mib, spec.cpu_cores()))?;

        let network = LeaseNetwork::new(&cfg.names, &lease, addrs, spec.egress, cfg.address_pool);
        network.setup().await?;
        // ARP retries every 100 ms instead of 1 s: the readiness check reaches the
        // guest sooner once its interface is up
        let _ = fs::write(format!("/proc/sys/net/ipv4/neigh/{}/retrans_time_ms", network.host_if), "100");

        // bound before QEMU starts: a port in use fails the lease before a boot is paid for
        let counters = Arc::new(ForwardCounters::default());
        let listen = SocketAddr::new(cfg.ssh_listen, port);
        let forwarder =
            SshForwarder::start(listen, SocketAddr::new(IpAddr::V4(addrs.guest), 22), counters.clone()).await?;
        let t_provisioned = t0.elapsed();

        let child = self.spawn_qemu(spec, &dir, &network, &cgroup, mac)?;
        if let Some(progress) = &spec.progress {
            let _ = progress.send(crate::spec::StartStage::Booting);
        }
        let pid = child
            .id()
            .map(|p| p as i32)
            .ok_or_else(|| VmmError::Spawn { lease, reason: "QEMU exited at once".into() })?;
        record.state = RecordState::Running;
        record.pid = Some(pid);
        record.pid_start_ticks = process_start_ticks(pid);
        write_record(&dir, &record)?;

        let rt = Arc::new(LeaseRuntime {
            record,
            dir: dir.clone(),
            process: tokio::sync::Mutex::new(GuestProcess::Child(child)),
            forwarder: Mutex::new(Some(forwarder)),
            counters,
            cgroup,
            started: t0,
            boot_time: std::sync::OnceLock::new(),
        });

        let deadline = Instant::now() + cfg.ready_timeout;
        self.wait_ready(&rt, spec, deadline).await?;
        check_forwarder(listen, deadline).await.map_err(|e| VmmError::NotReady {
            lease,
            waited_secs: t0.elapsed().as_secs(),
            last_error: format!("guest ready but its SSH port {listen} does not answer: {e}"),
        })?;
        let boot_time = t0.elapsed();
        tracing::info!(%lease, provisioned_ms = t_provisioned.as_millis() as u64, ready_ms = boot_time.as_millis() as u64,
            accel = %cfg.accel, "guest ready");

        // The console has served its purpose (boot diagnostics): from here on a guest
        // writing to its serial port must not fill the provider's disk.
        if let Err(e) = qmp::execute(
            &dir.join(QMP_FILE),
            "chardev-change",
            Some(json!({"id": "console", "backend": {"type": "null", "data": {}}})),
        )
        .await
        {
            tracing::warn!(%lease, error = %e, "cannot detach the serial console log");
        }

        let _ = rt.boot_time.set(boot_time);
        Ok(rt)
    }

    fn spawn_qemu(
        &self,
        spec: &VmSpec,
        dir: &Path,
        network: &LeaseNetwork,
        cgroup: &LeaseCgroup,
        mac: [u8; 6],
    ) -> Result<Child, VmmError> {
        let cfg = &self.inner.config;
        let lease = spec.lease_id;
        let spawn_err = |what: &str, e: std::io::Error| VmmError::Spawn { lease, reason: format!("{what}: {e}") };

        let qmp_path = dir.join(QMP_FILE);
        let _ = fs::remove_file(&qmp_path);
        // the lease dir is root-only 0700: no other user reaches the socket
        let qmp = UnixListener::bind(&qmp_path).map_err(|e| VmmError::io("cannot listen on", &qmp_path, e))?;
        let overlay = dir.join(OVERLAY_FILE);
        let overlay_rw: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&overlay)
            .map_err(|e| VmmError::io("cannot open", &overlay, e))?
            .into();
        // QEMU asks its fd set for a read-only descriptor while probing the image
        let overlay_ro: OwnedFd = File::open(&overlay).map_err(|e| VmmError::io("cannot open", &overlay, e))?.into();
        let seed_path = dir.join(SEED_FILE);
        let seed: OwnedFd = File::open(&seed_path).map_err(|e| VmmError::io("cannot open", &seed_path, e))?.into();
        let console_path = dir.join(CONSOLE_FILE);
        let console = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&console_path)
            .map_err(|e| VmmError::io("cannot create", &console_path, e))?;
        let netns_path = format!("/run/netns/{}", network.netns);
        let netns = File::open(&netns_path).map_err(|e| VmmError::io("cannot open", &netns_path, e))?;
        let procs = cgroup.open_procs_files()?;
        let tap_placeholder = reserve_fd().map_err(|e| spawn_err("cannot reserve a descriptor", e))?;

        let qmp_fd: OwnedFd = qmp.into();
        let args = qemu_args(&GuestArgs {
            name: &cfg.names.lease_name(&lease),
            accel: cfg.accel,
            tcg_tb_size_mib: cfg.tcg_tb_size_mib,
            machine: spec.image.machine(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            kernel: spec.image.kernel(),
            initrd: spec.image.initrd(),
            cmdline: spec.image.cmdline(),
            qmp_fd: qmp_fd.as_raw_fd(),
            overlay_fds: (overlay_rw.as_raw_fd(), overlay_ro.as_raw_fd()),
            seed_fd: seed.as_raw_fd(),
            tap_fd: tap_placeholder.as_raw_fd(),
            mac,
        });
        Launch {
            program: &cfg.qemu_binary,
            args,
            user: &self.inner.user,
            netns: Some(netns),
            cgroup_procs: procs,
            inherit: vec![qmp_fd, overlay_rw, overlay_ro, seed],
            tap: Some(TapAttach { name: NS_TAP.into(), placeholder: tap_placeholder }),
            output: Some(console),
        }
        .spawn()
        .map_err(|e| spawn_err(&format!("cannot start {}", cfg.qemu_binary.display()), e))
    }

    async fn wait_ready(&self, rt: &LeaseRuntime, spec: &VmSpec, deadline: Instant) -> Result<(), VmmError> {
        let lease = spec.lease_id;
        let expected = spec.host_key.public_key();
        let target = SocketAddr::new(IpAddr::V4(rt.record.guest_ip), 22);
        let mut last = String::from("no attempt yet");
        loop {
            {
                let mut p = rt.process.lock().await;
                if !p.is_alive() {
                    return Err(VmmError::QemuExited {
                        lease,
                        status: p.exit_status(),
                        console: console_tail(&rt.dir.join(CONSOLE_FILE)),
                    });
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmmError::NotReady {
                    lease,
                    waited_secs: rt.started.elapsed().as_secs(),
                    last_error: last,
                });
            }
            match probe_ssh(target, &expected, (deadline - now).min(Duration::from_secs(3))).await {
                SshProbe::Ready => return Ok(()),
                SshProbe::WrongKey { presented } => {
                    return Err(VmmError::HostKeyMismatch {
                        lease,
                        presented,
                        expected: spec.host_key.public_openssh(),
                    });
                }
                SshProbe::NotYet(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Removes every resource a lease may have, by the names derived from its id.
    /// Idempotent; used after a failed start, by stop and by reconcile.
    async fn cleanup_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let cfg = &self.inner.config;
        let name = cfg.names.lease_name(&lease);
        kill_guest_processes(cfg.names.long(), &name).await;
        let mut first_error = None;
        if let Err(e) = network::teardown_names(Some(&name), Some(&name), Some(&cfg.names.host_if(&lease))).await {
            first_error.get_or_insert(e);
        }
        if let Err(e) = self.lease_cgroup(&lease).destroy() {
            first_error.get_or_insert(e);
        }
        let dir = self.lease_dir(lease);
        if dir.exists()
            && let Err(e) = fs::remove_dir_all(&dir)
        {
            first_error.get_or_insert(VmmError::io("cannot remove", &dir, e));
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn stop_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let rt = {
            let mut leases = self.leases();
            match leases.remove(&lease) {
                Some(Entry::Running(rt)) => {
                    leases.insert(lease, Entry::Busy { slot: rt.record.slot });
                    rt
                }
                Some(busy) => {
                    leases.insert(lease, busy);
                    return Err(VmmError::Busy(lease));
                }
                None => return Err(VmmError::UnknownLease(lease)),
            }
        };
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
        drop(rt.forwarder.lock().unwrap_or_else(|p| p.into_inner()).take());
        let result = self.cleanup_lease(lease).await;
        self.leases().remove(&lease);
        self.remove_cgroup_parent_if_unused();
        result
    }

    /// Removes the (empty) parent cgroup directories once no lease is left, so that a
    /// provider without guests leaves no trace in the cgroup tree. Under the lease lock:
    /// a concurrent start cannot be between creating the parent and its child.
    fn remove_cgroup_parent_if_unused(&self) {
        let leases = self.leases();
        if leases.is_empty() {
            let parent = LeaseCgroup::new(self.inner.cgroups.clone(), "", self.inner.config.names.long());
            for dir in parent.dirs() {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    async fn isolate_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let rt = self.runtime(lease)?;
        // closes the port and every open connection
        drop(rt.forwarder.lock().unwrap_or_else(|p| p.into_inner()).take());
        let host_if = self.inner.config.names.host_if(&lease);
        run("ip", &["link", "set", &host_if, "down"], None).await?;
        tracing::warn!(%lease, "guest isolated: no network until it is stopped");
        Ok(())
    }

    async fn lease_status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        let rt = self.runtime(lease)?;
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

    async fn lease_usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        use std::sync::atomic::Ordering::Relaxed;
        let rt = self.runtime(lease)?;
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

    async fn reconcile_leases(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        let cfg = &self.inner.config;
        let mut report = ReconcileReport::default();
        let dir = leases_dir(&cfg.state_dir);
        let entries = fs::read_dir(&dir).map_err(|e| VmmError::io("cannot list", &dir, e))?;
        for e in entries.flatten() {
            let Some(lease) = e.file_name().to_str().and_then(|s| s.parse::<LeaseId>().ok()) else {
                tracing::warn!(path = %e.path().display(), "not a lease directory: left alone");
                continue;
            };
            if self.leases().contains_key(&lease) {
                continue;
            }
            let adopted = match read_record(&e.path()) {
                Ok(record) if live.contains(&lease) => self.try_adopt(record).await,
                _ => None,
            };
            match adopted {
                Some(vm) => report.adopted.push(vm),
                // one lease that cannot be cleaned must not stop the others
                None => match self.cleanup_lease(lease).await {
                    Ok(()) => report.removed_leases.push(lease),
                    Err(e) => {
                        tracing::error!(%lease, error = %e, "cannot clean up lease");
                        report.failed.push(format!("lease {lease}: {e}"));
                    }
                },
            }
        }
        self.sweep_unowned(&mut report).await;
        self.remove_cgroup_parent_if_unused();
        Ok(report)
    }

    /// Re-adopts the guest of `record` if its QEMU is still the one we started and its
    /// isolation is intact.
    async fn try_adopt(&self, record: LeaseRecord) -> Option<RunningVm> {
        let cfg = &self.inner.config;
        let lease = record.lease;
        let (Some(pid), Some(ticks), RecordState::Running) = (record.pid, record.pid_start_ticks, record.state) else {
            return None;
        };
        if process_start_ticks(pid) != Some(ticks) {
            tracing::info!(%lease, "guest is gone: cleaning up");
            return None;
        }
        let name = cfg.names.lease_name(&lease);
        let cgroup = self.lease_cgroup(&lease);
        let intact = network::list_netns().await.ok()?.contains(&name)
            && network::list_tables().await.ok()?.contains(&name)
            && cgroup.procs().contains(&pid);
        if !intact {
            tracing::warn!(%lease, "guest is alive but its isolation is incomplete: not adopting it");
            return None;
        }
        if self.leases().values().any(|e| e.slot() == record.slot) {
            return None;
        }
        let counters = Arc::new(ForwardCounters::default());
        let listen = SocketAddr::new(record.listen, record.port);
        let forwarder =
            match SshForwarder::start(listen, SocketAddr::new(IpAddr::V4(record.guest_ip), 22), counters.clone()).await
            {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(%lease, error = %e, "cannot re-open the SSH port: not adopting");
                    return None;
                }
            };
        let rt = Arc::new(LeaseRuntime {
            dir: self.lease_dir(lease),
            process: tokio::sync::Mutex::new(GuestProcess::Adopted { pid, start_ticks: ticks }),
            forwarder: Mutex::new(Some(forwarder)),
            counters,
            cgroup,
            started: Instant::now(),
            boot_time: std::sync::OnceLock::new(),
            record,
        });
        let vm = rt.running_vm();
        let mut leases = self.leases();
        if leases.contains_key(&lease) {
            return None;
        }
        leases.insert(lease, Entry::Running(rt));
        tracing::info!(%lease, pid, "re-adopted live guest");
        Some(vm)
    }

    /// Removes processes, namespaces, tables, host interfaces and cgroups with our name
    /// prefix that belong to no lease of this backend.
    async fn sweep_unowned(&self, report: &mut ReconcileReport) {
        let names = &self.inner.config.names;
        let owned: Vec<LeaseId> = self.leases().keys().copied().collect();
        let unowned = |name: &str| names.parse_lease_name(name).is_some_and(|l| !owned.contains(&l));
        let mut killed = Vec::new();
        for (pid, name) in find_guest_processes(names.long()) {
            if unowned(&name) {
                // SAFETY: kill(2) on a QEMU carrying our guest name prefix that no lease owns
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed.push(pid);
                report.removed_objects.push(format!("process {pid} ({name})"));
            }
        }
        wait_gone(&killed).await;

        match network::list_tables().await {
            Ok(tables) => {
                for t in tables.iter().filter(|t| unowned(t)) {
                    remove_object(report, format!("nft table inet {t}"), "nft", &["delete", "table", "inet", t]).await;
                }
            }
            Err(e) => report.failed.push(format!("listing nft tables: {e}")),
        }
        match network::list_netns().await {
            Ok(all) => {
                for ns in all.iter().filter(|n| unowned(n)) {
                    remove_object(report, format!("netns {ns}"), "ip", &["netns", "delete", ns]).await;
                }
            }
            Err(e) => report.failed.push(format!("listing network namespaces: {e}")),
        }
        match network::list_links().await {
            Ok(links) => {
                for link in links {
                    if let Some(short) = names.parse_host_if(&link)
                        && !owned.iter().any(|l| l.short_hex(12) == short)
                    {
                        remove_object(report, format!("link {link}"), "ip", &["link", "delete", &link]).await;
                    }
                }
            }
            Err(e) => report.failed.push(format!("listing links: {e}")),
        }
        for cg in self.inner.cgroups.list_children(names.long()) {
            if unowned(&cg) {
                let what = format!("cgroup {}/{cg}", names.long());
                match LeaseCgroup::new(self.inner.cgroups.clone(), names.long(), &cg).destroy() {
                    Ok(()) => report.removed_objects.push(what),
                    Err(e) => report.failed.push(format!("{what}: {e}")),
                }
            }
        }
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

    /// Runs in a task of its own, like `start`.
    async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
        self.isolate_lease(lease).await
    }

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

/// Runs a removal command and records the outcome in the report.
async fn remove_object(report: &mut ReconcileReport, what: String, program: &str, args: &[&str]) {
    match run(program, args, None).await {
        Ok(_) => report.removed_objects.push(what),
        Err(e) => report.failed.push(format!("{what}: {e}")),
    }
}

/// Waits (a few seconds at most) until the killed processes are gone.
async fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| process_start_ticks(*p).is_some()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs the QEMU processes of guest `name` and waits until they are gone.
async fn kill_guest_processes(prefix: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<(i32, String)> = find_guest_processes(prefix).into_iter().filter(|(_, n)| n == name).collect();
        if found.is_empty() || Instant::now() >= deadline {
            return;
        }
        for (pid, _) in &found {
            // SAFETY: kill(2) on a QEMU carrying the lease's guest name
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The forwarder relays to an sshd: its port must greet with an SSH banner.
async fn check_forwarder(listen: SocketAddr, deadline: Instant) -> Result<(), String> {
    let addr = if listen.ip().is_unspecified() {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
    } else {
        listen
    };
    let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let mut line = String::new();
        tokio::io::BufReader::new(stream).read_line(&mut line).await.map_err(|e| e.to_string())?;
        if line.starts_with("SSH-") { Ok(()) } else { Err(format!("unexpected greeting {:?}", line.trim())) }
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| "no SSH greeting".to_string())?
}

fn uptime_of(record: &LeaseRecord) -> Duration {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Duration::from_secs(now.saturating_sub(record.started_at_unix))
}

fn create_private_file(path: &Path) -> Result<(), VmmError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| VmmError::io("cannot create", path, e))
}

/// The last lines of the console log, for an error message.
fn console_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Inputs of the QEMU command line. Only descriptor numbers and public paths go on it:
/// any host user can read a command line (DESIGN section 8), so the seed disk (host
/// key) and the overlay are passed as open descriptors.
pub(crate) struct GuestArgs<'a> {
    pub name: &'a str,
    pub accel: Accel,
    pub tcg_tb_size_mib: u32,
    pub machine: MachineKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub qmp_fd: i32,
    pub overlay_fds: (i32, i32),
    pub seed_fd: i32,
    pub tap_fd: i32,
    pub mac: [u8; 6],
}

pub(crate) fn qemu_args(a: &GuestArgs<'_>) -> Vec<String> {
    let (machine, blk, net, rng) = match a.machine {
        MachineKind::Microvm => ("microvm,acpi=on", "virtio-blk-device", "virtio-net-device", "virtio-rng-device"),
        MachineKind::Q35 => ("q35", "virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci"),
    };
    let mut v: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| v.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", a.name)]);
    // nothing QEMU would add by itself (default NIC, VGA, monitor on stdio...)
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // seccomp: no exec, no privilege changes, no obsolete syscalls, no resource tweaks
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    // the guest powering off or rebooting ends QEMU: the lease's guest never restarts
    // behind the provider's back
    push(&["-no-reboot"]);
    let accel = a.accel.qemu_args(a.tcg_tb_size_mib);
    v.extend(accel);
    let mut push = |items: &[&str]| v.extend(items.iter().map(|s| s.to_string()));
    push(&["-M", machine]);
    push(&["-smp", &a.vcpus.to_string(), "-m", &a.memory_mib.to_string()]);
    push(&["-kernel", &a.kernel.display().to_string(), "-initrd", &a.initrd.display().to_string()]);
    let mut cmdline = a.cmdline.to_string();
    if a.machine == MachineKind::Microvm
        && a.accel == Accel::Tcg
        && let Some(khz) = host_tsc_khz()
    {
        // microvm under TCG has no timer to calibrate the TSC against and about half the
        // boots hang without its rate (docs/guest-image.md "Machine types")
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    push(&["-append", &cmdline]);
    push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", a.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&["-add-fd", &format!("fd={},set=1,opaque=overlay-rw", a.overlay_fds.0)]);
    push(&["-add-fd", &format!("fd={},set=1,opaque=overlay-ro", a.overlay_fds.1)]);
    push(&["-drive", "file=/dev/fdset/1,if=none,id=disk0,format=qcow2,discard=unmap"]);
    push(&["-device", &format!("{blk},drive=disk0")]);
    push(&["-add-fd", &format!("fd={},set=2,opaque=seed", a.seed_fd)]);
    push(&["-drive", "file=/dev/fdset/2,if=none,id=seed0,format=raw,readonly=on"]);
    push(&["-device", &format!("{blk},drive=seed0")]);
    push(&["-netdev", &format!("tap,id=net0,fd={},vhost=off", a.tap_fd)]);
    // romfile= (empty): no iPXE option ROM, the kernel is booted directly
    let rom = if a.machine == MachineKind::Q35 { ",romfile=" } else { "" };
    push(&["-device", &format!("{net},netdev=net0,mac={}{rom}", crate::seed::format_mac(&a.mac))]);
    push(&["-device", rng]);
    v
}

/// The host's TSC rate (TCG's guest TSC runs at it), from /proc/cpuinfo.
fn host_tsc_khz() -> Option<u64> {
    let info = fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()?;
    Some((mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_isolated_and_carries_no_secret() {
        let args = qemu_args(&GuestArgs {
            name: "peervm-0123",
            accel: Accel::Tcg,
            tcg_tb_size_mib: 64,
            machine: MachineKind::Microvm,
            vcpus: 2,
            memory_mib: 256,
            kernel: Path::new("/img/vmlinux"),
            initrd: Path::new("/img/initrd.img"),
            cmdline: "console=ttyS0",
            qmp_fd: 10,
            overlay_fds: (11, 12),
            seed_fd: 13,
            tap_fd: 14,
            mac: [0x52, 0x54, 0, 1, 2, 3],
        });
        let joined = args.join(" ");
        for must in [
            "-nodefaults",
            "-sandbox on,",
            "-accel tcg,tb-size=64",
            "-M microvm,acpi=on",
            "-smp 2 -m 256",
            "socket,id=qmp,fd=10,server=on",
            "file=/dev/fdset/2,if=none,id=seed0,format=raw,readonly=on",
            "tap,id=net0,fd=14",
            "mac=52:54:00:01:02:03",
            "-name guest=peervm-0123,debug-threads=on",
        ] {
            assert!(joined.contains(must), "missing {must:?} in {joined}");
        }
        // no file of the lease by name: seed (host key) and overlay go by descriptor
        assert!(!joined.contains("seed.img") && !joined.contains("overlay.qcow2") && !joined.contains("PRIVATE"));
    }

    #[test]
    fn ports_follow_slots_within_the_range() {
        let mut c = VmmConfig::new("/tmp/x", Accel::Tcg);
        c.ssh_port_base = 40000;
        c.ssh_port_count = 10;
        assert_eq!(c.port_for(0).unwrap(), 40000);
        assert_eq!(c.port_for(9).unwrap(), 40009);
        assert!(c.port_for(10).is_err());
    }
}
