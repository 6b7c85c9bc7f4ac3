//! Invariant 11 end to end: one peer floods a real provider with lease requests, sync
//! requests and gossip past its limits; the flooder is throttled, then banned, another
//! requestor's lease still completes, and the provider's memory stays bounded. The flood
//! is counted, not timed: how fast this machine is does not decide the verdict.

mod common;

use common::*;
use libp2p::{Multiaddr, PeerId};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::lease_wire::{Envelope, LeaseMessage};
use peervm_node::network::{NetworkError, Node, NodeClient, NodeConfig, Role};
use peervm_protocol::{DenyReason, LeaseReply, ReplyOutcome, Signed, SigningKey};

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The lease API's burst (node/src/network/rate_limit.rs).
const LEASE_BURST: usize = 10;
const SYNC_BURST: usize = 32;
const GOSSIP_BURST: usize = 2_000;
/// At most this many adverts of gossip flood, published in chunks of `GOSSIP_CHUNK`.
const GOSSIP_MAX: usize = 40_000;
const GOSSIP_CHUNK: usize = 250;
/// At most this many lease rounds after the first: 100 throttled requests ban, and a
/// round of 30 (20 over the burst at the least) gets there in about 5.
const MAX_ROUNDS: usize = 50;

/// `n` lease requests sent at once, each signed and well-formed for an image the
/// provider does not have (none would start a guest even if admitted). Each outcome is
/// the denial's reason, or `None` when the request went unanswered (the flooder was cut
/// off: the connection closed or the dial refused).
async fn lease_round(
    client: &NodeClient,
    key: &SigningKey,
    provider: PeerId,
    addrs: &[Multiaddr],
    n: usize,
) -> Vec<Option<DenyReason>> {
    let calls = (0..n).map(|_| {
        let mut request =
            peervm_protocol::samples::lease_request(key, &peervm_protocol::samples::provider_key(), now_unix_ms());
        request.provider = provider;
        request.lease_id = peervm_protocol::LeaseId(rand::random());
        request.nonce = rand::random();
        request.spec.image_name = "flood".into();
        let bytes = Signed::sign(key, &request).unwrap().to_bytes();
        client.lease_call(provider, addrs.to_vec(), LeaseMessage::Request(Envelope(bytes)))
    });
    futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|reply| match reply {
            Ok(reply) => match Signed::<LeaseReply>::open(&reply).map(|r| r.body().outcome.clone()) {
                Ok(ReplyOutcome::Denied { reason, .. }) => Some(reason),
                other => panic!("a flood request got {other:?}"),
            },
            Err(_) => None,
        })
        .collect()
}

