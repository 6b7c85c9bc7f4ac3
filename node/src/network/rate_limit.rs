//! Per-peer rate limits and misbehaviour accounting (invariant 11: one peer's flood
//! does not stop another peer's work).
//!
//! Each peer gets a token bucket per API. A message over the limit is dropped and adds a
//! little to the peer's misbehaviour score; an invalid signature adds a lot. The score
//! decays over time; a peer whose score reaches the ban threshold is banned (blocked and
//! disconnected) for a while.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    burst: f64,
    per_sec: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_sec: f64, burst: f64, now: Instant) -> Self {
        Self { tokens: burst, burst, per_sec, last: now }
    }

    /// Takes `n` tokens if there are enough.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
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

/// Limits per API: (per second, burst).
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub gossip: (f64, f64),
    pub sync: (f64, f64),
    pub lease: (f64, f64),
    /// Score at which a peer is banned.
    pub ban_threshold: f64,
    /// Score added by an invalid signature or malformed message.
    pub invalid_penalty: f64,
    /// Score added by a message dropped for exceeding the rate of (gossip, sync, lease).
    /// A relay can overshoot the gossip rate in an honest burst, so that costs little; a
    /// peer that keeps asking for leases or snapshots ten times faster than allowed is
    /// banned within seconds.
    pub throttle_penalty: (f64, f64, f64),
    /// The score halves every this long.
    pub score_half_life: Duration,
    pub ban_duration: Duration,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            // A relay forwards everybody's adverts: 10,000 providers re-publishing every
            // 60 s is ~170 adverts/s through one peer.
            gossip: (400.0, 2000.0),
            // A full snapshot of 10,000 adverts is ~7 pages of 1 MiB.
            sync: (4.0, 32.0),
            lease: (2.0, 10.0),
            ban_threshold: 100.0,
            // An honest relay never forwards an invalid signature (it validates first), so
            // three are proof enough. Gossipsub graylists a peer after its fifth invalid
            // message (see gossip_params.rs); the ban must come before that, or the node
            // would stop hearing, and counting, the peer's messages.
            invalid_penalty: 34.0,
            throttle_penalty: (0.05, 0.5, 1.0),
            score_half_life: Duration::from_secs(60),
            ban_duration: Duration::from_secs(600),
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
        let (per_sec, burst) = match api {
            Api::Gossip => self.limits.gossip,
            Api::Sync => self.limits.sync,
            Api::Lease => self.limits.lease,
        };
        let state = self.state(peer, now);
        let bucket = state.buckets.entry(api).or_insert_with(|| TokenBucket::new(per_sec, burst, now));
        if bucket.try_take(1.0, now) {
            return (true, Verdict::Ok);
        }
        let penalty = match api {
            Api::Gossip => self.limits.throttle_penalty.0,
            Api::Sync => self.limits.throttle_penalty.1,
            Api::Lease => self.limits.throttle_penalty.2,
        };
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
        let mut b = TokenBucket::new(10.0, 5.0, t0);
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
        let mut g = PeerGuard::new(RateLimits { gossip: (1.0, 1.0), ..RateLimits::default() });
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
