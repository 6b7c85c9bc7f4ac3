//! `VmmConfig`: every knob of the QEMU backend, with the defaults documented in
//! docs/vmm.md, and what follows from them for one lease (its SSH port, its cgroup
//! limits).

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use crate::accel::Accel;
use crate::cgroup::{CPU_PERIOD_US, CgroupLayout, CgroupLimits};
use crate::error::VmmError;
use crate::image::GuestImage;
use crate::network::{AddressPool, NamePrefix, is_blocked_destination};
use crate::qemu_user::DEFAULT_QEMU_USER;
use crate::shaping::BandwidthLimits;
use crate::spec::EgressPolicy;

/// Who starts and owns a guest's QEMU process (provider.toml `[hypervisor] backend`;
/// docs/vmm.md "The libvirt backend"). Everything else of a lease (record, overlay,
/// seed, cgroup limits, namespace, nftables, forwarder, readiness, teardown, reconcile)
/// is the same code for both.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// vmm forks and execs QEMU itself, with its isolation in place (launch.rs).
    #[default]
    Qemu,
    /// libvirtd at `uri` runs each guest as a transient domain named like the lease, so
    /// operators see and manage leased guests with `virsh` and their own tooling.
    Libvirt {
        /// e.g. `qemu:///system`.
        uri: String,
    },
}

impl Backend {
    /// libvirt's system daemon, where the libvirt backend goes by default.
    pub const DEFAULT_LIBVIRT_URI: &'static str = "qemu:///system";

    pub fn as_str(&self) -> &'static str {
        match self {
            Backend::Qemu => "qemu",
            Backend::Libvirt { .. } => "libvirt",
        }
    }
}

/// Configuration of the QEMU backend. `VmmConfig::new` gives the defaults documented in
/// docs/vmm.md.
#[derive(Clone, Debug)]
pub struct VmmConfig {
    /// Lease directories live in `<state_dir>/leases/<lease hex>/` (0700), unless
    /// `lease_root` says otherwise.
    pub state_dir: PathBuf,
    /// Who runs QEMU: vmm itself (the default) or libvirtd.
    pub backend: Backend,
    /// Where lease directories go instead of `<state_dir>/leases`. The libvirt backend
    /// needs one the QEMU user can traverse to (libvirt's QEMU opens the overlay and the
    /// seed by path: docs/vmm.md "The libvirt backend"), which a private state directory
    /// is not.
    pub lease_root: Option<PathBuf>,
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
    /// Exposed guest ports (docs/vmm.md "Exposed ports"): slot `n`'s block starts at
    /// `expose_port_base + n * expose_ports_per_slot`; `expose_port_count` ports in all.
    /// 0 ports per slot: no port is exposed.
    pub expose_port_base: u16,
    pub expose_port_count: u16,
    pub expose_ports_per_slot: u16,
    /// Slot `n` is reached on port `ssh_port_base + n`; `ssh_port_count` ports in all.
    pub ssh_port_base: u16,
    pub ssh_port_count: u16,
    /// From QEMU start to SSH-ready at most, for an image whose manifest gives no
    /// `boot_deadline_secs` (`GuestImage::boot_deadline` overrides it).
    pub ready_timeout: Duration,
    /// From the ACPI power button to QEMU's exit at most; then it is killed.
    pub stop_timeout: Duration,
    /// Host memory QEMU may use beyond the guest's RAM (device emulation, TCG's
    /// translation cache, page cache of the overlay); the cgroup limit is RAM + this.
    pub memory_overhead_mib: u32,
    /// Task limit of the cgroup beyond one per vCPU (QEMU's own threads and its I/O
    /// worker pool of up to 64 threads).
    pub pids_base: u32,
    /// TCG translation cache size, MiB; `None`: the image's (its manifest's
    /// `tcg_tb_size_mib`), else `DEFAULT_TCG_TB_SIZE_MIB` (`tcg_tb_size_for`).
    pub tcg_tb_size_mib: Option<u32>,
    /// `None`: detect from /proc/self/mountinfo.
    pub cgroups: Option<CgroupLayout>,
    /// DNS resolvers written into the seed of a guest whose image runs cloud-init and
    /// whose egress is `public-only`; they must be addresses such a guest may reach
    /// (public: the lease's table drops the host and private ranges, docs/vmm.md
    /// "nftables"). A guest whose egress is denied reaches none, so gets none. Empty
    /// (the default): no resolver, as the minimal image's seed never had one.
    pub guest_nameservers: Vec<Ipv4Addr>,
    /// Each guest's bandwidth out and in, held by tc on its link (docs/vmm.md "Bandwidth
    /// limits"); none by default.
    pub limits: BandwidthLimits,
}

