//! The requestor side of a lease: its local store and the SSH client.

pub mod client;
pub mod db;
pub mod ssh;
