//! The swarm over real libp2p connections on loopback: propagation, join-time sync (and
//! none after it), withdrawal, expiry, and losing a bootstrap node.
//!
//! Every wait ends on the state or event it waits for; `HANG_GUARD` only stops a test that
//! hangs, it is not a verdict on how fast the machine is.

use std::time::Duration;

use libp2p::PeerId;
use peervm_node::advert_store::OfferFilter;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::sync::SyncResponse;
use peervm_node::network::{Node, NodeEvent, Role, peer_id_of};
use peervm_tests::*;

struct Swarm {
    bootstraps: Vec<Node>,
    providers: Vec<(Node, peervm_protocol::SigningKey)>,
    requestors: Vec<Node>,
}

impl Swarm {
    async fn start(tag: u64, n_providers: usize, n_requestors: usize) -> Swarm {
        let b1 = start_node(unique_key(tag), Role::Bootstrap, &[]).await;
        let b2 = start_node(unique_key(tag + 1), Role::Bootstrap, &b1.listen_addrs).await;
        let boot: Vec<_> = [b1.listen_addrs[0].clone(), b2.listen_addrs[0].clone()].to_vec();
        let mut providers = Vec::new();
        for i in 0..n_providers {
            let key = unique_key(tag + 100 + i as u64);
            let node = start_node(peervm_protocol::SigningKey::from_seed(&key.seed()), Role::Provider, &boot).await;
            providers.push((node, key));
        }
        let mut requestors = Vec::new();
        for i in 0..n_requestors {
            requestors.push(start_node(unique_key(tag + 500 + i as u64), Role::Requestor, &boot).await);
        }
        Swarm { bootstraps: vec![b1, b2], providers, requestors }
    }

    fn bootstrap_addrs(&self) -> Vec<libp2p::Multiaddr> {
        self.bootstraps.iter().map(|b| b.listen_addrs[0].clone()).collect()
    }

    fn all(&self) -> Vec<&Node> {
        self.bootstraps.iter().chain(self.providers.iter().map(|(n, _)| n)).chain(self.requestors.iter()).collect()
    }

    fn provider_ids(&self) -> Vec<PeerId> {
        self.providers.iter().map(|(_, k)| k.peer_id()).collect()
    }

    /// Every provider publishes an advert of at least `seq`, again every round as its
    /// daemon would, until every node in `nodes` holds them all (gossip alone may miss a
    /// node on a loaded machine: `publish_until_everywhere`). Returns the next unused seq.
    async fn publish_until_held(&self, seq: u64, nodes: &[&Node]) -> u64 {
        let publishers: Vec<(&Node, &peervm_protocol::SigningKey)> =
            self.providers.iter().map(|(n, k)| (n, k)).collect();
        let (_, rounds) = publish_until_everywhere(&publishers, nodes, seq, HANG_GUARD)
            .await
            .expect("not every node got every advert");
        seq + rounds
    }

    async fn stop(self) {
        for n in self.requestors.into_iter().chain(self.providers.into_iter().map(|(n, _)| n)).chain(self.bootstraps) {
            n.stop().await;
        }
    }
}

const LONG: Duration = Duration::from_secs(300);

