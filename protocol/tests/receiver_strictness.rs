//! What a receiver does with payload encodings other than the canonical one a sender
//! must produce (docs/protocol.md section 3, "Receivers"), and in which order the checks
//! of section 2 fail. Each payload here is signed properly, so the decoder itself decides;
//! these tests pin the spec: a change of the decoder that changes what is accepted fails
//! here and must change the spec with it.

mod cbor_edit;

use cbor_edit::{encode, entries, field};
use ciborium::Value;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::signed::signing_input;
use peervm_protocol::*;

/// A well-formed envelope of `kind` around `payload`, signed by `key`.
fn envelope(key: &SigningKey, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let sig = key.sign_raw(&signing_input(kind, payload));
    Signed::<Advertisement>::from_parts(payload.to_vec(), key.peer_id(), sig).to_bytes()
}

fn sample_advert() -> Advertisement {
    let p = samples::provider_key();
    samples::advert(&p, 1, T0_UNIX_MS)
}

fn advert_payload() -> Vec<u8> {
    peervm_protocol::encoding::to_cbor(&sample_advert())
}

fn open_advert(payload: &[u8]) -> Result<Advertisement, VerifyError> {
    Signed::<Advertisement>::open(&envelope(&samples::provider_key(), Kind::Advert, payload)).map(|v| v.body().clone())
}

fn reply_payload(outcome: ReplyOutcome) -> Vec<u8> {
    let (p, r) = (samples::provider_key(), samples::requestor_key());
    peervm_protocol::encoding::to_cbor(&samples::lease_reply(&p, &r, outcome, T0_UNIX_MS))
}

fn open_reply(payload: &[u8]) -> Result<LeaseReply, VerifyError> {
    Signed::<LeaseReply>::open(&envelope(&samples::provider_key(), Kind::LeaseReply, payload)).map(|v| v.body().clone())
}

fn value(bytes: &[u8]) -> Value {
    ciborium::from_reader(bytes).expect("valid CBOR")
}

fn remove(v: &mut Value, key: &str) {
    entries(v).retain(|(k, _)| k.as_text() != Some(key));
}

/// `bytes` with the only occurrence of `from` (hex) replaced by `to` (hex).
fn splice(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let unhex = |h: &str| hex::decode(h.replace(' ', "")).expect("hex");
    let (from, to) = (unhex(from), unhex(to));
    let at: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "the pattern must occur exactly once");
    [&bytes[..at[0]], &to[..], &bytes[at[0] + from.len()..]].concat()
}

fn is_decode_error(result: Result<impl std::fmt::Debug, VerifyError>, containing: &str) -> bool {
    match result {
        Err(VerifyError::Decode(DecodeError::Cbor { reason, .. })) => reason.contains(containing),
        _ => false,
    }
}

#[test]
fn the_test_encoder_reproduces_the_canonical_payload() {
    // Value round trips keep order and shortest integers, so every change below is the
    // only change.
    assert_eq!(encode(&value(&advert_payload())), advert_payload());
}

#[test]
fn keys_in_another_order_are_accepted_at_every_level() {
    let mut v = value(&advert_payload());
    entries(field(&mut v, "ssh")).reverse();
    entries(field(&mut v, "pricing")).reverse();
    entries(&mut v).reverse();
    assert_eq!(open_advert(&encode(&v)).unwrap(), sample_advert());
}

#[test]
fn integers_not_in_their_shortest_form_are_accepted() {
    // version 1 as `18 01`, seq 1 as `1b 00..01`.
    let payload = splice(&advert_payload(), "6776657273696f6e01", "6776657273696f6e1801");
    let payload = splice(&payload, "6373657101", "63736571 1b0000000000000001");
    assert_eq!(open_advert(&payload).unwrap(), sample_advert());
}

#[test]
fn a_known_key_twice_is_refused_an_unknown_key_twice_is_ignored() {
    let mut v = value(&advert_payload());
    entries(&mut v).push((Value::Text("seq".into()), Value::Integer(1.into())));
    assert!(is_decode_error(open_advert(&encode(&v)), "duplicate field `seq`"));

    let mut v = value(&advert_payload());
    for _ in 0..2 {
        entries(&mut v).push((Value::Text("x_future".into()), Value::Integer(1.into())));
    }
    assert_eq!(open_advert(&encode(&v)).unwrap(), sample_advert());
}

