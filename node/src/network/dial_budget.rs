//! The dial budget: how many connections a node's peer discovery may open
//! (docs/architecture.md, "Connection management").
//!
//! Kademlia walks the DHT by itself after each routing-table insertion while the table
//! holds fewer than 20 peers (libp2p-kad 0.49 has no switch for it), and a walk dials
//! every peer it queries: a joining node used to open a connection to most of a small
//! swarm, and to hundreds of peers in a large one, which trimming closed again 30 s
//! later. Across a swarm that is the join-time churn BENCHMARKS.md measured ("Large
//! simulated swarm"): the handshakes kept both cores busy, and the descriptors ran out.
//!
//! This behaviour refuses, before any socket is opened, an outbound dial the node did not
//! ask for by name once the node's connections (open ones and admitted dials under way,
//! either direction) reach its budget, its `target_peers`. Kademlia takes the refusal as
//! a failed peer and finishes its walk with the peers it can reach, so a walk never takes
//! a node past its target, and the room up to the trim mark (twice the target) is left
//! for the connections other nodes open to it. The dials the node makes on purpose are never refused: bootstrap nodes,
//! lease requests, an operator's `dial`, and the peers chosen to reach `target_peers`
//! (the event loop names them with [`Behaviour::want`] first). Incoming connections are
//! not this behaviour's concern: `connection_limits` caps them, trimming thins them.

use std::collections::HashSet;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
    dummy,
};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::metrics::counter::Counter;

/// Why a dial was refused (the dial's error in libp2p's `DialError::Denied`).
#[derive(Debug, thiserror::Error)]
#[error("discovery dial refused: the node already has {connections} connections, its budget")]
pub struct OverBudget {
    pub connections: usize,
}

/// The bookkeeping, apart from libp2p's trait so that its decisions can be tested alone.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    /// Established connections, either direction.
    established: usize,
    /// Admitted discovery dials not yet established or failed.
    pending: HashSet<ConnectionId>,
    /// Peers the node dials on purpose, until a connection to them opens, the dial fails,
    /// or (a peer already connected) its connections close: never more than the peers
    /// connected or being dialed.
    wanted: HashSet<PeerId>,
}

impl Budget {
    pub fn new(limit: usize) -> Self {
        Self { limit, established: 0, pending: HashSet::new(), wanted: HashSet::new() }
    }

    /// The node is about to dial `peer` on purpose: never refuse it.
    pub fn want(&mut self, peer: PeerId) {
        self.wanted.insert(peer);
    }

    /// Whether an outbound dial (`id`, to `peer` if known) may go ahead.
    pub fn admit(&mut self, id: ConnectionId, peer: Option<PeerId>) -> Result<(), OverBudget> {
        // Kademlia always dials by peer id; a dial without one is an address the operator
        // or the configuration gave.
        let Some(peer) = peer else { return Ok(()) };
        if self.wanted.contains(&peer) {
            return Ok(());
        }
        let connections = self.established + self.pending.len();
        if connections >= self.limit {
            return Err(OverBudget { connections });
        }
        self.pending.insert(id);
        Ok(())
    }

    pub fn on_established(&mut self, id: ConnectionId, peer: PeerId) {
        self.established += 1;
        self.pending.remove(&id);
        self.wanted.remove(&peer);
    }

    pub fn on_closed(&mut self, peer: PeerId, remaining: usize) {
        self.established = self.established.saturating_sub(1);
        if remaining == 0 {
            self.wanted.remove(&peer);
        }
    }

    pub fn on_dial_failed(&mut self, id: ConnectionId, peer: Option<PeerId>) {
        self.pending.remove(&id);
        if let Some(peer) = peer {
            self.wanted.remove(&peer);
        }
    }

    /// Connections counted against the budget: open ones and admitted dials.
    pub fn used(&self) -> usize {
        self.established + self.pending.len()
    }
}

/// The behaviour. A refusal is not a failure the event loop hears of (libp2p tells only
/// the behaviours, and Kademlia's query moves on): it is counted here.
pub struct Behaviour {
    budget: Budget,
    refused: Counter,
}

