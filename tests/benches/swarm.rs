//! Swarm benchmarks: store query latency and memory at 100,000 adverts (received as a
//! sync delivers them; `store_bytes` says where the bytes go), join-time sync
//! of 1,000 and 10,000 adverts and a light client's filtered sync against as many, and gossip propagation to every node of 16/64/128-node
//! swarms over loopback TCP, timed by the nodes' own `AdvertStored` events, and the TCP
//! bytes on the wire (after Noise and Yamux) a node receives and sends per advert
//! published, idle, and per advert of a join sync. Run: `cargo bench -p peervm-tests --bench swarm`.
//! Prints one JSON object per figure (name, value, unit) on stdout. Settings:
//! - `PEERVM_BENCH_ONLY=store,sync,propagation,bandwidth,refresh`: the groups to run
//!   (default all);
//! - `PEERVM_BENCH_SIZES=16,64,128`: the propagation swarm sizes;
//! - `PEERVM_BENCH_ROUNDS=20`: adverts published per propagation size;
//! - `PEERVM_BENCH_BANDWIDTH=64,32,10`: the bandwidth group's nodes, providers publishing
//!   and rounds (each provider publishes one advert per round); the `refresh` group uses
//!   the same settings, each provider releasing one refresh token per round.

use std::time::{Duration, Instant};

use libp2p::PeerId;
use peervm_node::advert_store::{AdvertStore, OfferFilter};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::{NodeEvent, Role};
use peervm_protocol::{Accel, Advertisement, verify_batch};
use peervm_tests::*;
use tokio::sync::broadcast::error::RecvError;

/// A swarm is timed once it has settled: past the nodes' connection trimming (connections
/// older than 30 s, checked every 10 s: `network/tuning.rs`), and then once its
/// connections stop changing.
const SETTLE_MIN: Duration = Duration::from_secs(42);
const SETTLE_MAX: Duration = Duration::from_secs(120);
/// How long the bandwidth groups measure a settled swarm's idle traffic.
const IDLE_WINDOW: Duration = Duration::from_secs(20);

