//! The advert accept rule and the lease freshness rule, at their exact boundaries, with
//! a fixed clock.

use peervm_protocol::advert::{MAX_ADVERT_LIFETIME_MS, MAX_CLOCK_SKEW_MS};
use peervm_protocol::encoding::to_cbor;
use peervm_protocol::lease::MAX_REQUEST_VALIDITY_MS;
use peervm_protocol::samples::{self, T0_UNIX_MS};
use peervm_protocol::*;

const NOW: u64 = T0_UNIX_MS + 1_000_000;

fn advert_at(issued: u64, lifetime: u64) -> Advertisement {
    let p = samples::provider_key();
    let mut a = samples::advert(&p, 5, issued);
    a.expires_at_unix_ms = issued + lifetime;
    a
}

#[test]
fn fresh_advert_accepted() {
    let a = advert_at(NOW, MAX_ADVERT_LIFETIME_MS);
    assert_eq!(a.check_acceptable(NOW, None), Ok(()));
    assert_eq!(a.check_acceptable(NOW, Some(4)), Ok(()));
    // Signed, verified and accepted through the public helper too.
    let p = samples::provider_key();
    let v = Signed::sign(&p, &a).unwrap();
    assert_eq!(advert::accept(&v, NOW, None), Ok(()));
}

#[test]
fn expired_advert_rejected() {
    let a = advert_at(NOW - 300_000, 300_000); // expires exactly now
    let err = a.check_acceptable(NOW, None).unwrap_err();
    assert_eq!(err, AdvertError::Expired { expires_at_unix_ms: NOW, now_unix_ms: NOW });
    assert_eq!(err.disposition(), Disposition::Ignore);
    assert_eq!(advert_at(NOW - 299_999, 300_000).check_acceptable(NOW, None), Ok(()));
}

#[test]
fn advert_issued_in_future_beyond_skew_rejected() {
    let ok = advert_at(NOW + MAX_CLOCK_SKEW_MS, 60_000);
    assert_eq!(ok.check_acceptable(NOW, None), Ok(()));
    let bad = advert_at(NOW + MAX_CLOCK_SKEW_MS + 1, 60_000);
    assert_eq!(
        bad.check_acceptable(NOW, None),
        Err(AdvertError::IssuedInFuture { issued_at_unix_ms: NOW + MAX_CLOCK_SKEW_MS + 1, now_unix_ms: NOW })
    );
}

#[test]
fn advert_lifetime_over_300s_rejected() {
    assert_eq!(advert_at(NOW, MAX_ADVERT_LIFETIME_MS).check_acceptable(NOW, None), Ok(()));
    let err = advert_at(NOW, MAX_ADVERT_LIFETIME_MS + 1).check_acceptable(NOW, None).unwrap_err();
    assert_eq!(err, AdvertError::LifetimeTooLong { lifetime_ms: MAX_ADVERT_LIFETIME_MS + 1 });
    assert_eq!(err.disposition(), Disposition::Reject);
    let mut backwards = advert_at(NOW, 10);
    backwards.expires_at_unix_ms = NOW - 1;
    assert_eq!(backwards.check_acceptable(NOW, None), Err(AdvertError::ExpiresBeforeIssued));
}

#[test]
fn advert_seq_not_newer_rejected() {
    let a = advert_at(NOW, 1000); // seq 5
    assert_eq!(a.check_acceptable(NOW, Some(5)), Err(AdvertError::SeqNotNewer { got: 5, held: 5 }));
    assert_eq!(a.check_acceptable(NOW, Some(6)), Err(AdvertError::SeqNotNewer { got: 5, held: 6 }));
    assert_eq!(a.check_acceptable(NOW, Some(5)).unwrap_err().disposition(), Disposition::Ignore);
}

