//! SSH for leased guests: the lease's key pair, the pinned host key (no trust on first
//! use: the key comes from the provider's signed grant, invariant 6), OpenSSH options and
//! config, and a built-in client for `peervm exec`.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::secure_fs;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Key(String),
    #[error(
        "the guest's host key {presented} is not the one the provider's signed grant pinned ({expected}); refusing to connect"
    )]
    HostKeyMismatch { expected: String, presented: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the guest refused the lease key for user `{user}`")]
    Auth { user: String },
    #[error("ssh: {0}")]
    Protocol(String),
    #[error("the remote command ended without an exit status{}", .signal.as_ref().map(|s| format!(" (killed by signal {s})")).unwrap_or_default())]
    NoExitStatus { signal: Option<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SshError + '_ {
    move |source| SshError::Io { path: path.to_path_buf(), source }
}

/// A lease's SSH key pair on the requestor side.
#[derive(Debug, Clone)]
pub struct LeaseKey {
    pub private_path: PathBuf,
    pub public_raw: [u8; 32],
    /// `ssh-ed25519 AAAA... comment`
    pub public_line: String,
}

/// Creates `path` 0600 in the same call that creates it, and writes `data`.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SshError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    f.write_all(data).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn pub_path(path: &Path) -> PathBuf {
    PathBuf::from(format!("{}.pub", path.display()))
}

/// Makes a fresh ed25519 key pair: the private key (OpenSSH format) at `path`, 0600,
/// and the public key at `path.pub`. Refuses to overwrite either.
pub fn generate_key(path: &Path, comment: &str) -> Result<LeaseKey, SshError> {
    let seed: zeroize::Zeroizing<[u8; 32]> = zeroize::Zeroizing::new(rand::random());
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let pem = key.to_openssh(LineEnding::LF).map_err(|e| SshError::Key(format!("cannot encode the key: {e}")))?;
    let public_line = key.public_key().to_openssh().map_err(|e| SshError::Key(e.to_string()))?;
    let pubp = pub_path(path);
    if pubp.exists() {
        return Err(SshError::Io { path: pubp, source: std::io::ErrorKind::AlreadyExists.into() });
    }
    write_new(path, pem.as_bytes(), 0o600)?;
    write_new(&pubp, format!("{public_line}\n").as_bytes(), 0o644)?;
    let public_raw = ed25519_raw(key.public_key())?;
    Ok(LeaseKey { private_path: path.to_path_buf(), public_raw, public_line })
}

fn ed25519_raw(key: &PublicKey) -> Result<[u8; 32], SshError> {
    key.key_data()
        .ed25519()
        .map(|k| k.0)
        .ok_or_else(|| SshError::Key(format!("the key is {}, only ssh-ed25519 is accepted", key.algorithm())))
}

/// `--ssh-key PATH`: the user's own ed25519 private key. The public half comes from the
/// key itself when it is unencrypted, else from `PATH.pub`. Like OpenSSH, a private key
/// that group or others can read is refused.
pub fn load_key(path: &Path) -> Result<LeaseKey, SshError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(SshError::Key(format!(
            "{} has mode {:04o}: a private key must not be readable by others; fix it with: chmod 600 {}",
            path.display(),
            meta.permissions().mode() & 0o7777,
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let private = PrivateKey::from_openssh(text.trim())
        .map_err(|e| SshError::Key(format!("{} is not an OpenSSH private key: {e}", path.display())))?;
    if private.algorithm() != Algorithm::Ed25519 {
        return Err(SshError::Key(format!(
            "{} is an {} key; peervm leases take ssh-ed25519 keys only (ssh-keygen -t ed25519)",
            path.display(),
            private.algorithm()
        )));
    }
    // The public key is readable from an encrypted OpenSSH key too; the .pub file is
    // only a fallback.
    let public = private.public_key().clone();
    let public = if public.key_data().ed25519().is_some() {
        public
    } else {
        let pubp = pub_path(path);
        let line = std::fs::read_to_string(&pubp).map_err(io(&pubp))?;
        PublicKey::from_openssh(line.trim())
            .map_err(|e| SshError::Key(format!("{} is not an OpenSSH public key: {e}", pubp.display())))?
    };
    let public_raw = ed25519_raw(&public)?;
    let public_line = public.to_openssh().map_err(|e| SshError::Key(e.to_string()))?;
    Ok(LeaseKey { private_path: path.to_path_buf(), public_raw, public_line })
}

/// `ssh-ed25519 AAAA...` for a raw host key.
pub fn host_key_line(raw: &[u8; 32]) -> String {
    PublicKey::from(Ed25519PublicKey(*raw)).to_openssh().map(|s| s.trim_end().to_string()).unwrap_or_default()
}

/// The name the pinned key is filed under (OpenSSH's HostKeyAlias), so neither the
/// address nor the port of the guest matter to known_hosts.
pub fn host_alias(lease_hex: &str) -> String {
    format!("peervm-{}", &lease_hex[..lease_hex.len().min(12)])
}

/// Writes a known_hosts file that holds exactly the pinned key for `alias` (0600,
/// replaced atomically).
pub fn write_known_hosts(path: &Path, alias: &str, host_key: &[u8; 32]) -> Result<(), SshError> {
    let line = format!("{alias} {}\n", host_key_line(host_key));
    secure_fs::replace_private_file(path, line.as_bytes()).map_err(|e| SshError::Key(e.to_string()))
}

/// How to reach a lease's guest.
#[derive(Debug, Clone)]
pub struct SshTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub key_path: PathBuf,
    pub host_key: [u8; 32],
    pub alias: String,
}

fn ssh_options(target: &SshTarget, known_hosts: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("HostKeyAlias", target.alias.clone()),
        ("UserKnownHostsFile", known_hosts.display().to_string()),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("IdentitiesOnly", "yes".into()),
        ("PasswordAuthentication", "no".into()),
        ("KbdInteractiveAuthentication", "no".into()),
    ]
}

