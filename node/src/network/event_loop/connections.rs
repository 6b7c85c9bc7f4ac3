//! Peer management: open connections, dials, bootstrap re-dials, growing the neighbourhood
//! through Kademlia, closing dead and surplus connections, operator blocks and the end of
//! bans (docs/architecture.md, "Peer discovery and bootstraps", "Connection management").

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use libp2p::core::ConnectedPoint;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId, identify, ping};
use rand::seq::SliceRandom;

use super::context::Context;
use super::dht_walks::{DhtWalks, Walk};
use super::pending::Reply;
use crate::network::behaviour::KAD_PROTOCOL;
use crate::network::gossip_params::advert_topic;
use crate::network::{NetworkError, NodeConfig, NodeEvent, Role, peer_id_of};

/// One open connection.
struct Conn {
    peer: PeerId,
    /// Where it comes from: a dial-back dials only this IP.
    addr: Multiaddr,
    opened: Instant,
}

pub(super) struct Connections {
    /// Every open connection: whose, where from, since when.
    conns: HashMap<ConnectionId, Conn>,
    /// Dials a caller waits on (`NodeClient::dial`).
    dials: HashMap<ConnectionId, Reply<()>>,
    bootstrap: Vec<Multiaddr>,
    /// The bootstrap nodes' ids: from their addresses' `/p2p` part, or learnt on connecting.
    bootstrap_peers: HashSet<PeerId>,
    target_peers: usize,
    /// Above `trim_high` connected peers, idle ones are closed down to `trim_low`.
    trim_high: usize,
    trim_low: usize,
    trim_grace: Duration,
    /// Peers blocked by the operator (as opposed to banned for a while).
    blocked: HashSet<PeerId>,
    walks: DhtWalks,
}

impl Connections {
    pub fn new(config: &NodeConfig) -> Self {
        let (trim_high, trim_low) = trim_marks(config.role, config.target_peers, config.caps.max_established);
        Self {
            conns: HashMap::new(),
            dials: HashMap::new(),
            bootstrap: config.bootstrap.clone(),
            bootstrap_peers: config.bootstrap.iter().filter_map(peer_id_of).collect(),
            target_peers: config.target_peers,
            trim_high,
            trim_low,
            trim_grace: config.trim_grace,
            blocked: HashSet::new(),
            walks: DhtWalks::new(),
        }
    }

    /// Dials every bootstrap node (at start).
    pub fn dial_bootstraps(&mut self, ctx: &mut Context) {
        for addr in self.bootstrap.clone() {
            self.dial(ctx, addr, None);
        }
    }

