//! Reachability from outside: what the provider's last port verification found (other
//! peers dialed its ports back, `/peervm/dialback/1`), shared by the daemon that runs
//! the check, the admin API that reports it and the advert that carries its summary.

use std::sync::{Arc, Mutex};

/// What the last port verification found, for `peervm provider status` and `doctor`.
pub type SharedReachability = Arc<Mutex<Option<serde_json::Value>>>;
