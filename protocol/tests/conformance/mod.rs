//! The conformance vector format of docs/protocol.md section 11: how one vector file
//! (`docs/vectors/<name>.json`) is checked against this code. Shared by the test that
//! checks every file (`tests/conformance_vectors.rs`) and by the program that wrote them
//! (`examples/write_conformance_vectors.rs`), so both apply one rule.
//!
//! A file says which kind of envelope its `hex` is, the receiver's clock `now` and any
//! other context a rule needs; [`evaluate`] runs the receiver's checks in the order of
//! docs/protocol.md (section 2, then the kind's own rule) and returns the `expect` object
//! the code produces: `{"ok": <decoded payload>}` or `{"error": <variant>, ...}`.

use ciborium::Value as Cbor;
use peervm_protocol::blocklist::BlockListError;
use peervm_protocol::delegation::DelegationError;
use peervm_protocol::lease::SpecError;
use peervm_protocol::*;
use serde::Serialize;
use serde_json::{Map, Value as Json, json};

/// Where the vector files live, from the protocol crate.
pub const VECTORS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/vectors");

/// Every kind a vector may name.
pub const KINDS: [&str; 6] = ["advert", "lease-request", "lease-control", "lease-reply", "block-list", "delegation"];

/// The `expect` object this code produces for `file`, or why the file cannot be checked
/// (a missing or ill-typed key, an unknown kind, bad hex).
pub fn evaluate(file: &Json) -> Result<Json, String> {
    let kind = text(file, "kind")?;
    let bytes = hex::decode(text(file, "hex")?).map_err(|e| format!("`hex` is not hex: {e}"))?;
    let now = file.get("now").and_then(Json::as_u64).ok_or("`now` must be a uint (ms)")?;
    let empty = Json::Object(Map::new());
    let context = file.get("context").unwrap_or(&empty);
    Ok(match kind {
        "advert" => {
            let held_seq = match context.get("held_seq") {
                None | Some(Json::Null) => None,
                Some(v) => Some(v.as_u64().ok_or("`context.held_seq` must be a uint or null")?),
            };
            match Signed::<Advertisement>::open(&bytes) {
                Err(e) => error(verify_error_name(&e), "disposition", advert_disposition(&e)),
                Ok(v) => match v.body().check_acceptable(now, held_seq) {
                    Ok(()) => ok(v.body()),
                    Err(e) => error(advert_error_name(&e), "disposition", disposition_name(e.disposition())),
                },
            }
        }
        "lease-request" => {
            let this_provider = peer(context, "this_provider")?;
            match Signed::<LeaseRequest>::open(&bytes) {
                Err(e) => error(verify_error_name(&e), "deny", verify_deny(&e).as_str()),
                // The provider's denial order (docs/protocol.md section 5): freshness
                // before the request's own limits.
                Ok(v) => match v.body().check_fresh(&this_provider, now) {
                    Err(e) => error(freshness_error_name(&e), "deny", e.deny_reason().as_str()),
                    Ok(()) => match v.body().check_well_formed() {
                        Err(SpecError(_)) => error("SpecError".into(), "deny", DenyReason::InvalidSpec.as_str()),
                        Ok(()) => ok(v.body()),
                    },
                },
            }
        }
        "lease-control" => {
            let this_provider = peer(context, "this_provider")?;
            match Signed::<LeaseControl>::open(&bytes) {
                Err(e) => error(verify_error_name(&e), "deny", verify_deny(&e).as_str()),
                Ok(v) => match v.body().check_fresh(&this_provider, now) {
                    Err(e) => error(freshness_error_name(&e), "deny", e.deny_reason().as_str()),
                    Ok(()) => ok(v.body()),
                },
            }
        }
        // A requestor refuses a reply that fails section 2 or does not decode; which
        // request it answers is the requestor's own state, not the vector's.
        "lease-reply" => match Signed::<LeaseReply>::open(&bytes) {
            Err(e) => json!({ "error": verify_error_name(&e) }),
            Ok(v) => ok(v.body()),
        },
        "block-list" => match Signed::<BlockList>::open(&bytes) {
            Err(e) => error(verify_error_name(&e), "disposition", advert_disposition(&e)),
            Ok(v) => match v.body().check(now) {
                Err(e) => error(block_list_error_name(&e), "disposition", "reject"),
                Ok(()) => ok(v.body()),
            },
        },
        // Checked as the advert of `context.advert_provider` carrying it would check it
        // (section 7b); the disposition is that advert's.
        "delegation" => {
            let provider = peer(context, "advert_provider")?;
            let beneficiary = match context.get("advert_beneficiary") {
                None | Some(Json::Null) => None,
                Some(v) => Some(v.as_str().ok_or("`context.advert_beneficiary` must be text or null")?),
            };
            match Signed::<Delegation>::open(&bytes) {
                Err(e) => error(verify_error_name(&e), "disposition", "reject"),
                Ok(v) => match Delegation::open_for(&bytes, &provider, beneficiary, now) {
                    Err(e) => error(delegation_error_name(&e), "disposition", delegation_disposition(&e)),
                    Ok(_) => ok(v.body()),
                },
            }
        }
        other => return Err(format!("unknown kind `{other}` (expected one of {KINDS:?})")),
    })
}