fn report(name: &str, value: f64, unit: &str) {
    println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `n` varied, signed, live adverts.
fn adverts(n: u64) -> Vec<peervm_protocol::Verified<peervm_protocol::Advertisement>> {
    (0..n).map(advert_number).collect()
}

fn advert_number(i: u64) -> peervm_protocol::Verified<peervm_protocol::Advertisement> {
    bench_advert(i, now_unix_ms())
}

fn store_benches(rt: &tokio::runtime::Runtime) {
    let n = 100_000;
    let before = rss_kib();
    let now = now_unix_ms();
    // Received as a node receives a sync: pages of 1,000 signed envelopes, batch-verified
    // and inserted by a task on the runtime's workers (`event_loop/sync.rs`), so the
    // figure is what the store holds after the temporaries of receiving are freed, not a
    // second copy.
    let store = rt
        .block_on(rt.spawn(async move {
            let mut store = AdvertStore::new();
            for page in 0..n / 1_000 {
                let envelopes: Vec<Vec<u8>> =
                    (page * 1_000..(page + 1) * 1_000).map(|i| advert_number(i).to_bytes()).collect();
                let refs: Vec<&[u8]> = envelopes.iter().map(Vec::as_slice).collect();
                for advert in verify_batch::<Advertisement>(&refs) {
                    store.insert(advert.unwrap(), now).unwrap();
                }
            }
            store
        }))
        .unwrap();
    let after = rss_kib();
    report("store_memory_100k_adverts", (after.saturating_sub(before)) as f64 / 1024.0, "MiB");
    report("process_rss_100k_adverts", after as f64 / 1024.0, "MiB");

    let filters = [
        OfferFilter::default(),
        OfferFilter { min_vcpus: Some(8), ..Default::default() },
        OfferFilter { min_memory_mib: Some(64 * 1024), max_price_micros: Some(200_000), ..Default::default() },
        OfferFilter { region: Some("eu-west".into()), min_vcpus: Some(4), ..Default::default() },
        OfferFilter { accel: Some(Accel::Kvm), min_disk_gib: Some(100), ..Default::default() },
        OfferFilter { image: Some("minimal".into()), ..Default::default() },
    ];
    let mut times = Vec::new();
    for round in 0..200 {
        for f in &filters {
            let t = Instant::now();
            let r = store.query(f, now, 100);
            times.push(t.elapsed());
            if round == 0 {
                assert!(r.len() <= 100);
            }
        }
    }
    times.sort();
    report("store_query_100k_p50", percentile(&times, 0.5).as_secs_f64() * 1000.0, "ms");
    report("store_query_100k_p99", percentile(&times, 0.99).as_secs_f64() * 1000.0, "ms");
}

/// A bootstrap node (key `tag`) whose store holds `n` live adverts.
async fn server_with(n: u64, tag: u64) -> peervm_node::network::Node {
    let server = start_node(unique_key(tag), Role::Bootstrap, &[]).await;
    let mut store = server.store.lock().unwrap();
    let now = now_unix_ms();
    for a in adverts(n) {
        store.insert(a, now).unwrap();
    }
    drop(store);
    server
}

async fn join_sync(n: u64) {
    let server = server_with(n, 90_000 + n).await;
    let t = Instant::now();
    let joiner = start_node(unique_key(91_000 + n), Role::Requestor, &server.listen_addrs).await;
    let took = wait_until(Duration::from_secs(60), || async { joiner.store.lock().unwrap().len() as u64 == n }).await;
    let took = took.map(|_| t.elapsed()).expect("join sync finished");
    report(&format!("join_sync_{n}_adverts"), took.as_secs_f64() * 1000.0, "ms");
    // Everything the joiner received, handshakes, identify and Kademlia included, over
    // the adverts it synced: the wire cost of one advert in a sync.
    let received = joiner.metrics.wire_received_bytes.get() as f64;
    report(&format!("join_sync_{n}_wire_received_per_advert"), received / n as f64, "B");
    joiner.stop().await;
    server.stop().await;
}

/// A one-shot requestor as a light client (docs/protocol.md section 9, "Filtered sync")
/// against a bootstrap holding `n` adverts: what `peervm offers --vcpus 4 --memory 8192
/// --region eu-west` (20 offers) costs it, in time to the answer and in bytes received,
/// against `join_sync_{n}` (the whole market).
async fn light_query(n: u64) {
    let server = server_with(n, 92_000 + n).await;
    let filter = OfferFilter {
        min_vcpus: Some(4),
        min_memory_mib: Some(8192),
        region: Some("eu-west".into()),
        ..Default::default()
    };
    let market = peervm_node::requestor::offers::Market::Matching { filter: &filter, limit: 20 };
    let t = Instant::now();
    let joiner = peervm_node::requestor::offers::join_as(
        unique_key(93_000 + n),
        &server.listen_addrs,
        Duration::from_secs(60),
        Default::default(),
        market,
    )
    .await
    .expect("the light client joins");
    report(&format!("light_query_{n}_adverts"), t.elapsed().as_secs_f64() * 1000.0, "ms");
    assert_eq!(joiner.store.lock().unwrap().len(), 20, "it holds the 20 offers it asked for");
    report(&format!("light_query_{n}_wire_received"), joiner.metrics.wire_received_bytes.get() as f64, "B");
    joiner.stop().await;
    server.stop().await;
}

/// When the swarm's connections stop changing: the count of connected peers summed over
/// all nodes is the same at two samples a second apart (at least `min` after the start,
/// at most `max`). Joins' DHT walks and their sync are over by then, so what is timed is
/// the swarm a provider publishes into, not its formation.
async fn settle(nodes: &[peervm_node::network::Node], min: Duration, max: Duration) -> Duration {
    let t = Instant::now();
    tokio::time::sleep(min).await;
    let mut last = None;
    while t.elapsed() < max {
        let mut links = 0;
        for nd in nodes {
            links += nd.client.connected_peers().await.map(|p| p.len()).unwrap_or(0);
        }
        if last == Some(links) {
            break;
        }
        last = Some(links);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    t.elapsed()
}

/// How long a node's swarm task takes to answer a command (`connected_peers`), sampled
/// over every node: the event-loop lag a gossip message also waits behind at each hop.
async fn loop_lag(nodes: &[peervm_node::network::Node]) -> Vec<Duration> {
    let mut lags = Vec::with_capacity(nodes.len());
    for nd in nodes {
        let t = Instant::now();
        let _ = nd.client.connected_peers().await;
        lags.push(t.elapsed());
    }
    lags.sort();
    lags
}

/// Two bootstraps and `n - 2` providers joining through them; the providers' keys, in the
/// order of `nodes[2..]`. `salt` keeps swarms of the same size apart.
async fn start_swarm(n: usize, salt: u64) -> (Vec<peervm_node::network::Node>, Vec<peervm_protocol::SigningKey>) {
    let b1 = start_node(unique_key(80_000 + salt + n as u64), Role::Bootstrap, &[]).await;
    let b2 = start_node(unique_key(80_001 + salt + n as u64), Role::Bootstrap, &b1.listen_addrs).await;
    let boot = vec![b1.listen_addrs[0].clone(), b2.listen_addrs[0].clone()];
    let mut keys = Vec::new();
    let mut nodes = vec![b1, b2];
    for i in 2..n {
        let key = unique_key(81_000 + salt + (n * 1000 + i) as u64);
        nodes.push(start_node(peervm_protocol::SigningKey::from_seed(&key.seed()), Role::Provider, &boot).await);
        keys.push(key);
    }
    (nodes, keys)
}

/// Publishes `rounds` adverts, each from another provider, and times each one's arrival
/// at every other node by the `AdvertStored` event's own timestamp (taken when the store
/// took it), not by polling. An advert counts as missed when a node has not stored it
/// within 10 s.
async fn propagation(n: usize, rounds: usize) {
    let (nodes, keys) = start_swarm(n, 0).await;
    let settled = settle(&nodes, SETTLE_MIN, SETTLE_MAX).await;
    report(&format!("propagation_{n}_nodes_settle"), settled.as_secs_f64() * 1000.0, "ms");
    let mut links = 0;
    for nd in &nodes {
        links += nd.client.connected_peers().await.map(|p| p.len()).unwrap_or(0);
    }
    report(&format!("propagation_{n}_nodes_peers_mean"), links as f64 / n as f64, "peers");
    let lag = loop_lag(&nodes).await;
    report(&format!("propagation_{n}_nodes_loop_lag_p50"), percentile(&lag, 0.5).as_secs_f64() * 1000.0, "ms");
    report(&format!("propagation_{n}_nodes_loop_lag_max"), percentile(&lag, 1.0).as_secs_f64() * 1000.0, "ms");

    let mut events: Vec<_> = nodes.iter().map(|nd| nd.subscribe()).collect();
    let mut full = Vec::new();
    let mut first = Vec::new();
    let mut every = Vec::new();
    let mut missed = 0;
    for round in 0..rounds {
        let idx = (round * 7) % keys.len();
        let key = &keys[idx];
        let publisher = idx + 2;
        let seq = 10 + round as u64;
        let provider: PeerId = key.peer_id();
        let t = Instant::now();
        nodes[publisher].client.publish(signed(key, &advert(key, seq, Duration::from_secs(300)))).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut arrivals = Vec::with_capacity(n);
        let mut lost = false;
        for (i, rx) in events.iter_mut().enumerate() {
            if i == publisher {
                continue;
            }
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Ok(NodeEvent::AdvertStored { provider: p, seq: s, at, .. })) if p == provider && s >= seq => {
                        arrivals.push(at.saturating_duration_since(t));
                        break;
                    }
                    Ok(Ok(_)) | Ok(Err(RecvError::Lagged(_))) => {}
                    Ok(Err(RecvError::Closed)) | Err(_) => {
                        lost = true;
                        break;
                    }
                }
            }
        }
        if lost {
            missed += 1;
            continue;
        }
        arrivals.sort();
        first.push(arrivals[0]);
        full.push(*arrivals.last().expect("n >= 3"));
        every.extend(arrivals);
    }
    full.sort();
    first.sort();
    every.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    if !full.is_empty() {
        report(&format!("propagation_{n}_nodes_p50"), ms(percentile(&full, 0.5)), "ms");
        report(&format!("propagation_{n}_nodes_p99"), ms(percentile(&full, 0.99)), "ms");
        report(&format!("propagation_{n}_nodes_max"), ms(percentile(&full, 1.0)), "ms");
        report(&format!("propagation_{n}_nodes_first_hop_p50"), ms(percentile(&first, 0.5)), "ms");
        report(&format!("propagation_{n}_nodes_each_node_p50"), ms(percentile(&every, 0.5)), "ms");
        report(&format!("propagation_{n}_nodes_each_node_p99"), ms(percentile(&every, 0.99)), "ms");
    }
    report(&format!("propagation_{n}_nodes_missed"), missed as f64, "adverts");
    drop(events);
    for nd in nodes {
        nd.stop().await;
    }
}

