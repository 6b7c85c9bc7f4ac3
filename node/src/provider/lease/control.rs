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
                let ends_at = extended_end(&record, *additional_secs, inner.terms.max_lease_secs)?;
                inner.db.set_ends_at(&record.id, ends_at).map_err(internal)?;
                tracing::info!(lease = %record.id, ends_at, "lease extended");
                Ok(ReplyOutcome::Extended { ends_at_unix_ms: ends_at })
            }
            ControlAction::Terminate => {
                if record.state.is_finished() {
                    return Err(deny(DenyReason::LeaseEnded, format!("the lease already {:?}", record.state)));
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
        return Err(deny(DenyReason::LeaseEnded, format!("the lease is {:?}, not running", record.state)));
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
