//! The provider advertisement (docs/protocol.md section 4) and its accept rule.

use libp2p_identity::PeerId;
use multiaddr::Multiaddr;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::encoding;
use crate::identity::peer_id_serde;
use crate::refresh::RefreshChain;
use crate::signed::{Kind, Payload, Verified};

/// Payload version of [`Advertisement`] this build speaks.
pub const ADVERT_VERSION: u32 = 1;
/// An advert lives at most this long: a dead provider's offer must age out of every store
/// within 5 minutes (the guides' promise).
pub const MAX_ADVERT_LIFETIME_MS: u64 = 300_000;
/// Clocks of honest nodes differ; an advert issued this far in the future is still fine.
pub const MAX_CLOCK_SKEW_MS: u64 = 30_000;
pub const MAX_LISTEN_ADDRS: usize = 16;
pub const MAX_IMAGES: usize = 32;
/// Longest string field (names, regions, hosts, payout addresses).
pub const MAX_TEXT_LEN: usize = 128;

/// What a provider offers. Signed by the provider; the provider field must equal the
/// signer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    pub version: u32,
    #[serde(with = "peer_id_serde")]
    pub provider: PeerId,
    /// Strictly increasing per provider: a higher seq replaces a lower one.
    pub seq: u64,
    pub issued_at_unix_ms: u64,
    pub expires_at_unix_ms: u64,
    /// Where the provider's libp2p node listens (binary multiaddrs).
    #[serde(with = "encoding::multiaddrs")]
    pub listen_addrs: Vec<Multiaddr>,
    pub ssh: SshEndpoint,
    pub resources: Resources,
    pub pricing: Pricing,
    /// Free-form region label such as `eu-central`.
    pub region: String,
    /// ISO 3166-1 alpha-2 country code, when the provider says.
    pub country: Option<String>,
    pub hypervisor: HypervisorInfo,
    pub images: Vec<ImageOffer>,
    /// Payout address of the beneficiary, opaque to the protocol.
    pub beneficiary: Option<String>,
    /// A withdrawn advert removes the provider from every store at once.
    pub withdrawn: bool,
    /// The owner's signed delegation to this node key (a `Signed<Delegation>`), when the
    /// node runs for an owner. Absent from the encoding when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "encoding::opt_bytes")]
    pub delegation: Option<Vec<u8>>,
    /// What the provider's last port verification found (peers dialed it back). Reported
    /// by the provider itself: informative, not a proof. Absent from the encoding when
    /// `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachability: Option<Reachability>,
    /// What a lease's guest gets of the network beyond SSH (docs/protocol.md, "Exposed
    /// ports") and its bandwidth limits. Absent from the encoding when `None` (no port
    /// exposed, no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkOffer>,
    /// The hash chain whose tokens keep this advert live without re-signing it
    /// (docs/protocol.md section 4a). Absent from the encoding when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshChain>,
}

/// A provider's network terms for a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkOffer {
    /// TCP ports of the guest a lease may expose (each on a port of the SSH host).
    pub max_exposed_ports: u16,
    /// Whether guest ports below 1024 may be exposed.
    pub privileged_ports: bool,
    /// A lease's guest sends at most this many megabits (10^6 bits) per second, held by
    /// the provider's kernel. Absent from the encoding when `None` (no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_mbit: Option<u32>,
    /// A lease's guest receives at most this many megabits per second. Absent from the
    /// encoding when `None` (no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_mbit: Option<u32>,
}

/// The outcome of a provider's dial-back port verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reachability {
    pub checked_at_unix_ms: u64,
    /// Its libp2p TCP port answered from outside.
    pub libp2p_open: bool,
    /// Its SSH port range is not filtered from outside.
    pub ssh_reachable: bool,
}

