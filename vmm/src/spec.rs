//! What a lease asks of the hypervisor layer: `VmSpec` and the small types it is made of.
//!
//! vmm takes its own spec rather than the wire type (vmm knows nothing of the protocol
//! crate: docs/architecture.md "Crates and direction of dependencies"); the node
//! translates a granted `LeaseRequest` into a `VmSpec`.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::VmmError;
use crate::image::GuestImage;
use crate::lease_id::LeaseId;
use crate::user_name::is_valid_user_name;

/// The requestor's SSH public key in canonical OpenSSH form (`ssh-ed25519 <base64>
/// [comment]`). Only ed25519 keys (a lease request carries a raw ed25519 key:
/// docs/protocol.md, `ssh_public_key`); the comment is reduced to a safe character set
/// because the line is written into the guest's YAML user-data.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthorizedKey {
    key: PublicKey,
    line: String,
}

impl AuthorizedKey {
    /// Parses one OpenSSH public key line.
    pub fn parse(line: &str) -> Result<Self, VmmError> {
        let key = PublicKey::from_openssh(line.trim())
            .map_err(|e| VmmError::InvalidSpec(format!("authorized key is not an OpenSSH public key: {e}")))?;
        if key.algorithm() != Algorithm::Ed25519 {
            return Err(VmmError::InvalidSpec(format!(
                "authorized key is {}, only ssh-ed25519 is accepted",
                key.algorithm()
            )));
        }
        let comment = key.comment().as_str_lossy().to_string();
        Self::from_public_key(key, &comment)
    }

    /// Formats a raw 32-byte ed25519 public key.
    pub fn from_ed25519(raw: &[u8; 32], comment: &str) -> Result<Self, VmmError> {
        Self::from_public_key(PublicKey::from(Ed25519PublicKey(*raw)), comment)
    }

    fn from_public_key(mut key: PublicKey, comment: &str) -> Result<Self, VmmError> {
        let comment: String = comment
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '_' | '-' | '+'))
            .take(64)
            .collect();
        key.set_comment(comment.as_str());
        let mut line =
            key.to_openssh().map_err(|e| VmmError::InvalidSpec(format!("cannot encode authorized key: {e}")))?;
        if comment.is_empty() {
            // ssh-key writes "alg base64 " with an empty comment
            line = line.trim_end().to_string();
        }
        Ok(AuthorizedKey { key, line })
    }

    /// The canonical `ssh-ed25519 AAAA... comment` line.
    pub fn openssh_line(&self) -> &str {
        &self.line
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.key
    }
}

impl fmt::Debug for AuthorizedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorizedKey({})", self.line)
    }
}

/// The per-lease SSH host key of the guest: an ed25519 seed chosen by the provider, whose
/// public half goes into the signed grant so that the requestor pins it (SECURITY.md
/// invariant 6; docs/protocol.md, the grant's `host_key`). Zeroised on drop; never
/// printed.
#[derive(Clone)]
pub struct HostKeySeed(Zeroizing<[u8; 32]>);

impl HostKeySeed {
    pub fn from_bytes(seed: [u8; 32]) -> Self {
        HostKeySeed(Zeroizing::new(seed))
    }

    pub fn random() -> Self {
        HostKeySeed(Zeroizing::new(rand::random()))
    }

    /// The seed itself, for the VMM helper's request (docs/vmm.md "The VMM helper"),
    /// which travels only over the helper's owner-only socket.
    pub(crate) fn seed_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn private_key(&self) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&self.0))
    }

    /// The OpenSSH private key file (unencrypted: it goes onto the 0600 seed disk that
    /// only this lease's QEMU receives).
    pub fn openssh_private(&self, comment: &str) -> Result<Zeroizing<String>, VmmError> {
        let mut key = self.private_key();
        key.set_comment(comment);
        key.to_openssh(LineEnding::LF).map_err(|e| VmmError::InvalidSpec(format!("cannot encode the host key: {e}")))
    }

    pub fn public_key(&self) -> PublicKey {
        let mut public = self.private_key().public_key().clone();
        public.set_comment("");
        public
    }

    /// `ssh-ed25519 AAAA...` (no comment): what the requestor pins.
    pub fn public_openssh(&self) -> String {
        self.public_key().to_openssh().map(|s| s.trim_end().to_string()).unwrap_or_default()
    }

    /// The raw 32-byte public key.
    pub fn public_raw(&self) -> [u8; 32] {
        self.public_key().key_data().ed25519().map(|k| k.0).unwrap_or([0; 32])
    }
}