/// TCG's translation buffer per guest unless the operator or the image says otherwise:
/// what a debian-12 boot fills (BENCHMARKS.md "Where a guest's host memory goes beyond
/// its RAM").
pub const DEFAULT_TCG_TB_SIZE_MIB: u32 = 128;

impl VmmConfig {
    pub fn new(state_dir: impl Into<PathBuf>, accel: Accel) -> Self {
        VmmConfig {
            state_dir: state_dir.into(),
            backend: Backend::Qemu,
            lease_root: None,
            accel,
            qemu_binary: "qemu-system-x86_64".into(),
            qemu_img: "qemu-img".into(),
            qemu_user: DEFAULT_QEMU_USER.into(),
            names: NamePrefix::default(),
            address_pool: AddressPool::default(),
            ssh_listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            ssh_port_base: 22000,
            ssh_port_count: 1000,
            expose_port_base: 0,
            expose_port_count: 0,
            expose_ports_per_slot: 0,
            ready_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(20),
            memory_overhead_mib: 256,
            pids_base: 128,
            tcg_tb_size_mib: None,
            cgroups: None,
            guest_nameservers: Vec::new(),
            limits: BandwidthLimits::default(),
        }
    }

    /// The translation buffer a guest of `image` gets under TCG: the operator's size
    /// when one is set, else the image's own (a manifest may say how much its boot needs:
    /// minimal boots as fast in 40 MiB as in 128, debian-12 does not), else
    /// `DEFAULT_TCG_TB_SIZE_MIB` (docs/vmm.md "Host memory per guest").
    pub fn tcg_tb_size_for(&self, image: &GuestImage) -> u32 {
        self.tcg_tb_size_mib.or(image.tcg_tb_size_mib()).unwrap_or(DEFAULT_TCG_TB_SIZE_MIB)
    }

    /// The directory lease directories go in.
    pub fn leases_dir(&self) -> PathBuf {
        self.lease_root.clone().unwrap_or_else(|| self.state_dir.join("leases"))
    }

    /// The resolvers a guest with `egress` is given (see `guest_nameservers`).
    pub(super) fn nameservers_for(&self, egress: EgressPolicy) -> &[Ipv4Addr] {
        match egress {
            EgressPolicy::Deny => &[],
            EgressPolicy::PublicOnly => &self.guest_nameservers,
        }
    }

    /// Refuses resolvers a guest could never reach.
    pub(super) fn check_nameservers(&self) -> Result<(), VmmError> {
        for ns in &self.guest_nameservers {
            if is_blocked_destination(*ns, &self.address_pool) {
                return Err(VmmError::InvalidConfig(format!(
                    "guest DNS resolver {ns} is an address guests cannot reach (private, local or the guests' \
                     pool {}): give a public resolver",
                    self.address_pool
                )));
            }
        }
        Ok(())
    }

    /// The SSH port of network slot `slot`.
    pub(super) fn port_for(&self, slot: u32) -> Result<u16, VmmError> {
        let port = u32::from(self.ssh_port_base) + slot;
        if slot >= u32::from(self.ssh_port_count) || port > u32::from(u16::MAX) {
            return Err(VmmError::InvalidSpec(format!(
                "network slot {slot} is outside the SSH port range {}+{}",
                self.ssh_port_base, self.ssh_port_count
            )));
        }
        Ok(port as u16)
    }

