//! The signed envelope every message that matters travels in (docs/protocol.md section 2).
//!
//! ```text
//! Signed<T> { payload: bytes (CBOR of T), signer: PeerId bytes, signature: 64 bytes }
//! signature = ed25519(signer_key, DOMAIN(T) || payload)
//! ```
//!
//! The signature is checked over the exact received payload bytes *before* the payload is
//! decoded; nothing is ever re-encoded to be verified. The per-kind domain tag stops a
//! signature made for one kind from being accepted as another.

use std::fmt;
use std::marker::PhantomData;

use ed25519_dalek::{Signature, VerifyingKey};
use libp2p_identity::PeerId;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::encoding::{from_cbor, to_cbor};
use crate::error::{DecodeError, SignError, VerifyError};
use crate::identity::{self, SigningKey};

/// The kinds of signed message, each with its own domain tag and size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Advert,
    LeaseRequest,
    LeaseReply,
    LeaseControl,
    /// An operator's signed block list (`blocklist.rs`).
    BlockList,
    /// An owner's delegation to a node key (`delegation.rs`).
    Delegation,
}

impl Kind {
    /// `DOMAIN(T) = b"peervm/<kind>/v1\0"`.
    pub const fn domain(self) -> &'static [u8] {
        match self {
            Kind::Advert => b"peervm/advert/v1\0",
            Kind::LeaseRequest => b"peervm/lease-request/v1\0",
            Kind::LeaseReply => b"peervm/lease-reply/v1\0",
            Kind::LeaseControl => b"peervm/lease-control/v1\0",
            Kind::BlockList => b"peervm/block-list/v1\0",
            Kind::Delegation => b"peervm/delegation/v1\0",
        }
    }

    /// The most bytes a whole signed envelope of this kind may have on the wire. Checked
    /// before any parsing.
    pub const fn max_wire_bytes(self) -> usize {
        match self {
            Kind::Advert => 4 * 1024,
            Kind::LeaseRequest => 8 * 1024,
            Kind::LeaseReply => 8 * 1024,
            Kind::LeaseControl => 4 * 1024,
            Kind::BlockList => 64 * 1024,
            Kind::Delegation => 2 * 1024,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kind::Advert => "advert",
            Kind::LeaseRequest => "lease-request",
            Kind::LeaseReply => "lease-reply",
            Kind::LeaseControl => "lease-control",
            Kind::BlockList => "block-list",
            Kind::Delegation => "delegation",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A payload type that travels signed.
pub trait Payload: Serialize + DeserializeOwned + Clone {
    const KIND: Kind;
    /// The payload version this build speaks.
    const VERSION: u32;
    fn version(&self) -> u32;
    /// The PeerId the payload says it comes from (provider or requestor). It must equal
    /// the envelope's signer: a node cannot speak for another (SECURITY.md invariant 2).
    fn claimed_signer(&self) -> &PeerId;
}

/// A signed message whose signature has not been checked yet. The only way to get the
/// payload out is [`Signed::verify`].
pub struct Signed<T> {
    payload: Vec<u8>,
    signer: PeerId,
    /// The signer's key, decompressed once when the envelope was parsed (boxed: stored
    /// messages drop it, and should not carry its space).
    key: Option<Box<VerifyingKey>>,
    signature: [u8; 64],
    _kind: PhantomData<fn() -> T>,
}

impl<T> Clone for Signed<T> {
    fn clone(&self) -> Self {
        Self {
            payload: self.payload.clone(),
            signer: self.signer,
            key: self.key.clone(),
            signature: self.signature,
            _kind: PhantomData,
        }
    }
}

impl<T: Payload> fmt::Debug for Signed<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signed")
            .field("kind", &T::KIND)
            .field("signer", &self.signer)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

impl<T: Payload> Signed<T> {
    /// Encodes `body` and signs it with `key`. The key must be the one the body claims to
    /// come from.
    pub fn sign(key: &SigningKey, body: &T) -> Result<Verified<T>, SignError> {
        if *body.claimed_signer() != key.peer_id() {
            return Err(SignError::WrongKey {
                kind: T::KIND,
                signer: key.peer_id().to_string(),
                claimed: body.claimed_signer().to_string(),
            });
        }
        let payload = to_cbor(body);
        let signature = key.sign_raw(&signing_input(T::KIND, &payload));
        let signed = Signed { payload, signer: key.peer_id(), key: None, signature, _kind: PhantomData };
        let len = signed.to_bytes().len();
        if len > T::KIND.max_wire_bytes() {
            return Err(SignError::TooLarge { kind: T::KIND, len, max: T::KIND.max_wire_bytes() });
        }
        Ok(Verified { signed, body: body.clone() })
    }

    /// Parses an envelope from the wire. Checks the size cap first, then the envelope's
    /// shape and the signer's key type; does not check the signature.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let max = T::KIND.max_wire_bytes();
        if bytes.len() > max {
            return Err(DecodeError::TooLarge { kind: T::KIND, len: bytes.len(), max });
        }
        let [payload, signer_bytes, signature] = envelope::decode(bytes)?;
        let (signer, key) = identity::verifying_key_for(signer_bytes)?;
        let signature: [u8; 64] = signature.try_into().map_err(|_| DecodeError::SignatureLength(signature.len()))?;
        Ok(Signed { payload: payload.to_vec(), signer, key: Some(Box::new(key)), signature, _kind: PhantomData })
    }

    /// The envelope's wire encoding.
    pub fn to_bytes(&self) -> Vec<u8> {
        envelope::encode([&self.payload, &self.signer.to_bytes(), &self.signature])
    }

    pub fn signer(&self) -> PeerId {
        self.signer
    }

    /// The exact signed payload bytes.
    pub fn payload_bytes(&self) -> &[u8] {
        &self.payload
    }

    pub fn signature(&self) -> &[u8; 64] {
        &self.signature
    }

    /// Checks the signature strictly over the received bytes, then decodes the payload,
    /// then checks its version and that its claimed author is the signer.
    pub fn verify(self) -> Result<Verified<T>, VerifyError> {
        let key = self.verifying_key()?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify_strict(&signing_input(T::KIND, &self.payload), &signature)
            .map_err(|_| VerifyError::BadSignature { kind: T::KIND, signer: self.signer.to_string() })?;
        self.decode_checked()
    }

    /// Decodes and checks a payload whose signature the caller has already verified (the
    /// batch path).
    pub(crate) fn decode_checked(self) -> Result<Verified<T>, VerifyError> {
        let body: T = from_cbor(&self.payload, T::KIND.name())?;
        if body.version() != T::VERSION {
            return Err(VerifyError::UnsupportedVersion { kind: T::KIND, got: body.version(), supported: T::VERSION });
        }
        if *body.claimed_signer() != self.signer {
            return Err(VerifyError::SignerMismatch {
                kind: T::KIND,
                signer: self.signer.to_string(),
                claimed: body.claimed_signer().to_string(),
            });
        }
        // The decompressed key is not needed once verified; dropping it keeps stored
        // messages small (a node may hold 100,000 adverts).
        Ok(Verified { signed: Signed { key: None, ..self }, body })
    }

    /// An envelope from its parts, unverified (for other transports and for tests).
    pub fn from_parts(payload: Vec<u8>, signer: PeerId, signature: [u8; 64]) -> Self {
        Signed { payload, signer, key: None, signature, _kind: PhantomData }
    }

    /// The signer's ed25519 key (refusing non-ed25519 and weak keys).
    pub(crate) fn verifying_key(&self) -> Result<VerifyingKey, DecodeError> {
        match &self.key {
            Some(key) => Ok(*key.as_ref()),
            None => Ok(identity::verifying_key_for(&self.signer.to_bytes())?.1),
        }
    }

    /// Parses and verifies in one step: what a node does with bytes from the network.
    pub fn open(bytes: &[u8]) -> Result<Verified<T>, VerifyError> {
        Self::from_bytes(bytes)?.verify()
    }
}

/// The message an ed25519 signature of kind `kind` covers: domain tag then payload.
pub fn signing_input(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let domain = kind.domain();
    let mut msg = Vec::with_capacity(domain.len() + payload.len());
    msg.extend_from_slice(domain);
    msg.extend_from_slice(payload);
    msg
}

/// A message whose signature, version and author have been checked. Holds the original
/// envelope (to forward or store the exact bytes) and the decoded payload.
pub struct Verified<T> {
    signed: Signed<T>,
    body: T,
}

impl<T: Payload> Clone for Verified<T> {
    fn clone(&self) -> Self {
        Self { signed: self.signed.clone(), body: self.body.clone() }
    }
}

impl<T: Payload + fmt::Debug> fmt::Debug for Verified<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verified").field("signer", &self.signed.signer).field("body", &self.body).finish()
    }
}

