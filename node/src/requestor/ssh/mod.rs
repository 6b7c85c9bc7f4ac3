//! SSH for leased guests: the lease's key pair, the pinned host key (no trust on first
//! use: the key comes from the provider's signed grant, SECURITY.md invariant 6),
//! OpenSSH options and config, and a built-in client for `peervm exec`.
//!
//! Everything that reaches the guest uses the lease key only, with password and
//! keyboard-interactive login off (SECURITY.md invariant 5), and accepts exactly one
//! host key: the ed25519 key in the grant (invariant 6). OpenSSH gets it through a
//! known_hosts file of one line filed under a per-lease `HostKeyAlias`, so neither the
//! provider's address nor its port decide which key is accepted.
//!
//! `keys.rs`: the lease key pair; `target.rs`: where the guest is and its checks;
//! `openssh.rs`: what OpenSSH is given (known_hosts, a config block, arguments);
//! `exec.rs`: the built-in client; `shell_quote.rs`: `peervm exec`'s argv as one remote
//! command line.

mod exec;
#[cfg(test)]
mod fixtures;
mod keys;
mod openssh;
mod shell_quote;
mod target;
#[cfg(test)]
mod test_sshd;

use std::path::{Path, PathBuf};

pub use exec::{CONNECT_TIMEOUT, ExecOptions, exec, exec_with};
pub use keys::{LeaseKey, generate_key, host_key_line, load_key};
pub use openssh::{openssh_args, ssh_config_block, write_known_hosts};
pub use shell_quote::command_line;
pub use target::{SshTarget, check_target, host_alias};

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Key(String),
    /// A key that OpenSSH's format cannot carry or that does not parse; `what` names the
    /// key (and its file), the cause says why.
    #[error("{what}")]
    KeyFormat {
        what: String,
        #[source]
        source: russh::keys::ssh_key::Error,
    },
    #[error(
        "the guest presented the host key {presented}, but the provider's signed grant pinned {expected}; \
         refusing to connect (no credentials were sent)"
    )]
    HostKeyMismatch { expected: String, presented: String },
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: russh::Error,
    },
    #[error("cannot connect to {addr}: no SSH session within {secs} s")]
    ConnectTimeout { addr: String, secs: f64 },
    #[error("the guest refused the lease key for user `{user}`")]
    Auth { user: String },
    /// The lease's address, user or alias cannot be used safely (e.g. a host name with
    /// spaces or control characters from a provider's grant).
    #[error("unusable SSH target: {0}")]
    Target(String),
    #[error("ssh")]
    Protocol(#[source] russh::Error),
    #[error("ssh: the guest refused to run the command")]
    CommandRefused,
    #[error("the remote command ended without an exit status{}", .signal.as_ref().map(|s| format!(" (killed by {s})")).unwrap_or_default())]
    NoExitStatus { signal: Option<String> },
}

/// Maps an I/O error on `path` to [`SshError::Io`].
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SshError + '_ {
    move |source| SshError::Io { path: path.to_path_buf(), source }
}

/// `path` made absolute: it is stored with the lease and written into OpenSSH options,
/// which must not depend on the directory a later command runs in.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}
