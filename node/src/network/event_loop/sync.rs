//! `/peervm/sync/1` in both directions (docs/architecture.md, "Sync"): the client pulls a
//! peer's market snapshot page by page when it first connects (or when asked), verifies
//! every advert and applies the accept rule through the store (SECURITY.md, invariant 1);
//! the server answers pages from its store, rate limited per peer.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;
use libp2p::request_response::{self, OutboundRequestId};
use peervm_protocol::refresh::{decode_batch, encode_batch};
use peervm_protocol::{Advertisement, RefreshOutcome, RefreshRecord, verify_batch};

use super::block_lists::BlockLists;
use super::context::Context;
use super::pending::{Pending, Reply};
use crate::advert_store::{MAX_ADVERTS_PER_REFRESH_ID, SyncPage};
use crate::clock::now_unix_ms;
use crate::network::rate_limit::Api;
use crate::network::sync::{Envelope, MAX_FETCH_IDS, SyncFilter, SyncRequest, SyncResponse, decode_ids};
use crate::network::tuning::{
    MARKET_SOURCES, MAX_INVALID_COUNTED_PER_PAGE, MAX_SYNC_PAGES, SYNC_MAX_PAGE_BYTES, SYNC_MAX_PAGE_ITEMS,
};
use crate::network::{NetworkError, NodeEvent, SyncSummary};

/// What a session pulls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The peer's whole market, page by page.
    Full,
    /// A filtered sync's one page (a light client's query).
    Query,
    /// A fetch by id's one page: nobody waits for it.
    Fetch,
    /// A first page of one advert, for the block lists it carries: asked of every new peer
    /// once the node holds a market (block lists travel by gossip and on first pages only,
    /// and are not refreshed by tokens).
    Lists,
}

/// One peer's snapshot being pulled, or one query's or fetch's page awaited.
struct Session {
    pages: usize,
    summary: SyncSummary,
    kind: Kind,
    /// Callers of `NodeClient::sync_from` / `query_from` told when this session ends.
    waiters: Vec<Reply<SyncSummary>>,
}

pub(super) struct Syncs {
    /// Whether a new connection starts a full sync (`NodeConfig::sync_on_connect`).
    on_connect: bool,
    /// The peers this node pulled a whole market from, to its last page and with no
    /// invalid advert, since it last had no peer. Until `MARKET_SOURCES` have, every new
    /// connection starts a full sync; from then on none does (docs/architecture.md,
    /// "Sync"): gossip, refresh tokens and fetch by id keep the store current, and a full
    /// node would otherwise download the whole market (65 MB at 100,000 providers) from
    /// every peer it connects to. Two, not one: a single first peer with an empty or
    /// partial store (a restarted bootstrap node, a liar) does not end the join.
    synced_from: HashSet<PeerId>,
    /// The page request each session waits on; a peer may have a full sync, queries and
    /// a fetch in flight at once, each its own session.
    sessions: Pending<OutboundRequestId, Session>,
}

impl Syncs {
    pub fn new(on_connect: bool) -> Self {
        Syncs { on_connect, synced_from: HashSet::new(), sessions: Pending::default() }
    }

    fn have_market(&self) -> bool {
        self.synced_from.len() >= MARKET_SOURCES
    }

    /// The node lost its last peer: what it missed meanwhile (adverts published and
    /// never refreshed within reach) comes with the next connections' full syncs.
    pub fn on_peerless(&mut self) {
        self.synced_from.clear();
    }

    /// A connection to `peer` was established: pull its market, unless this node asks for
    /// what it needs instead (a light client); once it holds a market, only the block
    /// lists of the peer's first page.
    pub fn on_connected(&mut self, ctx: &mut Context, peer: PeerId) {
        if !self.on_connect || self.runs(&peer, Kind::Full) {
            return;
        }
        if self.have_market() {
            self.send(ctx, peer, lists_page(), Kind::Lists, Vec::new());
        } else {
            self.send(ctx, peer, full_page(None), Kind::Full, Vec::new());
        }
    }

    /// Whether a session of `kind` with `peer` is under way.
    fn runs(&mut self, peer: &PeerId, kind: Kind) -> bool {
        self.sessions.of_peer_mut(peer).any(|s| s.kind == kind)
    }

    /// A caller asks for a full snapshot of `peer` (connected), or for one filtered page
    /// (`query`), and waits for its summary. A full sync already under way with the peer
    /// answers both (a whole market holds every answer to a query); a query always gets
    /// a request of its own otherwise.
    pub fn request(
        &mut self,
        ctx: &mut Context,
        peer: PeerId,
        query: Option<(SyncFilter, u32)>,
        reply: Reply<SyncSummary>,
    ) {
        if !ctx.swarm.is_connected(&peer) {
            let reason = format!("not connected to {peer}");
            let _ = reply.send(Err(NetworkError::Sync { peer, reason }));
            return;
        }
        if let Some(full) = self.sessions.of_peer_mut(&peer).find(|s| s.kind == Kind::Full) {
            full.waiters.push(reply);
            return;
        }
        let (request, kind) = match query {
            None => (full_page(None), Kind::Full),
            Some((filter, max_items)) => (
                SyncRequest {
                    version: 1,
                    after: None,
                    max_items: max_items.clamp(1, SYNC_MAX_PAGE_ITEMS),
                    filter: Some(filter),
                    ids: None,
                },
                Kind::Query,
            ),
        };
        self.send(ctx, peer, request, kind, vec![reply]);
    }

