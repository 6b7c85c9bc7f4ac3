//! Admission: the checks a lease request must pass, as pure functions of the request,
//! the provider's terms, what its store and trusted block lists say, its free capacity and
//! the time (docs/architecture.md, "Leases", steps 2 and 3; docs/protocol.md section 5).
//! The manager gathers those facts and commits what these functions decide.

use std::sync::Arc;

use libp2p::PeerId;
use peervm_protocol::advert::{MAX_CLOCK_SKEW_MS, hourly_price_micros};
use peervm_protocol::lease::MAX_REQUEST_VALIDITY_MS;
use peervm_protocol::{DenyReason, GuestSpec, LeaseRequest, ResourceAmounts};
use peervm_vmm::GuestImage;

use super::denial::{Denial, deny};
use super::terms::LeaseTerms;

/// How long a request or control message stays valid, for requestors building one.
pub const REQUEST_VALIDITY_MS: u64 = MAX_REQUEST_VALIDITY_MS;

/// A seen nonce is kept this long past its message's validity, covering clock skew: a
/// message is acted on at most once (SECURITY.md invariant 3).
const NONCE_GRACE_MS: u64 = MAX_CLOCK_SKEW_MS + 60_000;

/// Until when the store keeps the nonce of a message valid until `valid_until_unix_ms`.
pub(super) fn nonce_kept_until(valid_until_unix_ms: u64) -> u64 {
    valid_until_unix_ms.saturating_add(NONCE_GRACE_MS)
}

/// Who blocked a requestor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blocked {
    /// This provider's operator (`peervm provider block`).
    ByOperator,
    /// A signed block list this provider's operator trusts.
    ByTrustedList,
}

/// What the provider's store and trusted block lists say about a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Standing {
    /// The store already holds a lease with this id.
    pub lease_id_used: bool,
    pub blocked: Option<Blocked>,
}

/// What an admitted request gets: the image to boot and the price it pays.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub image: Arc<GuestImage>,
    pub price_per_hour_micros: u64,
}

/// The checks that need no lookup, first: a locked provider takes no new lease, and the
/// request must be addressed to this provider and fresh at `now`.
pub(super) fn check_addressed(req: &LeaseRequest, locked: bool, me: &PeerId, now: u64) -> Result<(), Denial> {
    if locked {
        return Err(deny(DenyReason::Locked, "this provider accepts no new leases right now"));
    }
    req.check_fresh(me, now).map_err(|e| deny(e.deny_reason(), e.to_string()))
}

