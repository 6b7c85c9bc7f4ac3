//! Hostile and mistaken lease messages against a real provider process: each gets a
//! denial signed by the provider with its typed reason, and none starts anything.
//! The messages are built with the protocol crate and sent over a real libp2p swarm.

mod common;

use std::time::Duration;

use common::*;
use libp2p::{Multiaddr, PeerId};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::lease_wire::{Envelope, LeaseMessage};
use peervm_node::network::{Node, NodeConfig, Role};
use peervm_protocol::lease::payload_digest;
use peervm_protocol::{
    ControlAction, DenyReason, GuestSpec, LeaseControl, LeaseId, LeaseReply, LeaseRequest, ReplyOutcome, Signed,
    SigningKey,
};
use sha2::{Digest, Sha256};

struct Client {
    node: Node,
    key: SigningKey,
    provider: PeerId,
    addrs: Vec<Multiaddr>,
}

impl Client {
    async fn new(provider: PeerId, addrs: Vec<Multiaddr>) -> Client {
        let key = SigningKey::from_seed(&rand::random());
        let node = Node::start(NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Requestor)).await.unwrap();
        Client { node, key, provider, addrs }
    }

    fn request(&self, vcpus: u32) -> LeaseRequest {
        let now = now_unix_ms();
        let manifest = std::fs::read(image_dir().join("manifest.json")).unwrap();
        LeaseRequest {
            version: 1,
            lease_id: LeaseId(rand::random()),
            requestor: self.key.peer_id(),
            provider: self.provider,
            advert_seq: 1,
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus,
                memory_mib: 256,
                disk_gib: 1,
                image_name: "minimal".into(),
                image_sha256: Sha256::digest(&manifest).into(),
            },
            duration_secs: 600,
            max_price_per_hour_micros: 1_000_000,
            currency: "USD".into(),
            ssh_user: "peervm".into(),
            ssh_public_key: SigningKey::from_seed(&rand::random()).public_key_bytes(),
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + 60_000,
        }
    }

    /// Sends raw bytes as a request or control message; returns the verified reply.
    /// Paced within the provider's per-peer lease rate limit (2/s).
    async fn send(&self, message: LeaseMessage) -> LeaseReply {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut events = self.node.subscribe();
        let bytes = match self.node.client.lease_call(self.provider, self.addrs.clone(), message).await {
            Ok(b) => b,
            Err(e) => {
                let mut seen = Vec::new();
                while let Ok(ev) = events.try_recv() {
                    seen.push(format!("{ev:?}"));
                }
                panic!("no reply: {e}; events: {seen:?}; addrs {:?}", self.addrs);
            }
        };
        let reply = Signed::<LeaseReply>::open(&bytes).expect("every reply is signed by the provider");
        assert_eq!(reply.body().provider, self.provider, "signed by the provider itself");
        reply.body().clone()
    }

    async fn send_request(&self, bytes: Vec<u8>) -> LeaseReply {
        self.send(LeaseMessage::Request(Envelope(bytes))).await
    }

    fn sign(&self, r: &LeaseRequest) -> Vec<u8> {
        Signed::sign(&self.key, r).unwrap().to_bytes()
    }

    fn control(&self, lease: LeaseId, action: ControlAction) -> Vec<u8> {
        let now = now_unix_ms();
        let c = LeaseControl {
            version: 1,
            lease_id: lease,
            requestor: self.key.peer_id(),
            provider: self.provider,
            action,
            nonce: rand::random(),
            issued_at_unix_ms: now,
            valid_until_unix_ms: now + 60_000,
        };
        Signed::sign(&self.key, &c).unwrap().to_bytes()
    }
}

