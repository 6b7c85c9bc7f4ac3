//! SSH for leased guests: the lease's key pair, the pinned host key (no trust on first
//! use: the key comes from the provider's signed grant, invariant 6), OpenSSH options and
//! config, and a built-in client for `peervm exec`.
//!
//! Everything that reaches the guest uses the lease key only, with password and
//! keyboard-interactive login off (invariant 5), and accepts exactly one host key: the
//! ed25519 key in the grant (invariant 6). OpenSSH gets it through a known_hosts file of
//! one line filed under a per-lease `HostKeyAlias`, so neither the provider's address nor
//! its port decide which key is accepted.

use std::borrow::Cow;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{Algorithm, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig, client};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use zeroize::Zeroizing;

use crate::secure_fs::{self, SecureFsError};

/// How long the built-in client may take to connect, agree on keys and authenticate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Key(String),
    #[error(
        "the guest presented the host key {presented}, but the provider's signed grant pinned {expected}; \
         refusing to connect (no credentials were sent)"
    )]
    HostKeyMismatch { expected: String, presented: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("the guest refused the lease key for user `{user}`")]
    Auth { user: String },
    /// The lease's address, user or alias cannot be used safely (e.g. a host name with
    /// spaces or control characters from a provider's grant).
    #[error("unusable SSH target: {0}")]
    Target(String),
    #[error("ssh: {0}")]
    Protocol(String),
    #[error("the remote command ended without an exit status{}", .signal.as_ref().map(|s| format!(" (killed by {s})")).unwrap_or_default())]
    NoExitStatus { signal: Option<String> },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SshError + '_ {
    move |source| SshError::Io { path: path.to_path_buf(), source }
}

/// A lease's SSH key pair on the requestor side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    pub private_path: PathBuf,
    pub public_raw: [u8; 32],
    /// `ssh-ed25519 AAAA... comment`
    pub public_line: String,
}

/// Creates `path` with `mode` in the same call that creates it (never an existing file)
/// and writes `data`; removes the file again if the write fails.
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SshError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    let written = f.write_all(data).and_then(|()| f.sync_all()).map_err(io(path));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `ssh-ed25519 AAAA... comment`, without the trailing space ssh-key leaves for an empty
/// comment.
fn public_line(key: &PublicKey) -> Result<String, SshError> {
    key.to_openssh()
        .map(|s| s.trim_end().to_string())
        .map_err(|e| SshError::Key(format!("cannot encode the public key: {e}")))
}

fn ed25519_raw(key: &PublicKey) -> Result<[u8; 32], SshError> {
    key.key_data()
        .ed25519()
        .map(|k| k.0)
        .ok_or_else(|| SshError::Key(format!("the key is {}, only ssh-ed25519 is accepted", key.algorithm())))
}

/// Makes a fresh ed25519 key pair: the private key (OpenSSH format) at `path`, created
/// 0600 by the call that creates it, and the public key at `path.pub`. Refuses to
/// overwrite either; the parent directory must exist.
pub fn generate_key(path: &Path, comment: &str) -> Result<LeaseKey, SshError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let pem = key.to_openssh(LineEnding::LF).map_err(|e| SshError::Key(format!("cannot encode the key: {e}")))?;
    let line = public_line(key.public_key())?;
    let public_raw = ed25519_raw(key.public_key())?;
    let pubp = pub_path(path);
    if pubp.exists() {
        return Err(SshError::Io { path: pubp, source: std::io::ErrorKind::AlreadyExists.into() });
    }
    write_new(path, pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pubp, format!("{line}\n").as_bytes(), 0o644) {
        // this call created the private key a moment ago: no key pair is left half-made
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(LeaseKey { private_path: absolute(path), public_raw, public_line: line })
}

/// Reads an OpenSSH ed25519 private key, refusing (like OpenSSH) a file that group or
/// others can access. The key may still be passphrase-protected.
fn read_private_key(path: &Path) -> Result<PrivateKey, SshError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(SshError::Key(format!("{} is not a file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SshError::Key(format!(
            "{} has mode {mode:04o}: a private key must not be accessible by group or others \
             (OpenSSH refuses it too); fix it with: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let text = text.trim();
    if text.starts_with("ssh-") || text.starts_with("ecdsa-") || text.starts_with("sk-") {
        return Err(SshError::Key(format!(
            "{} is a public key; give the private key (the file without .pub)",
            path.display()
        )));
    }
    if !text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let what = if text.starts_with("-----BEGIN RSA") {
            "an RSA key in PEM format"
        } else if text.starts_with("-----BEGIN EC") {
            "an ECDSA key in PEM format"
        } else if text.starts_with("-----BEGIN") {
            "a PEM file, not an OpenSSH private key"
        } else {
            "not an OpenSSH private key"
        };
        return Err(SshError::Key(format!(
            "{} is {what}; peervm takes ed25519 keys in OpenSSH format (ssh-keygen -t ed25519)",
            path.display()
        )));
    }
    let key = PrivateKey::from_openssh(text)
        .map_err(|e| SshError::Key(format!("{} is not a readable OpenSSH private key: {e}", path.display())))?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(SshError::Key(format!(
            "{} is an {} key; peervm takes ssh-ed25519 keys only (ssh-keygen -t ed25519)",
            path.display(),
            key.algorithm()
        )));
    }
    Ok(key)
}

