//! The provider's admin API (docs/architecture.md, "Admin API and audit"; SECURITY.md,
//! "Incident response"): a Unix socket, created 0600 inside the 0700 data directory, that
//! answers only connections from the provider's own user (the kernel's peer credentials,
//! checked on every connection), one JSON request and one JSON reply per line. Never on
//! TCP. Every call is rate limited and audited.
//!
//! `protocol.rs` holds the messages, `server.rs` the provider's side, `client.rs` the
//! operator's (`peervm provider status` and the other admin commands, `peervm doctor`).

mod client;
mod protocol;
mod server;

use std::path::{Path, PathBuf};

pub use client::call;
pub use protocol::{
    AdminReply, AdminRequest, AdminResult, Blocked, BlockedPeer, Isolated, LeaseEntry, LockState, NodeInfo, Published,
    Reloaded, StatusReport, Terminated, Transition, Unblocked,
};
pub use server::{ReloadCall, serve};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on the admin socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot reach the provider's admin socket {path}: {source} (is `peervm provider run` running with this data dir, as this user?)"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
    #[error("admin socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("admin socket {path}: cannot encode the request")]
    Request {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The reply line is not JSON, or not a reply to the request sent.
    #[error("admin socket {path}: bad answer {answer:?}")]
    BadAnswer {
        path: PathBuf,
        answer: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The socket of a provider's data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}
