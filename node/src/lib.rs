//! The peervm node: the swarm and its advert store, the provider daemon, the requestor's
//! side of the market, and what they share. docs/architecture.md has the map.
//!
//! - [`network`]: the libp2p swarm, owned by one task; every protocol in its own module.
//! - [`provider`]: `peervm provider run`: the daemon, its config, the lease manager, the
//!   admin socket, the audit log and `peervm doctor`.
//! - [`requestor`]: offers, leases from the requestor's side, SSH to a leased guest.
//! - shared: [`advert_store`], [`clock`], [`keystore`], [`metrics`], [`paths`],
//!   [`secure_fs`], [`service_notify`], [`sqlite`], [`units`].

pub mod advert_store;
pub mod clock;
pub mod keystore;
pub mod metrics;
pub mod network;
pub mod paths;
pub mod provider;
pub mod requestor;
pub mod secure_fs;
pub mod service_notify;
pub mod sqlite;
pub mod units;
