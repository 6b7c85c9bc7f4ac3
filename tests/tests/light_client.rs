//! A one-shot requestor as a light client (docs/protocol.md section 9, "Filtered sync";
//! docs/bandwidth.md, design item 3): it asks the nodes it reaches for the cheapest offers
//! matching its filter instead of pulling the whole market, verifies each advert, and
//! shows only what matches by its own store's query, so a node answering it can leave
//! offers out but cannot add forged or non-matching ones.
//!
//! Every wait ends on the answer it waits for; `HANG_GUARD` only stops a test that hangs.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::PeerId;
use peervm_node::advert_store::OfferFilter;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::sync::{Envelope, SyncFilter, SyncResponse};
use peervm_node::network::{Node, Role};
use peervm_node::requestor::offers::{self, Market};
use peervm_protocol::SigningKey;
use peervm_tests::*;

const HANG_GUARD: Duration = Duration::from_secs(60);

/// A requestor's fresh identity, one per join (as `peervm offers` makes).
fn fresh_key(n: u64) -> SigningKey {
    unique_key(95_100 + n)
}

fn held(node: &Node) -> HashSet<PeerId> {
    node.store.lock().unwrap().providers().collect()
}

fn cheapest(node: &Node, filter: &OfferFilter, limit: usize) -> Vec<PeerId> {
    offers::current(node, filter, limit).into_iter().map(|o| o.provider).collect()
}

/// A one-shot requestor (fresh key `n`) joined through `boot`, pulling `market`.
async fn join(boot: &Node, n: u64, market: Market<'_>) -> Node {
    offers::join_as(fresh_key(n), &boot.listen_addrs, HANG_GUARD, HashSet::new(), market).await.expect("joins")
}

/// A market of 300 adverts (bench adverts: 1 to 64 vCPUs, six regions, varied prices).
async fn market() -> Node {
    let boot = start_node(unique_key(95_000), Role::Bootstrap, &[]).await;
    let now = now_unix_ms();
    let mut store = boot.store.lock().unwrap();
    for i in 0..300 {
        store.insert(bench_advert(i, now), now).expect("a valid advert");
    }
    drop(store);
    boot
}

#[tokio::test]
async fn a_one_shot_requestor_receives_only_the_cheapest_matching_offers_not_the_market() {
    let boot = market().await;
    let filter = OfferFilter { min_vcpus: Some(32), region: Some("eu-west".into()), ..Default::default() };
    let expected = cheapest(&boot, &filter, 5);
    assert_eq!(expected.len(), 5, "the market has more than 5 matching offers");

    let light = join(&boot, 1, Market::Matching { filter: &filter, limit: 5 }).await;
    assert_eq!(held(&light), expected.iter().copied().collect(), "it holds the 5 offers it asked for, nothing else");
    assert_eq!(cheapest(&light, &filter, 5), expected, "in the market's order");
    light.stop().await;

    // Its own block list stays with it: it asks for as many more as it excludes.
    let blocking = OfferFilter { exclude: [expected[0], expected[2]].into(), ..filter.clone() };
    let light = join(&boot, 2, Market::Matching { filter: &blocking, limit: 5 }).await;
    assert_eq!(held(&light).len(), 7);
    assert_eq!(cheapest(&light, &blocking, 5), cheapest(&boot, &blocking, 5));
    light.stop().await;

    // `--watch` and a provider chosen by id still pull the whole market.
    let full = join(&boot, 3, Market::Whole).await;
    assert_eq!(held(&full).len(), 300);
    full.stop().await;
    boot.stop().await;
}

#[tokio::test]
async fn a_node_answering_a_query_can_leave_offers_out_but_cannot_add_forged_or_unmatching_ones() {
    let now = now_unix_ms();
    let filter = OfferFilter { min_vcpus: Some(32), ..Default::default() };
    // bench advert i offers 1 + i % 64 vCPUs.
    let matching = bench_advert(40, now);
    let too_small = bench_advert(3, now);
    let mut forged = bench_advert(50, now).to_bytes();
    let last = forged.len() - 1;
    forged[last] ^= 1; // the signature's last byte
    let page = SyncResponse::Page {
        adverts: vec![Envelope(forged), Envelope(too_small.to_bytes()), Envelope(matching.to_bytes())],
        next: None,
        lists: Vec::new(),
        refreshes: None,
    };
    let (addr, requests) = recording_sync_server(page).await;

    let light = offers::join_as(
        fresh_key(4),
        &[addr],
        HANG_GUARD,
        HashSet::new(),
        Market::Matching { filter: &filter, limit: 10 },
    )
    .await
    .expect("joins");
    assert_eq!(cheapest(&light, &filter, 0), vec![matching.body().provider], "only the genuine matching offer");
    assert!(!held(&light).contains(&bench_advert(50, now).body().provider), "the forged advert is not stored");
    let asked = requests.lock().unwrap().clone();
    assert_eq!(asked.len(), 1, "one query, no full sync");
    assert_eq!(asked[0].filter, Some(SyncFilter::from(&filter)));
    assert_eq!(asked[0].max_items, 10);
    light.stop().await;
}
