//! "Every reply, denials too, is signed" (README.md) holds for the lease request that gets
//! its sender banned: the provider sends that request's signed denial, then closes the
//! connection (docs/architecture.md, "Abuse handling"; SECURITY.md, invariant 11). Both
//! ways over the threshold are driven: a flood of requests past the lease limit, and
//! forged requests (the third invalid message bans).
//!
//! The provider is a real swarm node serving `/peervm/lease/1` over loopback with the real
//! lease manager; its hypervisor starts nothing, and no request here gets that far, so
//! this runs as a normal user. The flood is counted, not timed: the provider's lease
//! bucket never refills and its flood score never decays.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::lease_wire::{Envelope, LeaseMessage};
use peervm_node::network::rate_limit::RateLimit;
use peervm_node::network::{Node, NodeConfig, NodeEvent, RateLimits, Role};
use peervm_node::provider::lease::db::ProviderDb;
use peervm_node::provider::lease::{LeaseManager, LeaseTerms};
use peervm_protocol::{DenyReason, LeaseId, LeaseReply, Pricing, ReplyOutcome, ResourceAmounts, Signed, SigningKey};
use peervm_tests::*;
use peervm_vmm::{Accel, EgressPolicy, Hypervisor, ReconcileReport, RunningVm, VmSpec, VmStatus, VmUsage, VmmError};
use tokio::sync::{broadcast, mpsc, watch};

/// A hypervisor that starts no guest: every request in this test is denied before one
/// would start.
#[derive(Clone)]
struct NoGuests;

fn no_guests() -> VmmError {
    VmmError::InvalidConfig("this provider starts no guests".into())
}

impl Hypervisor for NoGuests {
    fn accel(&self) -> Accel {
        Accel::Tcg
    }
    async fn start(&self, _: VmSpec) -> Result<RunningVm, VmmError> {
        Err(no_guests())
    }
    async fn stop(&self, _: peervm_vmm::LeaseId) -> Result<(), VmmError> {
        Ok(())
    }
    async fn isolate(&self, _: peervm_vmm::LeaseId) -> Result<(), VmmError> {
        Err(no_guests())
    }
    async fn throttle(&self, _: peervm_vmm::LeaseId, _: u32) -> Result<(), VmmError> {
        Err(no_guests())
    }
    async fn status(&self, _: peervm_vmm::LeaseId) -> Result<VmStatus, VmmError> {
        Err(no_guests())
    }
    async fn usage(&self, _: peervm_vmm::LeaseId) -> Result<VmUsage, VmmError> {
        Err(no_guests())
    }
    async fn reconcile(&self, _: &[peervm_vmm::LeaseId]) -> Result<ReconcileReport, VmmError> {
        Ok(ReconcileReport::default())
    }
}

/// The provider's lease limits: a burst of 10 that never refills, a flood score that never
/// decays, the default threshold, penalties and rule for invalid messages.
fn counted_limits() -> RateLimits {
    RateLimits {
        lease: RateLimit { per_sec: 0.0, burst: 10.0 },
        score_half_life: Duration::MAX,
        ..RateLimits::default()
    }
}

/// A provider node with the real lease manager behind it, in `dir`.
async fn start_provider(dir: &std::path::Path) -> (Node, SigningKey) {
    let key = unique_key(9_100);
    let (inbox_tx, inbox_rx) = mpsc::channel(64);
    let mut config = NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Provider);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.lease_inbox = Some(inbox_tx);
    config.rate_limits = counted_limits();
    let node = Node::start(config).await.expect("provider node starts");
    let total = ResourceAmounts { vcpus: 1, memory_mib: 1024, disk_gib: 4 };
    let terms = LeaseTerms {
        total,
        pricing: Pricing {
            currency: "USD".into(),
            per_vcpu_hour_micros: 1,
            per_memory_gib_hour_micros: 1,
            per_disk_gib_hour_micros: 1,
        },
        images: HashMap::new(),
        ssh_host: "127.0.0.1".into(),
        max_leases: 1,
        egress: EgressPolicy::Deny,
        max_exposed_ports: 0,
        expose_privileged: false,
        min_lease_secs: 60,
        max_lease_secs: 7200,
    };
    let db = ProviderDb::open(&dir.join("provider.db")).expect("provider db");
    let manager = LeaseManager::new(
        SigningKey::from_seed(&key.seed()),
        db,
        NoGuests,
        terms,
        watch::channel(total).0,
        Arc::default(),
        Some(node.client.clone()),
    );
    tokio::spawn(manager.run(inbox_rx));
    (node, key)
}

/// Lease request `n` of `key` to `provider`, signed; `forged` flips a signature bit.
fn request(key: &SigningKey, provider: &SigningKey, n: u64, forged: bool) -> LeaseMessage {
    let mut request = peervm_protocol::samples::lease_request(key, provider, now_unix_ms());
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    request.lease_id = LeaseId(id);
    request.nonce = id;
    let mut bytes = Signed::sign(key, &request).expect("sign").to_bytes();
    if forged {
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
    }
    LeaseMessage::Request(Envelope(bytes))
}

