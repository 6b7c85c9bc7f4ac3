//! `/peervm/refresh/1` in both directions (docs/protocol.md, sections 4a and 9a): refresh
//! tokens that keep adverts live without re-signing them. A record is checked by the
//! store before anything else happens to it, and only a record the store accepted (it
//! raised the token held for an advert) is queued for the node's mesh peers (SECURITY.md,
//! invariant 1, as for gossip). Queues are flushed once a second, one request per peer.

use std::collections::HashMap;
use std::time::Instant;

use libp2p::PeerId;
use libp2p::request_response;
use peervm_protocol::refresh::{decode_batch, encode_batch};
use peervm_protocol::{IgnoreReason, MAX_BATCH_RECORDS, RefreshOutcome, RefreshRecord};

use super::context::Context;
use crate::clock::now_unix_ms;
use crate::network::gossip_params::advert_topic;
use crate::network::rate_limit::Api;
use crate::network::refresh_wire::{RefreshRequest, RefreshResponse};
use crate::network::sync::{Envelope, MAX_FETCH_IDS};
use crate::network::tuning::{MAX_FETCHED_IDS, MAX_INVALID_COUNTED_PER_REFRESH, MAX_MISSING_IDS, MISSING_REFETCH};
use crate::network::{NetworkError, NodeEvent};

pub(super) struct Refreshes {
    /// Whether unknown ids are fetched at all (`NodeConfig::fetch_missing_adverts`).
    fetch_missing: bool,
    /// Per peer, the records waiting for the next flush: one per advert id, the newest.
    queues: HashMap<PeerId, HashMap<[u8; 6], RefreshRecord>>,
    /// Ids of records a peer sent that name no advert this node holds (it missed the
    /// advert's gossip), with that peer: fetched from it at the next flush.
    missing: HashMap<[u8; 6], PeerId>,
    /// When each id was last fetched: not again within `MISSING_REFETCH`, so that tokens
    /// of an advert this node refuses (blocked, expired) cost one fetch per interval.
    fetched: HashMap<[u8; 6], Instant>,
}

impl Refreshes {
    pub fn new(fetch_missing: bool) -> Self {
        Refreshes { fetch_missing, queues: HashMap::new(), missing: HashMap::new(), fetched: HashMap::new() }
    }

    /// The node's own provider released a token: it goes through the store like anyone's
    /// (a token the store refuses is a bug in the provider, reported to it), then out.
    pub fn release(&mut self, ctx: &mut Context, record: RefreshRecord) -> Result<(), NetworkError> {
        match self.accept(ctx, None, record, now_unix_ms()) {
            RefreshOutcome::Accepted { .. } => Ok(()),
            RefreshOutcome::Ignored(reason) => Err(NetworkError::Refresh(reason.label().to_string())),
            RefreshOutcome::Rejected(reason) => Err(NetworkError::Refresh(reason.label().to_string())),
        }
    }

