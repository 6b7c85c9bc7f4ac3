//! Arbitrary bytes never panic any decoder (SECURITY.md invariant 12). CI runs 100,000 cases of raw
//! bytes (CI=true) and 20,000 of each signed/mutated property; locally 5,000 unless PEERVM_PROPTEST_CASES says otherwise.

use peervm_protocol::encoding::from_cbor;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::signed::signing_input;
use peervm_protocol::*;
use proptest::prelude::*;

fn cases() -> u32 {
    if let Some(n) = std::env::var("PEERVM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()) {
        return n;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") { 100_000 } else { 5_000 }
}

fn open_all_kinds(bytes: &[u8]) {
    let _ = Signed::<Advertisement>::open(bytes);
    let _ = Signed::<LeaseRequest>::open(bytes);
    let _ = Signed::<LeaseReply>::open(bytes);
    let _ = Signed::<LeaseControl>::open(bytes);
    let _ = verify_batch::<Advertisement>(&[bytes, bytes]);
}

/// Signs `payload` as every kind with a test key, so the payload decoder itself sees the
/// arbitrary bytes (unsigned garbage would stop at the signature check).
fn decode_signed_payload(payload: &[u8]) {
    let p = samples::provider_key();
    for kind in [Kind::Advert, Kind::LeaseRequest, Kind::LeaseReply, Kind::LeaseControl] {
        let sig = p.sign_raw(&signing_input(kind, payload));
        let env = Signed::<Advertisement>::from_parts(payload.to_vec(), p.peer_id(), sig).to_bytes();
        match kind {
            Kind::Advert => {
                if let Ok(v) = Signed::<Advertisement>::open(&env) {
                    let _ = v.body().check_acceptable(T0_UNIX_MS, Some(1));
                }
            }
            Kind::LeaseRequest => {
                if let Ok(v) = Signed::<LeaseRequest>::open(&env) {
                    let _ = v.body().check_fresh(&p.peer_id(), T0_UNIX_MS);
                    let _ = v.body().check_well_formed();
                }
            }
            Kind::LeaseReply => {
                let _ = Signed::<LeaseReply>::open(&env);
            }
            _ => {
                let _ = Signed::<LeaseControl>::open(&env);
            }
        }
    }
}

fn valid_envelopes() -> Vec<Vec<u8>> {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    vec![
        Signed::sign(&p, &samples::advert(&p, 1, T0_UNIX_MS)).unwrap().to_bytes(),
        Signed::sign(&r, &samples::lease_request(&r, &p, T0_UNIX_MS)).unwrap().to_bytes(),
        Signed::sign(&p, &samples::lease_reply(&p, &r, samples::granted(T0_UNIX_MS), T0_UNIX_MS)).unwrap().to_bytes(),
        Signed::sign(&r, &samples::lease_control(&r, &p, ControlAction::Terminate, T0_UNIX_MS)).unwrap().to_bytes(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..9000)) {
        open_all_kinds(&bytes);
        let _ = from_cbor::<Advertisement>(&bytes, "advert");
        let _ = from_cbor::<LeaseRequest>(&bytes, "lease request");
        let _ = from_cbor::<LeaseReply>(&bytes, "lease reply");
        let _ = from_cbor::<LeaseControl>(&bytes, "lease control");
    }
}

proptest! {
    // Each case here signs or verifies several times: a fifth of the cases keeps CI quick.
    #![proptest_config(ProptestConfig { cases: cases() / 5, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_signed_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        decode_signed_payload(&payload);
    }

    #[test]
    fn mutated_valid_messages_never_panic_and_never_verify(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        truncate in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut bytes = valid_envelopes().swap_remove(which);
        let original = bytes.clone();
        for (at, value) in edits {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Some(t) = truncate {
            bytes.truncate(t.index(bytes.len()));
        }
        open_all_kinds(&bytes);
        if bytes != original {
            // Any change to a valid envelope is refused, whichever kind it is opened as.
            prop_assert!(Signed::<Advertisement>::open(&bytes).is_err());
            prop_assert!(Signed::<LeaseRequest>::open(&bytes).is_err());
            prop_assert!(Signed::<LeaseReply>::open(&bytes).is_err());
            prop_assert!(Signed::<LeaseControl>::open(&bytes).is_err());
        }
    }
}

/// Structured CBOR that decodes far enough to reach the field checks.
#[test]
fn hostile_cbor_shapes_are_errors() {
    let deep: Vec<u8> = std::iter::repeat_n(0x81u8, 10_000).chain([0x00]).collect();
    assert!(from_cbor::<Advertisement>(&deep, "advert").is_err());
    // A byte string that claims 4 GiB.
    assert!(from_cbor::<Advertisement>(&[0x5a, 0xff, 0xff, 0xff, 0xff, 0x00], "advert").is_err());
    // An array that claims 2^64 - 1 elements.
    assert!(from_cbor::<Vec<u8>>(&[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff], "array").is_err());
    // Signed envelope whose lengths are not minimal.
    assert!(Signed::<Advertisement>::from_bytes(&[0x83, 0x58, 0x01, 0x00, 0x40, 0x40]).is_err());
}