/// Sends `message` and opens the reply as a requestor would: the provider's signed reply
/// to `requestor`, or `None` when the request went unanswered.
async fn call(
    sender: &Node,
    provider: &SigningKey,
    addrs: &[Multiaddr],
    requestor: PeerId,
    message: LeaseMessage,
) -> Option<LeaseReply> {
    let bytes = sender.client.lease_call(provider.peer_id(), addrs.to_vec(), message).await.ok()?;
    let reply = Signed::<LeaseReply>::open(&bytes).expect("every reply verifies as the provider's signed reply");
    let reply = reply.body().clone();
    assert_eq!((reply.provider, reply.requestor), (provider.peer_id(), requestor), "a reply to someone else");
    Some(reply)
}

fn reason(reply: &LeaseReply) -> DenyReason {
    match &reply.outcome {
        ReplyOutcome::Denied { reason, .. } => *reason,
        other => panic!("a flood request got {other:?}"),
    }
}

/// Whether the provider has banned `peer` by now (its events are read without waiting).
fn banned(events: &mut broadcast::Receiver<NodeEvent>, peer: PeerId) -> bool {
    loop {
        match events.try_recv() {
            Ok(NodeEvent::PeerBanned(p)) if p == peer => return true,
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Sends requests one at a time until the provider bans the sender; every one of them,
/// the one that got it banned included, must be answered. Returns the reasons.
async fn until_banned(
    sender: &Node,
    provider: &Node,
    provider_key: &SigningKey,
    key: &SigningKey,
    forged: bool,
) -> Vec<DenyReason> {
    let mut events = provider.subscribe();
    let addrs = provider.listen_addrs.clone();
    let mut reasons = Vec::new();
    for n in 0..1_000u64 {
        let reply = call(sender, provider_key, &addrs, key.peer_id(), request(key, provider_key, n, forged)).await;
        let Some(reply) = reply else {
            panic!("request {n} went unanswered before the provider banned its sender: {reasons:?}");
        };
        reasons.push(reason(&reply));
        // The ban is emitted while the request that crossed the threshold is handled,
        // before its reply goes out: once that reply is here, so is the event.
        if banned(&mut events, key.peer_id()) {
            return reasons;
        }
    }
    panic!("1,000 requests and no ban: {reasons:?}");
}

/// After the ban: the next request goes unanswered and the provider drops the sender.
async fn cut_off(sender: &Node, provider: &Node, provider_key: &SigningKey, key: &SigningKey) {
    let next =
        call(sender, provider_key, &provider.listen_addrs, key.peer_id(), request(key, provider_key, 5_000, false));
    assert!(next.await.is_none(), "a banned sender was answered");
    let gone = wait_until(HANG_GUARD, || async {
        provider.client.connected_peers().await.is_ok_and(|peers| !peers.contains(&key.peer_id()))
    })
    .await;
    assert!(gone.is_some(), "the banned sender is still connected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_that_crosses_the_ban_threshold_gets_its_signed_denial_before_the_close() {
    let dir = tempfile::tempdir().unwrap();
    let (provider, provider_key) = start_provider(dir.path()).await;

    // A flood past the lease limit: the burst is served (and denied for its own reasons:
    // this provider offers no image), every request past it is a signed `rate_limited`,
    // and the one whose penalty reaches the threshold is answered like the rest.
    let flooder_key = unique_key(9_101);
    let flooder = start_node(SigningKey::from_seed(&flooder_key.seed()), Role::Requestor, &[]).await;
    let reasons = until_banned(&flooder, &provider, &provider_key, &flooder_key, false).await;
    let limits = counted_limits();
    let burst = limits.lease.burst as usize;
    let to_ban = (limits.ban_threshold / limits.throttle_penalty.lease).ceil() as usize;
    assert_eq!(reasons.len(), burst + to_ban, "banned at an unexpected request: {reasons:?}");
    assert!(reasons[..burst].iter().all(|r| *r != DenyReason::RateLimited), "{reasons:?}");
    assert!(reasons[burst..].iter().all(|r| *r == DenyReason::RateLimited), "{reasons:?}");
    cut_off(&flooder, &provider, &provider_key, &flooder_key).await;

    // Forged requests: each a signed `bad_signature`, the third (the one that bans) too.
    let forger_key = unique_key(9_102);
    let forger = start_node(SigningKey::from_seed(&forger_key.seed()), Role::Requestor, &[]).await;
    let reasons = until_banned(&forger, &provider, &provider_key, &forger_key, true).await;
    let count = limits.invalid.count;
    assert_eq!(reasons, vec![DenyReason::BadSignature; count]);
    cut_off(&forger, &provider, &provider_key, &forger_key).await;

    forger.stop().await;
    flooder.stop().await;
    provider.stop().await;
}
