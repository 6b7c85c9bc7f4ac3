//! Refresh tokens over real libp2p swarms on loopback (docs/protocol.md, sections 4a and
//! 9a): a provider's tokens keep its advert live on every node past its signed expiry,
//! and it lapses everywhere once they stop; a node that joins later gets the advert and
//! its token by sync; a node that missed an advert fetches it by the id of its tokens; a
//! forged token is refused, never relayed, and bans its sender (SECURITY.md, "Only a
//! provider extends its advert").

mod raw_refresh;

use std::time::Duration;

use libp2p::PeerId;
use peervm_node::clock::now_unix_ms;
use peervm_node::network::{Node, NodeConfig, NodeEvent, Role, with_peer_id};
use peervm_protocol::{Advertisement, RefreshRecord, RefreshSecret, SigningKey, Verified};
use peervm_tests::*;
use raw_refresh::RawRefreshPeer;
use tokio::sync::broadcast;

/// The shortest chain the protocol allows: a token every 10 s, a signed lifetime of 20 s.
const PERIOD_S: u32 = 10;
const TTL: Duration = Duration::from_secs(20);

/// `key`'s advert number `seq` with a chain of `count` tokens, and the secret that makes
/// them.
fn chained(key: &SigningKey, seq: u64, count: u32) -> (Verified<Advertisement>, RefreshSecret) {
    let mut body = advert(key, seq, TTL);
    let mut seed = [0u8; 16];
    seed[..8].copy_from_slice(&seq.to_le_bytes());
    seed[8..].copy_from_slice(&now_unix_ms().to_le_bytes());
    let (chain, secret) = RefreshSecret::generate(&key.peer_id(), seq, PERIOD_S, count, seed).expect("chain");
    body.refresh = Some(chain);
    (signed(key, &body), secret)
}

/// Sleeps until token `k`'s release time: the protocol's clock, not a verdict on speed
/// (a node refuses a token released early).
async fn until_release(advert: &Verified<Advertisement>, k: u16) {
    let at = advert.body().issued_at_unix_ms + u64::from(k) * u64::from(PERIOD_S) * 1000;
    let now = now_unix_ms();
    if at > now {
        tokio::time::sleep(Duration::from_millis(at - now)).await;
    }
}

