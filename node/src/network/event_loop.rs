//! The task that owns the Swarm: a `select!` over swarm events, commands and timers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance, PublishError};
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::dial_opts::PeerCondition;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, noise, ping, tcp, yamux};
use peervm_protocol::{Advertisement, BlockList, Signed, Verified, verify_batch};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::behaviour::{KAD_PROTOCOL, PeervmBehaviour, PeervmBehaviourEvent};
use super::dialback::{self, DialBackRequest, DialBackResponse};
use super::gossip_params::{advert_topic, blocklist_topic};
use super::lease_wire::LeaseMessage;
use super::rate_limit::{Api, PeerGuard, Verdict};
use super::sync::{self, Envelope, SyncRequest, SyncResponse};
use super::{
    Command, InboundLease, LeaseResponder, NetworkError, Node, NodeClient, NodeConfig, NodeEvent, Role, SharedStore,
    SyncSummary,
};
use crate::advert_store::AdvertStore;
use crate::clock::now_unix_ms;
use crate::metrics::Metrics;

/// A sync session gives up after this many pages (1024 adverts each): far above any real
/// market, low enough that a peer cannot keep a node paging forever.
const MAX_SYNC_PAGES: usize = 512;

pub(super) async fn start(config: NodeConfig) -> Result<Node, NetworkError> {
    let keypair = config.key.to_libp2p_keypair();
    let peer_id = keypair.public().to_peer_id();
    let caps = config.caps.clone();
    let serve_leases = config.lease_inbox.is_some();
    let (trim_high, trim_low) = trim_marks(config.role, config.target_peers, config.caps.max_established);
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(tcp::Config::default().nodelay(true), noise::Config::new, yamux::Config::default)
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_behaviour(|key| PeervmBehaviour::new(key, &caps, config.keepalive, serve_leases))
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(300)))
        .build();

    swarm.behaviour_mut().kad.set_mode(Some(match config.role {
        Role::Bootstrap | Role::Provider => kad::Mode::Server,
        Role::Requestor => kad::Mode::Client,
    }));
    swarm.behaviour_mut().gossipsub.subscribe(&advert_topic()).map_err(|e| NetworkError::Build(e.to_string()))?;
    swarm.behaviour_mut().gossipsub.subscribe(&blocklist_topic()).map_err(|e| NetworkError::Build(e.to_string()))?;

    let listen_addrs = listen(&mut swarm, &config.listen, peer_id).await?;

    let (tx, rx) = mpsc::channel(256);
    let (events, _) = broadcast::channel(4096);
    let store: SharedStore = Arc::new(Mutex::new(AdvertStore::new()));
    let list_blocked: super::ListBlocked = Default::default();
    let mut event_loop = EventLoop {
        swarm,
        commands: rx,
        self_tx: tx.clone(),
        lease_inbox: config.lease_inbox.clone(),
        audit: config.audit.clone(),
        lease_channels: HashMap::new(),
        next_lease_channel: 0,
        lease_calls: HashMap::new(),
        conns: HashMap::new(),
        trusted_lists: config.trusted_block_lists.clone(),
        block_lists: HashMap::new(),
        list_blocked: list_blocked.clone(),
        operator_blocks: HashSet::new(),
        own_list: None,
        maintain_ticks: 0,
        trim_high,
        trim_low,
        trim_grace: config.trim_grace,
        dialback_channels: HashMap::new(),
        dialback_calls: HashMap::new(),
        dialback_served: HashMap::new(),
        store: store.clone(),
        events: events.clone(),
        guard: PeerGuard::new(config.rate_limits.clone()),
        metrics: config.metrics.clone().unwrap_or_default(),
        bootstrap: config.bootstrap.clone(),
        bootstrap_peers: config.bootstrap.iter().filter_map(super::peer_id_of).collect(),
        target_peers: config.target_peers,
        sweep_interval: config.sweep_interval,
        pending_publish: None,
        syncs: HashMap::new(),
        sync_waiters: HashMap::new(),
        pending_dials: HashMap::new(),
        blocked: HashSet::new(),
    };
    for addr in &config.bootstrap {
        event_loop.dial_addr(addr.clone(), None);
    }
    let task = tokio::spawn(event_loop.run());
    Ok(Node { client: NodeClient { tx }, store, list_blocked, peer_id, listen_addrs, events, task })
}

/// When a node trims its connections (see `EventLoop::trim`): above twice its target, down
/// to the target. A bootstrap node is where every joining node connects first: it trims
/// only above half its connection cap, down to a quarter, so joins always find room.
fn trim_marks(role: Role, target_peers: usize, max_established: u32) -> (usize, usize) {
    match role {
        Role::Bootstrap => {
            let cap = max_established as usize;
            ((cap / 2).max(2 * target_peers), (cap / 4).max(target_peers))
        }
        Role::Provider | Role::Requestor => (2 * target_peers, target_peers),
    }
}

