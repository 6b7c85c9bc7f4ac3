//! Owner / operator separation over a real swarm: adverts carry an owner's delegation,
//! requestors filter and block by owner, and rotating a compromised node key is one new
//! delegation that retires the old key's adverts everywhere.
//!
//! Every wait ends on the state or event it waits for; `HANG_GUARD` only stops a test that
//! hangs.

use std::time::Duration;

use libp2p::PeerId;
use peervm_node::advert_store::OfferFilter;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::{Node, NodeEvent, Role};
use peervm_protocol::{Delegation, Signed, SigningKey};
use peervm_tests::*;
use tokio::sync::broadcast;

/// How many adverts of `provider` the node behind `events` stored since it was subscribed.
fn stored_of(events: &mut broadcast::Receiver<NodeEvent>, provider: PeerId) -> usize {
    let mut n = 0;
    loop {
        match events.try_recv() {
            Ok(NodeEvent::AdvertStored { provider: p, .. }) if p == provider => n += 1,
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return n,
        }
    }
}

fn held_seq(node: &Node, provider: &PeerId) -> Option<u64> {
    node.store.lock().unwrap().held_seq(provider)
}

fn delegate(owner: &SigningKey, node: PeerId, replaces: Vec<PeerId>) -> Vec<u8> {
    let now = now_unix_ms();
    let d = Delegation {
        version: 1,
        owner: owner.peer_id(),
        node,
        not_before_unix_ms: now - 1000,
        not_after_unix_ms: now + 3_600_000,
        beneficiary: None,
        replaces,
    };
    Signed::sign(owner, &d).unwrap().to_bytes()
}

async fn publish(
    node: &Node,
    key: &SigningKey,
    seq: u64,
    delegation: Option<Vec<u8>>,
) -> Result<(), peervm_node::network::NetworkError> {
    let mut a = advert(key, seq, Duration::from_secs(120));
    a.delegation = delegation;
    node.client.publish(signed(key, &a)).await
}

fn offered(node: &Node, filter: &OfferFilter) -> Vec<PeerId> {
    let store = node.store.lock().unwrap();
    let mut v: Vec<PeerId> = store.query(filter, now_unix_ms(), 0).iter().map(|o| o.provider).collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requestors_filter_and_block_by_owner_and_a_rotated_node_key_is_retired() {
    let relay = start_node(unique_key(101), Role::Bootstrap, &[]).await;
    let boot = relay.listen_addrs.clone();
    let owner = unique_key(102);
    let keys: Vec<SigningKey> = (103..106).map(unique_key).collect();
    let mut nodes = Vec::new();
    for k in &keys {
        nodes.push(start_node(SigningKey::from_seed(&k.seed()), Role::Provider, &boot).await);
    }
    let requestor = start_node(unique_key(107), Role::Requestor, &boot).await;
    let ids: Vec<PeerId> = keys.iter().map(|k| k.peer_id()).collect();

    // Nodes 0 and 1 run for the owner; node 2 for nobody.
    publish(&nodes[0], &keys[0], 1, Some(delegate(&owner, ids[0], vec![]))).await.unwrap();
    publish(&nodes[1], &keys[1], 1, Some(delegate(&owner, ids[1], vec![]))).await.unwrap();
    publish(&nodes[2], &keys[2], 1, None).await.unwrap();
    let all = wait_until(HANG_GUARD, || async { all_hold(&[&requestor], &ids) }).await;
    assert!(all.is_some(), "adverts did not arrive");

    let by_owner = OfferFilter { owner: Some(owner.peer_id()), ..Default::default() };
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(offered(&requestor, &by_owner), expected);
    let blocking_owner = OfferFilter { exclude: [owner.peer_id()].into_iter().collect(), ..Default::default() };
    assert_eq!(offered(&requestor, &blocking_owner), vec![ids[2]], "blocking an owner hides all its nodes");

    // A delegation for another node is refused: node 2 cannot claim the owner (its own
    // node already refuses to publish it). Its next advert, without a delegation, takes
    // the same path: once the requestor has that one, the refused one would have come
    // before it, and only the one was stored.
    let mut requestor_events = requestor.subscribe();
    let err = publish(&nodes[2], &keys[2], 2, Some(delegate(&owner, ids[0], vec![]))).await.unwrap_err();
    assert!(err.to_string().contains("not for the advert's provider"), "{err}");
    publish(&nodes[2], &keys[2], 3, None).await.unwrap();
    let next = wait_until(HANG_GUARD, || async { held_seq(&requestor, &ids[2]) == Some(3) }).await;
    assert!(next.is_some(), "node 2's next advert did not arrive");
    assert_eq!(stored_of(&mut requestor_events, ids[2]), 1, "the refused advert was stored");
    assert_eq!(requestor.store.lock().unwrap().owner_of(&ids[2]), None);

    // Rotation: node 0's key is compromised; the owner delegates to a new key that
    // replaces it. Once the new node's advert spreads, node 0's is gone and stays gone.
    let fresh_key = unique_key(108);
    let fresh = start_node(SigningKey::from_seed(&fresh_key.seed()), Role::Provider, &boot).await;
    let joined =
        wait_until(HANG_GUARD, || async { fresh.client.connected_peers().await.is_ok_and(|p| !p.is_empty()) }).await;
    assert!(joined.is_some(), "the new node did not connect");
    publish(&fresh, &fresh_key, 1, Some(delegate(&owner, fresh_key.peer_id(), vec![ids[0]]))).await.unwrap();
    let rotated =
        wait_until(HANG_GUARD, || async { holds(&requestor, &fresh_key.peer_id()) && !holds(&requestor, &ids[0]) })
            .await;
    assert!(rotated.is_some(), "the replaced node's advert is still offered");
    // (Its own node may refuse already, having heard of the rotation; either way nobody
    // else takes it.) The retired key's next advert, without the owner's name (which it
    // may still send), takes the same path: once the requestor and the relay have it, the
    // one for the owner would have come before it, and it was never stored.
    let mut requestor_events = requestor.subscribe();
    let mut relay_events = relay.subscribe();
    let _ = publish(&nodes[0], &keys[0], 2, Some(delegate(&owner, ids[0], vec![]))).await;
    publish(&nodes[0], &keys[0], 3, None).await.unwrap();
    let next = wait_until(HANG_GUARD, || async {
        held_seq(&requestor, &ids[0]) == Some(3) && held_seq(&relay, &ids[0]) == Some(3)
    })
    .await;
    assert!(next.is_some(), "the retired key's advert without an owner did not arrive");
    assert_eq!(stored_of(&mut requestor_events, ids[0]), 1, "the retired key advertised for the owner again");
    assert_eq!(stored_of(&mut relay_events, ids[0]), 1, "the relay took the retired key's advert for the owner");
    for node in [&requestor, &relay] {
        assert_eq!(node.store.lock().unwrap().owner_of(&ids[0]), None, "the retired key is listed under the owner");
    }

    for n in nodes.into_iter().chain([fresh, requestor, relay]) {
        n.stop().await;
    }
}