/// Each node's idle rates (received, sent) in B/s, over `IDLE_WINDOW` of no publishing.
async fn idle_rates(nodes: &[peervm_node::network::Node]) -> (Vec<f64>, Vec<f64>) {
    let before = wire_totals(nodes);
    let t = Instant::now();
    tokio::time::sleep(IDLE_WINDOW).await;
    let secs = t.elapsed().as_secs_f64();
    let after = wire_totals(nodes);
    let rx = before.iter().zip(&after).map(|(b, a)| (a.0 - b.0) as f64 / secs).collect();
    let tx = before.iter().zip(&after).map(|(b, a)| (a.1 - b.1) as f64 / secs).collect();
    (rx, tx)
}

/// Each node's wire totals (received, sent) now.
fn wire_totals(nodes: &[peervm_node::network::Node]) -> Vec<(u64, u64)> {
    nodes.iter().map(|nd| (nd.metrics.wire_received_bytes.get(), nd.metrics.wire_sent_bytes.get())).collect()
}

/// Reports mean, p50 and max over nodes of `per_node` (one value each).
fn report_spread(name: &str, mut per_node: Vec<f64>, unit: &str) {
    per_node.sort_by(f64::total_cmp);
    let mean = per_node.iter().sum::<f64>() / per_node.len() as f64;
    report(&format!("{name}_mean"), mean, unit);
    report(&format!("{name}_p50"), per_node[(per_node.len() - 1) / 2], unit);
    report(&format!("{name}_max"), per_node[per_node.len() - 1], unit);
}