fn listen_addrs(startup: &serde_json::Value) -> Vec<Multiaddr> {
    startup["listen_addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().parse().unwrap()).collect()
}

fn denied(reply: &LeaseReply) -> DenyReason {
    match &reply.outcome {
        ReplyOutcome::Denied { reason, .. } => *reason,
        other => panic!("expected a denial, got {other:?}"),
    }
}

#[ignore = "needs root: runs a provider (guest image, cgroups, namespaces)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_denials_are_signed_typed_and_start_nothing() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvld", iface: "ld", net: "10.215.5", port_min: 27270, vcpus: 2, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (provider, line) = site.start_json(root, &boot);
    let provider_id: PeerId = line["peer_id"].as_str().unwrap().parse().unwrap();
    let client = Client::new(provider_id, listen_addrs(&line)).await;

    // A valid request is granted, and the grant answers exactly that request.
    let request = client.request(1);
    let bytes = client.sign(&request);
    let digest = payload_digest(&Signed::<LeaseRequest>::from_bytes(&bytes).unwrap());
    let grant = client.send_request(bytes.clone()).await;
    assert!(matches!(grant.outcome, ReplyOutcome::Granted { .. }), "{:?}", grant.outcome);
    assert_eq!(grant.in_reply_to, digest);
    assert_eq!(grant.lease_id, request.lease_id);

    // The captured request replayed: refused, also after the provider restarts.
    assert_eq!(denied(&client.send_request(bytes.clone()).await), DenyReason::Replay);
    assert!(provider.terminate().is_some(), "provider did not stop on SIGTERM");
    // It listens on a new port now.
    let (provider, line) = site.start_json(root, &boot);
    let client = Client { addrs: listen_addrs(&line), ..client };
    let replayed = client.send_request(bytes.clone()).await;
    assert_eq!(denied(&replayed), DenyReason::Replay, "replay across a restart");

    // Forged signature.
    let mut forged = client.sign(&client.request(1));
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    assert_eq!(denied(&client.send_request(forged).await), DenyReason::BadSignature);

    // Addressed to another provider.
    let mut other = client.request(1);
    other.provider = SigningKey::from_seed(&[7; 32]).peer_id();
    assert_eq!(denied(&client.send_request(client.sign(&other)).await), DenyReason::WrongProvider);

    // Unknown image, and a known name with another hash.
    let mut unknown = client.request(1);
    unknown.spec.image_name = "no-such-image".into();
    assert_eq!(denied(&client.send_request(client.sign(&unknown)).await), DenyReason::UnknownImage);
    let mut wrong_hash = client.request(1);
    wrong_hash.spec.image_sha256 = [0; 32];
    assert_eq!(denied(&client.send_request(client.sign(&wrong_hash)).await), DenyReason::UnknownImage);

    // Price below the advert.
    let mut cheap = client.request(1);
    cheap.max_price_per_hour_micros = 1;
    assert_eq!(denied(&client.send_request(client.sign(&cheap)).await), DenyReason::PriceTooLow);

    // Capacity: one of two vCPUs is leased.
    assert_eq!(denied(&client.send_request(client.sign(&client.request(2))).await), DenyReason::NoCapacity);

    // Garbage bytes.
    assert_eq!(denied(&client.send_request(vec![0xff; 40]).await), DenyReason::Malformed);

    // A control message from anyone but the lease's requestor.
    let stranger = Client::new(provider_id, client.addrs.clone()).await;
    for action in [ControlAction::Status, ControlAction::Terminate, ControlAction::Extend { additional_secs: 60 }] {
        let reply = stranger.send(LeaseMessage::Control(Envelope(stranger.control(request.lease_id, action)))).await;
        assert_eq!(denied(&reply), DenyReason::NotRequestor);
    }
    // A captured control message replayed.
    let status = client.control(request.lease_id, ControlAction::Status);
    let first = client.send(LeaseMessage::Control(Envelope(status.clone()))).await;
    assert!(matches!(first.outcome, ReplyOutcome::Status { .. }), "{:?}", first.outcome);
    assert_eq!(denied(&client.send(LeaseMessage::Control(Envelope(status))).await), DenyReason::Replay);

    // Nothing started for any denial: one lease's objects only.
    let netns = site.leftovers(root).iter().filter(|l| l.starts_with("netns")).count();
    assert_eq!(netns, 1, "{:?}", site.leftovers(root));

    // The requestor ends it.
    let reply =
        client.send(LeaseMessage::Control(Envelope(client.control(request.lease_id, ControlAction::Terminate)))).await;
    assert!(matches!(reply.outcome, ReplyOutcome::Terminated { .. }), "{:?}", reply.outcome);
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    drop(provider);
    client.node.stop().await;
    stranger.node.stop().await;
}
