//! Reachability from outside: the provider's port verification. Shortly after start and
//! every 10 minutes other peers dial its ports back (`/peervm/dialback/1`,
//! docs/architecture.md "Reachability, block lists, owners"); the [`PortReport`] they
//! produce is shared by the daemon (its advert carries the summary), the admin API
//! (`peervm provider status`) and `peervm doctor`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::now_unix_ms;
use crate::network::Node;
use crate::network::dialback::{DialBackRequest, DialBackResponse, PortState};
use crate::provider::config::ProviderConfig;

/// What the last port verification found, for `peervm provider status` and `doctor`.
pub type SharedReachability = Arc<Mutex<Option<PortReport>>>;

/// Which of the provider's listeners a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PortKind {
    #[serde(rename = "libp2p")]
    Libp2p,
    #[serde(rename = "ssh")]
    Ssh,
    /// A port the checking peer reported although it was not asked about.
    #[serde(rename = "?")]
    Unknown,
}

impl PortKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PortKind::Libp2p => "libp2p",
            PortKind::Ssh => "ssh",
            PortKind::Unknown => "?",
        }
    }
}

/// The wire name of a dial-back result (`open`, `closed`, `filtered`).
pub fn state_name(state: PortState) -> &'static str {
    match state {
        PortState::Open => "open",
        PortState::Closed => "closed",
        PortState::Filtered => "filtered",
    }
}

/// One port as the checking peer saw it. Fields in alphabetical order: the JSON of
/// `provider status` has always listed them so.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortProbe {
    pub kind: PortKind,
    pub port: u16,
    pub state: PortState,
}

impl PortProbe {
    /// The one reachability rule. The libp2p port must accept connections. An SSH port
    /// only has to answer: outside a lease nothing listens on it, so `closed` (the host
    /// refused) proves the path is open, and only `filtered` (no answer: a firewall drops
    /// it) means requestors cannot reach their guests.
    pub fn reachable(&self) -> bool {
        matches!(
            (self.kind, self.state),
            (PortKind::Libp2p, PortState::Open) | (PortKind::Ssh, PortState::Open | PortState::Closed)
        )
    }
}

/// The result of one port verification. Fields in alphabetical order, as the JSON of
/// `provider status` has always listed them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortReport {
    /// The peer that dialed back.
    pub by: String,
    pub checked_at_unix_ms: u64,
    /// The address it dialed: the one it saw this provider's connection come from.
    pub observed_ip: String,
    pub ports: Vec<PortProbe>,
}

impl PortReport {
    /// Every port that failed [`PortProbe::reachable`].
    pub fn unreachable(&self) -> impl Iterator<Item = &PortProbe> {
        self.ports.iter().filter(|p| !p.reachable())
    }

    /// True when at least one port of `kind` was checked and every one is reachable.
    fn all_reachable(&self, kind: PortKind) -> bool {
        let mut of_kind = self.ports.iter().filter(|p| p.kind == kind).peekable();
        of_kind.peek().is_some() && of_kind.all(PortProbe::reachable)
    }

    /// The advert's short form of this report.
    pub fn summary(&self) -> peervm_protocol::Reachability {
        peervm_protocol::Reachability {
            checked_at_unix_ms: self.checked_at_unix_ms,
            libp2p_open: self.all_reachable(PortKind::Libp2p),
            ssh_reachable: self.all_reachable(PortKind::Ssh),
        }
    }
}

