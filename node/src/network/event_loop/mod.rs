//! The task that owns the Swarm (docs/architecture.md, "The swarm"): a `select!` over
//! swarm events, commands and timers, each handed to the module of its concern. Each
//! module owns its state:
//!
//! - `connections`: open connections, dials, bootstrap re-dials, Kademlia, trimming,
//!   operator blocks, the end of bans;
//! - `gossip`: advert validation and publishing;
//! - `block_lists`: signed block lists, held, relayed and applied;
//! - `sync`: the sync client (sessions) and server (pages);
//! - `refresh`: refresh tokens, checked, queued for the mesh and sent once a second;
//! - `leases`: lease messages in both directions;
//! - `dial_back`: port verification in both directions;
//! - `closing`: when a banned peer's connections close (after the replies it is owed).
//!
//! They share a `Context` (the swarm, the store, events, metrics, audit, per-peer rate
//! limits and bans) and the `Pending` map of requests in flight; `setup` builds the swarm.
//! Timings and limits are in `tuning.rs`.

mod block_lists;
mod bootstrap_redial;
mod closing;
mod connections;
mod context;
mod dht_walks;
mod dial_back;
mod gossip;
mod leases;
mod pending;
mod refresh;
mod setup;
mod sync;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::swarm::{ConnectionId, SwarmEvent};
use libp2p::{PeerId, identify, kad, ping};
use tokio::sync::{broadcast, mpsc};

use self::block_lists::BlockLists;
use self::closing::Closing;
use self::connections::Connections;
use self::context::Context;
use self::dial_back::DialBacks;
use self::gossip::Gossip;
use self::leases::Leases;
use self::refresh::Refreshes;
use self::sync::Syncs;
use super::behaviour::PeervmBehaviourEvent;
use super::rate_limit::{Api, PeerGuard};
use super::tuning::{
    BAN_REPLY_GRACE, BAN_REPLY_LINGER, COMMAND_QUEUE, EVENT_QUEUE, MAINTAIN_TICK, REFRESH_FLUSH_INTERVAL,
    SHUTDOWN_FLUSH, SLOW_EVERY,
};
use super::{Command, ListBlocked, NetworkError, Node, NodeClient, NodeConfig, NodeEvent, SharedStore};
use crate::advert_store::AdvertStore;
use crate::clock::now_unix_ms;

/// Builds the swarm, starts listening, dials the bootstrap nodes and spawns the task.
pub(super) async fn start(config: NodeConfig) -> Result<Node, NetworkError> {
    let peer_id = config.key.peer_id();
    let metrics = config.metrics.clone().unwrap_or_default();
    let mut swarm = setup::build_swarm(&config, &metrics)?;
    let listen_addrs = setup::listen(&mut swarm, &config.listen, peer_id).await?;

    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (events, _) = broadcast::channel(EVENT_QUEUE);
    let store: SharedStore = Arc::new(Mutex::new(AdvertStore::new()));
    let list_blocked: ListBlocked = Default::default();
    swarm.behaviour_mut().dial_budget.count_refusals_in(metrics.discovery_dials_refused.clone());
    let mut event_loop = EventLoop {
        ctx: Context {
            swarm,
            store: store.clone(),
            events: events.clone(),
            metrics: metrics.clone(),
            audit: config.audit.clone(),
            self_tx: tx.clone(),
            guard: PeerGuard::new(config.rate_limits.clone()),
            closing: Closing::new(BAN_REPLY_GRACE, BAN_REPLY_LINGER),
        },
        commands: rx,
        sweep_interval: config.sweep_interval,
        maintain_ticks: 0,
        connections: Connections::new(&config),
        gossip: Gossip::default(),
        block_lists: BlockLists::new(config.trusted_block_lists.clone(), list_blocked.clone()),
        sync: Syncs::new(config.sync_on_connect),
        refresh: Refreshes::new(config.fetch_missing_adverts),
        leases: Leases::new(config.lease_inbox.clone()),
        dial_back: DialBacks::default(),
    };
    event_loop.connections.dial_bootstraps(&mut event_loop.ctx);
    let task = tokio::spawn(event_loop.run());
    Ok(Node { client: NodeClient { tx }, store, list_blocked, peer_id, listen_addrs, metrics, events, task })
}