/// Starts every listener and waits until each has reported its addresses, so the caller
/// can print full dialable multiaddrs at start.
async fn listen(
    swarm: &mut Swarm<PeervmBehaviour>,
    addrs: &[Multiaddr],
    peer_id: PeerId,
) -> Result<Vec<Multiaddr>, NetworkError> {
    let mut waiting = HashMap::new();
    for addr in addrs {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetworkError::Listen { addr: addr.clone(), reason: e.to_string() })?;
        waiting.insert(id, addr.clone());
    }
    let mut out = Vec::new();
    let deadline = tokio::time::sleep(Duration::from_secs(10));
    tokio::pin!(deadline);
    // After the last listener reports, give wildcard listeners a moment to report every
    // interface address.
    let mut settle: Option<std::pin::Pin<Box<tokio::time::Sleep>>> =
        if waiting.is_empty() { Some(Box::pin(tokio::time::sleep(Duration::ZERO))) } else { None };
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    out.push(super::with_peer_id(&address, peer_id));
                    waiting.remove(&listener_id);
                    if waiting.is_empty() && settle.is_none() {
                        settle = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                    }
                }
                SwarmEvent::ListenerClosed { listener_id, reason, .. } => {
                    if let Some(addr) = waiting.remove(&listener_id) {
                        let reason = match reason { Err(e) => e.to_string(), Ok(()) => "listener closed".into() };
                        return Err(NetworkError::Listen { addr, reason });
                    }
                }
                SwarmEvent::ListenerError { listener_id, error } => {
                    if let Some(addr) = waiting.remove(&listener_id) {
                        return Err(NetworkError::Listen { addr, reason: error.to_string() });
                    }
                }
                _ => {}
            },
            _ = async { settle.as_mut().expect("guarded").await }, if settle.is_some() => break,
            _ = &mut deadline => {
                let addr = waiting.into_values().next().unwrap_or_else(Multiaddr::empty);
                return Err(NetworkError::Listen { addr, reason: "no address reported within 10 s".into() });
            }
        }
    }
    Ok(out)
}

/// Where the answer to an outbound request goes.
type Reply<T> = oneshot::Sender<Result<T, NetworkError>>;

/// One open connection.
struct Conn {
    peer: PeerId,
    addr: Multiaddr,
    opened: Instant,
}

/// The maintenance timer's period. While the node has no peer at all, its bootstrap nodes
/// are re-dialled on every tick; the rest of maintenance runs every `SLOW_EVERY` ticks.
const MAINTAIN_TICK: Duration = Duration::from_secs(2);
const SLOW_EVERY: u64 = 5;
/// With enough peers, a Kademlia walk still runs every this many slow ticks (5 min), to
/// keep the routing table fresh; below the target it runs on every slow tick.
const KAD_REFRESH_EVERY: u64 = 30;

struct SyncSession {
    peer: PeerId,
    pages: usize,
    summary: SyncSummary,
}

struct EventLoop {
    swarm: Swarm<PeervmBehaviour>,
    commands: mpsc::Receiver<Command>,
    /// Given to lease responders, which answer through the command channel.
    self_tx: mpsc::Sender<Command>,
    lease_inbox: Option<mpsc::Sender<InboundLease>>,
    audit: Option<Arc<crate::provider::audit::AuditLog>>,
    /// Open inbound lease streams waiting for the manager's reply, and whose they are.
    lease_channels: HashMap<u64, (PeerId, request_response::ResponseChannel<Envelope>)>,
    next_lease_channel: u64,
    /// Outbound lease messages waiting for their reply.
    lease_calls: HashMap<OutboundRequestId, (PeerId, Reply<Vec<u8>>)>,
    /// Every open connection: whose, where from (dial-back dials only that IP), since when.
    conns: HashMap<ConnectionId, Conn>,
    dialback_channels: HashMap<u64, (PeerId, request_response::ResponseChannel<DialBackResponse>)>,
    dialback_calls: HashMap<OutboundRequestId, (PeerId, Reply<DialBackResponse>)>,
    /// When each peer was last served a dial-back.
    dialback_served: HashMap<PeerId, Instant>,
    /// Signers whose block lists this node applies.
    trusted_lists: HashSet<PeerId>,
    /// The newest valid block list of each signer (relayed, served by sync).
    block_lists: HashMap<PeerId, Verified<BlockList>>,
    /// The union of the trusted lists' entries.
    list_blocked: super::ListBlocked,
    /// Providers the operator blocked itself (a list dropping one does not unblock it).
    operator_blocks: HashSet<PeerId>,
    /// This node's own published list, re-gossiped now and then.
    own_list: Option<Vec<u8>>,
    maintain_ticks: u64,
    /// Above `trim_high` connected peers, idle ones are closed down to `trim_low`.
    trim_high: usize,
    trim_low: usize,
    trim_grace: Duration,
    store: SharedStore,
    events: broadcast::Sender<NodeEvent>,
    guard: PeerGuard,
    metrics: Arc<Metrics>,
    bootstrap: Vec<Multiaddr>,
    bootstrap_peers: HashSet<PeerId>,
    target_peers: usize,
    sweep_interval: Duration,
    /// The node's own advert, waiting for a subscriber.
    pending_publish: Option<Vec<u8>>,
    syncs: HashMap<OutboundRequestId, SyncSession>,
    sync_waiters: HashMap<PeerId, Vec<oneshot::Sender<Result<SyncSummary, NetworkError>>>>,
    pending_dials: HashMap<ConnectionId, oneshot::Sender<Result<(), NetworkError>>>,
    /// Peers blocked by the operator (as opposed to banned for a while).
    blocked: HashSet<PeerId>,
}

