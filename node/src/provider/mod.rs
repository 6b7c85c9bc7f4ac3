//! The provider: `peervm provider run` and everything it runs (docs/architecture.md,
//! "Provider daemon").

pub mod abuse_config;
pub mod admin;
pub mod advert_chain;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod image_config;
pub mod kvm_diagnosis;
pub mod lease;
pub mod reachability;
pub mod reload;
pub mod vmm_backend;
pub mod vmm_helper;

pub use daemon::{Provider, ProviderError};

/// The provider's concrete lease manager: the daemon builds it, the admin API drives it.
pub type ProviderLeases = lease::LeaseManager<vmm_backend::VmmBackend>;
