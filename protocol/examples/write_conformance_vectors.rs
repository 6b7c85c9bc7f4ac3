//! Writes the conformance vectors of docs/protocol.md section 11 into `docs/vectors/`,
//! one JSON file per case, made with this crate's own encoder and signing code from the
//! deterministic keys of `samples.rs`.
//!
//! Each case states by hand, from the spec, what a receiver must conclude (accepted, or
//! which error and which denial or disposition); the program runs the receiver's checks
//! (`tests/conformance/mod.rs`, the same code the test uses) on every case and writes
//! nothing if the code disagrees with any of them. Run once, review, commit:
//!
//! ```text
//! cargo run -p peervm-protocol --example write_conformance_vectors
//! ```
//!
//! `tests/conformance_vectors.rs` then checks the committed files on every test run.

#[path = "../tests/cbor_edit/mod.rs"]
mod cbor_edit;
#[path = "../tests/conformance/mod.rs"]
mod conformance;

use cbor_edit::{encode, entries, field};
use ciborium::Value as Cbor;
use peervm_protocol::blocklist::BlockEntry;
use peervm_protocol::encoding::to_cbor;
use peervm_protocol::samples::{self, T0_UNIX_MS as T0};
use peervm_protocol::signed::signing_input;
use peervm_protocol::*;
use serde::Serialize;
use serde_json::{Value as Json, json};

const DAY_MS: u64 = 24 * 3600 * 1000;

/// What the spec says a receiver concludes about a case.
enum Want {
    Ok,
    /// The error variant, and the `deny` or `disposition` that goes with it, if any.
    Error(&'static str, Option<(&'static str, &'static str)>),
}

struct Case {
    name: String,
    kind: Kind,
    bytes: Vec<u8>,
    now: u64,
    context: Json,
    want: Want,
    note: String,
}

fn reject(e: &'static str) -> Want {
    Want::Error(e, Some(("disposition", "reject")))
}
fn ignore(e: &'static str) -> Want {
    Want::Error(e, Some(("disposition", "ignore")))
}
fn deny(e: &'static str, reason: &'static str) -> Want {
    Want::Error(e, Some(("deny", reason)))
}
fn refused(e: &'static str) -> Want {
    Want::Error(e, None)
}

/// An envelope of `kind` around `payload`, signed by `key` with `kind`'s domain tag.
fn envelope(key: &SigningKey, kind: Kind, payload: &[u8]) -> Vec<u8> {
    let signature = key.sign_raw(&signing_input(kind, payload));
    Signed::<Advertisement>::from_parts(payload.to_vec(), key.peer_id(), signature).to_bytes()
}

fn signed<T: Payload>(key: &SigningKey, body: &T) -> Vec<u8> {
    envelope(key, T::KIND, &to_cbor(body))
}

fn value<T: Serialize>(body: &T) -> Cbor {
    ciborium::from_reader(to_cbor(body).as_slice()).expect("own CBOR decodes")
}

/// The payload of `body` after `edit`, signed by `key` as `T`.
fn edited<T: Payload>(key: &SigningKey, body: &T, edit: impl FnOnce(&mut Cbor)) -> Vec<u8> {
    let mut v = value(body);
    edit(&mut v);
    envelope(key, T::KIND, &encode(&v))
}

/// `bytes` with the only occurrence of `from` (hex) replaced by `to` (hex).
fn splice(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    let unhex = |h: &str| hex::decode(h.replace(' ', "")).expect("hex");
    let (from, to) = (unhex(from), unhex(to));
    let at: Vec<usize> = bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "the pattern must occur exactly once");
    [&bytes[..at[0]], &to[..], &bytes[at[0] + from.len()..]].concat()
}

/// `body` signed with an unknown key `x_padding` (a byte string) making the whole
/// envelope exactly `total` bytes.
fn padded<T: Payload>(key: &SigningKey, body: &T, total: usize) -> Vec<u8> {
    let with =
        |n: usize| edited(key, body, |v| entries(v).push((Cbor::Text("x_padding".into()), Cbor::Bytes(vec![0x70; n]))));
    let estimate = total.saturating_sub(with(0).len());
    (estimate.saturating_sub(8)..estimate + 8)
        .map(with)
        .find(|e| e.len() == total)
        .expect("a padding gives the exact size")
}

fn flip_last_byte(mut bytes: Vec<u8>) -> Vec<u8> {
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    bytes
}

fn delegation_for(node: PeerId) -> Delegation {
    Delegation {
        version: 1,
        owner: samples::owner_key().peer_id(),
        node,
        not_before_unix_ms: T0 - DAY_MS,
        not_after_unix_ms: T0 + 365 * DAY_MS,
        beneficiary: None,
        replaces: Vec::new(),
    }
}

