//! Node identity: an ed25519 key whose libp2p PeerId *is* the node's ID.
//!
//! An ed25519 PeerId inlines the public key (identity multihash over the protobuf
//! encoding), so a signature can be checked from the PeerId alone: no key lookup and no
//! registry (docs/protocol.md section 1). Other key types hash the key instead of inlining it, and
//! are refused.

use ed25519_dalek::{Signer as _, SigningKey as DalekSigningKey, VerifyingKey};
use libp2p_identity::PeerId;
use zeroize::Zeroizing;

use crate::error::IdentityError;

/// The bytes every ed25519 PeerId starts with: multihash code 0x00 (identity), digest
/// length 36, then the protobuf `PublicKey { Type = Ed25519 (1), Data = 32 bytes }`.
const ED25519_PEER_ID_PREFIX: [u8; 6] = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];

/// Length of an ed25519 PeerId in bytes.
pub const ED25519_PEER_ID_LEN: usize = ED25519_PEER_ID_PREFIX.len() + 32;

/// The raw 32-byte ed25519 public key inlined in `peer_id`, or an error when the PeerId
/// is not an inlined ed25519 key.
pub fn ed25519_public_key_bytes(peer_id: &PeerId) -> Result<[u8; 32], IdentityError> {
    // Read in place (no allocation: stores look keys up on every advert they see).
    let multihash: &multiaddr::multihash::Multihash<64> = peer_id.as_ref();
    let digest = multihash.digest();
    let protobuf_prefix = &ED25519_PEER_ID_PREFIX[2..];
    if multihash.code() != 0 || digest.len() != 36 || &digest[..protobuf_prefix.len()] != protobuf_prefix {
        return Err(IdentityError::NotEd25519);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&digest[protobuf_prefix.len()..]);
    Ok(key)
}

/// Like [`ed25519_public_key_bytes`] but from the PeerId's wire bytes.
pub fn public_key_from_peer_id_bytes(bytes: &[u8]) -> Result<[u8; 32], IdentityError> {
    if bytes.len() != ED25519_PEER_ID_LEN || bytes[..ED25519_PEER_ID_PREFIX.len()] != ED25519_PEER_ID_PREFIX {
        return Err(IdentityError::NotEd25519);
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&bytes[ED25519_PEER_ID_PREFIX.len()..]);
    Ok(key)
}

/// The PeerId of a raw ed25519 public key.
pub fn peer_id_from_public_key(key: &[u8; 32]) -> PeerId {
    let mut bytes = [0u8; ED25519_PEER_ID_LEN];
    bytes[..ED25519_PEER_ID_PREFIX.len()].copy_from_slice(&ED25519_PEER_ID_PREFIX);
    bytes[ED25519_PEER_ID_PREFIX.len()..].copy_from_slice(key);
    // The prefix is a valid identity multihash header, so this cannot fail.
    PeerId::from_bytes(&bytes).unwrap_or_else(|_| unreachable!("identity multihash is valid"))
}

/// Decodes `bytes` as an ed25519 PeerId and returns it with its verifying key. Weak
/// (small-order) keys are refused: strict verification would refuse them anyway, and
/// refusing them here keeps the batch path equal to the single one.
pub fn verifying_key_for(bytes: &[u8]) -> Result<(PeerId, VerifyingKey), IdentityError> {
    let raw = public_key_from_peer_id_bytes(bytes)?;
    let key = VerifyingKey::from_bytes(&raw).map_err(|_| IdentityError::InvalidPublicKey)?;
    if key.is_weak() {
        return Err(IdentityError::WeakPublicKey);
    }
    let peer_id = PeerId::from_bytes(bytes).map_err(|_| IdentityError::NotEd25519)?;
    Ok((peer_id, key))
}

/// A node's ed25519 signing key together with its PeerId.
///
/// The secret is zeroised when the key is dropped (ed25519-dalek's `SigningKey` does that
/// itself); `Debug` never prints it.
pub struct SigningKey {
    inner: DalekSigningKey,
    peer_id: PeerId,
}

impl SigningKey {
    /// A key from its 32-byte secret seed (RFC 8032 private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let inner = DalekSigningKey::from_bytes(seed);
        let peer_id = peer_id_from_public_key(&inner.verifying_key().to_bytes());
        Self { inner, peer_id }
    }

    /// The 32-byte secret seed; the caller must keep it secret (and zeroise it).
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.inner.to_bytes())
    }

    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    pub fn public_key_bytes(&self) -> [u8; 32] {
        self.inner.verifying_key().to_bytes()
    }

    /// An ed25519 signature over `message` (deterministic, RFC 8032).
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.inner.sign(message).to_bytes()
    }

    /// The same key as a libp2p keypair, for the swarm's transport identity.
    pub fn to_libp2p_keypair(&self) -> libp2p_identity::Keypair {
        let mut bytes = self.seed();
        // `ed25519_from_bytes` zeroises the buffer it is given.
        libp2p_identity::Keypair::ed25519_from_bytes(&mut *bytes)
            .unwrap_or_else(|_| unreachable!("32-byte seed is always a valid ed25519 secret"))
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("peer_id", &self.peer_id).finish_non_exhaustive()
    }
}

/// Serde for a PeerId as its CBOR byte string.
pub(crate) mod peer_id_serde {
    use libp2p_identity::PeerId;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(peer: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&peer.to_bytes())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let bytes = crate::encoding::deserialize_byte_buf(d)?;
        // Only inlined ed25519 keys can be checked without a lookup.
        super::public_key_from_peer_id_bytes(&bytes).map_err(serde::de::Error::custom)?;
        PeerId::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}