/// `peervm_rate_limited_total{api="<api>"}` from a metrics page.
fn throttled_count(metrics: &str, api: &str) -> f64 {
    let needle = format!("peervm_rate_limited_total{{api=\"{api}\"}}");
    metrics
        .lines()
        .find(|l| l.starts_with(&needle))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

#[ignore = "needs root: runs a provider that boots a guest"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_past_every_limit_is_throttled_then_banned_and_another_lease_completes() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let site = Site { prefix: "pvfl", iface: "fl", net: "10.215.14", port_min: 27380, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(&root);
    // The provider serves its metrics, to see which limits the flood ran into.
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = site.config(&root, &boot);
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replacen("[node]\n", &format!("[node]\nmetrics = \"127.0.0.1:{metrics_port}\"\n"), 1))
        .unwrap();
    let (provider, line) = spawn_json(&["provider", "run", "--config", config.to_str().unwrap()], &site.data(&root));
    let provider_id: PeerId = line["peer_id"].as_str().unwrap().parse().unwrap();
    let addrs: Vec<Multiaddr> =
        line["listen_addrs"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().parse().unwrap()).collect();
    let rss_before = rss_kib(provider.pid());

    let key = SigningKey::from_seed(&rand::random());
    let flooder_id = key.peer_id();
    let flooder = Node::start(NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Requestor)).await.unwrap();
    flooder.client.dial(addrs[0].clone()).await.unwrap();

    // The honest requestor starts its lease as the flood begins.
    let honest = {
        let root = root.clone();
        let boot = boot.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id.to_string())).expect("offer visible");
            let req = root.join("honest");
            let lease = lease_create(&req, &boot, &SMALL_LEASE);
            let id = lease["lease"].as_str().unwrap().to_string();
            let out = peervm(&req, &["exec", &id, "--", "echo", "served"]);
            assert!(stdout(&out).contains("served"), "honest exec: {}", stderr(&out));
            assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
        })
    };

    // The flood is driven by counts and by what the provider answers, never by the
    // clock: each API is pushed past its burst until the provider shows it throttled,
    // then lease requests go on in rounds until the provider cuts the flooder off. The
    // limits (node/src/network/rate_limit.rs): lease burst 10, sync burst 32, gossip
    // burst 2,000; a throttled message costs 1 / 0.5 / 0.05 points, a ban comes at 100.
    let lease = |round: usize| lease_round(&flooder.client, &key, provider_id, &addrs, round);

    // 1. Lease: a round of 2x the burst at once; the provider answers the excess with a
    //    signed `rate_limited` denial (about 10 points).
    let mut outcomes = lease(LEASE_BURST * 2).await;
    assert!(
        outcomes.contains(&Some(DenyReason::RateLimited)),
        "{} lease requests at once were never throttled: {outcomes:?}",
        LEASE_BURST * 2
    );
    assert!(!outcomes.contains(&None), "the flooder was cut off before it flooded: {outcomes:?}");

    // 2. Sync: back to back until the provider refuses one as rate limited (about 1 point).
    let mut syncs = 0;
    loop {
        syncs += 1;
        match flooder.client.sync_from(provider_id).await {
            Ok(_) => assert!(syncs < 10 * SYNC_BURST, "{syncs} syncs in a row were never throttled"),
            Err(NetworkError::RateLimited { api: "sync", .. }) => break,
            Err(e) => panic!("sync {syncs} failed otherwise: {e}"),
        }
    }

    // 3. Gossip: pre-signed adverts (so the flooder's own CPU does not set the pace) in
    //    chunks, until the provider's metrics show the gossip limit hit. Publishing is
    //    queued, so the check comes after each chunk.
    let adverts = {
        let key = SigningKey::from_seed(&key.seed());
        tokio::task::spawn_blocking(move || {
            let now = now_unix_ms();
            (1..=GOSSIP_MAX as u64)
                .filter_map(|i| Signed::sign(&key, &peervm_protocol::samples::advert(&key, now + i, now)).ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    let mut gossip_sent = 0;
    for chunk in adverts.chunks(GOSSIP_CHUNK) {
        for signed in chunk {
            let _ = flooder.client.publish(signed.clone()).await;
        }
        gossip_sent += chunk.len();
        if gossip_sent > GOSSIP_BURST && throttled_count(&scrape(metrics_port), "gossip") > 0.0 {
            break;
        }
    }
    assert!(
        throttled_count(&scrape(metrics_port), "gossip") > 0.0,
        "{gossip_sent} adverts of gossip were never throttled"
    );

    // 4. Lease rounds until the flooder is cut off (banned, so unanswered), bounded.
    let mut rounds = 0;
    while !outcomes.contains(&None) {
        rounds += 1;
        assert!(rounds <= MAX_ROUNDS, "the flooder was never cut off after {rounds} rounds: {outcomes:?}");
        outcomes.extend(lease(LEASE_BURST * 3).await);
    }
    honest.await.expect("the honest requestor's lease completed during the flood");

    // Throttled first, cut off later: the first answered requests come before the ban.
    let first_none = outcomes.iter().position(|o| o.is_none()).unwrap();
    assert!(outcomes[..first_none].contains(&Some(DenyReason::RateLimited)));

    let audit = std::fs::read_to_string(site.data(&root).join("audit.log")).unwrap();
    assert!(
        audit.lines().any(|l| l.contains("\"event\":\"ban\"") && l.contains(&flooder_id.to_string())),
        "no ban of the flooder in the audit log"
    );
    let metrics = scrape(metrics_port);
    for api in ["lease", "sync", "gossip"] {
        assert!(throttled_count(&metrics, api) > 0.0, "the {api} flood was never throttled:\n{metrics}");
    }
    let rss_after = rss_kib(provider.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "provider memory grew from {rss_before} KiB to {rss_after} KiB during the flood"
    );
    let left = site.wait_clean(&root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    flooder.stop().await;
}
