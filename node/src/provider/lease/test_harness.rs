//! A lease manager for unit tests: the real store (SQLite in a temporary directory), a
//! [`FakeHypervisor`] watching it, a [`ManualClock`], a tiny verified guest image, and
//! helpers that sign requests and control messages as a requestor would and open the
//! signed reply as a requestor would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use libp2p::PeerId;
use peervm_protocol::lease::LEASE_VERSION;
use peervm_protocol::{
    ControlAction, GuestSpec, LeaseControl, LeaseId, LeaseReply, LeaseRequest, LeaseState, Pricing, ReplyOutcome,
    ResourceAmounts, Signed, SigningKey,
};
use peervm_vmm::{EgressPolicy, GuestImage};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::db::{LeaseRecord, ProviderDb};
use super::fake_hypervisor::FakeHypervisor;
use super::manager::LeaseManager;
use super::terms::LeaseTerms;
use crate::clock::ManualClock;
use crate::metrics::Metrics;
use crate::network::lease_wire::{Envelope, LeaseMessage};

/// The start of every test's time (2023-11-14); the clock only moves when a test moves it.
pub(super) const T0: u64 = 1_700_000_000_000;

/// A guest image of three small files, pinned by a manifest: `GuestImage::open` checks it
/// like a real one.
pub(super) fn tiny_image(dir: &Path) -> Arc<GuestImage> {
    let dir = dir.join("tiny-image");
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    let disk = peervm_vmm::disk_header::qcow2_v3_header(64 << 20);
    for (name, body) in [("vmlinuz", b"kernel".as_slice()), ("initrd.img", b"initrd"), ("disk.qcow2", &disk)] {
        std::fs::write(dir.join(name), body).unwrap();
        files.push(serde_json::json!({
            "path": name,
            "sha256": hex::encode(Sha256::digest(body)),
            "size": body.len(),
        }));
    }
    let manifest = serde_json::json!({
        "name": "tiny", "kernel": "vmlinuz", "initrd": "initrd.img", "disk": "disk.qcow2", "files": files,
    });
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).unwrap();
    Arc::new(GuestImage::open(&dir).unwrap())
}

/// What the tests' provider offers: 4 vCPU, 2 GiB, 10 GiB of disk, 3 slots, leases of
/// 60 s to 2 h, at 1000 + 512/GiB + 10/GiB micro-EUR per hour.
pub(super) fn terms(image: Arc<GuestImage>) -> LeaseTerms {
    LeaseTerms {
        total: ResourceAmounts { vcpus: 4, memory_mib: 2048, disk_gib: 10 },
        pricing: Pricing {
            currency: "EUR".into(),
            per_vcpu_hour_micros: 1000,
            per_memory_gib_hour_micros: 512,
            per_disk_gib_hour_micros: 10,
        },
        images: HashMap::from([(image.name().to_string(), image)]),
        ssh_host: "provider.example".into(),
        max_leases: 3,
        egress: EgressPolicy::Deny,
        max_exposed_ports: 2,
        expose_privileged: false,
        min_lease_secs: 60,
        max_lease_secs: 7200,
    }
}

pub(super) fn random_key() -> SigningKey {
    SigningKey::from_seed(&rand::random())
}

pub(super) struct Harness {
    pub dir: tempfile::TempDir,
    pub clock: ManualClock,
    pub hv: FakeHypervisor,
    pub manager: LeaseManager<FakeHypervisor>,
    pub provider: PeerId,
    provider_key_seed: [u8; 32],
    pub requestor: SigningKey,
    pub image: Arc<GuestImage>,
    pub terms: LeaseTerms,
    pub capacity: watch::Receiver<ResourceAmounts>,
}

impl Harness {
    pub fn new() -> Self {
        Self::build(|_| {}, |_| {})
    }

    /// A harness whose terms `adjust` changes and whose fake `prepare` sets up before the
    /// manager gets it.
    pub fn build(adjust: impl FnOnce(&mut LeaseTerms), prepare: impl FnOnce(&mut FakeHypervisor)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let image = tiny_image(dir.path());
        let mut terms = terms(image.clone());
        adjust(&mut terms);
        let provider_key_seed = rand::random();
        Self::open(dir, image, terms, provider_key_seed, ManualClock::at(T0), random_key(), prepare)
    }

    fn open(
        dir: tempfile::TempDir,
        image: Arc<GuestImage>,
        terms: LeaseTerms,
        provider_key_seed: [u8; 32],
        clock: ManualClock,
        requestor: SigningKey,
        prepare: impl FnOnce(&mut FakeHypervisor),
    ) -> Self {
        let path = db_path(dir.path());
        let mut hv = FakeHypervisor::watching(ProviderDb::open(&path).unwrap());
        prepare(&mut hv);
        let (capacity_tx, capacity) = watch::channel(terms.total);
        let key = SigningKey::from_seed(&provider_key_seed);
        let provider = key.peer_id();
        let manager = LeaseManager::new(
            key,
            ProviderDb::open(&path).unwrap(),
            hv.clone(),
            terms.clone(),
            capacity_tx,
            Arc::new(Metrics::default()),
            None,
        )
        .with_clock(Arc::new(clock.clone()));
        Harness { dir, clock, hv, manager, provider, provider_key_seed, requestor, image, terms, capacity }
    }

