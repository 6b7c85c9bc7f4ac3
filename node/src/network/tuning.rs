//! The swarm's tuning: every timeout, interval, size and limit of `network/`, each with
//! the reason for its value, apart from the logic that uses it (as Lighthouse keeps its
//! gossipsub parameters apart). Wire formats are in docs/protocol.md, the design in
//! docs/architecture.md ("The swarm"), measured figures in BENCHMARKS.md.
//!
//! This module depends on nothing in the crate; the types built from these numbers
//! (`RateLimits`, `ConnectionCaps`, `Keepalive`, `NodeConfig`) take their defaults here.
//! Gossipsub's scoring weights stay in `gossip_params.rs`, next to the explanation of how
//! they interact with the ban below.

use std::time::Duration;

// ---- The swarm task ------------------------------------------------------------------

/// Commands queued to the swarm task. Every caller awaits a reply, so the queue only
/// absorbs bursts (a provider answering many lease streams at once); bounded, a stuck task
/// pushes back on its callers instead of growing without limit.
pub const COMMAND_QUEUE: usize = 256;
/// Node events buffered per watcher. A watcher that falls further behind gets `Lagged`
/// and skips ahead; the swarm task never waits for a watcher.
pub const EVENT_QUEUE: usize = 4096;
/// How long `Node::start` waits for every listener to report its address: binding a
/// local port takes milliseconds, so 10 s means the address cannot be used.
pub const LISTEN_DEADLINE: Duration = Duration::from_secs(10);
/// After the last listener reports, a wildcard listener gets this long to report its
/// other interfaces' addresses, so the start-up banner lists them all.
pub const LISTEN_SETTLE: Duration = Duration::from_millis(100);
/// On shutdown, queued gossip (typically the provider's withdrawn advert) gets this long
/// to go out before the task ends (docs/architecture.md, "Provider daemon").
pub const SHUTDOWN_FLUSH: Duration = Duration::from_millis(300);
/// The expiry sweep's default period: an advert leaves the store at most a second after
/// its `expires_at`.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

// ---- Connections and peer discovery ---------------------------------------------------

/// Peers a node dials through Kademlia until it has this many connections, so the gossip
/// mesh (6 peers by gossipsub's default) does not depend on one bootstrap node.
pub const TARGET_PEERS: usize = 8;
/// A connection younger than this is never trimmed: a join's sync, a Kademlia lookup and
/// a gossipsub GRAFT get time to happen first.
pub const TRIM_GRACE: Duration = Duration::from_secs(30);
/// The maintenance timer's period. While a node has no peer at all, its bootstrap nodes
/// are re-dialled on every tick, so a healed partition is noticed within seconds.
pub const MAINTAIN_TICK: Duration = Duration::from_secs(2);
/// The rest of maintenance (re-dial lost bootstraps, DHT walk, trim, lift bans) runs every
/// this many ticks (10 s): often enough to replace a lost peer quickly, rarely enough that
/// a large swarm's upkeep stays cheap.
pub const SLOW_EVERY: u64 = 5;
/// With enough peers, a Kademlia walk still runs every this many slow ticks (5 min) to
/// keep the routing table fresh; each walk connects to every peer it queries, so not more
/// often (docs/architecture.md, "Connection management").
pub const KAD_REFRESH_EVERY: u64 = 30;
/// A Kademlia query gives up after this long; walks are background work, and a walk that
/// hangs on unreachable peers must not block the next one.
pub const KAD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);
/// libp2p closes a connection that carries no stream for this long. Gossipsub keeps a
/// stream open on every connection, so in practice trimming (above) closes connections;
/// this only catches peers that speak none of our long-lived protocols.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
/// Established connections in all: enough for a bootstrap node serving a large swarm,
/// bounded so a crowd of peers cannot exhaust file descriptors or memory.
pub const MAX_ESTABLISHED: u32 = 512;
/// Connections per peer: a simultaneous dial in both directions needs two; more would
/// only let one peer take a larger share of the cap.
pub const MAX_PER_PEER: u32 = 2;
/// Incoming connections still in their handshake: bounds the work a burst of dials (or a
/// slow-handshake attack) can queue.
pub const MAX_PENDING_INCOMING: u32 = 64;
/// Every connection is pinged this often...
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);
/// ...and a ping that gets no answer within this long fails. libp2p forgives the first
/// failure and the next needs a new stream, whose negotiation times out after 10 s: a dead
/// connection (a cut link, a host gone without a FIN) is closed within about a minute.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

