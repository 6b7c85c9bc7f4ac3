//! The SSH forwarder: a TCP listener on the provider's SSH address (a port of the
//! configured range) that relays each connection to the guest's port 22.
//!
//! An in-process relay rather than kernel DNAT (docs/vmm.md "Decisions"): it works for
//! 127.0.0.1 without route_localnet and source NAT, and it counts bytes and connections
//! per lease for monitoring.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

use crate::error::VmmError;

/// Concurrent connections per lease: enough for any SSH use, and a bound on the
/// descriptors one flood can take from the provider.
const MAX_CONNECTIONS: usize = 64;
/// Time allowed to reach the guest's sshd.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Byte and connection counters of one lease's forwarder.
#[derive(Debug, Default)]
pub struct ForwardCounters {
    /// From the client to the guest.
    pub bytes_in: AtomicU64,
    /// From the guest to the client.
    pub bytes_out: AtomicU64,
    pub connections: AtomicU64,
}

pub(crate) struct SshForwarder {
    task: JoinHandle<()>,
}

impl SshForwarder {
    /// Binds `listen` and relays to `target`. SO_REUSEADDR (tokio's default) lets a
    /// restarted provider re-bind the port of a re-adopted guest at once.
    pub async fn start(
        listen: SocketAddr,
        target: SocketAddr,
        counters: Arc<ForwardCounters>,
    ) -> Result<Self, VmmError> {
        let listener = TcpListener::bind(listen).await.map_err(|source| VmmError::Listen { addr: listen, source })?;
        let task = tokio::spawn(accept_loop(listener, target, counters));
        Ok(SshForwarder { task })
    }
}

impl Drop for SshForwarder {
    fn drop(&mut self) {
        // aborting the accept loop drops its JoinSet, which aborts every relay: the
        // port and all connections are released with the forwarder
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, counters: Arc<ForwardCounters>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut relays = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, peer)) = accepted else {
                    // e.g. EMFILE: back off instead of spinning
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "SSH forwarder at its connection limit: refusing");
                    continue;
                };
                counters.connections.fetch_add(1, Ordering::Relaxed);
                let c = counters.clone();
                relays.spawn(async move {
                    let _permit = permit;
                    relay(client, target, c).await;
                });
            }
            Some(_) = relays.join_next(), if !relays.is_empty() => {}
        }
    }
}

async fn relay(client: TcpStream, target: SocketAddr, counters: Arc<ForwardCounters>) {
    let upstream = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let inbound = pump(cr, uw, counters.clone(), true);
    let outbound = pump(ur, cw, counters, false);
    tokio::join!(inbound, outbound);
}

/// Copies one direction, counting as it goes (a long SSH session shows up in the
/// counters while it runs, not only when it ends).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    counters: Arc<ForwardCounters>,
    inbound: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        let counter = if inbound { &counters.bytes_in } else { &counters.bytes_out };
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relays_and_counts_then_frees_the_port() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 5];
                    if s.read_exact(&mut b).await.is_ok() {
                        let _ = s.write_all(b"hello world").await;
                    }
                });
            }
        });
        let counters = Arc::new(ForwardCounters::default());
        let addr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let fwd = SshForwarder::start(addr, target, counters.clone()).await.unwrap();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"12345").await.unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello world");
        assert_eq!(counters.bytes_in.load(Ordering::Relaxed), 5);
        assert_eq!(counters.bytes_out.load(Ordering::Relaxed), 11);
        assert_eq!(counters.connections.load(Ordering::Relaxed), 1);
        drop(fwd);
        tokio::task::yield_now().await;
        // the port is free again once the forwarder is gone
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(TcpStream::connect(addr).await.is_err());
    }
}
