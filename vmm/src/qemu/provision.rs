//! Starting a lease: the record first, then the overlay, the seed disk, the cgroup, the
//! network, the SSH port and QEMU; then the wait until the guest's sshd proves the
//! provisioned host key (docs/vmm.md "Readiness"). A failed start removes what it made.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;
use tokio::io::AsyncBufReadExt;

use super::lease_dir::{
    CONSOLE_FILE, LeaseRecord, OVERLAY_FILE, QMP_FILE, RecordState, SEED_FILE, UEFI_VARS_FILE, console_tail,
    create_private_dir, create_private_file, create_traversable_dir, write_record,
};
use super::process::{GuestProcess, spawn_qemu};
use super::registry::LeaseRuntime;
use super::{QemuHypervisor, Runner};
use crate::error::VmmError;
use crate::firmware::{Firmware, OVMF_VARS};
use crate::forward::{ForwardCounters, SshForwarder};
use crate::host_command::run;
use crate::hypervisor::RunningVm;
use crate::image::Boot;
use crate::network::{LeaseNetwork, SLOT_PREFIX_LEN};
use crate::procfs;
use crate::qmp;
use crate::readiness::{SshProbe, probe_ssh};
use crate::seed::{SeedConfig, write_seed_disk};
use crate::spec::{StartStage, VmSpec};

