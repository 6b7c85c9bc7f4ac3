//! Gossip of adverts (docs/architecture.md, "Gossip"): every message is held until it is
//! checked, and only an advert the store took is forwarded (SECURITY.md, invariant 1).
//! Messages on the block-list topic go to `block_lists`.

use libp2p::PeerId;
use libp2p::gossipsub::{self, MessageAcceptance, PublishError};
use peervm_protocol::{Advertisement, Signed, Verified};

use super::block_lists::BlockLists;
use super::context::Context;
use crate::clock::now_unix_ms;
use crate::network::gossip_params::{advert_topic, blocklist_topic};
use crate::network::rate_limit::Api;
use crate::network::{NetworkError, NodeEvent};

#[derive(Default)]
pub(super) struct Gossip {
    /// The node's own advert, waiting for a subscriber.
    pending_publish: Option<Vec<u8>>,
}

impl Gossip {
    /// Stores the node's own advert and gossips it; with nobody subscribed yet, it goes out
    /// when a peer subscribes (peers that connect meanwhile get it by sync).
    pub fn publish(&mut self, ctx: &mut Context, advert: Verified<Advertisement>) -> Result<(), NetworkError> {
        let bytes = advert.to_bytes();
        let now = now_unix_ms();
        ctx.store().insert(advert, now).map_err(|e| NetworkError::Publish(e.to_string()))?;
        match ctx.swarm.behaviour_mut().gossipsub.publish(advert_topic(), bytes.clone()) {
            Ok(_) => {
                self.pending_publish = None;
                Ok(())
            }
            Err(PublishError::NoPeersSubscribedToTopic) | Err(PublishError::AllQueuesFull(_)) => {
                self.pending_publish = Some(bytes);
                Ok(())
            }
            Err(PublishError::Duplicate) => Ok(()),
            Err(e) => Err(NetworkError::Publish(e.to_string())),
        }
    }

    pub fn on_event(&mut self, ctx: &mut Context, block_lists: &mut BlockLists, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message { propagation_source: source, message_id, message } => {
                let acceptance = if message.topic == blocklist_topic().hash() {
                    block_lists.validate(ctx, source, &message.data)
                } else {
                    validate_advert(ctx, source, &message.data)
                };
                ctx.swarm.behaviour_mut().gossipsub.report_message_validation_result(&message_id, &source, acceptance);
            }
            gossipsub::Event::SlowPeer { failed_messages, .. } => {
                let dropped = failed_messages.priority + failed_messages.non_priority;
                ctx.metrics.gossip_dropped_for_slow_peers.inc_by(dropped as u64);
            }
            gossipsub::Event::Subscribed { .. } => {
                if let Some(bytes) = self.pending_publish.clone() {
                    match ctx.swarm.behaviour_mut().gossipsub.publish(advert_topic(), bytes) {
                        Ok(_) | Err(PublishError::Duplicate) => self.pending_publish = None,
                        Err(_) => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// The accept rule for a gossiped advert (docs/protocol.md, section 4): Accept forwards,
/// Reject penalises the sender, Ignore drops quietly. Nothing is forwarded before this
/// returns Accept, and only what the store took is accepted.
fn validate_advert(ctx: &mut Context, source: PeerId, data: &[u8]) -> MessageAcceptance {
    if !ctx.admit(source, Api::Gossip) {
        return MessageAcceptance::Ignore;
    }
    let advert = match Signed::<Advertisement>::open(data) {
        Ok(a) => a,
        Err(e) => {
            ctx.metrics.rejected(if e.is_misbehaviour() { "bad_signature" } else { "version" });
            if e.is_misbehaviour() {
                ctx.invalid(source, Api::Gossip);
                return MessageAcceptance::Reject;
            }
            return MessageAcceptance::Ignore;
        }
    };
    let (provider, seq) = (advert.body().provider, advert.body().seq);
    let result = ctx.store().insert(advert, now_unix_ms());
    match result {
        Ok(outcome) => {
            ctx.metrics.adverts_accepted.inc();
            ctx.emit(NodeEvent::AdvertStored { provider, seq, outcome, at: std::time::Instant::now() });
            MessageAcceptance::Accept
        }
        Err(e) => {
            ctx.metrics.rejected(e.reason());
            if e.is_misbehaviour() {
                ctx.invalid(source, Api::Gossip);
                MessageAcceptance::Reject
            } else {
                MessageAcceptance::Ignore
            }
        }
    }
}