impl<T: Payload> Verified<T> {
    pub fn body(&self) -> &T {
        &self.body
    }

    pub fn signed(&self) -> &Signed<T> {
        &self.signed
    }

    pub fn signer(&self) -> PeerId {
        self.signed.signer
    }

    /// The envelope's wire bytes (for forwarding, storing or sending).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.signed.to_bytes()
    }

    pub fn into_parts(self) -> (Signed<T>, T) {
        (self.signed, self.body)
    }
}

impl<T> std::ops::Deref for Verified<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.body
    }
}

/// The envelope's encoding: a CBOR array of exactly three definite-length byte strings
/// `[payload, signer, signature]`, every length in its shortest form. Parsed by hand and
/// strictly, so an envelope has exactly one encoding: peers that deduplicate by the hash
/// of the bytes see one message, not many re-encodings of it.
pub(crate) mod envelope {
    use crate::error::DecodeError;

    const WHAT: &str = "signed envelope";

    pub fn encode(parts: [&[u8]; 3]) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + parts.iter().map(|p| p.len()).sum::<usize>());
        out.push(0x83);
        for part in parts {
            write_bytes_header(&mut out, part.len());
            out.extend_from_slice(part);
        }
        out
    }

    fn write_bytes_header(out: &mut Vec<u8>, len: usize) {
        const MAJOR_BYTES: u8 = 0x40;
        match len {
            0..=23 => out.push(MAJOR_BYTES | len as u8),
            24..=0xff => out.extend_from_slice(&[MAJOR_BYTES | 24, len as u8]),
            0x100..=0xffff => {
                out.push(MAJOR_BYTES | 25);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(MAJOR_BYTES | 26);
                out.extend_from_slice(&(len as u32).to_be_bytes());
            }
        }
    }

    fn malformed(reason: impl Into<String>) -> DecodeError {
        DecodeError::Cbor { what: WHAT, reason: reason.into() }
    }

    pub fn decode(bytes: &[u8]) -> Result<[&[u8]; 3], DecodeError> {
        let mut rest = bytes;
        match rest.split_first() {
            Some((0x83, tail)) => rest = tail,
            _ => return Err(malformed("expected an array of 3 byte strings")),
        }
        let mut parts: [&[u8]; 3] = [&[]; 3];
        for part in parts.iter_mut() {
            let (len, tail) = read_bytes_header(rest)?;
            if tail.len() < len {
                return Err(malformed("truncated input"));
            }
            let (value, tail) = tail.split_at(len);
            *part = value;
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes { what: WHAT, extra: rest.len() });
        }
        Ok(parts)
    }

    fn read_bytes_header(bytes: &[u8]) -> Result<(usize, &[u8]), DecodeError> {
        let (&first, rest) = bytes.split_first().ok_or_else(|| malformed("truncated input"))?;
        if first >> 5 != 2 {
            return Err(malformed("expected a byte string"));
        }
        let take = |n: usize| -> Result<(u64, &[u8]), DecodeError> {
            if rest.len() < n {
                return Err(malformed("truncated input"));
            }
            let (head, tail) = rest.split_at(n);
            Ok((head.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)), tail))
        };
        let (len, tail, min) = match first & 0x1f {
            n @ 0..=23 => (u64::from(n), rest, 0),
            24 => take(1).map(|(l, t)| (l, t, 24))?,
            25 => take(2).map(|(l, t)| (l, t, 0x100))?,
            26 => take(4).map(|(l, t)| (l, t, 0x1_0000))?,
            _ => return Err(malformed("byte string length must be definite and under 4 GiB")),
        };
        if len < min {
            return Err(malformed("byte string length not in its shortest form"));
        }
        let len = usize::try_from(len).map_err(|_| malformed("byte string too long"))?;
        Ok((len, tail))
    }
}
