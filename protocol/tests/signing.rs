//! Round trips, tampering, cross-kind replay and signer checks of the signed envelope.

use peervm_protocol::encoding::to_cbor;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::signed::signing_input;
use peervm_protocol::*;

fn roundtrip<T: Payload + PartialEq + std::fmt::Debug>(key: &SigningKey, body: T) {
    let signed = Signed::sign(key, &body).expect("sign");
    let bytes = signed.to_bytes();
    assert!(bytes.len() <= T::KIND.max_wire_bytes());
    let opened = Signed::<T>::open(&bytes).expect("open");
    assert_eq!(opened.body(), &body);
    assert_eq!(opened.signer(), key.peer_id());
    assert_eq!(opened.to_bytes(), bytes, "re-encoding the envelope gives the same bytes");
}

#[test]
fn roundtrip_every_message_kind() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    roundtrip(&p, samples::advert(&p, 1, T0_UNIX_MS));
    let mut withdrawn = samples::advert(&p, 2, T0_UNIX_MS);
    withdrawn.withdrawn = true;
    withdrawn.beneficiary = Some("0xabc".into());
    withdrawn.country = None;
    roundtrip(&p, withdrawn);
    roundtrip(&r, samples::lease_request(&r, &p, T0_UNIX_MS));
    for action in [ControlAction::Status, ControlAction::Extend { additional_secs: 600 }, ControlAction::Terminate] {
        roundtrip(&r, samples::lease_control(&r, &p, action, T0_UNIX_MS));
    }
    let outcomes = [
        samples::granted(T0_UNIX_MS),
        ReplyOutcome::Denied { reason: DenyReason::Replay, detail: "nonce seen".into() },
        ReplyOutcome::Status {
            state: LeaseState::Running,
            ends_at_unix_ms: T0_UNIX_MS + 1,
            usage: Some(LeaseUsage { cpu_usec: 1, memory_current_bytes: 2, ..Default::default() }),
        },
        ReplyOutcome::Status { state: LeaseState::Ended, ends_at_unix_ms: T0_UNIX_MS, usage: None },
        ReplyOutcome::Extended { ends_at_unix_ms: T0_UNIX_MS + 5 },
        ReplyOutcome::Terminated { at_unix_ms: T0_UNIX_MS },
    ];
    for outcome in outcomes {
        roundtrip(&p, samples::lease_reply(&p, &r, outcome, T0_UNIX_MS));
    }
}

/// Re-signs nothing: puts `body`'s encoding under the signature of `original`.
fn with_original_signature<T: Payload>(original: &Verified<T>, body: &T) -> Vec<u8> {
    Signed::<T>::from_parts(to_cbor(body), original.signer(), *original.signed().signature()).to_bytes()
}

fn flip_u64(v: &mut u64) {
    *v ^= 1;
}
fn flip_u32(v: &mut u32) {
    *v ^= 1;
}
fn flip_u16(v: &mut u16) {
    *v ^= 1;
}
fn flip_bytes(v: &mut [u8]) {
    v[0] ^= 1;
}
fn flip_str(v: &mut String) {
    let mut b = std::mem::take(v).into_bytes();
    b[0] ^= 1;
    *v = String::from_utf8(b).expect("ascii stays utf-8");
}
fn other_peer(v: &mut PeerId) {
    // Flip one bit of the inlined public key: still a well-formed ed25519 PeerId.
    let mut b = v.to_bytes();
    let last = b.len() - 1;
    b[last] ^= 1;
    *v = PeerId::from_bytes(&b).expect("peer id");
}

