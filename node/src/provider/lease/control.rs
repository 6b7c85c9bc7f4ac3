//! The requestor's control messages: status, extend and terminate. Only the lease's
//! requestor may send them (SECURITY.md invariant 4), each at most once (invariant 3),
//! and an isolated lease is the operator's alone (SECURITY.md, "Incident response").

use libp2p::PeerId;
use peervm_protocol::{ControlAction, DenyReason, LeaseControl, LeaseState, ReplyOutcome};
use peervm_vmm::Hypervisor;

use super::admission::nonce_kept_until;
use super::db::{DbError, LeaseRecord};
use super::denial::{Denial, deny, internal};
use super::inbound::ReplyTo;
use super::manager::LeaseManager;

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    pub(super) async fn on_control(
        &self,
        peer: PeerId,
        bytes: &[u8],
        throttled: bool,
    ) -> (ReplyTo, Result<ReplyOutcome, Denial>) {
        let (to, control) = match self.open::<LeaseControl>(peer, bytes, throttled, |c| (c.lease_id, c.requestor)).await
        {
            Ok(v) => v,
            Err((to, d)) => return (to, Err(d)),
        };
        (to, self.control(&control).await)
    }

    async fn control(&self, c: &LeaseControl) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let now = self.now();
        c.check_fresh(&inner.me, now).map_err(|e| deny(e.deny_reason(), e.to_string()))?;
        let record = inner
            .db
            .get(&c.lease_id)
            .map_err(internal)?
            .ok_or_else(|| deny(DenyReason::UnknownLease, format!("no lease {} here", c.lease_id)))?;
        if record.requestor != c.requestor {
            return Err(deny(DenyReason::NotRequestor, "only the lease's requestor may query, extend or end it"));
        }
        match inner.db.record_nonce(&c.requestor, c.nonce, nonce_kept_until(c.valid_until_unix_ms)) {
            Ok(()) => {}
            Err(DbError::Replay { .. }) => {
                return Err(deny(DenyReason::Replay, "this control message was already used"));
            }
            Err(e) => return Err(internal(e)),
        }
        match &c.action {
            ControlAction::Terminate | ControlAction::Extend { .. } if record.isolated => {
                Err(deny(DenyReason::Blocked, "the lease is held by the provider's operator for inspection"))
            }
            ControlAction::Status => {
                let usage = if record.state == LeaseState::Running { self.usage(&record.id).await } else { None };
                Ok(ReplyOutcome::Status { state: record.state, ends_at_unix_ms: record.ends_at_unix_ms, usage })
            }
            ControlAction::Extend { additional_secs } => {
                let ends_at = extended_end(&record, *additional_secs, self.terms().max_lease_secs)?;
                inner.db.set_ends_at(&record.id, ends_at).map_err(internal)?;
                tracing::info!(lease = %record.id, ends_at, "lease extended");
                Ok(ReplyOutcome::Extended { ends_at_unix_ms: ends_at })
            }
            ControlAction::Terminate => {
                if record.state.is_finished() {
                    // for people: the typed reason travels in `reason` (issue 20: no Rust names)
                    let what = if record.state == LeaseState::Failed { "failed" } else { "ended" };
                    return Err(deny(DenyReason::LeaseEnded, format!("the lease has already {what}")));
                }
                self.end(record.id, "terminated by the requestor").await.map_err(internal)?;
                Ok(ReplyOutcome::Terminated { at_unix_ms: self.now() })
            }
        }
    }
}

