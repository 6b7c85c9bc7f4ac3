//! The crate's typed errors. A message names what failed, on which input, and what an
//! operator can do about it (STYLE: typed errors per crate).

use std::io;
use std::path::PathBuf;

use crate::lease_id::LeaseId;

/// Anything that can go wrong while checking a guest image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image manifest {path}: {source}")]
    ReadManifest {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("image manifest {path} is not valid: {reason}")]
    BadManifest { path: PathBuf, reason: String },
    #[error("cannot read image file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "image file {path} does not match its manifest: size {actual_size} bytes, sha256 {actual_sha256}; \
         the manifest pins size {expected_size}, sha256 {expected_sha256}. The image is corrupted or was \
         modified: refusing to use it (rebuild it, e.g. scripts/build-guest-image --force)"
    )]
    HashMismatch { path: PathBuf, expected_sha256: String, actual_sha256: String, expected_size: u64, actual_size: u64 },
    #[error(
        "image manifest {path} gives disk_format {format:?}; only \"qcow2\" and \"raw\" are supported \
         (QEMU is always told the format, never left to probe it)"
    )]
    UnsupportedDiskFormat { path: PathBuf, format: String },
    #[error("image disk {path} is refused: {reason}")]
    UnsafeDisk { path: PathBuf, reason: String },
    #[error(
        "stock image file {path} has sha256 {actual_sha256}; provider.toml pins {expected_sha256}. A different \
         or corrupted file: refusing to use it (compare with the distribution's published checksums and fix \
         the file or the sha256)"
    )]
    StockHashMismatch { path: PathBuf, expected_sha256: String, actual_sha256: String },
    #[error("stock image {name:?}: {reason}")]
    BadStockImage { name: String, reason: String },
    #[error(
        "firmware {firmware:?} needs {path}, which is missing: install Debian's `ovmf` package (scripts/install-deps)"
    )]
    FirmwareMissing { firmware: &'static str, path: PathBuf },
}

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    #[error("invalid vmm configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "image {image} needs a disk of at least {needs_bytes} bytes ({needs_gib} GiB, the size of its disk); \
         the lease asks for {leased_bytes} bytes ({leased_gib} GiB)",
        needs_gib = gib(*.needs_bytes),
        leased_gib = gib(*.leased_bytes)
    )]
    DiskTooSmall { image: String, leased_bytes: u64, needs_bytes: u64 },
    #[error("image {image} is laid out for the user {login_user:?}; the lease asks for {requested:?}")]
    WrongLoginUser { image: String, login_user: String, requested: String },
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error("network namespace {name}: cannot {action}: {source}")]
    Namespace {
        name: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("link {name}{}: cannot {action}: {source}", in_namespace(netns))]
    Link {
        name: String,
        /// `None`: the host's namespace.
        netns: Option<String>,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("netlink{}: cannot {action}: {source}", in_namespace(netns))]
    Netlink {
        /// `None`: the host's namespace.
        netns: Option<String>,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("address {addr} on link {link}: cannot add: {source}")]
    Address {
        addr: String,
        link: String,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path}: {reason}")]
    Cgroup { path: PathBuf, reason: String },
    #[error("no usable cgroup hierarchy: {0}")]
    NoCgroups(String),
    #[error("QEMU user {user}: {reason}")]
    QemuUser { user: String, reason: String },
    #[error("QMP of lease {lease}: {reason}")]
    Qmp { lease: LeaseId, reason: String },
    #[error("QEMU of lease {lease} could not be started: {reason}")]
    Spawn { lease: LeaseId, reason: String },
    /// The launch of QEMU failed at a step of its own (launch.rs), named with what it
    /// acted on.
    #[error("QEMU of lease {lease} could not be started: {source}")]
    Launch {
        lease: LeaseId,
        #[source]
        source: crate::launch::LaunchError,
    },
    #[error("QEMU of lease {lease} exited before its guest was ready ({status}); console log tail:\n{console}")]
    QemuExited { lease: LeaseId, status: String, console: String },
    #[error("guest of lease {lease} was not ready within {waited_secs} s (last attempt: {last_error})")]
    NotReady { lease: LeaseId, waited_secs: u64, last_error: String },
    #[error("guest of lease {lease} presented SSH host key {presented}, not the provisioned {expected}")]
    HostKeyMismatch { lease: LeaseId, presented: String, expected: String },
    #[error("lease {0} is not running on this host")]
    UnknownLease(LeaseId),
    #[error("lease {0} already has a guest or leftover state here (run reconcile first)")]
    LeaseExists(LeaseId),
    #[error("lease {0} is being started or stopped; try again when that is done")]
    Busy(LeaseId),
    #[error("network slot {slot} is already used by lease {holder}")]
    SlotInUse { slot: u32, holder: LeaseId },
    #[error("cannot listen for SSH on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Helper(#[from] crate::helper::HelperError),
    #[error("libvirt at {uri}: cannot {action}: {reason}{}", libvirt_hint(reason))]
    Libvirt { uri: String, action: String, reason: String },
    #[error(
        "libvirt domain {name} carries the lease name prefix but was not made by this provider (no peervm \
         metadata, or persistent): left alone; rename or remove it by hand (virsh undefine/destroy)"
    )]
    ForeignDomain { name: String },
    #[error(
        "KVM is unusable ({reason}) and the accel policy does not allow software emulation (TCG); \
         fix KVM or allow TCG in the provider config"
    )]
    NoAcceleration { reason: String },
}

/// " in namespace X" for a link inside a lease namespace, nothing for the host's.
fn in_namespace(netns: &Option<String>) -> String {
    netns.as_ref().map_or(String::new(), |ns| format!(" in namespace {ns}"))
}

/// What an operator can do when libvirtd does not answer.
fn libvirt_hint(reason: &str) -> &'static str {
    if reason.contains("Failed to connect socket")
        || reason.contains("No such file")
        || reason.contains("Connection refused")
    {
        " (is libvirtd running? `scripts/install-deps --libvirt` installs and starts it; with systemd: \
         systemctl start libvirtd)"
    } else {
        ""
    }
}

/// Bytes as GiB with two decimals, for messages a requestor reads.
fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / f64::from(1u32 << 30))
}

impl VmmError {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        VmmError::Io { what, path: path.into(), source }
    }
}