#[test]
fn advert_every_field_bit_flip_rejected() {
    let p = samples::provider_key();
    let body = samples::advert(&p, 9, T0_UNIX_MS);
    let signed = Signed::sign(&p, &body).unwrap();
    type Mutation = (&'static str, fn(&mut Advertisement));
    let mutations: &[Mutation] = &[
        ("version", |a| flip_u32(&mut a.version)),
        ("provider", |a| other_peer(&mut a.provider)),
        ("seq", |a| flip_u64(&mut a.seq)),
        ("issued_at", |a| flip_u64(&mut a.issued_at_unix_ms)),
        ("expires_at", |a| flip_u64(&mut a.expires_at_unix_ms)),
        ("listen_addrs", |a| a.listen_addrs[0] = "/ip4/127.0.0.1/tcp/4000".parse().unwrap()),
        ("ssh.host", |a| flip_str(&mut a.ssh.host)),
        ("ssh.port_min", |a| flip_u16(&mut a.ssh.port_min)),
        ("ssh.port_max", |a| flip_u16(&mut a.ssh.port_max)),
        ("total.vcpus", |a| flip_u32(&mut a.resources.total.vcpus)),
        ("total.memory", |a| flip_u64(&mut a.resources.total.memory_mib)),
        ("total.disk", |a| flip_u64(&mut a.resources.total.disk_gib)),
        ("free.vcpus", |a| flip_u32(&mut a.resources.free.vcpus)),
        ("free.memory", |a| flip_u64(&mut a.resources.free.memory_mib)),
        ("free.disk", |a| flip_u64(&mut a.resources.free.disk_gib)),
        ("currency", |a| flip_str(&mut a.pricing.currency)),
        ("per_vcpu", |a| flip_u64(&mut a.pricing.per_vcpu_hour_micros)),
        ("per_memory", |a| flip_u64(&mut a.pricing.per_memory_gib_hour_micros)),
        ("per_disk", |a| flip_u64(&mut a.pricing.per_disk_gib_hour_micros)),
        ("region", |a| flip_str(&mut a.region)),
        ("country", |a| flip_str(a.country.as_mut().unwrap())),
        ("accel", |a| a.hypervisor.accel = Accel::Kvm),
        ("arch", |a| flip_str(&mut a.hypervisor.arch)),
        ("image name", |a| flip_str(&mut a.images[0].name)),
        ("image sha256", |a| flip_bytes(&mut a.images[0].sha256)),
        ("beneficiary", |a| a.beneficiary = Some("x".into())),
        ("withdrawn", |a| a.withdrawn = !a.withdrawn),
    ];
    for (field, mutate) in mutations {
        let mut tampered = body.clone();
        mutate(&mut tampered);
        assert_ne!(tampered, body, "mutation of {field} changed nothing");
        let err = Signed::<Advertisement>::open(&with_original_signature(&signed, &tampered))
            .expect_err(&format!("advert with {field} changed was accepted"));
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{field}: {err:?}");
    }
}

#[test]
fn lease_request_every_field_bit_flip_rejected() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let body = samples::lease_request(&r, &p, T0_UNIX_MS);
    let signed = Signed::sign(&r, &body).unwrap();
    type Mutation = (&'static str, fn(&mut LeaseRequest));
    let mutations: &[Mutation] = &[
        ("version", |q| flip_u32(&mut q.version)),
        ("lease_id", |q| flip_bytes(&mut q.lease_id.0)),
        ("requestor", |q| other_peer(&mut q.requestor)),
        ("provider", |q| other_peer(&mut q.provider)),
        ("advert_seq", |q| flip_u64(&mut q.advert_seq)),
        ("vcpus", |q| flip_u32(&mut q.spec.vcpus)),
        ("memory", |q| flip_u64(&mut q.spec.memory_mib)),
        ("disk", |q| flip_u64(&mut q.spec.disk_gib)),
        ("image_name", |q| flip_str(&mut q.spec.image_name)),
        ("image_sha256", |q| flip_bytes(&mut q.spec.image_sha256)),
        ("duration", |q| flip_u64(&mut q.duration_secs)),
        ("max_price", |q| flip_u64(&mut q.max_price_per_hour_micros)),
        ("currency", |q| flip_str(&mut q.currency)),
        ("ssh_user", |q| flip_str(&mut q.ssh_user)),
        ("ssh_public_key", |q| flip_bytes(&mut q.ssh_public_key)),
        ("nonce", |q| flip_bytes(&mut q.nonce)),
        ("issued_at", |q| flip_u64(&mut q.issued_at_unix_ms)),
        ("valid_until", |q| flip_u64(&mut q.valid_until_unix_ms)),
    ];
    for (field, mutate) in mutations {
        let mut tampered = body.clone();
        mutate(&mut tampered);
        assert_ne!(tampered, body, "mutation of {field} changed nothing");
        let err = Signed::<LeaseRequest>::open(&with_original_signature(&signed, &tampered))
            .expect_err(&format!("request with {field} changed was accepted"));
        assert!(matches!(err, VerifyError::BadSignature { .. }), "{field}: {err:?}");
    }
}

#[test]
fn every_single_bit_flip_of_a_signed_envelope_is_rejected() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let advert = Signed::sign(&p, &samples::advert(&p, 3, T0_UNIX_MS)).unwrap().to_bytes();
    let request = Signed::sign(&r, &samples::lease_request(&r, &p, T0_UNIX_MS)).unwrap().to_bytes();
    for bit in 0..advert.len() * 8 {
        let mut b = advert.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(Signed::<Advertisement>::open(&b).is_err(), "advert bit {bit} flipped was accepted");
    }
    for bit in 0..request.len() * 8 {
        let mut b = request.clone();
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(Signed::<LeaseRequest>::open(&b).is_err(), "request bit {bit} flipped was accepted");
    }
}