/// Where requestors reach their guests' SSH servers: one port per lease, from a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshEndpoint {
    pub host: String,
    pub port_min: u16,
    pub port_max: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResourceAmounts {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

impl ResourceAmounts {
    /// True when `self` has at least as much of every resource as `need`.
    pub fn covers(&self, need: &ResourceAmounts) -> bool {
        self.vcpus >= need.vcpus && self.memory_mib >= need.memory_mib && self.disk_gib >= need.disk_gib
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub total: ResourceAmounts,
    pub free: ResourceAmounts,
}

/// Prices per hour in integer micro-units of `currency` (no floating point money).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pricing {
    /// Currency or token code, 1-12 characters of `A-Z0-9`, e.g. `USD`, `EUR`, `USDC`.
    pub currency: String,
    pub per_vcpu_hour_micros: u64,
    pub per_memory_gib_hour_micros: u64,
    pub per_disk_gib_hour_micros: u64,
}

impl Pricing {
    /// Price per hour of `spec` in micro-units, rounded up, or `None` on overflow. Memory
    /// is priced per GiB and prorated per MiB. Both sides compute the same number.
    pub fn hourly_micros(&self, spec: &ResourceAmounts) -> Option<u64> {
        hourly_price_micros(
            self.per_vcpu_hour_micros,
            self.per_memory_gib_hour_micros,
            self.per_disk_gib_hour_micros,
            spec,
        )
    }
}

/// The price formula, on the bare rates (indexes that keep rates apart from the advert
/// use it too, so there is one formula): `vcpus * per_vcpu + ceil(per_memory_gib *
/// memory_mib / 1024) + disk_gib * per_disk_gib`, or `None` past 64 bits.
pub fn hourly_price_micros(
    per_vcpu: u64,
    per_memory_gib: u64,
    per_disk_gib: u64,
    spec: &ResourceAmounts,
) -> Option<u64> {
    let cpu = u128::from(per_vcpu) * u128::from(spec.vcpus);
    let mem = (u128::from(per_memory_gib) * u128::from(spec.memory_mib)).div_ceil(1024);
    let disk = u128::from(per_disk_gib) * u128::from(spec.disk_gib);
    u64::try_from(cpu.checked_add(mem)?.checked_add(disk)?).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Accel {
    /// Hardware virtualisation; the provider's probe boot succeeded.
    Kvm,
    /// Software emulation: slower, and only advertised when the provider allows it.
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator `{other}` (expected kvm or tcg)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HypervisorInfo {
    pub accel: Accel,
    /// Guest architecture, e.g. `x86_64`.
    pub arch: String,
}

/// A guest image the provider can boot, pinned by the sha256 of its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageOffer {
    pub name: String,
    #[serde(with = "encoding::fixed_bytes")]
    pub sha256: [u8; 32],
}

impl Payload for Advertisement {
    const KIND: Kind = Kind::Advert;
    const VERSION: u32 = ADVERT_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.provider
    }
}

/// Why an advert was not accepted. [`AdvertError::disposition`] says whether the sender
/// misbehaved (reject and penalise) or the advert is merely old news (ignore).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdvertError {
    #[error("advert expired at {expires_at_unix_ms} (now {now_unix_ms})")]
    Expired { expires_at_unix_ms: u64, now_unix_ms: u64 },
    #[error("advert issued at {issued_at_unix_ms}, more than {MAX_CLOCK_SKEW_MS} ms after now ({now_unix_ms})")]
    IssuedInFuture { issued_at_unix_ms: u64, now_unix_ms: u64 },
    #[error("advert lives {lifetime_ms} ms, over the {MAX_ADVERT_LIFETIME_MS} ms limit")]
    LifetimeTooLong { lifetime_ms: u64 },
    #[error("advert expires before it is issued")]
    ExpiresBeforeIssued,
    #[error("advert seq {got} is not newer than {held}, already held for this provider")]
    SeqNotNewer { got: u64, held: u64 },
    #[error("malformed advert: {0}")]
    Malformed(String),
    #[error("advert delegation: {0}")]
    Delegation(crate::delegation::DelegationError),
}

