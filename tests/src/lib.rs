//! Integration-test harness for peervm: in-process swarms of real libp2p nodes over
//! loopback TCP. The scenarios live in `tests/tests/`; this crate holds what they share.

mod bare_swarm;
mod sync_server;

pub use bare_swarm::bare_swarm;
pub use sync_server::{Requests, recording_sync_server};

use std::future::Future;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use peervm_node::clock::now_unix_ms;
use peervm_node::network::{Node, NodeConfig, Role};
use peervm_protocol::{Accel, Advertisement, Signed, SigningKey, Verified, samples};

/// A node listening on a fresh loopback port, dialing `bootstrap`.
pub async fn start_node(key: SigningKey, role: Role, bootstrap: &[Multiaddr]) -> Node {
    let mut config = NodeConfig::new(key, role);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = bootstrap.to_vec();
    Node::start(config).await.expect("node starts")
}

/// A key that no other test uses: tests in one binary run in parallel.
pub fn unique_key(tag: u64) -> SigningKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&tag.to_le_bytes());
    seed[8..16].copy_from_slice(&(std::process::id() as u64).to_le_bytes());
    seed[16..24].copy_from_slice(&now_unix_ms().to_le_bytes());
    SigningKey::from_seed(&seed)
}

/// A valid advert from `key`, issued now, living `ttl`.
pub fn advert(key: &SigningKey, seq: u64, ttl: Duration) -> Advertisement {
    let now = now_unix_ms();
    let mut a = samples::advert(key, seq, now);
    a.expires_at_unix_ms = now + ttl.as_millis() as u64;
    a
}

pub fn signed(key: &SigningKey, advert: &Advertisement) -> Verified<Advertisement> {
    Signed::sign(key, advert).expect("sign")
}

/// The benches' advert number `i`, issued at `now`: its own key, and resources, price,
/// region and accelerator varied with `i` so that a store of many looks like a market.
pub fn bench_advert(i: u64, now: u64) -> Verified<Advertisement> {
    let (key, a) = bench_advert_body(i, now);
    signed(&key, &a)
}

