//! When a node re-dials the bootstrap nodes it lost (docs/architecture.md, "Peer discovery
//! and bootstraps").
//!
//! A node needs its bootstrap nodes to join and to rejoin: with no peer at all it re-dials
//! them on every maintenance tick, so a healed partition is noticed within seconds; below
//! its target, on every slow tick. A node that has its peers does not need them, and
//! re-dialling them anyway was the largest churn of a settled swarm: a bootstrap node
//! holds only so many connections (it trims above half its cap), every other node kept
//! dialling its bootstrap node back within 10 s of being trimmed, and in a 2,000-node
//! simulation the four bootstrap nodes trimmed about 55 connections a second, each of
//! them a handshake, a sync session and a Kademlia insertion on both sides (BENCHMARKS.md,
//! "Swarm upkeep"). So a node with its peers re-dials a lost bootstrap node only with
//! its routing-table refresh, every 5 min: a restarted bootstrap node still gets its
//! neighbourhood back, from every node, within that.

use crate::network::tuning::{KAD_REFRESH_EVERY, SLOW_EVERY};

/// Whether maintenance tick `tick` re-dials lost bootstrap nodes, for a node with
/// `connected` peers and a target of `target`.
pub(super) fn redial_due(tick: u64, connected: usize, target: usize) -> bool {
    if connected == 0 {
        return true;
    }
    if !tick.is_multiple_of(SLOW_EVERY) {
        return false;
    }
    connected < target || (tick / SLOW_EVERY).is_multiple_of(KAD_REFRESH_EVERY)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ticks among the first `ticks` on which a node re-dials.
    fn redials(ticks: u64, connected: usize, target: usize) -> Vec<u64> {
        (1..=ticks).filter(|&t| redial_due(t, connected, target)).collect()
    }

    #[test]
    fn a_node_without_peers_re_dials_on_every_tick() {
        assert_eq!(redials(7, 0, 8), (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn a_node_below_its_target_re_dials_on_every_slow_tick() {
        assert_eq!(redials(20, 3, 8), vec![5, 10, 15, 20]);
        assert_eq!(redials(20, 7, 8), vec![5, 10, 15, 20]);
    }

    #[test]
    fn a_node_with_its_peers_re_dials_only_with_the_routing_table_refresh() {
        let refresh = SLOW_EVERY * KAD_REFRESH_EVERY;
        assert_eq!(redials(3 * refresh, 8, 8), vec![refresh, 2 * refresh, 3 * refresh]);
        assert_eq!(redials(refresh, 40, 8), vec![refresh]);
    }
}
