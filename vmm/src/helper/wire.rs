//! The VMM helper's protocol on its Unix socket (docs/vmm.md "The VMM helper"): one
//! request per connection; every frame is a 4-byte big-endian length and that many bytes
//! of JSON, at most [`MAX_FRAME`]. A request carries a `version`; the helper answers a
//! start with a `booting` frame when QEMU runs, then one final frame.
//!
//! The request names no path and no interface: the helper derives every name from the
//! lease id and its own configuration, and picks the image by its sha256 among the
//! images it verified itself.

use std::fmt;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroize;

use crate::accel::Accel;
use crate::error::VmmError;
use crate::hypervisor::{ReconcileReport, RunningVm, VmStatus, VmUsage};
use crate::lease_id::LeaseId;
use crate::spec::EgressPolicy;

/// The protocol version both sides must speak.
pub const VERSION: u32 = 1;

/// The largest frame either side sends or reads (64 KiB): far above any real request
/// (a start is under 1 KiB; a reconcile of 1,000 leases about 35 KiB), and small enough
/// that a hostile peer cannot make the helper buffer much.
pub const MAX_FRAME: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: u32,
    pub op: Op,
}

/// What the daemon asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Op {
    /// The helper's accelerator and instance; the daemon's first call.
    Hello,
    Start(StartRequest),
    Stop {
        lease: LeaseId,
    },
    Isolate {
        lease: LeaseId,
    },
    /// Abuse response: the guest's egress held to `egress_mbit` (policy.rs checks it only
    /// lowers what the host's config allows).
    Throttle {
        lease: LeaseId,
        egress_mbit: u32,
    },
    Status {
        lease: LeaseId,
    },
    Usage {
        lease: LeaseId,
    },
    /// The daemon's live leases after its restart: the helper keeps their guests and
    /// removes everything else (`Hypervisor::reconcile`).
    Reconcile {
        live: Vec<LeaseId>,
    },
}

/// A start, as numbers and names the helper checks again (policy.rs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub lease: LeaseId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    /// The sha256 (64 lowercase hex digits) of an image the helper offers.
    pub image: String,
    pub ssh_user: String,
    /// One OpenSSH ed25519 public key line.
    pub authorized_key: String,
    pub host_key_seed: SeedHex,
    pub slot: u32,
    pub egress: EgressPolicy,
    pub cpu_quota: Option<f64>,
    /// Guest TCP ports to expose (host ports are the helper's to pick).
    #[serde(default)]
    pub expose: Vec<u16>,
}

/// The guest's host key seed as 64 hex digits: never printed, zeroised on drop.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SeedHex(pub String);

impl fmt::Debug for SeedHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SeedHex(..)")
    }
}

impl Drop for SeedHex {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    pub version: u32,
    pub reply: ReplyBody,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyBody {
    /// `instance` changes with every start of the helper; `images` are the sha256s of
    /// the images it verified and offers.
    Hello {
        accel: Accel,
        instance: String,
        images: Vec<String>,
    },
    /// A start moved from provisioning to booting (QEMU runs).
    Booting,
    Started(RunningVm),
    /// A stop, isolate or throttle is done.
    Done,
    Status(VmStatus),
    Usage(VmUsage),
    Reconciled(ReconcileReport),
    Error(WireError),
}

/// Why the helper refused a request before acting on it (each has a test in
/// server.rs or policy.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The connecting process is not the daemon's user.
    PeerUid,
    TooLarge,
    Version,
    Malformed,
    /// A name with `/`, `..`, a newline or another character it may not hold.
    BadName,
    /// More than the host's configured totals, alone or with the guests already held.
    Resources,
    UnknownImage,
    UnknownLease,
    BadKey,
    /// Egress the host's config does not allow.
    Egress,
    Slot,
    /// A throttle of 0, or above the host's configured egress limit: it would not slow
    /// the guest down.
    Throttle,
}

impl Refusal {
    pub fn as_str(&self) -> &'static str {
        match self {
            Refusal::PeerUid => "peer_uid",
            Refusal::TooLarge => "too_large",
            Refusal::Version => "version",
            Refusal::Malformed => "malformed",
            Refusal::BadName => "bad_name",
            Refusal::Resources => "resources",
            Refusal::UnknownImage => "unknown_image",
            Refusal::UnknownLease => "unknown_lease",
            Refusal::BadKey => "bad_key",
            Refusal::Egress => "egress",
            Refusal::Slot => "slot",
            Refusal::Throttle => "throttle",
        }
    }
}