#[test]
fn indefinite_lengths_are_accepted_except_for_an_enum_map() {
    let canonical = advert_payload();
    assert_eq!(canonical[0], 0xaf, "the advert is a map of 15 entries");
    // the top-level map, a text string and a byte string, each in indefinite form
    let mut payload = [&[0xbf][..], &canonical[1..], &[0xff]].concat();
    payload = splice(&payload, "6a65752d63656e7472616c", "7f6565752d6365656e7472616cff");
    let sha = hex::encode(samples::minimal_image_sha256());
    payload = splice(&payload, &format!("5820{sha}"), &format!("5f5820{sha}ff"));
    assert_eq!(open_advert(&payload).unwrap(), sample_advert());

    // An enum (the reply's outcome, its last field) as an indefinite map is refused.
    let reply = reply_payload(samples::granted(T0_UNIX_MS));
    let indefinite = [&splice(&reply, "676f7574636f6d65a1", "676f7574636f6d65bf")[..], &[0xff]].concat();
    assert!(open_reply(&indefinite).is_err());
    assert!(open_reply(&reply).is_ok());
}

#[test]
fn unknown_keys_are_ignored_at_every_level() {
    let extra = || (Value::Text("x_future".into()), Value::Array(vec![Value::Float(1.5), Value::Null]));
    let mut v = value(&advert_payload());
    entries(&mut v).push(extra());
    entries(field(&mut v, "ssh")).push(extra());
    entries(field(&mut v, "resources")).push(extra());
    entries(field(field(&mut v, "resources"), "free")).push(extra());
    if let Value::Array(images) = field(&mut v, "images") {
        entries(&mut images[0]).push(extra());
    }
    assert_eq!(open_advert(&encode(&v)).unwrap(), sample_advert());

    let mut r = value(&reply_payload(samples::granted(T0_UNIX_MS)));
    entries(field(field(&mut r, "outcome"), "granted")).push(extra());
    entries(field(field(field(&mut r, "outcome"), "granted"), "access")).push(extra());
    let reply = open_reply(&encode(&r)).unwrap();
    assert_eq!(reply.outcome, samples::granted(T0_UNIX_MS));
}

#[test]
fn unknown_enum_values_are_refused() {
    let denied = ReplyOutcome::Denied { reason: DenyReason::BootFailed, detail: "x".into() };
    let mut r = value(&reply_payload(denied));
    *field(field(field(&mut r, "outcome"), "denied"), "reason") = Value::Text("out_of_coffee".into());
    assert!(is_decode_error(open_reply(&encode(&r)), "unknown variant"));

    let status = ReplyOutcome::Status { state: LeaseState::Running, ends_at_unix_ms: T0_UNIX_MS, usage: None };
    let mut r = value(&reply_payload(status));
    *field(field(field(&mut r, "outcome"), "status"), "state") = Value::Text("paused".into());
    assert!(is_decode_error(open_reply(&encode(&r)), "unknown variant"));

    let mut r = value(&reply_payload(samples::granted(T0_UNIX_MS)));
    let outcome = field(&mut r, "outcome");
    *outcome = Value::Map(vec![(Value::Text("queued".into()), Value::Map(vec![]))]);
    assert!(is_decode_error(open_reply(&encode(&r)), "unknown variant"));

    let mut v = value(&advert_payload());
    *field(field(&mut v, "hypervisor"), "accel") = Value::Text("hvf".into());
    assert!(is_decode_error(open_advert(&encode(&v)), "unknown variant"));

    let (p, r) = (samples::provider_key(), samples::requestor_key());
    let control = samples::lease_control(&r, &p, ControlAction::Status, T0_UNIX_MS);
    let mut c = value(&peervm_protocol::encoding::to_cbor(&control));
    *field(&mut c, "action") = Value::Text("pause".into());
    let env = envelope(&r, Kind::LeaseControl, &encode(&c));
    assert!(is_decode_error(Signed::<LeaseControl>::open(&env).map(|_| ()), "unknown variant"));
}

