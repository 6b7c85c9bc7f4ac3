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
