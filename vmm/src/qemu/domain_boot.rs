//! A lease's guest under libvirt (docs/vmm.md "The libvirt backend"): the lease's
//! files, namespace, nftables table and forwarder are made as for the QEMU backend
//! (provision.rs); here the domain is created paused on a tap in the host namespace, put
//! under the memory and tasks limits libvirt's XML does not carry, its tap moved into the
//! lease namespace as `tap0`, and only then resumed: the guest runs its first instruction
//! with every limit and its network in place, as under the QEMU backend.

use std::path::Path;

use super::QemuHypervisor;
use super::domain_cgroup::{complete, domain_cgroup};
use super::domain_xml::{DomainSpec, domain_xml};
use super::lease_dir::{CONSOLE_FILE, OVERLAY_FILE, SEED_FILE, UEFI_VARS_FILE};
use super::libvirt::Libvirt;
use super::process::find_guest_processes;
use crate::cgroup::{CgroupLimits, LeaseCgroup};
use crate::error::VmmError;
use crate::firmware::Firmware;
use crate::image::{Boot, MachineKind};
use crate::network::LeaseNetwork;
use crate::spec::VmSpec;
use crate::{procfs, tap};

/// What a started domain is to the lease: its QEMU and its cgroup.
pub(super) struct BootedDomain {
    pub pid: i32,
    pub cgroup: LeaseCgroup,
}

impl QemuHypervisor {
    pub(super) async fn boot_domain(
        &self,
        lv: &Libvirt,
        spec: &VmSpec,
        dir: &Path,
        network: &LeaseNetwork,
        mac: [u8; 6],
        limits: &CgroupLimits,
    ) -> Result<BootedDomain, VmmError> {
        let cfg = &self.inner.config;
        let lease = spec.lease_id;
        let names = &cfg.names;
        let name = names.lease_name(&lease);
        if spec.image.machine() == MachineKind::Microvm {
            return Err(VmmError::InvalidSpec(format!(
                "image {} uses the microvm machine, which libvirt does not run; offer it with backend = \"qemu\"",
                spec.image.sha256_hex()
            )));
        }
        let host_tap = names.host_tap(&lease);
        tap::create_persistent(&host_tap).map_err(|source| VmmError::Link {
            name: host_tap.clone(),
            netns: None,
            action: "create (tap)",
            source,
        })?;
        let uefi_vars = dir.join(UEFI_VARS_FILE);
        let xml = domain_xml(&DomainSpec {
            name: &name,
            lease_hex: &lease.hex(),
            accel: cfg.accel,
            tcg_tb_size_mib: cfg.tcg_tb_size_for(&spec.image),
            machine: spec.image.machine(),
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            cpu_quota_us: limits.cpu_quota_us.unwrap_or(limits.cpu_period_us * u64::from(spec.vcpus)),
            cpu_period_us: limits.cpu_period_us,
            boot: spec.image.boot(),
            qemu_uid: self.inner.user.uid,
            qemu_gid: self.inner.user.gid,
            overlay: &dir.join(OVERLAY_FILE),
            base: spec.image.base_disk(),
            base_format: spec.image.disk_format().as_str(),
            seed: &dir.join(SEED_FILE),
            uefi_vars: matches!(spec.image.boot(), Boot::Firmware(Firmware::Uefi)).then_some(uefi_vars.as_path()),
            console: &dir.join(CONSOLE_FILE),
            tap: &host_tap,
            mac: &crate::seed::format_mac(&mac),
        });
        lv.create_paused(&name, xml).await?;
        let pid =
            find_guest_processes(names.long()).into_iter().find(|(_, n)| *n == name).map(|(pid, _)| pid).ok_or_else(
                || VmmError::Spawn { lease, reason: format!("libvirt created domain {name} but no QEMU runs it") },
            )?;
        lv.set_memory_limit(&name, limits.memory_max_bytes).await?;
        let (cgroup, unplaced) = domain_cgroup(self.lease_cgroup(&lease), pid)?;
        complete(&cgroup, &unplaced, pid, limits.pids_max)?;
        network.adopt_host_tap(&host_tap).await?;
        lv.resume(&name).await?;
        if procfs::process_start_ticks(pid).is_none() {
            return Err(VmmError::Spawn { lease, reason: format!("the QEMU of domain {name} exited at once") });
        }
        Ok(BootedDomain { pid, cgroup })
    }
}
