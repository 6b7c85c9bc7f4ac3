//! `VerifiedBytes<T>`: a verified message kept as its envelope's wire bytes alone.
//!
//! A node may hold 100,000 adverts (issue 18, BENCHMARKS.md "Swarm, store and sync"): a
//! decoded advert costs more than its wire bytes (~760 bytes in 8 allocations against
//! ~640), and the store only needs the decoded form of the few adverts a caller reads.
//! `VerifiedBytes` is made only from a [`Verified`] message, so holding one means the
//! signature, version and signer were checked; [`VerifiedBytes::decode`] parses the bytes
//! again but does not check the signature again (that is the expensive part).

use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use libp2p_identity::PeerId;

use crate::error::{DecodeError, IdentityError, VerifyError};
use crate::identity::{self, ED25519_PEER_ID_LEN};
use crate::signed::{Payload, Signed, Verified, envelope};

/// Bytes at the end of every envelope after the signer's key: the signature's CBOR
/// header (2 bytes: a 64-byte string) and the signature.
const SIGNATURE_TAIL: usize = 2 + 64;

/// A verified message as its exact wire bytes (what sync serves and gossip forwards).
/// Cloning shares the bytes.
pub struct VerifiedBytes<T> {
    bytes: Arc<[u8]>,
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for VerifiedBytes<T> {
    fn clone(&self) -> Self {
        Self { bytes: self.bytes.clone(), _kind: PhantomData }
    }
}

impl<T: Payload> fmt::Debug for VerifiedBytes<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedBytes").field("kind", &T::KIND).field("len", &self.bytes.len()).finish()
    }
}

impl<T: Payload> VerifiedBytes<T> {
    pub fn new(message: &Verified<T>) -> Self {
        Self { bytes: message.to_bytes().into(), _kind: PhantomData }
    }

    /// The envelope's wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The signer's raw ed25519 public key, read in place. Every signer is an inlined
    /// ed25519 PeerId (`identity.rs`) and the envelope is `[payload, signer, signature]`
    /// with the 64-byte signature last (`signed.rs`), so the key is the 32 bytes before
    /// the signature's header and the signature.
    pub fn signer_public_key(&self) -> [u8; 32] {
        let end = self.bytes.len() - SIGNATURE_TAIL;
        let mut key = [0u8; 32];
        key.copy_from_slice(&self.bytes[end - 32..end]);
        key
    }

    /// The signer's PeerId.
    pub fn signer(&self) -> PeerId {
        identity::peer_id_from_public_key(&self.signer_public_key())
    }

    /// The decoded message. The bytes were decoded once already when the message was
    /// verified, so this fails only if that decoding was not deterministic.
    pub fn decode(&self) -> Result<Verified<T>, VerifyError> {
        let [payload, signer, signature] = envelope::decode(&self.bytes)?;
        if signer.len() != ED25519_PEER_ID_LEN {
            return Err(DecodeError::Signer(IdentityError::NotEd25519).into());
        }
        let signer = PeerId::from_bytes(signer).map_err(|_| DecodeError::Signer(IdentityError::NotEd25519))?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| DecodeError::SignatureLength(signature.len()))?;
        Signed::from_parts(payload.to_vec(), signer, signature).decode_checked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advert::Advertisement;
    use crate::samples;

    #[test]
    fn keeps_the_exact_bytes_and_decodes_to_the_same_message() {
        let key = samples::numbered_key(3);
        let signed = Signed::sign(&key, &samples::advert(&key, 7, samples::T0_UNIX_MS)).unwrap();
        let stored = VerifiedBytes::new(&signed);
        assert_eq!(stored.as_bytes(), signed.to_bytes().as_slice());
        assert_eq!(stored.signer_public_key(), key.public_key_bytes());
        assert_eq!(stored.signer(), key.peer_id());
        let decoded = stored.decode().unwrap();
        assert_eq!(decoded.body(), signed.body());
        assert_eq!(decoded.to_bytes(), signed.to_bytes());
        // The same bytes open as a fresh message too (what a peer does with them).
        assert_eq!(Signed::<Advertisement>::open(stored.as_bytes()).unwrap().body(), signed.body());
    }

    #[test]
    fn the_signer_key_is_found_whatever_the_payload_length() {
        for (n, images) in [(1u64, 0usize), (2, 1), (3, 32)] {
            let key = samples::numbered_key(n);
            let mut a = samples::advert(&key, 1, samples::T0_UNIX_MS);
            a.images =
                (0..images).map(|i| crate::ImageOffer { name: format!("image-{i}"), sha256: [i as u8; 32] }).collect();
            let stored = VerifiedBytes::new(&Signed::sign(&key, &a).unwrap());
            assert_eq!(stored.signer(), key.peer_id(), "{images} images");
            assert_eq!(stored.decode().unwrap().body(), &a);
        }
    }
}