/// What a node does with an advert it did not accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Provably bad whatever the clock: drop, do not forward, penalise the sender.
    Reject,
    /// Stale, duplicate or outside this node's clock window: drop quietly.
    Ignore,
}

impl AdvertError {
    pub fn disposition(&self) -> Disposition {
        match self {
            AdvertError::LifetimeTooLong { .. } | AdvertError::ExpiresBeforeIssued | AdvertError::Malformed(_) => {
                Disposition::Reject
            }
            AdvertError::Expired { .. } | AdvertError::IssuedInFuture { .. } | AdvertError::SeqNotNewer { .. } => {
                Disposition::Ignore
            }
            AdvertError::Delegation(e) if e.is_misbehaviour() => Disposition::Reject,
            AdvertError::Delegation(_) => Disposition::Ignore,
        }
    }

    /// A short stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            AdvertError::Expired { .. } => "expired",
            AdvertError::IssuedInFuture { .. } => "future",
            AdvertError::LifetimeTooLong { .. } => "lifetime",
            AdvertError::ExpiresBeforeIssued => "lifetime",
            AdvertError::SeqNotNewer { .. } => "stale_seq",
            AdvertError::Malformed(_) => "malformed",
            AdvertError::Delegation(_) => "delegation",
        }
    }
}

impl Advertisement {
    /// The accept rule of docs/protocol.md section 4, for an advert whose signature and signer were
    /// already checked (it comes as [`Verified`]). `held_seq` is the seq this node holds
    /// for the provider, if any. The same rule serves gossip, sync and the store.
    pub fn check_acceptable(&self, now_unix_ms: u64, held_seq: Option<u64>) -> Result<(), AdvertError> {
        self.check_acceptable_until(now_unix_ms, held_seq, self.expires_at_unix_ms)
    }

    /// The accept rule with `expires_at_unix_ms` in place of the signed expiry in the
    /// `Expired` check: the advert's effective expiry (docs/protocol.md section 4a) when it
    /// arrives with an accepted refresh token (a sync page's `refreshes`, section 9). Every
    /// other check, the lifetime included, reads the signed fields.
    pub fn check_acceptable_until(
        &self,
        now_unix_ms: u64,
        held_seq: Option<u64>,
        expires_at_unix_ms: u64,
    ) -> Result<(), AdvertError> {
        self.check_well_formed()?;
        if self.expires_at_unix_ms < self.issued_at_unix_ms {
            return Err(AdvertError::ExpiresBeforeIssued);
        }
        let lifetime_ms = self.expires_at_unix_ms - self.issued_at_unix_ms;
        if lifetime_ms > MAX_ADVERT_LIFETIME_MS {
            return Err(AdvertError::LifetimeTooLong { lifetime_ms });
        }
        if self.issued_at_unix_ms > now_unix_ms.saturating_add(MAX_CLOCK_SKEW_MS) {
            return Err(AdvertError::IssuedInFuture { issued_at_unix_ms: self.issued_at_unix_ms, now_unix_ms });
        }
        if expires_at_unix_ms <= now_unix_ms {
            return Err(AdvertError::Expired { expires_at_unix_ms, now_unix_ms });
        }
        if let Some(held) = held_seq
            && self.seq <= held
        {
            return Err(AdvertError::SeqNotNewer { got: self.seq, held });
        }
        self.delegation_at(now_unix_ms)?;
        Ok(())
    }

    /// The owner's delegation carried by this advert, checked (signature, node, window,
    /// beneficiary) at `now_unix_ms`; `None` for an advert without one.
    pub fn delegation_at(&self, now_unix_ms: u64) -> Result<Option<crate::delegation::Delegation>, AdvertError> {
        match &self.delegation {
            None => Ok(None),
            Some(bytes) => {
                crate::delegation::Delegation::open_for(bytes, &self.provider, self.beneficiary.as_deref(), now_unix_ms)
                    .map(Some)
                    .map_err(AdvertError::Delegation)
            }
        }
    }

