//! A malicious peer injecting forged, wrongly signed, expired, future-dated and old-seq
//! adverts: no honest node stores, shows or forwards any of them; the peer is penalised
//! and then disconnected (invariant 1).

use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::gossip_params::ADVERT_TOPIC;
use peervm_node::network::{NodeEvent, Role};
use peervm_protocol::encoding::to_cbor;
use peervm_protocol::signed::signing_input;
use peervm_protocol::{Kind, Signed, SigningKey};
use peervm_tests::*;
use tokio::sync::mpsc;

/// A bare gossipsub node (no Kademlia: it talks to `target` only) that publishes whatever
/// bytes it is given, unchecked, and hands over every message it receives.
async fn mallory(target: Multiaddr) -> (PeerId, mpsc::Sender<Vec<u8>>, mpsc::Receiver<()>, mpsc::Receiver<Vec<u8>>) {
    let mut swarm = libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
        .unwrap()
        .with_behaviour(|_| {
            let config = gossipsub::ConfigBuilder::default()
                .validation_mode(ValidationMode::Anonymous)
                .heartbeat_interval(Duration::from_millis(500))
                .message_id_fn(|m: &gossipsub::Message| {
                    gossipsub::MessageId::from(<sha2::Sha256 as sha2::Digest>::digest(&m.data).to_vec())
                })
                .build()
                .unwrap();
            gossipsub::Behaviour::<gossipsub::IdentityTransform>::new(MessageAuthenticity::Anonymous, config).unwrap()
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build();
    let topic = IdentTopic::new(ADVERT_TOPIC);
    swarm.behaviour_mut().subscribe(&topic).unwrap();
    swarm.dial(target).unwrap();
    let peer_id = *swarm.local_peer_id();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    let (closed_tx, closed_rx) = mpsc::channel(1);
    let (heard_tx, heard_rx) = mpsc::channel(4096);
    tokio::spawn(async move {
        let mut queue: Vec<Vec<u8>> = Vec::new();
        let mut retry = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                ev = swarm.select_next_some() => match ev {
                    SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                        let _ = closed_tx.send(()).await;
                    }
                    SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) => {
                        let _ = heard_tx.try_send(message.data);
                    }
                    _ => {}
                },
                msg = rx.recv() => match msg { Some(m) => queue.push(m), None => return },
                _ = retry.tick() => {
                    // Publishing fails until the honest node's subscription has arrived.
                    queue.retain(|m| swarm.behaviour_mut().publish(topic.clone(), m.clone()).is_err());
                }
            }
        }
    });
    (peer_id, tx, closed_rx, heard_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malicious_peer_adverts_never_stored_shown_or_forwarded_and_peer_is_banned() {
    let a = start_node(unique_key(7_000), Role::Bootstrap, &[]).await;
    let b = start_node(unique_key(7_001), Role::Requestor, &a.listen_addrs).await;
    let p_key = unique_key(7_002);
    let p = start_node(peervm_protocol::SigningKey::from_seed(&p_key.seed()), Role::Provider, &a.listen_addrs).await;
    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The honest provider's current advert: seq 100.
    let long = Duration::from_secs(300);
    let old = signed(&p_key, &advert(&p_key, 50, long)).to_bytes();
    p.client.publish(signed(&p_key, &advert(&p_key, 100, long))).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async { holds(&a, &p_key.peer_id()) && holds(&b, &p_key.peer_id()) })
            .await
            .is_some()
    );

    let (m_peer, m_tx, mut m_closed, _heard) = mallory(a.listen_addrs[0].clone()).await;
    let m_key = unique_key(7_003);
    let victim = unique_key(7_004);
    let mut bad_providers = vec![m_key.peer_id(), victim.peer_id()];
    let now = now_unix_ms();

    // Ignorable ones first (no penalty, but never stored or forwarded).
    let mut expired = advert(&m_key, 1, long);
    expired.issued_at_unix_ms = now - 400_000;
    expired.expires_at_unix_ms = now - 100_000;
    let mut future = advert(&m_key, 2, long);
    future.issued_at_unix_ms = now + 120_000;
    future.expires_at_unix_ms = now + 300_000;
    for msg in [signed(&m_key, &expired).to_bytes(), signed(&m_key, &future).to_bytes(), old] {
        m_tx.send(msg).await.unwrap();
    }
    // Then forged and wrongly signed adverts until the ban.
    for i in 0..12u64 {
        // Forged: claims to be the victim, signed by mallory.
        let body = advert(&victim, 1000 + i, long);
        let payload = to_cbor(&body);
        let sig = m_key.sign_raw(&signing_input(Kind::Advert, &payload));
        m_tx.send(Signed::<peervm_protocol::Advertisement>::from_parts(payload, m_key.peer_id(), sig).to_bytes())
            .await
            .unwrap();
        // Wrongly signed: mallory's own advert with one signature bit flipped.
        let mut bytes = signed(&m_key, &advert(&m_key, 10 + i, long)).to_bytes();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        m_tx.send(bytes).await.unwrap();
    }

    // The honest node bans mallory and drops the connection.
    let banned = tokio::time::timeout(Duration::from_secs(20), async {
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
    assert!(tokio::time::timeout(Duration::from_secs(10), m_closed.recv()).await.is_ok(), "mallory still connected");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Nothing of it was stored or shown anywhere; the honest advert is untouched.
    for node in [&a, &b] {
        let store = node.store.lock().unwrap();
        for bad in &bad_providers {
            assert!(!store.contains(bad), "{bad} stored");
        }
        assert_eq!(store.held_seq(&p_key.peer_id()), Some(100));
        let shown = store.query(&Default::default(), now_unix_ms(), 0);
        assert_eq!(shown.len(), 1, "only the honest advert is shown");
    }
    // Nothing was forwarded: b never saw any advert but the honest one.
    bad_providers.push(m_peer);
    while let Ok(ev) = b_events.try_recv() {
        if let NodeEvent::AdvertStored { provider, .. } = ev {
            assert_eq!(provider, p_key.peer_id(), "b received a forwarded bad advert");
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
    let (_observer, _publish, _closed, mut heard) = mallory(relay.listen_addrs[0].clone()).await;
    relay.client.block_adverts(pid, true).await.unwrap();
    let meshed = wait_until(Duration::from_secs(10), || async {
        relay.client.connected_peers().await.map(|p| p.len() >= 2).unwrap_or(false)
    })
    .await;
    assert!(meshed.is_some(), "relay did not connect to both");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let heard_from_provider = |heard: &mut mpsc::Receiver<Vec<u8>>| {
        let mut n = 0;
        while let Ok(bytes) = heard.try_recv() {
            if Signed::<peervm_protocol::Advertisement>::open(&bytes).is_ok_and(|a| a.body().provider == pid) {
                n += 1;
            }
        }
        n
    };
    for seq in 1..=3u64 {
        provider
            .client
            .publish(signed(&provider_key, &advert(&provider_key, seq, Duration::from_secs(60))))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(holds(&provider, &pid), "the provider holds its own advert");
    assert!(!holds(&relay, &pid), "the relay stored a blocked provider's advert");
    assert_eq!(heard_from_provider(&mut heard), 0, "the relay forwarded a blocked provider's advert");

    relay.client.block_adverts(pid, false).await.unwrap();
    provider.client.publish(signed(&provider_key, &advert(&provider_key, 4, Duration::from_secs(60)))).await.unwrap();
    let reached = wait_until(Duration::from_secs(10), || async { holds(&relay, &pid) }).await;
    assert!(reached.is_some(), "after unblocking, the relay stores the provider's advert");
    let mut forwarded = 0;
    for _ in 0..40 {
        forwarded += heard_from_provider(&mut heard);
        if forwarded > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(forwarded > 0, "after unblocking, the relay forwards the provider's advert");
    for n in [provider, relay] {
        n.stop().await;
    }
}
