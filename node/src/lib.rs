//! The peervm node: identity, the swarm and its advert store, the provider daemon, the
//! requestor's offers command, and (growing) leases and the admin API.

pub mod admin;
pub mod advert_store;
pub mod audit;
pub mod config;
pub mod doctor;
pub mod keystore;
pub mod lease;
pub mod metrics;
pub mod network;
pub mod offers;
pub mod paths;
pub mod provider;
pub mod requestor;
pub mod secure_fs;
pub mod startup;
pub mod units;
