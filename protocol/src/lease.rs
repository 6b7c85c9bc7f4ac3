//! Lease messages (docs/protocol.md sections 5-7): the requestor's signed request and control
//! messages, and the provider's signed replies.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::advert::{MAX_CLOCK_SKEW_MS, MAX_TEXT_LEN, ResourceAmounts};
use crate::encoding;
use crate::identity::peer_id_serde;
use crate::signed::{Kind, Payload, Signed};

pub const LEASE_VERSION: u32 = 1;
/// A request or control message is valid for at most 60 s: a captured one cannot be
/// replayed later, and the provider only has to remember nonces for that long plus skew.
pub const MAX_REQUEST_VALIDITY_MS: u64 = 60_000;
/// The longest lease one request may ask for (30 days).
pub const MAX_LEASE_SECS: u64 = 30 * 24 * 3600;

/// A 128-bit random lease identifier chosen by the requestor.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseId(#[serde(with = "encoding::fixed_bytes")] pub [u8; 16]);

impl LeaseId {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(LeaseId(out))
    }
}

impl std::fmt::Debug for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LeaseId({})", self.to_hex())
    }
}

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The guest a requestor asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub image_name: String,
    #[serde(with = "encoding::fixed_bytes")]
    pub image_sha256: [u8; 32],
    /// TCP ports of the guest to reach from outside, each mapped to a port of the
    /// provider (docs/protocol.md, "Exposed ports"). Absent from the encoding when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose: Vec<u16>,
}

/// Most guest ports one lease may ask to expose (a provider may allow fewer: its advert's
/// `network.max_exposed_ports`).
pub const MAX_EXPOSED_PORTS: usize = 16;

/// A guest port reachable at a port of the provider's SSH host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ExposedPort {
    pub guest_port: u16,
    pub host_port: u16,
}

impl GuestSpec {
    pub fn resources(&self) -> ResourceAmounts {
        ResourceAmounts { vcpus: self.vcpus, memory_mib: self.memory_mib, disk_gib: self.disk_gib }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRequest {
    pub version: u32,
    pub lease_id: LeaseId,
    #[serde(with = "peer_id_serde")]
    pub requestor: PeerId,
    #[serde(with = "peer_id_serde")]
    pub provider: PeerId,
    /// The advert seq whose terms the requestor accepts.
    pub advert_seq: u64,
    pub spec: GuestSpec,
    pub duration_secs: u64,
    /// The most the requestor will pay per hour, in micro-units of `currency`.
    pub max_price_per_hour_micros: u64,
    pub currency: String,
    pub ssh_user: String,
    /// The requestor's raw ed25519 SSH public key: the only way into the guest.
    #[serde(with = "encoding::fixed_bytes")]
    pub ssh_public_key: [u8; 32],
    #[serde(with = "encoding::fixed_bytes")]
    pub nonce: [u8; 16],
    pub issued_at_unix_ms: u64,
    pub valid_until_unix_ms: u64,
}

impl Payload for LeaseRequest {
    const KIND: Kind = Kind::LeaseRequest;
    const VERSION: u32 = LEASE_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.requestor
    }
}

/// What a requestor may do with its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAction {
    Status,
    Extend { additional_secs: u64 },
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseControl {
    pub version: u32,
    pub lease_id: LeaseId,
    #[serde(with = "peer_id_serde")]
    pub requestor: PeerId,
    #[serde(with = "peer_id_serde")]
    pub provider: PeerId,
    pub action: ControlAction,
    #[serde(with = "encoding::fixed_bytes")]
    pub nonce: [u8; 16],
    pub issued_at_unix_ms: u64,
    pub valid_until_unix_ms: u64,
}

impl Payload for LeaseControl {
    const KIND: Kind = Kind::LeaseControl;
    const VERSION: u32 = LEASE_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.requestor
    }
}

