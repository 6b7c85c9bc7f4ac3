//! `peervm bootstrap`: a node that only helps peers meet (Kademlia server, sync server,
//! gossip relay).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use peervm_node::metrics::Metrics;
use peervm_node::network::{Node, NodeConfig, Role};

use super::announce;
use super::args::{SwarmArgs, multiaddrs};
use super::identity::load_or_init_key;

#[derive(Args)]
pub struct BootstrapArgs {
    /// Address to listen on (repeatable).
    #[arg(long, value_name = "MULTIADDR", default_values_t = ["/ip4/0.0.0.0/tcp/4001".to_string(), "/ip4/0.0.0.0/udp/4001/quic-v1".to_string()])]
    listen: Vec<String>,
    /// Identity key file, created if missing, so the address stays the same across restarts.
    /// Default: <data-dir>/identity.key.
    #[arg(long, value_name = "PATH")]
    key: Option<PathBuf>,
    #[command(flatten)]
    swarm: SwarmArgs,
    /// Serve Prometheus metrics on this loopback address, e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Print the startup line as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: BootstrapArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let listen = multiaddrs(&args.listen)?;
    let others = multiaddrs(&args.swarm.bootstrap)?;
    let key = load_or_init_key(&args.key.unwrap_or_else(|| peervm_node::paths::identity_key_path(data_dir)))?;
    let metrics = Arc::new(Metrics::default());
    let mut config = NodeConfig::new(key, Role::Bootstrap);
    config.listen = listen;
    config.bootstrap = others;
    config.metrics = Some(metrics.clone());
    let node = Node::start(config).await?;
    if let Some(addr) = args.metrics {
        let bound = peervm_node::metrics::serve(metrics, addr).await?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    announce::announce("bootstrap", node.peer_id, &node.listen_addrs, args.json);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    node.stop().await;
    Ok(ExitCode::SUCCESS)
}
