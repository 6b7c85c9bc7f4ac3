//! `/peervm/dialback/1`: port verification. A provider asks a connected peer to open TCP
//! connections back to it on a few ports (its libp2p port, some of its SSH ports) and
//! learns whether they are reachable from outside: `open` (connected), `closed` (refused:
//! the host answered, nothing listens now) or `filtered` (no answer: a firewall drops it).
//!
//! The serving peer dials only the IP address it sees the asking peer's connection come
//! from, at most [`DIALBACK_MAX_PORTS`] ports, never below 1024, and at most once per peer
//! per [`DIALBACK_MIN_INTERVAL`](super::tuning::DIALBACK_MIN_INTERVAL): nobody can use a
//! node to scan a third party (docs/protocol.md, section 7c). A request that names another
//! address is refused.

use std::net::{IpAddr, SocketAddr};

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use super::tuning::{DIALBACK_CONNECT_TIMEOUT, DIALBACK_MAX_PORTS};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/peervm/dialback/1");

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DialBackRequest {
    /// The address the asker believes it has. Optional; when given it must be the one the
    /// server sees, or the request is refused (it would be a third party's).
    pub ip: Option<String>,
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortState {
    Open,
    Closed,
    Filtered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DialBackResponse {
    /// What the server saw, port by port, dialing `observed_ip`.
    Result {
        observed_ip: String,
        ports: Vec<(u16, PortState)>,
    },
    Refused {
        reason: String,
    },
}

/// Checks a request against the rules above; the ports to dial on `observed`, or why not.
pub fn admissible(request: &DialBackRequest, observed: IpAddr) -> Result<Vec<u16>, String> {
    if let Some(claimed) = &request.ip {
        let claimed: IpAddr = claimed.parse().map_err(|_| format!("`{claimed}` is not an IP address"))?;
        if claimed != observed {
            return Err(format!(
                "refusing to dial {claimed}: only the address this connection comes from ({observed}) is dialed back"
            ));
        }
    }
    if request.ports.is_empty() || request.ports.len() > DIALBACK_MAX_PORTS {
        return Err(format!("ask for 1 to {DIALBACK_MAX_PORTS} ports, not {}", request.ports.len()));
    }
    if let Some(p) = request.ports.iter().find(|p| **p < 1024) {
        return Err(format!("port {p} is a system port; only 1024 and up are dialed back"));
    }
    let mut ports = request.ports.clone();
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// Dials `ip` on each port (concurrently) and reports what happened.
pub async fn probe(ip: IpAddr, ports: &[u16]) -> Vec<(u16, PortState)> {
    let probes = ports.iter().map(|&port| async move {
        let addr = SocketAddr::new(ip, port);
        let state = match tokio::time::timeout(DIALBACK_CONNECT_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(_)) => PortState::Open,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => PortState::Closed,
            _ => PortState::Filtered,
        };
        (port, state)
    });
    futures::future::join_all(probes).await
}

/// The IP of a peer's connection, from its multiaddr.
pub fn ip_of(addr: &libp2p::Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        libp2p::multiaddr::Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        libp2p::multiaddr::Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_observed_address_and_a_few_unprivileged_ports_are_dialed() {
        let me: IpAddr = "198.51.100.7".parse().unwrap();
        let ok = DialBackRequest { ip: None, ports: vec![4001, 22000, 4001] };
        assert_eq!(admissible(&ok, me), Ok(vec![4001, 22000]));
        let same = DialBackRequest { ip: Some("198.51.100.7".into()), ports: vec![4001] };
        assert!(admissible(&same, me).is_ok());
        let third = DialBackRequest { ip: Some("203.0.113.9".into()), ports: vec![4001] };
        assert!(admissible(&third, me).unwrap_err().contains("refusing to dial 203.0.113.9"));
        let many = DialBackRequest { ip: None, ports: (2000..2009).collect() };
        assert!(admissible(&many, me).is_err());
        let low = DialBackRequest { ip: None, ports: vec![22] };
        assert!(admissible(&low, me).is_err());
        let junk = DialBackRequest { ip: Some("not-an-ip".into()), ports: vec![4001] };
        assert!(admissible(&junk, me).is_err());
    }

    #[tokio::test]
    async fn probe_tells_open_from_closed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().port();
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let got = probe("127.0.0.1".parse().unwrap(), &[open, closed]).await;
        assert_eq!(got, vec![(open, PortState::Open), (closed, PortState::Closed)]);
    }
}
