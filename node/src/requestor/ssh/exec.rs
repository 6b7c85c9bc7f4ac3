//! `peervm exec`: the built-in SSH client. It accepts the pinned host key and nothing
//! else, during the key exchange and before any credential is sent, then authenticates
//! with the lease key and runs one command.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{Algorithm, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Sig, client};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::SshError;
use super::keys::{host_key_line, public_line, read_private_key};
use super::target::{SshTarget, check_target};

/// How long the built-in client may take to connect, agree on keys and authenticate.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

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
        None => SshError::Connect { addr: addr.clone(), source: e },
    };
    let start = async {
        let mut handle =
            client::connect(config, (target.host.as_str(), target.port), handler).await.map_err(connect_error)?;
        let auth = handle.authenticate_publickey(target.user.as_str(), key).await.map_err(SshError::Protocol)?;
        if !auth.success() {
            let _ = handle.disconnect(russh::Disconnect::ByApplication, "", "en").await;
            return Err(SshError::Auth { user: target.user.clone() });
        }
        let channel = handle.channel_open_session().await.map_err(SshError::Protocol)?;
        channel.exec(true, command).await.map_err(SshError::Protocol)?;
        Ok((handle, channel))
    };
    let (handle, channel) = match tokio::time::timeout(opts.connect_timeout, start).await {
        Ok(started) => started?,
        Err(_) => {
            return Err(SshError::ConnectTimeout { addr, secs: opts.connect_timeout.as_secs_f64() });
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
        return Err(SshError::CommandRefused);
    }
    status.ok_or(SshError::NoExitStatus { signal })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use russh::keys::ssh_key::LineEnding;
    use russh::keys::ssh_key::private::Ed25519Keypair;

    use super::*;
    use crate::requestor::ssh::fixtures::{TestRng, target};
    use crate::requestor::ssh::keys::{generate_key, write_new};
    use crate::requestor::ssh::test_sshd::{ed25519, guest_with_lease_key, lease_for, start_guest, within};

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
        assert!(matches!(within(exec(&t, "no such command", &mut out, &mut err)).await, Err(SshError::CommandRefused)));
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
            Err(e @ SshError::ConnectTimeout { .. }) => {
                assert_eq!(
                    e.to_string(),
                    format!("cannot connect to 127.0.0.1:{}: no SSH session within 0.3 s", t.port)
                );
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
