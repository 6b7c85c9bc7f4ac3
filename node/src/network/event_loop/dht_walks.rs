//! When a node below its target looks for peers, and how (docs/architecture.md,
//! "Connection management").
//!
//! Looking for peers means dialling some the routing table knows, or walking the DHT when
//! it knows none; either may find nobody (the swarm is smaller than the target, or every
//! peer it reaches is full and trims it again). Repeating that every slow tick kept a
//! settled 1,000-node simulation's nodes answering lookups and refusing dials (BENCHMARKS.md,
//! "Swarm upkeep"). So it backs off: after a round that did not raise the node's peer
//! count, the next waits twice as long, up to the routing-table refresh period; a round
//! that raised it, or reaching the target, brings the pace back to every slow tick.

use crate::network::tuning::KAD_REFRESH_EVERY;

/// A walk of the DHT, and what it is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Walk {
    /// Below the target: dial peers the routing table knows, or, knowing none or when
    /// `lookup` (the last round found nobody: the table may hold only dead peers), one
    /// lookup of a random key (up to 20 peers from one path through the DHT, a tenth of a
    /// refresh's lookups).
    FindPeers { lookup: bool },
    /// Kademlia's bootstrap: a lookup of the node's own key, then one of a random key in
    /// every bucket beyond its nearest (about log2 of the swarm's size), which keeps the
    /// routing table fresh.
    Refresh,
}

#[derive(Debug)]
pub(super) struct DhtWalks {
    /// Slow ticks between rounds while below the target.
    every: u64,
    /// The slow tick of the last round made below the target.
    last: u64,
    /// Peers connected when that round started, until the next slow tick judges it.
    judged_against: Option<usize>,
    /// The last round judged did not raise the peer count.
    failed: bool,
}

impl DhtWalks {
    pub fn new() -> Self {
        Self { every: 1, last: 0, judged_against: None, failed: false }
    }

    /// Which walk to make on slow tick `tick`, with `connected` peers and a target of
    /// `target`: while below the target, one to find peers at the current pace; and every
    /// `KAD_REFRESH_EVERY` slow ticks a refresh anyway. A node without any peer has nobody
    /// to ask (its bootstrap nodes are re-dialled instead).
    pub fn due(&mut self, tick: u64, connected: usize, target: usize) -> Option<Walk> {
        if connected == 0 {
            // Nobody to ask; once a bootstrap node answers again, look for peers at once.
            *self = Self { last: self.last, ..Self::new() };
            return None;
        }
        if let Some(before) = self.judged_against.take() {
            self.failed = connected <= before;
            self.every = if self.failed { (self.every * 2).min(KAD_REFRESH_EVERY) } else { 1 };
        }
        if connected >= target {
            self.every = 1;
            self.failed = false;
        }
        let below = connected < target;
        let walk = if tick.is_multiple_of(KAD_REFRESH_EVERY) {
            Walk::Refresh
        } else if below && tick >= self.last + self.every {
            Walk::FindPeers { lookup: self.failed }
        } else {
            return None;
        };
        if below {
            self.last = tick;
            self.judged_against = Some(connected);
        }
        Some(walk)
    }

    /// Slow ticks between walks below the target.
    #[cfg(test)]
    fn pace(&self) -> u64 {
        self.every
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The slow ticks in `ticks` on which a node stuck at `connected` peers walks.
    fn walks(w: &mut DhtWalks, ticks: std::ops::Range<u64>, connected: usize, target: usize) -> Vec<u64> {
        ticks.filter(|&t| w.due(t, connected, target).is_some()).collect()
    }

    #[test]
    fn walks_that_find_no_peer_back_off_to_the_refresh_period() {
        let mut w = DhtWalks::new();
        // Stuck at 3 of 8 (a swarm of four nodes): 2, 4, 8 ticks apart, then at the
        // refresh period.
        assert_eq!(walks(&mut w, 1..100, 3, 8), [1, 3, 7, 15, 30, 60, 90]);
        assert_eq!(w.pace(), KAD_REFRESH_EVERY);
    }

    #[test]
    fn a_walk_that_raises_the_peer_count_keeps_the_pace_at_every_tick() {
        let mut w = DhtWalks::new();
        for (tick, connected) in (1..=6).zip(1..) {
            assert_eq!(w.due(tick, connected, 8), Some(Walk::FindPeers { lookup: false }), "tick {tick}");
        }
        assert_eq!(w.pace(), 1);
    }

    #[test]
    fn reaching_the_target_resets_the_pace_and_stops_walking() {
        let mut w = DhtWalks::new();
        walks(&mut w, 1..20, 5, 8);
        assert!(w.pace() > 4);
        assert_eq!(w.due(20, 8, 8), None, "at the target, no walk but the periodic refresh");
        assert_eq!(w.pace(), 1);
        assert_eq!(
            w.due(21, 7, 8),
            Some(Walk::FindPeers { lookup: false }),
            "a node that drops below walks on the next tick"
        );
    }

    #[test]
    fn a_node_without_peers_never_walks() {
        let mut w = DhtWalks::new();
        assert!(walks(&mut w, 1..100, 0, 8).is_empty());
    }

    #[test]
    fn a_node_at_its_target_walks_only_to_refresh_its_routing_table() {
        let mut w = DhtWalks::new();
        assert_eq!(walks(&mut w, 1..100, 12, 8), [30, 60, 90]);
        assert_eq!(w.due(120, 12, 8), Some(Walk::Refresh));
    }

    #[test]
    fn a_node_below_its_target_refreshes_on_the_refresh_ticks_and_looks_for_peers_between() {
        let mut w = DhtWalks::new();
        assert_eq!(w.due(29, 2, 8), Some(Walk::FindPeers { lookup: false }));
        assert_eq!(w.due(30, 3, 8), Some(Walk::Refresh));
        assert_eq!(w.due(31, 4, 8), Some(Walk::FindPeers { lookup: false }));
    }

    #[test]
    fn after_a_round_that_found_nobody_the_next_one_walks_the_dht() {
        let mut w = DhtWalks::new();
        assert_eq!(w.due(1, 3, 8), Some(Walk::FindPeers { lookup: false }), "the routing table's peers first");
        assert_eq!(w.due(2, 3, 8), None, "judged: nobody found, the pace halves");
        assert_eq!(w.due(3, 3, 8), Some(Walk::FindPeers { lookup: true }), "a lookup, not the same dead peers");
        assert_eq!(
            w.due(4, 5, 8),
            Some(Walk::FindPeers { lookup: false }),
            "the lookup found two: the known peers again, every tick"
        );
    }

    #[test]
    fn a_node_that_lost_every_peer_looks_for_peers_at_once_when_one_returns() {
        let mut w = DhtWalks::new();
        walks(&mut w, 1..40, 3, 8);
        assert_eq!(w.pace(), KAD_REFRESH_EVERY);
        assert_eq!(w.due(41, 0, 8), None);
        assert_eq!(w.pace(), 1);
        assert_eq!(w.due(43, 1, 8), Some(Walk::FindPeers { lookup: false }));
    }
}
