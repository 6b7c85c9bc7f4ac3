//! Invariant 11 end to end: one peer floods a real provider with lease requests, sync
//! requests and gossip at ten times its limits; the flooder is throttled, then banned,
//! another requestor's lease still completes, and the provider's memory stays bounded.

mod common;

use std::time::{Duration, Instant};

use common::*;
use libp2p::{Multiaddr, PeerId};
use peervm_node::network::lease_wire::{Envelope, LeaseMessage};
use peervm_node::network::{Node, NodeConfig, Role, now_unix_ms};
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

fn scrape(port: u16) -> String {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_at_ten_times_the_limits_is_throttled_then_banned_and_another_lease_completes() {
    if !provider_env_ready("flood_at_ten_times_the_limits_is_throttled_then_banned_and_another_lease_completes") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let site = Site { prefix: "pvfl", iface: "fl", net: "10.215.14", port_min: 47380, vcpus: 1, memory: "1GiB" };
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

    // 8.5 s of gossip at 4,000/s, signed before the flood starts.
    let adverts = {
        let key = SigningKey::from_seed(&key.seed());
        tokio::task::spawn_blocking(move || {
            let now = now_unix_ms();
            (1..=34_000u64)
                .filter_map(|i| Signed::sign(&key, &peervm_protocol::samples::advert(&key, now + i, now)).ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };

    // The honest requestor starts its lease as the flood begins.
    let honest = {
        let root = root.clone();
        let boot = boot.clone();
        tokio::task::spawn_blocking(move || {
            wait_for(Duration::from_secs(20), || free_vcpus(&boot, &provider_id.to_string())).expect("offer visible");
            let req = root.join("honest");
            let lease = lease_create(&req, &boot, &SMALL_LEASE);
            let id = lease["lease"].as_str().unwrap().to_string();
            let out = peervm(&req, &["exec", &id, "--", "echo", "served"]);
            assert!(stdout(&out).contains("served"), "honest exec: {}", stderr(&out));
            assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
        })
    };

    // Lease requests at 20/s (limit 2/s): well-formed and signed, for an image the
    // provider does not have, so none would start a guest even if admitted.
    let lease_flood = {
        let client = flooder.client.clone();
        let key = SigningKey::from_seed(&key.seed());
        let addrs = addrs.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while start.elapsed() < Duration::from_secs(10) {
                tick.tick().await;
                let mut request = peervm_protocol::samples::lease_request(
                    &key,
                    &peervm_protocol::samples::provider_key(),
                    now_unix_ms(),
                );
                request.provider = provider_id;
                request.lease_id = peervm_protocol::LeaseId(rand::random());
                request.nonce = rand::random();
                request.spec.image_name = "flood".into();
                let bytes = Signed::sign(&key, &request).unwrap().to_bytes();
                let call = client.lease_call(provider_id, addrs.clone(), LeaseMessage::Request(Envelope(bytes)));
                match tokio::time::timeout(Duration::from_secs(2), call).await {
                    Ok(Ok(reply)) => match Signed::<LeaseReply>::open(&reply).map(|r| r.body().outcome.clone()) {
                        Ok(ReplyOutcome::Denied { reason, .. }) => outcomes.push(Some(reason)),
                        other => panic!("flood request got {other:?}"),
                    },
                    _ => outcomes.push(None), // no answer: dropped or disconnected
                }
            }
            outcomes
        })
    };
    // Sync at 40/s (limit 4/s) from the start too.
    let sync_flood = {
        let client = flooder.client.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(25));
            while start.elapsed() < Duration::from_secs(10) {
                tick.tick().await;
                let _ = tokio::time::timeout(Duration::from_millis(200), client.sync_from(provider_id)).await;
            }
        })
    };
    // Gossip at 4,000/s (limit 400/s, burst 2,000) from 1.5 s on, once the lease and sync
    // floods are being throttled (the gossip flood alone bans within a second). The
    // adverts are signed beforehand, so the flooder's own CPU does not set the rate.
    let gossip_flood = {
        let client = flooder.client.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let mut sent = 0usize;
            for batch in adverts.chunks(40) {
                if start.elapsed() > Duration::from_secs(10) {
                    break;
                }
                tick.tick().await;
                for signed in batch {
                    let _ = client.publish(signed.clone()).await;
                    sent += 1;
                }
            }
            sent
        })
    };

    let outcomes = lease_flood.await.unwrap();
    sync_flood.await.unwrap();
    let gossip_sent = gossip_flood.await.unwrap();
    assert!(gossip_sent > 2000, "the gossip flood itself did not get going ({gossip_sent} adverts)");
    honest.await.expect("the honest requestor's lease completed during the flood");

    let throttled = outcomes.iter().filter(|o| **o == Some(DenyReason::RateLimited)).count();
    let answered = outcomes.iter().filter(|o| o.is_some()).count();
    let unanswered = outcomes.len() - answered;
    assert!(throttled > 0, "the flooder was never throttled: {outcomes:?}");
    assert!(unanswered > 0, "the flooder was never cut off: {outcomes:?}");
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
        let needle = format!("peervm_rate_limited_total{{api=\"{api}\"}}");
        let count: f64 = metrics
            .lines()
            .find(|l| l.starts_with(&needle))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        assert!(count > 0.0, "the {api} flood was never throttled:\n{metrics}");
    }
    let rss_after = rss_kib(provider.pid());
    assert!(
        rss_after < rss_before + 64 * 1024,
        "provider memory grew from {rss_before} KiB to {rss_after} KiB during the flood"
    );
    let left = site.wait_clean(&root, Duration::from_secs(30));
    assert!(left.is_empty(), "left behind: {left:?}");
    flooder.stop().await;
}
