//! `/peervm/dialback/1` in both directions (docs/protocol.md, section 7c): a node asks a
//! peer to dial it back on a few ports (port verification), and serves such requests by
//! dialing only the IP the asking connection comes from, so nobody can use it to scan a
//! third party (SECURITY.md, "Reachability, block lists, owners").

use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId, ResponseChannel};
use libp2p::swarm::ConnectionId;

use super::connections::Connections;
use super::context::Context;
use super::pending::{Pending, Reply};
use crate::network::dialback::{self, DialBackRequest, DialBackResponse};
use crate::network::tuning::DIALBACK_MIN_INTERVAL;
use crate::network::{Command, NetworkError};

#[derive(Default)]
pub(super) struct DialBacks {
    /// Served requests whose probes are running, by local id.
    streams: Pending<u64, ResponseChannel<DialBackResponse>>,
    next_stream: u64,
    /// This node's requests waiting for their result.
    calls: Pending<OutboundRequestId, Reply<DialBackResponse>>,
    /// When each peer was last served a dial-back.
    served: HashMap<PeerId, Instant>,
}

impl DialBacks {
    /// Asks `peer` (connected) to dial this node back; the result comes as an event.
    pub fn send(&mut self, ctx: &mut Context, peer: PeerId, request: DialBackRequest, reply: Reply<DialBackResponse>) {
        let id = ctx.swarm.behaviour_mut().dialback.send_request(&peer, request);
        self.calls.insert(id, peer, reply);
    }

    /// The probes for served request `id` are done.
    pub fn respond(&mut self, ctx: &mut Context, id: u64, response: DialBackResponse) {
        if let Some((_, channel)) = self.streams.take(&id) {
            let _ = ctx.swarm.behaviour_mut().dialback.send_response(channel, response);
        }
    }

    /// Forgets streams whose asker went away and peers whose interval has passed.
    pub fn forget_stale(&mut self) {
        self.streams.retain(|channel| channel.is_open());
        self.forget_served();
    }

    /// Forgets peers whose interval has passed (also on every disconnect, so the map stays
    /// bounded by recent askers).
    pub fn forget_served(&mut self) {
        self.served.retain(|_, at| at.elapsed() < DIALBACK_MIN_INTERVAL);
    }

    /// Peers with a dial-back in flight either way (not to be trimmed).
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.streams.peers().chain(self.calls.peers())
    }

    pub fn on_event(
        &mut self,
        ctx: &mut Context,
        connections: &Connections,
        event: request_response::Event<DialBackRequest, DialBackResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, connection_id, message } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    self.serve(ctx, connections, peer, connection_id, request, channel)
                }
                request_response::Message::Response { request_id, response } => {
                    self.calls.answer(&request_id, Ok(response));
                }
            },
            request_response::Event::OutboundFailure { peer, request_id, error, .. } => {
                self.calls.answer(&request_id, Err(NetworkError::DialBack { peer, reason: error.to_string() }));
            }
            _ => {}
        }
    }

    /// Dials the asking peer back on the ports it named, at the IP its connection comes
    /// from and nowhere else, once per peer per `DIALBACK_MIN_INTERVAL`. The probes run in
    /// their own task and answer through the command channel.
    fn serve(
        &mut self,
        ctx: &mut Context,
        connections: &Connections,
        peer: PeerId,
        connection: ConnectionId,
        request: DialBackRequest,
        channel: ResponseChannel<DialBackResponse>,
    ) {
        let refuse = |ctx: &mut Context, reason: String, channel| {
            ctx.metrics.throttled("dialback");
            let _ = ctx.swarm.behaviour_mut().dialback.send_response(channel, DialBackResponse::Refused { reason });
        };
        let now = Instant::now();
        if self.served.get(&peer).is_some_and(|at| now.duration_since(*at) < DIALBACK_MIN_INTERVAL) {
            return refuse(ctx, format!("one dial-back per {} s", DIALBACK_MIN_INTERVAL.as_secs()), channel);
        }
        let Some(ip) = connections.remote_addr(&connection).and_then(dialback::ip_of) else {
            return refuse(ctx, "this connection has no IP address to dial back".into(), channel);
        };
        let ports = match dialback::admissible(&request, ip) {
            Ok(p) => p,
            Err(reason) => return refuse(ctx, reason, channel),
        };
        self.served.insert(peer, now);
        let id = self.next_stream;
        self.next_stream += 1;
        self.streams.insert(id, peer, channel);
        let tx = ctx.self_tx.clone();
        tokio::spawn(async move {
            let ports = dialback::probe(ip, &ports).await;
            let response = DialBackResponse::Result { observed_ip: ip.to_string(), ports };
            let _ = tx.send(Command::DialBackRespond { id, response }).await;
        });
    }
}
