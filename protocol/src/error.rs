//! Typed errors of the protocol crate. Each says what failed and on which input, so a
//! node can log it, count it by reason, and decide whether to penalise the sender.

use thiserror::Error;

use crate::signed::Kind;

/// A PeerId that cannot be used as a signer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdentityError {
    #[error("signer is not an inlined ed25519 PeerId (other key types are refused)")]
    NotEd25519,
    #[error("signer's ed25519 public key is not a valid curve point")]
    InvalidPublicKey,
    #[error("signer's ed25519 public key is weak (small order)")]
    WeakPublicKey,
}

/// Bytes that are not a well-formed message of the expected kind.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("{kind} is {len} bytes, over the {max}-byte cap")]
    TooLarge { kind: Kind, len: usize, max: usize },
    #[error("malformed CBOR in {what}: {reason}")]
    Cbor { what: &'static str, reason: String },
    #[error("{what} has {extra} trailing bytes after the CBOR item")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("signature must be 64 bytes, got {0}")]
    SignatureLength(usize),
    #[error("signer: {0}")]
    Signer(#[from] IdentityError),
}

/// Why a signed envelope was not accepted as a message of its kind.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("bad {kind} signature from {signer}")]
    BadSignature { kind: Kind, signer: String },
    #[error("{kind} payload version {got} is not supported (this node speaks {supported})")]
    UnsupportedVersion { kind: Kind, got: u32, supported: u32 },
    #[error("{kind} signed by {signer} but claims to come from {claimed}")]
    SignerMismatch { kind: Kind, signer: String, claimed: String },
}

impl VerifyError {
    /// Errors that only a dishonest or broken sender can cause: a node penalises the peer
    /// that sent them. (An unsupported version may come from a newer honest node.)
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(self, VerifyError::UnsupportedVersion { .. })
    }
}

/// Failure to produce a signed message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SignError {
    #[error("{kind} must be signed by {claimed}, not by {signer}")]
    WrongKey { kind: Kind, signer: String, claimed: String },
    #[error("encoded {kind} is {len} bytes, over the {max}-byte cap")]
    TooLarge { kind: Kind, len: usize, max: usize },
}