    /// Field checks that do not depend on time or on what the node holds.
    pub fn check_well_formed(&self) -> Result<(), AdvertError> {
        let bad = |m: String| Err(AdvertError::Malformed(m));
        if self.listen_addrs.len() > MAX_LISTEN_ADDRS {
            return bad(format!("{} listen addresses, at most {MAX_LISTEN_ADDRS}", self.listen_addrs.len()));
        }
        if self.images.len() > MAX_IMAGES {
            return bad(format!("{} images, at most {MAX_IMAGES}", self.images.len()));
        }
        check_text("ssh.host", &self.ssh.host, false)?;
        check_text("region", &self.region, true)?;
        if let Some(country) = &self.country
            && (country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()))
        {
            return bad(format!("country `{country}` is not an ISO 3166-1 alpha-2 code"));
        }
        if let Some(b) = &self.beneficiary {
            check_text("beneficiary", b, false)?;
        }
        check_text("hypervisor.arch", &self.hypervisor.arch, false)?;
        let cur = &self.pricing.currency;
        if cur.is_empty() || cur.len() > 12 || !cur.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()) {
            return bad(format!("currency `{cur}` must be 1-12 characters of A-Z0-9"));
        }
        if self.ssh.port_min == 0 || self.ssh.port_min > self.ssh.port_max {
            return bad(format!("ssh port range {}-{} is empty or starts at 0", self.ssh.port_min, self.ssh.port_max));
        }
        if !self.resources.total.covers(&self.resources.free) {
            return bad("free resources exceed the total".into());
        }
        for image in &self.images {
            check_text("image name", &image.name, false)?;
        }
        if let Some(n) = &self.network
            && usize::from(n.max_exposed_ports) > crate::lease::MAX_EXPOSED_PORTS
        {
            return bad(format!(
                "network.max_exposed_ports {} is more than {}",
                n.max_exposed_ports,
                crate::lease::MAX_EXPOSED_PORTS
            ));
        }
        if let Some(n) = &self.network
            && (n.egress_mbit == Some(0) || n.ingress_mbit == Some(0))
        {
            return bad("a network bandwidth limit of 0 Mbit/s (no limit is written as an absent field)".into());
        }
        if let Some(chain) = &self.refresh {
            chain.check_bounds(self.issued_at_unix_ms, self.expires_at_unix_ms).map_err(AdvertError::Malformed)?;
        }
        Ok(())
    }

    /// How many guest ports a lease of this provider may expose.
    pub fn max_exposed_ports(&self) -> u16 {
        self.network.map_or(0, |n| n.max_exposed_ports)
    }

    /// Price per hour in micro-units for a guest of `spec`.
    pub fn price_for(&self, spec: &ResourceAmounts) -> Option<u64> {
        self.pricing.hourly_micros(spec)
    }

    pub fn offers_image(&self, name: &str, sha256: &[u8; 32]) -> bool {
        self.images.iter().any(|i| i.name == name && &i.sha256 == sha256)
    }
}

/// Verifies-and-validates convenience: the accept rule applied to a verified advert.
pub fn accept(advert: &Verified<Advertisement>, now_unix_ms: u64, held_seq: Option<u64>) -> Result<(), AdvertError> {
    advert.body().check_acceptable(now_unix_ms, held_seq)
}

fn check_text(field: &str, value: &str, allow_empty: bool) -> Result<(), AdvertError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(AdvertError::Malformed(format!("{field} is {} bytes, at most {MAX_TEXT_LEN}", value.len())));
    }
    if !allow_empty && value.is_empty() {
        return Err(AdvertError::Malformed(format!("{field} is empty")));
    }
    if value.chars().any(char::is_control) {
        return Err(AdvertError::Malformed(format!("{field} contains control characters")));
    }
    Ok(())
}
