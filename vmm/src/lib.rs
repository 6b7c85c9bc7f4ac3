//! The provider's hypervisor layer: guests, images, cgroups and network isolation.
//!
//! It takes a `VmSpec` and knows nothing of libp2p or of the wire format
//! (docs/architecture.md "Crates and direction of dependencies"). See docs/vmm.md for
//! the design.

pub mod accel;
pub mod account;
pub mod cgroup;
pub mod cgroup_placement;
pub mod disk_header;
pub mod error;
pub mod firmware;
mod forward;
pub mod helper;
mod host_command;
pub mod hypervisor;
pub mod image;
mod launch;
pub mod lease_id;
mod netlink;
mod netns;
pub mod network;
pub mod procfs;
pub mod qemu;
mod qemu_user;
mod qmp;
pub mod readiness;
pub mod seed;
mod shaping;
pub mod spec;
mod tap;
mod traffic;
mod user_name;

pub use accel::{Accel, AccelPolicy, KvmProbe, ProbeOptions, probe_kvm, select_accel};
pub use cgroup::{CgroupLayout, CgroupLimits, CgroupUsage, LeaseCgroup};
pub use error::{ImageError, VmmError};
pub use firmware::Firmware;
pub use forward::ForwardCounters;
pub use hypervisor::{GuestState, Hypervisor, NetUsage, ReconcileReport, RunningVm, VmStatus, VmUsage};
pub use image::{Boot, DiskFormat, DiskRole, GuestImage, MAX_BOOT_DEADLINE_SECS, MachineKind, SeedKind, StockImage};
pub use launch::{LaunchError, LaunchStep};
pub use lease_id::{LeaseId, LeaseIdError};
pub use network::{AddressPool, NamePrefix};
pub use qemu::{Backend, DEFAULT_TCG_TB_SIZE_MIB, QemuHypervisor, VmmConfig};
pub use qemu_user::{DEFAULT_QEMU_USER, QemuUser};
pub use shaping::BandwidthLimits;
pub use spec::{AuthorizedKey, EgressPolicy, HostKeySeed, StartStage, VmSpec};
