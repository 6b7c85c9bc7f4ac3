//! Per-peer rate limits and misbehaviour accounting (SECURITY.md, invariant 11: one
//! peer's flood does not stop another peer's work).
//!
//! Each peer gets a token bucket per API. A message over the limit is dropped and adds a
//! little to the peer's flood score, which halves every minute: only a sustained flood
//! reaches the ban threshold. Invalid messages (a bad signature, malformed bytes) are
//! counted apart, in `offences.rs`, and remembered for an hour, so slow abuse is banned
//! too (docs/architecture.md, "Abuse handling"). A banned peer is blocked and
//! disconnected for a while; the table of bans is bounded like every other table here.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use super::offences::{InvalidRule, Offences};
use super::tuning;

/// A sustained rate with a burst: a token bucket holds `burst` tokens and refills at
/// `per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_sec: f64,
    pub burst: f64,
}

/// A token bucket that enforces one [`RateLimit`].
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    limit: RateLimit,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        Self { tokens: limit.burst, limit, last: now }
    }

    /// Takes `n` tokens if there are enough.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.limit.per_sec).min(self.limit.burst);
        self.last = now;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The APIs that are limited separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    Gossip,
    Sync,
    Refresh,
    Lease,
}

impl Api {
    /// The API's name in metrics (`peervm_rate_limited_total{api=...}`) and the audit log.
    pub fn label(self) -> &'static str {
        match self {
            Api::Gossip => "gossip",
            Api::Sync => "sync",
            Api::Refresh => "refresh",
            Api::Lease => "lease",
        }
    }
}

/// What one message over an API's limit adds to the sender's misbehaviour score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottlePenalty {
    pub gossip: f64,
    pub sync: f64,
    pub refresh: f64,
    pub lease: f64,
}

/// Every per-peer limit and the ban rule. The defaults and the reasons for them are in
/// `tuning.rs`.
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub gossip: RateLimit,
    pub sync: RateLimit,
    pub refresh: RateLimit,
    pub lease: RateLimit,
    /// Flood score at which a peer is banned.
    pub ban_threshold: f64,
    /// Score added by a message dropped for exceeding its API's rate.
    pub throttle_penalty: ThrottlePenalty,
    /// The flood score halves every this long.
    pub score_half_life: Duration,
    /// When invalid signatures and malformed messages ban a peer (`offences.rs`).
    pub invalid: InvalidRule,
    pub ban_duration: Duration,
    /// Bans in force at once; when full, the ban that would end soonest is lifted early.
    pub max_bans: usize,
}

impl RateLimits {
    pub fn of(&self, api: Api) -> RateLimit {
        match api {
            Api::Gossip => self.gossip,
            Api::Sync => self.sync,
            Api::Refresh => self.refresh,
            Api::Lease => self.lease,
        }
    }

    pub fn throttle_penalty_of(&self, api: Api) -> f64 {
        match api {
            Api::Gossip => self.throttle_penalty.gossip,
            Api::Sync => self.throttle_penalty.sync,
            Api::Refresh => self.throttle_penalty.refresh,
            Api::Lease => self.throttle_penalty.lease,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            gossip: RateLimit { per_sec: tuning::GOSSIP_PER_SEC, burst: tuning::GOSSIP_BURST },
            sync: RateLimit { per_sec: tuning::SYNC_PER_SEC, burst: tuning::SYNC_BURST },
            refresh: RateLimit { per_sec: tuning::REFRESH_PER_SEC, burst: tuning::REFRESH_BURST },
            lease: RateLimit { per_sec: tuning::LEASE_PER_SEC, burst: tuning::LEASE_BURST },
            ban_threshold: tuning::BAN_THRESHOLD,
            throttle_penalty: ThrottlePenalty {
                gossip: tuning::GOSSIP_THROTTLE_PENALTY,
                sync: tuning::SYNC_THROTTLE_PENALTY,
                refresh: tuning::REFRESH_THROTTLE_PENALTY,
                lease: tuning::LEASE_THROTTLE_PENALTY,
            },
            score_half_life: tuning::SCORE_HALF_LIFE,
            invalid: InvalidRule {
                count: tuning::INVALID_BAN_COUNT,
                window: tuning::INVALID_WINDOW,
                max_peers: tuning::MAX_OFFENDERS,
            },
            ban_duration: tuning::BAN_DURATION,
            max_bans: tuning::MAX_BANS,
        }
    }
}

struct PeerState {
    buckets: HashMap<Api, TokenBucket>,
    score: f64,
    scored_at: Instant,
}

/// What the caller should do after recording an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// The peer just crossed the ban threshold.
    Ban,
}

/// Rate state of connected peers, the invalid messages of recent offenders, and bans.
///
/// Memory: `peers` holds connected peers only (the caller forgets a peer when its last
/// connection closes, and only a connected peer's messages reach `allow`); `offences` and
/// `banned` have caps of their own, so a swarm of fresh peer ids cannot grow any of them
/// without bound.
pub struct PeerGuard {
    limits: RateLimits,
    peers: HashMap<PeerId, PeerState>,
    offences: Offences,
    banned: HashMap<PeerId, Instant>,
    /// Bans lifted before their time to make room for a new one; the caller unblocks them
    /// with the expired ones.
    lifted_early: Vec<PeerId>,
}