/// Waits until every node (behind `events`, in node order) has seen, for each of the
/// `providers` publishing nodes (nodes 2 to providers + 1) but itself, an event that
/// `matches` names that provider in; at most 20 s per round. Returns the deliveries missed.
async fn await_round(
    events: &mut [tokio::sync::broadcast::Receiver<NodeEvent>],
    providers: usize,
    matches: impl Fn(&NodeEvent) -> Option<PeerId>,
) -> usize {
    let mut missed = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for (i, rx) in events.iter_mut().enumerate() {
        let own = usize::from((2..providers + 2).contains(&i));
        let mut seen = std::collections::HashSet::new();
        while seen.len() < providers - own {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Ok(ev)) => seen.extend(matches(&ev)),
                Ok(Err(RecvError::Lagged(_))) => {}
                Ok(Err(RecvError::Closed)) | Err(_) => {
                    missed += providers - own - seen.len();
                    break;
                }
            }
        }
    }
    missed
}

/// Each node's received and sent bytes between `before` and `after`, less its idle rate
/// over `secs`, per unit of `units` (adverts or tokens delivered).
fn per_unit(
    before: &[(u64, u64)],
    after: &[(u64, u64)],
    (idle_rx, idle_tx): (&[f64], &[f64]),
    secs: f64,
    units: f64,
) -> (Vec<f64>, Vec<f64>) {
    let per = |total: u64, idle: f64| (total as f64 - idle * secs) / units;
    let rx = before.iter().zip(after).enumerate().map(|(i, (b, a))| per(a.0 - b.0, idle_rx[i])).collect();
    let tx = before.iter().zip(after).enumerate().map(|(i, (b, a))| per(a.1 - b.1, idle_tx[i])).collect();
    (rx, tx)
}