struct EventLoop {
    ctx: Context,
    commands: mpsc::Receiver<Command>,
    sweep_interval: Duration,
    maintain_ticks: u64,
    connections: Connections,
    gossip: Gossip,
    block_lists: BlockLists,
    sync: Syncs,
    refresh: Refreshes,
    leases: Leases,
    dial_back: DialBacks,
}

impl EventLoop {
    async fn run(mut self) {
        let mut sweep = tokio::time::interval(self.sweep_interval);
        // The bootstrap nodes were just dialed: the first re-dial check comes later.
        let mut maintenance = tokio::time::interval_at(tokio::time::Instant::now() + MAINTAIN_TICK, MAINTAIN_TICK);
        maintenance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refresh_flush = tokio::time::interval(REFRESH_FLUSH_INTERVAL);
        refresh_flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.ctx.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        // Give queued gossip (a withdrawal, typically) a moment to go out.
                        let flush = tokio::time::sleep(SHUTDOWN_FLUSH);
                        tokio::pin!(flush);
                        loop {
                            tokio::select! {
                                event = self.ctx.swarm.select_next_some() => self.on_swarm_event(event),
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
                _ = refresh_flush.tick() => {
                    self.refresh.flush(&mut self.ctx);
                    for (peer, ids) in self.refresh.take_missing() {
                        let sent = self.sync.fetch_ids(&mut self.ctx, peer, &ids);
                        self.refresh.fetch_done(&mut self.ctx, peer, ids, sent);
                    }
                }
            }
            self.close_banned();
        }
    }

    /// Closes the connections of banned peers that are owed no lease reply any more (the
    /// denial that got them banned was written a moment ago), or whose grace ran out
    /// (`closing.rs`). Checked on every turn of the loop, so at least on the maintenance
    /// tick.
    fn close_banned(&mut self) {
        let leases = &self.leases;
        self.ctx.close_banned(|peer| leases.owes_reply(peer));
    }

    /// Drops expired adverts (and tombstones that can no longer matter) from the store.
    fn sweep(&mut self) {
        let now = now_unix_ms();
        let (removed, size) = {
            let mut store = self.ctx.store();
            let removed = store.sweep(now);
            (removed, store.len())
        };
        self.ctx.metrics.advert_store_size.set(size as i64);
        if !removed.is_empty() {
            self.ctx.emit(NodeEvent::AdvertsExpired(removed));
        }
    }

    /// Re-dials lost bootstrap nodes when `bootstrap_redial` says so, and every
    /// `SLOW_EVERY` ticks: walks the DHT, re-gossips the own block list, forgets finished
    /// streams, lifts bans that ran out and trims idle connections.
    fn maintain(&mut self) {
        self.maintain_ticks += 1;
        let slow = self.maintain_ticks.is_multiple_of(SLOW_EVERY);
        let connected: HashSet<PeerId> = self.ctx.swarm.connected_peers().copied().collect();
        if bootstrap_redial::redial_due(self.maintain_ticks, connected.len(), self.connections.target_peers()) {
            self.connections.redial_bootstraps(&mut self.ctx, &connected, slow);
        }
        if !slow {
            return;
        }
        let slow_ticks = self.maintain_ticks / SLOW_EVERY;
        self.connections.walk_dht(&mut self.ctx, &connected, slow_ticks);
        self.block_lists.regossip_own(&mut self.ctx, slow_ticks);
        self.leases.forget_closed_streams();
        self.dial_back.forget_stale();
        self.connections.lift_expired_bans(&mut self.ctx);
        // A peer with a request in flight either way is not idle.
        let busy: Vec<PeerId> = self.sync.peers().chain(self.leases.peers()).chain(self.dial_back.peers()).collect();
        self.connections.trim(&mut self.ctx, busy);
    }

