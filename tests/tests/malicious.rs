//! A malicious peer injecting forged, wrongly signed, expired, future-dated and old-seq
//! adverts: no honest node stores, shows or forwards any of them; the peer is penalised
//! and then disconnected (SECURITY.md, invariant 1).
//!
//! "Not forwarded" is observed on the wire: a raw gossipsub observer next to the honest
//! node records every message the node forwards to it. A negative check runs only after
//! the observer has heard a valid advert sent the same way, after the bad ones.

mod raw_gossip;

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::gossip_params::ADVERT_TOPIC;
use peervm_node::network::{Node, NodeEvent, Role};
use peervm_protocol::encoding::to_cbor;
use peervm_protocol::signed::signing_input;
use peervm_protocol::{Advertisement, Kind, Signed, SigningKey, Verified};
use peervm_tests::*;
use raw_gossip::RawGossipPeer;

/// The provider an advert's bytes claim, if they parse.
fn provider_of(bytes: &[u8]) -> Option<PeerId> {
    Signed::<Advertisement>::open(bytes).ok().map(|a| a.body().provider)
}

/// The providers whose adverts `node` shows.
fn shown(node: &Node) -> HashSet<PeerId> {
    let store = node.store.lock().unwrap();
    store.query(&Default::default(), now_unix_ms(), 0).iter().map(|o| o.provider).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_peer_adverts_never_stored_shown_or_forwarded_and_peer_is_banned() {
    let a = start_node(unique_key(7_000), Role::Bootstrap, &[]).await;
    let b = start_node(unique_key(7_001), Role::Requestor, &a.listen_addrs).await;
    let p_key = unique_key(7_002);
    let p = start_node(peervm_protocol::SigningKey::from_seed(&p_key.seed()), Role::Provider, &a.listen_addrs).await;
    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    let joined =
        wait_until(HANG_GUARD, || async { a.client.connected_peers().await.is_ok_and(|peers| peers.len() >= 2) }).await;
    assert!(joined.is_some(), "b and p did not connect to a");

    // The honest provider's current advert: seq 100.
    let long = Duration::from_secs(300);
    let old = signed(&p_key, &advert(&p_key, 50, long)).to_bytes();
    p.client.publish(signed(&p_key, &advert(&p_key, 100, long))).await.unwrap();
    assert!(
        wait_until(HANG_GUARD, || async { holds(&a, &p_key.peer_id()) && holds(&b, &p_key.peer_id()) }).await.is_some()
    );

    // Mallory and an observer, each a raw gossip peer of a only: what the observer hears,
    // a forwarded. A valid advert (of an honest key, c) sent by mallory is the positive
    // control: first to see that a forwards mallory's messages to the observer at all.
    let mut mallory = RawGossipPeer::connect(a.listen_addrs[0].clone(), &[ADVERT_TOPIC]).await;
    let mut observer = RawGossipPeer::connect(a.listen_addrs[0].clone(), &[ADVERT_TOPIC]).await;
    let m_peer = mallory.peer_id;
    let c_key = unique_key(7_005);
    let next = until_the_path_carries(|ad| mallory.publish(ADVERT_TOPIC, ad.to_bytes()), &c_key, &mut observer).await;
    let control: Vec<_> = (next..next + 4).map(|seq| signed(&c_key, &advert(&c_key, seq, long))).collect();

    let m_key = unique_key(7_003);
    let victim = unique_key(7_004);
    let bad_providers = vec![m_key.peer_id(), victim.peer_id()];
    let now = now_unix_ms();
    let mut bad: Vec<Vec<u8>> = Vec::new();

    // Ignorable ones first (no penalty, but never stored or forwarded).
    let mut expired = advert(&m_key, 1, long);
    expired.issued_at_unix_ms = now - 400_000;
    expired.expires_at_unix_ms = now - 100_000;
    let mut future = advert(&m_key, 2, long);
    future.issued_at_unix_ms = now + 120_000;
    future.expires_at_unix_ms = now + 300_000;
    bad.extend([signed(&m_key, &expired).to_bytes(), signed(&m_key, &future).to_bytes(), old]);
    // Then forged and wrongly signed adverts.
    for i in 0..12u64 {
        // Forged: claims to be the victim, signed by mallory.
        let body = advert(&victim, 1000 + i, long);
        let payload = to_cbor(&body);
        let sig = m_key.sign_raw(&signing_input(Kind::Advert, &payload));
        bad.push(Signed::<Advertisement>::from_parts(payload, m_key.peer_id(), sig).to_bytes());
        // Wrongly signed: mallory's own advert with one signature bit flipped.
        let mut bytes = signed(&m_key, &advert(&m_key, 10 + i, long)).to_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        bad.push(bytes);
    }
    let is_bad = |m: &[u8]| bad.iter().any(|b| b == m) || provider_of(m).is_some_and(|p| bad_providers.contains(&p));

    // The ignorable ones, one forged and one wrongly signed (two invalid messages, one
    // short of a ban), then the control: once the observer hears it, a has judged every
    // message before it, and forwarded none of them.
    for msg in &bad[..5] {
        mallory.publish(ADVERT_TOPIC, msg.clone()).await;
    }
    mallory.publish(ADVERT_TOPIC, control[2].to_bytes()).await;
    assert!(observer.hear(HANG_GUARD, |m| m == control[2].to_bytes()).await, "a never forwarded the control advert");
    assert!(!observer.heard_any(is_bad), "a forwarded a bad advert");

    // The rest, until the ban.
    for msg in &bad[5..] {
        mallory.publish(ADVERT_TOPIC, msg.clone()).await;
    }
    let banned = tokio::time::timeout(HANG_GUARD, async {
        loop {
            match a_events.recv().await {
                Ok(NodeEvent::PeerBanned(p)) if p == m_peer => return true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(banned, Ok(true), "mallory was not banned");
    assert!(mallory.disconnected(HANG_GUARD).await, "mallory still connected");

    // A last valid advert, published by the honest provider's node after the ban: once
    // the observer and b have it, a has forwarded whatever it was going to forward.
    p.client.publish(control[3].clone()).await.unwrap();
    assert!(
        observer.hear(HANG_GUARD, |m| m == control[3].to_bytes()).await,
        "a never forwarded the last control advert"
    );
    let last = wait_until(HANG_GUARD, || async {
        [&a, &b].iter().all(|n| n.store.lock().unwrap().held_seq(&c_key.peer_id()) == Some(next + 3))
    })
    .await;
    assert!(last.is_some(), "the last control advert did not reach a and b");

    // Nothing bad was forwarded to the observer, nor stored or shown anywhere; the honest
    // advert is untouched.
    assert!(!observer.heard_any(is_bad), "a forwarded a bad advert");
    let honest: HashSet<PeerId> = [p_key.peer_id(), c_key.peer_id()].into();
    for node in [&a, &b] {
        {
            let store = node.store.lock().unwrap();
            for bad in &bad_providers {
                assert!(!store.contains(bad), "{bad} stored");
            }
            assert_eq!(store.held_seq(&p_key.peer_id()), Some(100));
        }
        assert_eq!(shown(node), honest, "only the honest adverts are shown");
    }
    // b stored no advert but the honest ones.
    while let Ok(ev) = b_events.try_recv() {
        if let NodeEvent::AdvertStored { provider, .. } = ev {
            assert!(honest.contains(&provider), "b stored a forwarded bad advert of {provider}");
        }
    }
    b.stop().await;
    p.stop().await;
    a.stop().await;
}

/// Incident response on the swarm: a relay whose operator blocked a provider neither
/// stores nor forwards its adverts; lifting the block lets the next advert through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_does_not_store_or_forward_adverts_of_a_provider_it_blocked() {
    let relay = start_node(unique_key(71), Role::Bootstrap, &[]).await;
    let provider_key = unique_key(72);
    let pid = provider_key.peer_id();
    let provider = start_node(SigningKey::from_seed(&provider_key.seed()), Role::Provider, &relay.listen_addrs).await;
    // A bare gossip peer of the relay only: what it hears, the relay forwarded.
    let mut observer = RawGossipPeer::connect(relay.listen_addrs[0].clone(), &[ADVERT_TOPIC]).await;
    relay.client.block_adverts(pid, true).await.unwrap();
    // The call returns once the block is in force, not once it is queued: a message the
    // relay handles from now on meets it.
    assert!(relay.store.lock().unwrap().is_blocked(&pid), "the block was not in force when the call returned");

    // The positive control: adverts of another key, published by the same node, take the
    // same path (provider -> relay -> observer).
    let other = unique_key(73);
    let long = Duration::from_secs(300);
    let next =
        until_the_path_carries(|a| async { provider.client.publish(a).await.unwrap() }, &other, &mut observer).await;

    let blocked: Vec<_> = (1..=3u64).map(|seq| signed(&provider_key, &advert(&provider_key, seq, long))).collect();
    for a in &blocked {
        provider.client.publish(a.clone()).await.unwrap();
    }
    let last_control = signed(&other, &advert(&other, next, long));
    provider.client.publish(last_control.clone()).await.unwrap();
    // Once the observer has the control that followed them, the relay has judged the
    // blocked provider's adverts.
    assert!(observer.hear(HANG_GUARD, |m| m == last_control.to_bytes()).await, "the relay forwarded nothing");
    let judged =
        wait_until(HANG_GUARD, || async { relay.store.lock().unwrap().held_seq(&other.peer_id()) == Some(next) }).await;
    assert!(judged.is_some(), "the relay did not store the control advert");
    assert!(holds(&provider, &pid), "the provider holds its own advert");
    assert!(!holds(&relay, &pid), "the relay stored a blocked provider's advert");
    assert!(!observer.heard_any(|m| provider_of(m) == Some(pid)), "the relay forwarded a blocked provider's advert");

    relay.client.block_adverts(pid, false).await.unwrap();
    // Lifted on return: otherwise the advert published next can meet the old block and be
    // dropped for good (gossipsub does not deliver a message twice).
    assert!(!relay.store.lock().unwrap().is_blocked(&pid), "the block was still in force when the call returned");
    let unblocked = signed(&provider_key, &advert(&provider_key, 4, long));
    provider.client.publish(unblocked.clone()).await.unwrap();
    let reached = wait_until(HANG_GUARD, || async { holds(&relay, &pid) }).await;
    assert!(reached.is_some(), "after unblocking, the relay stores the provider's advert");
    assert!(
        observer.hear(HANG_GUARD, |m| m == unblocked.to_bytes()).await,
        "after unblocking, the relay forwards the provider's advert"
    );
    for n in [provider, relay] {
        n.stop().await;
    }
}

/// Publishes fresh adverts of `key` through `publish` until `observer` hears one: from
/// then on the path to the observer carries messages. Gossipsub forwards only to peers
/// in its mesh, which forms on heartbeats, so a message sent before the observer was
/// grafted never reaches it; each try waits a little for it (pacing only), and the count
/// of tries is the hang guard. Returns the seq to use next.
async fn until_the_path_carries<F, Fut>(publish: F, key: &SigningKey, observer: &mut RawGossipPeer) -> u64
where
    F: Fn(Verified<Advertisement>) -> Fut,
    Fut: Future<Output = ()>,
{
    const TRIES: u64 = 90;
    for seq in 1..=TRIES {
        let a = signed(key, &advert(key, seq, Duration::from_secs(300)));
        let bytes = a.to_bytes();
        publish(a).await;
        if observer.hear(Duration::from_secs(2), |m| m == bytes).await {
            return seq + 1;
        }
    }
    panic!("none of {TRIES} adverts reached the observer");
}