impl fmt::Debug for HostKeySeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostKeySeed(public {})", self.public_openssh())
    }
}

/// What a guest may reach beyond its own link. Private, link-local (incl. the metadata
/// address 169.254.169.254), CGNAT, loopback and multicast destinations, other guests
/// and the host itself are dropped under either policy (docs/vmm.md "nftables";
/// SECURITY.md invariant 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EgressPolicy {
    /// Nothing leaves the guest's link (only replies to the SSH forwarder).
    Deny,
    /// Public internet addresses only, source-NATed to the host's address.
    PublicOnly,
}

impl EgressPolicy {
    pub fn as_str(&self) -> &'static str {
        match self {
            EgressPolicy::Deny => "deny",
            EgressPolicy::PublicOnly => "public-only",
        }
    }
}

impl FromStr for EgressPolicy {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "deny" => Ok(EgressPolicy::Deny),
            "public-only" => Ok(EgressPolicy::PublicOnly),
            other => Err(VmmError::InvalidSpec(format!("egress policy {other:?} is not deny or public-only"))),
        }
    }
}

/// Everything needed to run one lease's guest.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub lease_id: LeaseId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    /// A verified image (`GuestImage::open`).
    pub image: Arc<GuestImage>,
    /// The login name the requestor asked for.
    pub ssh_user: String,
    pub authorized_key: AuthorizedKey,
    pub host_key: HostKeySeed,
    /// Index into the provider's address pool and SSH port range; the node allocates
    /// and persists it (docs/architecture.md "Leases", admission), vmm derives addresses
    /// and port from it.
    pub network_slot: u32,
    pub egress: EgressPolicy,
    /// Guest TCP ports reached from outside, each on a host port of the slot's block
    /// (docs/vmm.md "Exposed ports").
    pub expose: Vec<u16>,
    /// CPU quota as a fraction of one core, overriding `vcpus` cores (tests, or a
    /// provider that sells fractional cores). `None`: the quota is `vcpus` cores.
    pub cpu_quota: Option<f64>,
    /// Told when the start moves from provisioning (disk, seed, cgroup, network) to
    /// booting (QEMU runs, waiting for the guest's sshd), so a caller can show and record
    /// the stage.
    pub progress: Option<tokio::sync::watch::Sender<StartStage>>,
}

/// Where a start is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartStage {
    Provisioning,
    Booting,
}

/// Upper bounds the backend accepts; far above any real offer, they stop a bad spec from
/// reaching QEMU or the cgroup files as an absurd number.
pub(crate) const MAX_VCPUS: u32 = 256;
pub(crate) const MIN_MEMORY_MIB: u32 = 64;
pub(crate) const MAX_MEMORY_MIB: u32 = 4 * 1024 * 1024;
pub(crate) const MAX_DISK_GIB: u32 = 64 * 1024;

impl VmSpec {
    /// Checks the numbers and names of the spec (not the slot: the backend knows its pool).
    pub fn validate(&self) -> Result<(), VmmError> {
        let bad = |m: String| Err(VmmError::InvalidSpec(m));
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad(format!("vcpus {} is outside 1..={MAX_VCPUS}", self.vcpus));
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return bad(format!("memory {} MiB is outside {MIN_MEMORY_MIB}..={MAX_MEMORY_MIB} MiB", self.memory_mib));
        }
        if self.disk_gib == 0 || self.disk_gib > MAX_DISK_GIB {
            return bad(format!("disk {} GiB is outside 1..={MAX_DISK_GIB} GiB", self.disk_gib));
        }
        validate_user_name(&self.ssh_user)?;
        self.image.check_lease(&self.ssh_user, self.disk_gib)?;
        if let Some(q) = self.cpu_quota
            && !(q.is_finite() && q >= 0.01 && q <= f64::from(MAX_VCPUS))
        {
            return bad(format!("cpu quota {q} is outside 0.01..={MAX_VCPUS} cores"));
        }
        Ok(())
    }

    /// The CPU quota in cores: the override, else one core per vCPU.
    pub fn cpu_cores(&self) -> f64 {
        self.cpu_quota.unwrap_or(f64::from(self.vcpus))
    }
}