#[test]
fn tags_are_skipped_undefined_is_null_and_byte_string_keys_are_accepted() {
    let mut v = value(&advert_payload());
    let issued = field(&mut v, "issued_at_unix_ms");
    *issued = Value::Tag(1, Box::new(issued.clone()));
    let region = field(&mut v, "region");
    *region = Value::Tag(0, Box::new(region.clone()));
    assert_eq!(open_advert(&encode(&v)).unwrap(), sample_advert());

    // `country` as CBOR undefined (f7) reads as null.
    let payload = splice(&advert_payload(), "67636f756e747279624445", "67636f756e747279f7");
    assert_eq!(open_advert(&payload).unwrap().country, None);

    // A key written as a byte string with the name's bytes is the same key...
    let payload = splice(&advert_payload(), "6776657273696f6e01", "4776657273696f6e01");
    assert_eq!(open_advert(&payload).unwrap(), sample_advert());
    // ...but an integer key is refused.
    let mut v = value(&advert_payload());
    entries(&mut v)[0].0 = Value::Integer(0.into());
    assert!(open_advert(&encode(&v)).is_err());
}

/// An edit of a payload's CBOR value.
type Change = Box<dyn Fn(&mut Value)>;

#[test]
fn wrong_types_missing_fields_and_out_of_range_integers_are_refused() {
    let cases: Vec<(&str, Change)> = vec![
        ("seq as text", Box::new(|v| *field(v, "seq") = Value::Text("1".into()))),
        ("seq negative", Box::new(|v| *field(v, "seq") = Value::Integer((-1).into()))),
        ("seq as a float", Box::new(|v| *field(v, "seq") = Value::Float(1.0))),
        (
            "vcpus over uint32",
            Box::new(|v| *field(field(field(v, "resources"), "free"), "vcpus") = Value::Integer((1u64 << 32).into())),
        ),
        ("port over uint16", Box::new(|v| *field(field(v, "ssh"), "port_min") = Value::Integer(65536.into()))),
        ("withdrawn as 0", Box::new(|v| *field(v, "withdrawn") = Value::Integer(0.into()))),
        ("region null", Box::new(|v| *field(v, "region") = Value::Null)),
        ("seq missing", Box::new(|v| remove(v, "seq"))),
        (
            "sha256 of 31 bytes",
            Box::new(|v| {
                if let Value::Array(images) = field(v, "images") {
                    *field(&mut images[0], "sha256") = Value::Bytes(vec![0; 31]);
                }
            }),
        ),
        (
            "sha256 as an array of ints",
            Box::new(|v| {
                if let Value::Array(images) = field(v, "images") {
                    *field(&mut images[0], "sha256") = Value::Array(vec![Value::Integer(0.into()); 32]);
                }
            }),
        ),
        (
            "a multiaddr that does not parse",
            Box::new(|v| *field(v, "listen_addrs") = Value::Array(vec![Value::Bytes(vec![0xff, 0xff])])),
        ),
    ];
    for (what, change) in cases {
        let mut v = value(&advert_payload());
        change(&mut v);
        assert!(matches!(open_advert(&encode(&v)), Err(VerifyError::Decode(DecodeError::Cbor { .. }))), "{what}");
    }
}

#[test]
fn optional_fields_absent_and_null_are_read_as_the_spec_says() {
    // Written as null when absent (`country`, `beneficiary`, `usage`): an absent key reads
    // as null.
    let mut v = value(&advert_payload());
    remove(&mut v, "country");
    remove(&mut v, "beneficiary");
    let a = open_advert(&encode(&v)).unwrap();
    assert_eq!((a.country, a.beneficiary), (None, None));
    let status = ReplyOutcome::Status { state: LeaseState::Running, ends_at_unix_ms: T0_UNIX_MS, usage: None };
    let mut r = value(&reply_payload(status.clone()));
    remove(field(field(&mut r, "outcome"), "status"), "usage");
    assert_eq!(open_reply(&encode(&r)).unwrap().outcome, status);

    // Left out when absent (`delegation`, `reachability`, `network`, `refresh`): null reads
    // as absent.
    let mut v = value(&advert_payload());
    for key in ["delegation", "reachability", "network", "refresh"] {
        entries(&mut v).push((Value::Text(key.into()), Value::Null));
    }
    assert_eq!(open_advert(&encode(&v)).unwrap(), sample_advert());

    // Left out when empty (`spec.expose`, the grant's `exposed`): an empty array reads as
    // empty, null is refused (it is not a list).
    let (p, r) = (samples::provider_key(), samples::requestor_key());
    let request = samples::lease_request(&r, &p, T0_UNIX_MS);
    let open_request = |v: &Value| Signed::<LeaseRequest>::open(&envelope(&r, Kind::LeaseRequest, &encode(v)));
    let mut q = value(&peervm_protocol::encoding::to_cbor(&request));
    entries(field(&mut q, "spec")).push((Value::Text("expose".into()), Value::Array(vec![])));
    assert_eq!(open_request(&q).unwrap().body(), &request);
    *field(field(&mut q, "spec"), "expose") = Value::Null;
    assert!(matches!(open_request(&q), Err(VerifyError::Decode(_))));

    let mut g = value(&reply_payload(samples::granted(T0_UNIX_MS)));
    entries(field(field(&mut g, "outcome"), "granted")).push((Value::Text("exposed".into()), Value::Null));
    assert!(matches!(open_reply(&encode(&g)), Err(VerifyError::Decode(_))));
}

