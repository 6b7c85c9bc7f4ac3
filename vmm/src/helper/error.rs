//! What can go wrong between the daemon and the VMM helper, as the daemon sees it.

use std::io;
use std::path::PathBuf;

use super::wire::Refusal;

#[derive(Debug, thiserror::Error)]
pub enum HelperError {
    #[error("cannot reach the VMM helper at {path}: {source}; {}", connect_hint(source))]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the connection to the VMM helper at {path} failed: {reason}")]
    Transport { path: PathBuf, reason: String },
    #[error("the VMM helper sent a reply this peervm cannot read: {0}")]
    BadReply(String),
    #[error("the VMM helper speaks protocol version {got}, this peervm {want}: run the same peervm for both")]
    Version { got: u32, want: u32 },
    #[error("the VMM helper refused the request ({}): {message}", reason.as_str())]
    Refused { reason: Refusal, message: String },
    #[error("the VMM helper: {0}")]
    Remote(String),
}

/// What to do about a socket that cannot be reached, by cause.
fn connect_hint(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::PermissionDenied => {
            "this user may not use it: run the daemon as the helper's --daemon-user (default peervm)"
        }
        _ => "start it (as root): peervm vmm-helper --config <provider.toml>, or systemctl start peervm-vmm",
    }
}