#[test]
fn malformed_adverts_rejected() {
    let base = advert_at(NOW, 1000);
    type Mutation = (&'static str, fn(&mut Advertisement));
    let cases: &[Mutation] = &[
        ("free > total", |a| a.resources.free.vcpus = a.resources.total.vcpus + 1),
        ("port range", |a| a.ssh.port_min = a.ssh.port_max + 1),
        ("port 0", |a| a.ssh.port_min = 0),
        ("currency", |a| a.pricing.currency = "usd".into()),
        ("country", |a| a.country = Some("Germany".into())),
        ("host", |a| a.ssh.host = String::new()),
        ("control char", |a| a.region = "eu\n".into()),
        ("long text", |a| a.region = "x".repeat(200)),
        ("egress limit 0", |a| {
            a.network = Some(NetworkOffer {
                max_exposed_ports: 0,
                privileged_ports: false,
                egress_mbit: Some(0),
                ingress_mbit: None,
            })
        }),
        ("ingress limit 0", |a| {
            a.network = Some(NetworkOffer {
                max_exposed_ports: 0,
                privileged_ports: false,
                egress_mbit: None,
                ingress_mbit: Some(0),
            })
        }),
    ];
    for (name, mutate) in cases {
        let mut a = base.clone();
        mutate(&mut a);
        let err = a.check_acceptable(NOW, None).unwrap_err();
        assert!(matches!(err, AdvertError::Malformed(_)), "{name}: {err:?}");
        assert_eq!(err.disposition(), Disposition::Reject, "{name}");
    }
}

#[test]
fn bandwidth_limits_are_absent_from_the_encoding_unless_set() {
    let mut a = advert_at(NOW, 1000);
    let ports_only =
        NetworkOffer { max_exposed_ports: 2, privileged_ports: false, egress_mbit: None, ingress_mbit: None };
    a.network = Some(ports_only);
    let bytes = to_cbor(&a);
    for key in ["egress_mbit", "ingress_mbit"] {
        assert!(!bytes.windows(key.len()).any(|w| w == key.as_bytes()), "{key} encoded while unset");
    }
    a.network = Some(NetworkOffer { egress_mbit: Some(100), ingress_mbit: Some(20), ..ports_only });
    assert_eq!(a.check_acceptable(NOW, None), Ok(()));
    let back: Advertisement = encoding::from_cbor(&to_cbor(&a), "advert").unwrap();
    assert_eq!(back.network, a.network);
}

/// Row 19's bounds on `refresh` are field checks (Malformed, rejected), each at its edge:
/// the value one inside the bound is accepted, so each check is needed.
#[test]
fn refresh_chain_bounds_are_field_checks() {
    let chain = |period_s, count| Some(RefreshChain { anchor: [7; 16], period_s, count });
    let with = |lifetime: u64, refresh: Option<RefreshChain>| {
        let mut a = advert_at(NOW, lifetime);
        a.refresh = refresh;
        a.check_acceptable(NOW, None)
    };
    let malformed = |r: Result<(), AdvertError>| matches!(r, Err(AdvertError::Malformed(_)));
    assert_eq!(with(300_000, chain(150, 4)), Ok(()));
    assert_eq!(with(150_000, chain(150, 4)), Ok(()), "a period as long as the lifetime");
    assert!(malformed(with(300_000, chain(9, 4))), "period under 10 s");
    assert!(malformed(with(149_999, chain(150, 4))), "period longer than the lifetime");
    assert!(malformed(with(300_000, chain(150, 0))), "no token");
    assert!(malformed(with(300_000, chain(10, 1_025))), "count over 1,024");
    assert!(with(300_000, chain(10, 1_024)).is_ok(), "count of 1,024");
    // An advert that expires before it is issued has no room for a period: the field check
    // comes first in section 4's order.
    let mut a = advert_at(NOW, 300_000);
    a.expires_at_unix_ms = NOW - 1;
    a.refresh = chain(150, 4);
    assert!(malformed(a.check_acceptable(NOW, None)));
}

/// `refresh` is left out when absent (so adverts without it encode as before) and round
/// trips when present, the anchor as a 16-byte string.
#[test]
fn refresh_is_absent_from_the_encoding_unless_set() {
    let mut a = advert_at(NOW, 300_000);
    assert!(!to_cbor(&a).windows(7).any(|w| w == b"refresh"));
    let (chain, _) = RefreshSecret::generate(&a.provider, a.seq, 150, 4, [0; 16]).unwrap();
    a.refresh = Some(chain);
    let bytes = to_cbor(&a);
    let mut anchor = vec![0x50]; // bstr of 16 bytes
    anchor.extend_from_slice(&chain.anchor);
    assert!(bytes.windows(anchor.len()).any(|w| w == anchor.as_slice()), "the anchor is a bstr[16]");
    let back: Advertisement = encoding::from_cbor(&bytes, "advert").unwrap();
    assert_eq!(back.refresh, Some(chain));
    assert_eq!(back, a);
}

#[test]
fn guest_traffic_is_absent_from_a_status_unless_counted() {
    let ssh_only = LeaseUsage { cpu_usec: 1, net_rx_bytes: 2, net_tx_bytes: 3, ..Default::default() };
    let bytes = to_cbor(&ssh_only);
    assert!(!bytes.windows(9).any(|w| w == b"guest_net"), "guest_net encoded while None");
    let back: LeaseUsage = encoding::from_cbor(&bytes, "usage").unwrap();
    assert_eq!(back, ssh_only);
    let counted = LeaseUsage {
        guest_net: Some(GuestTraffic {
            rx_bytes: 10,
            rx_packets: 1,
            tx_bytes: 20,
            tx_packets: 2,
            new_connections: 3,
            dropped_packets: 4,
        }),
        ..ssh_only
    };
    let back: LeaseUsage = encoding::from_cbor(&to_cbor(&counted), "usage").unwrap();
    assert_eq!(back, counted);
}

#[test]
fn price_is_integer_and_rounds_up() {
    let p = samples::provider_key();
    let a = samples::advert(&p, 1, NOW);
    // 1 vcpu * 10_000 + 512/1024 GiB * 5_000 + 2 GiB * 100
    let spec = ResourceAmounts { vcpus: 1, memory_mib: 512, disk_gib: 2 };
    assert_eq!(a.price_for(&spec), Some(10_000 + 2_500 + 200));
    // 1 MiB of memory costs ceil(5000/1024) = 5 micro-units.
    assert_eq!(a.price_for(&ResourceAmounts { vcpus: 0, memory_mib: 1, disk_gib: 0 }), Some(5));
    let mut pricey = a.clone();
    pricey.pricing.per_vcpu_hour_micros = u64::MAX;
    assert_eq!(pricey.price_for(&ResourceAmounts { vcpus: 2, memory_mib: 0, disk_gib: 0 }), None);
}

#[test]
fn lease_request_freshness() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let req = samples::lease_request(&r, &p, NOW);
    assert_eq!(req.check_fresh(&p.peer_id(), NOW), Ok(()));
    assert_eq!(req.check_fresh(&p.peer_id(), NOW + MAX_REQUEST_VALIDITY_MS - 1), Ok(()));

    let err = req.check_fresh(&p.peer_id(), NOW + MAX_REQUEST_VALIDITY_MS).unwrap_err();
    assert!(matches!(err, FreshnessError::Expired { .. }));
    assert_eq!(err.deny_reason(), DenyReason::Stale);

    let future = samples::lease_request(&r, &p, NOW + MAX_CLOCK_SKEW_MS + 1);
    assert!(matches!(future.check_fresh(&p.peer_id(), NOW), Err(FreshnessError::IssuedInFuture { .. })));
    let edge = samples::lease_request(&r, &p, NOW + MAX_CLOCK_SKEW_MS);
    assert_eq!(edge.check_fresh(&p.peer_id(), NOW), Ok(()));

    let mut long = req.clone();
    long.valid_until_unix_ms = long.issued_at_unix_ms + MAX_REQUEST_VALIDITY_MS + 1;
    assert!(matches!(long.check_fresh(&p.peer_id(), NOW), Err(FreshnessError::WindowTooLong { .. })));
    let mut negative = req.clone();
    negative.valid_until_unix_ms = negative.issued_at_unix_ms - 1;
    assert!(matches!(negative.check_fresh(&p.peer_id(), NOW), Err(FreshnessError::WindowTooLong { .. })));

    let other = samples::numbered_key(1);
    let err = req.check_fresh(&other.peer_id(), NOW).unwrap_err();
    assert!(matches!(err, FreshnessError::WrongProvider { .. }));
    assert_eq!(err.deny_reason(), DenyReason::WrongProvider);
}

