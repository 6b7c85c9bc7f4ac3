//! Readiness: a guest is ready only when its sshd completes an SSH key exchange and
//! proves possession of exactly the host key provisioned for the lease (SECURITY.md
//! invariant 6: the requestor pins that key, so a guest answering with any other key is
//! not the lease's guest).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::client;
use russh::keys::{PublicKey, PublicKeyOrCertificate};
use tokio::net::TcpStream;

/// The outcome of one attempt.
#[derive(Debug)]
pub enum SshProbe {
    /// Key exchange completed and the server signed with the expected key.
    Ready,
    /// The server proved a different key: not our guest, or a broken seed.
    WrongKey { presented: String },
    /// Nothing (or no SSH) answered yet.
    NotYet(String),
}

struct ExpectKey {
    expected: PublicKey,
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for ExpectKey {
    type Error = russh::Error;

    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        // russh has verified the exchange signature before this call: the server holds
        // the private half of whatever key it shows here
        let (matches, shown) = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                (key.key_data() == self.expected.key_data(), key.to_openssh().unwrap_or_else(|_| "?".into()))
            }
            PublicKeyOrCertificate::Certificate(_) => (false, "a certificate".to_string()),
        };
        if !matches {
            *self.presented.lock().unwrap_or_else(|p| p.into_inner()) = Some(shown);
        }
        Ok(matches)
    }
}

/// One handshake attempt against `addr`, bounded by `timeout`.
pub async fn probe_ssh(addr: SocketAddr, expected: &PublicKey, timeout: Duration) -> SshProbe {
    let presented = Arc::new(Mutex::new(None));
    let handler = ExpectKey { expected: expected.clone(), presented: presented.clone() };
    let attempt = async {
        let stream = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let config = Arc::new(client::Config { nodelay: true, ..Default::default() });
        let handle = client::connect_stream(config, stream, handler).await.map_err(|e| format!("ssh: {e}"))?;
        let _ = handle.disconnect(russh::Disconnect::ByApplication, "readiness check", "en").await;
        Ok::<(), String>(())
    };
    let result = tokio::time::timeout(timeout, attempt).await;
    if let Some(shown) = presented.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return SshProbe::WrongKey { presented: shown };
    }
    match result {
        Ok(Ok(())) => SshProbe::Ready,
        Ok(Err(e)) => SshProbe::NotYet(e),
        Err(_) => SshProbe::NotYet(format!("no SSH handshake with {addr} within {timeout:?}")),
    }
}