/// The rest of the checks, in the order of docs/architecture.md ("Leases", step 2): the
/// lease id unseen, the requestor not blocked, a well-formed spec and a duration within
/// the terms, an offered image, and a price within the request's maximum and currency.
pub(super) fn check_request(req: &LeaseRequest, standing: Standing, terms: &LeaseTerms) -> Result<Plan, Denial> {
    // The store refuses a used lease id too (in the admitting transaction); checking
    // here first answers a replay before any other check looks at it.
    if standing.lease_id_used {
        return Err(deny(DenyReason::Replay, format!("lease id {} was already used", req.lease_id)));
    }
    match standing.blocked {
        Some(Blocked::ByOperator) => {
            return Err(deny(DenyReason::Blocked, "this requestor is blocked by the provider"));
        }
        Some(Blocked::ByTrustedList) => {
            return Err(deny(DenyReason::Blocked, "this requestor is on a block list the provider trusts"));
        }
        None => {}
    }
    req.check_well_formed().map_err(|e| deny(DenyReason::InvalidSpec, e.to_string()))?;
    if !(terms.min_lease_secs..=terms.max_lease_secs).contains(&req.duration_secs) {
        return Err(deny(
            DenyReason::InvalidSpec,
            format!(
                "duration {} s is outside this provider's {}..={} s",
                req.duration_secs, terms.min_lease_secs, terms.max_lease_secs
            ),
        ));
    }
    let image = match terms.images.get(&req.spec.image_name) {
        Some(img) if img.sha256() == req.spec.image_sha256 => img.clone(),
        Some(_) => {
            return Err(deny(
                DenyReason::UnknownImage,
                format!("image `{}` here has a different sha256 than requested", req.spec.image_name),
            ));
        }
        None => {
            return Err(deny(DenyReason::UnknownImage, format!("no image `{}` here", req.spec.image_name)));
        }
    };
    // The image's own needs: the SSH user the grant names must be the account the
    // image's seed creates (its `login_user`), and the disk must hold its root file
    // system (docs/vmm.md "Images"). vmm checks both again before it creates anything.
    image
        .check_lease(&req.ssh_user, u32::try_from(req.spec.disk_gib).unwrap_or(u32::MAX))
        .map_err(|e| deny(DenyReason::InvalidSpec, e.to_string()))?;
    // Exposed ports within this provider's terms (their count and form were checked by
    // check_well_formed; the host port range holds a block per lease: config.rs).
    if req.spec.expose.len() > usize::from(terms.max_exposed_ports) {
        return Err(deny(
            DenyReason::InvalidSpec,
            format!(
                "{} exposed ports asked; this provider exposes at most {}",
                req.spec.expose.len(),
                terms.max_exposed_ports
            ),
        ));
    }
    if let Some(p) = req.spec.expose.iter().find(|p| **p < 1024)
        && !terms.expose_privileged
    {
        return Err(deny(
            DenyReason::InvalidSpec,
            format!("guest port {p} is below 1024: this provider exposes ports from 1024 up only"),
        ));
    }
    // The hypervisor takes memory as u32 MiB, and 64 MiB is the smallest guest offered.
    if u32::try_from(req.spec.memory_mib).is_err() || req.spec.memory_mib < 64 {
        return Err(deny(DenyReason::InvalidSpec, "memory must be at least 64 MiB"));
    }
    let p = &terms.pricing;
    let price = hourly_price_micros(
        p.per_vcpu_hour_micros,
        p.per_memory_gib_hour_micros,
        p.per_disk_gib_hour_micros,
        &req.spec.resources(),
    )
    .ok_or_else(|| deny(DenyReason::InvalidSpec, "the requested size overflows the price"))?;
    if req.currency != p.currency || req.max_price_per_hour_micros < price {
        return Err(deny(
            DenyReason::PriceTooLow,
            format!(
                "this size costs {} {} micro-units per hour; the request offers at most {} {}",
                price, p.currency, req.max_price_per_hour_micros, req.currency
            ),
        ));
    }
    Ok(Plan { image, price_per_hour_micros: price })
}

/// Whether `want` fits in what is `free` (every resource on its own).
pub(super) fn check_capacity(want: &ResourceAmounts, free: &ResourceAmounts) -> Result<(), Denial> {
    if want.vcpus > free.vcpus || want.memory_mib > free.memory_mib || want.disk_gib > free.disk_gib {
        return Err(deny(
            DenyReason::NoCapacity,
            format!("free now: {} vCPU, {} MiB memory, {} GiB disk", free.vcpus, free.memory_mib, free.disk_gib),
        ));
    }
    Ok(())
}

/// Free capacity: `total` minus what the leases that hold resources (every lease neither
/// ended nor failed) asked for.
pub(super) fn free_capacity<'a>(
    total: ResourceAmounts,
    held: impl IntoIterator<Item = &'a GuestSpec>,
) -> ResourceAmounts {
    let mut used = ResourceAmounts { vcpus: 0, memory_mib: 0, disk_gib: 0 };
    for spec in held {
        used.vcpus = used.vcpus.saturating_add(spec.vcpus);
        used.memory_mib = used.memory_mib.saturating_add(spec.memory_mib);
        used.disk_gib = used.disk_gib.saturating_add(spec.disk_gib);
    }
    ResourceAmounts {
        vcpus: total.vcpus.saturating_sub(used.vcpus),
        memory_mib: total.memory_mib.saturating_sub(used.memory_mib),
        disk_gib: total.disk_gib.saturating_sub(used.disk_gib),
    }
}