/// A Host block for ~/.ssh/config.
pub fn ssh_config_block(target: &SshTarget, known_hosts: &Path) -> String {
    let mut out = format!(
        "Host {}\n    HostName {}\n    Port {}\n    User {}\n    IdentityFile {}\n",
        target.alias,
        target.host,
        target.port,
        target.user,
        target.key_path.display()
    );
    for (k, v) in ssh_options(target, known_hosts) {
        out.push_str(&format!("    {k} {v}\n"));
    }
    out
}

/// Arguments for OpenSSH's `ssh`: the lease key, the pinned host key with strict
/// checking, no password, then `extra` (options or a remote command).
pub fn openssh_args(target: &SshTarget, known_hosts: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec!["-i".into(), target.key_path.display().to_string(), "-p".into(), target.port.to_string()];
    for (k, v) in ssh_options(target, known_hosts) {
        args.push("-o".into());
        args.push(format!("{k}={v}"));
    }
    // The caller's options go before the destination, the rest (a command) after it.
    const TAKES_VALUE: &[&str] =
        &["-o", "-L", "-R", "-D", "-l", "-F", "-J", "-W", "-E", "-b", "-c", "-m", "-w", "-S", "-O", "-B", "-e", "-I"];
    let mut rest = extra.iter();
    let mut command = Vec::new();
    while let Some(arg) = rest.next() {
        if !arg.starts_with('-') {
            command.push(arg.clone());
            command.extend(rest.cloned());
            break;
        }
        args.push(arg.clone());
        if TAKES_VALUE.contains(&arg.as_str())
            && let Some(value) = rest.next()
        {
            args.push(value.clone());
        }
    }
    args.push(format!("{}@{}", target.user, target.host));
    args.extend(command);
    args
}

struct PinnedHost {
    expected: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some("a certificate".into());
            return Ok(false);
        };
        if key.key_data() == self.expected.key_data() {
            return Ok(true);
        }
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(key.to_openssh().unwrap_or_else(|_| key.algorithm().to_string()));
        Ok(false)
    }
}