/// Whether `actual` (from [`evaluate`]) agrees with a file's `expected`: an error object
/// must be equal; an `ok` payload must hold every key the file gives, with equal values
/// (a file may leave out fields that do not matter to its case).
pub fn agrees(expected: &Json, actual: &Json) -> bool {
    match (expected.get("ok"), actual.get("ok")) {
        (Some(want), Some(got)) => subset(want, got),
        (None, None) => expected == actual,
        _ => false,
    }
}

fn subset(want: &Json, got: &Json) -> bool {
    match (want, got) {
        (Json::Object(w), Json::Object(g)) => w.iter().all(|(k, v)| g.get(k).is_some_and(|gv| subset(v, gv))),
        (Json::Array(w), Json::Array(g)) => w.len() == g.len() && w.iter().zip(g).all(|(a, b)| subset(a, b)),
        _ => want == got,
    }
}

fn text<'a>(file: &'a Json, key: &str) -> Result<&'a str, String> {
    file.get(key).and_then(Json::as_str).ok_or_else(|| format!("`{key}` must be text"))
}

fn peer(context: &Json, key: &str) -> Result<PeerId, String> {
    let s = context.get(key).and_then(Json::as_str).ok_or_else(|| format!("`context.{key}` must be a PeerId"))?;
    s.parse().map_err(|e| format!("`context.{key}`: {e}"))
}

fn ok<T: Serialize>(body: &T) -> Json {
    json!({ "ok": render(body) })
}

fn error(name: String, key: &str, value: &str) -> Json {
    json!({ "error": name, key: value })
}

/// A decoded payload as JSON: its canonical CBOR with the wire's keys, integers as
/// numbers, byte strings as lower-case hex, except PeerIds (base58, as `PeerId`
/// displays them) and listen addresses (multiaddr text).
pub fn render<T: Serialize>(body: &T) -> Json {
    let bytes = peervm_protocol::encoding::to_cbor(body);
    let value: Cbor = ciborium::from_reader(bytes.as_slice()).unwrap_or_else(|e| unreachable!("own CBOR: {e}"));
    cbor_to_json(&value, "")
}

const PEER_KEYS: [&str; 7] = ["provider", "requestor", "signer", "owner", "node", "peer", "replaces"];

fn cbor_to_json(v: &Cbor, key: &str) -> Json {
    match v {
        Cbor::Integer(i) => {
            Json::from(u64::try_from(*i).unwrap_or_else(|_| unreachable!("payloads hold no negatives")))
        }
        Cbor::Text(s) => Json::from(s.as_str()),
        Cbor::Bool(b) => Json::from(*b),
        Cbor::Null => Json::Null,
        Cbor::Bytes(b) if PEER_KEYS.contains(&key) => {
            Json::from(PeerId::from_bytes(b).map_or_else(|_| hex::encode(b), |p| p.to_string()))
        }
        Cbor::Bytes(b) if key == "listen_addrs" => {
            Json::from(Multiaddr::try_from(b.clone()).map_or_else(|_| hex::encode(b), |a| a.to_string()))
        }
        Cbor::Bytes(b) => Json::from(hex::encode(b)),
        Cbor::Array(items) => Json::Array(items.iter().map(|i| cbor_to_json(i, key)).collect()),
        Cbor::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| {
                    let k = k.as_text().unwrap_or_else(|| unreachable!("payload keys are text")).to_string();
                    let value = cbor_to_json(v, &k);
                    (k, value)
                })
                .collect(),
        ),
        other => unreachable!("payloads hold no {other:?}"),
    }
}

