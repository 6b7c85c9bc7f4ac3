//! What the lease manager offers and enforces: the provider's config, resolved
//! (docs/architecture.md, "Provider daemon").

use std::collections::HashMap;
use std::sync::Arc;

use peervm_protocol::{Pricing, ResourceAmounts};
use peervm_vmm::{EgressPolicy, GuestImage};

#[derive(Debug, Clone)]
pub struct LeaseTerms {
    pub total: ResourceAmounts,
    pub pricing: Pricing,
    /// Offered images by name, verified at start; the advertised sha256 is the manifest's.
    pub images: HashMap<String, Arc<GuestImage>>,
    /// The host requestors connect to.
    pub ssh_host: String,
    /// Most leases at once (network slots).
    pub max_leases: u32,
    pub egress: EgressPolicy,
    /// Guest ports a lease may expose, and whether ports below 1024 may be among them.
    pub max_exposed_ports: u16,
    pub expose_privileged: bool,
    pub min_lease_secs: u64,
    pub max_lease_secs: u64,
}