impl PeerGuard {
    pub fn new(limits: RateLimits) -> Self {
        let offences = Offences::new(limits.invalid);
        Self { limits, peers: HashMap::new(), offences, banned: HashMap::new(), lifted_early: Vec::new() }
    }

    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    fn state(&mut self, peer: PeerId, now: Instant) -> &mut PeerState {
        self.peers.entry(peer).or_insert_with(|| PeerState { buckets: HashMap::new(), score: 0.0, scored_at: now })
    }

    /// Takes one token of `api` for `peer`. False means: drop the message. Dropping also
    /// raises the peer's flood score a little, so a sustained flood ends in a ban.
    pub fn allow(&mut self, peer: PeerId, api: Api, now: Instant) -> (bool, Verdict) {
        let limit = self.limits.of(api);
        let state = self.state(peer, now);
        let bucket = state.buckets.entry(api).or_insert_with(|| TokenBucket::new(limit, now));
        if bucket.try_take(1.0, now) {
            return (true, Verdict::Ok);
        }
        let penalty = self.limits.throttle_penalty_of(api);
        (false, self.penalise(peer, penalty, now))
    }

    /// Records an invalid message (bad signature, malformed) from `peer`: the rule of
    /// `offences.rs` decides the ban. It needs no rate state, so a report that arrives
    /// after the peer left (the lease manager answers later) creates none.
    pub fn invalid(&mut self, peer: PeerId, now: Instant) -> Verdict {
        if self.offences.record(peer, now) { self.ban(peer, now) } else { Verdict::Ok }
    }

    fn penalise(&mut self, peer: PeerId, amount: f64, now: Instant) -> Verdict {
        let half_life = self.limits.score_half_life.as_secs_f64();
        let threshold = self.limits.ban_threshold;
        let state = self.state(peer, now);
        let dt = now.saturating_duration_since(state.scored_at).as_secs_f64();
        state.score = state.score * 0.5f64.powf(dt / half_life) + amount;
        state.scored_at = now;
        if state.score >= threshold { self.ban(peer, now) } else { Verdict::Ok }
    }

    /// Bans `peer` unless it is banned already; a full table first lifts the ban that
    /// would end soonest.
    fn ban(&mut self, peer: PeerId, now: Instant) -> Verdict {
        if self.banned.contains_key(&peer) {
            return Verdict::Ok;
        }
        if self.banned.len() >= self.limits.max_bans.max(1) {
            let soonest = self.banned.iter().min_by_key(|(_, until)| **until).map(|(p, _)| *p);
            if let Some(p) = soonest {
                self.banned.remove(&p);
                self.peers.remove(&p);
                self.lifted_early.push(p);
            }
        }
        self.banned.insert(peer, now + self.limits.ban_duration);
        Verdict::Ban
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains_key(peer)
    }

    /// Bans that have run out, or were lifted early to make room; the caller unblocks
    /// them. A peer's record of invalid messages outlives its ban.
    pub fn expired_bans(&mut self, now: Instant) -> Vec<PeerId> {
        let mut done: Vec<PeerId> = self.banned.iter().filter(|(_, until)| **until <= now).map(|(p, _)| *p).collect();
        for p in &done {
            self.banned.remove(p);
            self.peers.remove(p);
        }
        // One lifted early and banned again since stays blocked.
        let lifted: Vec<PeerId> = self.lifted_early.drain(..).filter(|p| !self.banned.contains_key(p)).collect();
        done.extend(lifted);
        done
    }

    /// Forgets the rate state of a disconnected peer (bans and the record of invalid
    /// messages are kept), so this table stays bounded by the number of connected peers.
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    pub fn tracked_peers(&self) -> usize {
        self.peers.len()
    }

    /// Peers whose recent invalid messages are remembered.
    pub fn offenders(&self) -> usize {
        self.offences.len()
    }

