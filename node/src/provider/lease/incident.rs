//! The operator's incident response (SECURITY.md, "Incident response"): blocking a
//! requestor (its leases end, its requests are denied, across restarts), isolating a
//! lease's guest as evidence, and signing this provider's block list for publication.

use libp2p::PeerId;
use peervm_protocol::{LeaseId, LeaseState, Signed};
use peervm_vmm::Hypervisor;

use super::denial::truncate;
use super::manager::{LeaseError, LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// Incident response: the requestor's running leases end, its new requests get a
    /// signed `blocked` denial (persisted across restarts), and its adverts, should it
    /// also be a provider, are no longer stored or forwarded.
    pub async fn block(&self, peer: PeerId, reason: &str) -> Result<Vec<LeaseId>, LeaseError> {
        let inner = &self.inner;
        inner.db.block(&peer, reason, self.now())?;
        if let Some(network) = &inner.network {
            let _ = network.block_adverts(peer, true).await;
        }
        let mut ended = Vec::new();
        for record in inner.db.active()? {
            if record.requestor == peer {
                self.end(record.id, &format!("requestor blocked by the operator: {reason}")).await?;
                ended.push(record.id);
            }
        }
        tracing::warn!(%peer, %reason, ended = ended.len(), "requestor blocked");
        Ok(ended)
    }

    pub async fn unblock(&self, peer: PeerId) -> Result<bool, LeaseError> {
        let was = self.inner.db.unblock(&peer)?;
        if let Some(network) = &self.inner.network {
            let _ = network.block_adverts(peer, false).await;
        }
        Ok(was)
    }

    /// Re-applies the persisted block list to the swarm (at start).
    pub async fn apply_block_list(&self) -> Result<usize, LeaseError> {
        let blocked = self.inner.db.blocked()?;
        if let Some(network) = &self.inner.network {
            for entry in &blocked {
                let _ = network.block_adverts(entry.peer, true).await;
            }
        }
        Ok(blocked.len())
    }

    /// Cuts a running lease's guest off the network and keeps it, its disk and console
    /// log as evidence: it no longer expires, and only the operator can end it. The mark
    /// is committed first, so a restart in between re-isolates the guest.
    pub async fn isolate(&self, id: LeaseId) -> Result<(), LeaseError> {
        let inner = &self.inner;
        let record = inner.db.get(&id)?.ok_or(LeaseError::UnknownLease(id))?;
        if record.state != LeaseState::Running {
            return Err(LeaseError::NotRunning { id, state: record.state });
        }
        inner.db.set_isolated(&id, true)?;
        inner.hv.isolate(vmm_id(&id)).await?;
        Ok(())
    }

    /// Signs this provider's block list (its operator's blocks) for publication.
    pub fn signed_block_list(&self) -> Result<peervm_protocol::Verified<peervm_protocol::BlockList>, LeaseError> {
        let now = self.now();
        let entries = self
            .inner
            .db
            .blocked()?
            .into_iter()
            .take(peervm_protocol::blocklist::MAX_BLOCK_ENTRIES)
            .map(|entry| {
                let mut reason = entry.reason;
                truncate(&mut reason, peervm_protocol::advert::MAX_TEXT_LEN);
                peervm_protocol::BlockEntry { peer: entry.peer, reason }
            })
            .collect();
        let list = peervm_protocol::BlockList {
            version: peervm_protocol::blocklist::BLOCK_LIST_VERSION,
            signer: self.inner.me,
            seq: now,
            issued_at_unix_ms: now,
            entries,
        };
        Ok(Signed::sign(&self.inner.key, &list)?)
    }
}

#[cfg(test)]
mod tests {
    use peervm_protocol::{DenyReason, LeaseId, LeaseRequest, LeaseState, ReplyOutcome};

    use super::super::fake_hypervisor::{Committed, Op};
    use super::super::manager::{LeaseError, vmm_id};
    use super::super::test_harness::{Harness, T0, denial, random_key};

