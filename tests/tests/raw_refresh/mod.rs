//! A bare libp2p peer that speaks only `/peervm/refresh/1` (docs/protocol.md, section 9a)
//! and sends whatever records it is given, unchecked: a malicious or broken relay. One
//! connection, to the node it is pointed at.

use std::time::Duration;

use futures::StreamExt;
use libp2p::Multiaddr;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::SwarmEvent;
use peervm_node::network::peer_id_of;
use peervm_node::network::refresh_wire::{PROTOCOL, RefreshRequest, RefreshResponse};
use peervm_node::network::sync::Envelope;
use peervm_tests::bare_swarm;
use tokio::sync::{mpsc, oneshot};

type Ask = (Vec<u8>, oneshot::Sender<Option<RefreshResponse>>);

pub struct RawRefreshPeer {
    ask: mpsc::Sender<Ask>,
    closed: mpsc::Receiver<()>,
}

impl RawRefreshPeer {
    /// Connects to `target` (an address with its `/p2p` part).
    pub async fn connect(target: Multiaddr) -> RawRefreshPeer {
        let mut swarm = bare_swarm(request_response::cbor::Behaviour::<RefreshRequest, RefreshResponse>::new(
            [(PROTOCOL, ProtocolSupport::Outbound)],
            request_response::Config::default(),
        ));
        let target_peer = peer_id_of(&target).expect("the target address names its peer");
        swarm.dial(target).expect("dial");
        let (ask, mut asks) = mpsc::channel::<Ask>(16);
        let (closed_tx, closed) = mpsc::channel(1);
        tokio::spawn(async move {
            let mut waiting = std::collections::HashMap::new();
            loop {
                tokio::select! {
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                            let _ = closed_tx.try_send(());
                        }
                        SwarmEvent::Behaviour(request_response::Event::Message {
                            message: request_response::Message::Response { request_id, response }, ..
                        }) => {
                            if let Some(reply) = waiting.remove(&request_id) {
                                let _: Result<(), _> = oneshot::Sender::send(reply, Some(response));
                            }
                        }
                        SwarmEvent::Behaviour(request_response::Event::OutboundFailure { request_id, .. }) => {
                            if let Some(reply) = waiting.remove(&request_id) {
                                let _: Result<(), _> = oneshot::Sender::send(reply, None);
                            }
                        }
                        _ => {}
                    },
                    asked = asks.recv() => match asked {
                        Some((records, reply)) => {
                            let request = RefreshRequest { version: 1, records: Envelope(records) };
                            let id = swarm.behaviour_mut().send_request(&target_peer, request);
                            waiting.insert(id, reply);
                        }
                        None => return,
                    },
                }
            }
        });
        RawRefreshPeer { ask, closed }
    }

    /// Sends one request carrying `records` (concatenated 24-byte records, or anything
    /// else) and waits for the answer: None when the stream failed or was dropped.
    pub async fn send(&self, records: Vec<u8>) -> Option<RefreshResponse> {
        let (tx, rx) = oneshot::channel();
        self.ask.send((records, tx)).await.ok()?;
        rx.await.ok().flatten()
    }

    /// Waits until the node closed the connection; false if it did not before `deadline`
    /// (a hang guard, not a verdict on speed).
    pub async fn disconnected(&mut self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.closed.recv()).await.is_ok_and(|r| r.is_some())
    }
}
