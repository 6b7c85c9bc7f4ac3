//! The requestor's side of the market: the offers, a lease from request to SSH, and the
//! local store that remembers it (docs/architecture.md, "Requestor").

pub mod client;
pub mod db;
pub mod lease_end;
pub mod offers;
pub mod ssh;
pub mod wait_updates;
