//! The hex test vectors in docs/protocol.md are exactly what this code produces, and
//! this code accepts exactly those bytes. Run with PEERVM_PRINT_VECTORS=1 to print them.

use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::*;

const DOC: &str = include_str!("../../docs/protocol.md");

/// The grant of the vectors: it answers the request vector (`in_reply_to` is the SHA-256
/// of its payload), so the four vectors are one exchange.
fn grant() -> LeaseReply {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let request = Signed::sign(&r, &samples::lease_request(&r, &p, T0_UNIX_MS)).unwrap();
    let mut reply = samples::lease_reply(&p, &r, samples::granted(T0_UNIX_MS), T0_UNIX_MS);
    reply.in_reply_to = lease::payload_digest(request.signed());
    reply
}

fn vectors() -> Vec<(&'static str, Vec<u8>)> {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    vec![
        ("advert", Signed::sign(&p, &samples::advert(&p, 1, T0_UNIX_MS)).unwrap().to_bytes()),
        ("lease-request", Signed::sign(&r, &samples::lease_request(&r, &p, T0_UNIX_MS)).unwrap().to_bytes()),
        ("lease-reply", Signed::sign(&p, &grant()).unwrap().to_bytes()),
        (
            "lease-control",
            Signed::sign(
                &r,
                &samples::lease_control(&r, &p, ControlAction::Extend { additional_secs: 1800 }, T0_UNIX_MS),
            )
            .unwrap()
            .to_bytes(),
        ),
    ]
}

/// The hex in the fenced block that starts with "```hex <name>".
fn doc_vector(name: &str) -> Vec<u8> {
    let fence = format!("```hex {name}\n");
    let start = DOC.find(&fence).unwrap_or_else(|| panic!("docs/protocol.md has no `{fence}` block")) + fence.len();
    let end = start + DOC[start..].find("```").expect("closing fence");
    let hex: String = DOC[start..end].chars().filter(|c| !c.is_whitespace()).collect();
    hex::decode(hex).expect("valid hex")
}

#[test]
fn code_produces_and_accepts_exactly_the_documented_vectors() {
    let print = std::env::var("PEERVM_PRINT_VECTORS").is_ok();
    for (name, bytes) in vectors() {
        if print {
            let hex = hex::encode(&bytes);
            println!("```hex {name}");
            for chunk in hex.as_bytes().chunks(96) {
                println!("{}", std::str::from_utf8(chunk).unwrap());
            }
            println!("```");
            continue;
        }
        assert_eq!(hex::encode(doc_vector(name)), hex::encode(&bytes), "vector {name} differs from the docs");
    }
    if print {
        return;
    }
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let advert = Signed::<Advertisement>::open(&doc_vector("advert")).expect("documented advert verifies");
    assert_eq!(advert.body(), &samples::advert(&p, 1, T0_UNIX_MS));
    let request = Signed::<LeaseRequest>::open(&doc_vector("lease-request")).expect("documented request verifies");
    assert_eq!(request.body(), &samples::lease_request(&r, &p, T0_UNIX_MS));
    let reply = Signed::<LeaseReply>::open(&doc_vector("lease-reply")).expect("documented reply verifies");
    assert_eq!(reply.signer(), p.peer_id());
    assert_eq!(reply.body(), &grant());
    let control = Signed::<LeaseControl>::open(&doc_vector("lease-control")).expect("documented control verifies");
    assert_eq!(control.body().action, ControlAction::Extend { additional_secs: 1800 });
}

#[test]
fn documented_peer_ids_match_the_seeds() {
    for (name, key) in [("provider", samples::provider_key()), ("requestor", samples::requestor_key())] {
        let line = format!("{name} PeerId: `{}`", key.peer_id());
        assert!(DOC.contains(&line), "docs/protocol.md should say: {line}");
    }
}

#[test]
fn print_peer_ids() {
    if std::env::var("PEERVM_PRINT_VECTORS").is_ok() {
        println!("provider PeerId: `{}`", samples::provider_key().peer_id());
        println!("requestor PeerId: `{}`", samples::requestor_key().peer_id());
    }
}

#[test]
fn the_vectors_are_one_consistent_exchange() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let advert = samples::advert(&p, 1, T0_UNIX_MS);
    let request = samples::lease_request(&r, &p, T0_UNIX_MS);
    assert_eq!(request.advert_seq, advert.seq, "the request answers the advert vector");
    assert!(advert.offers_image(&request.spec.image_name, &request.spec.image_sha256));
    let price = advert.price_for(&request.spec.resources()).unwrap();
    assert!(price <= request.max_price_per_hour_micros && request.currency == advert.pricing.currency);
    let signed_request = Signed::sign(&r, &request).unwrap();
    match grant().outcome {
        ReplyOutcome::Granted { price_per_hour_micros, ref access, .. } => {
            assert_eq!(price_per_hour_micros, price, "the grant charges the advert's price");
            assert_eq!(
                (access.host.as_str(), access.user.as_str()),
                (advert.ssh.host.as_str(), request.ssh_user.as_str())
            );
            assert!((advert.ssh.port_min..=advert.ssh.port_max).contains(&access.port));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(grant().in_reply_to, lease::payload_digest(signed_request.signed()));
    // The SSH keys are real ed25519 points, as OpenSSH would require.
    assert!(ed25519_dalek::VerifyingKey::from_bytes(&request.ssh_public_key).is_ok());
    if let ReplyOutcome::Granted { host_key, .. } = grant().outcome {
        assert!(ed25519_dalek::VerifyingKey::from_bytes(&host_key).is_ok());
    }
}

/// The refresh chain of section 11 is what the code makes: every value and the record
/// of k = 1 appear in the document's table, in this order.
#[test]
fn documented_refresh_chain_matches_the_code() {
    let p = samples::provider_key().peer_id();
    let (chain, secret) = RefreshSecret::generate(&p, 1, 150, 4, std::array::from_fn(|i| i as u8)).unwrap();
    let start = DOC.find("**Refresh chain**").expect("docs/protocol.md section 11 has the refresh chain");
    let table = &DOC[start..];
    let mut at = 0;
    for value in (1..=4).rev().map(|k| secret.token(k).unwrap()).chain([chain.anchor]) {
        let hex = format!("`{}`", hex::encode(value));
        at += table[at..].find(&hex).unwrap_or_else(|| panic!("docs/protocol.md should give {hex}, in chain order"));
    }
    let record = secret.record(1).unwrap().to_bytes();
    let line =
        format!("`{}` `{}` `{}`", hex::encode(&record[..6]), hex::encode(&record[6..8]), hex::encode(&record[8..]));
    assert!(table.contains(&line), "docs/protocol.md should give the record of k = 1: {line}");
}
