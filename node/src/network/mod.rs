//! The libp2p swarm: one task owns it (docs/architecture.md, "The swarm"); the rest of the
//! program drives it through a cloneable [`NodeClient`] and reads the shared
//! [`AdvertStore`].

pub mod behaviour;
pub mod dial_budget;
pub mod dialback;
mod event_loop;
pub mod gossip_params;
pub mod lease_wire;
pub mod offences;
pub mod rate_limit;
pub mod refresh_wire;
pub mod sync;
pub mod tuning;
mod wire_bytes;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use peervm_protocol::{Advertisement, SigningKey, Verified};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::advert_store::{AdvertStore, InsertOutcome};
use crate::metrics::Metrics;
pub use behaviour::ConnectionCaps;
pub use rate_limit::RateLimits;

/// The store, shared between the swarm task (which writes) and readers.
pub type SharedStore = Arc<Mutex<AdvertStore>>;

/// Peers named by the block lists of trusted signers (kept by the swarm task).
pub type ListBlocked = Arc<std::sync::RwLock<std::collections::HashSet<PeerId>>>;

/// How a node takes part in the swarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Kademlia server, serves sync, relays gossip; publishes nothing.
    Bootstrap,
    /// Publishes its advert; a Kademlia server (it is reachable by design).
    Provider,
    /// A one-shot client: Kademlia client mode.
    Requestor,
}

/// How a node notices dead connections: a ping every `interval`, an answer expected
/// within `timeout`.
#[derive(Debug, Clone, Copy)]
pub struct Keepalive {
    pub interval: Duration,
    pub timeout: Duration,
}

impl Default for Keepalive {
    /// A dead connection is closed within about a minute: libp2p forgives the first failed
    /// ping, and the next one needs a new stream, whose negotiation times out after 10 s.
    fn default() -> Self {
        Self { interval: tuning::KEEPALIVE_INTERVAL, timeout: tuning::KEEPALIVE_TIMEOUT }
    }
}

pub struct NodeConfig {
    pub key: SigningKey,
    pub role: Role,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub rate_limits: RateLimits,
    pub caps: ConnectionCaps,
    /// Dial peers found through Kademlia until this many are connected, so gossip keeps
    /// flowing when a bootstrap node goes away.
    pub target_peers: usize,
    pub metrics: Option<Arc<Metrics>>,
    /// How often the expiry sweep runs.
    pub sweep_interval: Duration,
    /// A connection younger than this is never trimmed (see `target_peers`): a join's
    /// sync, a Kademlia lookup and a gossipsub GRAFT get time to happen first.
    pub trim_grace: Duration,
    /// Pings on every connection; one that goes unanswered closes the connection.
    pub keepalive: Keepalive,
    /// Where inbound `/peervm/lease/1` messages go (providers). `None`: the node only
    /// sends lease messages.
    pub lease_inbox: Option<mpsc::Sender<InboundLease>>,
    /// Where signature failures and bans are recorded.
    pub audit: Option<Arc<crate::provider::audit::AuditLog>>,
    /// Signers whose block lists this node applies (its operator's choice).
    pub trusted_block_lists: std::collections::HashSet<PeerId>,
    /// Pull a new peer's whole market on connect while the node holds none (at start and
    /// after it had no peer at all; docs/architecture.md "Sync"). A one-shot requestor
    /// turns it off and asks for the offers it needs instead ([`NodeClient::query_from`]).
    pub sync_on_connect: bool,
    /// Fetch the advert behind refresh tokens that name none this node holds (it missed
    /// its gossip; docs/protocol.md section 9, "Fetch by id"). A light client, which holds
    /// only what it asked for, turns it off.
    pub fetch_missing_adverts: bool,
}

