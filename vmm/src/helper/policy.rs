//! The helper's checks on a start request, made as if the daemon were an attacker
//! (docs/vmm.md "The VMM helper"; SECURITY.md "Privilege separation"): names are checked
//! for path and line characters before anything else, the image is one the helper
//! verified itself (by sha256), the amounts fit the host's configured totals, egress is
//! at most what the host's config allows, the slot is within the host's pool; a throttle
//! only ever lowers a guest's egress. Nothing of the request becomes a path or an
//! interface name.

use std::collections::HashMap;
use std::sync::Arc;

use super::ledger::Amounts;
use super::wire::{Refusal, StartRequest, WireError};
use crate::image::GuestImage;
use crate::spec::{AuthorizedKey, EgressPolicy, HostKeySeed, VmSpec, validate_user_name};

/// What the host's configuration allows the daemon to ask for.
#[derive(Debug)]
pub struct HelperPolicy {
    /// The only uid that may use the socket: the daemon's user.
    pub daemon_uid: u32,
    /// The images the helper verified, by sha256 (hex).
    pub images: HashMap<String, Arc<GuestImage>>,
    /// provider.toml's `[resources]`: every guest together stays within them.
    pub totals: Amounts,
    /// The most a guest may reach (provider.toml `egress`).
    pub egress: EgressPolicy,
    /// Network slots of the host's address pool and SSH port range.
    pub slots: u32,
    /// Guest ports a lease may expose (provider.toml `[network] max_exposed_ports`), and
    /// whether ports below 1024 may be among them.
    pub max_exposed_ports: u16,
    pub privileged_ports: bool,
    /// The host's egress limit per guest (provider.toml `[network] egress_mbit`): a
    /// throttle may not go above it.
    pub egress_mbit: Option<u32>,
}

/// The highest throttle without a configured egress limit (as `[network] egress_mbit`'s
/// own cap): beyond it a throttle is a typo or a trick.
pub const MAX_THROTTLE_MBIT: u32 = 100_000;

pub(super) fn refused(reason: Refusal, message: impl Into<String>) -> WireError {
    WireError::Refused { reason, message: message.into() }
}

impl HelperPolicy {
    pub fn new(
        daemon_uid: u32,
        images: impl IntoIterator<Item = Arc<GuestImage>>,
        totals: Amounts,
        egress: EgressPolicy,
        slots: u32,
    ) -> Self {
        let images = images.into_iter().map(|i| (i.sha256_hex(), i)).collect();
        HelperPolicy {
            daemon_uid,
            images,
            totals,
            egress,
            slots,
            max_exposed_ports: 0,
            privileged_ports: false,
            egress_mbit: None,
        }
    }

    /// Only the daemon's user may talk to the helper (root included: a root process has
    /// no business here, and the daemon never runs as root beside a helper).
    pub fn check_peer(&self, uid: u32) -> Result<(), WireError> {
        if uid == self.daemon_uid {
            Ok(())
        } else {
            Err(refused(
                Refusal::PeerUid,
                format!("uid {uid} may not use the VMM helper: only the provider daemon's uid {}", self.daemon_uid),
            ))
        }
    }

    /// The start request as a spec the backend can run, or why not.
    pub fn spec(&self, req: &StartRequest) -> Result<VmSpec, WireError> {
        check_name("image", &req.image)?;
        if req.image.len() != 64 || !req.image.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(refused(Refusal::BadName, "image must be an image's sha256, 64 lowercase hex digits"));
        }
        let image = self
            .images
            .get(&req.image)
            .cloned()
            .ok_or_else(|| refused(Refusal::UnknownImage, format!("no image with sha256 {} here", req.image)))?;
        check_name("ssh user", &req.ssh_user)?;
        validate_user_name(&req.ssh_user).map_err(|e| refused(Refusal::BadName, e.to_string()))?;
        if req.authorized_key.chars().any(char::is_control) {
            return Err(refused(Refusal::BadKey, "the authorized key holds a newline or another control character"));
        }
        let authorized_key =
            AuthorizedKey::parse(&req.authorized_key).map_err(|e| refused(Refusal::BadKey, e.to_string()))?;
        let mut seed = [0u8; 32];
        hex::decode_to_slice(&req.host_key_seed.0, &mut seed)
            .map_err(|_| refused(Refusal::BadKey, "the host key seed is not 64 hex digits"))?;
        let host_key = HostKeySeed::from_bytes(seed);
        seed.fill(0);
        let amounts = Amounts::new(req.vcpus, req.memory_mib, req.disk_gib);
        if let Some((what, v, l)) = amounts.first_over(&self.totals) {
            return Err(refused(
                Refusal::Resources,
                format!("{v} {what} is more than the host's configured {l} (provider.toml [resources])"),
            ));
        }
        if let Some(q) = req.cpu_quota
            && !(q.is_finite() && q > 0.0 && q <= f64::from(req.vcpus))
        {
            return Err(refused(Refusal::Resources, format!("cpu quota {q} is not within 0..={} cores", req.vcpus)));
        }
        if req.slot >= self.slots {
            return Err(refused(
                Refusal::Slot,
                format!("slot {} is outside the host's {} slots", req.slot, self.slots),
            ));
        }
        self.check_expose(&req.expose)?;
        if req.egress == EgressPolicy::PublicOnly && self.egress == EgressPolicy::Deny {
            return Err(refused(Refusal::Egress, "egress public-only is not allowed by the host's config (deny)"));
        }
        let spec = VmSpec {
            lease_id: req.lease,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            disk_gib: req.disk_gib,
            image,
            ssh_user: req.ssh_user.clone(),
            authorized_key,
            host_key,
            network_slot: req.slot,
            egress: req.egress,
            expose: req.expose.clone(),
            cpu_quota: req.cpu_quota,
            progress: None,
        };
        spec.validate().map_err(|e| WireError::from(&e))?;
        Ok(spec)
    }
}