/// Typed reasons for a denial. Stable on the wire (snake_case names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    BadSignature,
    Malformed,
    UnsupportedVersion,
    WrongProvider,
    Stale,
    Replay,
    Blocked,
    RateLimited,
    UnknownImage,
    PriceTooLow,
    NoCapacity,
    InvalidSpec,
    UnknownLease,
    NotRequestor,
    Locked,
    LeaseEnded,
    /// The guest was started but never became ready: QEMU refused the image (e.g. a
    /// kernel that is not x86_64) or exited, or no SSH server with the lease's host key
    /// answered within the image's boot deadline. Nothing of the lease is left running.
    BootFailed,
    Internal,
}

impl DenyReason {
    /// Every reason, in declaration order.
    pub const ALL: [DenyReason; 18] = [
        DenyReason::BadSignature,
        DenyReason::Malformed,
        DenyReason::UnsupportedVersion,
        DenyReason::WrongProvider,
        DenyReason::Stale,
        DenyReason::Replay,
        DenyReason::Blocked,
        DenyReason::RateLimited,
        DenyReason::UnknownImage,
        DenyReason::PriceTooLow,
        DenyReason::NoCapacity,
        DenyReason::InvalidSpec,
        DenyReason::UnknownLease,
        DenyReason::NotRequestor,
        DenyReason::Locked,
        DenyReason::LeaseEnded,
        DenyReason::BootFailed,
        DenyReason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::BadSignature => "bad_signature",
            DenyReason::Malformed => "malformed",
            DenyReason::UnsupportedVersion => "unsupported_version",
            DenyReason::WrongProvider => "wrong_provider",
            DenyReason::Stale => "stale",
            DenyReason::Replay => "replay",
            DenyReason::Blocked => "blocked",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::UnknownImage => "unknown_image",
            DenyReason::PriceTooLow => "price_too_low",
            DenyReason::NoCapacity => "no_capacity",
            DenyReason::InvalidSpec => "invalid_spec",
            DenyReason::UnknownLease => "unknown_lease",
            DenyReason::NotRequestor => "not_requestor",
            DenyReason::Locked => "locked",
            DenyReason::LeaseEnded => "lease_ended",
            DenyReason::BootFailed => "boot_failed",
            DenyReason::Internal => "internal",
        }
    }
}

impl std::fmt::Display for DenyReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The states a lease moves through on the provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseState {
    Requested,
    Provisioning,
    Booting,
    Running,
    Stopping,
    Ended,
    Failed,
}

impl LeaseState {
    /// Every state, in the order a lease moves through them.
    pub const ALL: [LeaseState; 7] = [
        LeaseState::Requested,
        LeaseState::Provisioning,
        LeaseState::Booting,
        LeaseState::Running,
        LeaseState::Stopping,
        LeaseState::Ended,
        LeaseState::Failed,
    ];

    /// The snake_case wire name (also what the node's databases and JSON output store).
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseState::Requested => "requested",
            LeaseState::Provisioning => "provisioning",
            LeaseState::Booting => "booting",
            LeaseState::Running => "running",
            LeaseState::Stopping => "stopping",
            LeaseState::Ended => "ended",
            LeaseState::Failed => "failed",
        }
    }

    /// The state named `name` (its exact wire name), if any.
    pub fn from_name(name: &str) -> Option<LeaseState> {
        Self::ALL.into_iter().find(|state| state.as_str() == name)
    }

    /// Ended or failed: the lease holds no resources and never comes back.
    pub fn is_finished(self) -> bool {
        matches!(self, LeaseState::Ended | LeaseState::Failed)
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the requestor reaches its guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshAccess {
    pub host: String,
    pub port: u16,
    pub user: String,
}

/// Resource use of a running lease, from its cgroup and its network counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LeaseUsage {
    pub cpu_usec: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    /// SSH bytes from the requestor to the guest and back (the provider's forwarder).
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
    pub uptime_secs: u64,
    /// The guest's whole traffic on its link, SSH included. Absent from the encoding when
    /// `None` (a provider that does not count it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_net: Option<GuestTraffic>,
}