impl QemuHypervisor {
    pub(super) async fn start_lease(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        spec.validate()?;
        let cfg = &self.inner.config;
        let lease = spec.lease_id;
        let slot = spec.network_slot;
        cfg.address_pool.slot(slot).ok_or_else(|| {
            VmmError::InvalidSpec(format!("network slot {slot} is outside the address pool {}", cfg.address_pool))
        })?;
        cfg.port_for(slot)?;
        self.inner.leases.reserve(lease, slot)?;
        if self.lease_dir(lease).exists() {
            self.inner.leases.release(lease);
            return Err(VmmError::LeaseExists(lease));
        }
        // a libvirt domain of the lease's name: an operator's (not ours) is never
        // touched, and nothing of the lease is made (docs/vmm.md "The libvirt backend")
        if let Err(e) = self.check_no_domain(lease).await {
            self.inner.leases.release(lease);
            return Err(e);
        }
        match self.provision_and_boot(&spec).await {
            Ok(rt) => {
                let vm = rt.running_vm();
                self.inner.leases.set_running(lease, rt);
                Ok(vm)
            }
            Err(e) => {
                tracing::warn!(%lease, error = %e, "start failed: removing what was created");
                if let Err(ce) = self.cleanup_lease(lease).await {
                    tracing::error!(%lease, error = %ce, "cleanup after a failed start is incomplete");
                }
                self.inner.leases.release(lease);
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
        let host_ports = cfg.exposed_ports_for(spec.network_slot, spec.expose.len())?;
        let image = spec.image.clone();
        // hashes again only when a file changed since it last verified
        tokio::task::spawn_blocking(move || image.verify())
            .await
            .map_err(|e| VmmError::InvalidSpec(format!("image check did not finish: {e}")))??;

        let dir = self.lease_dir(lease);
        let libvirt = !matches!(self.inner.runner, Runner::Direct);
        if libvirt {
            // libvirt's QEMU opens the overlay and the seed by path: the QEMU user must
            // traverse the lease directory (docs/vmm.md "The libvirt backend")
            create_traversable_dir(&dir, self.inner.user.gid)?;
        } else {
            create_private_dir(&dir)?;
        }
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
            image_sha256: spec.image.sha256_hex(),
            started_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            isolated: false,
            exposed: spec.expose.iter().copied().zip(host_ports).collect(),
        };
        // the record exists before any other resource: reconcile finds every lease that
        // may have left something behind
        write_record(&dir, &record)?;

        // per-lease copy-on-write overlay of the leased size over the read-only base, for
        // a data disk (minimal's /data) and a root disk (debian-12's or a stock image's /,
        // which the guest grows to this size; spec.validate refused a lease smaller than
        // the base);
        // created 0600 first so that qemu-img only fills it. `-F` writes the base's
        // format into the overlay's header: QEMU never probes it (docs/vmm.md "QEMU").
        let overlay = dir.join(OVERLAY_FILE);
        create_private_file(&overlay)?;
        let base = spec.image.base_disk().display().to_string();
        let base_format = spec.image.disk_format().as_str();
        let size = format!("{}G", spec.disk_gib);
        let overlay_s = overlay.display().to_string();
        let qemu_img = cfg.qemu_img.display().to_string();
        run(&qemu_img, &["create", "-q", "-f", "qcow2", "-F", base_format, "-b", &base, &overlay_s, &size], None)
            .await?;

        if let Boot::Firmware(Firmware::Uefi) = spec.image.boot() {
            // the lease's own UEFI variable store (boot entries the guest writes stay
            // its own), 0600 in the lease dir, removed with it at teardown
            let vars = dir.join(UEFI_VARS_FILE);
            create_private_file(&vars)?;
            let mut from = std::fs::File::open(OVMF_VARS).map_err(|e| VmmError::io("cannot open", OVMF_VARS, e))?;
            let mut to = std::fs::OpenOptions::new()
                .write(true)
                .open(&vars)
                .map_err(|e| VmmError::io("cannot open", &vars, e))?;
            std::io::copy(&mut from, &mut to).map_err(|e| VmmError::io("cannot write", &vars, e))?;
        }

        let mac = [0x52, 0x54, 0x00, lease.as_bytes()[0], lease.as_bytes()[1], lease.as_bytes()[2]];
        let seed = dir.join(SEED_FILE);
        write_seed_disk(
            &seed,
            &SeedConfig {
                lease,
                kind: spec.image.seed_kind(),
                user: &spec.ssh_user,
                authorized_key: &spec.authorized_key,
                host_key: &spec.host_key,
                mac,
                guest_addr: addrs.guest,
                prefix_len: SLOT_PREFIX_LEN,
                gateway: addrs.host,
                nameservers: cfg.nameservers_for(spec.egress),
            },
        )?;

        let limits = cfg.limits_for(spec.vcpus, spec.memory_mib, spec.cpu_cores());
        let cgroup = self.lease_cgroup(&lease);
        let network =
            LeaseNetwork::new(&cfg.names, &lease, addrs, spec.egress, cfg.address_pool).with_limits(cfg.limits);
        if libvirt {
            // libvirt places the domain's cgroup itself (domain_boot.rs); the domain
            // opens a tap in the host namespace, moved into the namespace once it holds it
            for file in [&overlay, &seed] {
                self.give_to_qemu_user(file)?;
            }
            if let Boot::Firmware(Firmware::Uefi) = spec.image.boot() {
                self.give_to_qemu_user(&dir.join(UEFI_VARS_FILE))?;
            }
            network.setup_without_tap().await?;
        } else {
            cgroup.create(&limits)?;
            network.setup().await?;
        }
        // ARP retries every 100 ms instead of 1 s: the readiness check reaches the
        // guest sooner once its interface is up
        let _ = procfs::write_sysctl(&format!("net/ipv4/neigh/{}/retrans_time_ms", network.host_if), "100");

        // bound before QEMU starts: a port in use fails the lease before a boot is paid for
        let counters = Arc::new(ForwardCounters::default());
        let listen = SocketAddr::new(cfg.ssh_listen, port);
        let forwarder =
            SshForwarder::start(listen, SocketAddr::new(IpAddr::V4(addrs.guest), 22), counters.clone()).await?;
        let exposed = start_exposed(cfg.ssh_listen, addrs.guest, &record.exposed).await?;
        let t_provisioned = t0.elapsed();

        let (process, pid, cgroup) = match &self.inner.runner {
            Runner::Direct => {
                let child = spawn_qemu(cfg, &self.inner.user, spec, &dir, &network, &cgroup, mac)?;
                let pid = child
                    .id()
                    .map(|p| p as i32)
                    .ok_or_else(|| VmmError::Spawn { lease, reason: "QEMU exited at once".into() })?;
                (GuestProcess::Child(child), pid, cgroup)
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => {
                let booted = self.boot_domain(lv, spec, &dir, &network, mac, &limits).await?;
                let start_ticks = procfs::process_start_ticks(booted.pid).unwrap_or_default();
                (GuestProcess::Adopted { pid: booted.pid, start_ticks }, booted.pid, booted.cgroup)
            }
        };
        if let Some(progress) = &spec.progress {
            let _ = progress.send(StartStage::Booting);
        }
        record.state = RecordState::Running;
        record.pid = Some(pid);
        record.pid_start_ticks = procfs::process_start_ticks(pid);
        write_record(&dir, &record)?;

        let rt = Arc::new(LeaseRuntime {
            record,
            dir: dir.clone(),
            process: tokio::sync::Mutex::new(process),
            forwarder: Mutex::new(Some(forwarder)),
            exposed: Mutex::new(exposed),
            counters,
            cgroup,
            started: t0,
            boot_time: OnceLock::new(),
            throttled_mbit: Default::default(),
        });

        // a systemd guest under TCG needs minutes where minimal needs seconds: the image
        // says how long it may take (docs/guest-image.md, `boot_deadline_secs`)
        let deadline = Instant::now() + spec.image.boot_deadline().unwrap_or(cfg.ready_timeout);
        wait_ready(&rt, spec, deadline).await?;
        check_forwarder(listen, deadline).await.map_err(|e| VmmError::NotReady {
            lease,
            waited_secs: t0.elapsed().as_secs(),
            last_error: format!("guest ready but its SSH port {listen} does not answer: {e}"),
        })?;
        let boot_time = t0.elapsed();
        tracing::info!(%lease, provisioned_ms = t_provisioned.as_millis() as u64, ready_ms = boot_time.as_millis() as u64,
            accel = %cfg.accel, "guest ready");

        // The console has served its purpose (boot diagnostics): from here on a guest
        // writing to its serial port must not fill the provider's disk. (Under libvirt,
        // virtlogd rotates the console log at its size limit instead: domain_xml.rs.)
        if !libvirt
            && let Err(e) = qmp::execute(
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
}

impl QemuHypervisor {
    /// Refuses a lease whose domain name libvirt already knows.
    async fn check_no_domain(&self, lease: crate::lease_id::LeaseId) -> Result<(), VmmError> {
        match &self.inner.runner {
            Runner::Direct => {
                let _ = lease;
                Ok(())
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => match lv.find(&self.inner.config.names.lease_name(&lease), &lease.hex()).await? {
                None => Ok(()),
                Some(d) if d.ours => Err(VmmError::LeaseExists(lease)),
                Some(d) => Err(VmmError::ForeignDomain { name: d.name }),
            },
        }
    }

    /// Hands a lease file to the QEMU user (libvirt backend: its QEMU opens the file by
    /// path; libvirt itself is told to chown nothing). The mode stays 0600.
    fn give_to_qemu_user(&self, path: &std::path::Path) -> Result<(), VmmError> {
        let u = &self.inner.user;
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid)).map_err(|e| VmmError::io("cannot chown", path, e))
    }
}

/// Polls the guest's sshd until it proves the provisioned host key; fails at once on a
/// different key or when QEMU exits (with the console tail), else at `deadline`.
async fn wait_ready(rt: &LeaseRuntime, spec: &VmSpec, deadline: Instant) -> Result<(), VmmError> {
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
            return Err(VmmError::NotReady { lease, waited_secs: rt.started.elapsed().as_secs(), last_error: last });
        }
        match probe_ssh(target, &expected, (deadline - now).min(Duration::from_secs(3))).await {
            SshProbe::Ready => return Ok(()),
            SshProbe::WrongKey { presented } => {
                return Err(VmmError::HostKeyMismatch { lease, presented, expected: spec.host_key.public_openssh() });
            }
            SshProbe::NotYet(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The relays of a lease's exposed ports, each from its host port on `listen` to its
/// guest port (the same relay as SSH's, with counters of their own).
pub(super) async fn start_exposed(
    listen: IpAddr,
    guest: Ipv4Addr,
    ports: &[(u16, u16)],
) -> Result<Vec<SshForwarder>, VmmError> {
    let counters = Arc::new(ForwardCounters::default());
    let mut relays = Vec::with_capacity(ports.len());
    for (guest_port, host_port) in ports {
        let from = SocketAddr::new(listen, *host_port);
        relays
            .push(SshForwarder::start(from, SocketAddr::new(IpAddr::V4(guest), *guest_port), counters.clone()).await?);
    }
    Ok(relays)
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