/// A POSIX-portable login name: it is written into the guest's user-data and passwd.
pub fn validate_user_name(name: &str) -> Result<(), VmmError> {
    if is_valid_user_name(name) {
        Ok(())
    } else {
        Err(VmmError::InvalidSpec(format!(
            "ssh user {name:?} must be 1-32 characters of a-z, 0-9, _ and -, starting with a letter or _"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorized_key_is_canonicalised() {
        let raw = HostKeySeed::from_bytes([7; 32]).public_raw();
        let k = AuthorizedKey::from_ed25519(&raw, "alice@laptop: #evil\n").unwrap();
        let line = k.openssh_line();
        assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
        assert!(line.ends_with(" alice@laptopevil"), "{line}");
        let again = AuthorizedKey::parse(line).unwrap();
        assert_eq!(again.openssh_line(), line);
        let bare = AuthorizedKey::from_ed25519(&raw, "").unwrap();
        assert_eq!(bare.openssh_line().split(' ').count(), 2);
        assert!(AuthorizedKey::parse("ssh-ed25519 notbase64").is_err());
    }

    #[test]
    fn host_key_encodes_as_openssh() {
        let seed = HostKeySeed::from_bytes([1; 32]);
        let pem = seed.openssh_private("peervm").unwrap();
        assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        let parsed = PrivateKey::from_openssh(pem.as_bytes()).unwrap();
        assert_eq!(parsed.public_key().key_data(), seed.public_key().key_data());
        assert!(seed.public_openssh().starts_with("ssh-ed25519 AAAA"));
        assert!(!format!("{seed:?}").contains("0101"));
    }

    /// A one-file image whose manifest says what a root-disk image says.
    fn root_image(dir: &std::path::Path, virtual_size: u64) -> Arc<GuestImage> {
        use sha2::{Digest, Sha256};
        let disk = crate::disk_header::qcow2_v3_header(virtual_size);
        std::fs::write(dir.join("disk"), &disk).unwrap();
        let m = serde_json::json!({
            "name": "debian-12", "kernel": "disk", "initrd": "disk", "disk": "disk",
            "disk_role": "root", "disk_format": "qcow2", "disk_virtual_size": virtual_size,
            "login_user": "peervm", "seed": "cloud-init",
            "files": [{"path": "disk", "sha256": hex::encode(Sha256::digest(&disk)), "size": disk.len()}],
        });
        std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
        Arc::new(GuestImage::open(dir).unwrap())
    }

    fn spec_for(image: Arc<GuestImage>, ssh_user: &str, disk_gib: u32) -> VmSpec {
        VmSpec {
            lease_id: LeaseId::from_bytes([1; 16]),
            vcpus: 1,
            memory_mib: 512,
            disk_gib,
            image,
            ssh_user: ssh_user.into(),
            authorized_key: AuthorizedKey::from_ed25519(&HostKeySeed::from_bytes([2; 32]).public_raw(), "").unwrap(),
            host_key: HostKeySeed::from_bytes([3; 32]),
            network_slot: 0,
            egress: EgressPolicy::Deny,
            expose: Vec::new(),
            cpu_quota: None,
            progress: None,
        }
    }

    #[test]
    fn a_root_disk_image_refuses_a_smaller_lease_disk_and_another_user_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let image = root_image(dir.path(), 5 << 30);
        assert!(spec_for(image.clone(), "peervm", 5).validate().is_ok());
        assert!(matches!(spec_for(image.clone(), "peervm", 4).validate(), Err(VmmError::DiskTooSmall { .. })));
        assert!(matches!(spec_for(image, "alice", 5).validate(), Err(VmmError::WrongLoginUser { .. })));
    }

    #[test]
    fn user_names() {
        for ok in ["alice", "_x", "a-b_9"] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Alice", "9a", "a b", "a:b", "a\nb", &"a".repeat(33)] {
            assert!(validate_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