    pub fn dial(&mut self, ctx: &mut Context, addr: Multiaddr, reply: Option<Reply<()>>) {
        let opts = match peer_id_of(&addr) {
            Some(p) => {
                ctx.swarm.behaviour_mut().dial_budget.want(p);
                DialOpts::peer_id(p).addresses(vec![addr.clone()]).build()
            }
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match ctx.swarm.dial(opts) {
            Ok(()) => {
                if let Some(reply) = reply {
                    self.dials.insert(id, reply);
                }
            }
            Err(e) => {
                let error = NetworkError::Dial { addr, reason: e.to_string() };
                ctx.emit(NodeEvent::DialFailed { peer: None, error: error.to_string() });
                if let Some(reply) = reply {
                    let _ = reply.send(Err(error));
                }
            }
        }
    }

    pub fn target_peers(&self) -> usize {
        self.target_peers
    }

    /// Re-dials the bootstrap nodes the node is not connected to (when: `bootstrap_redial`);
    /// `slow`: this is a slow tick.
    pub fn redial_bootstraps(&mut self, ctx: &mut Context, connected: &HashSet<PeerId>, slow: bool) {
        for addr in self.bootstrap.clone() {
            match peer_id_of(&addr) {
                Some(peer) if !connected.contains(&peer) => {
                    // Not while a dial to it is under way (a black-holed address keeps
                    // a dial pending for a while).
                    ctx.swarm.behaviour_mut().dial_budget.want(peer);
                    let opts = DialOpts::peer_id(peer)
                        .condition(PeerCondition::DisconnectedAndNotDialing)
                        .addresses(vec![addr])
                        .build();
                    let _ = ctx.swarm.dial(opts);
                }
                Some(_) => {}
                // Without a /p2p part the peer is unknown until it answers: slow ticks only.
                None if slow => self.dial(ctx, addr, None),
                None => {}
            }
        }
    }

    /// Below the target, dials peers the routing table already knows, or walks the DHT
    /// when it knows none, backing off while that finds nobody (`dht_walks.rs`); now and
    /// then refreshes the routing table anyway.
    pub fn walk_dht(&mut self, ctx: &mut Context, connected: &HashSet<PeerId>, slow_ticks: u64) {
        let Some(walk) = self.walks.due(slow_ticks, connected.len(), self.target_peers) else {
            return;
        };
        match walk {
            Walk::FindPeers { lookup } => {
                let wanted = self.target_peers.saturating_sub(connected.len());
                let known = if lookup { Vec::new() } else { self.known_unconnected(ctx, connected, wanted) };
                if known.is_empty() {
                    ctx.metrics.dht_walks.inc();
                    ctx.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                }
                for peer in known {
                    ctx.swarm.behaviour_mut().dial_budget.want(peer);
                    let opts = DialOpts::peer_id(peer).condition(PeerCondition::DisconnectedAndNotDialing).build();
                    let _ = ctx.swarm.dial(opts);
                }
            }
            Walk::Refresh => {
                ctx.metrics.dht_walks.inc();
                let _ = ctx.swarm.behaviour_mut().kad.bootstrap();
            }
        }
    }

    /// Up to `wanted` peers of the routing table, chosen at random, that the node is not
    /// connected to and has neither banned nor blocked. Dialling them costs one connection
    /// each, where a walk asks a dozen peers and, with the node's dial budget nearly spent,
    /// is refused hundreds of dials (BENCHMARKS.md, "Swarm upkeep").
    fn known_unconnected(&self, ctx: &mut Context, connected: &HashSet<PeerId>, wanted: usize) -> Vec<PeerId> {
        let mut known: Vec<PeerId> = Vec::new();
        for bucket in ctx.swarm.behaviour_mut().kad.kbuckets() {
            for entry in bucket.iter() {
                let peer = *entry.node.key.preimage();
                if !connected.contains(&peer) && !ctx.guard.is_banned(&peer) && !self.blocked.contains(&peer) {
                    known.push(peer);
                }
            }
        }
        known.shuffle(&mut rand::thread_rng());
        known.truncate(wanted);
        known
    }

    /// Lets peers whose ban ran out connect again, unless the operator blocked them.
    pub fn lift_expired_bans(&self, ctx: &mut Context) {
        for peer in ctx.guard.expired_bans(Instant::now()) {
            if !self.blocked.contains(&peer) {
                ctx.swarm.behaviour_mut().blocked.unblock_peer(peer);
            }
        }
    }

    /// Keeps the node near its target number of peers. Kademlia lookups connect to every
    /// peer they query, and gossipsub holds a stream open on every connection, so nothing
    /// would ever close those connections: without trimming, a node ends up connected to
    /// most of the swarm (BENCHMARKS.md, large swarm). Above `trim_high` peers, the node
    /// closes connections to peers that are not a bootstrap node, not in its advert topic's
    /// gossipsub mesh, not in `busy` (a sync, lease or dial-back request either way), and
    /// connected more than `trim_grace` ago, the newest first, until it is down to
    /// `trim_low`.
    pub fn trim(&self, ctx: &mut Context, busy: impl IntoIterator<Item = PeerId>) {
        let connected = ctx.swarm.connected_peers().count();
        if connected <= self.trim_high {
            return;
        }
        let mut keep: HashSet<PeerId> = self.bootstrap_peers.clone();
        // The advert topic's mesh carries the market; the block-list topic's is left to
        // re-form among the peers that stay.
        keep.extend(ctx.swarm.behaviour().gossipsub.mesh_peers(&advert_topic().hash()).copied());
        keep.extend(busy);
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
            ctx.metrics.connections_closed("trimmed");
            let _ = ctx.swarm.disconnect_peer_id(peer);
        }
    }

    /// The operator blocks `peer`: its connections are refused and its gossip ignored.
    pub fn block(&mut self, ctx: &mut Context, peer: PeerId) {
        self.blocked.insert(peer);
        ctx.swarm.behaviour_mut().blocked.block_peer(peer);
        ctx.swarm.behaviour_mut().gossipsub.blacklist_peer(&peer);
    }

    pub fn unblock(&mut self, ctx: &mut Context, peer: PeerId) {
        self.blocked.remove(&peer);
        ctx.swarm.behaviour_mut().blocked.unblock_peer(peer);
        ctx.swarm.behaviour_mut().gossipsub.remove_blacklisted_peer(&peer);
    }