/// Runs `command` in the guest with the built-in client: the server must present the
/// pinned host key (checked before authentication), the lease key is the only
/// credential, remote stdout/stderr are copied as they arrive, and the remote exit status
/// is returned.
pub async fn exec(
    target: &SshTarget,
    command: &str,
    stdout: &mut (dyn AsyncWrite + Unpin + Send),
    stderr: &mut (dyn AsyncWrite + Unpin + Send),
) -> Result<u32, SshError> {
    let text = std::fs::read_to_string(&target.key_path).map_err(io(&target.key_path))?;
    let key = PrivateKey::from_openssh(text.trim())
        .map_err(|e| SshError::Key(format!("{}: {e}", target.key_path.display())))?;
    if key.is_encrypted() {
        return Err(SshError::Key(format!(
            "{} is passphrase-protected; use `peervm ssh` (OpenSSH and your agent) for it",
            target.key_path.display()
        )));
    }
    let expected = PublicKey::from(Ed25519PublicKey(target.host_key));
    let presented = Arc::new(Mutex::new(None));
    let handler = PinnedHost { expected: expected.clone(), presented: presented.clone() };
    let addr = format!("{}:{}", target.host, target.port);
    let config = Arc::new(client::Config { nodelay: true, ..Default::default() });
    let connected = tokio::time::timeout(CONNECT_TIMEOUT, client::connect(config, addr.as_str(), handler)).await;
    let mut handle = match connected {
        Err(_) => {
            return Err(SshError::Connect {
                addr,
                reason: format!("no SSH handshake in {}s", CONNECT_TIMEOUT.as_secs()),
            });
        }
        Ok(Err(e)) => {
            if let Some(p) = presented.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(SshError::HostKeyMismatch { expected: host_key_line(&target.host_key), presented: p });
            }
            return Err(SshError::Connect { addr, reason: e.to_string() });
        }
        Ok(Ok(h)) => h,
    };
    let auth = handle
        .authenticate_publickey(&target.user, PrivateKeyWithHashAlg::new(Arc::new(key), None))
        .await
        .map_err(|e| SshError::Protocol(e.to_string()))?;
    if !auth.success() {
        return Err(SshError::Auth { user: target.user.clone() });
    }
    let mut channel = handle.channel_open_session().await.map_err(|e| SshError::Protocol(e.to_string()))?;
    channel.exec(true, command).await.map_err(|e| SshError::Protocol(e.to_string()))?;
    channel.eof().await.map_err(|e| SshError::Protocol(e.to_string()))?;
    let mut status = None;
    let mut signal = None;
    while let Some(msg) = channel.wait().await {
        match msg {
            russh::ChannelMsg::Data { data } => {
                let _ = stdout.write_all(&data).await;
                let _ = stdout.flush().await;
            }
            russh::ChannelMsg::ExtendedData { data, .. } => {
                let _ = stderr.write_all(&data).await;
                let _ = stderr.flush().await;
            }
            russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
            russh::ChannelMsg::ExitSignal { signal_name, .. } => signal = Some(format!("{signal_name:?}")),
            _ => {}
        }
    }
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    status.ok_or(SshError::NoExitStatus { signal })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(dir: &Path, host_key: [u8; 32]) -> SshTarget {
        SshTarget {
            host: "127.0.0.1".into(),
            port: 2222,
            user: "peervm".into(),
            key_path: dir.join("id_ed25519"),
            host_key,
            alias: host_alias(&"ab".repeat(16)),
        }
    }

    #[test]
    fn generated_key_is_0600_round_trips_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let k = generate_key(&path, "peervm-lease-test").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(k.public_line.starts_with("ssh-ed25519 AAAA") && k.public_line.ends_with("peervm-lease-test"));
        let loaded = load_key(&path).unwrap();
        assert_eq!(loaded.public_raw, k.public_raw);
        assert!(generate_key(&path, "again").is_err(), "overwrote a key");
    }

    #[test]
    fn load_key_refuses_open_modes_and_non_ed25519_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        generate_key(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let junk = dir.path().join("junk");
        write_new(&junk, b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", 0o600).unwrap();
        assert!(load_key(&junk).unwrap_err().to_string().contains("not an OpenSSH private key"));
        assert!(load_key(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn known_hosts_pins_exactly_one_key_and_options_are_strict() {
        let dir = tempfile::tempdir().unwrap();
        let raw = *Ed25519Keypair::from_seed(&[5; 32]).public.as_ref();
        let kh = dir.path().join("known_hosts");
        let t = target(dir.path(), raw);
        write_known_hosts(&kh, &t.alias, &raw).unwrap();
        let text = std::fs::read_to_string(&kh).unwrap();
        assert_eq!(text, format!("peervm-abababababab {}\n", host_key_line(&raw)));
        assert_eq!(std::fs::metadata(&kh).unwrap().permissions().mode() & 0o777, 0o600);
        let block = ssh_config_block(&t, &kh);
        for want in ["StrictHostKeyChecking yes", "PasswordAuthentication no", "HostKeyAlias peervm-abababababab"] {
            assert!(block.contains(want), "{block}");
        }
        let args = openssh_args(&t, &kh, &["-o".into(), "BatchMode=yes".into(), "uname".into(), "-a".into()]);
        let dest = args.iter().position(|a| a == "peervm@127.0.0.1").unwrap();
        assert_eq!(&args[dest + 1..], ["uname", "-a"]);
        assert!(args[..dest].windows(2).any(|w| w[0] == "-o" && w[1] == "BatchMode=yes"), "{args:?}");
        assert!(args.contains(&"StrictHostKeyChecking=yes".to_string()));
        if Path::new("/usr/bin/ssh").exists() {
            // OpenSSH parses the options (-G prints the resulting config, connects nowhere).
            let mut g = vec!["-G".to_string()];
            g.extend(args[..dest + 1].iter().cloned());
            let out = std::process::Command::new("ssh").args(&g).output().unwrap();
            let conf = String::from_utf8_lossy(&out.stdout);
            assert!(
                conf.contains("stricthostkeychecking true") || conf.contains("stricthostkeychecking yes"),
                "{conf}"
            );
            assert!(conf.contains("passwordauthentication no"), "{conf}");
        }
    }
}
