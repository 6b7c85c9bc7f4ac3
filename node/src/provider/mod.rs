//! The provider: `peervm provider run` and everything it runs (docs/architecture.md,
//! "Provider daemon").

pub mod admin;
pub mod audit;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod lease;

pub use daemon::{Provider, ProviderError, ProviderLeases};
