//! One lease message in, one signed reply out: the envelope is opened (size cap,
//! signature, version), the request or control is served, the outcome is counted and
//! audited, and the reply is signed, denials included (docs/protocol.md section 7;
//! docs/architecture.md, "Leases", step 1).

use libp2p::PeerId;
use peervm_protocol::lease::payload_digest;
use peervm_protocol::{DenyReason, LeaseId, LeaseReply, Payload, ReplyOutcome, Signed, VerifyError};
use peervm_vmm::Hypervisor;
use sha2::{Digest, Sha256};

use super::denial::{Denial, MAX_DETAIL, deny, truncate};
use super::manager::{LeaseError, LeaseManager};
use crate::network::lease_wire::LeaseMessage;

/// Who a reply goes to and what it answers.
#[derive(Clone, Copy)]
pub(super) struct ReplyTo {
    pub lease_id: LeaseId,
    pub requestor: PeerId,
    pub digest: [u8; 32],
}

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// Answers one lease message with a signed reply.
    pub async fn handle(&self, peer: PeerId, message: &LeaseMessage, throttled: bool) -> Vec<u8> {
        let (event, (to, outcome)) = match message {
            LeaseMessage::Request(env) => ("lease_request", self.on_request(peer, &env.0, throttled).await),
            LeaseMessage::Control(env) => ("lease_control", self.on_control(peer, &env.0, throttled).await),
        };
        let label = match &outcome {
            Ok(ReplyOutcome::Granted { .. }) => "granted",
            Ok(ReplyOutcome::Status { .. }) => "status",
            Ok(ReplyOutcome::Extended { .. }) => "extended",
            Ok(ReplyOutcome::Terminated { .. }) => "terminated",
            Ok(ReplyOutcome::Denied { reason, .. }) => reason.as_str(),
            Err(d) => d.reason.as_str(),
        };
        self.inner.metrics.lease_message(label);
        // Throttled messages are counted in metrics, not written one by one: a flood
        // must not become a flood of the audit log.
        if !throttled {
            self.audit(
                event,
                serde_json::json!({
                    "peer": peer.to_string(),
                    "requestor": to.requestor.to_string(),
                    "lease": to.lease_id.to_hex(),
                    "outcome": if outcome.is_ok() { label } else { "denied" },
                    "reason": outcome.as_ref().err().map(|d| d.reason.as_str()),
                    "detail": outcome.as_ref().err().map(|d| d.detail.as_str()),
                }),
            );
        }
        let outcome = outcome.unwrap_or_else(|d| {
            let mut detail = d.detail;
            truncate(&mut detail, MAX_DETAIL);
            ReplyOutcome::Denied { reason: d.reason, detail }
        });
        match self.sign_reply(to, outcome) {
            Ok(bytes) => bytes,
            Err(e) => {
                // Signing our own well-formed reply cannot fail short of a bug; say so.
                tracing::error!(error = %e, "cannot sign a lease reply");
                Vec::new()
            }
        }
    }

    fn sign_reply(&self, to: ReplyTo, outcome: ReplyOutcome) -> Result<Vec<u8>, LeaseError> {
        let reply = LeaseReply {
            version: peervm_protocol::lease::LEASE_VERSION,
            lease_id: to.lease_id,
            provider: self.inner.me,
            requestor: to.requestor,
            in_reply_to: to.digest,
            issued_at_unix_ms: self.now(),
            outcome,
        };
        Ok(Signed::sign(&self.inner.key, &reply)?.to_bytes())
    }

    /// Opens a signed message: the reply address comes from the verified body, or, when
    /// it does not verify, from the transport peer with an all-zero lease id.
    pub(super) async fn open<T: Payload>(
        &self,
        peer: PeerId,
        bytes: &[u8],
        throttled: bool,
        ids: impl Fn(&T) -> (LeaseId, PeerId),
    ) -> Result<(ReplyTo, T), (ReplyTo, Denial)> {
        let unknown = |digest| ReplyTo { lease_id: LeaseId([0; 16]), requestor: peer, digest };
        let signed = match Signed::<T>::from_bytes(bytes) {
            Ok(s) => s,
            Err(e) => {
                let to = unknown(Sha256::digest(bytes).into());
                if throttled {
                    return Err((to, deny(DenyReason::RateLimited, "too many lease messages; slow down")));
                }
                self.penalise(peer).await;
                return Err((to, deny(DenyReason::Malformed, e.to_string())));
            }
        };
        let digest = payload_digest(&signed);
        if throttled {
            return Err((unknown(digest), deny(DenyReason::RateLimited, "too many lease messages; slow down")));
        }
        match signed.verify() {
            Ok(verified) => {
                let (signed, body) = verified.into_parts();
                drop(signed);
                let (lease_id, requestor) = ids(&body);
                Ok((ReplyTo { lease_id, requestor, digest }, body))
            }
            Err(e @ VerifyError::UnsupportedVersion { .. }) => {
                Err((unknown(digest), deny(DenyReason::UnsupportedVersion, e.to_string())))
            }
            Err(e) => {
                self.penalise(peer).await;
                let reason = match e {
                    VerifyError::Decode(_) => DenyReason::Malformed,
                    _ => DenyReason::BadSignature,
                };
                Err((unknown(digest), deny(reason, e.to_string())))
            }
        }
    }

    /// Reports a sender of bad bytes or a bad signature to the swarm's misbehaviour score.
    async fn penalise(&self, peer: PeerId) {
        if let Some(network) = &self.inner.network {
            let _ = network.report_invalid(peer).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use peervm_protocol::lease::payload_digest;
    use peervm_protocol::{DenyReason, LeaseId, LeaseRequest, ReplyOutcome, Signed};
    use sha2::{Digest, Sha256};

    use super::super::test_harness::{Harness, T0, denial, random_key};
    use crate::network::lease_wire::{Envelope, LeaseMessage};

    #[tokio::test]
    async fn a_reply_names_the_lease_the_requestor_and_the_payload_it_answers() {
        let h = Harness::new();
        h.clock.advance(3);
        let req = h.request();
        let signed = Signed::sign(&h.requestor, &req).unwrap();
        let relay = random_key().peer_id(); // the transport peer need not be the requestor
        let reply = h.send_raw(relay, LeaseMessage::Request(Envelope(signed.to_bytes()))).await;
        assert_eq!((reply.lease_id, reply.requestor, reply.provider), (req.lease_id, req.requestor, h.provider));
        assert_eq!(reply.in_reply_to, payload_digest(signed.signed()));
        assert_eq!(reply.issued_at_unix_ms, T0 + 3);
        assert!(matches!(reply.outcome, ReplyOutcome::Granted { .. }));
    }

    #[tokio::test]
    async fn garbage_is_malformed_answered_to_the_transport_peer_with_a_zero_lease_id() {
        let h = Harness::new();
        let peer = random_key().peer_id();
        let bytes = b"not an envelope".to_vec();
        let reply = h.send_raw(peer, LeaseMessage::Request(Envelope(bytes.clone()))).await;
        assert_eq!(denial(&reply.outcome).0, DenyReason::Malformed);
        assert_eq!((reply.lease_id, reply.requestor), (LeaseId([0; 16]), peer));
        assert_eq!(reply.in_reply_to, <[u8; 32]>::from(Sha256::digest(&bytes)));
        let control = h.send_raw(peer, LeaseMessage::Control(Envelope(bytes))).await;
        assert_eq!(denial(&control.outcome).0, DenyReason::Malformed);
        assert!(h.hv.calls().is_empty());
    }

    #[tokio::test]
    async fn a_forged_signature_is_bad_signature_and_names_nothing_it_claims() {
        let h = Harness::new();
        let req = h.request();
        let signed = Signed::sign(&h.requestor, &req).unwrap();
        let mut signature = *signed.signed().signature();
        signature[0] ^= 1;
        let forged =
            Signed::<LeaseRequest>::from_parts(signed.signed().payload_bytes().to_vec(), req.requestor, signature);
        let peer = random_key().peer_id();
        let reply = h.send_raw(peer, LeaseMessage::Request(Envelope(forged.to_bytes()))).await;
        assert_eq!(denial(&reply.outcome).0, DenyReason::BadSignature);
        assert_eq!((reply.lease_id, reply.requestor), (LeaseId([0; 16]), peer));
        assert_eq!(reply.in_reply_to, payload_digest(&forged));
        assert!(h.db().get(&req.lease_id).unwrap().is_none());
        assert!(h.hv.calls().is_empty());
    }

    #[tokio::test]
    async fn another_version_is_unsupported_version() {
        let h = Harness::new();
        let req = LeaseRequest { version: 2, ..h.request() };
        assert_eq!(denial(&h.send_request(&req).await).0, DenyReason::UnsupportedVersion);
        assert!(h.db().get(&req.lease_id).unwrap().is_none());
    }

    #[tokio::test]
    async fn a_throttled_message_is_rate_limited_and_not_acted_on() {
        let h = Harness::new();
        let req = h.request();
        let bytes = Signed::sign(&h.requestor, &req).unwrap().to_bytes();
        let reply = h.manager.handle(h.requestor.peer_id(), &LeaseMessage::Request(Envelope(bytes)), true).await;
        let reply = Signed::<peervm_protocol::LeaseReply>::open(&reply).unwrap();
        assert_eq!(denial(&reply.body().outcome).0, DenyReason::RateLimited);
        assert!(h.db().get(&req.lease_id).unwrap().is_none());
        assert!(h.hv.calls().is_empty());
        // the same request, no longer throttled, is served: nothing of it was recorded
        assert!(matches!(h.send_request(&req).await, ReplyOutcome::Granted { .. }));
    }
}