    pub fn bans(&self) -> usize {
        self.banned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_and_caps() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(RateLimit { per_sec: 10.0, burst: 5.0 }, t0);
        assert!((0..5).all(|_| b.try_take(1.0, t0)));
        assert!(!b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0 + Duration::from_millis(100)));
        // Refill never exceeds the burst.
        let later = t0 + Duration::from_secs(100);
        assert!((0..5).all(|_| b.try_take(1.0, later)));
        assert!(!b.try_take(1.0, later));
    }

    #[test]
    fn flood_ends_in_ban_and_invalid_messages_faster() {
        let t0 = Instant::now();
        let mut g =
            PeerGuard::new(RateLimits { gossip: RateLimit { per_sec: 1.0, burst: 1.0 }, ..RateLimits::default() });
        let flooder = PeerId::random();
        let honest = PeerId::random();
        let mut banned_after = None;
        for i in 0..10_000 {
            let (_, v) = g.allow(flooder, Api::Gossip, t0);
            if v == Verdict::Ban {
                banned_after = Some(i);
                break;
            }
        }
        assert!(banned_after.is_some_and(|n| n > 100), "{banned_after:?}");
        assert!(g.allow(honest, Api::Gossip, t0).0, "another peer is unaffected");
        let liar = PeerId::random();
        let bans: Vec<Verdict> = (0..3).map(|_| g.invalid(liar, t0)).collect();
        assert_eq!(bans, vec![Verdict::Ok, Verdict::Ok, Verdict::Ban]);
        assert!(g.is_banned(&liar));
        assert_eq!(g.expired_bans(t0 + Duration::from_secs(601)).len(), 2);
    }

    const SEC: Duration = Duration::from_secs(1);
    const MIN: Duration = Duration::from_secs(60);

    /// The verdicts on one invalid message from `peer` every `every`, `n` of them from `t0`.
    fn invalid_every(g: &mut PeerGuard, peer: PeerId, t0: Instant, every: Duration, n: u32) -> Vec<Verdict> {
        (0..n).map(|i| g.invalid(peer, t0 + every * i)).collect()
    }

    #[test]
    fn one_invalid_advert_every_36_s_is_banned_at_the_third() {
        let t0 = Instant::now();
        let mut g = PeerGuard::new(RateLimits::default());
        let slow = PeerId::random();
        assert_eq!(invalid_every(&mut g, slow, t0, 36 * SEC, 3), [Verdict::Ok, Verdict::Ok, Verdict::Ban]);
        assert!(g.is_banned(&slow));
        // The same at the slowest pace the rule still catches: three within the hour.
        let slower = PeerId::random();
        assert_eq!(invalid_every(&mut g, slower, t0, 30 * MIN, 3), [Verdict::Ok, Verdict::Ok, Verdict::Ban]);
    }

    #[test]
    fn rare_isolated_errors_never_ban() {
        let t0 = Instant::now();
        let mut g = PeerGuard::new(RateLimits::default());
        // One every 31 minutes, for two days: never three within an hour.
        let rare = PeerId::random();
        assert!(invalid_every(&mut g, rare, t0, 31 * MIN, 93).iter().all(|v| *v == Verdict::Ok));
        // Two at once, then quiet for more than an hour, again and again.
        let pairs = PeerId::random();
        for i in 0..48u32 {
            let at = t0 + 61 * MIN * i;
            assert_eq!([g.invalid(pairs, at), g.invalid(pairs, at + SEC)], [Verdict::Ok, Verdict::Ok], "pair {i}");
        }
        assert!(!g.is_banned(&rare) && !g.is_banned(&pairs));
    }

    #[test]
    fn reconnecting_keeps_the_record_and_a_peer_resuming_after_its_ban_is_banned_again() {
        let t0 = Instant::now();
        let mut g = PeerGuard::new(RateLimits::default());
        let peer = PeerId::random();
        for i in 0..2u32 {
            assert_eq!(g.invalid(peer, t0 + 36 * SEC * i), Verdict::Ok);
            g.forget(&peer); // it disconnects and comes back with a new connection
        }
        assert_eq!(g.invalid(peer, t0 + 72 * SEC), Verdict::Ban);
        assert_eq!(g.expired_bans(t0 + 72 * SEC + RateLimits::default().ban_duration), [peer]);
        // Back after ten minutes, still within the hour of its last two: banned at once.
        assert_eq!(g.invalid(peer, t0 + 11 * MIN), Verdict::Ban);
    }

    #[test]
    fn a_swarm_of_fresh_ids_grows_no_table_past_its_cap() {
        let t0 = Instant::now();
        let limits = RateLimits {
            invalid: InvalidRule { max_peers: 16, ..RateLimits::default().invalid },
            max_bans: 8,
            ..RateLimits::default()
        };
        let mut g = PeerGuard::new(limits);
        let sybils: Vec<PeerId> = (0..1000).map(|_| PeerId::random()).collect();
        for (i, peer) in sybils.iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            let verdicts: Vec<Verdict> = (0..3).map(|_| g.invalid(*peer, at)).collect();
            assert_eq!(verdicts, [Verdict::Ok, Verdict::Ok, Verdict::Ban], "sybil {i}");
            // Each one reconnects once: its rate state comes and goes with its connection.
            assert!(g.allow(*peer, Api::Lease, at).0);
            g.forget(peer);
            assert!(g.offenders() <= 16 && g.bans() <= 8 && g.tracked_peers() == 0, "after sybil {i}");
        }
        // The bans lifted to make room are handed back for unblocking; the newest stay.
        let lifted = g.expired_bans(t0 + Duration::from_secs(1));
        assert_eq!(lifted.len(), 1000 - 8);
        assert!(sybils[1000 - 8..].iter().all(|p| g.is_banned(p)));
        assert!(sybils[..1000 - 8].iter().all(|p| !g.is_banned(p)));
    }
}
