//! A bare libp2p gossipsub peer for the swarm tests: no validation, no Kademlia, one
//! connection to the node it is pointed at. It publishes whatever bytes it is given,
//! unchecked (a malicious peer), and keeps every message it receives (an observer of
//! what that node forwards). Gossipsub sends a node's messages to one neighbour in the
//! order it forwards them, so once the observer has heard a message the node forwarded,
//! it has heard everything the node forwarded before it.

#![allow(dead_code, reason = "a module of several test binaries, each using part of it")]

use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, PublishError, ValidationMode};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, noise, tcp, yamux};
use tokio::sync::mpsc;

pub struct RawGossipPeer {
    pub peer_id: PeerId,
    publish: mpsc::Sender<(IdentTopic, Vec<u8>)>,
    closed: mpsc::Receiver<()>,
    heard: mpsc::Receiver<Vec<u8>>,
    /// Every message received so far, in order.
    pub seen: Vec<Vec<u8>>,
}

impl RawGossipPeer {
    /// Connects to `target` and subscribes to `topics`.
    pub async fn connect(target: Multiaddr, topics: &[&str]) -> RawGossipPeer {
        let mut swarm = libp2p::SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_tcp(tcp::Config::default(), noise::Config::new, yamux::Config::default)
            .expect("tcp")
            .with_behaviour(|_| {
                let config = gossipsub::ConfigBuilder::default()
                    .validation_mode(ValidationMode::Anonymous)
                    .heartbeat_interval(Duration::from_millis(500))
                    .message_id_fn(|m: &gossipsub::Message| {
                        gossipsub::MessageId::from(<sha2::Sha256 as sha2::Digest>::digest(&m.data).to_vec())
                    })
                    .build()
                    .expect("gossipsub config");
                gossipsub::Behaviour::<gossipsub::IdentityTransform>::new(MessageAuthenticity::Anonymous, config)
                    .expect("gossipsub")
            })
            .expect("behaviour")
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        for topic in topics {
            swarm.behaviour_mut().subscribe(&IdentTopic::new(*topic)).expect("subscribe");
        }
        swarm.dial(target).expect("dial");
        let peer_id = *swarm.local_peer_id();
        let (publish, mut to_publish) = mpsc::channel::<(IdentTopic, Vec<u8>)>(256);
        let (closed_tx, closed) = mpsc::channel(1);
        let (heard_tx, heard) = mpsc::channel(4096);
        tokio::spawn(async move {
            let mut queue: Vec<(IdentTopic, Vec<u8>)> = Vec::new();
            let mut retry = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    ev = swarm.select_next_some() => match ev {
                        SwarmEvent::ConnectionClosed { num_established: 0, .. } => {
                            let _ = closed_tx.try_send(());
                        }
                        SwarmEvent::Behaviour(gossipsub::Event::Message { message, .. }) => {
                            let _ = heard_tx.try_send(message.data);
                        }
                        _ => {}
                    },
                    msg = to_publish.recv() => match msg { Some(m) => queue.push(m), None => return },
                    _ = retry.tick() => {
                        // Publishing fails until the node's subscription has arrived; the
                        // queue keeps the order in which messages were given.
                        while let Some((topic, bytes)) = queue.first().cloned() {
                            match swarm.behaviour_mut().publish(topic, bytes) {
                                Ok(_) | Err(PublishError::Duplicate) => { queue.remove(0); }
                                Err(_) => break,
                            }
                        }
                    }
                }
            }
        });
        RawGossipPeer { peer_id, publish, closed, heard, seen: Vec::new() }
    }

    /// Queues `bytes` for publishing on `topic`, unchecked, after everything queued before.
    pub async fn publish(&self, topic: &str, bytes: Vec<u8>) {
        self.publish.send((IdentTopic::new(topic), bytes)).await.expect("raw peer task runs");
    }

    /// Waits until a message for which `want` holds has been received; false if none came
    /// before `deadline` (a hang guard, not a verdict on speed).
    pub async fn hear(&mut self, deadline: Duration, want: impl Fn(&[u8]) -> bool) -> bool {
        if self.seen.iter().any(|m| want(m)) {
            return true;
        }
        let heard = &mut self.heard;
        let seen = &mut self.seen;
        tokio::time::timeout(deadline, async {
            while let Some(m) = heard.recv().await {
                let found = want(&m);
                seen.push(m);
                if found {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap_or(false)
    }

    /// Whether any message received so far satisfies `pred`.
    pub fn heard_any(&mut self, pred: impl Fn(&[u8]) -> bool) -> bool {
        while let Ok(m) = self.heard.try_recv() {
            self.seen.push(m);
        }
        self.seen.iter().any(|m| pred(m))
    }

    /// Waits until the node closed the connection; false if it did not before `deadline`.
    pub async fn disconnected(&mut self, deadline: Duration) -> bool {
        tokio::time::timeout(deadline, self.closed.recv()).await.is_ok_and(|r| r.is_some())
    }
}