impl HelperPolicy {
    /// A throttle slows a guest down: at least 1 Mbit/s (0 would be an isolate, which has
    /// its own request) and at most the host's egress limit.
    pub fn check_throttle(&self, egress_mbit: u32) -> Result<(), WireError> {
        let ceiling = self.egress_mbit.unwrap_or(MAX_THROTTLE_MBIT);
        if egress_mbit == 0 || egress_mbit > ceiling {
            return Err(refused(
                Refusal::Throttle,
                format!("a throttle to {egress_mbit} Mbit/s is not within 1..={ceiling} (the host's egress limit)"),
            ));
        }
        Ok(())
    }

    /// At most the configured count of distinct guest ports, none 0 or 22 (SSH has its
    /// own), none below 1024 unless the config allows them.
    fn check_expose(&self, ports: &[u16]) -> Result<(), WireError> {
        if ports.len() > usize::from(self.max_exposed_ports) {
            return Err(refused(
                Refusal::Resources,
                format!("{} exposed ports asked; the host's config allows {}", ports.len(), self.max_exposed_ports),
            ));
        }
        for (i, p) in ports.iter().enumerate() {
            if *p == 0 || *p == 22 || ports[..i].contains(p) || (*p < 1024 && !self.privileged_ports) {
                return Err(refused(
                    Refusal::Resources,
                    format!("guest port {p} may not be exposed (0, 22, a repeat, or below 1024 when not allowed)"),
                ));
            }
        }
        Ok(())
    }
}

/// A name from the request must not be able to act as a path or a line: no `/`, no
/// `..`, no control character (a newline would split a log line or a config line).
fn check_name(field: &str, value: &str) -> Result<(), WireError> {
    let why = if value.is_empty() {
        "is empty"
    } else if value.contains('/') {
        "contains '/'"
    } else if value.contains("..") {
        "contains '..'"
    } else if value.chars().any(char::is_control) {
        "contains a newline or another control character"
    } else if value.len() > 64 {
        "is longer than 64 bytes"
    } else {
        return Ok(());
    };
    Err(refused(Refusal::BadName, format!("{field} {value:?} {why}")))
}