impl NodeConfig {
    pub fn new(key: SigningKey, role: Role) -> Self {
        Self {
            key,
            role,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            rate_limits: RateLimits::default(),
            caps: ConnectionCaps::default(),
            target_peers: tuning::TARGET_PEERS,
            metrics: None,
            sweep_interval: tuning::SWEEP_INTERVAL,
            trim_grace: tuning::TRIM_GRACE,
            keepalive: Keepalive::default(),
            lease_inbox: None,
            audit: None,
            trusted_block_lists: Default::default(),
            sync_on_connect: true,
            fetch_missing_adverts: true,
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum NetworkError {
    #[error("cannot build the libp2p swarm: {0}")]
    Build(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
    #[error("cannot dial {addr}: {reason}")]
    Dial { addr: Multiaddr, reason: String },
    #[error("could not reach any bootstrap node: {0}")]
    NoBootstrapReachable(String),
    #[error("cannot publish the advert: {0}")]
    Publish(String),
    #[error("the node has shut down")]
    Stopped,
    #[error("lease message to {peer} failed: {reason}")]
    Lease { peer: PeerId, reason: String },
    #[error("sync from {peer} failed: {reason}")]
    Sync { peer: PeerId, reason: String },
    #[error("dial-back request to {peer} failed: {reason}")]
    DialBack { peer: PeerId, reason: String },
    #[error("{peer} refused the {api} request: this node is over its rate limit there; try again later")]
    RateLimited { peer: PeerId, api: &'static str },
    #[error("the node's own refresh token was not accepted: {0}")]
    Refresh(String),
}

/// A lease message that arrived from `peer`, for the lease manager. `throttled` says the
/// peer is over its lease rate limit: the manager answers with a signed denial without
/// looking further.
pub struct InboundLease {
    pub peer: PeerId,
    pub message: lease_wire::LeaseMessage,
    pub throttled: bool,
    pub reply: LeaseResponder,
}

/// Sends the signed reply to an [`InboundLease`] back over its stream.
pub struct LeaseResponder {
    id: u64,
    tx: mpsc::Sender<Command>,
}

impl LeaseResponder {
    /// Sends `signed_reply` (a `Signed<LeaseReply>`'s bytes). A requestor that went away
    /// meanwhile is not an error worth reporting.
    pub async fn send(self, signed_reply: Vec<u8>) {
        let _ = self.tx.send(Command::LeaseRespond { id: self.id, reply: signed_reply }).await;
    }
}

/// Something that happened in the swarm, for watchers (CLI `--watch`, tests, metrics).
#[derive(Debug, Clone)]
pub enum NodeEvent {
    /// The store took `provider`'s advert number `seq` at `at` (the moment of the insert,
    /// not of the watcher's receipt: propagation benchmarks time delivery by it).
    AdvertStored {
        provider: PeerId,
        seq: u64,
        outcome: InsertOutcome,
        at: std::time::Instant,
    },
    /// The store took refresh token `k` of `provider`'s advert at `at` (docs/protocol.md,
    /// section 4a).
    AdvertRefreshed {
        provider: PeerId,
        k: u16,
        at: std::time::Instant,
    },
    AdvertsExpired(Vec<PeerId>),
    PeerConnected(PeerId),
    PeerDisconnected(PeerId),
    SyncDone {
        peer: PeerId,
        accepted: usize,
        invalid: usize,
    },
    PeerBanned(PeerId),
    DialFailed {
        peer: Option<PeerId>,
        error: String,
    },
}

/// What a finished sync pulled from one peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct SyncSummary {
    pub accepted: usize,
    pub ignored: usize,
    pub invalid: usize,
}

pub(crate) enum Command {
    Publish {
        advert: Box<Verified<Advertisement>>,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    ReleaseRefresh {
        record: peervm_protocol::RefreshRecord,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    Sync {
        peer: PeerId,
        /// A light client's query instead of the whole market: the filter and how many
        /// adverts at most.
        query: Option<(sync::SyncFilter, u32)>,
        reply: oneshot::Sender<Result<SyncSummary, NetworkError>>,
    },
    LeaseSend {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        message: lease_wire::LeaseMessage,
        reply: oneshot::Sender<Result<Vec<u8>, NetworkError>>,
    },
    PublishBlockList {
        list: Box<Verified<peervm_protocol::BlockList>>,
        reply: oneshot::Sender<Result<(), NetworkError>>,
    },
    DialBack {
        peer: PeerId,
        request: dialback::DialBackRequest,
        reply: oneshot::Sender<Result<dialback::DialBackResponse, NetworkError>>,
    },
    DialBackRespond {
        id: u64,
        response: dialback::DialBackResponse,
    },
    LeaseRespond {
        id: u64,
        reply: Vec<u8>,
    },
    ReportInvalid {
        peer: PeerId,
    },
    BlockPeer {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    BlockAdverts {
        peer: PeerId,
        blocked: bool,
        reply: oneshot::Sender<()>,
    },
    UnblockPeer {
        peer: PeerId,
        reply: oneshot::Sender<()>,
    },
    SetTrustedBlockLists {
        trusted: std::collections::HashSet<PeerId>,
        reply: oneshot::Sender<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A handle to a running node's swarm task.
#[derive(Clone)]
pub struct NodeClient {
    tx: mpsc::Sender<Command>,
}

impl NodeClient {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, NetworkError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| NetworkError::Stopped)?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Stores `advert` locally and gossips it. With nobody subscribed yet it is kept and
    /// sent as soon as a peer subscribes.
    pub async fn publish(&self, advert: Verified<Advertisement>) -> Result<(), NetworkError> {
        self.call(|reply| Command::Publish { advert: Box::new(advert), reply }).await?
    }

    /// Releases the node's own provider's refresh token (docs/protocol.md, section 4a):
    /// checked by the node's store like any other, then sent to the mesh.
    pub async fn release_refresh(&self, record: peervm_protocol::RefreshRecord) -> Result<(), NetworkError> {
        self.call(|reply| Command::ReleaseRefresh { record, reply }).await?
    }

    pub async fn connected_peers(&self) -> Result<Vec<PeerId>, NetworkError> {
        self.call(|reply| Command::ConnectedPeers { reply }).await
    }

    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetworkError> {
        self.call(|reply| Command::Dial { addr, reply }).await?
    }

    /// Pulls a full snapshot from `peer` and waits until the last page is in.
    pub async fn sync_from(&self, peer: PeerId) -> Result<SyncSummary, NetworkError> {
        self.call(|reply| Command::Sync { peer, query: None, reply }).await?
    }

    /// Asks `peer` for the `max_items` cheapest adverts matching `filter` (a filtered
    /// sync, docs/protocol.md section 9) and stores what passes the accept rule; waits for
    /// the answer. A light client's way to see the offers it can use without the whole
    /// market.
    pub async fn query_from(
        &self,
        peer: PeerId,
        filter: &crate::advert_store::OfferFilter,
        max_items: u32,
    ) -> Result<SyncSummary, NetworkError> {
        let query = Some((sync::SyncFilter::from(filter), max_items));
        self.call(|reply| Command::Sync { peer, query, reply }).await?
    }

    /// Sends a lease message to `peer` (dialing it at `addrs` if not connected) and waits
    /// for its signed reply (up to the lease protocol's timeout).
    pub async fn lease_call(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        message: lease_wire::LeaseMessage,
    ) -> Result<Vec<u8>, NetworkError> {
        self.call(|reply| Command::LeaseSend { peer, addrs, message, reply }).await?
    }

    /// Publishes this node's signed block list (stored, applied when trusted, gossiped, and
    /// re-gossiped every 5 minutes).
    pub async fn publish_block_list(&self, list: Verified<peervm_protocol::BlockList>) -> Result<(), NetworkError> {
        self.call(|reply| Command::PublishBlockList { list: Box::new(list), reply }).await?
    }

    /// Asks `peer` (connected) to dial this node back on `request.ports` and say what it
    /// saw (port verification).
    pub async fn dial_back(
        &self,
        peer: PeerId,
        request: dialback::DialBackRequest,
    ) -> Result<dialback::DialBackResponse, NetworkError> {
        self.call(|reply| Command::DialBack { peer, request, reply }).await?
    }

    /// Counts an invalid message (bad signature, malformed) that `peer` sent on an API the
    /// swarm does not verify itself (leases) towards its ban score.
    pub async fn report_invalid(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.tx.send(Command::ReportInvalid { peer }).await.map_err(|_| NetworkError::Stopped)
    }

    /// Blocks `peer`: disconnects it, refuses its connections, and drops its adverts.
    /// Returns once the block is in force: a message the swarm handles afterwards meets it.
    pub async fn block_peer(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.call(|reply| Command::BlockPeer { peer, reply }).await
    }

    /// Stops (or resumes) storing, showing and forwarding `peer`'s adverts, without
    /// refusing its connections (a blocked requestor still hears its signed denial).
    /// Returns once the change is in force, so an operator told "unblocked" does not see
    /// the provider's next advert dropped by the block it just lifted.
    pub async fn block_adverts(&self, peer: PeerId, blocked: bool) -> Result<(), NetworkError> {
        self.call(|reply| Command::BlockAdverts { peer, blocked, reply }).await
    }

    /// Lifts an operator's peer block; returns once it is lifted.
    pub async fn unblock_peer(&self, peer: PeerId) -> Result<(), NetworkError> {
        self.call(|reply| Command::UnblockPeer { peer, reply }).await
    }

    /// Applies the block lists of `trusted` signers from now on, instead of the ones the
    /// node started with (a provider's config reload): the lists already held are
    /// re-applied at once, so a newly trusted signer's list hides its entries without
    /// waiting for its next publication.
    pub async fn set_trusted_block_lists(
        &self,
        trusted: std::collections::HashSet<PeerId>,
    ) -> Result<(), NetworkError> {
        self.call(|reply| Command::SetTrustedBlockLists { trusted, reply }).await
    }

    /// Stops the swarm task (after flushing what it was sending).
    pub async fn shutdown(&self) {
        let _ = self.call(|reply| Command::Shutdown { reply }).await;
    }
}

/// A running node.
pub struct Node {
    pub client: NodeClient,
    pub store: SharedStore,
    /// Peers that trusted block lists name: the lease manager denies them too.
    pub list_blocked: ListBlocked,
    pub peer_id: PeerId,
    /// Full dialable addresses, each ending in `/p2p/<peer id>`.
    pub listen_addrs: Vec<Multiaddr>,
    /// The metrics the swarm task updates (`NodeConfig::metrics`, or its own set), for the
    /// node's other tasks to report into (port verification).
    pub metrics: Arc<Metrics>,
    events: broadcast::Sender<NodeEvent>,
    task: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Builds the swarm, starts listening (waiting until the addresses are known), dials
    /// the bootstrap nodes, and runs the swarm task in the background.
    pub async fn start(config: NodeConfig) -> Result<Node, NetworkError> {
        event_loop::start(config).await
    }

    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Stops the node and waits for its task to end.
    pub async fn stop(self) {
        self.client.shutdown().await;
        let _ = self.task.await;
    }

    /// Ends the node at once, as a crash would: nothing is flushed or withdrawn.
    pub fn abort(self) {
        self.task.abort();
    }
}

/// `addr` with `/p2p/<peer>` appended unless it already ends in one.
pub fn with_peer_id(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(_)) => addr.clone(),
        _ => addr.clone().with(libp2p::multiaddr::Protocol::P2p(peer)),
    }
}

/// The PeerId at the end of `addr`, if any.
pub fn peer_id_of(addr: &Multiaddr) -> Option<PeerId> {
    match addr.iter().last() {
        Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
        _ => None,
    }
}