/// The new end of `record` extended by `additional_secs`: only a running lease, by more
/// than nothing, and its whole length from its start within `max_lease_secs`.
fn extended_end(record: &LeaseRecord, additional_secs: u64, max_lease_secs: u64) -> Result<u64, Denial> {
    if record.state != LeaseState::Running {
        return Err(deny(DenyReason::LeaseEnded, format!("the lease is {}, not running", record.state.as_str())));
    }
    let started = record.started_at_unix_ms.unwrap_or(record.requested_at_unix_ms);
    let ends_at = record.ends_at_unix_ms.saturating_add(additional_secs.saturating_mul(1000));
    let total_secs = ends_at.saturating_sub(started) / 1000;
    if additional_secs == 0 || total_secs > max_lease_secs {
        return Err(deny(
            DenyReason::InvalidSpec,
            format!("extension must be above 0 s and keep the lease within {max_lease_secs} s"),
        ));
    }
    Ok(ends_at)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use peervm_protocol::{ControlAction, DenyReason, LeaseControl, LeaseId, LeaseState, LeaseUsage, ReplyOutcome};
    use peervm_vmm::VmUsage;

    use super::super::fake_hypervisor::Op;
    use super::super::manager::vmm_id;
    use super::super::test_harness::{Harness, T0, denial, random_key};

    const HOUR_MS: u64 = 3_600_000;

    #[tokio::test]
    async fn status_of_a_running_lease_reports_its_usage_and_of_an_ended_one_none() {
        let h = Harness::new();
        let id = h.grant().await;
        let usage = VmUsage {
            cpu_time: Duration::from_micros(1_500),
            memory_current_bytes: 100,
            memory_peak_bytes: None,
            ssh_bytes_in: 7,
            ssh_bytes_out: 9,
            uptime: Duration::from_secs(42),
            ..Default::default()
        };
        h.hv.set_usage(vmm_id(&id), usage);
        let outcome = h.send_control(&h.control(id, ControlAction::Status)).await;
        let want = LeaseUsage {
            cpu_usec: 1_500,
            memory_current_bytes: 100,
            memory_peak_bytes: 100, // no peak reported: the current value
            net_rx_bytes: 7,
            net_tx_bytes: 9,
            uptime_secs: 42,
            guest_net: None, // the hypervisor counted no traffic of its link
        };
        assert_eq!(
            outcome,
            ReplyOutcome::Status { state: LeaseState::Running, ends_at_unix_ms: T0 + HOUR_MS, usage: Some(want) }
        );
        h.manager.end(id, "test").await.unwrap();
        let outcome = h.send_control(&h.control(id, ControlAction::Status)).await;
        assert_eq!(
            outcome,
            ReplyOutcome::Status { state: LeaseState::Ended, ends_at_unix_ms: T0 + HOUR_MS, usage: None }
        );
    }

    #[tokio::test]
    async fn extend_moves_the_end_and_keeps_the_lease_within_the_longest_term() {
        let h = Harness::new(); // at most 7200 s
        let id = h.grant().await; // 3600 s from T0
        let outcome = h.send_control(&h.control(id, ControlAction::Extend { additional_secs: 1800 })).await;
        assert_eq!(outcome, ReplyOutcome::Extended { ends_at_unix_ms: T0 + HOUR_MS + 1_800_000 });
        assert_eq!(h.record(id).ends_at_unix_ms, T0 + HOUR_MS + 1_800_000, "persisted");
        for additional_secs in [0, 1801] {
            let outcome = h.send_control(&h.control(id, ControlAction::Extend { additional_secs })).await;
            assert_eq!(denial(&outcome).0, DenyReason::InvalidSpec, "{additional_secs} s");
        }
        let outcome = h.send_control(&h.control(id, ControlAction::Extend { additional_secs: 1800 })).await;
        assert_eq!(outcome, ReplyOutcome::Extended { ends_at_unix_ms: T0 + 2 * HOUR_MS }, "exactly the longest term");
        h.manager.end(id, "test").await.unwrap();
        let outcome = h.send_control(&h.control(id, ControlAction::Extend { additional_secs: 60 })).await;
        assert_eq!(denial(&outcome), (DenyReason::LeaseEnded, "the lease is ended, not running"), "words for people");
        assert_eq!(h.record(id).ends_at_unix_ms, T0 + 2 * HOUR_MS);
    }

    #[tokio::test]
    async fn terminate_commits_stopping_before_the_stop_then_ended_and_frees_capacity() {
        let h = Harness::new();
        let id = h.grant().await;
        h.clock.advance(5_000);
        let outcome = h.send_control(&h.control(id, ControlAction::Terminate)).await;
        assert_eq!(outcome, ReplyOutcome::Terminated { at_unix_ms: T0 + 5_000 });
        let stops = h.hv.calls_of(Op::Stop);
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].committed.map(|c| c.state), Some(LeaseState::Stopping));
        assert_eq!(h.record(id).state, LeaseState::Ended);
        assert_eq!(h.record(id).detail, "terminated by the requestor");
        assert_eq!(h.manager.free_capacity_now(), h.terms.total);
        assert!(!h.hv.is_running(vmm_id(&id)));
        let again = h.send_control(&h.control(id, ControlAction::Terminate)).await;
        assert_eq!(denial(&again), (DenyReason::LeaseEnded, "the lease has already ended"), "words for people");
        assert_eq!(h.hv.calls_of(Op::Stop).len(), 1);
    }

    #[tokio::test]
    async fn only_the_requestor_may_query_extend_or_end_its_lease() {
        let h = Harness::new();
        let id = h.grant().await;
        let other = random_key();
        for action in [ControlAction::Status, ControlAction::Extend { additional_secs: 60 }, ControlAction::Terminate] {
            let c = LeaseControl { requestor: other.peer_id(), ..h.control(id, action) };
            let outcome = h.send_control_as(&other, &c).await;
            assert_eq!(denial(&outcome).0, DenyReason::NotRequestor, "{:?}", c.action);
        }
        let record = h.record(id);
        assert_eq!((record.state, record.ends_at_unix_ms), (LeaseState::Running, T0 + HOUR_MS));
        assert!(h.hv.calls_of(Op::Stop).is_empty());
    }

    #[tokio::test]
    async fn a_control_for_an_unknown_lease_or_stale_or_elsewhere_is_denied() {
        let h = Harness::new();
        let unknown = h.send_control(&h.control(LeaseId([9; 16]), ControlAction::Status)).await;
        assert_eq!(denial(&unknown).0, DenyReason::UnknownLease);
        let id = h.grant().await;
        let stale = LeaseControl { valid_until_unix_ms: T0, ..h.control(id, ControlAction::Terminate) };
        assert_eq!(denial(&h.send_control(&stale).await).0, DenyReason::Stale);
        let elsewhere = LeaseControl { provider: random_key().peer_id(), ..h.control(id, ControlAction::Terminate) };
        assert_eq!(denial(&h.send_control(&elsewhere).await).0, DenyReason::WrongProvider);
        assert_eq!(h.state(id), LeaseState::Running);
    }

    #[tokio::test]
    async fn a_control_message_is_acted_on_once_also_after_a_restart() {
        let h = Harness::new();
        let id = h.grant().await;
        let extend = h.control(id, ControlAction::Extend { additional_secs: 60 });
        assert!(matches!(h.send_control(&extend).await, ReplyOutcome::Extended { .. }));
        let outcome = h.send_control(&extend).await;
        assert_eq!(denial(&outcome), (DenyReason::Replay, "this control message was already used"));
        let h = h.restart(|hv| hv.add_surviving_guest(vmm_id(&id), 0));
        h.manager.recover().await.unwrap();
        assert_eq!(denial(&h.send_control(&extend).await).0, DenyReason::Replay);
        assert_eq!(h.record(id).ends_at_unix_ms, T0 + HOUR_MS + 60_000, "extended once");
    }

    #[tokio::test]
    async fn an_isolated_lease_can_be_queried_but_not_extended_or_ended_by_its_requestor() {
        let h = Harness::new();
        let id = h.grant().await;
        h.manager.isolate(id).await.unwrap();
        for action in [ControlAction::Extend { additional_secs: 60 }, ControlAction::Terminate] {
            let outcome = h.send_control(&h.control(id, action)).await;
            assert_eq!(
                denial(&outcome),
                (DenyReason::Blocked, "the lease is held by the provider's operator for inspection")
            );
        }
        assert!(matches!(
            h.send_control(&h.control(id, ControlAction::Status)).await,
            ReplyOutcome::Status { state: LeaseState::Running, .. }
        ));
        assert_eq!(h.record(id).ends_at_unix_ms, T0 + HOUR_MS);
        assert!(h.hv.calls_of(Op::Stop).is_empty());
    }
}