    /// Asks `peer` for the adverts of refresh record `ids` it sent without this node
    /// holding their advert (at most `MAX_FETCH_IDS`). Not sent, and `false`, while a full
    /// sync with it runs (it brings them) or a fetch does (the ids wait for the next one),
    /// or when the peer is gone.
    pub fn fetch_ids(&mut self, ctx: &mut Context, peer: PeerId, ids: &[[u8; 6]]) -> bool {
        if ids.is_empty()
            || !ctx.swarm.is_connected(&peer)
            || self.sessions.of_peer_mut(&peer).any(|s| s.kind != Kind::Query)
        {
            return false;
        }
        let ids = &ids[..ids.len().min(MAX_FETCH_IDS)];
        let max_items = u32::try_from(ids.len() * MAX_ADVERTS_PER_REFRESH_ID).unwrap_or(SYNC_MAX_PAGE_ITEMS);
        let request =
            SyncRequest { version: 1, after: None, max_items, filter: None, ids: Some(Envelope(ids.concat())) };
        self.send(ctx, peer, request, Kind::Fetch, Vec::new());
        true
    }

    /// Sends the first (or only) request of a session.
    fn send(
        &mut self,
        ctx: &mut Context,
        peer: PeerId,
        request: SyncRequest,
        kind: Kind,
        waiters: Vec<Reply<SyncSummary>>,
    ) {
        let id = ctx.swarm.behaviour_mut().sync.send_request(&peer, request);
        self.sessions.insert(id, peer, Session { pages: 0, summary: SyncSummary::default(), kind, waiters });
    }

    /// The peers a session is pulling from (not to be trimmed).
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.sessions.peers()
    }

    pub fn on_event(
        &mut self,
        ctx: &mut Context,
        block_lists: &mut BlockLists,
        event: request_response::Event<SyncRequest, SyncResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request { request, channel, .. } => {
                    let response = serve(ctx, block_lists, peer, request);
                    let _ = ctx.swarm.behaviour_mut().sync.send_response(channel, response);
                }
                request_response::Message::Response { request_id, response } => {
                    if let Some((peer, session)) = self.sessions.take(&request_id) {
                        self.on_page(ctx, block_lists, peer, session, response);
                    }
                }
            },
            request_response::Event::OutboundFailure { request_id, error, .. } => {
                if let Some((peer, session)) = self.sessions.take(&request_id) {
                    tracing::debug!(%peer, %error, "sync failed");
                    let error = NetworkError::Sync { peer, reason: error.to_string() };
                    self.finish(ctx, peer, session, Err(error));
                }
            }
            _ => {}
        }
    }

    fn on_page(
        &mut self,
        ctx: &mut Context,
        block_lists: &mut BlockLists,
        peer: PeerId,
        mut session: Session,
        response: SyncResponse,
    ) {
        let (adverts, next, refreshes) = match response {
            SyncResponse::Page { adverts, next, lists, refreshes } => {
                block_lists.accept_from_sync(ctx, &lists);
                (adverts, next, refreshes)
            }
            SyncResponse::RateLimited => {
                self.finish(ctx, peer, session, Err(NetworkError::RateLimited { peer, api: "sync" }));
                return;
            }
        };
        session.pages += 1;
        if adverts.len() > SYNC_MAX_PAGE_ITEMS as usize {
            ctx.invalid(peer, Api::Sync);
            let reason = format!("a page of {} adverts, above the cap of {}", adverts.len(), SYNC_MAX_PAGE_ITEMS);
            self.finish(ctx, peer, session, Err(NetworkError::Sync { peer, reason }));
            return;
        }
        let refs: Vec<&[u8]> = adverts.iter().map(|e| e.0.as_slice()).collect();
        // The page's records, by the id of the advert each refreshes (docs/protocol.md,
        // section 9): a batch that does not decode is dropped, at no cost to the server.
        let records: HashMap<[u8; 6], RefreshRecord> = refreshes
            .and_then(|r| decode_batch(&r.0).ok())
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let now = now_unix_ms();
        let mut stored = Vec::new();
        let mut invalid = 0usize;
        {
            let mut store = ctx.store();
            for result in verify_batch::<Advertisement>(&refs) {
                match result {
                    Ok(advert) => {
                        let (provider, seq) = (advert.body().provider, advert.body().seq);
                        let body = advert.body();
                        let record = body.refresh.and_then(|chain| records.get(&chain.id(&body.provider, body.seq)));
                        let inserted = store.insert_with_refresh(advert, record, now);
                        if let Some(outcome) = inserted.record {
                            ctx.metrics.refresh_record(outcome.label());
                            if let RefreshOutcome::Rejected(_) = outcome {
                                invalid += 1;
                            }
                        }
                        match inserted.advert {
                            Ok(outcome) => stored.push((provider, seq, outcome, std::time::Instant::now())),
                            Err(e) => {
                                ctx.metrics.rejected(e.reason());
                                if e.is_misbehaviour() {
                                    invalid += 1;
                                } else {
                                    session.summary.ignored += 1;
                                }
                            }
                        }
                    }
                    Err(e) => {
                        ctx.metrics.rejected("bad_signature");
                        if e.is_misbehaviour() {
                            invalid += 1;
                        } else {
                            session.summary.ignored += 1;
                        }
                    }
                }
            }
            ctx.metrics.advert_store_size.set(store.len() as i64);
        }
        session.summary.accepted += stored.len();
        session.summary.invalid += invalid;
        ctx.metrics.adverts_accepted.inc_by(stored.len() as u64);
        // Sync results are stored but never re-gossiped (docs/protocol.md, "Batch
        // verification").
        for (provider, seq, outcome, at) in stored {
            ctx.emit(NodeEvent::AdvertStored { provider, seq, outcome, at });
        }
        for _ in 0..invalid.min(MAX_INVALID_COUNTED_PER_PAGE) {
            ctx.invalid(peer, Api::Sync);
        }
        match next {
            Some(after)
                if session.kind == Kind::Full && session.pages < MAX_SYNC_PAGES && ctx.swarm.is_connected(&peer) =>
            {
                let id = ctx.swarm.behaviour_mut().sync.send_request(&peer, full_page(Some(after)));
                self.sessions.insert(id, peer, session);
            }
            next => {
                // A whole market's last page came, every advert valid: one source more.
                if session.kind == Kind::Full && next.is_none() && session.summary.invalid == 0 {
                    self.synced_from.insert(peer);
                }
                self.finish(ctx, peer, session, Ok(()))
            }
        }
    }

    fn finish(&mut self, ctx: &Context, peer: PeerId, session: Session, result: Result<(), NetworkError>) {
        let summary = session.summary;
        // `SyncDone` means a whole market pulled; a query's or fetch's page is not one.
        if result.is_ok() && session.kind == Kind::Full {
            ctx.emit(NodeEvent::SyncDone { peer, accepted: summary.accepted, invalid: summary.invalid });
        }
        for waiter in session.waiters {
            let _ = waiter.send(result.clone().map(|()| summary));
        }
    }
}

