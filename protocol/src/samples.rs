//! Deterministic sample messages made from fixed key seeds. They are the test vectors of
//! docs/protocol.md, and the inputs of the crate's tests and benchmarks.

use crate::advert::*;
use crate::identity::SigningKey;
use crate::lease::*;

/// Fixed time of the test vectors: 2026-01-01T00:00:00Z.
pub const T0_UNIX_MS: u64 = 1_767_225_600_000;

/// The provider key of the test vectors: seed bytes 0x00, 0x01, ..., 0x1f.
pub fn provider_key() -> SigningKey {
    SigningKey::from_seed(&std::array::from_fn(|i| i as u8))
}

/// The requestor key of the test vectors: seed bytes 0x20, 0x21, ..., 0x3f.
pub fn requestor_key() -> SigningKey {
    SigningKey::from_seed(&std::array::from_fn(|i| 0x20 + i as u8))
}

/// The requestor's SSH key of the test vectors: the ed25519 public key of seed bytes
/// 0x40, 0x41, ..., 0x5f (a valid curve point, as a real `ssh-ed25519` key is).
pub fn requestor_ssh_public_key() -> [u8; 32] {
    SigningKey::from_seed(&std::array::from_fn(|i| 0x40 + i as u8)).public_key_bytes()
}

/// The owner key of the conformance vectors' delegations (docs/protocol.md section 7b):
/// seed bytes 0x60, 0x61, ..., 0x7f.
pub fn owner_key() -> SigningKey {
    SigningKey::from_seed(&std::array::from_fn(|i| 0x60 + i as u8))
}

/// A key made from `n` (for tests that need many distinct providers).
pub fn numbered_key(n: u64) -> SigningKey {
    let mut seed = [0x5au8; 32];
    seed[..8].copy_from_slice(&n.to_le_bytes());
    SigningKey::from_seed(&seed)
}

/// `n` adverts from `n` distinct numbered providers (seq i + 1, issued at T0), as
/// envelope bytes: the input of the batch tests and benchmarks.
pub fn signed_adverts(n: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let key = numbered_key(i);
            crate::Signed::sign(&key, &advert(&key, i + 1, T0_UNIX_MS))
                .unwrap_or_else(|e| unreachable!("sample adverts are within the size cap: {e}"))
                .to_bytes()
        })
        .collect()
}

pub fn minimal_image_sha256() -> [u8; 32] {
    std::array::from_fn(|i| 0xa0 ^ i as u8)
}

/// A typical advert from `key`, issued at `now`, living 300 s.
pub fn advert(key: &SigningKey, seq: u64, now_unix_ms: u64) -> Advertisement {
    Advertisement {
        network: None,
        version: ADVERT_VERSION,
        provider: key.peer_id(),
        seq,
        issued_at_unix_ms: now_unix_ms,
        expires_at_unix_ms: now_unix_ms + MAX_ADVERT_LIFETIME_MS,
        listen_addrs: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap_or_else(|_| unreachable!())],
        ssh: SshEndpoint { host: "127.0.0.1".into(), port_min: 42000, port_max: 42099 },
        resources: Resources {
            total: ResourceAmounts { vcpus: 8, memory_mib: 16384, disk_gib: 200 },
            free: ResourceAmounts { vcpus: 6, memory_mib: 12288, disk_gib: 150 },
        },
        pricing: Pricing {
            currency: "USD".into(),
            per_vcpu_hour_micros: 10_000,
            per_memory_gib_hour_micros: 5_000,
            per_disk_gib_hour_micros: 100,
        },
        region: "eu-central".into(),
        country: Some("DE".into()),
        hypervisor: HypervisorInfo { accel: Accel::Tcg, arch: "x86_64".into() },
        images: vec![ImageOffer { name: "minimal".into(), sha256: minimal_image_sha256() }],
        beneficiary: None,
        withdrawn: false,
        delegation: None,
        reachability: None,
        refresh: None,
    }
}

/// A lease request from `requestor` to `provider`, issued at `now`, valid 60 s, for the
/// terms of `advert(provider, 1, ...)`.
pub fn lease_request(requestor: &SigningKey, provider: &SigningKey, now_unix_ms: u64) -> LeaseRequest {
    LeaseRequest {
        version: LEASE_VERSION,
        lease_id: LeaseId([0x11; 16]),
        requestor: requestor.peer_id(),
        provider: provider.peer_id(),
        advert_seq: 1,
        spec: GuestSpec {
            expose: Vec::new(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 2,
            image_name: "minimal".into(),
            image_sha256: minimal_image_sha256(),
        },
        duration_secs: 3600,
        max_price_per_hour_micros: 20_000,
        currency: "USD".into(),
        ssh_user: "peervm".into(),
        ssh_public_key: requestor_ssh_public_key(),
        nonce: [0x33; 16],
        issued_at_unix_ms: now_unix_ms,
        valid_until_unix_ms: now_unix_ms + MAX_REQUEST_VALIDITY_MS,
    }
}

pub fn lease_control(
    requestor: &SigningKey,
    provider: &SigningKey,
    action: ControlAction,
    now_unix_ms: u64,
) -> LeaseControl {
    LeaseControl {
        version: LEASE_VERSION,
        lease_id: LeaseId([0x11; 16]),
        requestor: requestor.peer_id(),
        provider: provider.peer_id(),
        action,
        nonce: [0x44; 16],
        issued_at_unix_ms: now_unix_ms,
        valid_until_unix_ms: now_unix_ms + MAX_REQUEST_VALIDITY_MS,
    }
}

pub fn lease_reply(
    provider: &SigningKey,
    requestor: &SigningKey,
    outcome: ReplyOutcome,
    now_unix_ms: u64,
) -> LeaseReply {
    LeaseReply {
        version: LEASE_VERSION,
        lease_id: LeaseId([0x11; 16]),
        provider: provider.peer_id(),
        requestor: requestor.peer_id(),
        in_reply_to: [0x55; 32],
        issued_at_unix_ms: now_unix_ms,
        outcome,
    }
}

pub fn granted(now_unix_ms: u64) -> ReplyOutcome {
    ReplyOutcome::Granted {
        exposed: Vec::new(),
        access: SshAccess { host: "127.0.0.1".into(), port: 42000, user: "peervm".into() },
        host_key: [0x66; 32],
        started_at_unix_ms: now_unix_ms,
        ends_at_unix_ms: now_unix_ms + 3_600_000,
        price_per_hour_micros: 12_700,
        currency: "USD".into(),
    }
}