/// `--ssh-key PATH`: the user's own ed25519 private key (OpenSSH format, passphrase or
/// not). The public half is the one stored in the key file, which OpenSSH keeps readable
/// in encrypted keys too; when `PATH.pub` exists it must hold the same key, and its line
/// (with its comment) is the one returned. A private key that group or others can access
/// is refused, as OpenSSH does.
pub fn load_key(path: &Path) -> Result<LeaseKey, SshError> {
    let private = read_private_key(path)?;
    let mut public = private.public_key().clone();
    let pubp = pub_path(path);
    match std::fs::read_to_string(&pubp) {
        Ok(line) => {
            let from_file = PublicKey::from_openssh(line.trim())
                .map_err(|e| SshError::Key(format!("{} is not an OpenSSH public key: {e}", pubp.display())))?;
            if from_file.key_data() != public.key_data() {
                return Err(SshError::Key(format!(
                    "{} does not hold the public key of {}; regenerate it with: ssh-keygen -y -f {} > {}",
                    pubp.display(),
                    path.display(),
                    path.display(),
                    pubp.display()
                )));
            }
            public = from_file;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SshError::Io { path: pubp, source: e }),
    }
    Ok(LeaseKey { private_path: absolute(path), public_raw: ed25519_raw(&public)?, public_line: public_line(&public)? })
}

/// `ssh-ed25519 AAAA...` for a raw ed25519 host key.
pub fn host_key_line(raw: &[u8; 32]) -> String {
    // Encoding a 32-byte ed25519 key cannot fail; an empty line would pin nothing, so
    // OpenSSH would refuse the guest rather than accept any key.
    public_line(&PublicKey::from(Ed25519PublicKey(*raw))).unwrap_or_default()
}

/// The name the pinned key is filed under (OpenSSH's HostKeyAlias) and the Host name in
/// `peervm ssh-config`: `peervm-<first 12 hex digits of the lease id>`.
pub fn host_alias(lease_hex: &str) -> String {
    let short: String = lease_hex.chars().take(12).collect();
    format!("peervm-{}", short.to_ascii_lowercase())
}

/// Writes a known_hosts file that holds exactly the pinned key for `alias`: 0600, and
/// replaced atomically when it exists.
pub fn write_known_hosts(path: &Path, alias: &str, host_key: &[u8; 32]) -> Result<(), SshError> {
    check_word("host key alias", alias)?;
    let line = format!("{alias} {}\n", host_key_line(host_key));
    secure_fs::replace_private_file(path, line.as_bytes()).map_err(|e| match e {
        SecureFsError::Io { path, source } => SshError::Io { path, source },
        other => SshError::Io { path: path.to_path_buf(), source: std::io::Error::other(other.to_string()) },
    })
}

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

fn check_word(what: &str, s: &str) -> Result<(), SshError> {
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

/// One argument of an OpenSSH configuration line (a config file line or `-o`): bare when
/// it is made of plain characters, else double-quoted with `"` and `\` escaped. Control
/// characters, which no quoting can carry, become `?`.
fn config_arg(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { '?' } else { c }).collect();
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-/@:+,%".contains(c)) {
        return s;
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// A file name for IdentityFile or UserKnownHostsFile: absolute (they are not relative
/// to the working directory in a config file) with `%` doubled (OpenSSH expands `%`
/// tokens in them), then quoted as [`config_arg`] does.
fn config_path(path: &Path) -> String {
    config_arg(&absolute(path).display().to_string().replace('%', "%%"))
}

/// The options that pin the host key and allow the lease key only, as (keyword, argument).
fn ssh_options(target: &SshTarget, known_hosts: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("IdentityFile", config_path(&target.key_path)),
        ("IdentitiesOnly", "yes".into()),
        ("HostKeyAlias", config_arg(&target.alias)),
        ("UserKnownHostsFile", config_path(known_hosts)),
        ("GlobalKnownHostsFile", "/dev/null".into()),
        ("StrictHostKeyChecking", "yes".into()),
        ("HostKeyAlgorithms", "ssh-ed25519".into()),
        ("UpdateHostKeys", "no".into()),
        ("PreferredAuthentications", "publickey".into()),
        ("PubkeyAuthentication", "yes".into()),
        ("PasswordAuthentication", "no".into()),
        ("KbdInteractiveAuthentication", "no".into()),
    ]
}

/// A Host block for ~/.ssh/config (Host is the alias): HostName, Port, User, then the
/// lease key as the only identity and the pinned host key as the only accepted one.
pub fn ssh_config_block(target: &SshTarget, known_hosts: &Path) -> String {
    let mut out = format!(
        "Host {}\n    HostName {}\n    Port {}\n    User {}\n",
        config_arg(&target.alias),
        config_arg(&target.host),
        target.port,
        config_arg(&target.user),
    );
    for (k, v) in ssh_options(target, known_hosts) {
        out.push_str(&format!("    {k} {v}\n"));
    }
    out
}

/// Options of OpenSSH's `ssh` that take an argument (its getopt string).
const SSH_OPTIONS_WITH_ARGUMENT: &str = "bceilmopBDEFIJLOPQRSwW";