impl Behaviour {
    pub fn new(limit: usize) -> Self {
        Self { budget: Budget::new(limit), refused: Counter::default() }
    }

    /// Counts refusals in `counter` from now on (`peervm_discovery_dials_refused_total`).
    pub fn count_refusals_in(&mut self, counter: Counter) {
        self.refused = counter;
    }

    /// See [`Budget::want`].
    pub fn want(&mut self, peer: PeerId) {
        self.budget.want(peer);
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = std::convert::Infallible;

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        _addresses: &[Multiaddr],
        _effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.budget.admit(connection_id, maybe_peer).map(|()| Vec::new()).map_err(|e| {
            self.refused.inc();
            ConnectionDenied::new(e)
        })
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionEstablished(e) => self.budget.on_established(e.connection_id, e.peer_id),
            FromSwarm::ConnectionClosed(e) => self.budget.on_closed(e.peer_id, e.remaining_established),
            FromSwarm::DialFailure(e) => self.budget.on_dial_failed(e.connection_id, e.peer_id),
            _ => {}
        }
    }

    fn on_connection_handler_event(&mut self, _: PeerId, _: ConnectionId, event: THandlerOutEvent<Self>) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> PeerId {
        PeerId::random()
    }

    #[test]
    fn discovery_dials_are_admitted_until_the_budget_and_refused_after() {
        let mut b = Budget::new(3);
        let ids: Vec<ConnectionId> = (0..4).map(|_| ConnectionId::new_unchecked(rand_id())).collect();
        assert!(b.admit(ids[0], Some(peer())).is_ok());
        assert!(b.admit(ids[1], Some(peer())).is_ok());
        assert!(b.admit(ids[2], Some(peer())).is_ok());
        let refused = b.admit(ids[3], Some(peer())).unwrap_err();
        assert_eq!(refused.connections, 3);
    }

    #[test]
    fn a_failed_dial_gives_its_place_back_and_an_established_one_keeps_it() {
        let mut b = Budget::new(2);
        let (p1, p2, p3) = (peer(), peer(), peer());
        let (c1, c2, c3) = (cid(), cid(), cid());
        b.admit(c1, Some(p1)).unwrap();
        b.admit(c2, Some(p2)).unwrap();
        b.on_dial_failed(c2, Some(p2));
        assert_eq!(b.used(), 1);
        b.on_established(c1, p1);
        assert_eq!(b.used(), 1, "the dial became the connection, not a second place");
        b.admit(c3, Some(p3)).unwrap();
        assert!(b.admit(cid(), Some(peer())).is_err());
        b.on_closed(p1, 0);
        assert_eq!(b.used(), 1);
    }

    #[test]
    fn inbound_connections_count_against_discovery_too() {
        let mut b = Budget::new(2);
        b.on_established(cid(), peer());
        b.on_established(cid(), peer());
        assert!(b.admit(cid(), Some(peer())).is_err());
    }

    #[test]
    fn the_dials_a_node_makes_on_purpose_are_never_refused() {
        let mut b = Budget::new(1);
        b.on_established(cid(), peer());
        let provider = peer();
        b.want(provider);
        assert!(b.admit(cid(), Some(provider)).is_ok(), "a lease dial past the budget");
        assert!(b.admit(cid(), None).is_ok(), "a configured address without a peer id");
        assert!(b.admit(cid(), Some(peer())).is_err());
        // Once connected, the peer is an ordinary one again.
        b.on_established(cid(), provider);
        assert!(b.admit(cid(), Some(provider)).is_err());
    }

    #[test]
    fn a_peer_wanted_while_connected_is_forgotten_when_its_connections_close() {
        let mut b = Budget::new(1);
        let provider = peer();
        b.on_established(cid(), provider);
        b.want(provider);
        b.on_closed(provider, 0);
        assert!(b.wanted.is_empty());
    }

    fn cid() -> ConnectionId {
        ConnectionId::new_unchecked(rand_id())
    }

    fn rand_id() -> usize {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(1_000_000);
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}