// ---- Gossip -------------------------------------------------------------------------

/// Gossipsub's heartbeat, a little faster than libp2p's 1 s default: meshes form and
/// missed adverts are re-announced (IHAVE) sooner after a join.
pub const GOSSIP_HEARTBEAT: Duration = Duration::from_millis(700);
/// How long gossipsub keeps a message to forward (or publish) in a connection's queue
/// before dropping it; libp2p's defaults are 1 s and 5 s. A node whose event loop lags
/// (a busy host) dropped a quarter of its forwards at 1 s in a 2,000-node simulation, and
/// the nodes behind it missed the advert until its next refresh (BENCHMARKS.md, "Swarm
/// upkeep"). Adverts are small and each provider sends one a minute: a late advert is
/// worth more than a lost one, and the queue stays bounded by its length (5,000).
pub const GOSSIP_QUEUE_PATIENCE: Duration = Duration::from_secs(10);
/// Largest gossip message: an advert is at most 4 KiB and a block list 64 KiB
/// (docs/protocol.md, section 2); the rest is room for the RPC framing.
pub const GOSSIP_MAX_TRANSMIT: usize = 80 * 1024;
/// Message ids are remembered this long, so an advert re-published (every 60 s by
/// default) while the previous copy still circulates is recognised as a duplicate.
pub const GOSSIP_DUPLICATE_CACHE: Duration = Duration::from_secs(120);

// ---- Per-peer rate limits and bans (SECURITY.md, invariant 11) --------------------------

/// Gossip messages per second a peer may send, and the burst. A relay forwards everybody's
/// adverts: 10,000 providers re-publishing every 60 s is ~170 adverts/s through one peer.
pub const GOSSIP_PER_SEC: f64 = 400.0;
pub const GOSSIP_BURST: f64 = 2000.0;
/// Sync pages per second a peer may ask for, and the burst: a full snapshot of 10,000
/// adverts is ~7 pages of 1 MiB, so a join never waits; a peer paging in a loop does.
pub const SYNC_PER_SEC: f64 = 4.0;
pub const SYNC_BURST: f64 = 32.0;
/// Refresh batches per second a peer may send, and the burst: an honest peer sends one a
/// second (`REFRESH_FLUSH_INTERVAL`), each with up to 4,096 records.
pub const REFRESH_PER_SEC: f64 = 4.0;
pub const REFRESH_BURST: f64 = 16.0;
/// Lease messages per second a peer may send, and the burst: a requestor sends one request
/// and a few control messages per lease (docs/protocol.md, "Transport: /peervm/lease/1").
pub const LEASE_PER_SEC: f64 = 2.0;
pub const LEASE_BURST: f64 = 10.0;
/// Flood score at which a peer is banned.
pub const BAN_THRESHOLD: f64 = 100.0;
/// Invalid messages (an invalid signature, malformed bytes) that ban a peer when they come
/// within `INVALID_WINDOW`. An honest relay never forwards one (it validates first), so
/// three are proof enough. Gossipsub graylists a peer after its fifth invalid message in
/// quick succession (see `gossip_params.rs`); the ban must come before that, or the node
/// would stop hearing, and counting, the peer's messages.
pub const INVALID_BAN_COUNT: usize = 3;
/// How long invalid messages count towards a ban: an hour, not the flood score's
/// one-minute half-life, under which 34 points per invalid advert sent every 36 s level
/// off just under the threshold forever (issue 20, item 11). A peer sending one every
/// 36 s is banned at its third; only a peer with fewer than three in any hour, rare
/// isolated errors, never is (docs/architecture.md, "Abuse handling").
pub const INVALID_WINDOW: Duration = Duration::from_secs(3600);
/// Peers whose recent invalid messages are remembered at once (a few hundred KiB). A
/// swarm of fresh peer ids cannot grow the table past this; records that can no longer
/// lead to a ban make room first.
pub const MAX_OFFENDERS: usize = 4096;
/// Bans in force at once; a new ban beyond this lifts the one that would end soonest, so
/// a swarm of fresh peer ids, each getting itself banned, cannot grow the table (or the
/// swarm's block list) without bound.
pub const MAX_BANS: usize = 4096;
/// Score added by one message dropped over the gossip limit: a relay can overshoot in an
/// honest burst, so it costs little (2,000 drops for a ban).
pub const GOSSIP_THROTTLE_PENALTY: f64 = 0.05;
/// Score added by one sync request or lease message over its limit: a peer that keeps
/// asking ten times faster than allowed is banned within seconds.
pub const SYNC_THROTTLE_PENALTY: f64 = 0.5;
pub const REFRESH_THROTTLE_PENALTY: f64 = 0.5;
pub const LEASE_THROTTLE_PENALTY: f64 = 1.0;
/// The flood score halves every this long, so an honest peer's occasional overshoot is
/// forgotten and only a sustained flood adds up to a ban.
pub const SCORE_HALF_LIFE: Duration = Duration::from_secs(60);
/// How long a ban lasts: long enough to stop a flood, short enough that a peer banned by
/// mistake (a buggy but honest client) comes back on its own.
pub const BAN_DURATION: Duration = Duration::from_secs(600);
/// A banned peer's connections close once the lease replies it is owed have been written
/// (`event_loop/closing.rs`), so the request that crossed the threshold gets its signed
/// denial first (README.md: "every reply, denials too, is signed"); but at most this long
/// after the ban: a grant still being prepared is not waited for.
pub const BAN_REPLY_GRACE: Duration = Duration::from_secs(5);
/// ...and this long after the last of those replies was written: a close sent right
/// behind a reply can reach the peer with it, and the peer's connection then ends before
/// the reply is read (seen on loopback, one time in two). Both are checked on the
/// maintenance tick too, so a close may come up to 2 s later.
pub const BAN_REPLY_LINGER: Duration = Duration::from_secs(1);