/// A direct-boot image of one small file (kernel, initrd and disk are the same bytes):
/// enough for the helper's checks, never booted.
#[cfg(test)]
pub(super) fn one_file_image(dir: &std::path::Path) -> Arc<GuestImage> {
    use sha2::{Digest, Sha256};
    let disk = crate::disk_header::qcow2_v3_header(1 << 30);
    std::fs::write(dir.join("disk"), &disk).unwrap();
    let m = serde_json::json!({
        "name": "t", "kernel": "disk", "initrd": "disk", "disk": "disk",
        "files": [{"path": "disk", "sha256": hex::encode(Sha256::digest(&disk)), "size": disk.len()}],
    });
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    Arc::new(GuestImage::open(dir).unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::helper::wire::SeedHex;
    use crate::lease_id::LeaseId;

    fn setup() -> (tempfile::TempDir, HelperPolicy, StartRequest) {
        let dir = tempfile::tempdir().unwrap();
        let img = one_file_image(dir.path());
        let key = HostKeySeed::from_bytes([5; 32]).public_openssh();
        let req = StartRequest {
            lease: LeaseId::from_bytes([1; 16]),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image: img.sha256_hex(),
            ssh_user: "peervm".into(),
            authorized_key: key,
            host_key_seed: SeedHex("07".repeat(32)),
            slot: 3,
            egress: EgressPolicy::Deny,
            cpu_quota: None,
            expose: vec![8080],
        };
        let mut policy = HelperPolicy::new(1000, [img], Amounts::new(2, 1024, 10), EgressPolicy::Deny, 4);
        policy.max_exposed_ports = 2;
        (dir, policy, req)
    }

    fn reason(r: Result<VmSpec, WireError>) -> Refusal {
        match r {
            Err(WireError::Refused { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_request_within_the_policy_becomes_the_spec_it_describes() {
        let (_d, policy, req) = setup();
        let spec = policy.spec(&req).unwrap();
        assert_eq!((spec.vcpus, spec.memory_mib, spec.disk_gib, spec.network_slot), (1, 256, 1, 3));
        assert_eq!(spec.host_key.public_raw(), HostKeySeed::from_bytes([7; 32]).public_raw());
        assert_eq!(spec.image.sha256_hex(), req.image);
    }

    #[test]
    fn names_with_a_slash_dot_dot_or_newline_are_refused() {
        let (_d, policy, req) = setup();
        for bad in ["../etc/passwd", "a/b", "x..y", "abc\n", ""] {
            let r = StartRequest { image: bad.into(), ..req.clone() };
            assert_eq!(reason(policy.spec(&r)), Refusal::BadName, "image {bad:?}");
            let r = StartRequest { ssh_user: bad.into(), ..req.clone() };
            assert_eq!(reason(policy.spec(&r)), Refusal::BadName, "user {bad:?}");
        }
        let r = StartRequest { ssh_user: "Root".into(), ..req.clone() };
        assert_eq!(reason(policy.spec(&r)), Refusal::BadName);
        let r = StartRequest { authorized_key: format!("{}\nssh-ed25519 AAAA evil", req.authorized_key), ..req };
        assert_eq!(reason(policy.spec(&r)), Refusal::BadKey);
    }

    #[test]
    fn an_image_the_helper_did_not_verify_is_refused() {
        let (_d, policy, req) = setup();
        let r = StartRequest { image: "0".repeat(64), ..req.clone() };
        assert_eq!(reason(policy.spec(&r)), Refusal::UnknownImage);
        let r = StartRequest { image: "G".repeat(64), ..req };
        assert_eq!(reason(policy.spec(&r)), Refusal::BadName);
    }

    #[test]
    fn amounts_beyond_the_host_config_are_refused() {
        let (_d, policy, req) = setup();
        for r in [
            StartRequest { vcpus: 3, ..req.clone() },
            StartRequest { memory_mib: 2048, ..req.clone() },
            StartRequest { disk_gib: 11, ..req.clone() },
            StartRequest { cpu_quota: Some(1.5), ..req.clone() },
            StartRequest { cpu_quota: Some(f64::NAN), ..req.clone() },
        ] {
            assert_eq!(reason(policy.spec(&r)), Refusal::Resources, "{r:?}");
        }
        for expose in [vec![8080, 8081, 8082], vec![80], vec![22], vec![8080, 8080], vec![0]] {
            let r = StartRequest { expose: expose.clone(), ..req.clone() };
            assert_eq!(reason(policy.spec(&r)), Refusal::Resources, "expose {expose:?}");
        }
        let r = StartRequest { slot: 4, ..req.clone() };
        assert_eq!(reason(policy.spec(&r)), Refusal::Slot);
        let r = StartRequest { egress: EgressPolicy::PublicOnly, ..req.clone() };
        assert_eq!(reason(policy.spec(&r)), Refusal::Egress);
        let r = StartRequest { host_key_seed: SeedHex("zz".repeat(32)), ..req };
        assert_eq!(reason(policy.spec(&r)), Refusal::BadKey);
    }

    #[test]
    fn a_throttle_only_ever_lowers_a_guest_s_egress() {
        let (_d, mut policy, _) = setup();
        let refusal = |r: Result<(), WireError>| match r {
            Err(WireError::Refused { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        };
        assert!(policy.check_throttle(1).is_ok());
        assert!(policy.check_throttle(MAX_THROTTLE_MBIT).is_ok());
        assert_eq!(refusal(policy.check_throttle(0)), Refusal::Throttle);
        assert_eq!(refusal(policy.check_throttle(MAX_THROTTLE_MBIT + 1)), Refusal::Throttle);
        policy.egress_mbit = Some(10);
        assert!(policy.check_throttle(10).is_ok());
        assert_eq!(refusal(policy.check_throttle(11)), Refusal::Throttle, "above the host's limit");
    }

    #[test]
    fn only_the_daemon_uid_may_connect() {
        let (_d, policy, _) = setup();
        assert!(policy.check_peer(1000).is_ok());
        for uid in [0, 999, 1001] {
            assert!(matches!(policy.check_peer(uid), Err(WireError::Refused { reason: Refusal::PeerUid, .. })));
        }
    }
}