/// An error as it crosses the socket: the kinds the daemon tells apart (a guest that
/// did not boot is the requestor's `boot_failed`; an unknown or busy lease changes what
/// the daemon does next) keep their fields; the rest travel as their message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum WireError {
    Refused { reason: Refusal, message: String },
    InvalidSpec { message: String },
    DiskTooSmall { image: String, leased_bytes: u64, needs_bytes: u64 },
    WrongLoginUser { image: String, login_user: String, requested: String },
    QemuExited { lease: LeaseId, status: String, console: String },
    NotReady { lease: LeaseId, waited_secs: u64, last_error: String },
    HostKeyMismatch { lease: LeaseId, presented: String, expected: String },
    UnknownLease { lease: LeaseId },
    LeaseExists { lease: LeaseId },
    Busy { lease: LeaseId },
    SlotInUse { slot: u32, holder: LeaseId },
    Other { message: String },
}

impl From<&VmmError> for WireError {
    fn from(e: &VmmError) -> Self {
        match e {
            VmmError::InvalidSpec(m) => WireError::InvalidSpec { message: m.clone() },
            VmmError::DiskTooSmall { image, leased_bytes, needs_bytes } => {
                WireError::DiskTooSmall { image: image.clone(), leased_bytes: *leased_bytes, needs_bytes: *needs_bytes }
            }
            VmmError::WrongLoginUser { image, login_user, requested } => WireError::WrongLoginUser {
                image: image.clone(),
                login_user: login_user.clone(),
                requested: requested.clone(),
            },
            VmmError::QemuExited { lease, status, console } => {
                WireError::QemuExited { lease: *lease, status: status.clone(), console: console.clone() }
            }
            VmmError::NotReady { lease, waited_secs, last_error } => {
                WireError::NotReady { lease: *lease, waited_secs: *waited_secs, last_error: last_error.clone() }
            }
            VmmError::HostKeyMismatch { lease, presented, expected } => {
                WireError::HostKeyMismatch { lease: *lease, presented: presented.clone(), expected: expected.clone() }
            }
            VmmError::UnknownLease(lease) => WireError::UnknownLease { lease: *lease },
            VmmError::LeaseExists(lease) => WireError::LeaseExists { lease: *lease },
            VmmError::Busy(lease) => WireError::Busy { lease: *lease },
            VmmError::SlotInUse { slot, holder } => WireError::SlotInUse { slot: *slot, holder: *holder },
            other => WireError::Other { message: other.to_string() },
        }
    }
}

impl WireError {
    /// The error as the daemon's side of the trait returns it.
    pub fn into_vmm(self) -> VmmError {
        use super::error::HelperError;
        match self {
            WireError::Refused { reason, message } => HelperError::Refused { reason, message }.into(),
            WireError::InvalidSpec { message } => VmmError::InvalidSpec(message),
            WireError::DiskTooSmall { image, leased_bytes, needs_bytes } => {
                VmmError::DiskTooSmall { image, leased_bytes, needs_bytes }
            }
            WireError::WrongLoginUser { image, login_user, requested } => {
                VmmError::WrongLoginUser { image, login_user, requested }
            }
            WireError::QemuExited { lease, status, console } => VmmError::QemuExited { lease, status, console },
            WireError::NotReady { lease, waited_secs, last_error } => {
                VmmError::NotReady { lease, waited_secs, last_error }
            }
            WireError::HostKeyMismatch { lease, presented, expected } => {
                VmmError::HostKeyMismatch { lease, presented, expected }
            }
            WireError::UnknownLease { lease } => VmmError::UnknownLease(lease),
            WireError::LeaseExists { lease } => VmmError::LeaseExists(lease),
            WireError::Busy { lease } => VmmError::Busy(lease),
            WireError::SlotInUse { slot, holder } => VmmError::SlotInUse { slot, holder },
            WireError::Other { message } => HelperError::Remote(message).into(),
        }
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("a frame of {len} bytes is over the {MAX_FRAME}-byte cap")]
    TooLarge { len: usize },
    #[error("the peer closed the connection")]
    Closed,
}

/// Writes one frame of `value` as JSON.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(w: &mut W, value: &T) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Io(e.into()))?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len() });
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame's bytes; a length over the cap is refused before anything of the
/// body is read.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge { len });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Closed,
        _ => FrameError::Io(e),
    })?;
    Ok(body)
}

