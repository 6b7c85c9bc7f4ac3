//! Arguments that several commands share: how to reach the swarm and whose block lists
//! to apply.

use std::collections::HashSet;

use clap::Args;
use libp2p::{Multiaddr, PeerId};

#[derive(Args)]
pub struct SwarmArgs {
    /// A bootstrap node's multiaddr, ending in /p2p/<peer-id> (repeatable).
    #[arg(long = "bootstrap", value_name = "MULTIADDR", env = "PEERVM_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
}

impl SwarmArgs {
    pub fn addrs(&self) -> anyhow::Result<Vec<Multiaddr>> {
        multiaddrs(&self.bootstrap)
    }
}

#[derive(Args)]
pub struct TrustArgs {
    /// Apply the signed block lists of this operator (a peer id; repeatable): the
    /// providers it lists are hidden.
    #[arg(long = "trust-blocklist", value_name = "PEER_ID", env = "PEERVM_TRUST_BLOCKLIST", value_delimiter = ',')]
    pub trust_blocklist: Vec<String>,
}

impl TrustArgs {
    pub fn peers(&self) -> anyhow::Result<HashSet<PeerId>> {
        self.trust_blocklist
            .iter()
            .map(|p| p.parse().map_err(|_| anyhow::anyhow!("--trust-blocklist `{p}` is not a peer id")))
            .collect()
    }
}

pub fn multiaddrs(list: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    peervm_node::provider::config::parse_addrs(list).map_err(anyhow::Error::msg)
}

/// `text` as a peer id, or an error naming the argument.
pub fn peer_id(text: &str) -> anyhow::Result<PeerId> {
    text.parse().map_err(|_| anyhow::anyhow!("`{text}` is not a peer id"))
}
