//! `/peervm/lease/1` in both directions (docs/protocol.md, "Transport: /peervm/lease/1"):
//! inbound messages go to the lease manager with their rate-limit verdict, and its signed
//! reply goes back over the stream; outbound messages wait for the provider's reply. The
//! swarm only routes and rate limits; the manager verifies.
//!
//! A peer banned while it waits for replies is owed them (`owes_reply`): the request that
//! got it banned still gets its signed denial, and its connections close a moment after
//! that is written (`closing.rs`). New requests from a banned peer are not read.

use libp2p::request_response::{self, InboundRequestId, OutboundRequestId, ResponseChannel};
use libp2p::{Multiaddr, PeerId};
use tokio::sync::mpsc;

use super::context::Context;
use super::pending::{Pending, Reply};
use crate::network::lease_wire::{Envelope, LeaseMessage};
use crate::network::rate_limit::Api;
use crate::network::{InboundLease, LeaseResponder, NetworkError};

pub(super) struct Leases {
    /// Where inbound messages go (providers); `None`: the node only sends.
    inbox: Option<mpsc::Sender<InboundLease>>,
    /// Open inbound streams waiting for the manager's reply, by local id.
    streams: Pending<u64, (InboundRequestId, ResponseChannel<Envelope>)>,
    /// Replies handed to libp2p, until it reports them written (`ResponseSent`) or failed
    /// (`InboundFailure`; one of the two always follows): a banned peer's connections
    /// close after that.
    flushing: Pending<InboundRequestId, ()>,
    next_stream: u64,
    /// Outbound messages waiting for their reply.
    calls: Pending<OutboundRequestId, Reply<Vec<u8>>>,
}

impl Leases {
    pub fn new(inbox: Option<mpsc::Sender<InboundLease>>) -> Self {
        Self {
            inbox,
            streams: Pending::default(),
            flushing: Pending::default(),
            next_stream: 0,
            calls: Pending::default(),
        }
    }

    /// Sends `message` to `peer` (dialing it at `addrs` if need be); the reply comes as an
    /// event.
    pub fn send(
        &mut self,
        ctx: &mut Context,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        message: LeaseMessage,
        reply: Reply<Vec<u8>>,
    ) {
        // A lease dial is never one of discovery's, whatever the node's connections.
        ctx.swarm.behaviour_mut().dial_budget.want(peer);
        let id = ctx.swarm.behaviour_mut().lease.send_request_with_addresses(&peer, message, addrs);
        self.calls.insert(id, peer, reply);
    }

    /// The manager's signed reply to inbound stream `id`.
    pub fn respond(&mut self, ctx: &mut Context, id: u64, reply: Vec<u8>) {
        if let Some((peer, (request_id, channel))) = self.streams.take(&id)
            && ctx.swarm.behaviour_mut().lease.send_response(channel, Envelope(reply)).is_ok()
        {
            self.flushing.insert(request_id, peer, ());
        }
    }

    /// True while `peer` waits for a reply from the manager, or one is still being
    /// written to it.
    pub fn owes_reply(&self, peer: &PeerId) -> bool {
        self.streams.has_peer(peer) || self.flushing.has_peer(peer)
    }

    /// Forgets streams whose requestor gave up (or whose reply was never sent).
    pub fn forget_closed_streams(&mut self) {
        self.streams.retain(|(_, channel)| channel.is_open());
    }

    /// Peers with a lease message in flight either way (not to be trimmed).
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.streams.peers().chain(self.calls.peers())
    }

    pub fn on_event(&mut self, ctx: &mut Context, event: request_response::Event<LeaseMessage, Envelope>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request_id, request, channel } => {
                    self.on_request(ctx, peer, request_id, request, channel)
                }
                request_response::Message::Response { request_id, response } => {
                    self.calls.answer(&request_id, Ok(response.0));
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                self.calls.answer(&request_id, Err(NetworkError::Lease { peer, reason: error.to_string() }));
            }
            request_response::Event::ResponseSent { request_id, .. }
            | request_response::Event::InboundFailure { request_id, .. } => {
                self.flushing.take(&request_id);
            }
        }
    }

    /// Hands an inbound lease message to the manager. The rate limit is applied here,
    /// where the peer is known: a throttled message still goes to the manager, which
    /// answers it with a signed denial. A full inbox (the manager is behind) drops the
    /// stream rather than queueing without bound. A banned peer's request, sent in the
    /// moment before its connection closes, is not read: the stream is dropped unanswered.
    fn on_request(
        &mut self,
        ctx: &mut Context,
        peer: PeerId,
        request_id: InboundRequestId,
        message: LeaseMessage,
        channel: ResponseChannel<Envelope>,
    ) {
        let Some(inbox) = self.inbox.clone() else { return };
        if ctx.guard.is_banned(&peer) {
            return;
        }
        let allowed = ctx.admit(peer, Api::Lease);
        let id = self.next_stream;
        self.next_stream += 1;
        let inbound =
            InboundLease { peer, message, throttled: !allowed, reply: LeaseResponder { id, tx: ctx.self_tx.clone() } };
        match inbox.try_send(inbound) {
            Ok(()) => self.streams.insert(id, peer, (request_id, channel)),
            Err(_) => {
                ctx.metrics.throttled("lease_queue");
                tracing::debug!(%peer, "lease inbox full; dropping the request");
            }
        }
    }
}
