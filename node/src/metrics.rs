//! Prometheus metrics, served as text on a loopback address only when enabled.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseRuleLabel {
    pub lease: String,
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LeaseDirectionLabel {
    pub lease: String,
    /// `in` (to the guest) or `out` (from it).
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortKindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AbuseLabel {
    pub rule: String,
    pub action: String,
}

/// The node's counters and gauges. Cheap to clone (all handles are shared).
#[derive(Clone, Default)]
pub struct Metrics {
    pub adverts_accepted: Counter,
    pub adverts_rejected: Family<ReasonLabel, Counter>,
    pub advert_store_size: Gauge,
    /// Refresh records (docs/protocol.md, section 4a) by outcome: `accepted`, or why not.
    pub refresh_records: Family<OutcomeLabel, Counter>,
    pub peers_connected: Gauge,
    /// Connections the node closed itself: `dead` (pings failed), `trimmed` (idle, beyond
    /// the target number of peers).
    pub connections_closed: Family<ReasonLabel, Counter>,
    /// Bytes the node received and sent on its TCP connections, as on the wire (after
    /// Noise and Yamux: `network/wire_bytes.rs`).
    pub wire_received_bytes: Counter,
    pub wire_sent_bytes: Counter,
    /// Dials of peer discovery refused by the dial budget (`network/dial_budget.rs`).
    pub discovery_dials_refused: Counter,
    /// Kademlia walks the node started (`network/event_loop/dht_walks.rs`).
    pub dht_walks: Counter,
    /// Kademlia bootstraps finished: the node's refreshes, and the ones libp2p-kad starts by
    /// itself after a routing-table insertion while the table holds fewer than 20 peers.
    pub kad_bootstraps: Counter,
    /// FIND_NODE requests of other nodes' walks this node answered.
    pub kad_lookups_answered: Counter,
    /// Messages gossipsub did not send to a peer that was too slow to take them (its queue
    /// full, or a forward waiting longer than the forward timeout).
    pub gossip_dropped_for_slow_peers: Counter,
    pub rate_limited: Family<ApiLabel, Counter>,
    pub peers_banned: Counter,
    pub lease_messages: Family<OutcomeLabel, Counter>,
    pub leases_started: Counter,
    pub leases_running: Gauge,
    pub lease_cpu_usec: Family<LeaseLabel, Gauge>,
    pub lease_memory_bytes: Family<LeaseLabel, Gauge>,
    pub lease_memory_peak_bytes: Family<LeaseLabel, Gauge>,
    /// SSH bytes through a lease's forwarder (the signed status's `net_rx/tx_bytes`).
    pub lease_net_rx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_net_tx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_uptime_secs: Family<LeaseLabel, Gauge>,
    /// A lease's guest's whole traffic on its link (docs/vmm.md "Traffic accounting"), SSH
    /// included; cumulative, set from the hypervisor's counters.
    pub lease_guest_rx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_guest_tx_bytes: Family<LeaseLabel, Gauge>,
    pub lease_guest_rx_packets: Family<LeaseLabel, Gauge>,
    pub lease_guest_tx_packets: Family<LeaseLabel, Gauge>,
    pub lease_guest_new_connections: Family<LeaseLabel, Gauge>,
    /// Packets each isolation rule dropped, by the rule's comment in the lease's table.
    pub lease_guest_dropped_packets: Family<LeaseRuleLabel, Gauge>,
    /// Packets the bandwidth limits dropped (their queue full), by direction.
    pub lease_guest_limit_dropped_packets: Family<LeaseDirectionLabel, Gauge>,
    /// The rules each lease has a `lease_guest_dropped_packets` series of, so that
    /// `forget_lease` removes them all.
    drop_rules_seen: Arc<Mutex<HashMap<String, BTreeSet<String>>>>,
    /// The memory a lease was granted: `lease_memory_bytes` at this value is a guest using
    /// all of it (packaging/prometheus/peervm-alerts.yml, `PeervmLeaseAtMemoryLimit`).
    pub lease_memory_limit_bytes: Family<LeaseLabel, Gauge>,
    /// The host's `MemAvailable` and the memory the provider advertises as free, side by
    /// side so that an alert can compare them (the lease monitor's 10 s tick sets both).
    pub host_memory_available_bytes: Gauge,
    pub advertised_free_memory_bytes: Gauge,
    /// The last port verification, per kind of port (`libp2p`, `ssh`): 1 when every port
    /// of that kind was reachable from outside, else 0; no series before the first check.
    pub port_verification_reachable: Family<PortKindLabel, Gauge>,
    /// When the last port verification answered (Unix seconds); 0 before the first.
    pub port_verification_last_check_timestamp_seconds: Gauge,
    /// Abuse detection's triggers, by rule and the action taken (`warn`, `throttle`,
    /// `isolate`).
    pub abuse_triggers: Family<AbuseLabel, Counter>,
    /// Samples of a lease's traffic abuse detection compared with the one before (each
    /// running, not isolated lease once per monitor round, its first sample excepted).
    pub abuse_checks: Counter,
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
        r.register(
            "wire_received_bytes",
            "Bytes received on TCP connections, as on the wire (after Noise and Yamux)",
            self.wire_received_bytes.clone(),
        );
        r.register(
            "wire_sent_bytes",
            "Bytes sent on TCP connections, as on the wire (after Noise and Yamux)",
            self.wire_sent_bytes.clone(),
        );
        r.register(
            "discovery_dials_refused",
            "Dials of peer discovery (Kademlia walks) refused because the node had its budget of connections",
            self.discovery_dials_refused.clone(),
        );
        r.register(
            "discovery_walks",
            "Kademlia walks started to find peers (below the target) or to refresh the routing table",
            self.dht_walks.clone(),
        );
        r.register(
            "kad_bootstraps",
            "Kademlia bootstraps finished, the node's own and those libp2p-kad starts while its routing table is small",
            self.kad_bootstraps.clone(),
        );
        r.register(
            "kad_lookups_answered",
            "FIND_NODE requests of other nodes' DHT walks answered",
            self.kad_lookups_answered.clone(),
        );
        r.register(
            "gossip_dropped_for_slow_peers",
            "Gossip messages not sent to a peer too slow to take them (queue full, or waiting past the timeout)",
            self.gossip_dropped_for_slow_peers.clone(),
        );
        r.register(
            "refresh_records",
            "Refresh records (tokens that keep adverts live) received or released, by outcome",
            self.refresh_records.clone(),
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
        r.register(
            "lease_guest_rx_bytes",
            "Bytes a lease's guest received on its link (all traffic, SSH included)",
            self.lease_guest_rx_bytes.clone(),
        );
        r.register(
            "lease_guest_tx_bytes",
            "Bytes a lease's guest sent on its link (all traffic, SSH included)",
            self.lease_guest_tx_bytes.clone(),
        );
        r.register(
            "lease_guest_rx_packets",
            "Packets a lease's guest received on its link",
            self.lease_guest_rx_packets.clone(),
        );
        r.register(
            "lease_guest_tx_packets",
            "Packets a lease's guest sent on its link",
            self.lease_guest_tx_packets.clone(),
        );
        r.register(
            "lease_guest_new_connections",
            "New connections (flows) a lease's guest opened to the outside, allowed or dropped",
            self.lease_guest_new_connections.clone(),
        );
        r.register(
            "lease_guest_dropped_packets",
            "Packets of a lease's guest an isolation rule dropped, by rule",
            self.lease_guest_dropped_packets.clone(),
        );
        r.register(
            "lease_guest_limit_dropped_packets",
            "Packets of a lease's guest its bandwidth limit dropped, by direction (in: to the guest)",
            self.lease_guest_limit_dropped_packets.clone(),
        );
        r.register(
            "lease_memory_limit_bytes",
            "Memory a lease's guest was granted",
            self.lease_memory_limit_bytes.clone(),
        );
        r.register(
            "host_memory_available_bytes",
            "Memory the host has available (MemAvailable of /proc/meminfo)",
            self.host_memory_available_bytes.clone(),
        );
        r.register(
            "advertised_free_memory_bytes",
            "Memory this provider advertises as free",
            self.advertised_free_memory_bytes.clone(),
        );
        r.register(
            "port_verification_reachable",
            "Whether the last port verification reached every port of a kind from outside (1) or not (0)",
            self.port_verification_reachable.clone(),
        );
        r.register(
            "port_verification_last_check_timestamp_seconds",
            "When the last port verification answered (Unix time; 0: none yet)",
            self.port_verification_last_check_timestamp_seconds.clone(),
        );
        r.register(
            "abuse_triggers",
            "Abuse detection triggers, by rule and the action taken",
            self.abuse_triggers.clone(),
        );
        r.register(
            "abuse_checks",
            "Lease traffic samples abuse detection checked against its rules",
            self.abuse_checks.clone(),
        );
        r
    }

    /// Counts a refresh record (docs/protocol.md, section 4a) by what the store made of
    /// it: `accepted`, or the reason it was ignored or rejected.
    pub fn refresh_record(&self, outcome: &str) {
        self.refresh_records.get_or_create(&OutcomeLabel { outcome: outcome.to_string() }).inc();
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

    /// Counts one trigger of abuse detection's `rule`, which took `action`.
    pub fn abuse_trigger(&self, rule: &str, action: &str) {
        self.abuse_triggers.get_or_create(&AbuseLabel { rule: rule.to_string(), action: action.to_string() }).inc();
    }

    /// Sets the port verification gauges from the advert's summary of a port report.
    pub fn record_port_verification(&self, r: &peervm_protocol::Reachability) {
        for (kind, ok) in [("libp2p", r.libp2p_open), ("ssh", r.ssh_reachable)] {
            self.port_verification_reachable
                .get_or_create(&PortKindLabel { kind: kind.to_string() })
                .set(i64::from(ok));
        }
        let secs = r.checked_at_unix_ms / 1000;
        self.port_verification_last_check_timestamp_seconds.set(i64::try_from(secs).unwrap_or(i64::MAX));
    }

    /// Sets the host-against-advert memory gauges. `available_mib` is `None` when the host's
    /// figure cannot be read: the gauge then keeps its last value.
    pub fn record_host_memory(&self, available_mib: Option<u64>, advertised_free_mib: u64) {
        let bytes = |mib: u64| i64::try_from(mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
        if let Some(avail) = available_mib {
            self.host_memory_available_bytes.set(bytes(avail));
        }
        self.advertised_free_memory_bytes.set(bytes(advertised_free_mib));
    }

    /// Sets a lease's memory limit gauge.
    pub fn record_lease_memory_limit(&self, lease: &str, bytes: u64) {
        let label = LeaseLabel { lease: lease.to_string() };
        self.lease_memory_limit_bytes.get_or_create(&label).set(i64::try_from(bytes).unwrap_or(i64::MAX));
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
        if let Some(n) = &u.guest_net {
            set(&self.lease_guest_rx_bytes, n.rx_bytes);
            set(&self.lease_guest_tx_bytes, n.tx_bytes);
            set(&self.lease_guest_rx_packets, n.rx_packets);
            set(&self.lease_guest_tx_packets, n.tx_packets);
            set(&self.lease_guest_new_connections, n.new_connections);
        }
    }

    /// Sets a lease's drop gauges: per isolation rule and per bandwidth limit direction.
    pub fn record_lease_drops(&self, lease: &str, n: &peervm_vmm::NetUsage) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (rule, packets) in &n.dropped {
            let label = LeaseRuleLabel { lease: lease.to_string(), rule: rule.clone() };
            self.lease_guest_dropped_packets.get_or_create(&label).set(gauge(*packets));
        }
        self.drop_rules_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(lease.to_string())
            .or_default()
            .extend(n.dropped.keys().cloned());
        for (direction, packets) in [("in", n.limit_dropped_in), ("out", n.limit_dropped_out)] {
            let label = LeaseDirectionLabel { lease: lease.to_string(), direction: direction.to_string() };
            self.lease_guest_limit_dropped_packets.get_or_create(&label).set(gauge(packets));
        }
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
            &self.lease_memory_limit_bytes,
            &self.lease_guest_rx_bytes,
            &self.lease_guest_tx_bytes,
            &self.lease_guest_rx_packets,
            &self.lease_guest_tx_packets,
            &self.lease_guest_new_connections,
        ] {
            f.remove(&label);
        }
        let rules = self.drop_rules_seen.lock().unwrap_or_else(|p| p.into_inner()).remove(lease).unwrap_or_default();
        for rule in rules {
            self.lease_guest_dropped_packets.remove(&LeaseRuleLabel { lease: lease.to_string(), rule });
        }
        for direction in ["in", "out"] {
            self.lease_guest_limit_dropped_packets
                .remove(&LeaseDirectionLabel { lease: lease.to_string(), direction: direction.to_string() });
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_alerting_families_render_with_their_labels() {
        let m = Metrics::default();
        m.abuse_trigger("smtp", "warn");
        m.abuse_trigger("smtp", "warn");
        m.abuse_trigger("scan", "isolate");
        m.record_port_verification(&peervm_protocol::Reachability {
            checked_at_unix_ms: 1_700_000_000_999,
            libp2p_open: true,
            ssh_reachable: false,
        });
        m.record_host_memory(Some(512), 1024);
        m.record_lease_memory_limit("ab12", 256 << 20);
        let out = m.render();
        for line in [
            r#"peervm_abuse_triggers_total{rule="smtp",action="warn"} 2"#,
            r#"peervm_abuse_triggers_total{rule="scan",action="isolate"} 1"#,
            r#"peervm_port_verification_reachable{kind="libp2p"} 1"#,
            r#"peervm_port_verification_reachable{kind="ssh"} 0"#,
            "peervm_port_verification_last_check_timestamp_seconds 1700000000",
            "peervm_host_memory_available_bytes 536870912",
            "peervm_advertised_free_memory_bytes 1073741824",
            r#"peervm_lease_memory_limit_bytes{lease="ab12"} 268435456"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }

    #[test]
    fn an_unreadable_host_figure_keeps_the_last_one_and_a_forgotten_lease_loses_its_limit() {
        let m = Metrics::default();
        m.record_host_memory(Some(512), 1024);
        m.record_host_memory(None, 2048);
        assert_eq!(m.host_memory_available_bytes.get(), 512 << 20);
        assert_eq!(m.advertised_free_memory_bytes.get(), 2048 << 20);
        m.record_lease_memory_limit("ab12", 256 << 20);
        m.forget_lease("ab12");
        assert!(!m.render().contains(r#"lease="ab12""#));
    }

    #[test]
    fn a_lease_s_traffic_renders_per_rule_and_direction_and_is_forgotten_with_it() {
        let m = Metrics::default();
        let usage = peervm_protocol::LeaseUsage {
            guest_net: Some(peervm_protocol::GuestTraffic {
                rx_bytes: 1000,
                rx_packets: 10,
                tx_bytes: 2000,
                tx_packets: 20,
                new_connections: 3,
                dropped_packets: 7,
            }),
            ..Default::default()
        };
        let net = peervm_vmm::NetUsage {
            dropped: [("spoofed source".to_string(), 2), ("no guest to guest".to_string(), 5)].into(),
            limit_dropped_out: 4,
            ..Default::default()
        };
        for lease in ["ab12", "cd34"] {
            m.record_lease_usage(lease, &usage);
            m.record_lease_drops(lease, &net);
        }
        let out = m.render();
        for line in [
            r#"peervm_lease_guest_rx_bytes{lease="ab12"} 1000"#,
            r#"peervm_lease_guest_tx_bytes{lease="ab12"} 2000"#,
            r#"peervm_lease_guest_rx_packets{lease="ab12"} 10"#,
            r#"peervm_lease_guest_tx_packets{lease="ab12"} 20"#,
            r#"peervm_lease_guest_new_connections{lease="ab12"} 3"#,
            r#"peervm_lease_guest_dropped_packets{lease="ab12",rule="spoofed source"} 2"#,
            r#"peervm_lease_guest_dropped_packets{lease="ab12",rule="no guest to guest"} 5"#,
            r#"peervm_lease_guest_limit_dropped_packets{lease="ab12",direction="out"} 4"#,
            r#"peervm_lease_guest_limit_dropped_packets{lease="ab12",direction="in"} 0"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        m.forget_lease("ab12");
        let out = m.render();
        assert!(!out.contains(r#"lease="ab12""#), "{out}");
        assert!(out.contains(r#"peervm_lease_guest_dropped_packets{lease="cd34",rule="spoofed source"} 2"#));
    }
}
