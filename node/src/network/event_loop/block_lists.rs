//! Signed block lists (docs/protocol.md, section 7a; SECURITY.md, "Reachability, block
//! lists, owners"): every node holds and relays each signer's newest valid list, and
//! applies only the lists of the signers its operator trusts. Also the operator's own
//! advert blocks, which a list dropping a provider does not lift.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use libp2p::gossipsub::{MessageAcceptance, PublishError};
use peervm_protocol::{BlockList, Signed, Verified};

use super::context::Context;
use crate::clock::now_unix_ms;
use crate::network::gossip_params::blocklist_topic;
use crate::network::rate_limit::Api;
use crate::network::sync::Envelope;
use crate::network::tuning::{MAX_HELD_BLOCK_LISTS, OWN_BLOCK_LIST_EVERY, SYNC_MAX_LIST_BYTES};
use crate::network::{ListBlocked, NetworkError};

pub(super) struct BlockLists {
    /// Signers whose block lists this node applies.
    trusted: HashSet<PeerId>,
    /// The newest valid block list of each signer (relayed, served by sync).
    held: HashMap<PeerId, Verified<BlockList>>,
    /// The union of the trusted lists' entries, shared with the lease manager.
    list_blocked: ListBlocked,
    /// Providers the operator blocked itself (a list dropping one does not unblock it).
    operator_blocks: HashSet<PeerId>,
    /// This node's own published list, re-gossiped now and then.
    own: Option<Vec<u8>>,
}

impl BlockLists {
    pub fn new(trusted: HashSet<PeerId>, list_blocked: ListBlocked) -> Self {
        Self { trusted, held: HashMap::new(), list_blocked, operator_blocks: HashSet::new(), own: None }
    }

    /// A gossiped block list: relayed when its signature, checks and seq hold, whoever
    /// signed it; applied only when this node trusts the signer.
    pub fn validate(&mut self, ctx: &mut Context, source: PeerId, data: &[u8]) -> MessageAcceptance {
        if !ctx.admit(source, Api::Gossip) {
            return MessageAcceptance::Ignore;
        }
        match Signed::<BlockList>::open(data) {
            Ok(list) if list.body().check(now_unix_ms()).is_ok() => {
                if self.accept(ctx, list) {
                    MessageAcceptance::Accept
                } else {
                    MessageAcceptance::Ignore
                }
            }
            Ok(_) => {
                ctx.metrics.rejected("block_list");
                MessageAcceptance::Reject
            }
            Err(e) => {
                ctx.metrics.rejected("block_list");
                if e.is_misbehaviour() {
                    ctx.invalid(source, Api::Gossip);
                    MessageAcceptance::Reject
                } else {
                    MessageAcceptance::Ignore
                }
            }
        }
    }

    /// The lists on a sync page (at most `MAX_HELD_BLOCK_LISTS` looked at): each kept when
    /// valid and newer, as if gossiped.
    pub fn accept_from_sync(&mut self, ctx: &mut Context, lists: &[Envelope]) {
        for env in lists.iter().take(MAX_HELD_BLOCK_LISTS) {
            match Signed::<BlockList>::open(&env.0) {
                Ok(list) if list.body().check(now_unix_ms()).is_ok() => {
                    self.accept(ctx, list);
                }
                _ => ctx.metrics.rejected("block_list"),
            }
        }
    }

    /// The held lists for the first page of a sync reply, up to `SYNC_MAX_LIST_BYTES`.
    pub fn for_sync(&self) -> Vec<Envelope> {
        let mut lists = Vec::new();
        let mut bytes = 0;
        for list in self.held.values() {
            let b = list.to_bytes();
            bytes += b.len();
            if bytes > SYNC_MAX_LIST_BYTES {
                break;
            }
            lists.push(Envelope(b));
        }
        lists
    }