/// The bytes on the wire (TCP, after Noise and Yamux: `network/wire_bytes.rs`) each node
/// of a settled `n`-node swarm receives and sends: idle for `IDLE_WINDOW` (heartbeats,
/// pings, Kademlia), then while `providers` providers each publish a new advert (next
/// seq) per round for `rounds` rounds. A round ends when every node has stored every
/// advert of the round (`AdvertStored`), so the figure is per advert delivered
/// everywhere, with gossip's duplicates and IHAVE/IWANT in it; the idle traffic of the
/// publishing window is subtracted per node.
async fn bandwidth(n: usize, providers: usize, rounds: usize) {
    let (nodes, keys) = start_swarm(n, 500).await;
    let providers = providers.min(keys.len());
    settle(&nodes, SETTLE_MIN, SETTLE_MAX).await;
    let advert_bytes = signed(&keys[0], &advert(&keys[0], 1, Duration::from_secs(300))).to_bytes().len();
    report(&format!("bandwidth_{n}_nodes_advert_envelope"), advert_bytes as f64, "B");

    let (idle_rx, idle_tx) = idle_rates(&nodes).await;
    report_spread(&format!("bandwidth_{n}_nodes_idle_received"), idle_rx.clone(), "B/s");
    report_spread(&format!("bandwidth_{n}_nodes_idle_sent"), idle_tx.clone(), "B/s");

    let mut events: Vec<_> = nodes.iter().map(|nd| nd.subscribe()).collect();
    let before = wire_totals(&nodes);
    let t = Instant::now();
    let mut missed = 0usize;
    for round in 0..rounds {
        let seq = 100 + round as u64;
        for (i, key) in keys.iter().take(providers).enumerate() {
            nodes[i + 2].client.publish(signed(key, &advert(key, seq, Duration::from_secs(300)))).await.unwrap();
        }
        // Every node stores every advert of the round but its own.
        missed += await_round(&mut events, providers, |ev| match ev {
            NodeEvent::AdvertStored { provider, seq: s, .. } if *s >= seq => Some(*provider),
            _ => None,
        })
        .await;
    }
    let secs = t.elapsed().as_secs_f64();
    let after = wire_totals(&nodes);
    let published = (providers * rounds) as f64;
    report(&format!("bandwidth_{n}_nodes_publish_window"), secs * 1000.0, "ms");
    report(&format!("bandwidth_{n}_nodes_adverts_published"), published, "adverts");
    report(&format!("bandwidth_{n}_nodes_deliveries_missed"), missed as f64, "adverts");
    let (rx, tx) = per_unit(&before, &after, (&idle_rx, &idle_tx), secs, published);
    report_spread(&format!("bandwidth_{n}_nodes_received_per_advert"), rx, "B");
    report_spread(&format!("bandwidth_{n}_nodes_sent_per_advert"), tx, "B");
    let raw_rx: Vec<f64> = before.iter().zip(&after).map(|(b, a)| (a.0 - b.0) as f64 / published).collect();
    report_spread(&format!("bandwidth_{n}_nodes_received_per_advert_with_idle"), raw_rx, "B");
    drop(events);
    for nd in nodes {
        nd.stop().await;
    }
}