fn main() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let owner = samples::owner_key();
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name: &str, kind: Kind, bytes: Vec<u8>, now: u64, context: Json, want: Want, note: &str| {
        cases.push(Case { name: name.into(), kind, bytes, now, context, want, note: note.into() })
    };

    // ---- adverts (section 4) ------------------------------------------------------
    let advert = samples::advert(&p, 1, T0);
    let none = json!({ "held_seq": null });
    let a = |f: &dyn Fn(&mut Advertisement)| {
        let mut a = advert.clone();
        f(&mut a);
        a
    };
    use Kind::Advert as AD;
    add(
        "advert-ok",
        AD,
        signed(&p, &advert),
        T0,
        none.clone(),
        Want::Ok,
        "The advert test vector of section 11: the start of the exchange the lease-* vectors continue.",
    );
    add(
        "advert-ok-newer-seq",
        AD,
        signed(&p, &a(&|a| a.seq = 2)),
        T0,
        json!({ "held_seq": 1 }),
        Want::Ok,
        "seq 2 replaces the held seq 1.",
    );
    add(
        "advert-ok-withdrawn",
        AD,
        signed(
            &p,
            &a(&|a| {
                a.seq = 2;
                a.withdrawn = true
            }),
        ),
        T0,
        none.clone(),
        Want::Ok,
        "A withdrawn advert is accepted like any other; it then removes the provider.",
    );
    add(
        "advert-ok-reachability-and-network",
        AD,
        signed(
            &p,
            &a(&|a| {
                a.reachability =
                    Some(Reachability { checked_at_unix_ms: T0 - 60_000, libp2p_open: true, ssh_reachable: true });
                a.network = Some(NetworkOffer {
                    max_exposed_ports: 4,
                    privileged_ports: false,
                    egress_mbit: None,
                    ingress_mbit: None,
                });
            }),
        ),
        T0,
        none.clone(),
        Want::Ok,
        "The optional `reachability` and `network` maps, written after `withdrawn`.",
    );
    // The chain of docs/protocol.md section 11 ("Refresh chain"), for this advert.
    let (refresh_chain, _) = RefreshSecret::generate(&p.peer_id(), 1, 150, 4, std::array::from_fn(|i| i as u8))
        .unwrap_or_else(|e| unreachable!("the documented chain is well formed: {e}"));
    add(
        "advert-ok-refresh",
        AD,
        signed(&p, &a(&|a| a.refresh = Some(refresh_chain))),
        T0,
        none.clone(),
        Want::Ok,
        "The optional `refresh` map (section 4a), written last: the chain of section 11's refresh vector.",
    );
    add(
        "advert-refresh-period-over-lifetime",
        AD,
        signed(&p, &a(&|a| a.refresh = Some(RefreshChain { period_s: 301, ..refresh_chain }))),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "refresh.period_s 301: 301,000 ms is longer than the advert's 300,000 ms lifetime.",
    );
    add(
        "advert-refresh-count-over-1024",
        AD,
        signed(&p, &a(&|a| a.refresh = Some(RefreshChain { count: 1_025, ..refresh_chain }))),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "refresh.count 1,025: a chain holds at most 1,024 tokens.",
    );
    add(
        "advert-refresh-period-under-10",
        AD,
        signed(&p, &a(&|a| a.refresh = Some(RefreshChain { period_s: 9, ..refresh_chain }))),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "refresh.period_s 9, at least 10.",
    );
    let delegated = |d: &Delegation, beneficiary: Option<&str>| {
        let mut a = advert.clone();
        a.delegation = Some(signed(&owner, d));
        a.beneficiary = beneficiary.map(str::to_string);
        a
    };
    let d_ok = Delegation { beneficiary: Some("payout-1".into()), ..delegation_for(p.peer_id()) };
    add(
        "advert-ok-with-delegation",
        AD,
        signed(&p, &delegated(&d_ok, Some("payout-1"))),
        T0,
        none.clone(),
        Want::Ok,
        "Carries the owner's delegation (the delegation-ok vector's envelope) and the beneficiary it names.",
    );
    add(
        "advert-ok-issued-at-skew-limit",
        AD,
        signed(&p, &samples::advert(&p, 1, T0 + 30_000)),
        T0,
        none.clone(),
        Want::Ok,
        "Issued exactly 30 s after `now`: within the allowed skew.",
    );
    add(
        "advert-ok-last-live-ms",
        AD,
        signed(&p, &advert),
        T0 + 299_999,
        none.clone(),
        Want::Ok,
        "`now` is 1 ms before `expires_at`: still live.",
    );
    add(
        "advert-ok-exactly-at-cap",
        AD,
        padded(&p, &advert, 4096),
        T0,
        none.clone(),
        Want::Ok,
        "Exactly 4,096 bytes (an unknown key `x_padding` fills it): the cap is inclusive, and unknown keys are ignored.",
    );
    add(
        "advert-ok-keys-reordered",
        AD,
        edited(&p, &advert, |v| {
            entries(field(v, "ssh")).reverse();
            entries(v).reverse();
        }),
        T0,
        none.clone(),
        Want::Ok,
        "Non-canonical but accepted (section 3.4): keys in reverse order, at two levels.",
    );
    let canonical = to_cbor(&advert);
    let long_ints = splice(
        &splice(&canonical, "6776657273696f6e01", "6776657273696f6e1801"),
        "6373657101",
        "63736571 1b0000000000000001",
    );
    add(
        "advert-ok-non-shortest-integers",
        AD,
        envelope(&p, AD, &long_ints),
        T0,
        none.clone(),
        Want::Ok,
        "Non-canonical but accepted: `version` as `18 01`, `seq` as `1b 00000000 00000001`.",
    );
    add(
        "advert-ok-unknown-keys",
        AD,
        edited(&p, &advert, |v| {
            entries(v).push((Cbor::Text("x_future".into()), Cbor::Array(vec![Cbor::Float(1.5), Cbor::Null])));
            entries(field(v, "ssh")).push((Cbor::Text("x_future".into()), Cbor::Integer(7.into())));
        }),
        T0,
        none.clone(),
        Want::Ok,
        "Unknown keys at the top level and in a nested map are ignored (the signature covers them).",
    );
    let indefinite = [&[0xbf][..], &canonical[1..], &[0xff]].concat();
    let indefinite = splice(&indefinite, "6a65752d63656e7472616c", "7f6565752d6365656e7472616cff");
    add(
        "advert-ok-indefinite-lengths",
        AD,
        envelope(&p, AD, &indefinite),
        T0,
        none.clone(),
        Want::Ok,
        "Non-canonical but accepted: the top-level map and the `region` text in indefinite-length form.",
    );
    add(
        "advert-ok-undefined-and-absent-optionals",
        AD,
        envelope(&p, AD, &splice(&canonical, "67636f756e747279624445", "67636f756e747279f7")),
        T0,
        none.clone(),
        Want::Ok,
        "`country` as CBOR undefined (f7) reads as null.",
    );
    add(
        "advert-ok-null-for-left-out-fields",
        AD,
        edited(&p, &advert, |v| {
            for key in ["delegation", "reachability", "network"] {
                entries(v).push((Cbor::Text(key.into()), Cbor::Null));
            }
        }),
        T0,
        none.clone(),
        Want::Ok,
        "`delegation`, `reachability` and `network` written as null read as absent (section 3.3).",
    );

    add(
        "advert-bad-signature",
        AD,
        flip_last_byte(signed(&p, &advert)),
        T0,
        none.clone(),
        reject("VerifyError::BadSignature"),
        "The advert vector with the signature's last bit flipped.",
    );
    add(
        "advert-wrong-domain",
        AD,
        envelope(&p, Kind::LeaseRequest, &canonical),
        T0,
        none.clone(),
        reject("VerifyError::BadSignature"),
        "The advert payload signed with the lease-request domain tag.",
    );
    add(
        "advert-signer-not-provider",
        AD,
        signed_by_other(&r, &advert),
        T0,
        none.clone(),
        reject("VerifyError::SignerMismatch"),
        "A valid signature by the requestor key over the provider's advert.",
    );
    add(
        "advert-oversize",
        AD,
        padded(&p, &advert, 4097),
        T0,
        none.clone(),
        reject("DecodeError::TooLarge"),
        "4,097 bytes: one over the cap, refused before parsing.",
    );
    let good = signed(&p, &advert);
    add(
        "advert-envelope-indefinite-array",
        AD,
        [&[0x9f][..], &good[1..], &[0xff]].concat(),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "The envelope as an indefinite-length array: the envelope has one encoding only.",
    );
    let payload_len = u16::from_be_bytes([good[2], good[3]]) as usize;
    add(
        "advert-envelope-non-shortest-length",
        AD,
        [&[0x83, 0x5a, 0, 0][..], &good[2..]].concat(),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "The payload's length written in 4 bytes (`5a`) instead of 2.",
    );
    add(
        "advert-envelope-chunked-payload",
        AD,
        [&[0x83, 0x5f][..], &good[1..4 + payload_len], &[0xff], &good[4 + payload_len..]].concat(),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "The payload as a chunked (indefinite) byte string.",
    );
    add(
        "advert-envelope-tagged",
        AD,
        [&[0xd8, 0x18][..], &good[..]].concat(),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A tag in front of the envelope.",
    );
    add(
        "advert-envelope-trailing-bytes",
        AD,
        [&good[..], &[0x00]].concat(),
        T0,
        none.clone(),
        reject("DecodeError::TrailingBytes"),
        "One byte after the envelope.",
    );
    let with_signer = |signer: &[u8], sig: &[u8]| {
        let mut e = vec![0x83, 0x59];
        e.extend_from_slice(&(canonical.len() as u16).to_be_bytes());
        e.extend_from_slice(&canonical);
        e.extend_from_slice(&[0x58, signer.len() as u8]);
        e.extend_from_slice(signer);
        e.extend_from_slice(&[0x58, sig.len() as u8]);
        e.extend_from_slice(sig);
        e
    };
    let sha256_peer: Vec<u8> = [&[0x12, 0x20][..], &[0xab; 32]].concat();
    add(
        "advert-signer-not-ed25519",
        AD,
        with_signer(&sha256_peer, &[0; 64]),
        T0,
        none.clone(),
        reject("DecodeError::Signer(IdentityError::NotEd25519)"),
        "The signer is a sha2-256 multihash PeerId (no inlined key).",
    );
    let prefix = [0x00, 0x24, 0x08, 0x01, 0x12, 0x20];
    let mut weak = [0u8; 32];
    weak[0] = 0x01;
    add(
        "advert-signer-weak-key",
        AD,
        with_signer(&[&prefix[..], &weak].concat(), &[0; 64]),
        T0,
        none.clone(),
        reject("DecodeError::Signer(IdentityError::WeakPublicKey)"),
        "The signer's key is the identity point (small order).",
    );
    let not_a_point =
        (2u8..).map(|i| [i; 32]).find(|k| ed25519_dalek::VerifyingKey::from_bytes(k).is_err()).expect("some");
    add(
        "advert-signer-not-a-point",
        AD,
        with_signer(&[&prefix[..], &not_a_point].concat(), &[0; 64]),
        T0,
        none.clone(),
        reject("DecodeError::Signer(IdentityError::InvalidPublicKey)"),
        "The signer's 32 key bytes do not decode to a curve point.",
    );
    let mut short_sig = signed(&p, &advert);
    short_sig.truncate(short_sig.len() - 66);
    short_sig.extend_from_slice(&[0x58, 63]);
    short_sig.extend_from_slice(&[0; 63]);
    add(
        "advert-signature-63-bytes",
        AD,
        short_sig,
        T0,
        none.clone(),
        reject("DecodeError::SignatureLength"),
        "A 63-byte signature.",
    );
    add(
        "advert-payload-trailing-bytes",
        AD,
        envelope(&p, AD, &[&canonical[..], &[0x00]].concat()),
        T0,
        none.clone(),
        reject("DecodeError::TrailingBytes"),
        "A byte after the payload's CBOR item (properly signed).",
    );
    add(
        "advert-payload-not-cbor",
        AD,
        envelope(&p, AD, b"\xff not cbor"),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A properly signed payload that is not CBOR.",
    );
    add(
        "advert-duplicate-key",
        AD,
        edited(&p, &advert, |v| entries(v).push((Cbor::Text("seq".into()), Cbor::Integer(1.into())))),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "`seq` twice (with the same value).",
    );
    add(
        "advert-unknown-accel",
        AD,
        edited(&p, &advert, |v| *field(field(v, "hypervisor"), "accel") = Cbor::Text("hvf".into())),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "An unknown enum value refuses the whole message.",
    );
    add(
        "advert-integer-key",
        AD,
        edited(&p, &advert, |v| entries(v)[0].0 = Cbor::Integer(0.into())),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A key that is not text.",
    );
    add(
        "advert-version-2",
        AD,
        signed(&p, &a(&|a| a.version = 2)),
        T0,
        none.clone(),
        ignore("VerifyError::UnsupportedVersion"),
        "A version-2 payload of version-1 shape: unsupported, ignored without penalty.",
    );
    add(
        "advert-version-2-signed-by-other",
        AD,
        signed_by_other(&r, &a(&|a| a.version = 2)),
        T0,
        none.clone(),
        ignore("VerifyError::UnsupportedVersion"),
        "The version is checked before the author (section 2, steps 6 and 7).",
    );
    add(
        "advert-version-as-text",
        AD,
        edited(&p, &advert, |v| *field(v, "version") = Cbor::Text("1".into())),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A wrong type, even in `version`, fails the decode before the version check.",
    );
    add(
        "advert-seq-negative",
        AD,
        edited(&p, &advert, |v| *field(v, "seq") = Cbor::Integer((-1).into())),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A negative integer in a uint field.",
    );
    add(
        "advert-port-over-uint16",
        AD,
        edited(&p, &advert, |v| *field(field(v, "ssh"), "port_max") = Cbor::Integer(65536.into())),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "65,536 in a uint16 field.",
    );
    add(
        "advert-sha256-31-bytes",
        AD,
        edited(&p, &advert, |v| {
            if let Cbor::Array(images) = field(v, "images") {
                *field(&mut images[0], "sha256") = Cbor::Bytes(vec![0; 31]);
            }
        }),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A bstr[32] of 31 bytes.",
    );
    add(
        "advert-bad-multiaddr",
        AD,
        edited(&p, &advert, |v| *field(v, "listen_addrs") = Cbor::Array(vec![Cbor::Bytes(vec![0xff, 0xff])])),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "A listen address that does not parse as a binary multiaddr.",
    );
    add(
        "advert-17-listen-addrs",
        AD,
        signed(&p, &a(&|a| a.listen_addrs = vec![a.listen_addrs[0].clone(); 17])),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "17 listen addresses: this implementation's decoder stops at 16, so it is a decode error, not `Malformed`.",
    );
    add(
        "advert-region-null",
        AD,
        edited(&p, &advert, |v| *field(v, "region") = Cbor::Null),
        T0,
        none.clone(),
        reject("DecodeError::Cbor"),
        "null in a field that is not optional.",
    );
    add(
        "advert-expired",
        AD,
        signed(&p, &advert),
        T0 + 300_000,
        none.clone(),
        ignore("AdvertError::Expired"),
        "`now` equals `expires_at`: expired (the rule is expires_at > now).",
    );
    add(
        "advert-issued-in-future",
        AD,
        signed(&p, &samples::advert(&p, 1, T0 + 30_001)),
        T0,
        none.clone(),
        ignore("AdvertError::IssuedInFuture"),
        "Issued 30.001 s after `now`: beyond the skew.",
    );
    add(
        "advert-lifetime-too-long",
        AD,
        signed(&p, &a(&|a| a.expires_at_unix_ms += 1)),
        T0,
        none.clone(),
        reject("AdvertError::LifetimeTooLong"),
        "Lives 300,001 ms.",
    );
    add(
        "advert-expires-before-issued",
        AD,
        signed(&p, &a(&|a| a.expires_at_unix_ms = a.issued_at_unix_ms - 1)),
        T0,
        none.clone(),
        reject("AdvertError::ExpiresBeforeIssued"),
        "expires_at one ms before issued_at.",
    );
    add(
        "advert-lifetime-checked-before-clock",
        AD,
        signed(&p, &a(&|a| a.expires_at_unix_ms += 1)),
        T0 + 400_000,
        none.clone(),
        reject("AdvertError::LifetimeTooLong"),
        "Both too long-lived and expired: the lifetime comes first.",
    );
    add(
        "advert-seq-not-newer",
        AD,
        signed(&p, &advert),
        T0,
        json!({ "held_seq": 1 }),
        ignore("AdvertError::SeqNotNewer"),
        "seq 1 when seq 1 is held: a duplicate.",
    );
    add(
        "advert-33-images",
        AD,
        signed(
            &p,
            &a(&|a| {
                a.images = (0..33).map(|i| ImageOffer { name: format!("img{i}"), sha256: [i as u8; 32] }).collect()
            }),
        ),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "33 images, at most 32.",
    );
    add(
        "advert-bad-country",
        AD,
        signed(&p, &a(&|a| a.country = Some("de".into()))),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "country `de`: must be two characters A-Z.",
    );
    add(
        "advert-bad-currency",
        AD,
        signed(&p, &a(&|a| a.pricing.currency = "usd".into())),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "currency `usd`: must be 1-12 characters of A-Z0-9.",
    );
    add(
        "advert-port-min-zero",
        AD,
        signed(&p, &a(&|a| a.ssh.port_min = 0)),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "ssh port range starting at 0.",
    );
    add(
        "advert-port-range-reversed",
        AD,
        signed(
            &p,
            &a(&|a| {
                a.ssh.port_min = 42100;
                a.ssh.port_max = 42099
            }),
        ),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "port_min > port_max.",
    );
    add(
        "advert-free-over-total",
        AD,
        signed(&p, &a(&|a| a.resources.free.memory_mib = 16385)),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "free memory 16,385 MiB of 16,384 total (each resource on its own).",
    );
    add(
        "advert-empty-ssh-host",
        AD,
        signed(&p, &a(&|a| a.ssh.host = String::new())),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "ssh.host must be 1-128 bytes.",
    );
    add(
        "advert-image-name-129-bytes",
        AD,
        signed(&p, &a(&|a| a.images[0].name = "m".repeat(129))),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "An image name of 129 bytes.",
    );
    add(
        "advert-control-char-in-region",
        AD,
        signed(&p, &a(&|a| a.region = "eu\u{7}central".into())),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "A control character (BEL) in `region`.",
    );
    add(
        "advert-17-exposed-ports-offered",
        AD,
        signed(
            &p,
            &a(&|a| {
                a.network = Some(NetworkOffer {
                    max_exposed_ports: 17,
                    privileged_ports: false,
                    egress_mbit: None,
                    ingress_mbit: None,
                })
            }),
        ),
        T0,
        none.clone(),
        reject("AdvertError::Malformed"),
        "network.max_exposed_ports 17, at most 16.",
    );
    add(
        "advert-malformed-checked-before-clock",
        AD,
        signed(&p, &a(&|a| a.country = Some("de".into()))),
        T0 + 300_000,
        none.clone(),
        reject("AdvertError::Malformed"),
        "Both malformed and expired: the field checks come first.",
    );
    let d_expired = Delegation { not_after_unix_ms: T0, ..delegation_for(p.peer_id()) };
    add(
        "advert-delegation-expired",
        AD,
        signed(&p, &delegated(&d_expired, None)),
        T0,
        none.clone(),
        ignore("AdvertError::Delegation(DelegationError::OutsideWindow)"),
        "The delegation ended at `now` (the window is not_before <= now < not_after): a clock matter, ignored.",
    );
    add(
        "advert-delegation-wrong-node",
        AD,
        signed(&p, &delegated(&delegation_for(r.peer_id()), None)),
        T0,
        none.clone(),
        reject("AdvertError::Delegation(DelegationError::WrongNode)"),
        "The delegation names another node key.",
    );
    add(
        "advert-delegation-beneficiary-mismatch",
        AD,
        signed(&p, &delegated(&d_ok, Some("payout-2"))),
        T0,
        none.clone(),
        reject("AdvertError::Delegation(DelegationError::BeneficiaryMismatch)"),
        "The delegation says payout-1, the advert payout-2.",
    );
    let mut forged = advert.clone();
    forged.delegation = Some(flip_last_byte(signed(&owner, &delegation_for(p.peer_id()))));
    add(
        "advert-delegation-bad-signature",
        AD,
        signed(&p, &forged),
        T0,
        none.clone(),
        reject("AdvertError::Delegation(DelegationError::Invalid)"),
        "The carried delegation's signature does not verify.",
    );

    // ---- lease requests (section 5) ----------------------------------------------
    use Kind::LeaseRequest as LQ;
    let request = samples::lease_request(&r, &p, T0);
    let here = json!({ "this_provider": p.peer_id().to_string() });
    let q = |f: &dyn Fn(&mut LeaseRequest)| {
        let mut q = request.clone();
        f(&mut q);
        q
    };
    add(
        "lease-request-ok",
        LQ,
        signed(&r, &request),
        T0,
        here.clone(),
        Want::Ok,
        "The lease-request vector of section 11, answering advert-ok (advert_seq 1, price 12,700 <= 20,000).",
    );
    add(
        "lease-request-ok-expose",
        LQ,
        signed(&r, &q(&|q| q.spec.expose = vec![8080, 443])),
        T0,
        here.clone(),
        Want::Ok,
        "Exposes guest ports 8080 and 443; whether the provider offers them (network) is its own check.",
    );
    add(
        "lease-request-ok-empty-expose",
        LQ,
        edited(&r, &request, |v| entries(field(v, "spec")).push((Cbor::Text("expose".into()), Cbor::Array(vec![])))),
        T0,
        here.clone(),
        Want::Ok,
        "`expose` written as an empty array reads as empty.",
    );
    add(
        "lease-request-ok-valid-until-1ms-left",
        LQ,
        signed(&r, &request),
        T0 + 59_999,
        here.clone(),
        Want::Ok,
        "`now` 1 ms before valid_until.",
    );
    add(
        "lease-request-expose-null",
        LQ,
        edited(&r, &request, |v| entries(field(v, "spec")).push((Cbor::Text("expose".into()), Cbor::Null))),
        T0,
        here.clone(),
        deny("DecodeError::Cbor", "malformed"),
        "`expose: null` is not a list.",
    );
    add(
        "lease-request-17-exposed-ports",
        LQ,
        signed(&r, &q(&|q| q.spec.expose = (1000..1017).collect())),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "17 ports, at most 16.",
    );
    add(
        "lease-request-expose-22",
        LQ,
        signed(&r, &q(&|q| q.spec.expose = vec![8080, 22])),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "Port 22 is the lease's SSH endpoint.",
    );
    add(
        "lease-request-expose-0",
        LQ,
        signed(&r, &q(&|q| q.spec.expose = vec![0])),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "Port 0 is no port.",
    );
    add(
        "lease-request-expose-twice",
        LQ,
        signed(&r, &q(&|q| q.spec.expose = vec![8080, 8080])),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "The same guest port twice.",
    );
    add(
        "lease-request-zero-vcpus",
        LQ,
        signed(&r, &q(&|q| q.spec.vcpus = 0)),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "vcpus, memory and disk must be at least 1.",
    );
    add(
        "lease-request-zero-duration",
        LQ,
        signed(&r, &q(&|q| q.duration_secs = 0)),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "duration_secs 0.",
    );
    add(
        "lease-request-duration-over-30-days",
        LQ,
        signed(&r, &q(&|q| q.duration_secs = 2_592_001)),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "duration_secs 2,592,001.",
    );
    add(
        "lease-request-empty-image-name",
        LQ,
        signed(&r, &q(&|q| q.spec.image_name = String::new())),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "image_name must be 1-128 bytes.",
    );
    add(
        "lease-request-bad-ssh-user",
        LQ,
        signed(&r, &q(&|q| q.ssh_user = "Root".into())),
        T0,
        here.clone(),
        deny("SpecError", "invalid_spec"),
        "ssh_user must match [a-z_][a-z0-9_-]{0,31}.",
    );
    add(
        "lease-request-wrong-provider",
        LQ,
        signed(&r, &request),
        T0,
        json!({ "this_provider": samples::numbered_key(7).peer_id().to_string() }),
        deny("FreshnessError::WrongProvider", "wrong_provider"),
        "Received by a provider it is not addressed to.",
    );
    add(
        "lease-request-expired",
        LQ,
        signed(&r, &request),
        T0 + 60_000,
        here.clone(),
        deny("FreshnessError::Expired", "stale"),
        "`now` equals valid_until.",
    );
    add(
        "lease-request-issued-in-future",
        LQ,
        signed(&r, &samples::lease_request(&r, &p, T0 + 30_001)),
        T0,
        here.clone(),
        deny("FreshnessError::IssuedInFuture", "stale"),
        "Issued 30.001 s after `now`.",
    );
    add(
        "lease-request-window-too-long",
        LQ,
        signed(&r, &q(&|q| q.valid_until_unix_ms += 1)),
        T0,
        here.clone(),
        deny("FreshnessError::WindowTooLong", "stale"),
        "valid_until - issued_at = 60,001 ms.",
    );
    add(
        "lease-request-window-negative",
        LQ,
        signed(&r, &q(&|q| q.valid_until_unix_ms = q.issued_at_unix_ms - 1)),
        T0,
        here.clone(),
        deny("FreshnessError::WindowTooLong", "stale"),
        "valid_until before issued_at.",
    );
    add(
        "lease-request-stale-checked-before-spec",
        LQ,
        signed(&r, &q(&|q| q.spec.vcpus = 0)),
        T0 + 60_000,
        here.clone(),
        deny("FreshnessError::Expired", "stale"),
        "Both expired and invalid: freshness comes first in the denial order.",
    );
    add(
        "lease-request-bad-signature",
        LQ,
        flip_last_byte(signed(&r, &request)),
        T0,
        here.clone(),
        deny("VerifyError::BadSignature", "bad_signature"),
        "The signature's last bit flipped.",
    );
    add(
        "lease-request-wrong-domain",
        LQ,
        envelope(&r, Kind::LeaseControl, &to_cbor(&request)),
        T0,
        here.clone(),
        deny("VerifyError::BadSignature", "bad_signature"),
        "Signed with the lease-control domain tag.",
    );
    add(
        "lease-request-signer-not-requestor",
        LQ,
        signed_by_other(&p, &request),
        T0,
        here.clone(),
        deny("VerifyError::SignerMismatch", "bad_signature"),
        "Signed by the provider key; the requestor field names another.",
    );
    add(
        "lease-request-oversize",
        LQ,
        padded(&r, &request, 8193),
        T0,
        here.clone(),
        deny("DecodeError::TooLarge", "malformed"),
        "8,193 bytes, over the 8 KiB cap.",
    );
    add(
        "lease-request-version-2",
        LQ,
        signed(&r, &q(&|q| q.version = 2)),
        T0,
        here.clone(),
        deny("VerifyError::UnsupportedVersion", "unsupported_version"),
        "version 2.",
    );
    add(
        "lease-request-ssh-key-31-bytes",
        LQ,
        edited(&r, &request, |v| *field(v, "ssh_public_key") = Cbor::Bytes(vec![7; 31])),
        T0,
        here.clone(),
        deny("DecodeError::Cbor", "malformed"),
        "A bstr[32] of 31 bytes.",
    );

    // ---- lease control (section 6) -----------------------------------------------
    use Kind::LeaseControl as LC;
    let control = |action: ControlAction| samples::lease_control(&r, &p, action, T0);
    let extend = control(ControlAction::Extend { additional_secs: 1800 });
    add(
        "lease-control-extend",
        LC,
        signed(&r, &extend),
        T0,
        here.clone(),
        Want::Ok,
        "The lease-control vector of section 11: extend the lease of lease-reply-granted by 1,800 s.",
    );
    let status = LeaseControl { nonce: [0x45; 16], ..control(ControlAction::Status) };
    add(
        "lease-control-status",
        LC,
        signed(&r, &status),
        T0,
        here.clone(),
        Want::Ok,
        "Ask for the lease's status (a text enum value).",
    );
    let terminate = LeaseControl { nonce: [0x46; 16], ..control(ControlAction::Terminate) };
    add("lease-control-terminate", LC, signed(&r, &terminate), T0, here.clone(), Want::Ok, "End the lease now.");
    add(
        "lease-control-unknown-action",
        LC,
        edited(&r, &status, |v| *field(v, "action") = Cbor::Text("pause".into())),
        T0,
        here.clone(),
        deny("DecodeError::Cbor", "malformed"),
        "An unknown action refuses the whole message.",
    );
    let ext_payload = to_cbor(&extend);
    add(
        "lease-control-enum-map-indefinite",
        LC,
        envelope(
            &r,
            LC,
            &splice(
                &ext_payload,
                "66616374696f6e a1 66657874656e64 a1 6f6164646974696f6e616c5f73656373 190708",
                "66616374696f6e bf 66657874656e64 a1 6f6164646974696f6e616c5f73656373 190708 ff",
            ),
        ),
        T0,
        here.clone(),
        deny("DecodeError::Cbor", "malformed"),
        "The action's one-entry enum map written indefinite (`bf`): refused, an enum map must be `a1`.",
    );
    add(
        "lease-control-expired",
        LC,
        signed(&r, &extend),
        T0 + 60_000,
        here.clone(),
        deny("FreshnessError::Expired", "stale"),
        "`now` equals valid_until.",
    );
    add(
        "lease-control-wrong-provider",
        LC,
        signed(&r, &extend),
        T0,
        json!({ "this_provider": samples::numbered_key(7).peer_id().to_string() }),
        deny("FreshnessError::WrongProvider", "wrong_provider"),
        "Received by another provider.",
    );
    add(
        "lease-control-signer-not-requestor",
        LC,
        signed_by_other(&p, &extend),
        T0,
        here.clone(),
        deny("VerifyError::SignerMismatch", "bad_signature"),
        "Signed by the provider key.",
    );
    add(
        "lease-control-wrong-domain",
        LC,
        envelope(&r, LQ, &ext_payload),
        T0,
        here.clone(),
        deny("VerifyError::BadSignature", "bad_signature"),
        "Signed with the lease-request domain tag.",
    );
    add(
        "lease-control-oversize",
        LC,
        padded(&r, &extend, 4097),
        T0,
        here.clone(),
        deny("DecodeError::TooLarge", "malformed"),
        "4,097 bytes, over the 4 KiB cap.",
    );

    // ---- lease replies (section 7) -----------------------------------------------
    use Kind::LeaseReply as LR;
    // SHA-256 of a payload, what a reply's in_reply_to holds.
    let digest = |payload: &[u8]| {
        lease::payload_digest(&Signed::<LeaseRequest>::from_parts(payload.to_vec(), r.peer_id(), [0; 64]))
    };
    let request_digest = digest(&to_cbor(&request));
    let reply = |outcome: ReplyOutcome, in_reply_to: [u8; 32]| LeaseReply {
        in_reply_to,
        ..samples::lease_reply(&p, &r, outcome, T0)
    };
    let no_ctx = json!({});
    let grant = reply(samples::granted(T0), request_digest);
    add(
        "lease-reply-granted",
        LR,
        signed(&p, &grant),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "The lease-reply vector of section 11: grants lease-request-ok (in_reply_to is the SHA-256 of its payload) at \
         advert-ok's price, 12,700 micro-USD per hour; host_key is pinned as docs/protocol.md section 13 shows.",
    );
    let mut with_exposed = samples::granted(T0);
    if let ReplyOutcome::Granted { exposed, .. } = &mut with_exposed {
        *exposed =
            vec![ExposedPort { guest_port: 8080, host_port: 42001 }, ExposedPort { guest_port: 443, host_port: 42002 }];
    }
    let expose_request = q(&|q| q.spec.expose = vec![8080, 443]);
    add(
        "lease-reply-granted-exposed",
        LR,
        signed(&p, &reply(with_exposed, digest(&to_cbor(&expose_request)))),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Grants lease-request-ok-expose: guest 8080 at host port 42001, 443 at 42002, in the request's order.",
    );
    for reason in DenyReason::ALL {
        let unverified = matches!(reason, DenyReason::BadSignature | DenyReason::Malformed);
        let mut body =
            reply(ReplyOutcome::Denied { reason, detail: format!("sample {reason} denial") }, request_digest);
        if unverified {
            // A reply to bytes that did not verify names no lease (section 7).
            body.lease_id = LeaseId([0; 16]);
        }
        let note = if unverified {
            format!("A `{reason}` denial: all-zero lease_id, as for bytes that did not verify (section 7).")
        } else {
            format!("A `{reason}` denial of lease-request-ok: a valid signed reply.")
        };
        add(
            &format!("lease-reply-denied-{}", reason.as_str().replace('_', "-")),
            LR,
            signed(&p, &body),
            T0,
            no_ctx.clone(),
            Want::Ok,
            &note,
        );
    }
    let status_digest = digest(&to_cbor(&status));
    let usage = LeaseUsage {
        cpu_usec: 12_345_678,
        memory_current_bytes: 268_435_456,
        memory_peak_bytes: 301_989_888,
        net_rx_bytes: 1_048_576,
        net_tx_bytes: 65_536,
        uptime_secs: 600,
        guest_net: None,
    };
    add(
        "lease-reply-status-running",
        LR,
        signed(
            &p,
            &reply(
                ReplyOutcome::Status {
                    state: LeaseState::Running,
                    ends_at_unix_ms: T0 + 3_600_000,
                    usage: Some(usage),
                },
                status_digest,
            ),
        ),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Answers lease-control-status: running, with usage counters.",
    );
    for state in LeaseState::ALL.into_iter().filter(|s| *s != LeaseState::Running) {
        add(
            &format!("lease-reply-status-{state}"),
            LR,
            signed(
                &p,
                &reply(ReplyOutcome::Status { state, ends_at_unix_ms: T0 + 3_600_000, usage: None }, status_digest),
            ),
            T0,
            no_ctx.clone(),
            Want::Ok,
            &format!("A status reply in state `{state}`, usage null."),
        );
    }
    add(
        "lease-reply-extended",
        LR,
        signed(&p, &reply(ReplyOutcome::Extended { ends_at_unix_ms: T0 + 5_400_000 }, digest(&ext_payload))),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Answers lease-control-extend: the lease now ends 1 h 30 min after T0.",
    );
    add(
        "lease-reply-terminated",
        LR,
        signed(&p, &reply(ReplyOutcome::Terminated { at_unix_ms: T0 }, digest(&to_cbor(&terminate)))),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Answers lease-control-terminate.",
    );
    let denied = reply(ReplyOutcome::Denied { reason: DenyReason::NoCapacity, detail: String::new() }, request_digest);
    add(
        "lease-reply-unknown-reason",
        LR,
        edited(&p, &denied, |v| {
            *field(field(field(v, "outcome"), "denied"), "reason") = Cbor::Text("out_of_coffee".into())
        }),
        T0,
        no_ctx.clone(),
        refused("DecodeError::Cbor"),
        "An unknown denial reason: the whole reply is malformed.",
    );
    let stat =
        reply(ReplyOutcome::Status { state: LeaseState::Running, ends_at_unix_ms: T0, usage: None }, status_digest);
    add(
        "lease-reply-unknown-state",
        LR,
        edited(&p, &stat, |v| *field(field(field(v, "outcome"), "status"), "state") = Cbor::Text("paused".into())),
        T0,
        no_ctx.clone(),
        refused("DecodeError::Cbor"),
        "An unknown lease state.",
    );
    add(
        "lease-reply-unknown-outcome",
        LR,
        edited(&p, &grant, |v| {
            *field(v, "outcome") = Cbor::Map(vec![(Cbor::Text("queued".into()), Cbor::Map(vec![]))])
        }),
        T0,
        no_ctx.clone(),
        refused("DecodeError::Cbor"),
        "An unknown outcome variant.",
    );
    add(
        "lease-reply-exposed-null",
        LR,
        edited(&p, &grant, |v| {
            entries(field(field(v, "outcome"), "granted")).push((Cbor::Text("exposed".into()), Cbor::Null))
        }),
        T0,
        no_ctx.clone(),
        refused("DecodeError::Cbor"),
        "`exposed: null` is not a list.",
    );
    add(
        "lease-reply-signer-not-provider",
        LR,
        signed_by_other(&r, &grant),
        T0,
        no_ctx.clone(),
        refused("VerifyError::SignerMismatch"),
        "The grant signed by the requestor key: a node cannot speak for another.",
    );
    add(
        "lease-reply-bad-signature",
        LR,
        flip_last_byte(signed(&p, &grant)),
        T0,
        no_ctx.clone(),
        refused("VerifyError::BadSignature"),
        "The grant with its signature's last bit flipped.",
    );
    add(
        "lease-reply-wrong-domain",
        LR,
        envelope(&p, AD, &to_cbor(&grant)),
        T0,
        no_ctx.clone(),
        refused("VerifyError::BadSignature"),
        "The grant signed with the advert domain tag.",
    );
    add(
        "lease-reply-oversize",
        LR,
        padded(&p, &grant, 8193),
        T0,
        no_ctx.clone(),
        refused("DecodeError::TooLarge"),
        "8,193 bytes, over the 8 KiB cap.",
    );
    add(
        "lease-reply-version-2",
        LR,
        signed(&p, &LeaseReply { version: 2, ..grant.clone() }),
        T0,
        no_ctx.clone(),
        refused("VerifyError::UnsupportedVersion"),
        "version 2.",
    );

    // ---- block lists (section 7a) ------------------------------------------------
    use Kind::BlockList as BL;
    let list = BlockList {
        version: 1,
        signer: p.peer_id(),
        seq: 1,
        issued_at_unix_ms: T0,
        entries: vec![
            BlockEntry { peer: samples::numbered_key(1).peer_id(), reason: "spam adverts".into() },
            BlockEntry { peer: samples::numbered_key(2).peer_id(), reason: String::new() },
        ],
    };
    let b = |f: &dyn Fn(&mut BlockList)| {
        let mut l = list.clone();
        f(&mut l);
        l
    };
    add("block-list-ok", BL, signed(&p, &list), T0, no_ctx.clone(), Want::Ok, "Two entries; a reason may be empty.");
    add(
        "block-list-ok-empty",
        BL,
        signed(
            &p,
            &b(&|l| {
                l.seq = 2;
                l.entries.clear()
            }),
        ),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "An empty list (lifts every block of this signer).",
    );
    add(
        "block-list-ok-issued-at-skew-limit",
        BL,
        signed(&p, &b(&|l| l.issued_at_unix_ms = T0 + 30_000)),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Issued 30 s after `now`.",
    );
    add(
        "block-list-ok-control-chars-in-reason",
        BL,
        signed(&p, &b(&|l| l.entries[0].reason = "line 1\nline 2".into())),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Control characters in a reason are not refused.",
    );
    add(
        "block-list-ok-old-list",
        BL,
        signed(&p, &b(&|l| l.issued_at_unix_ms = T0 - 400 * DAY_MS)),
        T0,
        no_ctx.clone(),
        Want::Ok,
        "Lists do not expire.",
    );
    let many: Vec<BlockEntry> = (0..257)
        .map(|i| BlockEntry { peer: samples::numbered_key(1000 + i).peer_id(), reason: String::new() })
        .collect();
    add(
        "block-list-257-entries",
        BL,
        signed(&p, &b(&|l| l.entries = many.clone())),
        T0,
        no_ctx.clone(),
        reject("BlockListError::TooManyEntries"),
        "257 entries, at most 256.",
    );
    add(
        "block-list-reason-129-bytes",
        BL,
        signed(&p, &b(&|l| l.entries[1].reason = "r".repeat(129))),
        T0,
        no_ctx.clone(),
        reject("BlockListError::ReasonTooLong"),
        "A reason of 129 bytes.",
    );
    add(
        "block-list-duplicate-peer",
        BL,
        signed(&p, &b(&|l| l.entries[1].peer = l.entries[0].peer)),
        T0,
        no_ctx.clone(),
        reject("BlockListError::Duplicate"),
        "The same peer twice.",
    );
    add(
        "block-list-issued-in-future",
        BL,
        signed(&p, &b(&|l| l.issued_at_unix_ms = T0 + 30_001)),
        T0,
        no_ctx.clone(),
        reject("BlockListError::IssuedInFuture"),
        "Issued 30.001 s after `now`: rejected, not ignored (unlike an advert).",
    );
    add(
        "block-list-duplicate-checked-before-clock",
        BL,
        signed(
            &p,
            &b(&|l| {
                l.entries[1].peer = l.entries[0].peer;
                l.issued_at_unix_ms = T0 + 60_000
            }),
        ),
        T0,
        no_ctx.clone(),
        reject("BlockListError::Duplicate"),
        "Both a duplicate and issued in the future: duplicates are checked first.",
    );
    add(
        "block-list-signer-mismatch",
        BL,
        signed_by_other(&r, &list),
        T0,
        no_ctx.clone(),
        reject("VerifyError::SignerMismatch"),
        "Signed by another key than `signer`.",
    );
    add(
        "block-list-bad-signature",
        BL,
        flip_last_byte(signed(&p, &list)),
        T0,
        no_ctx.clone(),
        reject("VerifyError::BadSignature"),
        "The signature's last bit flipped.",
    );
    add(
        "block-list-oversize",
        BL,
        padded(&p, &list, 65537),
        T0,
        no_ctx.clone(),
        reject("DecodeError::TooLarge"),
        "65,537 bytes, over the 64 KiB cap.",
    );
    add(
        "block-list-version-2",
        BL,
        signed(&p, &b(&|l| l.version = 2)),
        T0,
        no_ctx.clone(),
        ignore("VerifyError::UnsupportedVersion"),
        "version 2: ignored, no penalty.",
    );

    // ---- delegations (section 7b) ------------------------------------------------
    use Kind::Delegation as DG;
    let for_p = json!({ "advert_provider": p.peer_id().to_string(), "advert_beneficiary": null });
    let for_p_paid = json!({ "advert_provider": p.peer_id().to_string(), "advert_beneficiary": "payout-1" });
    let d = delegation_for(p.peer_id());
    let dd = |f: &dyn Fn(&mut Delegation)| {
        let mut d = d.clone();
        f(&mut d);
        d
    };
    add(
        "delegation-ok",
        DG,
        signed(&owner, &d_ok),
        T0,
        for_p_paid.clone(),
        Want::Ok,
        "The owner delegates the provider key for a year from T0 - 1 day, payout to payout-1; carried by advert-ok-with-delegation.",
    );
    add(
        "delegation-ok-replaces",
        DG,
        signed(
            &owner,
            &dd(&|d| d.replaces = vec![samples::numbered_key(3).peer_id(), samples::numbered_key(4).peer_id()]),
        ),
        T0,
        for_p.clone(),
        Want::Ok,
        "Retires two older node keys of this owner.",
    );
    add(
        "delegation-ok-at-not-before",
        DG,
        signed(&owner, &d),
        T0 - DAY_MS,
        for_p.clone(),
        Want::Ok,
        "`now` equals not_before: valid (not_before <= now).",
    );
    add(
        "delegation-ok-366-days",
        DG,
        signed(&owner, &dd(&|d| d.not_after_unix_ms = d.not_before_unix_ms + 366 * DAY_MS)),
        T0,
        for_p.clone(),
        Want::Ok,
        "A window of exactly 366 days.",
    );
    add(
        "delegation-not-yet-valid",
        DG,
        signed(&owner, &d),
        T0 - DAY_MS - 1,
        for_p.clone(),
        ignore("DelegationError::OutsideWindow"),
        "`now` 1 ms before not_before: no allowance for skew.",
    );
    add(
        "delegation-ended",
        DG,
        signed(&owner, &d),
        T0 + 365 * DAY_MS,
        for_p.clone(),
        ignore("DelegationError::OutsideWindow"),
        "`now` equals not_after: ended (now < not_after).",
    );
    add(
        "delegation-window-367-days",
        DG,
        signed(&owner, &dd(&|d| d.not_after_unix_ms = d.not_before_unix_ms + 366 * DAY_MS + 1)),
        T0,
        for_p.clone(),
        reject("DelegationError::BadWindow"),
        "A window 1 ms over 366 days.",
    );
    add(
        "delegation-window-empty",
        DG,
        signed(&owner, &dd(&|d| d.not_after_unix_ms = d.not_before_unix_ms)),
        T0,
        for_p.clone(),
        reject("DelegationError::BadWindow"),
        "not_after equals not_before.",
    );
    add(
        "delegation-bad-window-checked-before-clock",
        DG,
        signed(&owner, &dd(&|d| d.not_after_unix_ms = d.not_before_unix_ms)),
        T0 + 400 * DAY_MS,
        for_p.clone(),
        reject("DelegationError::BadWindow"),
        "The window's length is checked whatever the clock.",
    );
    add(
        "delegation-9-replaces",
        DG,
        signed(&owner, &dd(&|d| d.replaces = (10..19).map(|i| samples::numbered_key(i).peer_id()).collect())),
        T0,
        for_p.clone(),
        reject("DelegationError::Malformed"),
        "replaces 9 keys, at most 8.",
    );
    add(
        "delegation-replaces-itself",
        DG,
        signed(&owner, &dd(&|d| d.replaces = vec![d.node])),
        T0,
        for_p.clone(),
        reject("DelegationError::Malformed"),
        "replaces names the delegated node.",
    );
    add(
        "delegation-empty-beneficiary",
        DG,
        signed(&owner, &dd(&|d| d.beneficiary = Some(String::new()))),
        T0,
        json!({ "advert_provider": p.peer_id().to_string(), "advert_beneficiary": "" }),
        reject("DelegationError::Malformed"),
        "A beneficiary, when set, is 1-128 bytes.",
    );
    add(
        "delegation-wrong-node",
        DG,
        signed(&owner, &d),
        T0,
        json!({ "advert_provider": r.peer_id().to_string(), "advert_beneficiary": null }),
        reject("DelegationError::WrongNode"),
        "Carried by an advert of another provider.",
    );
    add(
        "delegation-beneficiary-mismatch",
        DG,
        signed(&owner, &d_ok),
        T0,
        for_p.clone(),
        reject("DelegationError::BeneficiaryMismatch"),
        "The delegation names payout-1; the advert has none.",
    );
    add(
        "delegation-signer-not-owner",
        DG,
        signed_by_other(&p, &d),
        T0,
        for_p.clone(),
        reject("VerifyError::SignerMismatch"),
        "Signed by the node key itself: only the owner can delegate.",
    );
    add(
        "delegation-bad-signature",
        DG,
        flip_last_byte(signed(&owner, &d)),
        T0,
        for_p.clone(),
        reject("VerifyError::BadSignature"),
        "The signature's last bit flipped.",
    );
    add(
        "delegation-wrong-domain",
        DG,
        envelope(&owner, AD, &to_cbor(&d)),
        T0,
        for_p.clone(),
        reject("VerifyError::BadSignature"),
        "Signed with the advert domain tag.",
    );
    add(
        "delegation-oversize",
        DG,
        padded(&owner, &d, 2049),
        T0,
        for_p.clone(),
        reject("DecodeError::TooLarge"),
        "2,049 bytes, over the 2 KiB cap.",
    );
    add(
        "delegation-version-2",
        DG,
        signed(&owner, &dd(&|d| d.version = 2)),
        T0,
        for_p.clone(),
        reject("VerifyError::UnsupportedVersion"),
        "version 2: inside an advert any delegation failure but the window is rejected.",
    );

    write(cases);
}

