//! Signed block lists over a real swarm: every node relays a valid list, but only the
//! nodes whose operator trusts its signer hide the providers it names; a node that joins
//! later gets the list by sync; a newer list from the same signer replaces the old one.
//!
//! Every wait ends on the state or event it waits for; `HANG_GUARD` only stops a test that
//! hangs.

mod raw_gossip;

use std::collections::HashSet;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use peervm_node::network::gossip_params::{ADVERT_TOPIC, BLOCKLIST_TOPIC};
use peervm_node::network::{Node, NodeConfig, Role};
use peervm_protocol::{BlockEntry, BlockList, Signed, SigningKey};
use peervm_tests::*;
use raw_gossip::RawGossipPeer;

async fn node_trusting(key: SigningKey, bootstrap: &[Multiaddr], trusted: &[PeerId]) -> Node {
    let mut config = NodeConfig::new(key, Role::Requestor);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()];
    config.bootstrap = bootstrap.to_vec();
    config.trusted_block_lists = trusted.iter().copied().collect::<HashSet<_>>();
    Node::start(config).await.unwrap()
}

fn list(signer: &SigningKey, seq: u64, blocked: &[PeerId]) -> peervm_protocol::Verified<BlockList> {
    let list = BlockList {
        version: 1,
        signer: signer.peer_id(),
        seq,
        issued_at_unix_ms: peervm_node::clock::now_unix_ms(),
        entries: blocked.iter().map(|p| BlockEntry { peer: *p, reason: "sold dead VMs".into() }).collect(),
    };
    Signed::sign(signer, &list).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_block_lists_hide_providers_untrusted_ones_change_nothing() {
    let relay = start_node(unique_key(91), Role::Bootstrap, &[]).await;
    let boot = relay.listen_addrs.clone();
    // A bare gossip peer of the relay only: when it hears the list, the relay has taken it.
    let mut observer = RawGossipPeer::connect(boot[0].clone(), &[ADVERT_TOPIC, BLOCKLIST_TOPIC]).await;
    let signer_key = unique_key(92);
    let signer = start_node(SigningKey::from_seed(&signer_key.seed()), Role::Requestor, &boot).await;
    let provider_key = unique_key(93);
    let provider = start_node(SigningKey::from_seed(&provider_key.seed()), Role::Provider, &boot).await;
    let pid = provider_key.peer_id();
    let trusting = node_trusting(unique_key(94), &boot, &[signer_key.peer_id()]).await;
    let other = node_trusting(unique_key(95), &boot, &[]).await;

    let first = signed(&provider_key, &advert(&provider_key, 1, Duration::from_secs(120)));
    provider.client.publish(first.clone()).await.unwrap();
    let seen = wait_until(HANG_GUARD, || async { all_hold(&[&trusting, &other, &relay], &[pid]) }).await;
    assert!(seen.is_some(), "the provider's advert did not spread");
    assert!(observer.hear(HANG_GUARD, |m| m == first.to_bytes()).await, "the relay forwards nothing to the observer");

    let list_1 = list(&signer_key, 1, &[pid]);
    signer.client.publish_block_list(list_1.clone()).await.unwrap();
    let hidden = wait_until(HANG_GUARD, || async { !holds(&trusting, &pid) }).await;
    assert!(hidden.is_some(), "the trusting node still shows a provider its trusted list names");
    assert!(trusting.list_blocked.read().unwrap().contains(&pid));
    // The operator lifting its own peer block does not lift what a trusted list blocks.
    trusting.client.unblock_peer(pid).await.expect("unblock the peer");
    // Commands run in order: once a later one answers, the unblock has been applied.
    trusting.client.connected_peers().await.expect("the node answers");
    assert!(trusting.store.lock().unwrap().is_blocked(&pid), "unblocking the peer lifted a trusted list's block");
    // Nobody else is censored: the relay and the other node keep (and relay) the offer.
    // The relay has taken the list once it forwards it; the other node has once it has
    // synced from the relay, whose first page carries the lists it holds.
    assert!(observer.hear(HANG_GUARD, |m| m == list_1.to_bytes()).await, "the relay did not relay the list");
    other.client.sync_from(relay.peer_id).await.expect("the other node syncs from the relay");
    assert!(holds(&other, &pid) && holds(&relay, &pid), "an untrusted list changed what others see");
    assert!(other.list_blocked.read().unwrap().is_empty());

    // A node joining later gets the list with its first sync and never shows the provider.
    let late = node_trusting(unique_key(96), &boot, &[signer_key.peer_id()]).await;
    let synced = wait_until(HANG_GUARD, || async { late.list_blocked.read().unwrap().contains(&pid) }).await;
    assert!(synced.is_some(), "the late joiner did not get the list by sync");
    assert!(!holds(&late, &pid));

    // A newer list without the provider lifts the block; its next advert shows again.
    signer.client.publish_block_list(list(&signer_key, 2, &[])).await.unwrap();
    let lifted = wait_until(HANG_GUARD, || async { trusting.list_blocked.read().unwrap().is_empty() }).await;
    assert!(lifted.is_some());
    provider.client.publish(signed(&provider_key, &advert(&provider_key, 2, Duration::from_secs(120)))).await.unwrap();
    let back = wait_until(HANG_GUARD, || async { holds(&trusting, &pid) }).await;
    assert!(back.is_some(), "the provider did not come back after the newer list");

    for n in [late, other, trusting, provider, signer, relay] {
        n.stop().await;
    }
}

/// A provider's config reload changes whom it trusts: the lists it already holds apply
/// (or stop applying) at once, without waiting for their signers to publish again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusting_a_signer_at_run_time_applies_the_list_already_held_and_dropping_it_lifts_it() {
    let key = unique_key(111);
    let signer_key = SigningKey::from_seed(&key.seed());
    let node = node_trusting(key, &[], &[]).await;
    let provider_key = unique_key(112);
    let pid = provider_key.peer_id();
    node.client.publish(signed(&provider_key, &advert(&provider_key, 1, Duration::from_secs(120)))).await.unwrap();
    // The node's own list is held as soon as the call returns, but not applied: the node
    // does not trust its own signer yet.
    node.client.publish_block_list(list(&signer_key, 1, &[pid])).await.unwrap();
    assert!(holds(&node, &pid) && node.list_blocked.read().unwrap().is_empty());

    node.client.set_trusted_block_lists(HashSet::from([signer_key.peer_id()])).await.unwrap();
    // Commands run in order: once a later one answers, the new trust set has been applied.
    node.client.connected_peers().await.expect("the node answers");
    assert!(node.list_blocked.read().unwrap().contains(&pid), "trusting the signer did not apply its held list");
    assert!(!holds(&node, &pid), "the newly trusted list's provider is still shown");

    node.client.set_trusted_block_lists(HashSet::new()).await.unwrap();
    node.client.connected_peers().await.expect("the node answers");
    assert!(node.list_blocked.read().unwrap().is_empty(), "a signer no longer trusted still blocks");
    assert!(!node.store.lock().unwrap().is_blocked(&pid), "the provider stays blocked after trust was dropped");
    node.stop().await;
}