    pub fn on_event(&mut self, ctx: &mut Context, event: request_response::Event<RefreshRequest, RefreshResponse>) {
        match event {
            request_response::Event::Message {
                peer,
                message: request_response::Message::Request { request, channel, .. },
                ..
            } => {
                if !ctx.admit(peer, Api::Refresh) {
                    let _ = ctx.swarm.behaviour_mut().refresh.send_response(channel, RefreshResponse::RateLimited);
                    return;
                }
                // A batch that is empty, over the cap or not whole records is a malformed
                // frame: dropped unanswered, at no cost to the sender (section 10.3).
                let Ok(records) = decode_batch(&request.records.0) else {
                    tracing::debug!(%peer, "malformed refresh batch");
                    return;
                };
                let now = now_unix_ms();
                let mut invalid = 0usize;
                for record in records {
                    match self.accept(ctx, Some(peer), record, now) {
                        RefreshOutcome::Rejected(_) => invalid += 1,
                        RefreshOutcome::Ignored(IgnoreReason::Unknown) => self.note_missing(record.id, peer),
                        _ => {}
                    }
                }
                let _ = ctx.swarm.behaviour_mut().refresh.send_response(channel, RefreshResponse::Ok);
                for _ in 0..invalid.min(MAX_INVALID_COUNTED_PER_REFRESH) {
                    ctx.invalid(peer, Api::Refresh);
                }
            }
            request_response::Event::Message {
                peer,
                message: request_response::Message::Response { response: RefreshResponse::RateLimited, .. },
                ..
            } => tracing::debug!(%peer, "refresh batch throttled by the peer"),
            request_response::Event::OutboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "refresh batch failed");
            }
            _ => {}
        }
    }

    /// Checks `record` (from `from`, or the node's own provider) through the store; an
    /// accepted one is queued for every mesh peer but its sender, and a record from a
    /// peer takes the same advert's record at or below its `k` out of that peer's queue
    /// (it has it).
    fn accept(&mut self, ctx: &mut Context, from: Option<PeerId>, record: RefreshRecord, now: u64) -> RefreshOutcome {
        if let Some(queue) = from.and_then(|p| self.queues.get_mut(&p))
            && queue.get(&record.id).is_some_and(|queued| queued.k <= record.k)
        {
            queue.remove(&record.id);
        }
        let (outcome, provider) = ctx.store().apply_refresh_naming(&record, now);
        ctx.metrics.refresh_record(outcome.label());
        if let (RefreshOutcome::Accepted { .. }, Some(provider)) = (&outcome, provider) {
            ctx.emit(NodeEvent::AdvertRefreshed { provider, k: record.k, at: Instant::now() });
            for peer in relay_peers(ctx) {
                if Some(peer) != from {
                    let queue = self.queues.entry(peer).or_default();
                    if queue.get(&record.id).is_none_or(|queued| queued.k < record.k) {
                        queue.insert(record.id, record);
                    }
                }
            }
        }
        outcome
    }

    /// Remembers that `peer` sent a token for an advert this node does not hold, unless
    /// it was fetched lately or too many are pending already.
    fn note_missing(&mut self, id: [u8; 6], peer: PeerId) {
        let due = match self.fetched.get(&id) {
            Some(at) => at.elapsed() >= MISSING_REFETCH,
            // While the table of fetched ids is full, no new id: each keeps its once a
            // minute (its entries leave at the next flush after their minute).
            None => self.fetched.len() < MAX_FETCHED_IDS,
        };
        if self.fetch_missing && due && self.missing.len() < MAX_MISSING_IDS {
            self.missing.entry(id).or_insert(peer);
        }
    }

    /// The ids to fetch now, grouped by the peer that sent them, at most one request's
    /// worth (`MAX_FETCH_IDS`) per peer; the rest wait for the next flush
    /// (docs/protocol.md section 9, "Fetch by id"): the adverts gossip did not bring,
    /// whose tokens still came.
    pub fn take_missing(&mut self) -> HashMap<PeerId, Vec<[u8; 6]>> {
        let now = Instant::now();
        self.fetched.retain(|_, at| now.duration_since(*at) < MISSING_REFETCH);
        if self.missing.is_empty() {
            return HashMap::new();
        }
        let mut by_peer: HashMap<PeerId, Vec<[u8; 6]>> = HashMap::new();
        self.missing.retain(|id, peer| {
            let ids = by_peer.entry(*peer).or_default();
            if ids.len() >= MAX_FETCH_IDS {
                return true;
            }
            ids.push(*id);
            false
        });
        by_peer
    }

    /// After a fetch of `ids` from `peer` was sent (`sent`), or not (a session with the
    /// peer was under way): sent ids are not fetched again for `MISSING_REFETCH`; the
    /// others wait for the next flush while the peer is connected.
    pub fn fetch_done(&mut self, ctx: &mut Context, peer: PeerId, ids: Vec<[u8; 6]>, sent: bool) {
        if sent {
            let now = Instant::now();
            for id in ids {
                self.fetched.insert(id, now);
            }
        } else if ctx.swarm.is_connected(&peer) {
            for id in ids {
                if self.missing.len() < MAX_MISSING_IDS {
                    self.missing.entry(id).or_insert(peer);
                }
            }
        }
    }

    /// Sends each connected peer its queue, at most `MAX_BATCH_RECORDS` records in one
    /// request (the rest wait for the next flush); queues of peers gone are dropped.
    pub fn flush(&mut self, ctx: &mut Context) {
        self.queues.retain(|peer, queue| !queue.is_empty() && ctx.swarm.is_connected(peer));
        for (peer, queue) in &mut self.queues {
            let ids: Vec<[u8; 6]> = queue.keys().take(MAX_BATCH_RECORDS).copied().collect();
            let records: Vec<RefreshRecord> = ids.iter().filter_map(|id| queue.remove(id)).collect();
            let request = RefreshRequest { version: 1, records: Envelope(encode_batch(&records)) };
            ctx.swarm.behaviour_mut().refresh.send_request(peer, request);
        }
    }

    /// A peer that disconnected gets nothing more.
    pub fn forget(&mut self, peer: &PeerId) {
        self.queues.remove(peer);
    }
}

/// Where accepted records go: the advert topic's gossipsub mesh, the overlay the adverts
/// themselves travel on; while the mesh is still empty (the first heartbeat after a
/// join), every connected peer subscribed to the topic.
fn relay_peers(ctx: &Context) -> Vec<PeerId> {
    let topic = advert_topic().hash();
    let gossipsub = &ctx.swarm.behaviour().gossipsub;
    let mesh: Vec<PeerId> = gossipsub.mesh_peers(&topic).copied().collect();
    if !mesh.is_empty() {
        return mesh;
    }
    gossipsub.all_peers().filter(|(_, topics)| topics.contains(&&topic)).map(|(p, _)| *p).collect()
}
