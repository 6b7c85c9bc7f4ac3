//! peervm's wire protocol: message types, their CBOR encoding, the signed envelope, and
//! the validation rules every node applies. No I/O and no async runtime: the caller
//! passes bytes in and the current time as a number, so every rule is testable with a
//! fixed clock.
//!
//! The wire format is specified field by field in `docs/protocol.md`.

pub mod advert;
pub mod batch;
pub mod blocklist;
pub mod delegation;
pub mod encoding;
pub mod error;
pub mod identity;
pub mod lease;
pub mod refresh;
pub mod samples;
pub mod signed;
pub mod verified_bytes;

pub use advert::{
    Accel, AdvertError, Advertisement, Disposition, HypervisorInfo, ImageOffer, NetworkOffer, Pricing, Reachability,
    ResourceAmounts, Resources, SshEndpoint,
};
pub use batch::verify_batch;
pub use blocklist::{BlockEntry, BlockList, BlockListError};
pub use delegation::{Delegation, DelegationError};
pub use error::{DecodeError, IdentityError, SignError, VerifyError};
pub use identity::SigningKey;
pub use lease::{
    ControlAction, DenyReason, ExposedPort, FreshnessError, GuestSpec, GuestTraffic, LeaseControl, LeaseId, LeaseReply,
    LeaseRequest, LeaseState, LeaseUsage, MAX_EXPOSED_PORTS, ReplyOutcome, SshAccess,
};
pub use libp2p_identity::PeerId;
pub use multiaddr::Multiaddr;
pub use refresh::{
    HeldToken, IgnoreReason, MAX_BATCH_RECORDS, RefreshChain, RefreshError, RefreshOutcome, RefreshRecord,
    RefreshSecret, RefreshTarget, RejectReason,
};
pub use signed::{Kind, Payload, Signed, Verified};
pub use verified_bytes::VerifiedBytes;

/// The most bytes one sync reply page may have (docs/protocol.md section 2).
pub const MAX_SYNC_REPLY_BYTES: usize = 1024 * 1024;

/// Where a node reads the current time. Production uses the system clock; tests inject a
/// fixed one so every time rule is checked at exact boundaries.
pub trait Clock: Send + Sync {
    fn now_unix_ms(&self) -> u64;
}

/// A clock that always says the same time.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub u64);

impl Clock for FixedClock {
    fn now_unix_ms(&self) -> u64 {
        self.0
    }
}
