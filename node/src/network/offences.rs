//! The memory of invalid messages (bad signatures, malformed or forged adverts, lease
//! messages and sync pages) per peer: the rule that bans slow abuse (docs/architecture.md,
//! "Abuse handling"; SECURITY.md, invariants 1 and 11).
//!
//! A peer is banned when its `count`-th invalid message comes at most `window` after the
//! `count - 1` before it: by default, 3 invalid messages within one hour. An honest node
//! never sends one (it validates before it forwards), so three are proof; an hour is long
//! enough that a peer sending one invalid advert every 36 s, under the flood score's
//! one-minute half-life, is banned at its third, while a peer with rare isolated errors
//! (fewer than three in any hour) never is. Unlike the flood score, this record is kept
//! when the peer disconnects, so reconnecting does not wipe it, and after a ban, so a peer
//! that resumes within the hour is banned again at once.
//!
//! Memory stays bounded whatever a swarm of fresh peer ids does: a record holds at most
//! `count` instants, and the table at most `max_peers` records. When it is full, records
//! whose newest offence has left the window (they can no longer lead to a ban) go first,
//! then the record whose newest offence is the oldest.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use libp2p::PeerId;

/// When invalid messages ban a peer, and how many peers' records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidRule {
    /// Invalid messages that ban a peer when they fall within `window`.
    pub count: usize,
    pub window: Duration,
    /// Peers whose recent invalid messages are remembered at once.
    pub max_peers: usize,
}

/// The recent invalid messages of each peer that sent any.
pub struct Offences {
    rule: InvalidRule,
    records: HashMap<PeerId, VecDeque<Instant>>,
}

impl Offences {
    pub fn new(rule: InvalidRule) -> Self {
        Self { rule, records: HashMap::new() }
    }

    /// Records an invalid message from `peer` at `now`; true when it completes the rule
    /// (this and the `count - 1` before it within `window`).
    pub fn record(&mut self, peer: PeerId, now: Instant) -> bool {
        let count = self.rule.count.max(1);
        if !self.records.contains_key(&peer) && self.records.len() >= self.rule.max_peers.max(1) {
            self.make_room(now);
        }
        let times = self.records.entry(peer).or_insert_with(|| VecDeque::with_capacity(count));
        times.push_back(now);
        while times.len() > count {
            times.pop_front();
        }
        times.len() == count
            && times.front().is_some_and(|first| now.saturating_duration_since(*first) <= self.rule.window)
    }

    /// Drops the records that can no longer lead to a ban; if none can go, the one whose
    /// newest offence is the oldest.
    fn make_room(&mut self, now: Instant) {
        let window = self.rule.window;
        self.records.retain(|_, times| times.back().is_some_and(|t| now.saturating_duration_since(*t) <= window));
        if self.records.len() < self.rule.max_peers.max(1) {
            return;
        }
        let stalest = self.records.iter().min_by_key(|(_, times)| times.back().copied()).map(|(peer, _)| *peer);
        if let Some(peer) = stalest {
            self.records.remove(&peer);
        }
    }

    /// Peers with a record.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn rule() -> InvalidRule {
        InvalidRule { count: 3, window: 60 * MIN, max_peers: 4 }
    }

    /// The verdicts of one invalid message every `every`, `n` times.
    fn every(offences: &mut Offences, peer: PeerId, t0: Instant, every: Duration, n: u32) -> Vec<bool> {
        (0..n).map(|i| offences.record(peer, t0 + every * i)).collect()
    }

    #[test]
    fn the_third_within_the_window_completes_the_rule_and_its_edge_is_inclusive() {
        let t0 = Instant::now();
        let mut o = Offences::new(rule());
        assert_eq!(every(&mut o, PeerId::random(), t0, 30 * MIN, 3), [false, false, true]);
        assert_eq!(every(&mut o, PeerId::random(), t0, 30 * MIN + Duration::from_secs(1), 100), [false; 100]);
    }

    #[test]
    fn a_full_table_drops_stale_records_first_then_the_stalest() {
        let t0 = Instant::now();
        let mut o = Offences::new(rule());
        let abuser = PeerId::random();
        let old = PeerId::random();
        assert!(!o.record(old, t0));
        assert!(!o.record(abuser, t0 + 2 * MIN));
        for i in 0..2 {
            assert!(!o.record(PeerId::random(), t0 + 3 * MIN + Duration::from_secs(i)));
        }
        assert_eq!(o.len(), 4);
        // Full: a new peer pushes out the record whose newest offence is the oldest (`old`).
        assert!(!o.record(PeerId::random(), t0 + 4 * MIN));
        assert_eq!(o.len(), 4);
        assert!(!o.record(abuser, t0 + 5 * MIN), "the abuser's first offence is remembered");
        assert!(o.record(abuser, t0 + 6 * MIN), "its third within the hour completes the rule");
        // An hour later every record is stale: they all go for the next newcomer.
        assert!(!o.record(PeerId::random(), t0 + 70 * MIN));
        assert_eq!(o.len(), 1);
    }
}
