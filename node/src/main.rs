//! `peervm`: one binary for providers, requestors and bootstrap nodes.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use libp2p::Multiaddr;
use peervm_node::advert_store::OfferFilter;
use peervm_node::config::{ProviderConfig, parse_addrs};
use peervm_node::metrics::Metrics;
use peervm_node::network::{Node, NodeConfig, NodeEvent, Role};
use peervm_node::offers::{self, OfferLine};
use peervm_node::{keystore, paths, provider::Provider, startup, units};

#[derive(Parser)]
#[command(name = "peervm", version, about = "A peer-to-peer market for virtual machines")]
struct Cli {
    /// Data directory (keys, state). Default: $PEERVM_DATA_DIR, else $XDG_DATA_HOME/peervm,
    /// else ~/.local/share/peervm.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage this node's identity key.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Run a bootstrap node: Kademlia server, sync server and gossip relay.
    Bootstrap(BootstrapArgs),
    /// Provider commands.
    #[command(subcommand)]
    Provider(ProviderCommand),
    /// List the verified offers on the market, cheapest first.
    Offers(OffersArgs),
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a new identity key, encrypted with a passphrase ($PEERVM_PASSPHRASE, else
    /// asked twice on the terminal). Refuses to overwrite an existing one.
    Init {
        /// Key file. Default: <data-dir>/identity.key.
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// Store the key unencrypted (development only; anyone who can read the file can
        /// impersonate this node).
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Print this node's PeerId (as recorded in the key file; needs no passphrase).
    Show {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Change the key's passphrase, keeping its PeerId: the old one from $PEERVM_PASSPHRASE
    /// or a prompt, the new one from $PEERVM_NEW_PASSPHRASE or a prompt (asked twice).
    /// Encrypts a plaintext key.
    ChangePassword {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Print the 32-byte ed25519 seed as hex, for backup or migration (needs the passphrase).
    Export {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
}

#[derive(Args)]
struct SwarmArgs {
    /// A bootstrap node's multiaddr, ending in /p2p/<peer-id> (repeatable).
    #[arg(long = "bootstrap", value_name = "MULTIADDR", env = "PEERVM_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
}

#[derive(Args)]
struct BootstrapArgs {
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

#[derive(Subcommand)]
enum ProviderCommand {
    /// Run the provider daemon.
    Run {
        /// Provider config (TOML). Default: /etc/peervm/provider.toml.
        #[arg(long, value_name = "PATH", default_value = "/etc/peervm/provider.toml")]
        config: PathBuf,
        /// Identity key file, created if missing. Default: <data-dir>/identity.key.
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct OffersArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    /// At least this many free vCPUs (also the vCPUs the price is quoted for).
    #[arg(long)]
    vcpus: Option<u32>,
    /// At least this much free memory, e.g. 4GiB or 512MiB.
    #[arg(long)]
    memory: Option<String>,
    /// At least this much free disk, e.g. 20GiB.
    #[arg(long)]
    disk: Option<String>,
    /// Highest price per hour for the requested size, in currency units, e.g. 0.05.
    #[arg(long)]
    max_price: Option<String>,
    /// Only offers priced in this currency.
    #[arg(long)]
    currency: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// Offers that have this image.
    #[arg(long)]
    image: Option<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep running and print the offers again whenever the market changes.
    #[arg(long)]
    watch: bool,
    /// Show at most this many offers (0 = all).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Seconds to wait for the bootstrap nodes.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peervm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peervm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn multiaddrs(list: &[String]) -> anyhow::Result<Vec<Multiaddr>> {
    parse_addrs(list).map_err(anyhow::Error::msg)
}

/// Loads the key at `path`, creating it first if it does not exist: encrypted when
/// $PEERVM_PASSPHRASE is set, otherwise in plaintext with a loud warning, so unattended
/// services keep starting (see the `keystore` module doc).
fn load_or_init_key(path: &std::path::Path) -> anyhow::Result<peervm_protocol::SigningKey> {
    if path.exists() {
        Ok(keystore::load(path)?)
    } else if std::env::var_os(keystore::PASSPHRASE_ENV).is_some() {
        let pass = keystore::read_passphrase(keystore::PASSPHRASE_ENV, "", false, "the new identity key")?;
        let key = keystore::init(path, Some(&pass)).context("cannot create the identity key")?;
        eprintln!("created encrypted identity key {}", path.display());
        Ok(key)
    } else {
        let key = keystore::init(path, None).context("cannot create the identity key")?;
        warn_plaintext_created(path);
        Ok(key)
    }
}

fn warn_plaintext_created(path: &std::path::Path) {
    eprintln!(
        "WARNING: created identity key {} UNENCRYPTED (development only): anyone who can read it can \
         impersonate this node. Set {} to create an encrypted key, or encrypt this one with: \
         peervm key change-password",
        path.display(),
        keystore::PASSPHRASE_ENV
    );
}

fn key_cmd(cmd: KeyCommand, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let path_or_default = |key: Option<PathBuf>| key.unwrap_or_else(|| paths::identity_key_path(data_dir));
    match cmd {
        KeyCommand::Init { key, insecure_plaintext } => {
            let path = path_or_default(key);
            if path.exists() {
                // Fail before asking for a passphrase.
                return Err(peervm_node::secure_fs::SecureFsError::Exists { path }.into());
            }
            let k = if insecure_plaintext {
                let k = keystore::init(&path, None).context("cannot create the identity key")?;
                warn_plaintext_created(&path);
                k
            } else {
                let what = format!("the new identity key {}", path.display());
                let pass = keystore::read_passphrase(keystore::PASSPHRASE_ENV, "New passphrase: ", true, &what)?;
                let k = keystore::init(&path, Some(&pass)).context("cannot create the identity key")?;
                eprintln!("created encrypted identity key {}", path.display());
                k
            };
            println!("{}", k.peer_id());
        }
        KeyCommand::Show { key } => {
            let path = path_or_default(key);
            // A plaintext key is loaded, which proves the file is intact; an encrypted one
            // shows the recorded PeerId without the passphrase (loading it checks it).
            let peer_id = match keystore::protection(&path)? {
                keystore::Protection::Plaintext => keystore::load(&path)?.peer_id(),
                keystore::Protection::AgeScrypt => keystore::peer_id(&path)?,
            };
            println!("{peer_id}");
        }
        KeyCommand::ChangePassword { key } => {
            let path = path_or_default(key);
            let what = format!("the identity key {}", path.display());
            let old = match keystore::protection(&path)? {
                keystore::Protection::Plaintext => None,
                keystore::Protection::AgeScrypt => Some(keystore::read_passphrase(
                    keystore::PASSPHRASE_ENV,
                    &format!("Current passphrase for {}: ", path.display()),
                    false,
                    &what,
                )?),
            };
            // Check the old passphrase before asking for a new one.
            let k = keystore::load_with(&path, old.as_ref())?;
            let new = keystore::read_passphrase(keystore::NEW_PASSPHRASE_ENV, "New passphrase: ", true, &what)?;
            let peer_id = keystore::rewrite_encrypted(&path, &k, &new)?;
            eprintln!("changed the passphrase of {}", path.display());
            println!("{peer_id}");
        }
        KeyCommand::Export { key } => {
            let path = path_or_default(key);
            let k = keystore::load(&path)?;
            eprintln!(
                "warning: the line below is this node's secret key; anyone who sees it can impersonate {}",
                k.peer_id()
            );
            let hex = zeroize::Zeroizing::new(hex::encode(*k.seed()));
            println!("{}", *hex);
        }
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(paths::default_data_dir);
    match cli.command {
        Command::Key(cmd) => key_cmd(cmd, &data_dir)?,
        Command::Bootstrap(args) => bootstrap(args, &data_dir).await?,
        Command::Provider(ProviderCommand::Run { config, key, json }) => {
            let config = ProviderConfig::load(&config)?;
            let data_dir = config.data_dir.clone().unwrap_or(data_dir);
            let key = load_or_init_key(&key.unwrap_or_else(|| paths::identity_key_path(&data_dir)))?;
            let metrics_addr = config.metrics;
            let metrics = Arc::new(Metrics::default());
            let provider = Provider::start(config, key, Some(metrics.clone())).await?;
            if let Some(addr) = metrics_addr {
                let bound = peervm_node::metrics::serve(metrics, addr).await?;
                eprintln!("metrics on http://{bound}/metrics");
            }
            startup::announce("provider", provider.node().peer_id, &provider.node().listen_addrs, json);
            provider.run_until_signal().await?;
        }
        Command::Offers(args) => offers_cmd(args).await?,
    }
    Ok(())
}

async fn bootstrap(args: BootstrapArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let listen = multiaddrs(&args.listen)?;
    let others = multiaddrs(&args.swarm.bootstrap)?;
    let key = load_or_init_key(&args.key.unwrap_or_else(|| paths::identity_key_path(data_dir)))?;
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
    startup::announce("bootstrap", node.peer_id, &node.listen_addrs, args.json);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    node.stop().await;
    Ok(())
}

fn offer_filter(args: &OffersArgs) -> anyhow::Result<OfferFilter> {
    Ok(OfferFilter {
        min_vcpus: args.vcpus,
        min_memory_mib: args.memory.as_deref().map(|m| units::parse_size_mib(m, 1)).transpose()?,
        min_disk_gib: args.disk.as_deref().map(units::parse_size_gib).transpose()?,
        max_price_micros: args.max_price.as_deref().map(units::parse_micros).transpose()?,
        currency: args.currency.clone(),
        region: args.region.clone(),
        accel: args.accel.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?,
        image: args.image.clone(),
        exclude: Default::default(),
    })
}

async fn offers_cmd(args: OffersArgs) -> anyhow::Result<()> {
    let filter = offer_filter(&args)?;
    let bootstrap = multiaddrs(&args.swarm.bootstrap)?;
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let node = offers::join(&bootstrap, Duration::from_secs(args.timeout)).await?;
    let print = |node: &Node| {
        let list = offers::current(node, &filter, args.limit);
        if args.json {
            for o in &list {
                println!("{}", serde_json::to_string(&OfferLine::from(o)).unwrap_or_default());
            }
        } else if list.is_empty() {
            println!("no offers match");
        } else {
            print!("{}", offers::table(&list, &filter));
        }
    };
    print(&node);
    if args.watch {
        let mut events = node.subscribe();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(NodeEvent::AdvertStored { .. }) | Ok(NodeEvent::AdvertsExpired(_)) => {
                        // Coalesce bursts (a sync page) into one redraw.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        while events.try_recv().is_ok() {}
                        if !args.json { println!(); }
                        print(&node);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
    }
    node.stop().await;
    Ok(())
}
