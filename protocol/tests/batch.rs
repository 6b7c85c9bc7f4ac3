//! Batch verification accepts exactly what single verification accepts, and names the
//! items that fail.

use peervm_protocol::encoding::to_cbor;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::signed::signing_input;
use peervm_protocol::*;

#[test]
fn batch_of_valid_adverts_all_verified() {
    let items = samples::signed_adverts(64);
    let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    let results = verify_batch::<Advertisement>(&refs);
    assert_eq!(results.len(), 64);
    for (i, r) in results.iter().enumerate() {
        let v = r.as_ref().unwrap_or_else(|e| panic!("item {i}: {e}"));
        assert_eq!(v.body().seq, i as u64 + 1);
    }
}

#[test]
fn batch_names_exactly_the_bad_items() {
    let mut items = samples::signed_adverts(64);
    // 5: one payload bit flipped. 17: signed by someone else. 30: garbage. 41: oversize.
    // 50: signature for another kind.
    let last = items[5].len() - 70;
    items[5][last] ^= 0x01;
    {
        let victim = samples::numbered_key(17);
        let mallory = samples::numbered_key(9999);
        let payload = to_cbor(&samples::advert(&victim, 1, T0_UNIX_MS));
        let sig = mallory.sign_raw(&signing_input(Kind::Advert, &payload));
        items[17] = Signed::<Advertisement>::from_parts(payload, victim.peer_id(), sig).to_bytes();
    }
    items[30] = vec![0xde, 0xad];
    items[41] = vec![0x83; 5000];
    {
        let key = samples::numbered_key(50);
        let payload = to_cbor(&samples::advert(&key, 1, T0_UNIX_MS));
        let sig = key.sign_raw(&signing_input(Kind::LeaseReply, &payload));
        items[50] = Signed::<Advertisement>::from_parts(payload, key.peer_id(), sig).to_bytes();
    }
    let refs: Vec<&[u8]> = items.iter().map(Vec::as_slice).collect();
    let results = verify_batch::<Advertisement>(&refs);
    let failed: Vec<usize> = results.iter().enumerate().filter(|(_, r)| r.is_err()).map(|(i, _)| i).collect();
    assert_eq!(failed, vec![5, 17, 30, 41, 50]);
    assert!(matches!(results[17], Err(VerifyError::BadSignature { .. })));
    assert!(matches!(results[41], Err(VerifyError::Decode(DecodeError::TooLarge { .. }))));
    assert!(matches!(results[50], Err(VerifyError::BadSignature { .. })));
    // Single verification agrees item by item.
    for (i, bytes) in refs.iter().enumerate() {
        assert_eq!(Signed::<Advertisement>::open(bytes).is_ok(), results[i].is_ok(), "item {i}");
    }
}

#[test]
fn batch_refuses_small_order_r_like_verify_strict() {
    let key = samples::numbered_key(3);
    let payload = to_cbor(&samples::advert(&key, 1, T0_UNIX_MS));
    // R = the identity point (small order), s = 0: verify_strict refuses it.
    let mut sig = [0u8; 64];
    sig[0] = 1;
    let bytes = Signed::<Advertisement>::from_parts(payload, key.peer_id(), sig).to_bytes();
    assert!(Signed::<Advertisement>::open(&bytes).is_err());
    let results = verify_batch::<Advertisement>(&[&bytes]);
    assert!(matches!(results[0], Err(VerifyError::BadSignature { .. })));
}

#[test]
fn empty_batch_is_empty() {
    assert!(verify_batch::<Advertisement>(&[]).is_empty());
}
