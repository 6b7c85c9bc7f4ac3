//! Gossipsub's topics, configuration and scoring, kept apart from logic (its timing and
//! sizes are in `tuning.rs`).
//!
//! Adverts carry their own signatures, so gossip runs anonymous with content-hash message
//! ids: the same advert relayed by many peers is one message. `validate_messages` holds
//! every message until the node has checked it: nothing is forwarded unverified.

use libp2p::gossipsub::{
    self, IdentTopic, MessageAuthenticity, MessageId, PeerScoreParams, PeerScoreThresholds, TopicScoreParams,
    ValidationMode,
};
use sha2::{Digest, Sha256};

use super::tuning;

pub const ADVERT_TOPIC: &str = "peervm/adverts/v1";

pub fn advert_topic() -> IdentTopic {
    IdentTopic::new(ADVERT_TOPIC)
}

/// Signed block lists (`protocol::blocklist`): relayed by every node, applied only by the
/// nodes that trust their signer.
pub const BLOCKLIST_TOPIC: &str = "peervm/blocklists/v1";

pub fn blocklist_topic() -> IdentTopic {
    IdentTopic::new(BLOCKLIST_TOPIC)
}

pub fn behaviour() -> Result<gossipsub::Behaviour, String> {
    let config = gossipsub::ConfigBuilder::default()
        .validation_mode(ValidationMode::Anonymous)
        .validate_messages()
        .message_id_fn(|m: &gossipsub::Message| MessageId::from(Sha256::digest(&m.data).to_vec()))
        .heartbeat_interval(tuning::GOSSIP_HEARTBEAT)
        .max_transmit_size(tuning::GOSSIP_MAX_TRANSMIT)
        .duplicate_cache_time(tuning::GOSSIP_DUPLICATE_CACHE)
        .forward_queue_duration(tuning::GOSSIP_QUEUE_PATIENCE)
        .publish_queue_duration(tuning::GOSSIP_QUEUE_PATIENCE)
        .build()
        .map_err(|e| format!("gossipsub config: {e}"))?;
    let mut gs = gossipsub::Behaviour::new(MessageAuthenticity::Anonymous, config)?;
    gs.with_peer_score(score_params(), score_thresholds())?;
    Ok(gs)
}

/// Invalid deliveries (Reject) count quadratically: -10, -40, -90, -160, then -250 after
/// the fifth, past the graylist threshold. The node's own ban (after the third, see
/// `rate_limit.rs`) disconnects the peer before gossipsub stops listening to it.
fn score_params() -> PeerScoreParams {
    let mut params = PeerScoreParams {
        // Many honest peers can share one address (a NAT, a data centre, a test bed on
        // loopback); the default colocation penalty would graylist them all. Sybils are
        // handled by per-peer rate limits and bans instead.
        ip_colocation_factor_weight: 0.0,
        ..PeerScoreParams::default()
    };
    let topic = TopicScoreParams {
        topic_weight: 1.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.9,
        // Mesh delivery rate scoring needs a steady message rate, which adverts do not have.
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        ..TopicScoreParams::default()
    };
    params.topics.insert(advert_topic().hash(), topic.clone());
    params.topics.insert(blocklist_topic().hash(), topic);
    params
}

fn score_thresholds() -> PeerScoreThresholds {
    PeerScoreThresholds {
        gossip_threshold: -50.0,
        publish_threshold: -100.0,
        graylist_threshold: -200.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 3.0,
    }
}