/// Arguments for OpenSSH's `ssh`: `-p`, the options of [`ssh_config_block`] as `-o`
/// (the identity too: `-i` would not take a `%` in the name), the options at the start
/// of `extra`, `--`, `user@host`, then the rest of `extra` (a remote command).
///
/// The pinning options come first and ssh keeps the first value it is given for an
/// option, so `extra` cannot loosen them; `--` keeps a host or user from the grant from
/// being read as an option.
pub fn openssh_args(target: &SshTarget, known_hosts: &Path, extra: &[String]) -> Vec<String> {
    let mut args = vec!["-p".to_string(), target.port.to_string()];
    for (k, v) in ssh_options(target, known_hosts) {
        args.push("-o".into());
        args.push(format!("{k}={v}"));
    }
    let mut rest = extra.iter();
    let mut command = Vec::new();
    while let Some(arg) = rest.next() {
        if arg == "--" {
            command.extend(rest.by_ref().cloned());
            break;
        }
        if !arg.starts_with('-') || arg == "-" {
            command.push(arg.clone());
            command.extend(rest.by_ref().cloned());
            break;
        }
        args.push(arg.clone());
        // In a cluster such as `-vp`, the first letter that takes an argument takes the
        // rest of the cluster, or the next argument when it ends the cluster.
        if let Some((i, c)) = arg.char_indices().skip(1).find(|(_, c)| SSH_OPTIONS_WITH_ARGUMENT.contains(*c))
            && i + c.len_utf8() == arg.len()
            && let Some(value) = rest.next()
        {
            args.push(value.clone());
        }
    }
    args.push("--".into());
    args.push(format!("{}@{}", target.user, target.host));
    args.extend(command);
    args
}

/// Options for [`exec_with`].
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// Limit on connecting, the key exchange, authentication and starting the command.
    pub connect_timeout: Duration,
    /// Keepalives while the command runs; this many missed in a row end the session.
    pub keepalive_interval: Duration,
    pub keepalive_max: usize,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions { connect_timeout: CONNECT_TIMEOUT, keepalive_interval: Duration::from_secs(15), keepalive_max: 4 }
    }
}

/// Accepts the pinned host key and nothing else; remembers what a refused server showed.
struct PinnedHost {
    expected: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let presented = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } if key.key_data() == self.expected.key_data() => {
                return Ok(true);
            }
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                public_line(key).unwrap_or_else(|_| format!("a {} key", key.algorithm()))
            }
            // never asked for (no certificate algorithms are offered), never accepted
            _ => "a host certificate".into(),
        };
        *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(presented);
        Ok(false)
    }
}

fn describe_signal(sig: &Sig) -> String {
    let name = match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(s) => return format!("signal {}", printable(s)),
    };
    format!("SIG{name}")
}

/// Text from the guest for an error message: no control characters, bounded.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(80).collect()
}

fn protocol(e: russh::Error) -> SshError {
    SshError::Protocol(e.to_string())
}

/// Runs `command` in the guest with the built-in client and returns its exit status;
/// see [`exec_with`]. Local stdin is not forwarded: the command reads end-of-file.
pub async fn exec(
    target: &SshTarget,
    command: &str,
    stdout: &mut (dyn AsyncWrite + Unpin + Send),
    stderr: &mut (dyn AsyncWrite + Unpin + Send),
) -> Result<u32, SshError> {
    exec_with(target, command, None, stdout, stderr, &ExecOptions::default()).await
}