    /// Where connection `id` comes from, while it is open.
    pub fn remote_addr(&self, id: &ConnectionId) -> Option<&Multiaddr> {
        self.conns.get(id).map(|c| &c.addr)
    }

    /// Records a new connection; true when it is the first to `peer` (the caller then
    /// pulls the peer's market snapshot).
    pub fn on_established(
        &mut self,
        ctx: &mut Context,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) -> bool {
        let conn = Conn { peer, addr: endpoint.get_remote_address().clone(), opened: Instant::now() };
        self.conns.insert(id, conn);
        if let Some(reply) = self.dials.remove(&id) {
            let _ = reply.send(Ok(()));
        }
        if num_established != 1 {
            return false;
        }
        if endpoint.is_dialer() {
            ctx.swarm.behaviour_mut().kad.add_address(&peer, endpoint.get_remote_address().clone());
        }
        ctx.metrics.peers_connected.set(ctx.swarm.connected_peers().count() as i64);
        ctx.emit(NodeEvent::PeerConnected(peer));
        true
    }

    /// After the first connection's sync has started: a bootstrap given without `/p2p`
    /// is identified now.
    pub fn learn_bootstrap_id(&mut self, peer: PeerId, endpoint: &ConnectedPoint) {
        if self.bootstrap_peers.is_empty() && endpoint.is_dialer() {
            let addr = endpoint.get_remote_address();
            if self.bootstrap.iter().any(|b| b == addr) {
                self.bootstrap_peers.insert(peer);
            }
        }
    }

    /// Forgets a closed connection; true when it was the last to `peer`.
    pub fn on_closed(&mut self, ctx: &mut Context, peer: PeerId, id: ConnectionId, num_established: u32) -> bool {
        self.conns.remove(&id);
        if num_established > 0 {
            return false;
        }
        // A disconnected peer's rate state goes (bans stay): memory is bounded by the
        // connected peers.
        ctx.guard.forget(&peer);
        ctx.metrics.peers_connected.set(ctx.swarm.connected_peers().count() as i64);
        ctx.emit(NodeEvent::PeerDisconnected(peer));
        true
    }

    pub fn on_dial_error(
        &mut self,
        ctx: &mut Context,
        id: ConnectionId,
        peer: Option<PeerId>,
        error: &libp2p::swarm::DialError,
    ) {
        let error = describe_dial_error(error);
        if let Some(reply) = self.dials.remove(&id) {
            let _ = reply.send(Err(NetworkError::Dial { addr: Multiaddr::empty(), reason: error.clone() }));
        }
        ctx.emit(NodeEvent::DialFailed { peer, error });
    }

    /// A connection that stops answering pings is dead (a cut link, a peer that vanished
    /// without a FIN): close it, so the peer counts as gone and bootstrap re-dials and
    /// Kademlia replace it.
    pub fn on_ping_failure(ctx: &mut Context, peer: PeerId, connection: ConnectionId, error: &ping::Failure) {
        tracing::debug!(%peer, %error, "ping failed; closing the connection");
        ctx.metrics.connections_closed("dead");
        ctx.swarm.close_connection(connection);
    }

    /// Identify tells a Kademlia peer's listen addresses: they go into the routing table.
    pub fn on_identify(ctx: &mut Context, peer: PeerId, info: identify::Info) {
        if info.protocols.contains(&KAD_PROTOCOL) {
            for addr in info.listen_addrs {
                ctx.swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
        }
    }

    /// Grows the neighbourhood beyond the bootstrap nodes, up to the target.
    pub fn on_routing_updated(&self, ctx: &mut Context, peer: PeerId, addresses: Vec<Multiaddr>) {
        let connected = ctx.swarm.connected_peers().count();
        if connected < self.target_peers && !ctx.swarm.is_connected(&peer) && !ctx.guard.is_banned(&peer) {
            ctx.swarm.behaviour_mut().dial_budget.want(peer);
            let opts = DialOpts::peer_id(peer).addresses(addresses).build();
            let _ = ctx.swarm.dial(opts);
        }
    }
}

/// When a node trims its connections (see `Connections::trim`): above twice its target,
/// down to the target. A bootstrap node is where every joining node connects first: it
/// trims only above half its connection cap, down to a quarter, so joins always find room.
fn trim_marks(role: Role, target_peers: usize, max_established: u32) -> (usize, usize) {
    match role {
        Role::Bootstrap => {
            let cap = max_established as usize;
            ((cap / 2).max(2 * target_peers), (cap / 4).max(target_peers))
        }
        Role::Provider | Role::Requestor => (2 * target_peers, target_peers),
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
