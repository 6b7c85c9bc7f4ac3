//! A worker process: runs its share of the swarm's nodes on its own tokio runtime and
//! answers the coordinator's commands (`wire`), one at a time. Every node's events are
//! watched from its start, so when a node stored an advert is known from the node's own
//! `AdvertStored` timestamp, whenever the coordinator asks.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use peervm_node::metrics::{Metrics, ReasonLabel};
use peervm_node::network::{Node, NodeConfig, NodeEvent, Role};
use peervm_protocol::SigningKey;
use peervm_tests::{advert, holds, signed, unique_key};
use tokio::sync::broadcast::error::RecvError;

use crate::layout::Layout;
use crate::process_stats::{mono_ns, mono_ns_of};
use crate::wire::{Command, ProviderArrivals, Publication, Reply};

/// Node starts in flight at once, over all workers (each waits ~100 ms for its listener).
const START_CONCURRENCY: usize = 64;
/// A worker gives up on nodes still starting after this.
const START_DEADLINE: Duration = Duration::from_secs(60);
const DEGREE_TIMEOUT: Duration = Duration::from_secs(5);
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs worker `me` of `layout` on a runtime of `threads` workers until its stdin closes.
pub fn run(layout: Layout, me: usize, threads: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build().expect("runtime");
    rt.block_on(serve(layout, me));
    // Tearing down hundreds of nodes one by one measures nothing; the process exit closes
    // every socket at once.
    std::process::exit(0);
}

async fn serve(layout: Layout, me: usize) {
    let (tx, mut commands) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut worker = Worker::new(layout, me);
    while let Some(line) = commands.recv().await {
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(command) => worker.handle(command).await,
            Err(e) => Reply::Error { message: format!("unreadable command {line:?}: {e}") },
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", serde_json::to_string(&reply).expect("replies serialize"));
        let _ = out.flush();
    }
}

/// What one node's event watcher saw.
#[derive(Default)]
struct NodeWatch {
    /// The first time this node stored each provider's advert, on the shared clock.
    stored: Mutex<HashMap<PeerId, u64>>,
    /// The watcher fell behind the node's event channel at least once: its events may miss
    /// a store, which the store itself then answers.
    lagged: AtomicBool,
}

/// Dial failures (by cause) and disconnections of every node of this worker.
#[derive(Default)]
struct Tally {
    dial_failures: Mutex<HashMap<String, u64>>,
    disconnections: AtomicU64,
}

impl Tally {
    /// Counts `error` by its cause: the first "<address>: <cause>" part, with addresses
    /// and peer ids blanked so that equal causes count together.
    fn dial_failed(&self, error: &str) {
        let first = error.split("; ").next().unwrap_or(error);
        let cause = if first.starts_with('/') { first.split_once(": ").map_or(first, |(_, c)| c) } else { first };
        let cause: Vec<&str> = cause
            .split_whitespace()
            .map(|w| if w.starts_with("12D3") || w.starts_with('/') { "<…>" } else { w })
            .collect();
        let cause: String = cause.join(" ").chars().take(160).collect();
        *self.dial_failures.lock().unwrap_or_else(|p| p.into_inner()).entry(cause).or_default() += 1;
    }
}

struct Worker {
    layout: Layout,
    me: usize,
    /// This worker's nodes by local index (global index minus `first`); `None`: not started.
    nodes: Vec<Option<Node>>,
    watches: Vec<Arc<NodeWatch>>,
    keys: Vec<SigningKey>,
    first: usize,
    tally: Arc<Tally>,
    /// Publish answers by provider: Ok(answered at) or the error.
    acks: Arc<Mutex<HashMap<PeerId, Result<u64, String>>>>,
}

impl Worker {
    fn new(layout: Layout, me: usize) -> Worker {
        let range = layout.range(me);
        let tag = |i: usize| (layout.n * 10_000 + i) as u64;
        Worker {
            layout,
            me,
            nodes: range.clone().map(|_| None).collect(),
            watches: range.clone().map(|_| Arc::default()).collect(),
            keys: range.clone().map(|i| unique_key(tag(i))).collect(),
            first: range.start,
            tally: Arc::default(),
            acks: Arc::default(),
        }
    }

    fn progress(&self, what: &str) {
        eprintln!("[n={} w={}] {what}", self.layout.n, self.me);
    }

    async fn handle(&mut self, command: Command) -> Reply {
        match command {
            Command::Boot => self.boot().await,
            Command::Join { boot } => self.join(boot).await,
            Command::Degrees => Reply::Degrees { degrees: self.degrees().await },
            Command::Publish { nodes } => self.publish(&nodes),
            Command::Held { providers } => match parse_peers(&providers) {
                Ok(providers) => Reply::Held { held: providers.iter().map(|p| self.holding(p).count()).collect() },
                Err(message) => Reply::Error { message },
            },
            Command::Arrivals { providers } => match parse_peers(&providers) {
                Ok(providers) => self.arrivals(&providers),
                Err(message) => Reply::Error { message },
            },
            Command::Tally => {
                let map = self.tally.dial_failures.lock().unwrap_or_else(|p| p.into_inner());
                Reply::Tally {
                    dial_failures: map.iter().map(|(k, v)| (k.clone(), *v)).collect(),
                    disconnections: self.tally.disconnections.load(Ordering::Relaxed),
                    upkeep: self.upkeep(),
                }
            }
        }
    }