    #[tokio::test]
    async fn blocking_a_requestor_ends_its_leases_denies_its_requests_and_survives_a_restart() {
        let h = Harness::new();
        let mine = h.grant().await;
        let other_key = random_key();
        let other_req = LeaseRequest { requestor: other_key.peer_id(), ..h.request() };
        assert!(matches!(h.send_request_as(&other_key, &other_req).await, ReplyOutcome::Granted { .. }));

        let ended = h.manager.block(h.requestor.peer_id(), "abuse").await.unwrap();
        assert_eq!(ended, [mine]);
        assert_eq!(h.state(mine), LeaseState::Ended);
        assert_eq!(h.record(mine).detail, "requestor blocked by the operator: abuse");
        let stops = h.hv.calls_of(Op::Stop);
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].committed.map(|c| c.state), Some(LeaseState::Stopping));
        assert_eq!(h.state(other_req.lease_id), LeaseState::Running, "another requestor's lease goes on");
        let outcome = h.send_request(&h.request()).await;
        assert_eq!(denial(&outcome), (DenyReason::Blocked, "this requestor is blocked by the provider"));

        let h = h.restart(|hv| hv.add_surviving_guest(vmm_id(&other_req.lease_id), 1));
        h.manager.recover().await.unwrap();
        assert_eq!(h.manager.apply_block_list().await.unwrap(), 1);
        assert_eq!(denial(&h.send_request(&h.request()).await).0, DenyReason::Blocked);
        assert!(h.manager.unblock(h.requestor.peer_id()).await.unwrap());
        assert!(!h.manager.unblock(h.requestor.peer_id()).await.unwrap());
        h.grant().await;
    }

    #[tokio::test]
    async fn isolation_is_committed_before_the_guest_is_cut_off_and_the_lease_then_waits_for_the_operator() {
        let h = Harness::new();
        let id = h.grant().await;
        h.manager.isolate(id).await.unwrap();
        let isolates = h.hv.calls_of(Op::Isolate);
        assert_eq!(isolates.len(), 1);
        assert_eq!(isolates[0].committed, Some(Committed { state: LeaseState::Running, isolated: true }));
        assert!(h.hv.is_isolated(vmm_id(&id)));
        // past its end it is kept as evidence
        h.clock.set(T0 + 3_600_000);
        for end in h.manager.end_expired() {
            end.await.unwrap();
        }
        assert_eq!(h.state(id), LeaseState::Running);
        assert!(h.hv.calls_of(Op::Stop).is_empty());
        // the operator ends it
        h.manager.end(id, "terminated by the operator").await.unwrap();
        assert_eq!(h.state(id), LeaseState::Ended);
        assert!(!h.hv.is_running(vmm_id(&id)));
    }

    #[tokio::test]
    async fn a_failed_isolation_is_still_recorded_so_a_restart_retries_it() {
        let h = Harness::new();
        let id = h.grant().await;
        h.hv.fail_isolate(true);
        assert!(matches!(h.manager.isolate(id).await, Err(LeaseError::Vmm(_))));
        assert!(h.record(id).isolated);
    }

    #[tokio::test]
    async fn only_a_running_lease_can_be_isolated() {
        let h = Harness::new();
        let id = h.grant().await;
        h.manager.end(id, "test").await.unwrap();
        let err = h.manager.isolate(id).await.unwrap_err();
        assert!(matches!(err, LeaseError::NotRunning { state: LeaseState::Ended, .. }), "{err}");
        let err = h.manager.isolate(LeaseId([4; 16])).await.unwrap_err();
        assert!(matches!(err, LeaseError::UnknownLease(_)), "{err}");
        assert!(h.hv.calls_of(Op::Isolate).is_empty());
        assert!(!h.record(id).isolated);
    }

    #[tokio::test]
    async fn the_signed_block_list_names_the_blocked_peers_with_capped_reasons() {
        let h = Harness::new();
        let peer = random_key().peer_id();
        let long = "x".repeat(peervm_protocol::advert::MAX_TEXT_LEN + 10);
        h.manager.block(peer, &long).await.unwrap();
        h.clock.advance(7);
        let list = h.manager.signed_block_list().unwrap();
        assert_eq!(list.signer(), h.provider);
        let body = list.body();
        assert_eq!((body.seq, body.issued_at_unix_ms), (T0 + 7, T0 + 7));
        assert_eq!(body.entries.len(), 1);
        assert_eq!(body.entries[0].peer, peer);
        assert_eq!(body.entries[0].reason.len(), peervm_protocol::advert::MAX_TEXT_LEN);
    }
}