/// The bytes on the wire per refresh token (docs/protocol.md, section 4a) delivered to
/// every node of a settled `n`-node swarm: `providers` providers publish an advert with a
/// chain, issued 250 s ago with a 10 s period (so 25 tokens are already due: the bench
/// need not wait for release times), then release one token each per round; a round ends
/// when every node has taken every token of the round (`AdvertRefreshed`). Also: the
/// records a node receives per token (accepted or not: the duplicates the batching leaves),
/// and the idle traffic subtracted as in `bandwidth`.
async fn refresh(n: usize, providers: usize, rounds: usize) {
    const PERIOD_S: u32 = 10;
    let (nodes, keys) = start_swarm(n, 700).await;
    let providers = providers.min(keys.len());
    let rounds = rounds.min(25);
    settle(&nodes, SETTLE_MIN, SETTLE_MAX).await;

    let mut secrets = Vec::new();
    let mut events: Vec<_> = nodes.iter().map(|nd| nd.subscribe()).collect();
    for (i, key) in keys.iter().take(providers).enumerate() {
        let mut body = advert(key, 1, Duration::from_secs(300));
        body.issued_at_unix_ms -= 250_000;
        body.expires_at_unix_ms -= 250_000;
        let mut seed = [0u8; 16];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let (chain, secret) =
            peervm_protocol::RefreshSecret::generate(&key.peer_id(), 1, PERIOD_S, 30, seed).expect("chain");
        body.refresh = Some(chain);
        nodes[i + 2].client.publish(signed(key, &body)).await.unwrap();
        secrets.push(secret);
    }
    let ids: Vec<PeerId> = keys.iter().take(providers).map(|k| k.peer_id()).collect();
    let all: Vec<&peervm_node::network::Node> = nodes.iter().collect();
    let mut reached = false;
    for _ in 0..20 {
        if all_hold(&all, &ids) {
            reached = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    report(&format!("refresh_{n}_nodes_adverts_everywhere"), f64::from(u8::from(reached)), "bool");

    let (idle_rx, idle_tx) = idle_rates(&nodes).await;

    let records = |nd: &peervm_node::network::Node| -> u64 {
        let family = &nd.metrics.refresh_records;
        ["accepted", "stale"]
            .iter()
            .map(|o| family.get_or_create(&peervm_node::metrics::OutcomeLabel { outcome: (*o).into() }).get())
            .sum()
    };
    let records_before: Vec<u64> = nodes.iter().map(records).collect();
    for rx in events.iter_mut() {
        while rx.try_recv().is_ok() {}
    }
    let before = wire_totals(&nodes);
    let t = Instant::now();
    let mut missed = 0usize;
    for round in 1..=rounds as u16 {
        for (i, secret) in secrets.iter().enumerate() {
            let record = secret.record(u32::from(round)).expect("token within the chain");
            nodes[i + 2].client.release_refresh(record).await.unwrap();
        }
        missed += await_round(&mut events, providers, |ev| match ev {
            NodeEvent::AdvertRefreshed { provider, k, .. } if *k >= round => Some(*provider),
            _ => None,
        })
        .await;
    }
    let secs = t.elapsed().as_secs_f64();
    let after = wire_totals(&nodes);
    let released = (providers * rounds) as f64;
    report(&format!("refresh_{n}_nodes_window"), secs * 1000.0, "ms");
    report(&format!("refresh_{n}_nodes_tokens_released"), released, "tokens");
    report(&format!("refresh_{n}_nodes_deliveries_missed"), missed as f64, "tokens");
    let (rx, tx) = per_unit(&before, &after, (&idle_rx, &idle_tx), secs, released);
    report_spread(&format!("refresh_{n}_nodes_received_per_token"), rx, "B");
    report_spread(&format!("refresh_{n}_nodes_sent_per_token"), tx, "B");
    let copies: Vec<f64> =
        nodes.iter().zip(&records_before).map(|(nd, b)| (records(nd) - b) as f64 / released).collect();
    report_spread(&format!("refresh_{n}_nodes_records_received_per_token"), copies, "records");
    drop(events);
    for nd in nodes {
        nd.stop().await;
    }
}

/// `PEERVM_BENCH_BANDWIDTH=nodes,providers,rounds` for the bandwidth and refresh groups.
fn bandwidth_settings() -> (usize, usize, usize) {
    let v: Vec<usize> = std::env::var("PEERVM_BENCH_BANDWIDTH")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_default();
    match v[..] {
        [n, p, r] if n >= 3 && p >= 1 && r >= 1 => (n, p, r),
        _ => (64, 32, 10),
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let only = std::env::var("PEERVM_BENCH_ONLY").ok();
    let want = |name: &str| only.as_deref().is_none_or(|o| o.split(',').any(|x| x == name));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if want("store") {
        store_benches(&rt);
    }
    if want("sync") {
        rt.block_on(join_sync(1_000));
        rt.block_on(join_sync(10_000));
        rt.block_on(light_query(1_000));
        rt.block_on(light_query(10_000));
    }
    if want("propagation") {
        let sizes: Vec<usize> = match std::env::var("PEERVM_BENCH_SIZES") {
            Ok(v) => v.split(',').filter_map(|s| s.trim().parse().ok()).filter(|n| *n >= 3).collect(),
            Err(_) => vec![16, 64, 128],
        };
        let rounds = std::env::var("PEERVM_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(20).max(1);
        for n in sizes {
            rt.block_on(propagation(n, rounds));
        }
    }
    if want("bandwidth") {
        let (n, providers, rounds) = bandwidth_settings();
        rt.block_on(bandwidth(n, providers, rounds));
    }
    if want("refresh") {
        let (n, providers, rounds) = bandwidth_settings();
        rt.block_on(refresh(n, providers, rounds));
    }
}
