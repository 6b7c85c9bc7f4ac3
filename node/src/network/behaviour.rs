//! The node's libp2p behaviour: one field per concern. Tuning lives in `tuning.rs` and
//! `gossip_params.rs`; protocol logic lives in the event loop's modules.

use libp2p::swarm::NetworkBehaviour;
use libp2p::{StreamProtocol, allow_block_list, connection_limits, gossipsub, identify, kad, ping, request_response};

use super::dial_budget;
use super::dialback::{self, DialBackRequest, DialBackResponse};
use super::gossip_params;
use super::lease_wire::{self, Envelope, LeaseMessage};
use super::refresh_wire::{self, RefreshRequest, RefreshResponse};
use super::sync::{self, SyncRequest, SyncResponse};
use super::tuning;

pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/kad/1.0.0");
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/peervm/1.0.0";

#[derive(NetworkBehaviour)]
pub struct PeervmBehaviour {
    /// Refuses banned and blocked peers before anything else sees them.
    pub blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub limits: connection_limits::Behaviour,
    /// Refuses the dials of peer discovery beyond the node's budget of connections.
    pub dial_budget: dial_budget::Behaviour,
    pub gossipsub: gossipsub::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub sync: request_response::cbor::Behaviour<SyncRequest, SyncResponse>,
    /// `/peervm/refresh/1`: batches of refresh tokens, served by every node.
    pub refresh: request_response::cbor::Behaviour<RefreshRequest, RefreshResponse>,
    /// `/peervm/lease/1`: served by providers, used by requestors.
    pub lease: request_response::cbor::Behaviour<LeaseMessage, Envelope>,
    /// `/peervm/dialback/1`: port verification, served by every node.
    pub dialback: request_response::cbor::Behaviour<DialBackRequest, DialBackResponse>,
}

/// Connection limits (docs/architecture.md, "The swarm"): enough for a well-connected node,
/// bounded so a crowd of peers cannot exhaust file descriptors or memory. Defaults and
/// their reasons are in `tuning.rs`.
#[derive(Debug, Clone)]
pub struct ConnectionCaps {
    pub max_established: u32,
    pub max_per_peer: u32,
    pub max_pending_incoming: u32,
}

impl Default for ConnectionCaps {
    fn default() -> Self {
        Self {
            max_established: tuning::MAX_ESTABLISHED,
            max_per_peer: tuning::MAX_PER_PEER,
            max_pending_incoming: tuning::MAX_PENDING_INCOMING,
        }
    }
}

impl PeervmBehaviour {
    pub fn new(
        key: &libp2p::identity::Keypair,
        caps: &ConnectionCaps,
        keepalive: super::Keepalive,
        serve_leases: bool,
        dial_budget: usize,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(caps.max_established))
            .with_max_established_per_peer(Some(caps.max_per_peer))
            .with_max_pending_incoming(Some(caps.max_pending_incoming));

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config.set_query_timeout(tuning::KAD_QUERY_TIMEOUT);
        // The event loop walks the DHT on its own timer, when it has too few peers (and
        // every 5 min). Kademlia still walks by itself while its routing table has fewer
        // than 20 entries; `dial_budget` keeps any walk from connecting the node to more
        // peers than it trims down to.
        kad_config.set_periodic_bootstrap_interval(None);
        let kad = kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);

        let sync_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(tuning::SYNC_MAX_REQUEST_BYTES)
            .set_response_size_maximum(tuning::SYNC_MAX_RESPONSE_BYTES);
        let sync = request_response::Behaviour::with_codec(
            sync_codec,
            [(sync::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(tuning::SYNC_REQUEST_TIMEOUT),
        );

        let refresh_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(tuning::REFRESH_MAX_REQUEST_BYTES)
            .set_response_size_maximum(tuning::REFRESH_MAX_RESPONSE_BYTES);
        let refresh = request_response::Behaviour::with_codec(
            refresh_codec,
            [(refresh_wire::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(tuning::REFRESH_REQUEST_TIMEOUT),
        );

        let lease_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(tuning::LEASE_MAX_REQUEST_BYTES)
            .set_response_size_maximum(tuning::LEASE_MAX_RESPONSE_BYTES);
        let lease_support = if serve_leases {
            request_response::ProtocolSupport::Full
        } else {
            request_response::ProtocolSupport::Outbound
        };
        let lease = request_response::Behaviour::with_codec(
            lease_codec,
            [(lease_wire::PROTOCOL, lease_support)],
            request_response::Config::default()
                .with_request_timeout(tuning::LEASE_REQUEST_TIMEOUT)
                .with_max_concurrent_streams(tuning::LEASE_MAX_CONCURRENT_STREAMS),
        );

        let dialback_codec = request_response::cbor::codec::Codec::default()
            .set_request_size_maximum(tuning::DIALBACK_MAX_REQUEST_BYTES)
            .set_response_size_maximum(tuning::DIALBACK_MAX_RESPONSE_BYTES);
        let dialback = request_response::Behaviour::with_codec(
            dialback_codec,
            [(dialback::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default().with_request_timeout(tuning::DIALBACK_REQUEST_TIMEOUT),
        );

        Ok(Self {
            blocked: allow_block_list::Behaviour::default(),
            limits: connection_limits::Behaviour::new(limits),
            dial_budget: dial_budget::Behaviour::new(dial_budget),
            gossipsub: gossip_params::behaviour()?,
            kad,
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL_VERSION.into(), key.public())
                    .with_agent_version(format!("peervm/{}", env!("CARGO_PKG_VERSION"))),
            ),
            // A failed ping closes the connection (event loop).
            ping: ping::Behaviour::new(
                ping::Config::new().with_interval(keepalive.interval).with_timeout(keepalive.timeout),
            ),
            sync,
            refresh,
            lease,
            dialback,
        })
    }
}