impl EventLoop {
    async fn run(mut self) {
        let mut sweep = tokio::time::interval(self.sweep_interval);
        // The bootstrap nodes were just dialed: the first re-dial check comes later.
        let mut maintenance = tokio::time::interval_at(tokio::time::Instant::now() + MAINTAIN_TICK, MAINTAIN_TICK);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        // Give queued gossip (a withdrawal, typically) a moment to go out.
                        let flush = tokio::time::sleep(Duration::from_millis(300));
                        tokio::pin!(flush);
                        loop {
                            tokio::select! {
                                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                                _ = &mut flush => break,
                            }
                        }
                        let _ = reply.send(());
                        return;
                    }
                    Some(command) => self.on_command(command),
                    None => return,
                },
                _ = sweep.tick() => self.sweep(),
                _ = maintenance.tick() => self.maintain(),
            }
        }
    }

    fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    fn store(&self) -> std::sync::MutexGuard<'_, AdvertStore> {
        // A panic while holding the lock would be a bug elsewhere; the data stays usable.
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn sweep(&mut self) {
        let now = now_unix_ms();
        let (removed, size) = {
            let mut store = self.store();
            let removed = store.sweep(now);
            (removed, store.len())
        };
        self.metrics.advert_store_size.set(size as i64);
        if !removed.is_empty() {
            self.emit(NodeEvent::AdvertsExpired(removed));
        }
    }

    /// Re-dials lost bootstrap nodes (every tick while the node has no peer, so a healed
    /// partition is noticed within seconds), and every `SLOW_EVERY` ticks: walks the DHT,
    /// re-gossips the own block list, forgets finished streams, lifts bans that ran out
    /// and trims idle connections.
    fn maintain(&mut self) {
        self.maintain_ticks += 1;
        let slow = self.maintain_ticks.is_multiple_of(SLOW_EVERY);
        let connected: HashSet<PeerId> = self.swarm.connected_peers().copied().collect();
        if slow || connected.is_empty() {
            for addr in self.bootstrap.clone() {
                match super::peer_id_of(&addr) {
                    Some(peer) if !connected.contains(&peer) => {
                        // Not while a dial to it is under way (a black-holed address keeps
                        // a dial pending for a while).
                        let opts = DialOpts::peer_id(peer)
                            .condition(PeerCondition::DisconnectedAndNotDialing)
                            .addresses(vec![addr])
                            .build();
                        let _ = self.swarm.dial(opts);
                    }
                    Some(_) => {}
                    // Without a /p2p part the peer is unknown until it answers: slow ticks only.
                    None if slow => self.dial_addr(addr, None),
                    None => {}
                }
            }
        }
        if !slow {
            return;
        }
        let slow_ticks = self.maintain_ticks / SLOW_EVERY;
        if !connected.is_empty()
            && (connected.len() < self.target_peers || slow_ticks.is_multiple_of(KAD_REFRESH_EVERY))
        {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
        if slow_ticks.is_multiple_of(30)
            && let Some(bytes) = self.own_list.clone()
        {
            let _ = self.swarm.behaviour_mut().gossipsub.publish(blocklist_topic(), bytes);
        }
        // Streams whose requestor gave up (or whose reply was never sent).
        self.lease_channels.retain(|_, (_, channel)| channel.is_open());
        self.dialback_channels.retain(|_, (_, channel)| channel.is_open());
        self.dialback_served.retain(|_, at| at.elapsed() < dialback::MIN_INTERVAL);
        for peer in self.guard.expired_bans(Instant::now()) {
            if !self.blocked.contains(&peer) {
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
        self.trim();
    }

    /// Keeps the node near its target number of peers. Kademlia lookups connect to every
    /// peer they query, and gossipsub holds a stream open on every connection, so nothing
    /// would ever close those connections: without trimming, a node ends up connected to
    /// most of the swarm (BENCHMARKS.md, large swarm). Above `trim_high` peers, the node
    /// closes connections to peers that are not a bootstrap node, not in its advert
    /// topic's gossipsub mesh, carry no sync, lease or dial-back request either way, and connected more
    /// than `trim_grace` ago, the newest first, until it is down to `trim_low`.
    fn trim(&mut self) {
        let connected = self.swarm.connected_peers().count();
        if connected <= self.trim_high {
            return;
        }
        let mut keep: HashSet<PeerId> = self.bootstrap_peers.clone();
        // The advert topic's mesh carries the market; the block-list topic's is left to
        // re-form among the peers that stay.
        keep.extend(self.swarm.behaviour().gossipsub.mesh_peers(&advert_topic().hash()).copied());
        keep.extend(self.syncs.values().map(|s| s.peer));
        keep.extend(self.lease_channels.values().map(|(p, _)| *p));
        keep.extend(self.lease_calls.values().map(|(p, _)| *p));
        keep.extend(self.dialback_channels.values().map(|(p, _)| *p));
        keep.extend(self.dialback_calls.values().map(|(p, _)| *p));
        // Each peer's newest connection: a peer is idle only if all of its are old.
        let mut newest: HashMap<PeerId, Instant> = HashMap::new();
        for conn in self.conns.values() {
            let at = newest.entry(conn.peer).or_insert(conn.opened);
            *at = (*at).max(conn.opened);
        }
        let now = Instant::now();
        let mut idle: Vec<(Instant, PeerId)> = newest
            .into_iter()
            .filter(|(peer, opened)| !keep.contains(peer) && now.duration_since(*opened) >= self.trim_grace)
            .map(|(peer, opened)| (opened, peer))
            .collect();
        idle.sort_unstable_by(|a, b| b.cmp(a));
        for (_, peer) in idle.into_iter().take(connected - self.trim_low) {
            tracing::debug!(%peer, connected, "closing an idle connection beyond the target");
            self.metrics.connections_closed("trimmed");
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn dial_addr(&mut self, addr: Multiaddr, reply: Option<oneshot::Sender<Result<(), NetworkError>>>) {
        let opts = match super::peer_id_of(&addr) {
            Some(p) => DialOpts::peer_id(p).addresses(vec![addr.clone()]).build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.pending_dials.insert(id, reply);
                }
            }
            Err(e) => {
                let error = NetworkError::Dial { addr, reason: e.to_string() };
                self.emit(NodeEvent::DialFailed { peer: None, error: error.to_string() });
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Publish { advert, reply } => {
                let _ = reply.send(self.publish(*advert));
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.swarm.connected_peers().copied().collect());
            }
            Command::Dial { addr, reply } => self.dial_addr(addr, Some(reply)),
            Command::Sync { peer, reply } => {
                if !self.swarm.is_connected(&peer) {
                    let reason = format!("not connected to {peer}");
                    let _ = reply.send(Err(NetworkError::Sync { peer, reason }));
                    return;
                }
                self.sync_waiters.entry(peer).or_default().push(reply);
                self.start_sync(peer);
            }
            Command::LeaseSend { peer, addrs, message, reply } => {
                let id = self.swarm.behaviour_mut().lease.send_request_with_addresses(&peer, message, addrs);
                self.lease_calls.insert(id, (peer, reply));
            }
            Command::LeaseRespond { id, reply } => {
                if let Some((_, channel)) = self.lease_channels.remove(&id) {
                    let _ = self.swarm.behaviour_mut().lease.send_response(channel, Envelope(reply));
                }
            }
            Command::DialBack { peer, request, reply } => {
                let id = self.swarm.behaviour_mut().dialback.send_request(&peer, request);
                self.dialback_calls.insert(id, (peer, reply));
            }
            Command::DialBackRespond { id, response } => {
                if let Some((_, channel)) = self.dialback_channels.remove(&id) {
                    let _ = self.swarm.behaviour_mut().dialback.send_response(channel, response);
                }
            }
            Command::ReportInvalid { peer } => self.invalid(peer, "lease"),
            Command::BlockAdverts { peer, blocked } => {
                if blocked {
                    self.operator_blocks.insert(peer);
                    self.store().block(peer);
                } else {
                    self.operator_blocks.remove(&peer);
                    if !self.is_list_blocked(&peer) {
                        self.store().unblock(&peer);
                    }
                }
            }
            Command::PublishBlockList { list, reply } => {
                let bytes = list.to_bytes();
                self.accept_block_list(*list);
                self.own_list = Some(bytes.clone());
                let result = match self.swarm.behaviour_mut().gossipsub.publish(blocklist_topic(), bytes) {
                    Ok(_) | Err(PublishError::Duplicate) | Err(PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(e) => Err(NetworkError::Publish(e.to_string())),
                };
                let _ = reply.send(result);
            }
            Command::BlockPeer { peer } => {
                self.operator_blocks.insert(peer);
                self.blocked.insert(peer);
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
                self.store().block(peer);
            }
            Command::UnblockPeer { peer } => {
                self.operator_blocks.remove(&peer);
                self.blocked.remove(&peer);
                self.swarm.behaviour_mut().blocked.unblock_peer(peer);
                self.swarm.behaviour_mut().gossipsub.remove_blacklisted_peer(&peer);
                self.store().unblock(&peer);
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn publish(&mut self, advert: Verified<Advertisement>) -> Result<(), NetworkError> {
        let bytes = advert.to_bytes();
        let now = now_unix_ms();
        self.store().insert(advert, now).map_err(|e| NetworkError::Publish(e.to_string()))?;
        match self.swarm.behaviour_mut().gossipsub.publish(advert_topic(), bytes.clone()) {
            Ok(_) => {
                self.pending_publish = None;
                Ok(())
            }
            Err(PublishError::NoPeersSubscribedToTopic) | Err(PublishError::AllQueuesFull(_)) => {
                // Sent when a peer subscribes; peers that connect meanwhile get it by sync.
                self.pending_publish = Some(bytes);
                Ok(())
            }
            Err(PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetworkError::Publish(e.to_string())),
        }
    }

    fn start_sync(&mut self, peer: PeerId) {
        if self.syncs.values().any(|s| s.peer == peer) {
            return; // one session per peer at a time; waiters get its result
        }
        let request = SyncRequest { version: 1, after: None, max_items: sync::MAX_PAGE_ITEMS };
        let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.syncs.insert(id, SyncSession { peer, pages: 0, summary: SyncSummary::default() });
    }

    fn finish_sync(&mut self, session: SyncSession, result: Result<(), NetworkError>) {
        let SyncSession { peer, summary, .. } = session;
        if result.is_ok() {
            self.emit(NodeEvent::SyncDone { peer, accepted: summary.accepted, invalid: summary.invalid });
        }
        for waiter in self.sync_waiters.remove(&peer).unwrap_or_default() {
            let _ = waiter.send(result.clone().map(|()| summary));
        }
    }

    fn audit(&self, event: &str, fields: serde_json::Value) {
        if let Some(a) = &self.audit {
            a.record(event, fields);
        }
    }

    /// Counts an invalid signature or malformed message from `peer` on `api`.
    fn invalid(&mut self, peer: PeerId, api: &str) {
        self.audit("signature_failure", serde_json::json!({"peer": peer.to_string(), "api": api}));
        let verdict = self.guard.invalid(peer, Instant::now());
        self.ban_if(peer, verdict);
    }

    fn ban_if(&mut self, peer: PeerId, verdict: Verdict) {
        if verdict == Verdict::Ban {
            tracing::warn!(%peer, "banning peer for repeated invalid or excessive messages");
            self.audit("ban", serde_json::json!({"peer": peer.to_string()}));
            self.metrics.peers_banned.inc();
            self.swarm.behaviour_mut().blocked.block_peer(peer);
            self.emit(NodeEvent::PeerBanned(peer));
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<PeervmBehaviourEvent>) {
        match event {
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Gossipsub(e)) => self.on_gossip(e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Sync(e)) => self.on_sync(e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Lease(e)) => self.on_lease(e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Dialback(e)) => self.on_dialback(e),
            // (A peer that does not speak ping, `Failure::Unsupported`, keeps its connection.)
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error @ (ping::Failure::Timeout | ping::Failure::Other { .. })),
            })) => {
                // A connection that stops answering pings is dead (a cut link, a peer
                // that vanished without a FIN): close it, so the peer counts as gone
                // and bootstrap re-dials and Kademlia replace it.
                tracing::debug!(%peer, %error, "ping failed; closing the connection");
                self.metrics.connections_closed("dead");
                self.swarm.close_connection(connection);
            }
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) if info.protocols.contains(&KAD_PROTOCOL) => {
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            })) => {
                // Grow the neighbourhood beyond the bootstrap nodes.
                let connected = self.swarm.connected_peers().count();
                if connected < self.target_peers && !self.swarm.is_connected(&peer) && !self.guard.is_banned(&peer) {
                    let opts = DialOpts::peer_id(peer).addresses(addresses.into_vec()).build();
                    let _ = self.swarm.dial(opts);
                }
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                let conn = Conn { peer: peer_id, addr: endpoint.get_remote_address().clone(), opened: Instant::now() };
                self.conns.insert(connection_id, conn);
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Ok(()));
                }
                if num_established.get() == 1 {
                    if endpoint.is_dialer() {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, endpoint.get_remote_address().clone());
                    }
                    self.metrics.peers_connected.set(self.swarm.connected_peers().count() as i64);
                    self.emit(NodeEvent::PeerConnected(peer_id));
                    // Pull the peer's market snapshot: a new node sees the market in seconds.
                    self.start_sync(peer_id);
                    if self.bootstrap_peers.is_empty() && endpoint.is_dialer() {
                        // Bootstrap given without /p2p: learn its id now.
                        let addr = endpoint.get_remote_address();
                        if self.bootstrap.iter().any(|b| b == addr) {
                            self.bootstrap_peers.insert(peer_id);
                        }
                    }
                }
            }
            SwarmEvent::ConnectionClosed { connection_id, num_established, .. } if num_established > 0 => {
                self.conns.remove(&connection_id);
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established: 0, .. } => {
                self.conns.remove(&connection_id);
                self.dialback_served.retain(|_, at| at.elapsed() < dialback::MIN_INTERVAL);
                self.guard.forget(&peer_id);
                self.metrics.peers_connected.set(self.swarm.connected_peers().count() as i64);
                self.emit(NodeEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                let error = describe_dial_error(&error);
                if let Some(reply) = self.pending_dials.remove(&connection_id) {
                    let _ = reply.send(Err(NetworkError::Dial { addr: Multiaddr::empty(), reason: error.clone() }));
                }
                self.emit(NodeEvent::DialFailed { peer: peer_id, error });
            }
            _ => {}
        }
    }

    fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message { propagation_source: source, message_id, message } => {
                let acceptance = if message.topic == blocklist_topic().hash() {
                    self.validate_block_list(source, &message.data)
                } else {
                    self.validate_gossip(source, &message.data)
                };
                self.swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &source, acceptance);
            }
            gossipsub::Event::Subscribed { .. } => {
                if let Some(bytes) = self.pending_publish.clone() {
                    match self.swarm.behaviour_mut().gossipsub.publish(advert_topic(), bytes) {
                        Ok(_) | Err(PublishError::Duplicate) => self.pending_publish = None,
                        Err(_) => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// The gossip validation of DESIGN section 6: Accept forwards, Reject penalises the
    /// sender, Ignore drops quietly. Nothing is forwarded before this returns Accept.
    fn validate_gossip(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        let now_instant = Instant::now();
        let (allowed, verdict) = self.guard.allow(source, Api::Gossip, now_instant);
        self.ban_if(source, verdict);
        if !allowed {
            self.metrics.throttled("gossip");
            return MessageAcceptance::Ignore;
        }
        let advert = match Signed::<Advertisement>::open(data) {
            Ok(a) => a,
            Err(e) => {
                self.metrics.rejected(if e.is_misbehaviour() { "bad_signature" } else { "version" });
                if e.is_misbehaviour() {
                    self.invalid(source, "gossip");
                    return MessageAcceptance::Reject;
                }
                return MessageAcceptance::Ignore;
            }
        };
        let provider = advert.body().provider;
        let result = self.store().insert(advert, now_unix_ms());
        match result {
            Ok(outcome) => {
                self.metrics.adverts_accepted.inc();
                self.emit(NodeEvent::AdvertStored { provider, outcome });
                MessageAcceptance::Accept
            }
            Err(e) => {
                self.metrics.rejected(e.reason());
                if e.is_misbehaviour() {
                    self.invalid(source, "gossip");
                    MessageAcceptance::Reject
                } else {
                    MessageAcceptance::Ignore
                }
            }
        }
    }

    fn is_list_blocked(&self, peer: &PeerId) -> bool {
        self.list_blocked.read().map(|s| s.contains(peer)).unwrap_or(false)
    }

    /// A gossiped block list: relayed when its signature, checks and seq hold, whoever
    /// signed it; applied only when this node trusts the signer.
    fn validate_block_list(&mut self, source: PeerId, data: &[u8]) -> MessageAcceptance {
        let (allowed, verdict) = self.guard.allow(source, Api::Gossip, Instant::now());
        self.ban_if(source, verdict);
        if !allowed {
            self.metrics.throttled("gossip");
            return MessageAcceptance::Ignore;
        }
        match Signed::<BlockList>::open(data) {
            Ok(list) if list.body().check(now_unix_ms()).is_ok() => {
                if self.accept_block_list(list) {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Ignore
                }
            }
            Ok(_) => {
                self.metrics.rejected("block_list");
                MessageAcceptance::Reject
            }
            Err(e) => {
                self.metrics.rejected("block_list");
                if e.is_misbehaviour() {
                    self.invalid(source, "gossip");
                    MessageAcceptance::Reject
                } else {
                    MessageAcceptance::Ignore
                }
            }
        }
    }

    /// Keeps `list` if it is its signer's newest (at most 1024 signers are held), and
    /// re-applies the trusted lists. False when it was not newer.
    fn accept_block_list(&mut self, list: Verified<BlockList>) -> bool {
        let signer = list.body().signer;
        let newer = self.block_lists.get(&signer).is_none_or(|held| list.body().seq > held.body().seq);
        if !newer || (!self.block_lists.contains_key(&signer) && self.block_lists.len() >= 1024) {
            return false;
        }
        self.block_lists.insert(signer, list);
        if self.trusted_lists.contains(&signer) {
            self.apply_trusted_lists();
        }
        true
    }

    fn apply_trusted_lists(&mut self) {
        let now: HashSet<PeerId> = self
            .block_lists
            .iter()
            .filter(|(signer, _)| self.trusted_lists.contains(*signer))
            .flat_map(|(_, list)| list.body().entries.iter().map(|e| e.peer))
            .collect();
        let before = self.list_blocked.read().map(|s| s.clone()).unwrap_or_default();
        for peer in now.difference(&before) {
            tracing::info!(%peer, "blocked by a trusted block list");
            self.store().block(*peer);
        }
        for peer in before.difference(&now) {
            if !self.operator_blocks.contains(peer) {
                self.store().unblock(peer);
            }
        }
        if let Ok(mut shared) = self.list_blocked.write() {
            *shared = now;
        }
    }

    fn on_sync(&mut self, event: request_response::Event<SyncRequest, SyncResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let response = self.serve_sync(peer, request);
                    let _ = self.swarm.behaviour_mut().sync.send_response(channel, response);
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some(session) = self.syncs.remove(&request_id) {
                        self.on_sync_page(session, response);
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some(session) = self.syncs.remove(&request_id) {
                    tracing::debug!(peer = %session.peer, %error, "sync failed");
                    let error = NetworkError::Sync { peer: session.peer, reason: error.to_string() };
                    self.finish_sync(session, Err(error));
                }
            }
            _ => {}
        }
    }

    fn on_lease(&mut self, event: request_response::Event<LeaseMessage, Envelope>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.on_lease_request(peer, request, channel)
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some((_, reply)) = self.lease_calls.remove(&request_id) {
                        let _ = reply.send(Ok(response.0));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, reply)) = self.lease_calls.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Lease { peer, reason: error.to_string() }));
                }
            }
            _ => {}
        }
    }

    /// Hands an inbound lease message to the manager. The rate limit is applied here,
    /// where the peer is known; a full inbox (the manager is behind) drops the stream
    /// rather than queueing without bound.
    fn on_lease_request(
        &mut self,
        peer: PeerId,
        message: LeaseMessage,
        channel: request_response::ResponseChannel<Envelope>,
    ) {
        let Some(inbox) = self.lease_inbox.clone() else { return };
        let (allowed, verdict) = self.guard.allow(peer, Api::Lease, Instant::now());
        self.ban_if(peer, verdict);
        if !allowed {
            self.metrics.throttled("lease");
        }
        let id = self.next_lease_channel;
        self.next_lease_channel += 1;
        let inbound =
            InboundLease { peer, message, throttled: !allowed, reply: LeaseResponder { id, tx: self.self_tx.clone() } };
        match inbox.try_send(inbound) {
            Ok(()) => {
                self.lease_channels.insert(id, (peer, channel));
            }
            Err(_) => {
                self.metrics.throttled("lease_queue");
                tracing::debug!(%peer, "lease inbox full; dropping the request");
            }
        }
    }

    fn on_dialback(&mut self, event: request_response::Event<DialBackRequest, DialBackResponse>) {
        match event {
            request_response::Event::Message { peer, connection_id, message } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.serve_dialback(peer, connection_id, request, channel)
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some((_, reply)) = self.dialback_calls.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                if let Some((_, reply)) = self.dialback_calls.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::DialBack { peer, reason: error.to_string() }));
                }
            }
            _ => {}
        }
    }

    /// Dials the asking peer back on the ports it named, at the IP its connection comes
    /// from and nowhere else, once per peer per `MIN_INTERVAL` (see `dialback.rs`).
    fn serve_dialback(
        &mut self,
        peer: PeerId,
        connection: ConnectionId,
        request: DialBackRequest,
        channel: request_response::ResponseChannel<DialBackResponse>,
    ) {
        let refuse = |this: &mut Self, reason: String, channel| {
            this.metrics.throttled("dialback");
            let _ = this.swarm.behaviour_mut().dialback.send_response(channel, DialBackResponse::Refused { reason });
        };
        let now = Instant::now();
        if self.dialback_served.get(&peer).is_some_and(|at| now.duration_since(*at) < dialback::MIN_INTERVAL) {
            return refuse(self, format!("one dial-back per {} s", dialback::MIN_INTERVAL.as_secs()), channel);
        }
        let Some(ip) = self.conns.get(&connection).and_then(|c| dialback::ip_of(&c.addr)) else {
            return refuse(self, "this connection has no IP address to dial back".into(), channel);
        };
        let ports = match dialback::admissible(&request, ip) {
            Ok(p) => p,
            Err(reason) => return refuse(self, reason, channel),
        };
        self.dialback_served.insert(peer, now);
        let id = self.next_lease_channel;
        self.next_lease_channel += 1;
        self.dialback_channels.insert(id, (peer, channel));
        let tx = self.self_tx.clone();
        tokio::spawn(async move {
            let ports = dialback::probe(ip, &ports).await;
            let response = DialBackResponse::Result { observed_ip: ip.to_string(), ports };
            let _ = tx.send(Command::DialBackRespond { id, response }).await;
        });
    }

    fn serve_sync(&mut self, peer: PeerId, request: SyncRequest) -> SyncResponse {
        let (allowed, verdict) = self.guard.allow(peer, Api::Sync, Instant::now());
        self.ban_if(peer, verdict);
        if !allowed {
            self.metrics.throttled("sync");
            return SyncResponse::RateLimited;
        }
        let after = request.after.as_deref().and_then(|b| PeerId::from_bytes(b).ok());
        let max_items = request.max_items.clamp(1, sync::MAX_PAGE_ITEMS) as usize;
        let (adverts, next) = self.store().page(after.as_ref(), max_items, sync::MAX_PAGE_BYTES, now_unix_ms());
        let mut lists = Vec::new();
        if after.is_none() {
            let mut bytes = 0;
            for list in self.block_lists.values() {
                let b = list.to_bytes();
                bytes += b.len();
                if bytes > sync::MAX_LIST_BYTES {
                    break;
                }
                lists.push(Envelope(b));
            }
        }
        SyncResponse::Page {
            adverts: adverts.into_iter().map(Envelope).collect(),
            next: next.map(|p| p.to_bytes()),
            lists,
        }
    }

    fn on_sync_page(&mut self, mut session: SyncSession, response: SyncResponse) {
        let peer = session.peer;
        let (adverts, next) = match response {
            SyncResponse::Page { adverts, next, lists } => {
                for env in lists.iter().take(1024) {
                    match Signed::<BlockList>::open(&env.0) {
                        Ok(list) if list.body().check(now_unix_ms()).is_ok() => {
                            self.accept_block_list(list);
                        }
                        _ => self.metrics.rejected("block_list"),
                    }
                }
                (adverts, next)
            }
            SyncResponse::RateLimited => {
                self.finish_sync(session, Err(NetworkError::RateLimited { peer, api: "sync" }));
                return;
            }
        };
        session.pages += 1;
        if adverts.len() > sync::MAX_PAGE_ITEMS as usize {
            self.invalid(peer, "sync");
            let reason = format!("a page of {} adverts, above the cap of {}", adverts.len(), sync::MAX_PAGE_ITEMS);
            self.finish_sync(session, Err(NetworkError::Sync { peer, reason }));
            return;
        }
        let refs: Vec<&[u8]> = adverts.iter().map(|e| e.0.as_slice()).collect();
        let now = now_unix_ms();
        let mut stored = Vec::new();
        let mut invalid = 0usize;
        {
            let mut store = self.store();
            for result in verify_batch::<Advertisement>(&refs) {
                match result {
                    Ok(advert) => {
                        let provider = advert.body().provider;
                        match store.insert(advert, now) {
                            Ok(outcome) => stored.push((provider, outcome)),
                            Err(e) => {
                                self.metrics.rejected(e.reason());
                                if e.is_misbehaviour() {
                                    invalid += 1;
                                } else {
                                    session.summary.ignored += 1;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        self.metrics.rejected("bad_signature");
                        if e.is_misbehaviour() {
                            invalid += 1;
                        } else {
                            session.summary.ignored += 1;
                        }
                    }
                }
            }
            self.metrics.advert_store_size.set(store.len() as i64);
        }
        session.summary.accepted += stored.len();
        session.summary.invalid += invalid;
        self.metrics.adverts_accepted.inc_by(stored.len() as u64);
        for (provider, outcome) in stored {
            self.emit(NodeEvent::AdvertStored { provider, outcome });
        }
        for _ in 0..invalid.min(10) {
            self.invalid(peer, "sync");
        }
        match next {
            Some(after) if session.pages < MAX_SYNC_PAGES && self.swarm.is_connected(&peer) => {
                let request = SyncRequest { version: 1, after: Some(after), max_items: sync::MAX_PAGE_ITEMS };
                let id = self.swarm.behaviour_mut().sync.send_request(&peer, request);
                self.syncs.insert(id, session);
            }
            _ => self.finish_sync(session, Ok(())),
        }
    }
}

/// One line per dial failure: the address and the root cause ("connection refused"),
/// not libp2p's nested, multi-line error chain.
fn describe_dial_error(error: &libp2p::swarm::DialError) -> String {
    use libp2p::swarm::DialError;
    fn root_cause(e: &dyn std::error::Error) -> String {
        let mut cur = e;
        while let Some(next) = cur.source() {
            cur = next;
        }
        cur.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
    }
    match error {
        DialError::Transport(errors) => {
            let mut parts: Vec<String> = errors.iter().map(|(addr, e)| format!("{addr}: {}", root_cause(e))).collect();
            parts.dedup();
            parts.join("; ")
        }
        other => root_cause(other),
    }
}
