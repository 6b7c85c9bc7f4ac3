//! `peervm provider ...`: run the daemon, or operate a running one through its admin
//! socket (provider_admin.rs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Subcommand};
use peervm_node::metrics::Metrics;
use peervm_node::provider::Provider;
use peervm_node::provider::config::ProviderConfig;

use super::announce;
use super::identity::load_or_init_key;
use super::provider_admin;

#[derive(Subcommand)]
pub enum ProviderCommand {
    /// Run the provider daemon.
    Run {
        /// Provider config (TOML). Default: /etc/peervm/provider.toml.
        #[arg(long, value_name = "PATH", default_value = "/etc/peervm/provider.toml")]
        config: PathBuf,
        /// Identity key file, created if missing. Default: <data-dir>/identity.key.
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// The VMM helper's socket (`peervm vmm-helper`): guests run there. Default when
        /// not root: /run/peervm-vmm/vmm.sock. As root without it, guests run in this
        /// process (development only).
        #[arg(long, value_name = "PATH", env = "PEERVM_VMM_SOCKET")]
        vmm_socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// The running provider's identity, capacity and lease counts (admin socket).
    Status(AdminArgs),
    /// Every lease the provider knows, newest first.
    Leases(AdminArgs),
    /// End a lease now (the operator's decision; the requestor's consent is not needed).
    Terminate {
        lease: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Cut a lease's guest off the network but keep it, its disk and console log for
    /// inspection until you terminate it.
    Isolate {
        lease: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Block a requestor: its running leases end, its requests are denied, the swarm
    /// refuses it.
    Block {
        peer: String,
        #[arg(long, default_value = "blocked by the operator")]
        reason: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    Unblock {
        peer: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// The blocked requestors.
    Blocked(AdminArgs),
    /// Sign and publish this provider's block list (its blocked peers and reasons), for
    /// the operators who chose to trust it.
    PublishBlocklist(AdminArgs),
    /// Stop accepting leases and signing adverts (running leases go on).
    Lock(AdminArgs),
    Unlock(AdminArgs),
    /// Re-read the config file the provider started from, as SIGHUP does.
    ///
    /// Prices, advert fields, resources, lease limits and trusted block lists apply at
    /// once and are re-advertised; running leases keep their terms. A change that needs a
    /// restart (listen addresses, data dir, SSH ports, network, hypervisor, images) is
    /// refused whole, naming those fields, and the running config stays.
    Reload(AdminArgs),
}

#[derive(Args)]
pub struct AdminArgs {
    /// The provider's config, to find its data dir (else --data-dir / the default).
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Print the raw JSON reply.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(cmd: ProviderCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    match cmd {
        ProviderCommand::Run { config, key, vmm_socket, json } => {
            run_daemon(&config, key, vmm_socket, json, data_dir).await
        }
        admin => provider_admin::run(admin, data_dir).await,
    }
}

async fn run_daemon(
    config_path: &Path,
    key: Option<PathBuf>,
    vmm_socket: Option<PathBuf>,
    json: bool,
    data_dir: &Path,
) -> anyhow::Result<ExitCode> {
    // Every file and directory this daemon creates is private to its user.
    // SAFETY: umask(2) only sets the process's file creation mask.
    unsafe { libc::umask(0o077) };
    let config = ProviderConfig::load(config_path)?;
    let data_dir = config.data_dir.clone().unwrap_or_else(|| data_dir.to_path_buf());
    let key = load_or_init_key(&key.unwrap_or_else(|| peervm_node::paths::identity_key_path(&data_dir)))?;
    let metrics_addr = config.metrics;
    let metrics = Arc::new(Metrics::default());
    // Not root: the guests can only run in the VMM helper.
    // SAFETY: geteuid(2) cannot fail
    let vmm_socket = vmm_socket.or_else(|| {
        (unsafe { libc::geteuid() } != 0).then(|| PathBuf::from(peervm_node::provider::vmm_helper::DEFAULT_SOCKET))
    });
    let provider = Provider::start(config, key, &data_dir, Some(metrics.clone()), vmm_socket.as_deref()).await?;
    if let Some(addr) = metrics_addr {
        let bound = peervm_node::metrics::serve(metrics, addr).await?;
        eprintln!("metrics on http://{bound}/metrics");
    }
    announce::announce("provider", provider.node().peer_id, &provider.node().listen_addrs, json);
    // Type=notify: started once it listens and its images verified (service_notify.rs)
    peervm_node::service_notify::ready(&format!("serving as {}", provider.node().peer_id));
    provider.run_until_signal(config_path.to_path_buf()).await?;
    Ok(ExitCode::SUCCESS)
}
