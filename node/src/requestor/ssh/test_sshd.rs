//! A real SSH server (russh::server) in the test process, standing in for a guest: it
//! presents a chosen host key, accepts one public key for user `peervm`, and runs a tiny
//! fixed command set, so the built-in client and OpenSSH are tested against the wire.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{self, Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, Sig};

use super::fixtures::target;
use super::keys::{LeaseKey, generate_key};
use super::target::SshTarget;

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

    async fn auth_publickey_offered(&mut self, _user: &str, offer: PublicKeyOffer<'_>) -> Result<Auth, Self::Error> {
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

pub(super) struct Guest {
    pub(super) port: u16,
    pub(super) host_key: [u8; 32],
    pub(super) auth_attempts: Arc<AtomicUsize>,
    /// Ends when the server's first session has ended.
    pub(super) session: tokio::task::JoinHandle<()>,
}

/// Listens on 127.0.0.1:0 and serves one SSH session with `host_key`, accepting only
/// `authorized` for user `peervm`.
pub(super) async fn start_guest(host_key: PrivateKey, authorized: PublicKey) -> Guest {
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
pub(super) async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f).await.expect("exec hung")
}

pub(super) fn ed25519(seed: u8) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
}

/// A lease key on disk and a target for `guest`.
pub(super) fn lease_for(dir: &Path, guest: &Guest) -> (SshTarget, LeaseKey) {
    let key = generate_key(&dir.join("id_ed25519"), "peervm-lease-test").unwrap();
    let mut t = target(dir, guest.host_key);
    t.port = guest.port;
    (t, key)
}

pub(super) fn lease_public(key: &LeaseKey) -> PublicKey {
    PublicKey::from(Ed25519PublicKey(key.public_raw))
}

pub(super) async fn guest_with_lease_key(dir: &Path, host_seed: u8) -> (Guest, SshTarget) {
    // the lease key exists before the guest: the provider puts it in user-data
    let key = generate_key(&dir.join("id_ed25519"), "peervm-lease-test").unwrap();
    let guest = start_guest(ed25519(host_seed), lease_public(&key)).await;
    let mut t = target(dir, guest.host_key);
    t.port = guest.port;
    (guest, t)
}