/// Everything a lease's guest received and sent, from the provider's counters of its link
/// (docs/protocol.md section 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GuestTraffic {
    /// To the guest.
    pub rx_bytes: u64,
    pub rx_packets: u64,
    /// From the guest.
    pub tx_bytes: u64,
    pub tx_packets: u64,
    /// Connections (new flows) the guest opened to the outside, allowed or not.
    pub new_connections: u64,
    /// Packets to or from the guest that the provider's isolation rules dropped.
    pub dropped_packets: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyOutcome {
    /// The guest is up and its sshd shows `host_key`: a receipt for the lease.
    Granted {
        access: SshAccess,
        /// The guest's raw ed25519 SSH host key, generated by the provider for this lease.
        #[serde(with = "encoding::fixed_bytes")]
        host_key: [u8; 32],
        started_at_unix_ms: u64,
        ends_at_unix_ms: u64,
        price_per_hour_micros: u64,
        currency: String,
        /// Where each exposed guest port is reached (on `access.host`), in the order the
        /// request named them. Absent from the encoding when empty.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        exposed: Vec<ExposedPort>,
    },
    Denied {
        reason: DenyReason,
        detail: String,
    },
    Status {
        state: LeaseState,
        ends_at_unix_ms: u64,
        usage: Option<LeaseUsage>,
    },
    Extended {
        ends_at_unix_ms: u64,
    },
    Terminated {
        at_unix_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseReply {
    pub version: u32,
    pub lease_id: LeaseId,
    #[serde(with = "peer_id_serde")]
    pub provider: PeerId,
    #[serde(with = "peer_id_serde")]
    pub requestor: PeerId,
    /// SHA-256 of the signed payload bytes this replies to, binding reply to request.
    #[serde(with = "encoding::fixed_bytes")]
    pub in_reply_to: [u8; 32],
    pub issued_at_unix_ms: u64,
    pub outcome: ReplyOutcome,
}

impl Payload for LeaseReply {
    const KIND: Kind = Kind::LeaseReply;
    const VERSION: u32 = LEASE_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.provider
    }
}

/// SHA-256 of a signed message's payload: what a reply's `in_reply_to` holds.
pub fn payload_digest<T: Payload>(signed: &Signed<T>) -> [u8; 32] {
    Sha256::digest(signed.payload_bytes()).into()
}

/// Why a request or control message is not fresh or not for this provider.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FreshnessError {
    #[error("addressed to provider {addressed}, not to this one ({this})")]
    WrongProvider { addressed: String, this: String },
    #[error("issued at {issued_at_unix_ms}, more than {MAX_CLOCK_SKEW_MS} ms after now ({now_unix_ms})")]
    IssuedInFuture { issued_at_unix_ms: u64, now_unix_ms: u64 },
    #[error("valid until {valid_until_unix_ms}, which has passed (now {now_unix_ms})")]
    Expired { valid_until_unix_ms: u64, now_unix_ms: u64 },
    #[error("validity window of {window_ms} ms is over the {MAX_REQUEST_VALIDITY_MS} ms limit or negative")]
    WindowTooLong { window_ms: i128 },
}

impl FreshnessError {
    pub fn deny_reason(&self) -> DenyReason {
        match self {
            FreshnessError::WrongProvider { .. } => DenyReason::WrongProvider,
            _ => DenyReason::Stale,
        }
    }
}

/// The freshness rule of docs/protocol.md section 5, shared by requests and control messages:
/// addressed to `this_provider`, `issued_at <= now + 30 s`, `valid_until > now`, and
/// `0 <= valid_until - issued_at <= 60 s`.
fn check_fresh(
    provider: &PeerId,
    issued_at_unix_ms: u64,
    valid_until_unix_ms: u64,
    this_provider: &PeerId,
    now_unix_ms: u64,
) -> Result<(), FreshnessError> {
    if provider != this_provider {
        return Err(FreshnessError::WrongProvider { addressed: provider.to_string(), this: this_provider.to_string() });
    }
    let window_ms = i128::from(valid_until_unix_ms) - i128::from(issued_at_unix_ms);
    if !(0..=i128::from(MAX_REQUEST_VALIDITY_MS)).contains(&window_ms) {
        return Err(FreshnessError::WindowTooLong { window_ms });
    }
    if issued_at_unix_ms > now_unix_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
        return Err(FreshnessError::IssuedInFuture { issued_at_unix_ms, now_unix_ms });
    }
    if valid_until_unix_ms <= now_unix_ms {
        return Err(FreshnessError::Expired { valid_until_unix_ms, now_unix_ms });
    }
    Ok(())
}