/// [`bench_advert`] with a refresh chain (docs/protocol.md section 4a) of a day of 100 s
/// periods. The anchor is a number made from `i`, not a real chain's end: what a store
/// keeps of a chain does not depend on its values, and making 100,000 real chains of
/// 864 tokens would take minutes.
pub fn bench_advert_refreshed(i: u64, now: u64) -> Verified<Advertisement> {
    let (key, mut a) = bench_advert_body(i, now);
    let mut anchor = [0u8; 16];
    anchor[..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    // A provider's defaults (docs/protocol.md section 4a): a token every 100 s, a new
    // advert and chain every 24 h.
    a.refresh = Some(peervm_protocol::RefreshChain { anchor, period_s: 100, count: 864 });
    signed(&key, &a)
}

fn bench_advert_body(i: u64, now: u64) -> (SigningKey, Advertisement) {
    let regions = ["eu-central", "eu-west", "us-east", "us-west", "ap-south", "sa-east"];
    let key = samples::numbered_key(i + 1_000_000);
    let mut a = samples::advert(&key, 1, now);
    a.resources.total.vcpus = 1 + (i % 64) as u32;
    a.resources.free.vcpus = 1 + (i % 64) as u32;
    a.resources.total.memory_mib = 1024 * (1 + i % 256);
    a.resources.free.memory_mib = 1024 * (1 + i % 256);
    a.resources.free.disk_gib = a.resources.total.disk_gib.min(10 * (1 + i % 20));
    a.pricing.per_vcpu_hour_micros = 5_000 + (i * 7919) % 20_000;
    a.region = regions[(i % regions.len() as u64) as usize].into();
    a.hypervisor.accel = if i.is_multiple_of(3) { Accel::Kvm } else { Accel::Tcg };
    (key, a)
}

/// How long any one wait may take before a test is declared hung. Only a guard: each
/// wait ends on the event it waits for, however fast or slow the machine is
/// (docs/testing.md, "Verdicts from counts and events").
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Polls `cond` every 50 ms until it holds or `timeout` passes; returns how long it took.
pub async fn wait_until<F, Fut>(timeout: Duration, mut cond: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether `node` holds a live advert of `provider`.
pub fn holds(node: &Node, provider: &PeerId) -> bool {
    node.store.lock().map(|s| s.contains(provider)).unwrap_or(false)
}

/// Whether every node in `nodes` holds every provider in `providers`.
pub fn all_hold(nodes: &[&Node], providers: &[PeerId]) -> bool {
    nodes.iter().all(|n| providers.iter().all(|p| holds(n, p)))
}

/// How often `publish_until_everywhere` publishes again: shorter than a provider daemon's
/// default `republish_secs` (60 s) so that a lost forward costs a test seconds.
pub const TEST_REPUBLISH: Duration = Duration::from_secs(5);

/// Publishes every publisher's advert at `seq` and then, as a provider daemon republishes
/// its advert, again at the next seq every `TEST_REPUBLISH`, until every node in `nodes`
/// holds an advert of at least `seq` from every publisher, or `guard` passes. Returns how
/// long that took and how many rounds were published.
///
/// Gossip is best effort, and republishing is what makes delivery certain
/// (docs/architecture.md, "Gossip"): gossipsub drops a forward that waits more than a
/// second for a stalled connection, so a node on an overloaded machine can miss one
/// round. A partitioned swarm misses every round, and the wait fails.
pub async fn publish_until_everywhere(
    publishers: &[(&Node, &SigningKey)],
    nodes: &[&Node],
    seq: u64,
    guard: Duration,
) -> Option<(Duration, u64)> {
    let ids: Vec<PeerId> = publishers.iter().map(|(_, k)| k.peer_id()).collect();
    let fresh = |n: &Node, p: &PeerId| {
        n.store.lock().is_ok_and(|s| s.get(p).is_some_and(|a| a.decode().is_ok_and(|a| a.body().seq >= seq)))
    };
    let publish = |round: u64| async move {
        for (node, key) in publishers {
            let _ = node.client.publish(signed(key, &advert(key, seq + round, Duration::from_secs(300)))).await;
        }
    };
    republish_until(guard, publish, || async { nodes.iter().all(|n| ids.iter().all(|p| fresh(n, p))) }).await
}

/// Calls `publish(round)` for round 0, 1, ..., one round every `TEST_REPUBLISH` (as a
/// provider daemon republishes), until `done` holds or `guard` passes; returns how long
/// that took and how many rounds were published. For what gossip alone may miss on a
/// loaded machine (see `publish_until_everywhere`).
pub async fn republish_until<P, PF, D, DF>(guard: Duration, mut publish: P, mut done: D) -> Option<(Duration, u64)>
where
    P: FnMut(u64) -> PF,
    PF: Future<Output = ()>,
    D: FnMut() -> DF,
    DF: Future<Output = bool>,
{
    let start = Instant::now();
    let mut round = 0;
    while start.elapsed() <= guard {
        publish(round).await;
        round += 1;
        if wait_until(TEST_REPUBLISH, &mut done).await.is_some() {
            return Some((start.elapsed(), round));
        }
    }
    None
}

/// For each node in `nodes` that lacks some provider in `providers`: its index and how
/// many it lacks (what a failed "every node holds every advert" wait reports).
pub fn missing(nodes: &[&Node], providers: &[PeerId]) -> Vec<(usize, usize)> {
    nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (i, providers.iter().filter(|p| !holds(n, p)).count()))
        .filter(|&(_, lacking)| lacking > 0)
        .collect()
}

/// Whether no node in `nodes` holds any provider in `providers`.
pub fn none_hold(nodes: &[&Node], providers: &[PeerId]) -> bool {
    nodes.iter().all(|n| providers.iter().all(|p| !holds(n, p)))
}
