//! A bare libp2p peer that speaks only `/peervm/sync/1`, as a server: it answers every
//! request with one fixed page and keeps the requests it got, in the order they came, so
//! a test can see what a node asked for (a full sync, a filtered query, a fetch by id)
//! and can serve it a page no honest node would.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use libp2p::Multiaddr;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use peervm_node::network::sync::{PROTOCOL, SyncRequest, SyncResponse};

use crate::bare_swarm::bare_swarm;

/// The requests a [`recording_sync_server`] got, oldest first.
pub type Requests = Arc<Mutex<Vec<SyncRequest>>>;

/// Starts the server on a fresh loopback port; returns its address (with `/p2p`) and its
/// requests.
pub async fn recording_sync_server(page: SyncResponse) -> (Multiaddr, Requests) {
    let mut swarm = bare_swarm(request_response::cbor::Behaviour::<SyncRequest, SyncResponse>::new(
        [(PROTOCOL, ProtocolSupport::Inbound)],
        request_response::Config::default(),
    ));
    let peer = *swarm.local_peer_id();
    swarm.listen_on("/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")).expect("listen");
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = swarm.select_next_some().await {
            break address;
        }
    };
    let requests = Requests::default();
    let seen = requests.clone();
    tokio::spawn(async move {
        loop {
            if let SwarmEvent::Behaviour(request_response::Event::Message {
                message: request_response::Message::Request { request, channel, .. },
                ..
            }) = swarm.select_next_some().await
            {
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(request);
                let _ = swarm.behaviour_mut().send_response(channel, page.clone());
            }
        }
    });
    (addr.with(libp2p::multiaddr::Protocol::P2p(peer)), requests)
}