// ---- Sync: `/peervm/sync/1` (docs/architecture.md, "Sync") ------------------------------

/// Peers a joining node pulls the whole market from (each to its last page, every advert
/// valid) before new connections stop starting full syncs (docs/architecture.md, "Sync").
pub const MARKET_SOURCES: usize = 2;
/// Most adverts one page carries; the server's store answers a page of this size with
/// one scan of its ordered provider index.
pub const SYNC_MAX_PAGE_ITEMS: u32 = 1024;
/// Most envelope bytes one page carries: the protocol's sync reply cap (docs/protocol.md,
/// section 2).
pub const SYNC_MAX_PAGE_BYTES: usize = peervm_protocol::MAX_SYNC_REPLY_BYTES;
/// Block-list bytes the first page may carry besides its adverts (docs/protocol.md,
/// section 7a).
pub const SYNC_MAX_LIST_BYTES: usize = 256 * 1024;
/// Requests are tiny: a cursor and a limit.
pub const SYNC_MAX_REQUEST_BYTES: u64 = 1024;
/// A page on the wire: the adverts, the lists, and room for the CBOR framing.
pub const SYNC_MAX_RESPONSE_BYTES: u64 = (SYNC_MAX_PAGE_BYTES + SYNC_MAX_LIST_BYTES) as u64 + 64 * 1024;
/// A page request gives up after this long: a page is at most ~1.3 MiB, which takes well
/// under a second on any link a node can usefully serve from.
pub const SYNC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A sync session gives up after this many pages (1024 adverts each): far above any real
/// market, low enough that a peer cannot keep a node paging forever.
pub const MAX_SYNC_PAGES: usize = 512;
/// A page full of bad signatures counts as at most this many invalid messages: three
/// already ban the server, and the audit log gets ten lines rather than a thousand.
pub const MAX_INVALID_COUNTED_PER_PAGE: usize = 10;

// ---- Refresh: `/peervm/refresh/1` (docs/protocol.md, sections 4a and 9a) -----------------

/// How often a node sends each mesh peer the refresh records queued for it: records of
/// 24 bytes are cheaper in one frame a second than one frame each.
pub const REFRESH_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// A request: 4,096 records and the CBOR framing around them.
pub const REFRESH_MAX_REQUEST_BYTES: u64 =
    (peervm_protocol::MAX_BATCH_RECORDS * peervm_protocol::refresh::RECORD_LEN) as u64 + 96;
