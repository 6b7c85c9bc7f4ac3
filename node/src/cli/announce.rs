//! What a long-lived node prints when it starts: its full dialable addresses.

use libp2p::{Multiaddr, PeerId};

pub fn announce(role: &str, peer_id: PeerId, addrs: &[Multiaddr], json: bool) {
    if json {
        let line = serde_json::json!({
            "event": "listening",
            "role": role,
            "peer_id": peer_id.to_string(),
            "listen_addrs": addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        });
        println!("{line}");
    } else {
        println!("peervm {role} {peer_id} listening on:");
        for a in addrs {
            println!("  {a}");
        }
    }
}