#[cfg(test)]
mod tests {
    use peervm_protocol::DenyReason;

    use super::super::test_harness::{Harness, T0};
    use super::*;

    const CLEAR: Standing = Standing { lease_id_used: false, blocked: None };

    fn reason(result: Result<impl std::fmt::Debug, Denial>) -> DenyReason {
        result.expect_err("a denial").reason
    }

    #[test]
    fn a_fresh_request_addressed_here_passes_and_a_locked_provider_denies_it() {
        let h = Harness::new();
        let req = h.request();
        assert_eq!(check_addressed(&req, false, &h.provider, T0), Ok(()));
        let d = check_addressed(&req, true, &h.provider, T0).unwrap_err();
        assert_eq!(d.reason, DenyReason::Locked);
    }

    #[test]
    fn a_request_for_another_provider_is_wrong_provider() {
        let h = Harness::new();
        let req = LeaseRequest { provider: PeerId::random(), ..h.request() };
        assert_eq!(reason(check_addressed(&req, false, &h.provider, T0)), DenyReason::WrongProvider);
    }

    #[test]
    fn freshness_is_checked_at_the_given_time() {
        let h = Harness::new();
        let req = h.request(); // issued at T0, valid until T0 + 60 s
        assert_eq!(check_addressed(&req, false, &h.provider, T0 + 59_999), Ok(()));
        assert_eq!(reason(check_addressed(&req, false, &h.provider, T0 + 60_000)), DenyReason::Stale);
        // issued more than the allowed skew (30 s) in the future
        assert_eq!(check_addressed(&req, false, &h.provider, T0 - 30_000), Ok(()));
        assert_eq!(reason(check_addressed(&req, false, &h.provider, T0 - 30_001)), DenyReason::Stale);
        let long = LeaseRequest { valid_until_unix_ms: T0 + 60_001, ..h.request() };
        assert_eq!(reason(check_addressed(&long, false, &h.provider, T0)), DenyReason::Stale);
    }

    #[test]
    fn a_used_lease_id_is_a_replay_before_anything_else() {
        let h = Harness::new();
        let standing = Standing { lease_id_used: true, blocked: Some(Blocked::ByOperator) };
        let bad = LeaseRequest { ssh_user: "Root!".into(), ..h.request() };
        let d = check_request(&bad, standing, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::Replay);
        assert_eq!(d.detail, format!("lease id {} was already used", bad.lease_id));
    }

    #[test]
    fn a_blocked_requestor_is_denied_naming_who_blocked_it() {
        let h = Harness::new();
        let req = LeaseRequest { duration_secs: 1, ..h.request() };
        let by_operator = Standing { lease_id_used: false, blocked: Some(Blocked::ByOperator) };
        let d = check_request(&req, by_operator, &h.terms).unwrap_err();
        assert_eq!((d.reason, d.detail.as_str()), (DenyReason::Blocked, "this requestor is blocked by the provider"));
        let by_list = Standing { lease_id_used: false, blocked: Some(Blocked::ByTrustedList) };
        let d = check_request(&req, by_list, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::Blocked);
        assert!(d.detail.contains("block list"), "{}", d.detail);
    }

    #[test]
    fn an_ill_formed_request_is_invalid_spec() {
        let h = Harness::new();
        for req in [
            LeaseRequest { ssh_user: "Root!".into(), ..h.request() },
            LeaseRequest { spec: GuestSpec { vcpus: 0, ..h.request().spec }, ..h.request() },
            LeaseRequest { duration_secs: 0, ..h.request() },
        ] {
            assert_eq!(reason(check_request(&req, CLEAR, &h.terms)), DenyReason::InvalidSpec, "{req:?}");
        }
    }

