//! Verifying many signed messages at once (sync snapshots, join-time pulls).
//!
//! ed25519 batch verification checks n signatures for roughly the cost of a few dozen
//! single ones. If the batch fails, each item is verified on its own so the caller learns
//! exactly which ones were bad (and whom to penalise); the good ones are still accepted.
//!
//! Equivalence with the single path: `verify_strict` refuses weak keys and small-order R;
//! both are refused here before batching, so an honestly made signature is accepted by
//! both paths and a forged one by neither. (A key owner who deliberately mixes torsion
//! into its own signatures may see them accepted by one path and not the other; that can
//! only affect that owner's own adverts, and sync results are never forwarded as gossip.)

use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::{Signature, VerifyingKey};

use crate::error::VerifyError;
use crate::identity;
use crate::signed::{Payload, Signed, Verified, signing_input};

/// Verifies every envelope in `items`; the result at index i belongs to `items[i]`.
pub fn verify_batch<T: Payload>(items: &[&[u8]]) -> Vec<Result<Verified<T>, VerifyError>> {
    let mut results: Vec<Option<Result<Verified<T>, VerifyError>>> = Vec::with_capacity(items.len());
    let mut pending: Vec<(usize, Signed<T>, VerifyingKey, Vec<u8>)> = Vec::with_capacity(items.len());

    for (i, bytes) in items.iter().enumerate() {
        let parsed = Signed::<T>::from_bytes(bytes).map_err(VerifyError::from).and_then(|signed| {
            let (_, key) = identity::verifying_key_for(&signed.signer().to_bytes())
                .map_err(|e| VerifyError::Decode(e.into()))?;
            if r_is_small_order_or_invalid(signed.signature()) {
                return Err(bad_signature(&signed));
            }
            Ok((signed, key))
        });
        match parsed {
            Ok((signed, key)) => {
                let msg = signing_input(T::KIND, signed.payload_bytes());
                pending.push((i, signed, key, msg));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }

    let messages: Vec<&[u8]> = pending.iter().map(|(_, _, _, m)| m.as_slice()).collect();
    let signatures: Vec<Signature> = pending.iter().map(|(_, s, _, _)| Signature::from_bytes(s.signature())).collect();
    let keys: Vec<VerifyingKey> = pending.iter().map(|(_, _, k, _)| *k).collect();
    let all_good = !pending.is_empty() && ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok();

    for ((i, signed, key, msg), sig) in pending.into_iter().zip(signatures) {
        let outcome = if all_good || key.verify_strict(&msg, &sig).is_ok() {
            signed.decode_checked()
        } else {
            Err(bad_signature(&signed))
        };
        results[i] = Some(outcome);
    }
    results.into_iter().map(|r| r.unwrap_or_else(|| unreachable!("every item gets a result"))).collect()
}

fn bad_signature<T: Payload>(signed: &Signed<T>) -> VerifyError {
    VerifyError::BadSignature { kind: T::KIND, signer: signed.signer().to_string() }
}

/// `verify_strict` refuses a signature whose R does not decompress or has small order.
fn r_is_small_order_or_invalid(signature: &[u8; 64]) -> bool {
    let mut r = [0u8; 32];
    r.copy_from_slice(&signature[..32]);
    match CompressedEdwardsY(r).decompress() {
        Some(point) => point.is_small_order(),
        None => true,
    }
}