    fn on_command(&mut self, command: Command) {
        let ctx = &mut self.ctx;
        match command {
            Command::Publish { advert, reply } => {
                let _ = reply.send(self.gossip.publish(ctx, *advert));
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(ctx.swarm.connected_peers().copied().collect());
            }
            Command::Dial { addr, reply } => self.connections.dial(ctx, addr, Some(reply)),
            Command::Sync { peer, query, reply } => self.sync.request(ctx, peer, query, reply),
            Command::ReleaseRefresh { record, reply } => {
                let _ = reply.send(self.refresh.release(ctx, record));
            }
            Command::LeaseSend { peer, addrs, message, reply } => self.leases.send(ctx, peer, addrs, message, reply),
            Command::LeaseRespond { id, reply } => self.leases.respond(ctx, id, reply),
            Command::DialBack { peer, request, reply } => self.dial_back.send(ctx, peer, request, reply),
            Command::DialBackRespond { id, response } => self.dial_back.respond(ctx, id, response),
            Command::ReportInvalid { peer } => ctx.invalid(peer, Api::Lease),
            Command::BlockAdverts { peer, blocked, reply } => {
                if blocked {
                    self.block_lists.block_adverts(ctx, peer);
                } else {
                    self.block_lists.unblock_adverts(ctx, peer);
                }
                let _ = reply.send(());
            }
            Command::PublishBlockList { list, reply } => {
                let _ = reply.send(self.block_lists.publish_own(ctx, *list));
            }
            Command::BlockPeer { peer, reply } => {
                self.connections.block(ctx, peer);
                self.block_lists.block_adverts(ctx, peer);
                let _ = reply.send(());
            }
            Command::UnblockPeer { peer, reply } => {
                self.connections.unblock(ctx, peer);
                self.block_lists.unblock_peer_adverts(ctx, peer);
                let _ = reply.send(());
            }
            Command::SetTrustedBlockLists { trusted, reply } => {
                self.block_lists.set_trusted(ctx, trusted);
                let _ = reply.send(());
            }
            Command::Shutdown { .. } => unreachable!("handled in run"),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<PeervmBehaviourEvent>) {
        let ctx = &mut self.ctx;
        match event {
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Gossipsub(e)) => {
                self.gossip.on_event(ctx, &mut self.block_lists, e)
            }
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Sync(e)) => self.sync.on_event(ctx, &mut self.block_lists, e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Refresh(e)) => self.refresh.on_event(ctx, e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Lease(e)) => self.leases.on_event(ctx, e),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Dialback(e)) => {
                self.dial_back.on_event(ctx, &self.connections, e)
            }
            // (A peer that does not speak ping, `Failure::Unsupported`, keeps its connection.)
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result: Err(error @ (ping::Failure::Timeout | ping::Failure::Other { .. })),
            })) => Connections::on_ping_failure(ctx, peer, connection, &error),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Identify(identify::Event::Received {
                peer_id, info, ..
            })) => Connections::on_identify(ctx, peer_id, info),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, addresses, ..
            })) => self.connections.on_routing_updated(ctx, peer, addresses.into_vec()),
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::Bootstrap(_),
                step,
                ..
            })) if step.last => {
                ctx.metrics.kad_bootstraps.inc();
            }
            SwarmEvent::Behaviour(PeervmBehaviourEvent::Kad(kad::Event::InboundRequest {
                request: kad::InboundRequest::FindNode { .. },
            })) => {
                ctx.metrics.kad_lookups_answered.inc();
            }
            SwarmEvent::ConnectionEstablished { peer_id, connection_id, endpoint, num_established, .. } => {
                self.on_connection_established(peer_id, connection_id, &endpoint, num_established.get())
            }
            SwarmEvent::ConnectionClosed { peer_id, connection_id, num_established, .. } => {
                self.on_connection_closed(peer_id, connection_id, num_established)
            }
            SwarmEvent::OutgoingConnectionError { connection_id, peer_id, error } => {
                self.connections.on_dial_error(ctx, connection_id, peer_id, &error)
            }
            _ => {}
        }
    }

    fn on_connection_established(
        &mut self,
        peer: PeerId,
        id: ConnectionId,
        endpoint: &ConnectedPoint,
        num_established: u32,
    ) {
        if self.connections.on_established(&mut self.ctx, peer, id, endpoint, num_established) {
            // Pull the peer's market snapshot: a new node sees the market in seconds.
            self.sync.on_connected(&mut self.ctx, peer);
            self.connections.learn_bootstrap_id(peer, endpoint);
        }
    }

    fn on_connection_closed(&mut self, peer: PeerId, id: ConnectionId, num_established: u32) {
        if self.connections.on_closed(&mut self.ctx, peer, id, num_established) {
            self.dial_back.forget_served();
            self.refresh.forget(&peer);
            if self.ctx.swarm.connected_peers().next().is_none() {
                self.sync.on_peerless();
            }
        }
    }
}