    /// The host ports of the `count` exposed guest ports of network slot `slot`.
    pub(super) fn exposed_ports_for(&self, slot: u32, count: usize) -> Result<Vec<u16>, VmmError> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let per_slot = u32::from(self.expose_ports_per_slot);
        let first = u64::from(slot) * u64::from(per_slot);
        if count as u32 > per_slot || first + count as u64 > u64::from(self.expose_port_count) {
            return Err(VmmError::InvalidSpec(format!(
                "{count} exposed ports for slot {slot} do not fit the exposed port range {}+{} ({per_slot} per slot)",
                self.expose_port_base, self.expose_port_count
            )));
        }
        (0..count as u64)
            .map(|i| {
                u16::try_from(u64::from(self.expose_port_base) + first + i)
                    .map_err(|_| VmmError::InvalidSpec("the exposed port range passes 65535".into()))
            })
            .collect()
    }

    /// The cgroup limits of a guest with `vcpus`, `memory_mib` of RAM and `cores` of CPU
    /// quota (docs/vmm.md "Cgroups").
    pub(super) fn limits_for(&self, vcpus: u32, memory_mib: u32, cores: f64) -> CgroupLimits {
        CgroupLimits {
            cpu_quota_us: Some(CgroupLimits::quota_for_cores(cores)),
            cpu_period_us: CPU_PERIOD_US,
            memory_max_bytes: (u64::from(memory_mib) + u64::from(self.memory_overhead_mib)) << 20,
            pids_max: u64::from(self.pids_base) + u64::from(vcpus),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_slots_within_the_range() {
        let mut c = VmmConfig::new("/tmp/x", Accel::Tcg);
        c.ssh_port_base = 40000;
        c.ssh_port_count = 10;
        assert_eq!(c.port_for(0).unwrap(), 40000);
        assert_eq!(c.port_for(9).unwrap(), 40009);
        assert!(c.port_for(10).is_err());
    }

    #[test]
    fn exposed_ports_take_a_block_per_slot_within_the_range() {
        let mut c = VmmConfig::new("/tmp/x", Accel::Tcg);
        assert!(c.exposed_ports_for(0, 0).unwrap().is_empty());
        assert!(c.exposed_ports_for(0, 1).is_err(), "nothing is exposed by default");
        (c.expose_port_base, c.expose_port_count, c.expose_ports_per_slot) = (30000, 5, 2);
        assert_eq!(c.exposed_ports_for(0, 2).unwrap(), [30000, 30001]);
        assert_eq!(c.exposed_ports_for(1, 1).unwrap(), [30002]);
        assert_eq!(c.exposed_ports_for(2, 1).unwrap(), [30004]);
        assert!(c.exposed_ports_for(2, 2).is_err(), "the range ends at 30004");
        assert!(c.exposed_ports_for(0, 3).is_err(), "more than a slot's block");
    }

    #[test]
    fn resolvers_only_where_egress_reaches_them() {
        let mut c = VmmConfig::new("/tmp/x", Accel::Tcg);
        assert!(c.nameservers_for(EgressPolicy::PublicOnly).is_empty(), "none by default");
        c.guest_nameservers = vec![Ipv4Addr::new(9, 9, 9, 9)];
        c.check_nameservers().unwrap();
        assert_eq!(c.nameservers_for(EgressPolicy::PublicOnly), [Ipv4Addr::new(9, 9, 9, 9)]);
        assert!(c.nameservers_for(EgressPolicy::Deny).is_empty(), "a denied guest reaches no resolver");
        for unreachable in [Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(192, 168, 1, 1), Ipv4Addr::new(127, 0, 0, 53)] {
            c.guest_nameservers = vec![unreachable];
            assert!(matches!(c.check_nameservers(), Err(VmmError::InvalidConfig(_))), "{unreachable}");
        }
    }

    #[test]
    fn limits_are_the_lease_plus_qemu_overhead() {
        let c = VmmConfig::new("/tmp/x", Accel::Tcg);
        let l = c.limits_for(2, 512, 0.5);
        assert_eq!(l.cpu_quota_us, Some(50_000));
        assert_eq!(l.cpu_period_us, CPU_PERIOD_US);
        assert_eq!(l.memory_max_bytes, (512 + 256) << 20);
        assert_eq!(l.pids_max, 128 + 2);
    }
}