#[test]
fn checks_fail_in_the_documented_order() {
    let p = samples::provider_key();
    let r = samples::requestor_key();

    // 1. The signature is checked before the payload is decoded: garbage under a bad
    //    signature is a bad signature.
    let mut env = envelope(&p, Kind::Advert, b"\xff not cbor");
    let last = env.len() - 1;
    env[last] ^= 1;
    assert!(matches!(Signed::<Advertisement>::open(&env), Err(VerifyError::BadSignature { .. })));

    // 2. A wrong field type fails the decode before the version is looked at, so a
    //    version-2 payload that does not decode as version 1 is malformed, not unsupported.
    let mut v = value(&advert_payload());
    *field(&mut v, "version") = Value::Integer(2.into());
    *field(&mut v, "seq") = Value::Text("one".into());
    assert!(matches!(open_advert(&encode(&v)), Err(VerifyError::Decode(_))));
    // A version that does not fit in uint32 is a decode error too.
    let mut v = value(&advert_payload());
    *field(&mut v, "version") = Value::Integer((1u64 << 32).into());
    assert!(matches!(open_advert(&encode(&v)), Err(VerifyError::Decode(_))));

    // 3. The version is checked before the author: a version-2 advert that decodes, signed
    //    by another key than its provider, is unsupported (and not misbehaviour).
    let mut body = sample_advert();
    body.version = 2;
    let payload = peervm_protocol::encoding::to_cbor(&body);
    let err = Signed::<Advertisement>::open(&envelope(&r, Kind::Advert, &payload)).unwrap_err();
    assert_eq!(err, VerifyError::UnsupportedVersion { kind: Kind::Advert, got: 2, supported: 1 });
    assert!(!err.is_misbehaviour());

    // 4. Then the author.
    let payload = advert_payload();
    assert!(matches!(
        Signed::<Advertisement>::open(&envelope(&r, Kind::Advert, &payload)),
        Err(VerifyError::SignerMismatch { .. })
    ));

    // Within the envelope: the signer is checked before the signature's length.
    let mut bad_signer = p.peer_id().to_bytes();
    bad_signer[2] = 0x09;
    let mut env = vec![0x83, 0x41, 0xa0, 0x58, bad_signer.len() as u8];
    env.extend_from_slice(&bad_signer);
    env.extend_from_slice(&[0x43, 1, 2, 3]);
    assert!(matches!(Signed::<Advertisement>::from_bytes(&env), Err(DecodeError::Signer(_))));
    let good_signer = p.peer_id().to_bytes();
    let mut env = vec![0x83, 0x41, 0xa0, 0x58, good_signer.len() as u8];
    env.extend_from_slice(&good_signer);
    env.extend_from_slice(&[0x43, 1, 2, 3]);
    assert_eq!(Signed::<Advertisement>::from_bytes(&env).unwrap_err(), DecodeError::SignatureLength(3));
}

#[test]
fn the_envelope_itself_has_exactly_one_encoding() {
    let p = samples::provider_key();
    let good = Signed::sign(&p, &sample_advert()).unwrap().to_bytes();
    assert!(Signed::<Advertisement>::open(&good).is_ok());
    // an indefinite array, a chunked payload, a tag in front: all refused
    let indefinite_array = [&[0x9f][..], &good[1..], &[0xff]].concat();
    assert!(Signed::<Advertisement>::from_bytes(&indefinite_array).is_err());
    let payload_len = u16::from_be_bytes([good[2], good[3]]) as usize;
    let chunked = [&[0x83, 0x5f][..], &good[1..4 + payload_len], &[0xff], &good[4 + payload_len..]].concat();
    assert!(Signed::<Advertisement>::from_bytes(&chunked).is_err());
    let tagged = [&[0xd8, 0x18][..], &good[..]].concat();
    assert!(Signed::<Advertisement>::from_bytes(&tagged).is_err());
}
