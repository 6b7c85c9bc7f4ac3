//! What every protocol module of the event loop works with: the swarm, the advert store,
//! the event stream, metrics, the audit log, and the per-peer accounting of rate limits
//! and misbehaviour that ends in a ban (SECURITY.md, invariant 11).

use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use libp2p::{PeerId, Swarm};
use tokio::sync::{broadcast, mpsc};

use super::closing::Closing;
use crate::advert_store::AdvertStore;
use crate::metrics::Metrics;
use crate::network::behaviour::PeervmBehaviour;
use crate::network::rate_limit::{Api, PeerGuard, Verdict};
use crate::network::{Command, NodeEvent, SharedStore};
use crate::provider::audit::AuditLog;

pub(super) struct Context {
    pub swarm: Swarm<PeervmBehaviour>,
    pub store: SharedStore,
    pub events: broadcast::Sender<NodeEvent>,
    pub metrics: Arc<Metrics>,
    /// Where signature failures and bans are recorded.
    pub audit: Option<Arc<AuditLog>>,
    /// Given to work that finishes outside the task (lease replies, dial-back probes),
    /// which answers through the command channel.
    pub self_tx: mpsc::Sender<Command>,
    /// Token buckets and misbehaviour scores per peer; who is banned until when.
    pub guard: PeerGuard,
    /// Banned peers whose connections are not closed yet (`closing.rs`): they are owed a
    /// lease reply, the denial of the request that got them banned typically.
    pub closing: Closing,
}

impl Context {
    pub fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    pub fn store(&self) -> MutexGuard<'_, AdvertStore> {
        // A panic while holding the lock would be a bug elsewhere; the data stays usable.
        self.store.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes one token of `api` for `peer`. False: the message is over the peer's limit and
    /// is dropped (counted in metrics); a peer that keeps going is banned. A banned peer's
    /// messages, in the moment before its connections close, are dropped without counting.
    pub fn admit(&mut self, peer: PeerId, api: Api) -> bool {
        if self.guard.is_banned(&peer) {
            return false;
        }
        let (allowed, verdict) = self.guard.allow(peer, api, Instant::now());
        self.ban_if(peer, verdict);
        if !allowed {
            self.metrics.throttled(api.label());
        }
        allowed
    }

    /// Counts an invalid signature or malformed message from `peer` on `api`: three within
    /// an hour ban it (`offences.rs`; an honest relay validates before forwarding, so it
    /// never sends one).
    pub fn invalid(&mut self, peer: PeerId, api: Api) {
        self.audit("signature_failure", serde_json::json!({"peer": peer.to_string(), "api": api.label()}));
        let verdict = self.guard.invalid(peer, Instant::now());
        self.ban_if(peer, verdict);
    }

    /// A ban takes effect at once for the peer's messages (`admit`, and the lease stream
    /// refuses new requests), but its connections close only through `close_banned`: the
    /// request that crossed the threshold still gets its signed denial first (README.md:
    /// "every reply, denials too, is signed").
    fn ban_if(&mut self, peer: PeerId, verdict: Verdict) {
        if verdict == Verdict::Ban {
            tracing::warn!(%peer, "banning peer for repeated invalid or excessive messages");
            self.audit("ban", serde_json::json!({"peer": peer.to_string()}));
            self.metrics.peers_banned.inc();
            self.closing.start(peer, Instant::now());
            self.emit(NodeEvent::PeerBanned(peer));
        }
    }

    /// Blocks (which disconnects) each banned peer whose time has come (`closing.rs`):
    /// owed no lease reply any more, or its grace ran out. Called after every event and
    /// command, so at least on the maintenance tick.
    pub fn close_banned(&mut self, owes_reply: impl Fn(&PeerId) -> bool) {
        for peer in self.closing.due(Instant::now(), owes_reply) {
            // A ban lifted meanwhile (to make room for another) is not enforced late.
            if self.guard.is_banned(&peer) {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
            }
        }
    }

    fn audit(&self, event: &str, fields: serde_json::Value) {
        if let Some(a) = &self.audit {
            a.record(event, fields);
        }
    }
}
