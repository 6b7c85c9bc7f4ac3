//! The provider's lease manager and its store (docs/architecture.md, "Leases" and
//! "Persistence"), one module per idea:
//!
//! - `manager`: the handle every task holds, its shared state and the run loop;
//! - `inbound`: one signed message in, one signed reply out;
//! - `admission`: the checks on a request, as pure functions; `request`: serving a
//!   request with them; `guest_start`: the start of an admitted lease's guest;
//! - `control`: the requestor's status, extend and terminate;
//! - `teardown`: ending a lease; `incident`: the operator's block and isolate;
//! - `monitor`: expiry and usage timers; `recovery`: the start after a restart;
//! - `abuse`: abuse detection's decision, as a pure function; `abuse_response`: acting
//!   on it (audit, metrics, throttle, isolate);
//! - `db`: the SQLite store every state change is committed to first.

pub mod abuse;
mod abuse_response;
mod admission;
mod control;
pub mod db;
mod denial;
#[cfg(test)]
mod fake_hypervisor;
mod guest_start;
mod inbound;
mod incident;
mod manager;
mod monitor;
mod recovery;
mod request;
mod teardown;
mod terms;
#[cfg(test)]
mod test_harness;

pub use admission::REQUEST_VALIDITY_MS;
pub use manager::{LeaseError, LeaseManager};
pub use recovery::RecoveryReport;
pub use terms::LeaseTerms;