    /// The upkeep counters of this worker's nodes, summed.
    fn upkeep(&self) -> Vec<(String, u64)> {
        let closed = |m: &Metrics, reason: &str| {
            m.connections_closed.get_or_create(&ReasonLabel { reason: reason.into() }).get()
        };
        let mut sums = [0u64; 8];
        for node in self.nodes.iter().flatten() {
            let m = &node.metrics;
            let counts = [
                m.dht_walks.get(),
                m.kad_bootstraps.get(),
                m.kad_lookups_answered.get(),
                closed(m, "trimmed"),
                closed(m, "dead"),
                m.discovery_dials_refused.get(),
                m.wire_received_bytes.get(),
                m.gossip_dropped_for_slow_peers.get(),
            ];
            for (sum, count) in sums.iter_mut().zip(counts) {
                *sum += count;
            }
        }
        [
            "dht_walks",
            "kad_bootstraps",
            "kad_lookups_answered",
            "closed_trimmed",
            "closed_dead",
            "dials_refused",
            "wire_received_bytes",
            "gossip_dropped_for_slow_peers",
        ]
        .into_iter()
        .map(String::from)
        .zip(sums)
        .collect()
    }

    /// Starts local node `j` listening on a fresh loopback port, its events watched.
    fn start(
        &self,
        j: usize,
        role: Role,
        bootstrap: Vec<Multiaddr>,
    ) -> impl Future<Output = Result<Node, String>> + use<> {
        let mut config = NodeConfig::new(SigningKey::from_seed(&self.keys[j].seed()), role);
        config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
        config.bootstrap = bootstrap;
        let (watch, tally) = (self.watches[j].clone(), self.tally.clone());
        async move {
            let node = Node::start(config).await.map_err(|e| e.to_string())?;
            watch_events(&node, watch, tally);
            Ok(node)
        }
    }

    /// The bootstrap nodes: the first alone, the others dialing it.
    async fn boot(&mut self) -> Reply {
        let mut addrs: Vec<Multiaddr> = Vec::new();
        for i in 0..self.layout.boot_count {
            let dial = if i == 0 {
                Vec::new()
            } else {
                self.nodes[0].as_ref().map(|b| b.listen_addrs.clone()).unwrap_or_default()
            };
            match self.start(i - self.first, Role::Bootstrap, dial).await {
                Ok(node) => {
                    addrs.push(node.listen_addrs[0].clone());
                    self.nodes[i - self.first] = Some(node);
                }
                Err(e) => return Reply::Error { message: format!("bootstrap node {i} did not start: {e}") },
            }
        }
        Reply::Booted { addrs: addrs.iter().map(|a| a.to_string()).collect() }
    }

    /// Starts every node not started yet, each dialing one bootstrap node.
    async fn join(&mut self, boot: Vec<String>) -> Reply {
        let boot: Vec<Multiaddr> = match boot.iter().map(|a| a.parse()).collect::<Result<_, _>>() {
            Ok(b) => b,
            Err(e) => return Reply::Error { message: format!("unreadable bootstrap address: {e}") },
        };
        if boot.is_empty() {
            return Reply::Error { message: "no bootstrap address".into() };
        }
        let concurrency = (START_CONCURRENCY / self.layout.procs).max(8);
        let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut starting = tokio::task::JoinSet::new();
        for j in (0..self.nodes.len()).filter(|j| self.nodes[*j].is_none()) {
            let global = self.first + j;
            let start = self.start(j, Role::Provider, vec![boot[global % boot.len()].clone()]);
            let permits = permits.clone();
            starting.spawn(async move {
                let _permit = permits.acquire_owned().await.expect("semaphore open");
                (j, start.await)
            });
        }
        let mut errors = Vec::new();
        let deadline = tokio::time::Instant::now() + START_DEADLINE;
        loop {
            match tokio::time::timeout_at(deadline, starting.join_next()).await {
                Ok(Some(Ok((j, Ok(node))))) => self.nodes[j] = Some(node),
                Ok(Some(Ok((j, Err(e))))) => errors.push(format!("node {}: {e}", self.first + j)),
                Ok(Some(Err(e))) => errors.push(format!("start task: {e}")),
                Ok(None) => break,
                Err(_) => {
                    errors.push(format!(
                        "{} nodes still starting after {} s",
                        starting.len(),
                        START_DEADLINE.as_secs()
                    ));
                    starting.abort_all();
                    break;
                }
            }
        }
        let started = self.nodes.iter().flatten().count();
        self.progress(&format!("{started} of {} nodes started", self.nodes.len()));
        Reply::Joined { started, errors }
    }

