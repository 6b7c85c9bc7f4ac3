//! Verifying many signed messages at once (sync snapshots, join-time pulls).
//!
//! ed25519 batch verification checks n signatures for roughly the cost of a few dozen
//! single ones. If the batch fails, each item is verified on its own so the caller learns
//! exactly which ones were bad (and whom to penalise); the good ones are still accepted.
//!
//! Equivalence with the single path: `verify_strict` refuses weak keys and small-order R;
//! both are refused here before batching (R by its encoding; an R that is not a point at
//! all fails the batch and then the single check), so an honestly made signature is accepted by
//! both paths and a forged one by neither. (A key owner who deliberately mixes torsion
//! into its own signatures may see them accepted by one path and not the other; that can
//! only affect that owner's own adverts, and sync results are never forwarded as gossip.)

use std::sync::OnceLock;

use curve25519_dalek::constants::EIGHT_TORSION;
use ed25519_dalek::{Signature, VerifyingKey};

use crate::error::VerifyError;
use crate::signed::{Payload, Signed, Verified, signing_input};

/// Verifies every envelope in `items`; the result at index i belongs to `items[i]`.
pub fn verify_batch<T: Payload>(items: &[&[u8]]) -> Vec<Result<Verified<T>, VerifyError>> {
    let mut results: Vec<Option<Result<Verified<T>, VerifyError>>> = Vec::with_capacity(items.len());
    let mut pending: Vec<(usize, Signed<T>, VerifyingKey, Vec<u8>)> = Vec::with_capacity(items.len());

    for (i, bytes) in items.iter().enumerate() {
        let parsed = Signed::<T>::from_bytes(bytes).map_err(VerifyError::from).and_then(|signed| {
            let key = signed.verifying_key()?;
            if r_is_small_order(signed.signature()) {
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

/// `verify_strict` refuses a signature whose R has small order. Decompressing R to check
/// would cost as much again as the batch saves, so R's bytes are compared with every
/// encoding of the eight small-order points instead (computed once). A point's encoding
/// is its y coordinate (255 bits, taken mod p) plus the sign of x in bit 255; the sign
/// is ignored here, since the negation of a small-order point has small order too.
fn r_is_small_order(signature: &[u8; 64]) -> bool {
    let mut y = [0u8; 32];
    y.copy_from_slice(&signature[..32]);
    y[31] &= 0x7f;
    small_order_y_encodings().contains(&y)
}

fn small_order_y_encodings() -> &'static [[u8; 32]] {
    static SET: OnceLock<Vec<[u8; 32]>> = OnceLock::new();
    SET.get_or_init(|| {
        let mut set = Vec::new();
        for point in EIGHT_TORSION {
            let mut y = point.compress().to_bytes();
            y[31] &= 0x7f;
            set.push(y);
            // y + p is a second, non-canonical encoding of y when it still fits in 255
            // bits, i.e. when y < 19 (p = 2^255 - 19).
            if y[0] < 19 && y[1..].iter().all(|b| *b == 0) {
                let mut alt = [0xffu8; 32];
                alt[0] = 0xed + y[0];
                alt[31] = 0x7f;
                set.push(alt);
            }
        }
        set.sort_unstable();
        set.dedup();
        set
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use curve25519_dalek::edwards::CompressedEdwardsY;

    #[test]
    fn every_listed_encoding_is_small_order_and_both_signs_are_caught() {
        let set = small_order_y_encodings();
        // 0 and 1 have a second encoding, the other y values do not.
        assert!(set.len() >= 7, "{}", set.len());
        for y in set {
            for sign in [0u8, 0x80] {
                let mut enc = *y;
                enc[31] |= sign;
                let mut sig = [0u8; 64];
                sig[..32].copy_from_slice(&enc);
                assert!(r_is_small_order(&sig));
                if let Some(p) = CompressedEdwardsY(enc).decompress() {
                    assert!(p.is_small_order(), "{enc:02x?}");
                }
            }
        }
    }

    #[test]
    fn ordinary_points_are_not_flagged() {
        let p = crate::samples::provider_key();
        for i in 0..64u8 {
            let sig = p.sign_raw(&[i]);
            assert!(!r_is_small_order(&sig));
        }
    }
}
