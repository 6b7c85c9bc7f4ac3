//! Every conformance vector in `docs/vectors/` (docs/protocol.md section 11) agrees with
//! this code: its envelope decodes and verifies, and the kind's rule at the file's `now`
//! gives exactly the expected fields or the expected error. A file this test cannot check,
//! a disagreement, or fewer than 60 files fails it, so the spec's vectors and the code
//! cannot drift apart.

mod conformance;

use std::collections::BTreeMap;

use conformance::{KINDS, VECTORS_DIR, agrees, evaluate};
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::*;
use serde_json::Value as Json;

const MIN_VECTORS: usize = 60;
const DOC: &str = include_str!("../../docs/protocol.md");

/// Every `*.json` file of the directory by name (without `.json`), parsed. Anything else
/// in the directory is an error: the directory holds vectors only.
fn vector_files() -> BTreeMap<String, Json> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(VECTORS_DIR).expect("docs/vectors exists") {
        let path = entry.expect("directory entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).expect("UTF-8 file name").to_string();
        let stem = name.strip_suffix(".json").unwrap_or_else(|| panic!("docs/vectors/{name} is not a .json vector"));
        let text = std::fs::read_to_string(&path).expect("readable");
        let json: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        files.insert(stem.to_string(), json);
    }
    files
}

#[test]
fn every_vector_file_agrees_with_the_code() {
    let files = vector_files();
    assert!(files.len() >= MIN_VECTORS, "docs/vectors has {} files, at least {MIN_VECTORS} expected", files.len());
    let mut failures = Vec::new();
    for (stem, file) in &files {
        if file.get("name").and_then(Json::as_str) != Some(stem.as_str()) {
            failures.push(format!("{stem}: `name` must be the file's name"));
            continue;
        }
        if file.get("note").and_then(Json::as_str).is_none_or(str::is_empty) {
            failures.push(format!("{stem}: `note` must say what the case is"));
        }
        let Some(expected) = file.get("expect").filter(|e| e.get("ok").is_some() != e.get("error").is_some()) else {
            failures.push(format!("{stem}: `expect` must hold exactly one of `ok` and `error`"));
            continue;
        };
        match evaluate(file) {
            Err(why) => failures.push(format!("{stem}: cannot be checked: {why}")),
            Ok(actual) if !agrees(expected, &actual) => {
                failures.push(format!("{stem}: the file expects {expected}, the code gives {actual}"))
            }
            Ok(_) => {}
        }
    }
    assert!(failures.is_empty(), "{} of {} vectors fail:\n{}", failures.len(), files.len(), failures.join("\n"));
}

#[test]
fn every_kind_has_accepted_and_refused_vectors() {
    let files = vector_files();
    for kind in KINDS {
        let of_kind: Vec<&Json> = files.values().filter(|f| f["kind"] == kind).collect();
        assert!(of_kind.iter().any(|f| f["expect"].get("ok").is_some()), "no accepted {kind} vector");
        if kind != "lease-reply" || of_kind.len() > 1 {
            assert!(of_kind.iter().any(|f| f["expect"].get("error").is_some()), "no refused {kind} vector");
        }
    }
}

/// The hex of the fenced block "```hex <name>" of section 11.
fn doc_vector(name: &str) -> String {
    let fence = format!("```hex {name}\n");
    let start = DOC.find(&fence).unwrap_or_else(|| panic!("docs/protocol.md has no `{fence}` block")) + fence.len();
    let end = start + DOC[start..].find("```").expect("closing fence");
    DOC[start..end].chars().filter(|c| !c.is_whitespace()).collect()
}

fn payload_sha256<T: Payload>(hex_envelope: &str) -> String {
    let bytes = hex::decode(hex_envelope).expect("hex");
    hex::encode(lease::payload_digest(&Signed::<T>::from_bytes(&bytes).expect("envelope parses")))
}

#[test]
fn the_vectors_continue_the_exchange_of_section_11() {
    let files = vector_files();
    let hex_of = |name: &str| files[name]["hex"].as_str().unwrap_or_else(|| panic!("{name} has hex")).to_string();
    // The four documented vectors are files of the directory, byte for byte.
    for (doc, file) in [
        ("advert", "advert-ok"),
        ("lease-request", "lease-request-ok"),
        ("lease-reply", "lease-reply-granted"),
        ("lease-control", "lease-control-extend"),
    ] {
        assert_eq!(hex_of(file), doc_vector(doc), "{file} must be section 11's `{doc}` vector");
    }
    // Replies answer the request and control vectors they name.
    let in_reply_to =
        |name: &str| files[name]["expect"]["ok"]["in_reply_to"].as_str().expect("in_reply_to").to_string();
    let request = payload_sha256::<LeaseRequest>(&hex_of("lease-request-ok"));
    for reply in ["lease-reply-granted", "lease-reply-denied-no-capacity", "lease-reply-denied-price-too-low"] {
        assert_eq!(in_reply_to(reply), request, "{reply} answers lease-request-ok");
    }
    assert_eq!(
        in_reply_to("lease-reply-granted-exposed"),
        payload_sha256::<LeaseRequest>(&hex_of("lease-request-ok-expose"))
    );
    assert_eq!(in_reply_to("lease-reply-extended"), payload_sha256::<LeaseControl>(&hex_of("lease-control-extend")));
    assert_eq!(
        in_reply_to("lease-reply-status-running"),
        payload_sha256::<LeaseControl>(&hex_of("lease-control-status"))
    );
    assert_eq!(
        in_reply_to("lease-reply-terminated"),
        payload_sha256::<LeaseControl>(&hex_of("lease-control-terminate"))
    );
    // The advert with a delegation carries the delegation vector's envelope.
    assert_eq!(
        files["advert-ok-with-delegation"]["expect"]["ok"]["delegation"].as_str(),
        Some(hex_of("delegation-ok").as_str())
    );
    // Keys are the deterministic ones of section 11.
    assert_eq!(files["advert-ok"]["expect"]["ok"]["provider"], samples::provider_key().peer_id().to_string());
    assert_eq!(files["delegation-ok"]["expect"]["ok"]["owner"], samples::owner_key().peer_id().to_string());
    assert_eq!(files["advert-ok"]["now"], T0_UNIX_MS);
}
