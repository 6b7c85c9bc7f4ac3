//! The TCP transport, counting the bytes each connection sends and receives on the wire:
//! below Noise and Yamux, so encryption, framing and every protocol's traffic (gossip,
//! sync, Kademlia, pings, identify) count, as a node's link would carry them. libp2p's
//! own bandwidth metrics count substream payload above Yamux instead, which leaves out
//! that overhead. The totals are `Metrics::wire_received_bytes` and `wire_sent_bytes`;
//! the swarm bench's bandwidth group reads them (BENCHMARKS.md, issue 18 item 5). QUIC
//! connections are not counted.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use futures::{AsyncRead, AsyncWrite};
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::{PeerId, Transport, noise, tcp, yamux};
use prometheus_client::metrics::counter::Counter;

/// TCP + Noise + Yamux, as `SwarmBuilder::with_tcp` assembles it, with each connection's
/// raw stream counted into `received` and `sent`.
pub(crate) fn counted_tcp(
    key: &Keypair,
    config: tcp::Config,
    received: Counter,
    sent: Counter,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let noise = noise::Config::new(key)?;
    Ok(tcp::tokio::Transport::new(config)
        .map(move |inner, _| Counted { inner, received: received.clone(), sent: sent.clone() })
        .upgrade(Version::V1Lazy)
        .authenticate(noise)
        .multiplex(yamux::Config::default())
        .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
        .boxed())
}

/// A connection's stream that adds what it reads and writes to the node's totals.
struct Counted<S> {
    inner: S,
    received: Counter,
    sent: Counter,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        this.received.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.sent.inc_by(n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