/// Decodes a request: its version first, so that a request of another version is
/// told apart from a malformed one.
pub fn decode_request(body: &[u8]) -> Result<Request, (Refusal, String)> {
    #[derive(Deserialize)]
    struct Versioned {
        version: Option<u32>,
    }
    let versioned: Versioned = serde_json::from_slice(body)
        .map_err(|e| (Refusal::Malformed, format!("the request is not a JSON object with a version: {e}")))?;
    match versioned.version {
        Some(VERSION) => {}
        Some(other) => {
            return Err((
                Refusal::Version,
                format!("protocol version {other} is not spoken here (this helper speaks {VERSION})"),
            ));
        }
        None => return Err((Refusal::Malformed, "the request has no version".into())),
    }
    serde_json::from_slice(body).map_err(|e| (Refusal::Malformed, format!("the request is malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start() -> StartRequest {
        StartRequest {
            lease: LeaseId::from_bytes([1; 16]),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: "ab".repeat(32),
            ssh_user: "peervm".into(),
            authorized_key: "ssh-ed25519 AAAA".into(),
            host_key_seed: SeedHex("00".repeat(32)),
            slot: 0,
            egress: EgressPolicy::Deny,
            cpu_quota: None,
            expose: vec![8080],
        }
    }

    #[tokio::test]
    async fn a_request_round_trips_through_a_frame() {
        let req = Request { version: VERSION, op: Op::Start(start()) };
        let mut buf = Vec::new();
        write_frame(&mut buf, &req).await.unwrap();
        assert_eq!(u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize, buf.len() - 4);
        let body = read_frame(&mut buf.as_slice()).await.unwrap();
        assert_eq!(decode_request(&body).unwrap(), req);
        assert!(!format!("{req:?}").contains(&"00".repeat(32)), "the seed is not printed");
    }

    #[tokio::test]
    async fn a_frame_over_the_cap_is_refused_before_its_body_is_read() {
        let mut buf = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        // no body at all: reading it would fail with Closed, not TooLarge
        assert!(
            matches!(read_frame(&mut buf.as_slice()).await, Err(FrameError::TooLarge { len }) if len == MAX_FRAME + 1)
        );
        buf.truncate(2);
        assert!(matches!(read_frame(&mut buf.as_slice()).await, Err(FrameError::Closed)));
        let huge = Request { version: VERSION, op: Op::Reconcile { live: vec![LeaseId::from_bytes([0; 16]); 3000] } };
        assert!(matches!(write_frame(&mut Vec::new(), &huge).await, Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn another_version_is_told_apart_from_a_malformed_request() {
        let v2 = br#"{"version":2,"op":{"something_new":{}}}"#;
        assert_eq!(decode_request(v2).unwrap_err().0, Refusal::Version);
        assert_eq!(decode_request(br#"{"op":"hello"}"#).unwrap_err().0, Refusal::Malformed);
        assert_eq!(decode_request(br#"{"version":1,"op":"reboot_host"}"#).unwrap_err().0, Refusal::Malformed);
        assert_eq!(decode_request(br#"{"version":1,"op":"hello","path":"/etc"}"#).unwrap_err().0, Refusal::Malformed);
        assert_eq!(decode_request(b"\xff\xfe").unwrap_err().0, Refusal::Malformed);
        assert_eq!(decode_request(br#"{"version":1,"op":"hello"}"#).unwrap().op, Op::Hello);
    }

    #[test]
    fn errors_the_daemon_tells_apart_keep_their_kind_across_the_socket() {
        let lease = LeaseId::from_bytes([2; 16]);
        let cases = [
            VmmError::NotReady { lease, waited_secs: 9, last_error: "x".into() },
            VmmError::QemuExited { lease, status: "exit 1".into(), console: "c".into() },
            VmmError::HostKeyMismatch { lease, presented: "a".into(), expected: "b".into() },
            VmmError::UnknownLease(lease),
            VmmError::Busy(lease),
        ];
        for e in cases {
            let wire: WireError = (&e).into();
            let json = serde_json::to_string(&wire).unwrap();
            let back: WireError = serde_json::from_str(&json).unwrap();
            assert_eq!(back.into_vmm().to_string(), e.to_string(), "{json}");
        }
        let other = WireError::from(&VmmError::InvalidConfig("x".into())).into_vmm();
        assert!(other.to_string().contains("invalid vmm configuration: x"), "{other}");
    }
}
