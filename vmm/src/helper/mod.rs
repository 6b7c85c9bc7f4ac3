//! Privilege separation (docs/vmm.md "The VMM helper"; SECURITY.md "Privilege
//! separation"): the provider daemon, which parses everything that arrives from the
//! network, runs unprivileged and asks a small root helper for what needs privilege.
//!
//! - `wire`: frames, requests, replies and errors on the helper's Unix socket
//! - `policy`: the helper's checks on a request, made as if the daemon were hostile
//! - `ledger`: what the helper's guests hold, against the host's configured totals
//! - `server`: the helper's socket: peer credentials, frames, dispatch into a backend
//! - `client`: `HelperHypervisor`, the daemon's `Hypervisor` over that socket
//! - `error`: the daemon's view of what went wrong

mod client;
mod error;
mod ledger;
mod policy;
mod server;
pub mod wire;

pub use client::HelperHypervisor;
pub use error::HelperError;
pub use ledger::Amounts;
pub use policy::HelperPolicy;
pub use server::{HelperServer, bind};