    async fn degrees(&self) -> Vec<Option<usize>> {
        futures::future::join_all(self.nodes.iter().flatten().map(|node| async move {
            tokio::time::timeout(DEGREE_TIMEOUT, node.client.connected_peers())
                .await
                .ok()
                .and_then(|r| r.ok())
                .map(|peers| peers.len())
        }))
        .await
    }

    /// Sends the publish commands and answers at once; the answers of the nodes are
    /// collected as they come (`acks`), and count as the publisher's own store time.
    fn publish(&self, nodes: &[usize]) -> Reply {
        let mut adverts = Vec::new();
        for &i in nodes.iter().filter(|i| self.layout.range(self.me).contains(i)) {
            let j = i - self.first;
            let Some(node) = &self.nodes[j] else { continue };
            let key = &self.keys[j];
            let provider = key.peer_id();
            let a = signed(key, &advert(key, 1, Duration::from_secs(300)));
            let (client, watch, acks) = (node.client.clone(), self.watches[j].clone(), self.acks.clone());
            let sent_ns = mono_ns();
            tokio::spawn(async move {
                let ack = match tokio::time::timeout(PUBLISH_TIMEOUT, client.publish(a)).await {
                    Ok(Ok(())) => {
                        let at = mono_ns();
                        watch.stored.lock().unwrap_or_else(|p| p.into_inner()).entry(provider).or_insert(at);
                        Ok(at)
                    }
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("no answer in {} s", PUBLISH_TIMEOUT.as_secs())),
                };
                acks.lock().unwrap_or_else(|p| p.into_inner()).insert(provider, ack);
            });
            adverts.push(Publication { node: i, provider: provider.to_string(), sent_ns });
        }
        Reply::Published { adverts }
    }

    /// This worker's nodes that hold `provider`'s advert: by their events, or by their
    /// store where a lagging watcher may have missed the event.
    fn holding<'a>(&'a self, provider: &'a PeerId) -> impl Iterator<Item = usize> + 'a {
        (0..self.nodes.len()).filter(move |j| {
            let Some(node) = &self.nodes[*j] else { return false };
            let watch = &self.watches[*j];
            watch.stored.lock().unwrap_or_else(|p| p.into_inner()).contains_key(provider)
                || (watch.lagged.load(Ordering::Relaxed) && holds(node, provider))
        })
    }

    fn arrivals(&self, providers: &[PeerId]) -> Reply {
        let acks = self.acks.lock().unwrap_or_else(|p| p.into_inner());
        let mut per_provider = Vec::new();
        for p in providers {
            let mut arrivals = ProviderArrivals { ack: acks.get(p).cloned(), ..Default::default() };
            for j in self.holding(p) {
                match self.watches[j].stored.lock().unwrap_or_else(|e| e.into_inner()).get(p) {
                    Some(at) => arrivals.at_ns.push(*at),
                    None => arrivals.untimed += 1,
                }
            }
            per_provider.push(arrivals);
        }
        let nodes = self.nodes.iter().flatten().count();
        // The peer count of each node lacking an advert: isolated nodes, or connected ones
        // that gossip missed.
        let lacking_degrees: Vec<usize> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(j, node)| {
                let node = node.as_ref()?;
                let stored = self.watches[j].stored.lock().unwrap_or_else(|e| e.into_inner());
                let lacks = providers.iter().any(|p| !stored.contains_key(p) && !holds(node, p));
                lacks.then(|| usize::try_from(node.metrics.peers_connected.get()).unwrap_or(0))
            })
            .collect();
        Reply::Arrivals { per_provider, nodes, lacking_any: lacking_degrees.len(), lacking_degrees }
    }
}

/// Watches `node`'s events for as long as it runs. A watcher that falls behind the node's
/// event channel skips events: the tally's counts are then lower bounds, and the store
/// answers for the adverts (`NodeWatch::lagged`).
fn watch_events(node: &Node, watch: Arc<NodeWatch>, tally: Arc<Tally>) {
    let mut events = node.subscribe();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(NodeEvent::AdvertStored { provider, at, .. }) => {
                    watch.stored.lock().unwrap_or_else(|p| p.into_inner()).entry(provider).or_insert(mono_ns_of(at));
                }
                Ok(NodeEvent::DialFailed { error, .. }) => tally.dial_failed(&error),
                Ok(NodeEvent::PeerDisconnected(_)) => {
                    tally.disconnections.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(RecvError::Lagged(_)) => watch.lagged.store(true, Ordering::Relaxed),
                Err(RecvError::Closed) => break,
            }
        }
    });
}

fn parse_peers(peers: &[String]) -> Result<Vec<PeerId>, String> {
    peers.iter().map(|p| p.parse().map_err(|e| format!("unreadable peer id {p}: {e}"))).collect()
}