/// Port verification: shortly after start and every 10 minutes, asks up to two connected
/// peers to dial this provider back on its libp2p TCP port and the ends of its SSH port
/// range, records the first answer in `out` and in the node's metrics (for the alerts of
/// packaging/prometheus/peervm-alerts.yml), logs it and tells `done`.
pub fn spawn_port_check(
    config: &ProviderConfig,
    node: &Node,
    out: SharedReachability,
    done: Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<()> {
    let client = node.client.clone();
    let metrics = node.metrics.clone();
    let mut ports: Vec<(u16, PortKind)> = node
        .listen_addrs
        .iter()
        .filter_map(|a| {
            a.iter().find_map(|p| match p {
                libp2p::multiaddr::Protocol::Tcp(port) => Some((port, PortKind::Libp2p)),
                _ => None,
            })
        })
        .take(2)
        .collect();
    ports.push((config.ssh.port_min, PortKind::Ssh));
    ports.push((config.ssh.port_max, PortKind::Ssh));
    ports.retain(|(p, _)| *p >= 1024);
    ports.dedup_by_key(|(p, _)| *p);
    tokio::spawn(async move {
        let mut wait = Duration::from_secs(5);
        loop {
            tokio::time::sleep(wait).await;
            wait = Duration::from_secs(600);
            let Ok(peers) = client.connected_peers().await else { return };
            let request = DialBackRequest { ip: None, ports: ports.iter().map(|(p, _)| *p).collect() };
            for peer in peers.into_iter().take(2) {
                match client.dial_back(peer, request.clone()).await {
                    Ok(DialBackResponse::Result { observed_ip, ports: seen }) => {
                        let kind =
                            |port: u16| ports.iter().find(|(p, _)| *p == port).map_or(PortKind::Unknown, |(_, k)| *k);
                        let report = PortReport {
                            by: peer.to_string(),
                            checked_at_unix_ms: now_unix_ms(),
                            observed_ip,
                            ports: seen
                                .iter()
                                .map(|&(port, state)| PortProbe { kind: kind(port), port, state })
                                .collect(),
                        };
                        for probe in &report.ports {
                            let (port, state, observed_ip) = (probe.port, probe.state, &report.observed_ip);
                            if probe.reachable() {
                                tracing::info!(%peer, %observed_ip, port, ?state, "port verified from outside");
                            } else {
                                tracing::warn!(%peer, %observed_ip, port, ?state, kind = probe.kind.as_str(),
                                    "port not reachable from outside");
                            }
                        }
                        metrics.record_port_verification(&report.summary());
                        *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
                        done.notify_one();
                        break;
                    }
                    Ok(DialBackResponse::Refused { reason }) => {
                        tracing::debug!(%peer, %reason, "dial-back refused");
                    }
                    Err(e) => tracing::debug!(%peer, error = %e, "dial-back failed"),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(kind: PortKind, port: u16, state: PortState) -> PortProbe {
        PortProbe { kind, port, state }
    }

    fn report(ports: Vec<PortProbe>) -> PortReport {
        PortReport {
            by: "12D3KooWpeer".into(),
            checked_at_unix_ms: 1_700_000_000_000,
            observed_ip: "198.51.100.7".into(),
            ports,
        }
    }

    #[test]
    fn libp2p_must_be_open_and_ssh_only_not_filtered() {
        use PortKind::*;
        use PortState::*;
        let table = [
            (Libp2p, Open, true),
            (Libp2p, Closed, false),
            (Libp2p, Filtered, false),
            (Ssh, Open, true),
            (Ssh, Closed, true),
            (Ssh, Filtered, false),
            (Unknown, Open, false),
        ];
        for (kind, state, want) in table {
            assert_eq!(probe(kind, 4001, state).reachable(), want, "{kind:?} {state:?}");
        }
    }

    #[test]
    fn summary_needs_every_port_of_a_kind_and_at_least_one() {
        let all_good = report(vec![
            probe(PortKind::Libp2p, 4001, PortState::Open),
            probe(PortKind::Ssh, 22000, PortState::Closed),
            probe(PortKind::Ssh, 22099, PortState::Open),
        ]);
        let s = all_good.summary();
        assert!(s.libp2p_open && s.ssh_reachable);
        assert_eq!(s.checked_at_unix_ms, 1_700_000_000_000);
        assert_eq!(all_good.unreachable().count(), 0);

        let one_filtered = report(vec![
            probe(PortKind::Libp2p, 4001, PortState::Open),
            probe(PortKind::Ssh, 22000, PortState::Closed),
            probe(PortKind::Ssh, 22099, PortState::Filtered),
        ]);
        let s = one_filtered.summary();
        assert!(s.libp2p_open && !s.ssh_reachable);
        assert_eq!(one_filtered.unreachable().map(|p| p.port).collect::<Vec<_>>(), vec![22099]);

        let no_ssh_checked = report(vec![probe(PortKind::Libp2p, 4001, PortState::Open)]);
        assert!(!no_ssh_checked.summary().ssh_reachable);
        assert!(!report(vec![]).summary().libp2p_open);
    }

    #[test]
    fn json_is_the_shape_provider_status_has_always_shown() {
        let r = report(vec![
            probe(PortKind::Libp2p, 4001, PortState::Open),
            probe(PortKind::Ssh, 22000, PortState::Filtered),
            probe(PortKind::Unknown, 5000, PortState::Closed),
        ]);
        let want = r#"{"by":"12D3KooWpeer","checked_at_unix_ms":1700000000000,"observed_ip":"198.51.100.7","ports":[{"kind":"libp2p","port":4001,"state":"open"},{"kind":"ssh","port":22000,"state":"filtered"},{"kind":"?","port":5000,"state":"closed"}]}"#;
        assert_eq!(serde_json::to_string(&r).unwrap(), want);
        // Serialized directly or through serde_json::Value (sorted keys): the same bytes.
        assert_eq!(serde_json::to_value(&r).unwrap().to_string(), want);
        assert_eq!(serde_json::from_str::<PortReport>(want).unwrap(), r);
        for s in [PortState::Open, PortState::Closed, PortState::Filtered] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{}\"", state_name(s)));
        }
    }
}