    /// The provider restarts: a new manager (same key, terms, clock and requestor) on the
    /// same store, and a new hypervisor that `prepare` sets up (e.g. with the guests that
    /// survived).
    pub fn restart(self, prepare: impl FnOnce(&mut FakeHypervisor)) -> Self {
        let Harness { dir, clock, manager, image, terms, provider_key_seed, requestor, .. } = self;
        drop(manager);
        Self::open(dir, image, terms, provider_key_seed, clock, requestor, prepare)
    }

    pub fn db(&self) -> &ProviderDb {
        self.manager.db()
    }

    pub fn record(&self, id: LeaseId) -> LeaseRecord {
        self.db().get(&id).unwrap().expect("the lease is in the store")
    }

    pub fn state(&self, id: LeaseId) -> LeaseState {
        self.record(id).state
    }

    /// The states a lease went through, in order.
    pub fn states(&self, id: LeaseId) -> Vec<LeaseState> {
        self.db().transitions(&id).unwrap().into_iter().map(|(_, state, _)| state).collect()
    }

    /// A request this provider grants as it stands: 1 vCPU, 256 MiB, 1 GiB for an hour,
    /// issued now and valid for 60 s.
    pub fn request(&self) -> LeaseRequest {
        let now = self.clock_now();
        LeaseRequest {
            version: LEASE_VERSION,
            lease_id: LeaseId(rand::random()),
            requestor: self.requestor.peer_id(),
            provider: self.provider,
            advert_seq: 1,
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                image_name: self.image.name().to_string(),
                image_sha256: self.image.sha256(),
            },
            duration_secs: 3600,
            max_price_per_hour_micros: 10_000,
            currency: "EUR".into(),
            ssh_user: "alice".into(),
            ssh_public_key: random_key().public_key_bytes(),
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + 60_000,
        }
    }

    /// A control message of this harness's requestor for `lease`, issued now.
    pub fn control(&self, lease: LeaseId, action: ControlAction) -> LeaseControl {
        let now = self.clock_now();
        LeaseControl {
            version: LEASE_VERSION,
            lease_id: lease,
            requestor: self.requestor.peer_id(),
            provider: self.provider,
            action,
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + 60_000,
        }
    }

    fn clock_now(&self) -> u64 {
        use peervm_protocol::Clock;
        self.clock.now_unix_ms()
    }

    /// Sends `req` signed by the harness's requestor; returns the outcome of the reply.
    pub async fn send_request(&self, req: &LeaseRequest) -> ReplyOutcome {
        self.send_request_as(&self.requestor, req).await
    }

    pub async fn send_request_as(&self, key: &SigningKey, req: &LeaseRequest) -> ReplyOutcome {
        let bytes = Signed::sign(key, req).unwrap().to_bytes();
        self.send_raw(key.peer_id(), LeaseMessage::Request(Envelope(bytes))).await.outcome
    }

    pub async fn send_control(&self, c: &LeaseControl) -> ReplyOutcome {
        self.send_control_as(&self.requestor, c).await
    }

    pub async fn send_control_as(&self, key: &SigningKey, c: &LeaseControl) -> ReplyOutcome {
        let bytes = Signed::sign(key, c).unwrap().to_bytes();
        self.send_raw(key.peer_id(), LeaseMessage::Control(Envelope(bytes))).await.outcome
    }

    /// Hands `message` to the manager as the swarm would; the reply must be signed by
    /// this provider.
    pub async fn send_raw(&self, peer: PeerId, message: LeaseMessage) -> LeaseReply {
        let reply = self.manager.handle(peer, &message, false).await;
        let reply = Signed::<LeaseReply>::open(&reply).expect("every reply is signed and verifies");
        assert_eq!(reply.signer(), self.provider, "the reply is the provider's");
        reply.body().clone()
    }

    /// Sends a fresh default request and expects it granted; returns the lease's id.
    pub async fn grant(&self) -> LeaseId {
        let req = self.request();
        match self.send_request(&req).await {
            ReplyOutcome::Granted { .. } => req.lease_id,
            other => panic!("expected a grant, got {other:?}"),
        }
    }
}

pub(super) fn db_path(dir: &Path) -> PathBuf {
    dir.join("provider.db")
}

/// The reason of a denial, or a panic naming what came instead.
pub(super) fn denial(outcome: &ReplyOutcome) -> (peervm_protocol::DenyReason, &str) {
    match outcome {
        ReplyOutcome::Denied { reason, detail } => (*reason, detail.as_str()),
        other => panic!("expected a denial, got {other:?}"),
    }
}