#[test]
fn signature_for_one_kind_rejected_as_another() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    // A requestor-signed control payload presented as each other kind: the domain tag
    // differs, so the signature fails before the payload is even decoded.
    let control = Signed::sign(&r, &samples::lease_control(&r, &p, ControlAction::Terminate, T0_UNIX_MS)).unwrap();
    let (signed, _) = control.into_parts();
    let as_request =
        Signed::<LeaseRequest>::from_parts(signed.payload_bytes().to_vec(), signed.signer(), *signed.signature());
    assert!(matches!(as_request.verify(), Err(VerifyError::BadSignature { kind: Kind::LeaseRequest, .. })));

    // A provider-signed reply presented as an advert.
    let reply = Signed::sign(&p, &samples::lease_reply(&p, &r, samples::granted(T0_UNIX_MS), T0_UNIX_MS)).unwrap();
    let as_advert = Signed::<Advertisement>::from_parts(
        reply.signed().payload_bytes().to_vec(),
        reply.signer(),
        *reply.signed().signature(),
    );
    assert!(matches!(as_advert.verify(), Err(VerifyError::BadSignature { kind: Kind::Advert, .. })));

    // An advert presented as a lease reply.
    let advert = Signed::sign(&p, &samples::advert(&p, 1, T0_UNIX_MS)).unwrap();
    let as_reply = Signed::<LeaseReply>::from_parts(
        advert.signed().payload_bytes().to_vec(),
        advert.signer(),
        *advert.signed().signature(),
    );
    assert!(matches!(as_reply.verify(), Err(VerifyError::BadSignature { kind: Kind::LeaseReply, .. })));

    // Control: the same payload signed under the advert's domain passes the signature
    // check and only then fails to decode, so the failures above are the domain tag's doing.
    let payload = reply.signed().payload_bytes().to_vec();
    let sig = p.sign_raw(&signing_input(Kind::Advert, &payload));
    let err = Signed::<Advertisement>::from_parts(payload, p.peer_id(), sig).verify().unwrap_err();
    assert!(matches!(err, VerifyError::Decode(DecodeError::Cbor { .. })), "{err:?}");
}

#[test]
fn signer_not_equal_to_provider_or_requestor_rejected() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let mallory = samples::numbered_key(666);

    // Mallory signs an advert that claims to be p's.
    let body = samples::advert(&p, 1, T0_UNIX_MS);
    let payload = to_cbor(&body);
    let sig = mallory.sign_raw(&signing_input(Kind::Advert, &payload));
    let err = Signed::<Advertisement>::from_parts(payload, mallory.peer_id(), sig).verify().unwrap_err();
    assert!(matches!(err, VerifyError::SignerMismatch { .. }), "{err:?}");

    // Mallory signs a lease request that claims to come from r.
    let body = samples::lease_request(&r, &p, T0_UNIX_MS);
    let payload = to_cbor(&body);
    let sig = mallory.sign_raw(&signing_input(Kind::LeaseRequest, &payload));
    let err = Signed::<LeaseRequest>::from_parts(payload, mallory.peer_id(), sig).verify().unwrap_err();
    assert!(matches!(err, VerifyError::SignerMismatch { .. }), "{err:?}");

    // Mallory's reply claiming to be p's.
    let body = samples::lease_reply(&p, &r, samples::granted(T0_UNIX_MS), T0_UNIX_MS);
    let payload = to_cbor(&body);
    let sig = mallory.sign_raw(&signing_input(Kind::LeaseReply, &payload));
    let err = Signed::<LeaseReply>::from_parts(payload, mallory.peer_id(), sig).verify().unwrap_err();
    assert!(matches!(err, VerifyError::SignerMismatch { .. }), "{err:?}");

    // And the honest API refuses to make such a message at all.
    assert!(matches!(Signed::sign(&mallory, &samples::advert(&p, 1, T0_UNIX_MS)), Err(SignError::WrongKey { .. })));
}

#[test]
fn non_ed25519_signer_refused() {
    let p = samples::provider_key();
    let advert = Signed::sign(&p, &samples::advert(&p, 1, T0_UNIX_MS)).unwrap();
    // A sha2-256 multihash PeerId (how RSA and other large keys are named): no inlined key.
    let mut hashed = vec![0x12, 0x20];
    hashed.extend_from_slice(&[7u8; 32]);
    let hashed = PeerId::from_bytes(&hashed).expect("a sha2-256 PeerId");
    let envelope = Signed::<Advertisement>::from_parts(
        advert.signed().payload_bytes().to_vec(),
        hashed,
        *advert.signed().signature(),
    )
    .to_bytes();
    let err = Signed::<Advertisement>::open(&envelope).unwrap_err();
    assert_eq!(err, VerifyError::Decode(DecodeError::Signer(IdentityError::NotEd25519)));
}

