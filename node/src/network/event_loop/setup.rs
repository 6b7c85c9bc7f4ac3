//! Building the swarm (transports, behaviour, Kademlia mode, topics) and starting its
//! listeners, before the event loop takes it over.

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, kad, tcp};

use crate::metrics::Metrics;
use crate::network::behaviour::PeervmBehaviour;
use crate::network::gossip_params::{advert_topic, blocklist_topic};
use crate::network::tuning::{IDLE_CONNECTION_TIMEOUT, LISTEN_DEADLINE, LISTEN_SETTLE};
use crate::network::wire_bytes::counted_tcp;
use crate::network::{NetworkError, NodeConfig, Role, with_peer_id};

/// The swarm for `config`: TCP + Noise + Yamux, QUIC and DNS; Kademlia in server mode on
/// bootstraps and providers (reachable by design), client mode on one-shot requestors;
/// subscribed to the advert and block-list topics. TCP bytes on the wire are counted into
/// `metrics` (`wire_bytes.rs`).
pub(super) fn build_swarm(config: &NodeConfig, metrics: &Metrics) -> Result<Swarm<PeervmBehaviour>, NetworkError> {
    let keypair = config.key.to_libp2p_keypair();
    let serve_leases = config.lease_inbox.is_some();
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_quic()
        .with_other_transport(|key| {
            counted_tcp(
                key,
                tcp::Config::default().nodelay(true),
                metrics.wire_received_bytes.clone(),
                metrics.wire_sent_bytes.clone(),
            )
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        })
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_dns()
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_behaviour(|key| {
            PeervmBehaviour::new(key, &config.caps, config.keepalive, serve_leases, dial_budget(config))
        })
        .map_err(|e| NetworkError::Build(e.to_string()))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT))
        .build();

    swarm.behaviour_mut().kad.set_mode(Some(match config.role {
        Role::Bootstrap | Role::Provider => kad::Mode::Server,
        Role::Requestor => kad::Mode::Client,
    }));
    swarm.behaviour_mut().gossipsub.subscribe(&advert_topic()).map_err(|e| NetworkError::Build(e.to_string()))?;
    swarm.behaviour_mut().gossipsub.subscribe(&blocklist_topic()).map_err(|e| NetworkError::Build(e.to_string()))?;
    Ok(swarm)
}

/// The connections a node's peer discovery may take it to (`dial_budget.rs`): its target.
/// Not its trim mark (twice the target): walks that filled every node to the trim mark
/// left no room for the connections others open to it, so nodes crossed the mark, trimmed
/// down to the target, and walked back up, in a cycle that kept a 500-node swarm's CPU
/// busy (BENCHMARKS.md, "Large simulated swarm").
fn dial_budget(config: &NodeConfig) -> usize {
    config.target_peers
}

/// Starts every listener and waits until each has reported its addresses, so the caller
/// can print full dialable multiaddrs at start.
pub(super) async fn listen(
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
    let deadline = tokio::time::sleep(LISTEN_DEADLINE);
    tokio::pin!(deadline);
    // After the last listener reports, give wildcard listeners a moment to report every
    // interface address.
    let mut settle: Option<std::pin::Pin<Box<tokio::time::Sleep>>> =
        if waiting.is_empty() { Some(Box::pin(tokio::time::sleep(std::time::Duration::ZERO))) } else { None };
    loop {
        tokio::select! {
            event = swarm.select_next_some() => match event {
                SwarmEvent::NewListenAddr { listener_id, address } => {
                    out.push(with_peer_id(&address, peer_id));
                    waiting.remove(&listener_id);
                    if waiting.is_empty() && settle.is_none() {
                        settle = Some(Box::pin(tokio::time::sleep(LISTEN_SETTLE)));
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
                let reason = format!("no address reported within {} s", LISTEN_DEADLINE.as_secs());
                return Err(NetworkError::Listen { addr, reason });
            }
        }
    }
    Ok(out)
}