/// Problems with a request's contents that no provider could satisfy.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid lease request: {0}")]
pub struct SpecError(pub String);

impl LeaseRequest {
    pub fn check_fresh(&self, this_provider: &PeerId, now_unix_ms: u64) -> Result<(), FreshnessError> {
        check_fresh(&self.provider, self.issued_at_unix_ms, self.valid_until_unix_ms, this_provider, now_unix_ms)
    }

    /// Checks that do not depend on the provider's state: sizes and names in range.
    pub fn check_well_formed(&self) -> Result<(), SpecError> {
        let s = &self.spec;
        if s.vcpus == 0 || s.memory_mib == 0 || s.disk_gib == 0 {
            return Err(SpecError("vcpus, memory and disk must all be above zero".into()));
        }
        if self.duration_secs == 0 || self.duration_secs > MAX_LEASE_SECS {
            return Err(SpecError(format!("duration must be 1..={MAX_LEASE_SECS} s, got {}", self.duration_secs)));
        }
        if s.image_name.is_empty() || s.image_name.len() > MAX_TEXT_LEN {
            return Err(SpecError("image name must be 1-128 bytes".into()));
        }
        if s.expose.len() > MAX_EXPOSED_PORTS {
            return Err(SpecError(format!("{} exposed ports asked; at most {MAX_EXPOSED_PORTS}", s.expose.len())));
        }
        for (i, p) in s.expose.iter().enumerate() {
            if *p == 0 || *p == 22 {
                return Err(SpecError(format!(
                    "guest port {p} cannot be exposed (22 is the lease's SSH endpoint; 0 is no port)"
                )));
            }
            if s.expose[..i].contains(p) {
                return Err(SpecError(format!("guest port {p} is asked twice")));
            }
        }
        if !is_valid_unix_user(&self.ssh_user) {
            return Err(SpecError(format!(
                "ssh user `{}` must be 1-32 characters of a-z, 0-9, `_` or `-`, starting with a letter or `_`",
                self.ssh_user.escape_debug()
            )));
        }
        Ok(())
    }
}

impl LeaseControl {
    pub fn check_fresh(&self, this_provider: &PeerId, now_unix_ms: u64) -> Result<(), FreshnessError> {
        check_fresh(&self.provider, self.issued_at_unix_ms, self.valid_until_unix_ms, this_provider, now_unix_ms)
    }
}

/// A portable POSIX user name: it goes into the guest's passwd file and cloud-init.
pub fn is_valid_unix_user(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 32
        && (bytes[0].is_ascii_lowercase() || bytes[0] == b'_')
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_' || *b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_the_wire_names_and_round_trip() {
        for state in LeaseState::ALL {
            let mut cbor = Vec::new();
            ciborium::into_writer(&state, &mut cbor).unwrap();
            let wire: String = ciborium::from_reader(cbor.as_slice()).unwrap();
            assert_eq!(wire, state.as_str());
            assert_eq!(LeaseState::from_name(state.as_str()), Some(state));
        }
        assert_eq!(LeaseState::from_name("Running"), None);
        let finished: Vec<_> = LeaseState::ALL.into_iter().filter(|s| s.is_finished()).collect();
        assert_eq!(finished, [LeaseState::Ended, LeaseState::Failed]);
    }

    #[test]
    fn deny_reason_names_are_the_wire_names_and_round_trip() {
        for reason in DenyReason::ALL {
            let mut cbor = Vec::new();
            ciborium::into_writer(&reason, &mut cbor).unwrap();
            let wire: String = ciborium::from_reader(cbor.as_slice()).unwrap();
            assert_eq!(wire, reason.as_str());
            assert_eq!(ciborium::from_reader::<DenyReason, _>(cbor.as_slice()).unwrap(), reason);
        }
        // the name docs/protocol.md gives for a guest that never became ready
        assert_eq!(DenyReason::BootFailed.as_str(), "boot_failed");
        let names: std::collections::HashSet<_> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), DenyReason::ALL.len(), "each reason has its own name");
    }
}