/// Runs `command` in the guest with the built-in client. The server must present the
/// pinned host key, which is checked during the key exchange, before any authentication
/// ([`SshError::HostKeyMismatch`] otherwise). The lease key is the only credential
/// (publickey; a passphrase-protected key is refused here, OpenSSH can use it). Remote
/// stdout and stderr are copied to `stdout` and `stderr` as they arrive, `stdin` (if any)
/// is sent to the command followed by end-of-file, and the remote exit status is returned.
pub async fn exec_with(
    target: &SshTarget,
    command: &str,
    stdin: Option<&mut (dyn AsyncRead + Unpin + Send)>,
    stdout: &mut (dyn AsyncWrite + Unpin + Send),
    stderr: &mut (dyn AsyncWrite + Unpin + Send),
    opts: &ExecOptions,
) -> Result<u32, SshError> {
    check_target(target)?;
    let key = read_private_key(&target.key_path)?;
    if key.is_encrypted() {
        return Err(SshError::Key(format!(
            "{} is passphrase-protected; `peervm ssh` (OpenSSH, with your agent) can use it",
            target.key_path.display()
        )));
    }
    let key = PrivateKeyWithHashAlg::new(Arc::new(key), None);
    let addr = match target.host.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", target.port),
        _ => format!("{}:{}", target.host, target.port),
    };
    let presented = Arc::new(Mutex::new(None));
    let handler =
        PinnedHost { expected: PublicKey::from(Ed25519PublicKey(target.host_key)), presented: presented.clone() };
    let config = Arc::new(client::Config {
        nodelay: true,
        // the guest's ed25519 key is the one pinned; no other host key type is asked for
        preferred: russh::Preferred { key: Cow::Owned(vec![Algorithm::Ed25519]), ..Default::default() },
        keepalive_interval: Some(opts.keepalive_interval),
        keepalive_max: opts.keepalive_max,
        ..Default::default()
    });

    // A refused host key ends the handshake with an error; the handler kept what it saw.
    let connect_error = |e: russh::Error| match presented.lock().unwrap_or_else(|p| p.into_inner()).take() {
        Some(p) => SshError::HostKeyMismatch { expected: host_key_line(&target.host_key), presented: p },
        None => SshError::Connect { addr: addr.clone(), reason: e.to_string() },
    };
    let start = async {
        let mut handle =
            client::connect(config, (target.host.as_str(), target.port), handler).await.map_err(connect_error)?;
        let auth = handle.authenticate_publickey(target.user.as_str(), key).await.map_err(protocol)?;
        if !auth.success() {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
            return Err(SshError::Auth { user: target.user.clone() });
        }
        let channel = handle.channel_open_session().await.map_err(protocol)?;
        channel.exec(true, command).await.map_err(protocol)?;
        Ok((handle, channel))
    };
    let (handle, channel) = match tokio::time::timeout(opts.connect_timeout, start).await {
        Ok(started) => started?,
        Err(_) => {
            return Err(SshError::Connect {
                addr,
                reason: format!("no SSH session within {} s", opts.connect_timeout.as_secs_f64()),
            });
        }
    };

    let (mut from_guest, to_guest) = channel.split();
    let send_stdin = async {
        if let Some(input) = stdin {
            to_guest.data(input).await?;
        }
        to_guest.eof().await
    };
    let mut send_stdin = std::pin::pin!(send_stdin);
    let mut stdin_done = false;
    let mut status = None;
    let mut signal = None;
    let mut refused = false;
    // A local writer that fails (a closed pipe) is dropped from then on; the command's
    // exit status is still worth waiting for.
    let (mut out_ok, mut err_ok) = (true, true);
    loop {
        let msg = tokio::select! {
            sent = &mut send_stdin, if !stdin_done => {
                stdin_done = true;
                // fails only when the channel is gone, which the loop sees next
                let _ = sent;
                continue;
            }
            msg = from_guest.wait() => msg,
        };
        match msg {
            Some(ChannelMsg::Data { data }) if out_ok => {
                out_ok = stdout.write_all(&data).await.is_ok() && stdout.flush().await.is_ok();
            }
            Some(ChannelMsg::ExtendedData { data, .. }) if err_ok => {
                err_ok = stderr.write_all(&data).await.is_ok() && stderr.flush().await.is_ok();
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(ChannelMsg::ExitSignal { signal_name, core_dumped, error_message, .. }) => {
                let mut s = describe_signal(&signal_name);
                if core_dumped {
                    s.push_str(", core dumped");
                }
                let detail = printable(&error_message);
                if !detail.is_empty() {
                    s.push_str(&format!(": {detail}"));
                }
                signal = Some(s);
            }
            Some(ChannelMsg::Failure) if status.is_none() => refused = true,
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
        if refused {
            break;
        }
    }
    let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
    if refused {
        return Err(SshError::Protocol("the guest refused to run the command".into()));
    }
    status.ok_or(SshError::NoExitStatus { signal })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use russh::keys::EcdsaCurve;
    use russh::keys::ssh_key::rand_core::{Infallible, TryCryptoRng, TryRng};
    use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
    use russh::{Channel, ChannelId};

    use super::*;

    /// The OS generator for ssh-key's rand_core (this crate's `rand` is another version).
    struct TestRng;

    impl TryRng for TestRng {
        type Error = Infallible;
        fn try_next_u32(&mut self) -> Result<u32, Infallible> {
            Ok(rand::random())
        }
        fn try_next_u64(&mut self) -> Result<u64, Infallible> {
            Ok(rand::random())
        }
        fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
            rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, dst);
            Ok(())
        }
    }

    impl TryCryptoRng for TestRng {}

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

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generated_key_is_0600_parses_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let k = generate_key(&path, "peervm-lease-test").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(k.private_path, path);
        assert!(k.public_line.starts_with("ssh-ed25519 AAAA") && k.public_line.ends_with(" peervm-lease-test"));
        let pub_text = std::fs::read_to_string(pub_path(&path)).unwrap();
        assert_eq!(pub_text, format!("{}\n", k.public_line));
        let parsed = PublicKey::from_openssh(pub_text.trim()).unwrap();
        assert_eq!(parsed.key_data().ed25519().unwrap().0, k.public_raw);
        let private = PrivateKey::from_openssh(std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(private.public_key().key_data(), parsed.key_data());

        let before = std::fs::read(&path).unwrap();
        assert!(matches!(generate_key(&path, "again"), Err(SshError::Io { .. })), "overwrote a key");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // a stray .pub alone also stops it, and no private key is left behind
        let other = dir.path().join("other");
        std::fs::write(pub_path(&other), "x").unwrap();
        assert!(generate_key(&other, "x").is_err());
        assert!(!other.exists());
        // the parent must exist
        assert!(generate_key(&dir.path().join("missing/id"), "x").is_err());
    }

    #[test]
    fn load_key_round_trips_generated_and_encrypted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let k = generate_key(&path, "peervm-lease-test").unwrap();
        assert_eq!(load_key(&path).unwrap(), k);
        // without the .pub file the key file alone is enough
        std::fs::remove_file(pub_path(&path)).unwrap();
        assert_eq!(load_key(&path).unwrap().public_raw, k.public_raw);

        // a passphrase-protected key: the public half is readable without the passphrase
        let mut plain = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
        plain.set_comment("me@laptop");
        let encrypted = plain.encrypt(&mut TestRng, "secret").unwrap();
        let enc_path = dir.path().join("id_enc");
        write_new(&enc_path, encrypted.to_openssh(LineEnding::LF).unwrap().as_bytes(), 0o600).unwrap();
        let loaded = load_key(&enc_path).unwrap();
        assert_eq!(loaded.public_raw, *Ed25519Keypair::from_seed(&[9; 32]).public.as_ref());
        // its .pub supplies the comment, and must be the same key
        write_new(&pub_path(&enc_path), format!("{}\n", public_line(plain.public_key()).unwrap()).as_bytes(), 0o644)
            .unwrap();
        assert!(load_key(&enc_path).unwrap().public_line.ends_with(" me@laptop"));
        std::fs::write(pub_path(&enc_path), format!("{}\n", k.public_line)).unwrap();
        let err = load_key(&enc_path).unwrap_err().to_string();
        assert!(err.contains("does not hold the public key"), "{err}");
    }

    #[test]
    fn load_key_refuses_open_modes_other_algorithms_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        generate_key(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, SshError::Key(_)) && err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_key(&path).is_err());

        let ecdsa = PrivateKey::random(&mut TestRng, Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 }).unwrap();
        let ecdsa_path = dir.path().join("id_ecdsa");
        write_new(&ecdsa_path, ecdsa.to_openssh(LineEnding::LF).unwrap().as_bytes(), 0o600).unwrap();
        let err = load_key(&ecdsa_path).unwrap_err().to_string();
        assert!(err.contains("ecdsa-sha2-nistp256") && err.contains("ssh-ed25519 keys only"), "{err}");

        let rsa_pem = dir.path().join("id_rsa");
        write_new(&rsa_pem, b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", 0o600).unwrap();
        assert!(load_key(&rsa_pem).unwrap_err().to_string().contains("RSA key in PEM format"));

        let public_only = dir.path().join("given_pub");
        write_new(&public_only, std::fs::read(pub_path(&path)).unwrap().as_slice(), 0o600).unwrap();
        assert!(load_key(&public_only).unwrap_err().to_string().contains("is a public key"));

        let missing = dir.path().join("missing");
        match load_key(&missing) {
            Err(SshError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn known_hosts_pins_exactly_one_key_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let raw = *Ed25519Keypair::from_seed(&[5; 32]).public.as_ref();
        let kh = dir.path().join("known_hosts");
        let t = target(dir.path(), raw);
        assert_eq!(t.alias, "peervm-abababababab");
        write_known_hosts(&kh, &t.alias, &raw).unwrap();
        let line = host_key_line(&raw);
        assert!(line.starts_with("ssh-ed25519 AAAA") && !line.ends_with(' '), "{line:?}");
        assert_eq!(PublicKey::from_openssh(&line).unwrap().key_data().ed25519().unwrap().0, raw);
        assert_eq!(std::fs::read_to_string(&kh).unwrap(), format!("peervm-abababababab {line}\n"));
        assert_eq!(mode(&kh), 0o600);
        // replaced, still 0600, still one line
        let raw2 = *Ed25519Keypair::from_seed(&[6; 32]).public.as_ref();
        write_known_hosts(&kh, &t.alias, &raw2).unwrap();
        assert_eq!(std::fs::read_to_string(&kh).unwrap(), format!("peervm-abababababab {}\n", host_key_line(&raw2)));
        assert_eq!(mode(&kh), 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "a temporary file was left behind");
        assert!(matches!(write_known_hosts(&kh, "a b\n*", &raw), Err(SshError::Target(_))));
    }

    #[test]
    fn ssh_config_and_openssh_args_are_strict() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let t = target(dir.path(), [5; 32]);
        let block = ssh_config_block(&t, &kh);
        let key = t.key_path.display().to_string();
        let khs = kh.display().to_string();
        for want in [
            "Host peervm-abababababab\n",
            "    HostName 127.0.0.1\n",
            "    Port 2222\n",
            "    User peervm\n",
            &format!("    IdentityFile {key}\n"),
            "    IdentitiesOnly yes\n",
            "    HostKeyAlias peervm-abababababab\n",
            &format!("    UserKnownHostsFile {khs}\n"),
            "    StrictHostKeyChecking yes\n",
            "    PasswordAuthentication no\n",
            "    KbdInteractiveAuthentication no\n",
        ] {
            assert!(block.contains(want), "{want:?} missing from\n{block}");
        }
        assert!(block.starts_with("Host "));

        let args = openssh_args(&t, &kh, &[]);
        assert_eq!(&args[args.len() - 2..], ["--", "peervm@127.0.0.1"]);
        let opt = |args: &[String], o: &str| args.windows(2).any(|w| w[0] == "-o" && w[1] == o);
        for o in [
            "StrictHostKeyChecking=yes",
            "PasswordAuthentication=no",
            "KbdInteractiveAuthentication=no",
            "IdentitiesOnly=yes",
            "HostKeyAlias=peervm-abababababab",
            &format!("UserKnownHostsFile={khs}"),
            &format!("IdentityFile={key}"),
        ] {
            assert!(opt(&args, o), "{o} missing from {args:?}");
        }
        assert!(args.windows(2).any(|w| w[0] == "-p" && w[1] == "2222"));

        // the caller's options go before the destination, a command after it
        let extra: Vec<String> = ["-v", "-L", "8080:localhost:80", "-tp2200", "uname", "-a"].map(String::from).into();
        let args = openssh_args(&t, &kh, &extra);
        let dest = args.iter().position(|a| a == "peervm@127.0.0.1").unwrap();
        assert_eq!(args[dest - 1], "--");
        assert_eq!(&args[dest + 1..], ["uname", "-a"]);
        assert!(args[..dest].windows(2).any(|w| w[0] == "-L" && w[1] == "8080:localhost:80"), "{args:?}");
        assert!(args[..dest].contains(&"-tp2200".to_string()) && args[..dest].contains(&"-v".to_string()));
        let args = openssh_args(&t, &kh, &["-o".into(), "BatchMode=yes".into(), "--".into(), "-x".into()]);
        assert_eq!(&args[args.len() - 3..], ["--", "peervm@127.0.0.1", "-x"]);
        assert!(opt(&args, "BatchMode=yes"));

        // hostile values from a grant cannot add lines or options
        let mut bad = t.clone();
        bad.host = "1.2.3.4\n    ProxyCommand evil".into();
        bad.user = "-oProxyCommand=evil".into();
        let block = ssh_config_block(&bad, &kh);
        assert!(!block.lines().any(|l| l.trim_start().starts_with("ProxyCommand")), "{block}");
        assert!(block.contains("    HostName \"1.2.3.4?    ProxyCommand evil\"\n"), "{block}");
        assert!(matches!(check_target(&bad), Err(SshError::Target(_))));
        let args = openssh_args(&bad, &kh, &[]);
        assert_eq!(args[args.len() - 2], "--");

        // awkward local file names are quoted, and % is not taken for a token
        assert_eq!(config_path(Path::new("/a b/k%h\"x")), "\"/a b/k%%h\\\"x\"");
        assert_eq!(config_arg("peervm-abc"), "peervm-abc");
    }

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

    #[test]
    fn openssh_parses_the_arguments() {
        // OpenSSH's own parser (-G prints the resulting configuration and connects to
        // nothing). CI installs openssh-client; without ssh this test has nothing to ask.
        let probe = std::process::Command::new("ssh").arg("-V").output();
        if probe.is_err() {
            eprintln!("ssh not installed; skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().join("lease dir");
        std::fs::create_dir(&spaced).unwrap();
        let kh = spaced.join("known_hosts");
        let mut t = target(&spaced, [5; 32]);
        generate_key(&t.key_path, "x").unwrap();
        t.port = 2200;
        let mut args = vec!["-G".to_string(), "-F".into(), "/dev/null".into()];
        args.extend(openssh_args(&t, &kh, &["-o".into(), "StrictHostKeyChecking=no".into(), "true".into()]));
        let out = std::process::Command::new("ssh").args(&args).output().unwrap();
        let conf = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}\n{conf}", String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = conf.lines().collect();
        for want in [
            "hostname 127.0.0.1",
            "port 2200",
            "user peervm",
            "stricthostkeychecking true",
            "passwordauthentication no",
            "kbdinteractiveauthentication no",
            "identitiesonly yes",
            "hostkeyalias peervm-abababababab",
            "hostkeyalgorithms ssh-ed25519",
            "globalknownhostsfile /dev/null",
            &format!("userknownhostsfile {}", kh.display()),
            &format!("identityfile {}", t.key_path.display()),
        ] {
            // OpenSSH versions print `yes` or `true` for StrictHostKeyChecking=yes
            let alt = want.replace("stricthostkeychecking true", "stricthostkeychecking yes");
            assert!(lines.contains(&want) || lines.contains(&alt.as_str()), "{want:?} missing from\n{conf}");
        }
    }

    // ---- a real SSH server (russh::server) for the built-in client ----

    #[derive(Clone)]
    struct TestServer {
        authorized: PublicKey,
        auth_attempts: Arc<AtomicUsize>,
        cat: Option<ChannelId>,
    }

    impl TestServer {
        fn attempt(&self) {
            self.auth_attempts.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl server::Handler for TestServer {
        type Error = russh::Error;

        async fn auth_none(&mut self, _user: &str) -> Result<Auth, Self::Error> {
            self.attempt();
            Ok(Auth::reject())
        }

        async fn auth_password(&mut self, _user: &str, _password: &str) -> Result<Auth, Self::Error> {
            self.attempt();
            Ok(Auth::reject())
        }

        async fn auth_publickey_offered(
            &mut self,
            _user: &str,
            offer: PublicKeyOffer<'_>,
        ) -> Result<Auth, Self::Error> {
            self.attempt();
            Ok(if offer.public_key.key_data() == self.authorized.key_data() { Auth::Accept } else { Auth::reject() })
        }

        async fn auth_publickey(&mut self, user: &str, key: VerifiedPublicKey<'_>) -> Result<Auth, Self::Error> {
            self.attempt();
            let ok = user == "peervm" && key.public_key.key_data() == self.authorized.key_data();
            Ok(if ok { Auth::Accept } else { Auth::reject() })
        }

        async fn channel_open_session(
            &mut self,
            _channel: Channel<Msg>,
            reply: server::ChannelOpenHandle,
            _session: &mut Session,
        ) -> Result<(), Self::Error> {
            reply.accept().await;
            Ok(())
        }

        /// A tiny fixed command set standing in for a shell.
        async fn exec_request(
            &mut self,
            channel: ChannelId,
            data: &[u8],
            session: &mut Session,
        ) -> Result<(), Self::Error> {
            match data {
                b"echo hi; echo oops >&2; exit 3" => {
                    session.channel_success(channel)?;
                    session.data(channel, &b"hi\n"[..])?;
                    session.extended_data(channel, 1, &b"oops\n"[..])?;
                    session.exit_status_request(channel, 3)?;
                }
                b"kill -9 $$" => {
                    session.channel_success(channel)?;
                    session.exit_signal_request(channel, Sig::KILL, false, "", "")?;
                }
                b"cat" => {
                    session.channel_success(channel)?;
                    self.cat = Some(channel);
                    return Ok(());
                }
                _ => {
                    session.channel_failure(channel)?;
                    return Ok(());
                }
            }
            session.eof(channel)?;
            session.close(channel)
        }

        async fn data(&mut self, channel: ChannelId, data: &[u8], session: &mut Session) -> Result<(), Self::Error> {
            if self.cat == Some(channel) {
                session.data(channel, data.to_vec())?;
            }
            Ok(())
        }

        async fn channel_eof(&mut self, channel: ChannelId, session: &mut Session) -> Result<(), Self::Error> {
            if self.cat == Some(channel) {
                session.exit_status_request(channel, 0)?;
                session.eof(channel)?;
                session.close(channel)?;
            }
            Ok(())
        }
    }

    struct Guest {
        port: u16,
        host_key: [u8; 32],
        auth_attempts: Arc<AtomicUsize>,
        /// Ends when the server's first session has ended.
        session: tokio::task::JoinHandle<()>,
    }

    /// Listens on 127.0.0.1:0 and serves one SSH session with `host_key`, accepting only
    /// `authorized` for user `peervm`.
    async fn start_guest(host_key: PrivateKey, authorized: PublicKey) -> Guest {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let raw = host_key.public_key().key_data().ed25519().unwrap().0;
        let config = Arc::new(server::Config {
            keys: vec![host_key],
            auth_rejection_time: Duration::from_millis(10),
            auth_rejection_time_initial: Some(Duration::ZERO),
            inactivity_timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        });
        let auth_attempts = Arc::new(AtomicUsize::new(0));
        let handler = TestServer { authorized, auth_attempts: auth_attempts.clone(), cat: None };
        let session = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            if let Ok(running) = server::run_stream(config, socket, handler).await {
                let _ = running.await;
            }
        });
        Guest { port, host_key: raw, auth_attempts, session }
    }

    /// Every exec in these tests ends in seconds; a hang is a failure.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(30), f).await.expect("exec hung")
    }

    fn ed25519(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    /// A lease key on disk and a target for `guest`.
    fn lease_for(dir: &Path, guest: &Guest) -> (SshTarget, LeaseKey) {
        let key = generate_key(&dir.join("id_ed25519"), "peervm-lease-test").unwrap();
        let mut t = target(dir, guest.host_key);
        t.port = guest.port;
        (t, key)
    }

    fn lease_public(key: &LeaseKey) -> PublicKey {
        PublicKey::from(Ed25519PublicKey(key.public_raw))
    }

    async fn guest_with_lease_key(dir: &Path, host_seed: u8) -> (Guest, SshTarget) {
        // the lease key exists before the guest: the provider puts it in user-data
        let key = generate_key(&dir.join("id_ed25519"), "peervm-lease-test").unwrap();
        let guest = start_guest(ed25519(host_seed), lease_public(&key)).await;
        let mut t = target(dir, guest.host_key);
        t.port = guest.port;
        (guest, t)
    }

    #[tokio::test]
    async fn exec_returns_output_and_exit_status() {
        let dir = tempfile::tempdir().unwrap();
        let (guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let status = within(exec(&t, "echo hi; echo oops >&2; exit 3", &mut out, &mut err)).await.unwrap();
        assert_eq!(status, 3);
        assert_eq!(out, b"hi\n");
        assert_eq!(err, b"oops\n");
        assert!(guest.auth_attempts.load(Ordering::SeqCst) >= 1);
    }

    #[tokio::test]
    async fn exec_forwards_stdin_then_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut input: &[u8] = b"line one\nline two\n";
        let status =
            within(exec_with(&t, "cat", Some(&mut input), &mut out, &mut err, &ExecOptions::default())).await.unwrap();
        assert_eq!(status, 0);
        assert_eq!(out, b"line one\nline two\n");
        // without stdin the command reads end-of-file at once
        let dir = tempfile::tempdir().unwrap();
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let mut out = Vec::new();
        assert_eq!(within(exec(&t, "cat", &mut out, &mut err)).await.unwrap(), 0);
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn exec_reports_a_signal_and_a_refused_command() {
        let dir = tempfile::tempdir().unwrap();
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let (mut out, mut err) = (Vec::new(), Vec::new());
        match within(exec(&t, "kill -9 $$", &mut out, &mut err)).await {
            Err(SshError::NoExitStatus { signal: Some(s) }) => assert_eq!(s, "SIGKILL"),
            other => panic!("{other:?}"),
        }
        let dir = tempfile::tempdir().unwrap();
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        assert!(matches!(within(exec(&t, "no such command", &mut out, &mut err)).await, Err(SshError::Protocol(_))));
    }

    #[tokio::test]
    async fn exec_refuses_another_host_key_before_authenticating() {
        let dir = tempfile::tempdir().unwrap();
        let (guest, mut t) = guest_with_lease_key(dir.path(), 1).await;
        let shown = guest.host_key;
        // the grant pinned another key than the one this server has
        t.host_key = *Ed25519Keypair::from_seed(&[2; 32]).public.as_ref();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        match within(exec(&t, "echo hi; echo oops >&2; exit 3", &mut out, &mut err)).await {
            Err(SshError::HostKeyMismatch { expected, presented }) => {
                assert_eq!(expected, host_key_line(&t.host_key));
                assert_eq!(presented, host_key_line(&shown));
            }
            other => panic!("{other:?}"),
        }
        tokio::time::timeout(Duration::from_secs(10), guest.session).await.unwrap().unwrap();
        assert_eq!(guest.auth_attempts.load(Ordering::SeqCst), 0, "the client tried to authenticate");
        assert!(out.is_empty() && err.is_empty());
    }

    #[tokio::test]
    async fn exec_reports_a_refused_lease_key() {
        let dir = tempfile::tempdir().unwrap();
        // the guest authorizes some other key than the lease key
        let guest = start_guest(ed25519(1), ed25519(3).public_key().clone()).await;
        let (t, _key) = lease_for(dir.path(), &guest);
        let (mut out, mut err) = (Vec::new(), Vec::new());
        match within(exec(&t, "echo hi; echo oops >&2; exit 3", &mut out, &mut err)).await {
            Err(SshError::Auth { user }) => assert_eq!(user, "peervm"),
            other => panic!("{other:?}"),
        }
        assert!(guest.auth_attempts.load(Ordering::SeqCst) >= 1);
    }

    /// OpenSSH itself, with [`openssh_args`] and the pinned known_hosts, against the
    /// in-process server: it runs the command with the right key and refuses another.
    #[tokio::test]
    async fn openssh_client_accepts_only_the_pinned_key() {
        if std::process::Command::new("ssh").arg("-V").output().is_err() {
            eprintln!("ssh not installed; skipping");
            return;
        }
        async fn run_ssh(t: &SshTarget, known_hosts: &Path) -> std::process::Output {
            write_known_hosts(known_hosts, &t.alias, &t.host_key).unwrap();
            let mut args = vec!["-F".to_string(), "/dev/null".into(), "-o".into(), "BatchMode=yes".into()];
            args.extend(openssh_args(t, known_hosts, &["echo hi; echo oops >&2; exit 3".to_string()]));
            let child = tokio::process::Command::new("ssh").args(&args).env_remove("SSH_AUTH_SOCK").output();
            within(child).await.unwrap()
        }
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let (_guest, t) = guest_with_lease_key(dir.path(), 1).await;
        let out = run_ssh(&t, &kh).await;
        assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.stdout, b"hi\n");

        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let (guest, mut t) = guest_with_lease_key(dir.path(), 1).await;
        t.host_key = *Ed25519Keypair::from_seed(&[2; 32]).public.as_ref();
        let out = run_ssh(&t, &kh).await;
        assert_eq!(out.status.code(), Some(255));
        assert!(out.stdout.is_empty());
        assert!(String::from_utf8_lossy(&out.stderr).contains("Host key verification failed"));
        tokio::time::timeout(Duration::from_secs(10), guest.session).await.unwrap().unwrap();
        assert_eq!(guest.auth_attempts.load(Ordering::SeqCst), 0, "OpenSSH tried to authenticate");
    }

    #[tokio::test]
    async fn exec_fails_cleanly_without_a_server() {
        let dir = tempfile::tempdir().unwrap();
        generate_key(&dir.path().join("id_ed25519"), "x").unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());

        // nothing listens
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut t = target(dir.path(), [1; 32]);
        t.port = port;
        assert!(matches!(within(exec(&t, "true", &mut out, &mut err)).await, Err(SshError::Connect { .. })));

        // something listens but never speaks SSH
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        t.port = silent.local_addr().unwrap().port();
        let opts = ExecOptions { connect_timeout: Duration::from_millis(300), ..Default::default() };
        let started = std::time::Instant::now();
        match within(exec_with(&t, "true", None, &mut out, &mut err, &opts)).await {
            Err(SshError::Connect { addr, reason }) => {
                assert_eq!(addr, format!("127.0.0.1:{}", t.port));
                assert!(reason.contains("no SSH session"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(5));

        // a hostile host name is refused before any connection
        t.host = "-oProxyCommand=x".into();
        assert!(matches!(within(exec(&t, "true", &mut out, &mut err)).await, Err(SshError::Target(_))));

        // a passphrase-protected key cannot be used by the built-in client
        let enc = ed25519(4).encrypt(&mut TestRng, "pw").unwrap();
        t.host = "127.0.0.1".into();
        t.key_path = dir.path().join("id_enc");
        write_new(&t.key_path, enc.to_openssh(LineEnding::LF).unwrap().as_bytes(), 0o600).unwrap();
        let err_text = within(exec(&t, "true", &mut out, &mut err)).await.unwrap_err().to_string();
        assert!(err_text.contains("passphrase-protected"), "{err_text}");
    }
}