/// Waits until every node in `nodes` has at least one peer.
async fn all_connected(nodes: &[&Node]) -> bool {
    wait_until(HANG_GUARD, || async {
        for n in nodes {
            if n.client.connected_peers().await.map(|p| p.is_empty()).unwrap_or(true) {
                return false;
            }
        }
        true
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_of_20_nodes_every_advert_reaches_every_node() {
    let swarm = Swarm::start(1_000, 12, 6).await;
    assert_eq!(swarm.all().len(), 20);
    // Publish once every node is connected. Every node has synced already (and syncs no
    // more), so this is gossip's work, with republishing as a provider daemon does.
    assert!(all_connected(&swarm.all()).await, "not every node connected");
    let next = swarm.publish_until_held(1, &swarm.all()).await;
    // A newer advert replaces the older one everywhere.
    swarm.publish_until_held(next, &swarm.all()).await;
    swarm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_sees_every_live_advert_through_sync() {
    let swarm = Swarm::start(2_000, 8, 0).await;
    assert!(all_connected(&swarm.all()).await, "not every node connected");
    swarm.publish_until_held(1, &swarm.bootstraps.iter().collect::<Vec<_>>()).await;
    let ids = swarm.provider_ids();

    // The late node is watched from before it connects; it dials one bootstrap node.
    let late = start_node(unique_key(2_999), Role::Requestor, &[]).await;
    let mut events = late.subscribe();
    let boot = &swarm.bootstraps[0];
    late.client.dial(swarm.bootstrap_addrs()[0].clone()).await.expect("dial the bootstrap node");
    // Its first sync with the bootstrap node, started on connecting, brings every advert:
    // they are all in its store when that sync reports done.
    let synced = tokio::time::timeout(HANG_GUARD, async {
        loop {
            match events.recv().await {
                Ok(NodeEvent::SyncDone { peer, .. }) if peer == boot.peer_id => return true,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(synced, Ok(true), "the late node's sync with the bootstrap node never finished");
    assert!(all_hold(&[&late], &ids), "the late joiner's sync did not bring every advert");
    late.stop().await;
    swarm.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_withdrawal_reaches_everyone_and_killed_provider_expires() {
    let swarm = Swarm::start(3_000, 4, 3).await;
    assert!(all_connected(&swarm.all()).await, "not every node connected");
    // Provider 0 and 1 publish long-lived adverts; 2 and 3 short-lived ones (a short TTL
    // as a test configures it).
    // Republished every round, as daemons do, until every node holds all four at once.
    let ttl_short = Duration::from_secs(8);
    let ids = swarm.provider_ids();
    let publish = |round: u64| {
        let providers = &swarm.providers;
        async move {
            for (i, (node, key)) in providers.iter().enumerate() {
                let ttl = if i < 2 { LONG } else { ttl_short };
                node.client.publish(signed(key, &advert(key, 1 + round, ttl))).await.unwrap();
            }
        }
    };
    let (_, rounds) = republish_until(HANG_GUARD, publish, || async { all_hold(&swarm.all(), &ids) })
        .await
        .expect("not every node got every advert");

    // Graceful stop of provider 0: a withdrawn advert removes it everywhere (sent again
    // until it has, as a node that missed it would otherwise hold the advert until expiry).
    let (node0, key0) = &swarm.providers[0];
    let withdrawal = 1 + rounds;
    let others: Vec<&Node> = swarm.all().into_iter().filter(|n| n.peer_id != node0.peer_id).collect();
    let withdraw = |round: u64| async move {
        let mut withdrawn = advert(key0, withdrawal + round, LONG);
        withdrawn.withdrawn = true;
        node0.client.publish(signed(key0, &withdrawn)).await.unwrap();
    };
    let gone = republish_until(HANG_GUARD, withdraw, || async { none_hold(&others, &ids[..1]) }).await;
    assert!(gone.is_some(), "withdrawal did not reach every node");
    // An older advert of the withdrawn provider, replayed, does not bring it back.
    let stale = signed(key0, &advert(key0, 1, LONG));
    assert!(node0.store.lock().unwrap().insert(stale, peervm_node::clock::now_unix_ms()).is_err());

    // Provider 2 "crashes": no withdrawal. Its advert ages out of every store at expiry.
    let Swarm { bootstraps, mut providers, requestors } = swarm;
    let (crashed, _) = providers.remove(2);
    crashed.abort();
    let survivors: Vec<&Node> =
        bootstraps.iter().chain(providers.iter().map(|(n, _)| n)).chain(requestors.iter()).collect();
    let expired = wait_until(HANG_GUARD, || async { none_hold(&survivors, &ids[2..3]) }).await;
    assert!(expired.is_some(), "crashed provider's advert did not expire everywhere");
    // Provider 1, long-lived, is still everywhere.
    assert!(all_hold(&survivors, &ids[1..2]));
    for n in requestors.into_iter().chain(providers.into_iter().map(|(n, _)| n)).chain(bootstraps) {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bootstrap_killed_adverts_still_propagate_and_new_nodes_join() {
    let swarm = Swarm::start(4_000, 4, 3).await;
    assert!(all_connected(&swarm.all()).await, "not every node connected");
    let next = swarm.publish_until_held(1, &swarm.all()).await;
    let ids = swarm.provider_ids();

    let boot_addrs = swarm.bootstrap_addrs();
    let Swarm { mut bootstraps, providers, requestors } = swarm;
    let killed = bootstraps.remove(0);
    let killed_id = killed.peer_id;
    killed.abort();
    // Every node has noticed that the dead node's connections are gone.
    let alive: Vec<&Node> =
        bootstraps.iter().chain(providers.iter().map(|(n, _)| n)).chain(requestors.iter()).collect();
    let noticed = wait_until(HANG_GUARD, || async {
        for n in &alive {
            if n.client.connected_peers().await.map(|p| p.contains(&killed_id)).unwrap_or(true) {
                return false;
            }
        }
        true
    })
    .await;
    assert!(noticed.is_some(), "a node still counts the dead bootstrap node as connected");

    // Propagation continues: every provider publishes a newer advert.
    let publishers: Vec<(&Node, &peervm_protocol::SigningKey)> = providers.iter().map(|(n, k)| (n, k)).collect();
    let newest = publish_until_everywhere(&publishers, &alive, next, HANG_GUARD).await;
    assert!(newest.is_some(), "adverts stopped propagating after a bootstrap died");

    // A new node given both bootstraps (the first dead) still joins and sees the market.
    let newcomer = start_node(unique_key(4_999), Role::Requestor, &boot_addrs).await;
    let joined = wait_until(HANG_GUARD, || async { all_hold(&[&newcomer], &ids) }).await;
    assert!(joined.is_some(), "a new node could not join through the surviving bootstrap");
    newcomer.stop().await;
    for n in requestors.into_iter().chain(providers.into_iter().map(|(n, _)| n)).chain(bootstraps) {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_connect_and_sync_over_quic() {
    let mut config = peervm_node::network::NodeConfig::new(unique_key(5_000), Role::Bootstrap);
    config.listen = vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().unwrap()];
    let boot = Node::start(config).await.unwrap();
    assert!(boot.listen_addrs[0].to_string().contains("/quic-v1/p2p/"), "{:?}", boot.listen_addrs);
    let key = unique_key(5_001);
    boot.client.publish(signed(&key, &advert(&key, 1, LONG))).await.unwrap();
    let joiner = start_node(unique_key(5_002), Role::Requestor, &boot.listen_addrs).await;
    let got = wait_until(HANG_GUARD, || async { holds(&joiner, &key.peer_id()) }).await;
    assert!(got.is_some(), "no sync over QUIC");
    joiner.stop().await;
    boot.stop().await;
}

/// A full node pulls the market when it joins, not from every peer it connects to later:
/// at 100,000 providers that is 65 MB per connection (docs/architecture.md, "Sync"). Once
/// it pulled it from two peers, a new peer sees only a one-advert first page asked for its
/// block lists, then what the node asks on purpose: here its own query. (Without the rule,
/// the connection's full sync is requested before the dial is even answered.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_holding_a_market_does_not_pull_it_again_from_each_new_peer() {
    let (boots, node) = joined_market(2_700).await;
    let (addr, requests) = recording_sync_server(empty_page()).await;
    let server = peer_id_of(&addr).expect("the address names its peer");
    node.client.dial(addr).await.expect("dial the new peer");
    node.client.query_from(server, &OfferFilter::default(), 1).await.expect("the query is answered");
    // The connection's own request and the query, in either order (two streams).
    let both = wait_until(HANG_GUARD, || async { requests.lock().unwrap().len() >= 2 }).await;
    assert!(both.is_some(), "the connection asked for nothing: {:?}", requests.lock().unwrap());
    let asked = requests.lock().unwrap().clone();
    let unfiltered: Vec<_> = asked.iter().filter(|r| r.filter.is_none() && r.ids.is_none()).collect();
    assert_eq!(unfiltered.len(), 1, "one request of the connection's own: {asked:?}");
    assert_eq!(unfiltered[0].max_items, 1, "one advert's first page, for its block lists, not a full sync: {asked:?}");
    assert_eq!(asked.len(), 2, "and the query: {asked:?}");
    node.stop().await;
    for b in boots {
        b.stop().await;
    }
}

/// A node that lost every peer may have missed anything meanwhile: the next peer it
/// reaches gets a full sync request again, unasked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_had_no_peer_pulls_the_market_again_from_the_next_one() {
    let (boots, node) = joined_market(2_800).await;
    for b in boots {
        b.stop().await;
    }
    let alone = wait_until(HANG_GUARD, || async { node.client.connected_peers().await.is_ok_and(|p| p.is_empty()) });
    assert!(alone.await.is_some(), "the node never noticed its peers were gone");

    let (addr, requests) = recording_sync_server(empty_page()).await;
    node.client.dial(addr).await.expect("dial the new peer");
    let asked = wait_until(HANG_GUARD, || async { !requests.lock().unwrap().is_empty() }).await;
    assert!(asked.is_some(), "the node asked its new peer for nothing");
    let first = requests.lock().unwrap()[0].clone();
    assert!(
        first.filter.is_none() && first.ids.is_none() && first.after.is_none() && first.max_items > 1,
        "a full sync's first page: {first:?}"
    );
    node.stop().await;
}

/// Two bootstrap nodes holding one advert each, and a provider node that joined through
/// both and pulled both markets to their last page (it holds both adverts): the two
/// sources after which a node holds a market (`MARKET_SOURCES`).
async fn joined_market(tag: u64) -> (Vec<Node>, Node) {
    let now = now_unix_ms();
    let mut boots = Vec::new();
    let mut providers = Vec::new();
    for i in 0..2 {
        let boot = start_node(unique_key(tag + i), Role::Bootstrap, &[]).await;
        let advert = bench_advert(tag + i, now);
        providers.push(advert.body().provider);
        boot.store.lock().unwrap().insert(advert, now).expect("a valid advert");
        boots.push(boot);
    }
    // Watched from before it connects, it dials both.
    let node = start_node(unique_key(tag + 10), Role::Provider, &[]).await;
    let mut events = node.subscribe();
    for b in &boots {
        node.client.dial(b.listen_addrs[0].clone()).await.expect("dial a bootstrap node");
    }
    let mut synced = std::collections::HashSet::new();
    let done = tokio::time::timeout(HANG_GUARD, async {
        while synced.len() < 2 {
            match events.recv().await {
                Ok(NodeEvent::SyncDone { peer, .. }) => {
                    synced.insert(peer);
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(done.is_ok(), "the joining node's syncs with both bootstrap nodes never finished");
    assert!(providers.iter().all(|p| holds(&node, p)), "the joining node's syncs did not bring both adverts");
    (boots, node)
}

fn empty_page() -> SyncResponse {
    SyncResponse::Page { adverts: Vec::new(), next: None, lists: Vec::new(), refreshes: None }
}
