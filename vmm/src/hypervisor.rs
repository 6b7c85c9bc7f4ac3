//! The `Hypervisor` trait: the whole control surface the node uses, and the values it
//! returns. The QEMU backend (`QemuHypervisor`) implements it; another backend (libvirt)
//! could follow behind the same trait (docs/vmm.md "Decisions").

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::spec::VmSpec;

/// A guest that is up and whose sshd presented the provisioned host key. Serialisable:
/// the VMM helper returns it to the daemon (docs/vmm.md "The VMM helper").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningVm {
    pub lease_id: LeaseId,
    /// What the guest holds of the host (the helper counts them against the host's
    /// configured totals, also for a guest it re-adopted).
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    /// QEMU's pid on the host.
    pub pid: u32,
    pub accel: Accel,
    /// Where the requestor connects: the provider's SSH address and the lease's port.
    pub ssh_addr: SocketAddr,
    /// The guest's address on its private link.
    pub guest_ip: Ipv4Addr,
    /// Exposed guest ports: `(guest port, host port)`, reached on `ssh_addr`'s address.
    #[serde(default)]
    pub exposed: Vec<(u16, u16)>,
    /// The guest's host key, `ssh-ed25519 AAAA...` (goes into the signed grant).
    pub host_key: String,
    pub started_at: SystemTime,
    /// From `start` to SSH-ready; `None` for a guest re-adopted by `reconcile`.
    pub boot_time: Option<Duration>,
}

/// What QEMU says about its guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestState {
    Running,
    Paused,
    /// QEMU is gone (the guest powered off, or was killed).
    Exited,
    /// QEMU runs but its status could not be read, or is another run state.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub vm: RunningVm,
    pub state: GuestState,
    pub uptime: Duration,
}

/// Resource use of one lease, for monitoring and billing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmUsage {
    /// CPU time of every QEMU thread (vCPUs and device emulation).
    pub cpu_time: Duration,
    /// Time the cgroup was held back by its CPU quota, and how many periods.
    pub cpu_throttled: Duration,
    pub cpu_throttled_periods: u64,
    pub cpu_periods: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: Option<u64>,
    /// SSH bytes from requestors to the guest and back (the forwarder's counters).
    pub ssh_bytes_in: u64,
    pub ssh_bytes_out: u64,
    pub ssh_connections: u64,
    pub uptime: Duration,
    /// The guest's whole traffic on its link, SSH included (docs/vmm.md "Traffic
    /// accounting"); `None` when its counters could not be read. Absent from a helper's
    /// reply that predates it.
    #[serde(default)]
    pub net: Option<NetUsage>,
}

/// A guest's traffic since its network was set up: every counter only grows
/// (`recent_destinations` is a count of now).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetUsage {
    /// To the guest (what the host end of its link sent).
    pub bytes_in: u64,
    pub packets_in: u64,
    /// From the guest (what the host end received, including what the rules then drop).
    pub bytes_out: u64,
    pub packets_out: u64,
    /// New flows the guest started through the host (conntrack state `new`), allowed or
    /// dropped by its egress rules: its outbound connection attempts.
    pub new_connections: u64,
    /// Of those, new TCP connections to port 25 (SMTP).
    pub smtp_connections: u64,
    /// Distinct addresses the guest started connections to in the last minute
    /// (`network::DESTINATIONS_WINDOW_SECS`), at most `network::DESTINATIONS_MAX`: a count
    /// now, the one field here that also shrinks.
    pub recent_destinations: u64,
    /// Packets each isolation rule of the lease's nft table dropped, by the rule's comment
    /// (SECURITY.md invariant 7; docs/vmm.md "nftables").
    pub dropped: BTreeMap<String, u64>,
    /// Packets the bandwidth limits dropped because their queue was full, from and to
    /// the guest (0 without a limit).
    pub limit_dropped_out: u64,
    pub limit_dropped_in: u64,
}

impl NetUsage {
    /// Packets of every isolation rule together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.values().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// What `reconcile` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileReport {
    /// Live guests of leases the caller says are active, now managed again.
    pub adopted: Vec<RunningVm>,
    /// Leases whose state this host held, cleaned up (not active, or their guest died).
    pub removed_leases: Vec<LeaseId>,
    /// Other objects with the project's prefix that no lease owned, removed
    /// (`kind name`, e.g. `netns peervm-...`).
    pub removed_objects: Vec<String>,
    /// What could not be removed (reconcile goes on with the rest).
    pub failed: Vec<String>,
}

/// A backend that runs guests.
pub trait Hypervisor: Send + Sync {
    /// The accelerator guests run on (goes into the advert).
    fn accel(&self) -> Accel;

    /// Provisions and boots a guest; returns once its sshd presents the provisioned host
    /// key. On error nothing of the lease is left behind. Dropping the future does not
    /// interrupt it: the start completes (or cleans up) in the background.
    fn start(&self, spec: VmSpec) -> impl Future<Output = Result<RunningVm, VmmError>> + Send;

    /// Shuts the guest down (ACPI power button, then kill after a deadline) and removes
    /// every resource of the lease.
    fn stop(&self, lease: LeaseId) -> impl Future<Output = Result<(), VmmError>> + Send;

    /// Incident response: cuts the guest off every network (its SSH port is closed and
    /// its link is down) but keeps it running, with its disk and console log, for
    /// inspection until `stop`.
    fn isolate(&self, lease: LeaseId) -> impl Future<Output = Result<(), VmmError>> + Send;

    /// Abuse response (docs/vmm.md "Abuse detection"): holds what the guest sends to
    /// `egress_mbit` Mbit/s from now until it stops, in place of any egress limit it had.
    /// Its network, SSH port and disk are otherwise untouched.
    fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> impl Future<Output = Result<(), VmmError>> + Send;

    fn status(&self, lease: LeaseId) -> impl Future<Output = Result<VmStatus, VmmError>> + Send;

    fn usage(&self, lease: LeaseId) -> impl Future<Output = Result<VmUsage, VmmError>> + Send;

    /// At provider start: re-adopts live guests of `live` leases (a backend that still
    /// runs them, like a VMM helper that outlived its daemon, hands them back as
    /// adopted), cleans up every other lease this host has state for, and removes
    /// everything with the project's name prefix that no lease owns.
    fn reconcile(&self, live: &[LeaseId]) -> impl Future<Output = Result<ReconcileReport, VmmError>> + Send;
}