    #[test]
    fn the_duration_must_be_within_the_terms() {
        let h = Harness::new(); // 60..=7200 s
        for (secs, ok) in [(59, false), (60, true), (7200, true), (7201, false)] {
            let req = LeaseRequest { duration_secs: secs, ..h.request() };
            let result = check_request(&req, CLEAR, &h.terms);
            assert_eq!(result.is_ok(), ok, "{secs} s");
            if !ok {
                assert_eq!(reason(result), DenyReason::InvalidSpec);
            }
        }
    }

    #[test]
    fn an_image_with_a_login_user_and_a_root_disk_takes_only_that_user_and_a_disk_that_holds_it() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let disk = peervm_vmm::disk_header::qcow2_v3_header((2u64 << 30) + 1);
        std::fs::write(dir.path().join("disk"), &disk).unwrap();
        let manifest = serde_json::json!({
            "name": "debian-12", "kernel": "disk", "initrd": "disk", "disk": "disk",
            "disk_role": "root", "disk_virtual_size": (2u64 << 30) + 1, "login_user": "peervm", "seed": "cloud-init",
            "files": [{"path": "disk", "sha256": hex::encode(Sha256::digest(&disk)), "size": disk.len()}],
        });
        std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
        let image = Arc::new(GuestImage::open(dir.path()).unwrap());
        let h = Harness::build(|t| _ = t.images.insert("debian-12".into(), image.clone()), |_| {});
        let debian = |user: &str, disk_gib: u64| LeaseRequest {
            ssh_user: user.into(),
            spec: GuestSpec {
                image_name: "debian-12".into(),
                image_sha256: image.sha256(),
                disk_gib,
                ..h.request().spec
            },
            ..h.request()
        };
        assert!(check_request(&debian("peervm", 3), CLEAR, &h.terms).is_ok());
        let d = check_request(&debian("alice", 3), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
        assert!(d.detail.contains("\"peervm\"") && d.detail.contains("\"alice\""), "{}", d.detail);
        let d = check_request(&debian("peervm", 2), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
        assert!(d.detail.contains("needs a disk of at least"), "{}", d.detail);
        // an image without a login user (minimal) takes the name the request gives
        assert!(check_request(&h.request(), CLEAR, &h.terms).is_ok(), "alice on the tiny image");
    }

    /// The harness's terms expose 2 ports per lease, from 1024 up.
    #[test]
    fn more_exposed_ports_than_offered_or_a_privileged_one_is_invalid_spec() {
        let h = Harness::new();
        let expose = |ports: &[u16]| LeaseRequest {
            spec: GuestSpec { expose: ports.to_vec(), ..h.request().spec },
            ..h.request()
        };
        assert!(check_request(&expose(&[8000, 8443]), CLEAR, &h.terms).is_ok());
        let d = check_request(&expose(&[8000, 8001, 8002]), CLEAR, &h.terms).unwrap_err();
        assert_eq!(
            (d.reason, d.detail.as_str()),
            (DenyReason::InvalidSpec, "3 exposed ports asked; this provider exposes at most 2")
        );
        let d = check_request(&expose(&[443]), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
        assert!(d.detail.contains("below 1024"), "{}", d.detail);
        for bad in [&[22][..], &[0], &[8000, 8000]] {
            assert_eq!(reason(check_request(&expose(bad), CLEAR, &h.terms)), DenyReason::InvalidSpec, "{bad:?}");
        }
        let mut open = h.terms.clone();
        open.expose_privileged = true;
        assert!(check_request(&expose(&[443]), CLEAR, &open).is_ok());
    }

    /// A disk larger than the lease is refused whatever the manifest says (here nothing,
    /// as in `minimal`): the size is the disk header's, and the detail gives both sizes.
    #[test]
    fn an_image_whose_disk_is_larger_than_the_leased_disk_is_invalid_spec_naming_both_sizes() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let disk = peervm_vmm::disk_header::qcow2_v3_header((2u64 << 30) + 1);
        std::fs::write(dir.path().join("disk"), &disk).unwrap();
        let manifest = serde_json::json!({
            "name": "big", "kernel": "disk", "initrd": "disk", "disk": "disk",
            "files": [{"path": "disk", "sha256": hex::encode(Sha256::digest(&disk)), "size": disk.len()}],
        });
        std::fs::write(dir.path().join("manifest.json"), manifest.to_string()).unwrap();
        let image = Arc::new(GuestImage::open(dir.path()).unwrap());
        let h = Harness::build(|t| _ = t.images.insert("big".into(), image.clone()), |_| {});
        let big = |disk_gib: u64| LeaseRequest {
            spec: GuestSpec { image_name: "big".into(), image_sha256: image.sha256(), disk_gib, ..h.request().spec },
            ..h.request()
        };
        let d = check_request(&big(2), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
        assert_eq!(
            d.detail,
            "image big needs a disk of at least 2147483649 bytes (2.00 GiB, the size of its disk); the lease asks \
             for 2147483648 bytes (2.00 GiB)"
        );
        assert!(check_request(&big(3), CLEAR, &h.terms).is_ok());
    }

    #[test]
    fn a_stock_image_is_offered_by_its_file_sha256_and_takes_no_disk_smaller_than_its_virtual_size() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        // what the qcow2 header says, not the file's size, is what the guest's disk holds
        let disk = peervm_vmm::disk_header::qcow2_v3_header((2u64 << 30) + 1);
        let file = dir.path().join("debian-12-genericcloud-amd64.qcow2");
        std::fs::write(&file, &disk).unwrap();
        let stock = peervm_vmm::StockImage {
            name: "debian-12-genericcloud".into(),
            file,
            sha256: Sha256::digest(&disk).into(),
            format: peervm_vmm::DiskFormat::Qcow2,
            firmware: peervm_vmm::Firmware::Bios,
            login_user: "peervm".into(),
            boot_deadline: std::time::Duration::from_secs(300),
        };
        let image = Arc::new(GuestImage::open_stock(&stock).unwrap());
        let h = Harness::build(|t| _ = t.images.insert("debian-12-genericcloud".into(), image.clone()), |_| {});
        let lease = |disk_gib: u64| LeaseRequest {
            ssh_user: "peervm".into(),
            spec: GuestSpec {
                image_name: "debian-12-genericcloud".into(),
                image_sha256: stock.sha256,
                disk_gib,
                ..h.request().spec
            },
            ..h.request()
        };
        assert!(check_request(&lease(3), CLEAR, &h.terms).is_ok());
        let d = check_request(&lease(2), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
        assert!(d.detail.contains("needs a disk of at least 2147483649 bytes"), "{}", d.detail);
        let d = check_request(&lease(1), CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::InvalidSpec);
    }

    #[test]
    fn an_image_not_offered_or_with_another_sha256_is_unknown_image() {
        let h = Harness::new();
        let req = h.request();
        let other_name =
            LeaseRequest { spec: GuestSpec { image_name: "debian".into(), ..req.spec.clone() }, ..h.request() };
        let d = check_request(&other_name, CLEAR, &h.terms).unwrap_err();
        assert_eq!((d.reason, d.detail.as_str()), (DenyReason::UnknownImage, "no image `debian` here"));
        let other_sha = LeaseRequest { spec: GuestSpec { image_sha256: [1; 32], ..req.spec.clone() }, ..h.request() };
        let d = check_request(&other_sha, CLEAR, &h.terms).unwrap_err();
        assert_eq!(d.reason, DenyReason::UnknownImage);
        assert!(d.detail.contains("different sha256"), "{}", d.detail);
    }

    #[test]
    fn memory_below_64_mib_or_beyond_u32_is_invalid_spec() {
        let h = Harness::new();
        for (mib, ok) in [(63, false), (64, true), (u64::from(u32::MAX) + 1, false)] {
            let req = LeaseRequest { spec: GuestSpec { memory_mib: mib, ..h.request().spec }, ..h.request() };
            let result = check_request(&req, CLEAR, &h.terms);
            match ok {
                true => assert!(result.is_ok(), "{mib} MiB"),
                false => assert_eq!(reason(result), DenyReason::InvalidSpec, "{mib} MiB"),
            }
        }
    }

    #[test]
    fn a_size_whose_price_overflows_is_invalid_spec() {
        let h = Harness::new();
        let mut terms = h.terms.clone();
        terms.pricing.per_disk_gib_hour_micros = u64::MAX;
        let req = LeaseRequest { spec: GuestSpec { disk_gib: 2, ..h.request().spec }, ..h.request() };
        let d = check_request(&req, CLEAR, &terms).unwrap_err();
        assert_eq!((d.reason, d.detail.as_str()), (DenyReason::InvalidSpec, "the requested size overflows the price"));
    }

    #[test]
    fn the_price_must_be_met_in_the_provider_currency() {
        let h = Harness::new();
        // 1 vCPU x 1000 + 256 MiB x 512/GiB + 1 GiB x 10
        let price = 1000 + 128 + 10;
        let exact = LeaseRequest { max_price_per_hour_micros: price, ..h.request() };
        let plan = check_request(&exact, CLEAR, &h.terms).unwrap();
        assert_eq!(plan.price_per_hour_micros, price);
        assert!(Arc::ptr_eq(&plan.image, &h.image));
        let short = LeaseRequest { max_price_per_hour_micros: price - 1, ..h.request() };
        assert_eq!(reason(check_request(&short, CLEAR, &h.terms)), DenyReason::PriceTooLow);
        let usd = LeaseRequest { currency: "USD".into(), ..exact };
        assert_eq!(reason(check_request(&usd, CLEAR, &h.terms)), DenyReason::PriceTooLow);
    }

    #[test]
    fn capacity_fits_up_to_what_is_free_in_every_resource() {
        let free = ResourceAmounts { vcpus: 2, memory_mib: 512, disk_gib: 3 };
        assert_eq!(check_capacity(&free, &free), Ok(()));
        for want in [
            ResourceAmounts { vcpus: 3, ..free },
            ResourceAmounts { memory_mib: 513, ..free },
            ResourceAmounts { disk_gib: 4, ..free },
        ] {
            let d = check_capacity(&want, &free).unwrap_err();
            assert_eq!(d.reason, DenyReason::NoCapacity);
            assert_eq!(d.detail, "free now: 2 vCPU, 512 MiB memory, 3 GiB disk");
        }
    }

    #[test]
    fn free_capacity_is_the_total_minus_what_live_leases_hold_never_below_zero() {
        let spec = |vcpus, memory_mib, disk_gib| GuestSpec {
            expose: Vec::new(),
            vcpus,
            memory_mib,
            disk_gib,
            image_name: "tiny".into(),
            image_sha256: [0; 32],
        };
        let total = ResourceAmounts { vcpus: 4, memory_mib: 2048, disk_gib: 10 };
        assert_eq!(free_capacity(total, []), total);
        let held = [spec(1, 256, 1), spec(2, 1024, 4)];
        assert_eq!(free_capacity(total, &held), ResourceAmounts { vcpus: 1, memory_mib: 768, disk_gib: 5 });
        let over = [spec(5, 4096, 11)];
        assert_eq!(free_capacity(total, &over), ResourceAmounts { vcpus: 0, memory_mib: 0, disk_gib: 0 });
    }

    #[test]
    fn a_nonce_is_kept_past_its_validity_by_the_skew_and_a_minute() {
        assert_eq!(nonce_kept_until(T0), T0 + 90_000);
        assert_eq!(nonce_kept_until(u64::MAX), u64::MAX);
    }
}
