//! Owner / operator separation: an owner key, kept offline, signs a time-limited
//! delegation to a node key. The node's adverts carry it, so requestors can filter, trust
//! or block by owner, and a compromised node key is replaced with one new delegation that
//! names the old key in `replaces`: nodes then drop the old key's adverts made under
//! that owner.

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::advert::MAX_TEXT_LEN;
use crate::identity::peer_id_serde;
use crate::signed::{Kind, Payload, Signed};

pub const DELEGATION_VERSION: u32 = 1;
/// A delegation is valid for at most a year: an owner renews it.
pub const MAX_DELEGATION_MS: u64 = 366 * 24 * 3600 * 1000;
pub const MAX_REPLACES: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delegation {
    pub version: u32,
    #[serde(with = "peer_id_serde")]
    pub owner: PeerId,
    /// The node key allowed to advertise for the owner.
    #[serde(with = "peer_id_serde")]
    pub node: PeerId,
    pub not_before_unix_ms: u64,
    pub not_after_unix_ms: u64,
    /// The payout address; when set, the advert's beneficiary must be the same.
    pub beneficiary: Option<String>,
    /// Node keys of this owner that this delegation retires (key rotation).
    #[serde(with = "peer_ids")]
    pub replaces: Vec<PeerId>,
}

impl Payload for Delegation {
    const KIND: Kind = Kind::Delegation;
    const VERSION: u32 = DELEGATION_VERSION;
    fn version(&self) -> u32 {
        self.version
    }
    fn claimed_signer(&self) -> &PeerId {
        &self.owner
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DelegationError {
    #[error("delegation does not verify: {0}")]
    Invalid(String),
    #[error("delegation is for node {delegated}, not for the advert's provider {provider}")]
    WrongNode { delegated: String, provider: String },
    #[error("delegation is valid from {not_before_unix_ms} to {not_after_unix_ms}, not now ({now_unix_ms})")]
    OutsideWindow { not_before_unix_ms: u64, not_after_unix_ms: u64, now_unix_ms: u64 },
    #[error("delegation window is empty or longer than a year")]
    BadWindow,
    #[error("delegation: {0}")]
    Malformed(String),
    #[error("advert beneficiary {advert:?} differs from the delegation's {delegated:?}")]
    BeneficiaryMismatch { advert: Option<String>, delegated: String },
}

impl DelegationError {
    /// Only the clock can make an honest delegation fail (expired, not yet valid).
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(self, DelegationError::OutsideWindow { .. })
    }
}

impl Delegation {
    /// Checks that do not need the advert: sizes and window shape.
    pub fn check_well_formed(&self) -> Result<(), DelegationError> {
        if self.not_after_unix_ms <= self.not_before_unix_ms
            || self.not_after_unix_ms - self.not_before_unix_ms > MAX_DELEGATION_MS
        {
            return Err(DelegationError::BadWindow);
        }
        if self.replaces.len() > MAX_REPLACES {
            return Err(DelegationError::Malformed(format!(
                "replaces {} keys, at most {MAX_REPLACES}",
                self.replaces.len()
            )));
        }
        if self.replaces.contains(&self.node) {
            return Err(DelegationError::Malformed("a delegation cannot replace its own node".into()));
        }
        if self.beneficiary.as_ref().is_some_and(|b| b.is_empty() || b.len() > MAX_TEXT_LEN) {
            return Err(DelegationError::Malformed(format!("beneficiary must be 1-{MAX_TEXT_LEN} bytes")));
        }
        Ok(())
    }

    /// Opens the owner-signed envelope carried by an advert of `provider` and checks it
    /// against that advert at `now_unix_ms`.
    pub fn open_for(
        bytes: &[u8],
        provider: &PeerId,
        beneficiary: Option<&str>,
        now_unix_ms: u64,
    ) -> Result<Delegation, DelegationError> {
        let verified = Signed::<Delegation>::open(bytes).map_err(|e| DelegationError::Invalid(e.to_string()))?;
        let d = verified.body().clone();
        d.check_well_formed()?;
        if d.node != *provider {
            return Err(DelegationError::WrongNode { delegated: d.node.to_string(), provider: provider.to_string() });
        }
        if now_unix_ms < d.not_before_unix_ms || now_unix_ms >= d.not_after_unix_ms {
            return Err(DelegationError::OutsideWindow {
                not_before_unix_ms: d.not_before_unix_ms,
                not_after_unix_ms: d.not_after_unix_ms,
                now_unix_ms,
            });
        }
        if let Some(delegated) = &d.beneficiary
            && beneficiary != Some(delegated.as_str())
        {
            return Err(DelegationError::BeneficiaryMismatch {
                advert: beneficiary.map(str::to_string),
                delegated: delegated.clone(),
            });
        }
        Ok(d)
    }
}

/// A list of PeerIds, each a CBOR byte string.
mod peer_ids {
    use libp2p_identity::PeerId;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::identity::peer_id_serde;

    #[derive(Serialize, Deserialize)]
    struct One(#[serde(with = "peer_id_serde")] PeerId);

    pub fn serialize<S: Serializer>(peers: &[PeerId], s: S) -> Result<S::Ok, S::Error> {
        peers.iter().map(|p| One(*p)).collect::<Vec<_>>().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<PeerId>, D::Error> {
        Ok(Vec::<One>::deserialize(d)?.into_iter().map(|o| o.0).collect())
    }
}