#[test]
fn lease_control_freshness() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let c = samples::lease_control(&r, &p, ControlAction::Status, NOW);
    assert_eq!(c.check_fresh(&p.peer_id(), NOW), Ok(()));
    assert!(matches!(c.check_fresh(&p.peer_id(), NOW + 60_000), Err(FreshnessError::Expired { .. })));
    assert!(matches!(
        c.check_fresh(&samples::numbered_key(2).peer_id(), NOW),
        Err(FreshnessError::WrongProvider { .. })
    ));
}

#[test]
fn lease_request_well_formed() {
    let p = samples::provider_key();
    let r = samples::requestor_key();
    let ok = samples::lease_request(&r, &p, NOW);
    assert_eq!(ok.check_well_formed(), Ok(()));
    for (name, mutate) in [
        ("zero vcpus", (|q: &mut LeaseRequest| q.spec.vcpus = 0) as fn(&mut LeaseRequest)),
        ("zero duration", |q| q.duration_secs = 0),
        ("huge duration", |q| q.duration_secs = u64::MAX),
        ("bad user", |q| q.ssh_user = "root;rm -rf /".into()),
        ("upper user", |q| q.ssh_user = "Root".into()),
        ("empty image", |q| q.spec.image_name.clear()),
    ] {
        let mut q = ok.clone();
        mutate(&mut q);
        assert!(q.check_well_formed().is_err(), "{name} accepted");
    }
}