fn verify_error_name(e: &VerifyError) -> String {
    match e {
        VerifyError::Decode(d) => match d {
            DecodeError::TooLarge { .. } => "DecodeError::TooLarge".into(),
            DecodeError::Cbor { .. } => "DecodeError::Cbor".into(),
            DecodeError::TrailingBytes { .. } => "DecodeError::TrailingBytes".into(),
            DecodeError::SignatureLength(_) => "DecodeError::SignatureLength".into(),
            DecodeError::Signer(i) => format!("DecodeError::Signer(IdentityError::{i:?})"),
        },
        VerifyError::BadSignature { .. } => "VerifyError::BadSignature".into(),
        VerifyError::UnsupportedVersion { .. } => "VerifyError::UnsupportedVersion".into(),
        VerifyError::SignerMismatch { .. } => "VerifyError::SignerMismatch".into(),
    }
}

/// The denial a provider sends for a lease message that fails section 2 (section 10.4).
fn verify_deny(e: &VerifyError) -> DenyReason {
    match e {
        VerifyError::Decode(_) => DenyReason::Malformed,
        VerifyError::BadSignature { .. } | VerifyError::SignerMismatch { .. } => DenyReason::BadSignature,
        VerifyError::UnsupportedVersion { .. } => DenyReason::UnsupportedVersion,
    }
}

/// Gossip's disposition of an envelope failing section 2 (section 10.4).
fn advert_disposition(e: &VerifyError) -> &'static str {
    if e.is_misbehaviour() { "reject" } else { "ignore" }
}

fn disposition_name(d: Disposition) -> &'static str {
    match d {
        Disposition::Reject => "reject",
        Disposition::Ignore => "ignore",
    }
}

fn advert_error_name(e: &AdvertError) -> String {
    match e {
        AdvertError::Expired { .. } => "AdvertError::Expired".into(),
        AdvertError::IssuedInFuture { .. } => "AdvertError::IssuedInFuture".into(),
        AdvertError::LifetimeTooLong { .. } => "AdvertError::LifetimeTooLong".into(),
        AdvertError::ExpiresBeforeIssued => "AdvertError::ExpiresBeforeIssued".into(),
        AdvertError::SeqNotNewer { .. } => "AdvertError::SeqNotNewer".into(),
        AdvertError::Malformed(_) => "AdvertError::Malformed".into(),
        AdvertError::Delegation(d) => format!("AdvertError::Delegation({})", delegation_error_name(d)),
    }
}

fn delegation_error_name(e: &DelegationError) -> String {
    let variant = match e {
        DelegationError::Invalid(_) => "Invalid",
        DelegationError::WrongNode { .. } => "WrongNode",
        DelegationError::OutsideWindow { .. } => "OutsideWindow",
        DelegationError::BadWindow => "BadWindow",
        DelegationError::Malformed(_) => "Malformed",
        DelegationError::BeneficiaryMismatch { .. } => "BeneficiaryMismatch",
    };
    format!("DelegationError::{variant}")
}

fn delegation_disposition(e: &DelegationError) -> &'static str {
    if e.is_misbehaviour() { "reject" } else { "ignore" }
}

fn freshness_error_name(e: &FreshnessError) -> String {
    let variant = match e {
        FreshnessError::WrongProvider { .. } => "WrongProvider",
        FreshnessError::IssuedInFuture { .. } => "IssuedInFuture",
        FreshnessError::Expired { .. } => "Expired",
        FreshnessError::WindowTooLong { .. } => "WindowTooLong",
    };
    format!("FreshnessError::{variant}")
}

fn block_list_error_name(e: &BlockListError) -> String {
    let variant = match e {
        BlockListError::TooManyEntries(_) => "TooManyEntries",
        BlockListError::ReasonTooLong { .. } => "ReasonTooLong",
        BlockListError::IssuedInFuture { .. } => "IssuedInFuture",
        BlockListError::Duplicate(_) => "Duplicate",
    };
    format!("BlockListError::{variant}")
}
