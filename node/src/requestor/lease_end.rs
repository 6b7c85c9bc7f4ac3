//! Why and when a lease ended, as far as the requestor can know it. The provider's signed
//! `status` reply carries the state and the lease's end but no end reason or time
//! (docs/protocol.md section 7), so the requestor keeps what it saw itself: its own
//! terminate (with the provider's `terminated.at_unix_ms`), a denial or failure of its
//! request, or the end passing; a lease the provider ended early for another reason
//! (its operator, a restart) is said to be just that.

use peervm_protocol::LeaseState;

use super::db::StoredLease;

/// What to record when a lease is seen finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finish {
    pub state: LeaseState,
    pub detail: String,
    pub at_unix_ms: Option<u64>,
}

/// The detail stored for a lease this requestor terminated.
pub const TERMINATED: &str = "terminated by you";
/// The detail stored for a lease whose end passed.
pub const EXPIRED: &str = "expired";
const ENDED_EARLY: &str = "ended by the provider before its end";
const FAILED_UNSAID: &str = "the provider reports it failed (its status reply gives no reason)";

/// What a signed `status` reply saying `state`, with the lease's end `ends_at_unix_ms`,
/// issued at `reply_at_unix_ms`, teaches about `stored`: `None` when the lease is not
/// finished or when the store already knows how it finished (a terminate, a denial).
pub fn from_status(
    stored: &StoredLease,
    state: LeaseState,
    ends_at_unix_ms: u64,
    reply_at_unix_ms: u64,
) -> Option<Finish> {
    if !state.is_finished() || (stored.state.is_finished() && !stored.detail.is_empty()) {
        return None;
    }
    Some(match state {
        // The provider ends a lease at its end (docs/architecture.md, "Leases": timers).
        LeaseState::Ended if reply_at_unix_ms >= ends_at_unix_ms => {
            Finish { state, detail: EXPIRED.into(), at_unix_ms: Some(ends_at_unix_ms) }
        }
        LeaseState::Ended => Finish { state, detail: ENDED_EARLY.into(), at_unix_ms: None },
        _ => Finish { state, detail: FAILED_UNSAID.into(), at_unix_ms: None },
    })
}

#[cfg(test)]
mod tests {
    use peervm_protocol::{GuestSpec, LeaseId};

    use super::*;

    fn running() -> StoredLease {
        StoredLease {
            id: LeaseId([1; 16]),
            provider: libp2p::PeerId::random(),
            provider_addrs: Vec::new(),
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                image_name: "minimal".into(),
                image_sha256: [0; 32],
            },
            key_path: "/k".into(),
            created_at_unix_ms: 1,
            state: LeaseState::Running,
            access: None,
            detail: String::new(),
            ended_at_unix_ms: None,
            denial: None,
        }
    }

    #[test]
    fn a_running_lease_teaches_nothing() {
        assert_eq!(from_status(&running(), LeaseState::Running, 10_000, 20_000), None);
    }

    #[test]
    fn an_end_at_or_after_the_lease_end_is_an_expiry_at_that_end() {
        for reply_at in [10_000, 99_000] {
            let f = from_status(&running(), LeaseState::Ended, 10_000, reply_at).unwrap();
            assert_eq!(f, Finish { state: LeaseState::Ended, detail: EXPIRED.into(), at_unix_ms: Some(10_000) });
        }
    }

    #[test]
    fn an_end_before_the_lease_end_was_the_providers_and_its_time_is_not_invented() {
        let f = from_status(&running(), LeaseState::Ended, 10_000, 9_999).unwrap();
        assert_eq!((f.detail.as_str(), f.at_unix_ms), (ENDED_EARLY, None));
        let f = from_status(&running(), LeaseState::Failed, 10_000, 5_000).unwrap();
        assert_eq!((f.state, f.detail.as_str(), f.at_unix_ms), (LeaseState::Failed, FAILED_UNSAID, None));
    }

    #[test]
    fn what_the_store_knows_of_a_finished_lease_is_kept() {
        let mut l = running();
        l.state = LeaseState::Ended;
        l.detail = TERMINATED.into();
        l.ended_at_unix_ms = Some(3_000);
        assert_eq!(from_status(&l, LeaseState::Ended, 10_000, 20_000), None);
        l.state = LeaseState::Failed;
        l.detail = "denied: no_capacity: no room".into();
        assert_eq!(from_status(&l, LeaseState::Failed, 10_000, 20_000), None);
    }
}
