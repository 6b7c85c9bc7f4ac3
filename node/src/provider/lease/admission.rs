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
        Some(img) if img.manifest_sha256() == req.spec.image_sha256 => img.clone(),
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
    // The hypervisor takes memory as u32 MiB; below 64 MiB no guest image boots.
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