#[test]
fn lease_id_hex_roundtrip() {
    let id = LeaseId([0xab; 16]);
    assert_eq!(LeaseId::from_hex(&id.to_hex()), Some(id));
    assert_eq!(LeaseId::from_hex("zz"), None);
    assert_eq!(LeaseId::from_hex(&"é".repeat(16)), None);
}

fn delegation(owner: &SigningKey, node: PeerId, from: u64, until: u64) -> Delegation {
    Delegation {
        version: 1,
        owner: owner.peer_id(),
        node,
        not_before_unix_ms: from,
        not_after_unix_ms: until,
        beneficiary: None,
        replaces: vec![],
    }
}

#[test]
fn delegated_advert_accepted_and_expired_forged_or_wrong_node_delegation_rejected() {
    let owner = samples::numbered_key(40);
    let node = samples::provider_key();
    let with = |d: &Delegation, signer: &SigningKey| {
        let mut a = advert_at(NOW, MAX_ADVERT_LIFETIME_MS);
        a.delegation = Some(match Signed::sign(signer, d) {
            Ok(v) => v.to_bytes(),
            // A key cannot sign for another owner: forge by re-signing the payload's bytes.
            Err(_) => Signed::<Delegation>::from_parts(to_cbor(d), d.owner, [7u8; 64]).to_bytes(),
        });
        a
    };
    let good = delegation(&owner, node.peer_id(), NOW - 1000, NOW + 86_400_000);
    let a = with(&good, &owner);
    assert_eq!(a.check_acceptable(NOW, None), Ok(()));
    assert_eq!(a.delegation_at(NOW).unwrap().unwrap().owner, owner.peer_id());
    // The encoding of an advert without a delegation is unchanged (the vectors hold).
    assert!(advert_at(NOW, 1000).delegation.is_none());

    // Expired or not yet valid: ignored (a clock matter), not penalised.
    let expired = with(&delegation(&owner, node.peer_id(), NOW - 10_000, NOW - 1), &owner);
    let err = expired.check_acceptable(NOW, None).unwrap_err();
    assert_eq!(err.disposition(), Disposition::Ignore, "{err}");
    // Another node's delegation, a forged signature, an over-long window: rejected.
    let other = with(&delegation(&owner, samples::numbered_key(41).peer_id(), NOW - 1, NOW + 1000), &owner);
    assert_eq!(other.check_acceptable(NOW, None).unwrap_err().disposition(), Disposition::Reject);
    let forged = with(&good, &samples::numbered_key(42));
    assert_eq!(forged.check_acceptable(NOW, None).unwrap_err().disposition(), Disposition::Reject);
    let long = with(&delegation(&owner, node.peer_id(), NOW - 1, NOW + 400 * 86_400_000), &owner);
    assert_eq!(long.check_acceptable(NOW, None).unwrap_err().disposition(), Disposition::Reject);
    // A delegation naming a beneficiary binds the advert's.
    let mut paid = good.clone();
    paid.beneficiary = Some("0xabc".into());
    let mut a = with(&paid, &owner);
    assert!(a.check_acceptable(NOW, None).is_err());
    a.beneficiary = Some("0xabc".into());
    assert_eq!(a.check_acceptable(NOW, None), Ok(()));
}

/// An effective expiry (refresh tokens, docs/protocol.md section 4a) stands in for the
/// signed one in the `Expired` check only; the other checks still read the signed fields.
#[test]
fn the_accept_rule_with_an_effective_expiry() {
    let a = advert_at(NOW - 300_000, 300_000); // signed expiry exactly now
    assert!(matches!(a.check_acceptable(NOW, None), Err(AdvertError::Expired { .. })));
    assert_eq!(a.check_acceptable_until(NOW, None, NOW + 1), Ok(()));
    assert_eq!(
        a.check_acceptable_until(NOW, None, NOW),
        Err(AdvertError::Expired { expires_at_unix_ms: NOW, now_unix_ms: NOW })
    );
    assert!(matches!(a.check_acceptable_until(NOW, Some(5), NOW + 1), Err(AdvertError::SeqNotNewer { .. })));
    let long = advert_at(NOW, 300_001);
    assert!(matches!(long.check_acceptable_until(NOW, None, u64::MAX), Err(AdvertError::LifetimeTooLong { .. })));
}
