//! Requests in flight, each with the peer at the other end: outbound requests waiting for
//! their response (keyed by libp2p's request id), and inbound streams waiting for the
//! answer another task will give (keyed by a local id). One type for every protocol, so
//! trimming can ask each of them which peers are busy.
//!
//! Entries need no expiry of their own: libp2p ends an outbound request with a response or
//! an `OutboundFailure` (its timeout included), and inbound streams whose asker went away
//! are dropped by `retain` on the maintenance tick.

use std::collections::HashMap;
use std::hash::Hash;

use libp2p::PeerId;
use tokio::sync::oneshot;

use crate::network::NetworkError;

/// Where the answer to an outbound request goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, NetworkError>>;

pub(super) struct Pending<K, T> {
    entries: HashMap<K, (PeerId, T)>,
}

impl<K, T> Default for Pending<K, T> {
    fn default() -> Self {
        Self { entries: HashMap::new() }
    }
}

impl<K: Eq + Hash, T> Pending<K, T> {
    pub fn insert(&mut self, id: K, peer: PeerId, value: T) {
        self.entries.insert(id, (peer, value));
    }

    /// Removes the entry for `id`: its answer arrived, or it failed.
    pub fn take(&mut self, id: &K) -> Option<(PeerId, T)> {
        self.entries.remove(id)
    }

    pub fn has_peer(&self, peer: &PeerId) -> bool {
        self.entries.values().any(|(p, _)| p == peer)
    }

    /// The values of `peer`'s entries.
    pub fn of_peer_mut(&mut self, peer: &PeerId) -> impl Iterator<Item = &mut T> + '_ {
        let peer = *peer;
        self.entries.values_mut().filter(move |(p, _)| *p == peer).map(|(_, value)| value)
    }

    /// The peers with something in flight (a peer appears once per entry).
    pub fn peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.entries.values().map(|(p, _)| *p)
    }

    /// Keeps the entries for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.entries.retain(|_, (_, value)| keep(value));
    }
}

impl<K: Eq + Hash, T> Pending<K, Reply<T>> {
    /// Hands `result` to whoever waits for request `id`; nothing if nobody does (any more).
    pub fn answer(&mut self, id: &K, result: Result<T, NetworkError>) {
        if let Some((_, reply)) = self.take(id) {
            let _ = reply.send(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_taken_once_and_name_their_peers() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut pending: Pending<u64, &str> = Pending::default();
        pending.insert(1, a, "first");
        pending.insert(2, b, "second");
        assert!(pending.has_peer(&a) && pending.has_peer(&b));
        assert_eq!(pending.take(&1), Some((a, "first")));
        assert_eq!(pending.take(&1), None, "an answer is delivered once");
        assert!(!pending.has_peer(&a));
        pending.retain(|v| *v != "second");
        assert_eq!(pending.peers().count(), 0);
    }

    #[tokio::test]
    async fn an_answer_reaches_its_waiter_and_a_late_one_goes_nowhere() {
        let peer = PeerId::random();
        let mut pending: Pending<u64, Reply<u32>> = Pending::default();
        let (tx, rx) = oneshot::channel();
        pending.insert(7, peer, tx);
        pending.answer(&7, Ok(42));
        assert_eq!(rx.await.ok().and_then(|r| r.ok()), Some(42));
        pending.answer(&7, Err(NetworkError::Stopped)); // nobody waits: no panic
    }
}