    /// Holds, applies when trusted, and gossips this node's own list.
    pub fn publish_own(&mut self, ctx: &mut Context, list: Verified<BlockList>) -> Result<(), NetworkError> {
        let bytes = list.to_bytes();
        self.accept(ctx, list);
        self.own = Some(bytes.clone());
        match ctx.swarm.behaviour_mut().gossipsub.publish(blocklist_topic(), bytes) {
            Ok(_) | Err(PublishError::Duplicate) | Err(PublishError::NoPeersSubscribedToTopic) => Ok(()),
            Err(e) => Err(NetworkError::Publish(e.to_string())),
        }
    }

    /// Re-gossips the own list every `OWN_BLOCK_LIST_EVERY` slow ticks.
    pub fn regossip_own(&self, ctx: &mut Context, slow_ticks: u64) {
        if slow_ticks.is_multiple_of(OWN_BLOCK_LIST_EVERY)
            && let Some(bytes) = self.own.clone()
        {
            let _ = ctx.swarm.behaviour_mut().gossipsub.publish(blocklist_topic(), bytes);
        }
    }

    /// The operator changed whom it trusts (config reload): the held lists are re-applied
    /// under the new set, so a signer no longer trusted stops blocking anyone now.
    pub fn set_trusted(&mut self, ctx: &Context, trusted: HashSet<PeerId>) {
        self.trusted = trusted;
        self.apply_trusted(ctx);
    }

    /// The operator stops storing, showing and forwarding `peer`'s adverts.
    pub fn block_adverts(&mut self, ctx: &Context, peer: PeerId) {
        self.operator_blocks.insert(peer);
        ctx.store().block(peer);
    }

    /// The operator lifts its own advert block; a trusted list naming `peer` still holds.
    pub fn unblock_adverts(&mut self, ctx: &Context, peer: PeerId) {
        self.operator_blocks.remove(&peer);
        if !self.is_list_blocked(&peer) {
            ctx.store().unblock(&peer);
        }
    }

    /// The operator unblocks `peer` as a peer (`NodeClient::unblock_peer`): the same as
    /// lifting its advert block, so a trusted list naming `peer` still holds.
    pub fn unblock_peer_adverts(&mut self, ctx: &Context, peer: PeerId) {
        self.unblock_adverts(ctx, peer);
    }

    fn is_list_blocked(&self, peer: &PeerId) -> bool {
        self.list_blocked.read().map(|s| s.contains(peer)).unwrap_or(false)
    }

    /// Keeps `list` if it is its signer's newest (at most `MAX_HELD_BLOCK_LISTS` signers
    /// are held), and re-applies the trusted lists. False when it was not kept.
    fn accept(&mut self, ctx: &Context, list: Verified<BlockList>) -> bool {
        let signer = list.body().signer;
        let newer = self.held.get(&signer).is_none_or(|held| list.body().seq > held.body().seq);
        if !newer || (!self.held.contains_key(&signer) && self.held.len() >= MAX_HELD_BLOCK_LISTS) {
            return false;
        }
        self.held.insert(signer, list);
        if self.trusted.contains(&signer) {
            self.apply_trusted(ctx);
        }
        true
    }

    fn apply_trusted(&mut self, ctx: &Context) {
        let now: HashSet<PeerId> = self
            .held
            .iter()
            .filter(|(signer, _)| self.trusted.contains(*signer))
            .flat_map(|(_, list)| list.body().entries.iter().map(|e| e.peer))
            .collect();
        let before = self.list_blocked.read().map(|s| s.clone()).unwrap_or_default();
        for peer in now.difference(&before) {
            tracing::info!(%peer, "blocked by a trusted block list");
            ctx.store().block(*peer);
        }
        for peer in before.difference(&now) {
            if !self.operator_blocks.contains(peer) {
                ctx.store().unblock(peer);
            }
        }
        if let Ok(mut shared) = self.list_blocked.write() {
            *shared = now;
        }
    }
}