#[test]
fn unsupported_version_is_a_typed_error() {
    let p = samples::provider_key();
    let mut body = samples::advert(&p, 1, T0_UNIX_MS);
    body.version = 2;
    let payload = to_cbor(&body);
    let sig = p.sign_raw(&signing_input(Kind::Advert, &payload));
    let err = Signed::<Advertisement>::from_parts(payload, p.peer_id(), sig).verify().unwrap_err();
    assert_eq!(err, VerifyError::UnsupportedVersion { kind: Kind::Advert, got: 2, supported: 1 });
    assert!(!err.is_misbehaviour());
}

#[test]
fn oversize_input_rejected_before_decoding() {
    // Garbage that would be a CBOR syntax error if it were ever parsed.
    for (kind, max) in
        [(Kind::Advert, 4096), (Kind::LeaseRequest, 8192), (Kind::LeaseReply, 8192), (Kind::LeaseControl, 4096)]
    {
        let bytes = vec![0xffu8; max + 1];
        let err = match kind {
            Kind::Advert => Signed::<Advertisement>::from_bytes(&bytes).unwrap_err(),
            Kind::LeaseRequest => Signed::<LeaseRequest>::from_bytes(&bytes).unwrap_err(),
            Kind::LeaseReply => Signed::<LeaseReply>::from_bytes(&bytes).unwrap_err(),
            _ => Signed::<LeaseControl>::from_bytes(&bytes).unwrap_err(),
        };
        assert_eq!(err, DecodeError::TooLarge { kind, len: max + 1, max });
        // At the cap, the same garbage is parsed and fails as malformed instead.
        let at_cap = &bytes[..max];
        assert!(matches!(
            Signed::<Advertisement>::from_bytes(&at_cap[..at_cap.len().min(4096)]),
            Err(DecodeError::Cbor { .. })
        ));
    }
}

#[test]
fn signing_an_oversize_message_fails() {
    let p = samples::provider_key();
    let mut body = samples::advert(&p, 1, T0_UNIX_MS);
    body.images = (0..40).map(|i| ImageOffer { name: format!("image-{i:0>100}"), sha256: [0; 32] }).collect();
    assert!(matches!(Signed::sign(&p, &body), Err(SignError::TooLarge { kind: Kind::Advert, .. })));
}

#[test]
fn trailing_bytes_rejected() {
    let p = samples::provider_key();
    let mut bytes = Signed::sign(&p, &samples::advert(&p, 1, T0_UNIX_MS)).unwrap().to_bytes();
    bytes.push(0);
    assert!(matches!(Signed::<Advertisement>::from_bytes(&bytes), Err(DecodeError::TrailingBytes { extra: 1, .. })));
}

#[test]
fn libp2p_keypair_has_the_same_peer_id() {
    let p = samples::provider_key();
    assert_eq!(p.to_libp2p_keypair().public().to_peer_id(), p.peer_id());
    assert_eq!(identity::ed25519_public_key_bytes(&p.peer_id()).unwrap(), p.public_key_bytes());
}

/// Stores key their indexes on the raw key read in place from a PeerId: it must round-trip
/// and refuse PeerIds that do not inline an ed25519 key.
#[test]
fn ed25519_key_is_read_from_a_peer_id_and_other_ids_are_refused() {
    let p = samples::provider_key();
    let key = identity::ed25519_public_key_bytes(&p.peer_id()).unwrap();
    assert_eq!(identity::peer_id_from_public_key(&key), p.peer_id());
    // A hashed (non-inlined) key: a sha256 multihash PeerId.
    let hashed = PeerId::from_bytes(&[&[0x12, 0x20][..], &[7u8; 32]].concat()).unwrap();
    assert_eq!(identity::ed25519_public_key_bytes(&hashed), Err(IdentityError::NotEd25519));
    // An identity multihash of another protobuf key type (secp256k1 = 2, 33 bytes).
    let other = PeerId::from_bytes(&[&[0x00, 0x25, 0x08, 0x02, 0x12, 0x21][..], &[2u8; 33]].concat()).unwrap();
    assert_eq!(identity::ed25519_public_key_bytes(&other), Err(IdentityError::NotEd25519));
}
