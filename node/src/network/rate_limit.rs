//! Per-peer rate limits and misbehaviour accounting (SECURITY.md, invariant 11: one
//! peer's flood does not stop another peer's work).
//!
//! Each peer gets a token bucket per API. A message over the limit is dropped and adds a
//! little to the peer's misbehaviour score; an invalid signature adds a lot. The score
//! decays over time; a peer whose score reaches the ban threshold is banned (blocked and
//! disconnected) for a while.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

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
    Lease,
}

impl Api {
    /// The API's name in metrics (`peervm_rate_limited_total{api=...}`) and the audit log.
    pub fn label(self) -> &'static str {
        match self {
            Api::Gossip => "gossip",
            Api::Sync => "sync",
            Api::Lease => "lease",
        }
    }
}

/// What one message over an API's limit adds to the sender's misbehaviour score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottlePenalty {
    pub gossip: f64,
    pub sync: f64,
    pub lease: f64,
}

/// Every per-peer limit and the ban rule. The defaults and the reasons for them are in
/// `tuning.rs`.
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub gossip: RateLimit,
    pub sync: RateLimit,
    pub lease: RateLimit,
    /// Score at which a peer is banned.
    pub ban_threshold: f64,
    /// Score added by an invalid signature or malformed message.
    pub invalid_penalty: f64,
    /// Score added by a message dropped for exceeding its API's rate.
    pub throttle_penalty: ThrottlePenalty,
    /// The score halves every this long.
    pub score_half_life: Duration,
    pub ban_duration: Duration,
}

impl RateLimits {
    pub fn of(&self, api: Api) -> RateLimit {
        match api {
            Api::Gossip => self.gossip,
            Api::Sync => self.sync,
            Api::Lease => self.lease,
        }
    }

    pub fn throttle_penalty_of(&self, api: Api) -> f64 {
        match api {
            Api::Gossip => self.throttle_penalty.gossip,
            Api::Sync => self.throttle_penalty.sync,
            Api::Lease => self.throttle_penalty.lease,
        }
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            gossip: RateLimit { per_sec: tuning::GOSSIP_PER_SEC, burst: tuning::GOSSIP_BURST },
            sync: RateLimit { per_sec: tuning::SYNC_PER_SEC, burst: tuning::SYNC_BURST },
            lease: RateLimit { per_sec: tuning::LEASE_PER_SEC, burst: tuning::LEASE_BURST },
            ban_threshold: tuning::BAN_THRESHOLD,
            invalid_penalty: tuning::INVALID_PENALTY,
            throttle_penalty: ThrottlePenalty {
                gossip: tuning::GOSSIP_THROTTLE_PENALTY,
                sync: tuning::SYNC_THROTTLE_PENALTY,
                lease: tuning::LEASE_THROTTLE_PENALTY,
            },
            score_half_life: tuning::SCORE_HALF_LIFE,
            ban_duration: tuning::BAN_DURATION,
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

pub struct PeerGuard {
    limits: RateLimits,
    peers: HashMap<PeerId, PeerState>,
    banned: HashMap<PeerId, Instant>,
}

impl PeerGuard {
    pub fn new(limits: RateLimits) -> Self {
        Self { limits, peers: HashMap::new(), banned: HashMap::new() }
    }

    pub fn limits(&self) -> &RateLimits {
        &self.limits
    }

    fn state(&mut self, peer: PeerId, now: Instant) -> &mut PeerState {
        self.peers.entry(peer).or_insert_with(|| PeerState { buckets: HashMap::new(), score: 0.0, scored_at: now })
    }

    /// Takes one token of `api` for `peer`. False means: drop the message. Dropping also
    /// raises the peer's score a little, so a sustained flood ends in a ban.
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

    /// Records an invalid message (bad signature, malformed) from `peer`.
    pub fn invalid(&mut self, peer: PeerId, now: Instant) -> Verdict {
        let penalty = self.limits.invalid_penalty;
        self.penalise(peer, penalty, now)
    }

    fn penalise(&mut self, peer: PeerId, amount: f64, now: Instant) -> Verdict {
        let half_life = self.limits.score_half_life.as_secs_f64();
        let threshold = self.limits.ban_threshold;
        let state = self.state(peer, now);
        let dt = now.saturating_duration_since(state.scored_at).as_secs_f64();
        state.score = state.score * 0.5f64.powf(dt / half_life) + amount;
        state.scored_at = now;
        if state.score >= threshold && !self.banned.contains_key(&peer) {
            self.banned.insert(peer, now + self.limits.ban_duration);
            return Verdict::Ban;
        }
        Verdict::Ok
    }

    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.banned.contains_key(peer)
    }

    /// Bans that have run out; the caller unblocks them.
    pub fn expired_bans(&mut self, now: Instant) -> Vec<PeerId> {
        let done: Vec<PeerId> = self.banned.iter().filter(|(_, until)| **until <= now).map(|(p, _)| *p).collect();
        for p in &done {
            self.banned.remove(p);
            self.peers.remove(p);
        }
        done
    }

    /// Forgets the rate state of a disconnected peer (bans are kept), so memory stays
    /// bounded by the number of connected peers.
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    pub fn tracked_peers(&self) -> usize {
        self.peers.len()
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
}
