//! Owner / operator separation over a real swarm: adverts carry an owner's delegation,
//! requestors filter and block by owner, and rotating a compromised node key is one new
//! delegation that retires the old key's adverts everywhere.

use std::time::Duration;

use libp2p::PeerId;
use peervm_node::advert_store::OfferFilter;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::{Node, Role};
use peervm_protocol::{Delegation, Signed, SigningKey};
use peervm_tests::*;

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
    let mut v: Vec<PeerId> = store.query(filter, now_unix_ms(), 0).iter().map(|o| o.advert.body().provider).collect();
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
    let all = wait_until(Duration::from_secs(10), || async { all_hold(&[&requestor], &ids) }).await;
    assert!(all.is_some(), "adverts did not arrive");

    let by_owner = OfferFilter { owner: Some(owner.peer_id()), ..Default::default() };
    let mut expected = vec![ids[0], ids[1]];
    expected.sort();
    assert_eq!(offered(&requestor, &by_owner), expected);
    let blocking_owner = OfferFilter { exclude: [owner.peer_id()].into_iter().collect(), ..Default::default() };
    assert_eq!(offered(&requestor, &blocking_owner), vec![ids[2]], "blocking an owner hides all its nodes");

    // A delegation for another node is refused: node 2 cannot claim the owner (its own
    // node already refuses to publish it).
    let err = publish(&nodes[2], &keys[2], 2, Some(delegate(&owner, ids[0], vec![]))).await.unwrap_err();
    assert!(err.to_string().contains("not for the advert's provider"), "{err}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(requestor.store.lock().unwrap().owner_of(&ids[2]), None);

    // Rotation: node 0's key is compromised; the owner delegates to a new key that
    // replaces it. Once the new node's advert spreads, node 0's is gone and stays gone.
    let fresh_key = unique_key(108);
    let fresh = start_node(SigningKey::from_seed(&fresh_key.seed()), Role::Provider, &boot).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish(&fresh, &fresh_key, 1, Some(delegate(&owner, fresh_key.peer_id(), vec![ids[0]]))).await.unwrap();
    let rotated = wait_until(Duration::from_secs(10), || async {
        holds(&requestor, &fresh_key.peer_id()) && !holds(&requestor, &ids[0])
    })
    .await;
    assert!(rotated.is_some(), "the replaced node's advert is still offered");
    // (Its own node may refuse already, having heard of the rotation; either way nobody
    // else takes it.)
    let _ = publish(&nodes[0], &keys[0], 2, Some(delegate(&owner, ids[0], vec![]))).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!holds(&requestor, &ids[0]), "the retired key advertised for the owner again");
    assert!(!holds(&relay, &ids[0]));

    for n in nodes.into_iter().chain([fresh, requestor, relay]) {
        n.stop().await;
    }
}
