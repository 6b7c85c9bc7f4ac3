//! Prometheus metrics, served as text on a loopback address only when enabled.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabel {
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseLabel {
    pub lease: String,
}

/// The node's counters and gauges. Cheap to clone (all handles are shared).
#[derive(Clone, Default)]
pub struct Metrics {
    pub adverts_accepted: Counter,
    pub adverts_rejected: Family<ReasonLabel, Counter>,
    pub advert_store_size: Gauge,
    pub peers_connected: Gauge,
    /// Connections the node closed itself: `dead` (pings failed), `trimmed` (idle, beyond
    /// the target number of peers).
    pub connections_closed: Family<ReasonLabel, Counter>,
    pub rate_limited: Family<ApiLabel, Counter>,
    pub peers_banned: Counter,
    pub lease_messages: Family<OutcomeLabel, Counter>,
    pub leases_started: Counter,
    pub leases_running: Gauge,
    pub lease_cpu_usec: Family<LeaseLabel, Gauge>,
    pub lease_memory_bytes: Family<LeaseLabel, Gauge>,
    pub lease_memory_peak_bytes: Family<LeaseLabel, Gauge>,
    pub lease_net_rx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_net_tx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_uptime_secs: Family<LeaseLabel, Gauge>,
}

impl Metrics {
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("peervm");
        r.register("adverts_accepted", "Adverts accepted into the store", self.adverts_accepted.clone());
        r.register("adverts_rejected", "Adverts not accepted, by reason", self.adverts_rejected.clone());
        r.register("advert_store_size", "Live adverts held", self.advert_store_size.clone());
        r.register("peers_connected", "Connected peers", self.peers_connected.clone());
        r.register(
            "connections_closed",
            "Connections the node closed itself, by reason (dead, trimmed)",
            self.connections_closed.clone(),
        );
        r.register("rate_limited", "Messages dropped by per-peer rate limits, by API", self.rate_limited.clone());
        r.register("peers_banned", "Peers banned for misbehaviour", self.peers_banned.clone());
        r.register(
            "lease_messages",
            "Lease requests and control messages answered, by outcome",
            self.lease_messages.clone(),
        );
        r.register("leases_started", "Leases whose guest came up", self.leases_started.clone());
        r.register("leases_running", "Leases running now", self.leases_running.clone());
        r.register("lease_cpu_usec", "CPU time of a lease's guest (microseconds)", self.lease_cpu_usec.clone());
        r.register("lease_memory_bytes", "Memory a lease's guest uses now", self.lease_memory_bytes.clone());
        r.register("lease_memory_peak_bytes", "Most memory a lease's guest used", self.lease_memory_peak_bytes.clone());
        r.register("lease_net_rx_bytes", "Bytes from requestors to a lease's guest", self.lease_net_rx_bytes.clone());
        r.register("lease_net_tx_bytes", "Bytes from a lease's guest to requestors", self.lease_net_tx_bytes.clone());
        r.register("lease_uptime_secs", "Seconds since a lease's guest started", self.lease_uptime_secs.clone());
        r
    }

    pub fn rejected(&self, reason: &str) {
        self.adverts_rejected.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    /// Counts a connection the node closed itself, by `reason`.
    pub fn connections_closed(&self, reason: &str) {
        self.connections_closed.get_or_create(&ReasonLabel { reason: reason.to_string() }).inc();
    }

    /// Counts a message dropped by a per-peer rate limit on `api`.
    pub fn throttled(&self, api: &str) {
        self.rate_limited.get_or_create(&ApiLabel { api: api.to_string() }).inc();
    }

    /// Counts a lease message by its outcome (`granted`, `ok`, or a denial reason).
    pub fn lease_message(&self, outcome: &str) {
        self.lease_messages.get_or_create(&OutcomeLabel { outcome: outcome.to_string() }).inc();
    }

    /// Sets the per-lease usage gauges.
    pub fn record_lease_usage(&self, lease: &str, u: &peervm_protocol::LeaseUsage) {
        let label = LeaseLabel { lease: lease.to_string() };
        let set = |f: &Family<LeaseLabel, Gauge>, v: u64| {
            f.get_or_create(&label).set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&self.lease_cpu_usec, u.cpu_usec);
        set(&self.lease_memory_bytes, u.memory_current_bytes);
        set(&self.lease_memory_peak_bytes, u.memory_peak_bytes);
        set(&self.lease_net_rx_bytes, u.net_rx_bytes);
        set(&self.lease_net_tx_bytes, u.net_tx_bytes);
        set(&self.lease_uptime_secs, u.uptime_secs);
    }

    /// Drops an ended lease's series.
    pub fn forget_lease(&self, lease: &str) {
        let label = LeaseLabel { lease: lease.to_string() };
        for f in [
            &self.lease_cpu_usec,
            &self.lease_memory_bytes,
            &self.lease_memory_peak_bytes,
            &self.lease_net_rx_bytes,
            &self.lease_net_tx_bytes,
            &self.lease_uptime_secs,
        ] {
            f.remove(&label);
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry());
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics address {0} is not a loopback address; metrics are only served on 127.0.0.1 or ::1")]
    NotLoopback(SocketAddr),
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Serves `metrics` over HTTP on `addr`, which must be loopback. Returns the bound
/// address (useful with port 0).
pub async fn serve(metrics: Arc<Metrics>, addr: SocketAddr) -> Result<SocketAddr, MetricsError> {
    if !addr.ip().is_loopback() {
        return Err(MetricsError::NotLoopback(addr));
    }
    let listener = TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })?;
    let bound = listener.local_addr().map_err(|source| MetricsError::Bind { addr, source })?;
    tokio::spawn(async move {
        // One connection at a time: a scraper needs no more, and nothing can pile up.
        while let Ok((mut conn, _)) = listener.accept().await {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
            if !matches!(read, Ok(Ok(n)) if n > 0) {
                continue;
            }
            let body = metrics.render();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = conn.write_all(head.as_bytes()).await;
            let _ = conn.write_all(body.as_bytes()).await;
        }
    });
    Ok(bound)
}
