//! The provider's lease manager (DESIGN section 7 and 9).

pub mod db;
mod manager;

pub use manager::{LeaseError, LeaseManager, LeaseTerms, REQUEST_VALIDITY_MS, RecoveryReport};