/// `body` signed by `key` although it names another author (the envelope is valid, the
/// author check fails).
fn signed_by_other<T: Payload>(key: &SigningKey, body: &T) -> Vec<u8> {
    envelope(key, T::KIND, &to_cbor(body))
}

fn write(cases: Vec<Case>) {
    let mut names = std::collections::HashSet::new();
    let mut files = Vec::new();
    let mut disagreements = Vec::new();
    for case in cases {
        assert!(names.insert(case.name.clone()), "case name {} used twice", case.name);
        let mut file = json!({
            "name": case.name,
            "kind": case.kind.name(),
            "now": case.now,
            "context": case.context,
            "hex": hex::encode(&case.bytes),
            "note": case.note,
        });
        let actual = conformance::evaluate(&file).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let agrees = match &case.want {
            Want::Ok => actual.get("ok").is_some(),
            Want::Error(name, extra) => {
                let mut want = json!({ "error": name });
                if let Some((k, v)) = extra {
                    want[*k] = json!(v);
                }
                actual == want
            }
        };
        if !agrees {
            disagreements.push(format!("{}: the code says {actual}", case.name));
        }
        file["expect"] = actual;
        files.push((case.name, file));
    }
    if !disagreements.is_empty() {
        eprintln!("the code disagrees with the spec on:\n{}", disagreements.join("\n"));
        std::process::exit(1);
    }
    let dir = std::path::Path::new(conformance::VECTORS_DIR);
    std::fs::create_dir_all(dir).expect("create docs/vectors");
    for entry in std::fs::read_dir(dir).expect("read docs/vectors") {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            std::fs::remove_file(&path).expect("remove an old vector");
        }
    }
    let count = files.len();
    for (name, file) in files {
        let text = layout(&file);
        // What is written reads back as a vector the code agrees with.
        let reread: Json = serde_json::from_str(&text).expect("layout is JSON");
        let again = conformance::evaluate(&reread).expect("the written file can be checked");
        assert!(conformance::agrees(&reread["expect"], &again), "{name} does not read back");
        std::fs::write(dir.join(format!("{name}.json")), text).expect("write a vector");
    }
    println!("wrote {count} vectors to {}", dir.display());
}

/// The file's text: keys in the order a reader wants them (name first, hex last), values
/// as serde_json prints them.
fn layout(file: &Json) -> String {
    let keys = ["name", "kind", "note", "now", "context", "expect", "hex"];
    let mut out = String::from("{\n");
    for (i, key) in keys.iter().enumerate() {
        let value = serde_json::to_string_pretty(&file[*key]).expect("JSON");
        let value = value.replace('\n', "\n  ");
        let comma = if i + 1 < keys.len() { "," } else { "" };
        out.push_str(&format!("  {}: {value}{comma}\n", json!(key)));
    }
    out.push_str("}\n");
    out
}