/// Waits until every receiver has seen `provider`'s token `k` (or a later one).
async fn all_refreshed(events: &mut [broadcast::Receiver<NodeEvent>], provider: PeerId, k: u16) -> bool {
    for rx in events.iter_mut() {
        let got = tokio::time::timeout(HANG_GUARD, async {
            loop {
                match rx.recv().await {
                    Ok(NodeEvent::AdvertRefreshed { provider: p, k: got, .. }) if p == provider && got >= k => {
                        return true;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if got != Ok(true) {
            return false;
        }
    }
    true
}

/// Waits until every receiver has seen `provider`'s advert expire.
async fn all_expired(events: &mut [broadcast::Receiver<NodeEvent>], provider: PeerId) -> bool {
    for rx in events.iter_mut() {
        let gone = tokio::time::timeout(HANG_GUARD, async {
            loop {
                match rx.recv().await {
                    Ok(NodeEvent::AdvertsExpired(ps)) if ps.contains(&provider) => return true,
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => return false,
                }
            }
        })
        .await;
        if gone != Ok(true) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_tokens_keep_an_advert_live_past_its_signed_expiry_everywhere_and_it_lapses_when_they_stop() {
    let boot = start_node(unique_key(80_000), Role::Bootstrap, &[]).await;
    let mut nodes: Vec<Node> = Vec::new();
    let p_key = unique_key(80_100);
    let provider = start_node(SigningKey::from_seed(&p_key.seed()), Role::Provider, &boot.listen_addrs).await;
    for i in 1..5 {
        nodes.push(start_node(unique_key(80_100 + i), Role::Provider, &boot.listen_addrs).await);
    }
    nodes.push(start_node(unique_key(80_500), Role::Requestor, &boot.listen_addrs).await);
    let everyone: Vec<&Node> = std::iter::once(&boot).chain(nodes.iter()).collect();
    let mut events: Vec<_> = everyone.iter().map(|n| n.subscribe()).collect();
    let pid = p_key.peer_id();

    // The advert reaches every node as adverts do (republished until it has: gossip is
    // best effort, tests/src/lib.rs).
    let (ad, secret) = chained(&p_key, 1, 6);
    let mut reached = false;
    for _ in 0..6 {
        provider.client.publish(ad.clone()).await.expect("publish");
        if wait_until(TEST_REPUBLISH, || async { all_hold(&everyone, &[pid]) }).await.is_some() {
            reached = true;
            break;
        }
    }
    assert!(reached, "the chained advert did not reach every node: {:?}", missing(&everyone, &[pid]));

    // Tokens 1 and 2, each at its release time: every node takes both, the second after
    // the signed expiry (issued + 20 s), and still shows the advert.
    for k in 1..=2u16 {
        until_release(&ad, k).await;
        provider.client.release_refresh(secret.record(u32::from(k)).expect("token")).await.expect("own token accepted");
        assert!(all_refreshed(&mut events, pid, k).await, "token {k} did not reach every node");
    }
    assert!(now_unix_ms() >= ad.body().expires_at_unix_ms, "token 2 is released at the signed expiry");
    assert!(all_hold(&everyone, &[pid]), "a node dropped the refreshed advert: {:?}", missing(&everyone, &[pid]));

    // No more tokens: the advert leaves every store when its effective expiry passes.
    assert!(all_expired(&mut events, pid).await, "the advert did not lapse everywhere once its tokens stopped");
    assert!(none_hold(&everyone, &[pid]));
    let lapsed_at = now_unix_ms();
    let effective = ad.body().expires_at_unix_ms + 2 * u64::from(PERIOD_S) * 1000;
    assert!(lapsed_at >= effective, "the advert lapsed before its effective expiry");

    provider.stop().await;
    for n in nodes {
        n.stop().await;
    }
    boot.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_after_the_signed_expiry_gets_the_advert_with_its_token_by_sync() {
    let boot = start_node(unique_key(81_000), Role::Bootstrap, &[]).await;
    let p_key = unique_key(81_100);
    let provider = start_node(SigningKey::from_seed(&p_key.seed()), Role::Provider, &boot.listen_addrs).await;
    let pid = p_key.peer_id();
    let mut boot_events = boot.subscribe();
    let (ad, secret) = chained(&p_key, 1, 6);
    provider.client.publish(ad.clone()).await.expect("publish");
    assert!(wait_until(HANG_GUARD, || async { holds(&boot, &pid) }).await.is_some(), "boot never got the advert");
    for k in 1..=2u16 {
        until_release(&ad, k).await;
        provider.client.release_refresh(secret.record(u32::from(k)).expect("token")).await.expect("own token accepted");
        assert!(all_refreshed(std::slice::from_mut(&mut boot_events), pid, k).await, "boot missed token {k}");
    }
    assert!(now_unix_ms() >= ad.body().expires_at_unix_ms);

    // Its signed expiry has passed: only the token the sync page carries lets it in.
    let late = start_node(unique_key(81_500), Role::Requestor, &boot.listen_addrs).await;
    let synced = wait_until(HANG_GUARD, || async { holds(&late, &pid) }).await;
    assert!(synced.is_some(), "the late node did not take the refreshed advert from its sync");

    late.stop().await;
    provider.stop().await;
    boot.stop().await;
}

/// Gossip is best effort (docs/architecture.md, "Gossip"): a node that missed an advert
/// ignores its tokens as unknown, and fetches the advert by their id from the peer that
/// sent them (docs/protocol.md section 9, "Fetch by id") instead of waiting for the
/// provider's next signed advert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_missed_an_advert_fetches_it_by_the_id_of_its_tokens() {
    let relay = start_node(unique_key(83_000), Role::Bootstrap, &[]).await;
    let p_key = unique_key(83_100);
    let pid = p_key.peer_id();
    let (ad, secret) = chained(&p_key, 1, 6);
    // The relay holds the advert; the other node joins without a sync and the advert is
    // never gossiped again: it misses it, as a node misses a gossip.
    relay.store.lock().unwrap().insert(ad.clone(), now_unix_ms()).expect("a valid advert");
    let mut config = NodeConfig::new(unique_key(83_200), Role::Provider);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = relay.listen_addrs.clone();
    config.sync_on_connect = false;
    let missed = Node::start(config).await.expect("starts");
    let mut events = missed.subscribe();
    assert!(
        wait_until(HANG_GUARD, || async { !missed.client.connected_peers().await.unwrap_or_default().is_empty() })
            .await
            .is_some(),
        "never connected"
    );
    assert!(!holds(&missed, &pid));

    // The relay's tokens (one per period; the first three are within the 30 s skew at
    // once) reach the node once it is subscribed to the advert topic; the first that does
    // makes it fetch the advert. Each token waits for the node's store event or the next
    // token's release time, whichever comes first.
    let mut stored = false;
    for k in 1..=6u16 {
        relay.client.release_refresh(secret.record(u32::from(k)).expect("token")).await.expect("token accepted");
        let next_release = until_release(&ad, k.saturating_sub(1));
        stored = tokio::select! {
            got = async {
                loop {
                    match events.recv().await {
                        Ok(NodeEvent::AdvertStored { provider, .. }) if provider == pid => return true,
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => return false,
                    }
                }
            } => got,
            _ = next_release => false,
        };
        if stored {
            break;
        }
    }
    assert!(stored, "the node never fetched the advert its tokens name");
    assert!(holds(&missed, &pid));
    let expiry = missed.store.lock().unwrap().expires_at(&pid).expect("held");
    assert!(expiry > ad.body().expires_at_unix_ms, "it holds the advert with a token, not only its signed expiry");

    missed.stop().await;
    relay.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_refresh_token_is_refused_never_relayed_and_bans_its_sender() {
    let a = start_node(unique_key(82_000), Role::Bootstrap, &[]).await;
    let b = start_node(unique_key(82_001), Role::Requestor, &a.listen_addrs).await;
    let p_key = unique_key(82_100);
    let p = start_node(SigningKey::from_seed(&p_key.seed()), Role::Provider, &a.listen_addrs).await;
    let pid = p_key.peer_id();
    let (ad, secret) = chained(&p_key, 1, 6);
    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    let mut reached = false;
    for _ in 0..6 {
        p.client.publish(ad.clone()).await.expect("publish");
        if wait_until(TEST_REPUBLISH, || async { holds(&a, &pid) && holds(&b, &pid) }).await.is_some() {
            reached = true;
            break;
        }
    }
    assert!(reached, "the chained advert did not reach a and b");

    let mut mallory = RawRefreshPeer::connect(with_peer_id(&a.listen_addrs[0], a.peer_id)).await;
    // The positive control: a genuine token 1, sent by mallory, is taken by a and passed
    // on to b (mallory's requests are read, and a relays what it accepts).
    until_release(&ad, 1).await;
    let genuine = secret.record(1).expect("token 1");
    assert_eq!(
        mallory.send(genuine.to_bytes().to_vec()).await,
        Some(peervm_node::network::refresh_wire::RefreshResponse::Ok)
    );
    assert!(all_refreshed(std::slice::from_mut(&mut a_events), pid, 1).await, "a did not take the genuine token");
    assert!(all_refreshed(std::slice::from_mut(&mut b_events), pid, 1).await, "a did not relay the genuine token");

    // Forged token 2 (its release time is within the skew, so only its hash refuses it),
    // three times: three invalid messages ban mallory.
    for i in 0..3u8 {
        let forged = RefreshRecord { id: genuine.id, k: 2, token: [i; 16] };
        let _ = mallory.send(forged.to_bytes().to_vec()).await;
    }
    assert!(mallory.disconnected(HANG_GUARD).await, "mallory was not banned and disconnected");
    let forged =
        a.metrics.refresh_records.get_or_create(&peervm_node::metrics::OutcomeLabel { outcome: "forged".into() }).get();
    assert_eq!(forged, 3, "a did not count the three forged tokens");

    // The genuine token 2, from the provider: once b has it, a has relayed what it was
    // going to; a and b hold token 2, the genuine one, and b never saw a forged token.
    until_release(&ad, 2).await;
    p.client.release_refresh(secret.record(2).expect("token 2")).await.expect("own token accepted");
    assert!(all_refreshed(std::slice::from_mut(&mut b_events), pid, 2).await, "b never got the genuine token 2");
    let b_forged =
        b.metrics.refresh_records.get_or_create(&peervm_node::metrics::OutcomeLabel { outcome: "forged".into() }).get();
    assert_eq!(b_forged, 0, "a relayed a forged token to b");

    p.stop().await;
    b.stop().await;
    a.stop().await;
}