/// The answer is a word.
pub const REFRESH_MAX_RESPONSE_BYTES: u64 = 64;
pub const REFRESH_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A request full of forged tokens counts as at most this many invalid messages, as a
/// sync page does.
pub const MAX_INVALID_COUNTED_PER_REFRESH: usize = 10;

// ---- Block lists (SECURITY.md, "Reachability, block lists, owners") -------------------

/// Signers whose newest list a node holds (and serves by sync): every node relays every
/// valid list, so this bounds the memory a crowd of signers can take.
pub const MAX_HELD_BLOCK_LISTS: usize = 1024;
/// A node re-gossips its own published list every this many slow maintenance ticks
/// (5 min), so nodes that missed it (joined elsewhere, were partitioned) still get it.
pub const OWN_BLOCK_LIST_EVERY: u64 = 30;

// ---- Leases: `/peervm/lease/1` (docs/protocol.md, "Transport: /peervm/lease/1") --------

/// A signed request is well under 1 KiB; the cap leaves room for growth, not for abuse.
pub const LEASE_MAX_REQUEST_BYTES: u64 = 16 * 1024;
pub const LEASE_MAX_RESPONSE_BYTES: u64 = 16 * 1024;
/// A grant comes back once the guest's sshd is up: provisioning plus a software-emulated
/// boot of a systemd guest can take minutes, so the stream waits longer than the longest
/// boot deadline an image may ask for (`peervm_vmm::MAX_BOOT_DEADLINE_SECS`) plus
/// provisioning (a test below ties the two).
pub const LEASE_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// What provisioning (overlay, namespace, nftables, cgroups, QEMU's start) may take on
/// top of the boot deadline before the grant is sent.
pub const LEASE_PROVISIONING_ALLOWANCE: Duration = Duration::from_secs(120);
/// Lease streams open at once on one connection: a requestor with many leases in flight
/// is served, a flood of streams is refused by libp2p before it reaches the manager.
pub const LEASE_MAX_CONCURRENT_STREAMS: usize = 64;

// ---- Port verification: `/peervm/dialback/1` (docs/protocol.md, section 7c) ------------

/// Most ports one request may name: the libp2p port and a few SSH ports. Few enough that
/// nobody can use a node as a port scanner.
pub const DIALBACK_MAX_PORTS: usize = 8;
/// A peer gets one dial-back per this long: a provider checks at start and now and then,
/// not continually.
pub const DIALBACK_MIN_INTERVAL: Duration = Duration::from_secs(30);
/// Each probe waits this long for the TCP handshake; no answer by then means a firewall
/// drops it (`filtered`).
pub const DIALBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The asker waits this long for the result: the probes run concurrently, each at most
/// `DIALBACK_CONNECT_TIMEOUT`, so this leaves ample room for a busy server.
pub const DIALBACK_REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
pub const DIALBACK_MAX_REQUEST_BYTES: u64 = 1024;
pub const DIALBACK_MAX_RESPONSE_BYTES: u64 = 4096;

/// Refresh record ids naming no held advert kept for the next fetch by id (docs/protocol.md
/// section 9): one flush's worth. Beyond it, ids wait for their next token.
pub const MAX_MISSING_IDS: usize = 256;
/// An id fetched is not fetched again for this long: a token every 100 s (the default)
/// then costs an advert this node refuses one small request per token or less.
pub const MISSING_REFETCH: Duration = Duration::from_secs(60);
/// Ids remembered as fetched, each for `MISSING_REFETCH`; while it is full no new id is
/// fetched.
pub const MAX_FETCHED_IDS: usize = 4096;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_after_the_longest_boot_deadline_still_reaches_the_waiting_requestor() {
        let longest = Duration::from_secs(peervm_vmm::MAX_BOOT_DEADLINE_SECS) + LEASE_PROVISIONING_ALLOWANCE;
        assert!(longest <= LEASE_REQUEST_TIMEOUT, "{longest:?} > {LEASE_REQUEST_TIMEOUT:?}");
    }
}
