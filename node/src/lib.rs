//! The peervm node: identity, and (growing) the swarm, stores, leases and admin API.

pub mod keystore;
pub mod paths;
pub mod secure_fs;
