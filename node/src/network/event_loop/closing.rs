//! When a banned peer's connections close (README.md: "every reply, denials too, is
//! signed"; docs/architecture.md, "Abuse handling"). The ban itself takes effect at once:
//! the peer's messages are no longer read. Its connections close only when it is owed no
//! lease reply (the denial of the request that got it banned, typically):
//!
//! - a peer owed nothing is closed at once;
//! - a peer owed a reply is closed `linger` after the last one was written: closing right
//!   behind the reply would let the close overtake it at the peer, whose connection ends,
//!   dropping the unread reply, as soon as it reads the close;
//! - whatever it is owed, a peer is closed `grace` after its ban (a grant still being
//!   prepared is not waited for).
//!
//! Pure bookkeeping over instants the caller passes, so the rule is tested without a swarm.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;

struct Banned {
    /// Closed at this instant whatever it is owed.
    deadline: Instant,
    /// It was owed a reply at some point since the ban.
    was_owed: bool,
    /// Since when it has been owed nothing (after being owed something).
    settled_at: Option<Instant>,
}

pub(super) struct Closing {
    grace: Duration,
    linger: Duration,
    peers: HashMap<PeerId, Banned>,
}

impl Closing {
    pub fn new(grace: Duration, linger: Duration) -> Self {
        Self { grace, linger, peers: HashMap::new() }
    }

    /// `peer` was banned at `now`; its connections wait for `due`.
    pub fn start(&mut self, peer: PeerId, now: Instant) {
        self.peers.insert(peer, Banned { deadline: now + self.grace, was_owed: false, settled_at: None });
    }

    /// The peers whose connections close now (forgotten here); `owes_reply` says whether a
    /// lease reply to a peer is still pending or being written.
    pub fn due(&mut self, now: Instant, owes_reply: impl Fn(&PeerId) -> bool) -> Vec<PeerId> {
        if self.peers.is_empty() {
            return Vec::new();
        }
        let linger = self.linger;
        let mut due = Vec::new();
        for (peer, b) in &mut self.peers {
            let close = if now >= b.deadline {
                true
            } else if owes_reply(peer) {
                b.was_owed = true;
                b.settled_at = None;
                false
            } else if !b.was_owed {
                true
            } else {
                now >= *b.settled_at.get_or_insert(now) + linger
            };
            if close {
                due.push(*peer);
            }
        }
        for peer in &due {
            self.peers.remove(peer);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn closing() -> Closing {
        Closing::new(5_000 * MS, 1_000 * MS)
    }

    #[test]
    fn a_peer_owed_nothing_is_closed_at_once() {
        let t0 = Instant::now();
        let mut c = closing();
        let peer = PeerId::random();
        c.start(peer, t0);
        assert_eq!(c.due(t0, |_| false), [peer]);
        assert!(c.due(t0, |_| false).is_empty(), "closed once");
    }

    #[test]
    fn a_peer_owed_a_reply_is_closed_a_linger_after_it_was_written() {
        let t0 = Instant::now();
        let mut c = closing();
        let peer = PeerId::random();
        c.start(peer, t0);
        assert!(c.due(t0, |_| true).is_empty(), "the denial is pending");
        assert!(c.due(t0 + 10 * MS, |_| false).is_empty(), "written: the linger starts");
        assert!(c.due(t0 + 1_009 * MS, |_| false).is_empty());
        assert_eq!(c.due(t0 + 1_010 * MS, |_| false), [peer]);
    }

    #[test]
    fn another_reply_restarts_the_linger_and_the_grace_ends_any_wait() {
        let t0 = Instant::now();
        let mut c = closing();
        let (a, b) = (PeerId::random(), PeerId::random());
        c.start(a, t0);
        c.start(b, t0);
        assert!(c.due(t0, |_| true).is_empty());
        assert!(c.due(t0 + 100 * MS, |_| false).is_empty());
        assert!(c.due(t0 + 900 * MS, |p| *p == a).is_empty(), "a is owed another reply");
        assert_eq!(c.due(t0 + 1_100 * MS, |p| *p == a), [b]);
        assert!(c.due(t0 + 4_999 * MS, |_| true).is_empty(), "a grant still being prepared");
        assert_eq!(c.due(t0 + 5_000 * MS, |_| true), [a], "the grace is over");
    }
}
