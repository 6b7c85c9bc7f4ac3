//! Where a lease's guest is, as the provider's grant says, and the checks that keep a
//! hostile grant from turning into an SSH option.

use std::net::IpAddr;
use std::path::PathBuf;

use super::SshError;

/// How to reach a lease's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key_path: PathBuf,
    pub host_key: [u8; 32],
    pub alias: String,
}

/// The name the pinned key is filed under (OpenSSH's HostKeyAlias) and the Host name in
/// `peervm ssh-config`: `peervm-<first 12 hex digits of the lease id>`.
pub fn host_alias(lease_hex: &str) -> String {
    let short: String = lease_hex.chars().take(12).collect();
    format!("peervm-{}", short.to_ascii_lowercase())
}

pub(super) fn check_word(what: &str, s: &str) -> Result<(), SshError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('-')
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(()) } else { Err(SshError::Target(format!("{what} {:?} is not a plain name", s.escape_debug()))) }
}

/// Checks what a provider's grant put into `target`: the host must be an IP address or a
/// DNS name, the user and alias plain names, the port not 0. [`exec`] checks this itself;
/// [`openssh_args`] and [`ssh_config_block`] quote what they write either way, so an
/// unchecked target makes a connection fail, never an injected option.
pub fn check_target(target: &SshTarget) -> Result<(), SshError> {
    let host = target.host.as_str();
    let dns_name = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        });
    if !dns_name && host.parse::<IpAddr>().is_err() {
        return Err(SshError::Target(format!(
            "host {:?} is neither an IP address nor a DNS name",
            host.escape_debug().to_string()
        )));
    }
    if target.port == 0 {
        return Err(SshError::Target("port 0".into()));
    }
    check_word("user", &target.user)?;
    check_word("host key alias", &target.alias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::requestor::ssh::fixtures::target;

    #[test]
    fn check_target_accepts_addresses_and_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = target(dir.path(), [1; 32]);
        for host in ["127.0.0.1", "::1", "2001:db8::5", "guest.example.org", "my_host-1"] {
            t.host = host.into();
            assert!(check_target(&t).is_ok(), "{host}");
        }
        for host in ["", "-oProxyCommand=x", "a b", "a..b", "x\ny", "host:22", "[::1]"] {
            t.host = host.into();
            assert!(matches!(check_target(&t), Err(SshError::Target(_))), "{host:?}");
        }
        t.host = "127.0.0.1".into();
        t.port = 0;
        assert!(check_target(&t).is_err());
        t.port = 22;
        t.user = "root;id".into();
        assert!(check_target(&t).is_err());
    }
}
