//! `peervm provider status` for people: the running provider's identity, lock state,
//! leases, capacity and last port verification as a table (`--json` prints the admin
//! reply as it is; README "Provider").

use peervm_node::provider::admin::StatusReport;
use peervm_node::provider::reachability::state_name;
use peervm_protocol::ResourceAmounts;

use super::render::format_time_at;

/// The status report as aligned `name  value` lines; `data_dir` says which provider was
/// asked (README "Provider"), `now` places the port check in time.
pub fn render(s: &StatusReport, data_dir: &str, now: u64) -> String {
    let mut rows: Vec<(&str, String)> = vec![
        ("provider", s.node.peer_id.clone()),
        ("data dir", data_dir.to_string()),
        ("listening", if s.node.listen_addrs.is_empty() { "-".into() } else { s.node.listen_addrs.join(", ") }),
        ("accel", s.node.accel.clone()),
        ("locked", if s.locked { "yes: no new leases, no adverts (`provider unlock`)".into() } else { "no".into() }),
        ("leases", format!("{} active", s.leases_active)),
        ("capacity", capacity(&s.free, &s.total)),
    ];
    let ports = match &s.reachability {
        None => "not checked yet (a peer dials back about 5 s after start, then every 10 min)".to_string(),
        Some(r) => {
            let ports: Vec<String> = r
                .ports
                .iter()
                .map(|p| {
                    let verdict = if p.reachable() { "" } else { " (unreachable)" };
                    format!("{} {} {}{verdict}", p.kind.as_str(), p.port, state_name(p.state))
                })
                .collect();
            format!(
                "{} from {} by {}: {}",
                format_time_at(r.checked_at_unix_ms, now),
                r.observed_ip,
                r.by,
                if ports.is_empty() { "no ports".into() } else { ports.join(", ") }
            )
        }
    };
    rows.push(("ports", ports));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter().map(|(k, v)| format!("{k:<width$}  {v}\n")).collect()
}

fn capacity(free: &ResourceAmounts, total: &ResourceAmounts) -> String {
    format!(
        "free {} of {} vCPUs, {} of {} MiB memory, {} of {} GiB disk",
        free.vcpus, total.vcpus, free.memory_mib, total.memory_mib, free.disk_gib, total.disk_gib
    )
}

#[cfg(test)]
mod tests {
    use peervm_node::network::dialback::PortState;
    use peervm_node::provider::admin::{NodeInfo, StatusReport};
    use peervm_node::provider::reachability::{PortKind, PortProbe, PortReport};
    use peervm_protocol::ResourceAmounts;

    use super::render;

    fn report() -> StatusReport {
        StatusReport {
            node: NodeInfo {
                peer_id: "12D3KooWProvider".into(),
                listen_addrs: vec!["/ip4/127.0.0.1/tcp/4002".into()],
                accel: "kvm".into(),
            },
            locked: false,
            leases_active: 1,
            total: ResourceAmounts { vcpus: 2, memory_mib: 2048, disk_gib: 10 },
            free: ResourceAmounts { vcpus: 1, memory_mib: 1792, disk_gib: 9 },
            reachability: None,
        }
    }

    #[test]
    fn status_is_a_table_for_people_not_json() {
        let text = render(&report(), "/srv/p ([node] data_dir of /etc/p.toml)", 1_000_000);
        assert_eq!(
            text,
            "provider   12D3KooWProvider\n\
             data dir   /srv/p ([node] data_dir of /etc/p.toml)\n\
             listening  /ip4/127.0.0.1/tcp/4002\n\
             accel      kvm\n\
             locked     no\n\
             leases     1 active\n\
             capacity   free 1 of 2 vCPUs, 1792 of 2048 MiB memory, 9 of 10 GiB disk\n\
             ports      not checked yet (a peer dials back about 5 s after start, then every 10 min)\n"
        );
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
    }

    #[test]
    fn the_port_check_says_when_by_whom_and_which_ports_fail() {
        let mut s = report();
        s.locked = true;
        s.reachability = Some(PortReport {
            by: "12D3KooWPeer".into(),
            checked_at_unix_ms: 1_000_000 - 180_000,
            observed_ip: "203.0.113.7".into(),
            ports: vec![
                PortProbe { kind: PortKind::Libp2p, port: 4002, state: PortState::Open },
                PortProbe { kind: PortKind::Ssh, port: 27400, state: PortState::Closed },
                PortProbe { kind: PortKind::Ssh, port: 27415, state: PortState::Filtered },
            ],
        });
        let text = render(&s, "/srv/p", 1_000_000);
        assert!(text.contains("locked     yes: no new leases, no adverts (`provider unlock`)\n"), "{text}");
        assert!(
            text.contains(
                "ports      3m00s ago from 203.0.113.7 by 12D3KooWPeer: libp2p 4002 open, ssh 27400 closed, \
                 ssh 27415 filtered (unreachable)\n"
            ),
            "{text}"
        );
    }
}
