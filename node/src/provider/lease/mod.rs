//! The provider's lease manager and its store (docs/architecture.md, "Leases" and
//! "Persistence").

pub mod db;
mod manager;

pub use manager::{LeaseError, LeaseManager, LeaseTerms, REQUEST_VALIDITY_MS, RecoveryReport};