/// The request for a full sync's page after `after` (the first page: `None`).
fn full_page(after: Option<Vec<u8>>) -> SyncRequest {
    SyncRequest { version: 1, after, max_items: SYNC_MAX_PAGE_ITEMS, filter: None, ids: None }
}

/// A first page of one advert: the cheapest request whose answer carries the server's
/// block lists (docs/protocol.md, section 7a).
fn lists_page() -> SyncRequest {
    SyncRequest { version: 1, after: None, max_items: 1, filter: None, ids: None }
}

/// One page of this node's store for `peer`, after the cursor it sent, or, for a filtered
/// sync, the cheapest adverts matching its filter; the first page also carries the held
/// block lists.
fn serve(ctx: &mut Context, block_lists: &BlockLists, peer: PeerId, request: SyncRequest) -> SyncResponse {
    if !ctx.admit(peer, Api::Sync) {
        return SyncResponse::RateLimited;
    }
    let after = request.after.as_deref().and_then(|b| PeerId::from_bytes(b).ok());
    let max_items = request.max_items.clamp(1, SYNC_MAX_PAGE_ITEMS) as usize;
    let now = now_unix_ms();
    let empty = || SyncPage { adverts: Vec::new(), next: None, refreshes: Vec::new() };
    let page = match (&request.ids, &request.filter) {
        (Some(ids), _) => match decode_ids(&ids.0) {
            Some(ids) => ctx.store().ids_page(&ids, max_items, SYNC_MAX_PAGE_BYTES, now),
            None => empty(),
        },
        (None, Some(filter)) => match filter.to_offer_filter() {
            Some(filter) => ctx.store().query_page(&filter, max_items, SYNC_MAX_PAGE_BYTES, now),
            None => empty(),
        },
        (None, None) => ctx.store().page(after.as_ref(), max_items, SYNC_MAX_PAGE_BYTES, now),
    };
    // The block lists go with a full sync's first page and a light client's query (which
    // applies its trusted lists from them), not with a fetch by id, which can come every
    // second (docs/protocol.md section 9).
    let lists = if after.is_none() && request.ids.is_none() { block_lists.for_sync() } else { Vec::new() };
    SyncResponse::Page {
        adverts: page.adverts.into_iter().map(Envelope).collect(),
        next: page.next.map(|p| p.to_bytes()),
        lists,
        refreshes: (!page.refreshes.is_empty()).then(|| Envelope(encode_batch(&page.refreshes))),
    }
}
