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
use peervm_node::requestor::client::{self, CreateOptions, ProviderChoice, Requestor, Stage};
use peervm_node::requestor::db::StoredLease;
use peervm_node::requestor::ssh;
use peervm_node::{keystore, paths, provider::Provider, startup, units};
use peervm_protocol::{ControlAction, LeaseState, ReplyOutcome};

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
    /// Lease a VM, and look after your leases.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Open an SSH session to a lease's guest (OpenSSH, pinned host key, lease key).
    Ssh {
        /// Lease id (or a unique prefix of at least 4 hex digits).
        lease: String,
        /// Extra arguments for ssh (after --), e.g. a remote command.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run a command in a lease's guest (built-in SSH client); exits with its exit code.
    Exec {
        lease: String,
        /// The command (after --).
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Print a Host block for ~/.ssh/config that reaches a lease's guest.
    SshConfig { lease: String },
    /// Block a provider on your side: its offers are hidden and never leased.
    Block {
        peer: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lift a block of a provider.
    Unblock { peer: String },
    /// The providers you blocked.
    Blocked,
    /// Owner keys: delegate a node key to run for an owner.
    #[command(subcommand)]
    Owner(OwnerCommand),
    /// Check this machine against the provider checklist: each line pass / warn / fail
    /// with its fix. Exits non-zero when something fails.
    Doctor {
        /// Provider config (TOML).
        #[arg(long, value_name = "PATH", default_value = "/etc/peervm/provider.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum OwnerCommand {
    /// Sign a delegation from an owner key (kept offline) to a node key, valid for
    /// `--days`. Put the file in the node's config (`[advert] delegation`). To rotate a
    /// compromised node key, delegate to the new key with `--replaces <old>`: nodes drop
    /// the old key's adverts made under this owner.
    Delegate {
        /// The owner's identity key file (`peervm key init --key owner.key`).
        #[arg(long, value_name = "PATH")]
        owner_key: PathBuf,
        /// The node's peer id (`peervm key show` on the node).
        #[arg(long, value_name = "PEER_ID")]
        node: String,
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Payout address the node's adverts must name.
        #[arg(long)]
        beneficiary: Option<String>,
        /// A node key of this owner that the new one retires (repeatable).
        #[arg(long, value_name = "PEER_ID")]
        replaces: Vec<String>,
        /// Where to write the signed delegation.
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum LeaseCommand {
    /// Lease a VM: picks an offer, sends a signed request, waits for the guest, pins its
    /// host key and prints how to reach it.
    Create(CreateArgs),
    /// The leases this requestor holds (from its local store).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Ask the provider for a lease's state and resource use.
    Status {
        lease: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
    /// Make a lease longer, e.g. `--by 1h`.
    Extend {
        lease: String,
        #[arg(long, value_name = "DURATION")]
        by: String,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
    /// End a lease now: the provider stops the guest and frees everything.
    Terminate {
        lease: String,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
}

#[derive(Args)]
struct CreateArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// A provider's peer id, or `cheapest`.
    #[arg(long, default_value = "cheapest")]
    provider: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value = "512MiB")]
    memory: String,
    #[arg(long, default_value = "2GiB")]
    disk: String,
    #[arg(long, default_value = "minimal")]
    image: String,
    /// Lease length in hours (whole or decimal).
    #[arg(long, conflicts_with = "duration")]
    hours: Option<f64>,
    /// Lease length with a unit: 90s, 30m, 2h, 7d. Default 1h.
    #[arg(long)]
    duration: Option<String>,
    /// Use this ed25519 private key instead of a fresh one per lease.
    #[arg(long, value_name = "PATH")]
    ssh_key: Option<PathBuf>,
    /// Login name in the guest.
    #[arg(long, default_value = "peervm")]
    user: String,
    /// Most to pay per hour, in currency units (default: the advertised price).
    #[arg(long)]
    max_price: Option<String>,
    /// Seconds to wait for the bootstrap nodes.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print the lease as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
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
struct TrustArgs {
    /// Apply the signed block lists of this operator (a peer id; repeatable): the
    /// providers it lists are hidden.
    #[arg(long = "trust-blocklist", value_name = "PEER_ID", env = "PEERVM_TRUST_BLOCKLIST", value_delimiter = ',')]
    trust_blocklist: Vec<String>,
}

impl TrustArgs {
    fn peers(&self) -> anyhow::Result<std::collections::HashSet<libp2p::PeerId>> {
        self.trust_blocklist
            .iter()
            .map(|p| p.parse().map_err(|_| anyhow::anyhow!("--trust-blocklist `{p}` is not a peer id")))
            .collect()
    }
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
}

#[derive(Args)]
struct AdminArgs {
    /// The provider's config, to find its data dir (else --data-dir / the default).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the raw JSON reply.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct OffersArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    trust: TrustArgs,
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
    /// Only providers run for this owner (its peer id, from their delegation).
    #[arg(long, value_name = "PEER_ID")]
    owner: Option<String>,
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
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("peervm: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
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

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(paths::default_data_dir);
    match cli.command {
        Command::Key(cmd) => key_cmd(cmd, &data_dir)?,
        Command::Bootstrap(args) => bootstrap(args, &data_dir).await?,
        Command::Provider(ProviderCommand::Run { config, key, json }) => {
            // Every file and directory this daemon creates is private to its user.
            // SAFETY: umask(2) only sets the process's file creation mask.
            unsafe { libc::umask(0o077) };
            let config = ProviderConfig::load(&config)?;
            let data_dir = config.data_dir.clone().unwrap_or(data_dir);
            let key = load_or_init_key(&key.unwrap_or_else(|| paths::identity_key_path(&data_dir)))?;
            let metrics_addr = config.metrics;
            let metrics = Arc::new(Metrics::default());
            let provider = Provider::start(config, key, &data_dir, Some(metrics.clone())).await?;
            if let Some(addr) = metrics_addr {
                let bound = peervm_node::metrics::serve(metrics, addr).await?;
                eprintln!("metrics on http://{bound}/metrics");
            }
            startup::announce("provider", provider.node().peer_id, &provider.node().listen_addrs, json);
            provider.run_until_signal().await?;
        }
        Command::Provider(cmd) => return admin_cmd(cmd, &data_dir).await,
        Command::Offers(args) => offers_cmd(args, &data_dir).await?,
        Command::Lease(cmd) => lease_cmd(cmd, &data_dir).await?,
        Command::Ssh { lease, args } => return ssh_cmd(&lease, &args, &data_dir),
        Command::Exec { lease, command } => return exec_cmd(&lease, &command, &data_dir).await,
        Command::Block { peer, reason } => {
            let p: libp2p::PeerId = peer.parse().map_err(|_| anyhow::anyhow!("`{peer}` is not a peer id"))?;
            let db = requestor_db(&data_dir)?;
            db.block(&p, &reason, peervm_node::network::now_unix_ms())?;
            println!("blocked {p}: its offers are hidden and it is never leased from");
        }
        Command::Unblock { peer } => {
            let p: libp2p::PeerId = peer.parse().map_err(|_| anyhow::anyhow!("`{peer}` is not a peer id"))?;
            if requestor_db(&data_dir)?.unblock(&p)? {
                println!("unblocked {p}");
            } else {
                println!("{p} was not blocked");
            }
        }
        Command::Blocked => {
            for (p, reason, at) in requestor_db(&data_dir)?.blocked()? {
                println!("{p}  {}  {reason}", format_time(at));
            }
        }
        Command::Owner(OwnerCommand::Delegate { owner_key, node, days, beneficiary, replaces, out }) => {
            let owner = keystore::load(&owner_key)?;
            let parse = |p: &str| p.parse::<libp2p::PeerId>().map_err(|_| anyhow::anyhow!("`{p}` is not a peer id"));
            if days == 0 || days > 366 {
                bail!("--days must be 1..=366");
            }
            let now = peervm_node::network::now_unix_ms();
            let delegation = peervm_protocol::Delegation {
                version: peervm_protocol::delegation::DELEGATION_VERSION,
                owner: owner.peer_id(),
                node: parse(&node)?,
                not_before_unix_ms: now.saturating_sub(60_000),
                not_after_unix_ms: now + days * 86_400_000,
                beneficiary,
                replaces: replaces.iter().map(|p| parse(p)).collect::<anyhow::Result<_>>()?,
            };
            delegation.check_well_formed()?;
            let signed = peervm_protocol::Signed::sign(&owner, &delegation)?;
            std::fs::write(&out, signed.to_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
            println!(
                "owner {} delegates to {} until {}",
                owner.peer_id(),
                delegation.node,
                format_time(delegation.not_after_unix_ms)
            );
        }
        Command::Doctor { config, json } => {
            let config = ProviderConfig::load(&config)?;
            let dir = config.data_dir.clone().unwrap_or(data_dir.clone());
            let checks = peervm_node::doctor::run(&config, &dir).await;
            if json {
                println!("{}", serde_json::to_string(&checks)?);
            } else {
                print!("{}", peervm_node::doctor::render(&checks));
            }
            if checks.iter().any(|c| c.verdict == peervm_node::doctor::Verdict::Fail) {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::SshConfig { lease } => {
            let r = requestor(&data_dir)?;
            let l = r.db().find(&lease)?;
            let known_hosts = r.pin_host_key(&l)?;
            print!("{}", ssh::ssh_config_block(&r.ssh_target(&l)?, &known_hosts));
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn admin_cmd(cmd: ProviderCommand, data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use peervm_node::admin::{self, AdminRequest};
    let (request, args) = match cmd {
        ProviderCommand::Run { .. } => unreachable!("handled in run"),
        ProviderCommand::Status(a) => (AdminRequest::Status, a),
        ProviderCommand::Leases(a) => (AdminRequest::Leases, a),
        ProviderCommand::Terminate { lease, admin } => (AdminRequest::Terminate { lease }, admin),
        ProviderCommand::Isolate { lease, admin } => (AdminRequest::Isolate { lease }, admin),
        ProviderCommand::Block { peer, reason, admin } => (AdminRequest::Block { peer, reason }, admin),
        ProviderCommand::Unblock { peer, admin } => (AdminRequest::Unblock { peer }, admin),
        ProviderCommand::Blocked(a) => (AdminRequest::Blocked, a),
        ProviderCommand::Lock(a) => (AdminRequest::Lock, a),
        ProviderCommand::PublishBlocklist(a) => (AdminRequest::PublishBlocklist, a),
        ProviderCommand::Unlock(a) => (AdminRequest::Unlock, a),
    };
    let dir = match &args.config {
        Some(path) => ProviderConfig::load(path)?.data_dir.unwrap_or_else(|| data_dir.to_path_buf()),
        None => data_dir.to_path_buf(),
    };
    let reply = admin::call(&admin::socket_path(&dir), &request).await?;
    if !reply.ok {
        bail!("{}", reply.error.unwrap_or_else(|| "the provider refused".into()));
    }
    if args.json {
        println!("{}", reply.result);
    } else if let (AdminRequest::Leases, serde_json::Value::Array(list)) = (&request, &reply.result) {
        if list.is_empty() {
            println!("no leases");
        } else {
            println!("{:<32}  {:<12}  {:<8}  {:<14}  REQUESTOR", "LEASE", "STATE", "ISOLATED", "ENDS");
            for l in list {
                println!(
                    "{:<32}  {:<12}  {:<8}  {:<14}  {}",
                    l["lease"].as_str().unwrap_or("?"),
                    l["state"].as_str().unwrap_or("?"),
                    if l["isolated"].as_bool().unwrap_or(false) { "yes" } else { "" },
                    format_time(l["ends_at_unix_ms"].as_u64().unwrap_or(0)),
                    l["requestor"].as_str().unwrap_or("?"),
                );
            }
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&reply.result).unwrap_or_default());
    }
    Ok(ExitCode::SUCCESS)
}

fn requestor_db(data_dir: &std::path::Path) -> anyhow::Result<peervm_node::requestor::db::RequestorDb> {
    peervm_node::secure_fs::ensure_private_dir(data_dir)?;
    Ok(peervm_node::requestor::db::RequestorDb::open(&data_dir.join("requestor.db"))?)
}

/// The providers this requestor blocked (none when it never stored anything).
fn blocked_providers(data_dir: &std::path::Path) -> anyhow::Result<std::collections::HashSet<libp2p::PeerId>> {
    if !data_dir.join("requestor.db").exists() {
        return Ok(Default::default());
    }
    Ok(requestor_db(data_dir)?.blocked()?.into_iter().map(|(p, _, _)| p).collect())
}

fn requestor(data_dir: &std::path::Path) -> anyhow::Result<Requestor> {
    let key = load_or_init_key(&paths::identity_key_path(data_dir))?;
    Ok(Requestor::open(key, data_dir)?)
}

fn format_time(unix_ms: u64) -> String {
    let now = peervm_node::network::now_unix_ms();
    let delta = unix_ms as i64 - now as i64;
    let abs = delta.unsigned_abs() / 1000;
    let human = if abs >= 3600 {
        format!("{}h{:02}m", abs / 3600, (abs % 3600) / 60)
    } else if abs >= 60 {
        format!("{}m{:02}s", abs / 60, abs % 60)
    } else {
        format!("{abs}s")
    };
    if delta >= 0 { format!("in {human}") } else { format!("{human} ago") }
}

async fn lease_cmd(cmd: LeaseCommand, data_dir: &std::path::Path) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Create(args) => lease_create(args, data_dir).await,
        LeaseCommand::List { json } => {
            let r = requestor(data_dir)?;
            let leases = r.db().list()?;
            if json {
                for l in &leases {
                    println!("{}", lease_json(l));
                }
            } else if leases.is_empty() {
                println!("no leases");
            } else {
                println!("{:<12}  {:<10}  {:<14}  {:<24}  PROVIDER", "LEASE", "STATE", "ENDS", "SSH");
                for l in &leases {
                    let (ends, ssh) = match &l.access {
                        Some(a) => {
                            (format_time(a.ends_at_unix_ms), format!("{}@{}:{}", a.ssh_user, a.ssh_host, a.ssh_port))
                        }
                        None => ("-".into(), "-".into()),
                    };
                    println!(
                        "{:<12}  {:<10}  {:<14}  {:<24}  {}",
                        &l.id.to_hex()[..12],
                        state_name(l.state),
                        ends,
                        ssh,
                        l.provider
                    );
                }
            }
            Ok(())
        }
        LeaseCommand::Status { lease, json, swarm } => {
            let r = requestor(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Status, &multiaddrs(&swarm.bootstrap)?).await? {
                ReplyOutcome::Status { state, ends_at_unix_ms, usage } => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({
                                "lease": l.id.to_hex(),
                                "provider": l.provider.to_string(),
                                "state": state_name(state),
                                "ends_at_unix_ms": ends_at_unix_ms,
                                "usage": usage,
                            })
                        );
                    } else {
                        println!("lease     {}", l.id);
                        println!("provider  {}", l.provider);
                        println!("state     {}", state_name(state));
                        println!("ends      {}", format_time(ends_at_unix_ms));
                        if let Some(u) = usage {
                            println!("usage     {}", client::usage_line(&u));
                        }
                    }
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
        LeaseCommand::Extend { lease, by, swarm } => {
            let secs = units::parse_duration_secs(&by)?;
            let r = requestor(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Extend { additional_secs: secs }, &multiaddrs(&swarm.bootstrap)?).await?
            {
                ReplyOutcome::Extended { ends_at_unix_ms } => {
                    println!("lease {} now ends {}", l.id, format_time(ends_at_unix_ms));
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
        LeaseCommand::Terminate { lease, swarm } => {
            let r = requestor(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Terminate, &multiaddrs(&swarm.bootstrap)?).await? {
                ReplyOutcome::Terminated { .. } => {
                    println!("lease {} terminated", l.id);
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
    }
}

fn state_name(s: LeaseState) -> &'static str {
    match s {
        LeaseState::Requested => "requested",
        LeaseState::Provisioning => "provisioning",
        LeaseState::Booting => "booting",
        LeaseState::Running => "running",
        LeaseState::Stopping => "stopping",
        LeaseState::Ended => "ended",
        LeaseState::Failed => "failed",
    }
}

fn describe_outcome(o: &ReplyOutcome) -> String {
    match o {
        ReplyOutcome::Denied { reason, detail } => format!("the provider refused: {reason}: {detail}"),
        other => format!("unexpected reply from the provider: {other:?}"),
    }
}

fn lease_json(l: &StoredLease) -> serde_json::Value {
    serde_json::json!({
        "lease": l.id.to_hex(),
        "provider": l.provider.to_string(),
        "state": state_name(l.state),
        "vcpus": l.spec.vcpus,
        "memory_mib": l.spec.memory_mib,
        "disk_gib": l.spec.disk_gib,
        "image": l.spec.image_name,
        "key_path": l.key_path,
        "ssh": l.access.as_ref().map(|a| serde_json::json!({
            "host": a.ssh_host,
            "port": a.ssh_port,
            "user": a.ssh_user,
            "host_key": ssh::host_key_line(&a.host_key),
        })),
        "ends_at_unix_ms": l.access.as_ref().map(|a| a.ends_at_unix_ms),
        "price_per_hour_micros": l.access.as_ref().map(|a| a.price_per_hour_micros),
        "currency": l.access.as_ref().map(|a| a.currency.clone()),
        "detail": l.detail,
    })
}

async fn lease_create(args: CreateArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let bootstrap = multiaddrs(&args.swarm.bootstrap)?;
    let duration_secs = match (&args.hours, &args.duration) {
        (Some(h), _) => {
            if !(h.is_finite() && *h > 0.0 && *h * 3600.0 < u64::MAX as f64) {
                bail!("--hours must be a positive number, got {h}");
            }
            (h * 3600.0).round().max(1.0) as u64
        }
        (None, Some(d)) => units::parse_duration_secs(d)?,
        (None, None) => 3600,
    };
    let provider = if args.provider == "cheapest" {
        ProviderChoice::Cheapest
    } else {
        ProviderChoice::Peer(
            args.provider
                .parse()
                .map_err(|_| anyhow::anyhow!("--provider `{}` is not a peer id or `cheapest`", args.provider))?,
        )
    };
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let opts = CreateOptions {
        bootstrap,
        provider,
        vcpus: args.vcpus,
        memory_mib: units::parse_size_mib(&args.memory, 1)?,
        disk_gib: units::parse_size_gib(&args.disk)?,
        image: args.image.clone(),
        duration_secs,
        ssh_key: args.ssh_key.clone(),
        ssh_user: args.user.clone(),
        max_price_micros: args.max_price.as_deref().map(units::parse_micros).transpose()?,
        join_timeout: Duration::from_secs(args.timeout),
        trusted_block_lists: args.trust.peers()?,
    };
    let r = requestor(data_dir)?;
    let mut stages = Vec::new();
    let lease = r
        .create(&opts, |stage, at| {
            let line = match stage {
                Stage::Joined { peers, offers } => {
                    format!("joined the swarm ({peers} peers, {offers} matching offers)")
                }
                Stage::Chose { provider, price_per_hour_micros, currency } => {
                    format!("chose {provider} at {} {currency}/hour", units::format_micros(*price_per_hour_micros))
                }
                Stage::Sent => "sent the signed lease request".into(),
                Stage::Provider(state) => format!("provider: {}", state_name(*state)),
                Stage::Granted => "granted; host key pinned".into(),
            };
            eprintln!("{:>7.1} s  {line}", at.as_secs_f64());
            stages.push(serde_json::json!({ "stage": line, "at_ms": at.as_millis() as u64 }));
        })
        .await?;
    if args.json {
        let mut v = lease_json(&lease);
        v["stages"] = serde_json::Value::Array(stages);
        println!("{v}");
    } else {
        let target = r.ssh_target(&lease)?;
        let known_hosts = r.known_hosts_path(&lease.id);
        println!(
            "lease {} is running until {}",
            lease.id,
            format_time(lease.access.as_ref().map_or(0, |a| a.ends_at_unix_ms))
        );
        println!("connect with:  peervm ssh {}", &lease.id.to_hex()[..12]);
        let args: Vec<String> = ssh::openssh_args(&target, &known_hosts, &[]).iter().map(|a| shell_quote(a)).collect();
        println!("or:            ssh {}", args.join(" "));
    }
    Ok(())
}

/// `s` quoted for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,%+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn ssh_cmd(lease: &str, args: &[String], data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let r = requestor(data_dir)?;
    let l = r.db().find(lease)?;
    let known_hosts = r.pin_host_key(&l)?;
    let argv = ssh::openssh_args(&r.ssh_target(&l)?, &known_hosts, args);
    let err = std::process::Command::new("ssh").args(&argv).exec();
    bail!("cannot run ssh (install openssh-client, or use `peervm exec`): {err}")
}

async fn exec_cmd(lease: &str, command: &[String], data_dir: &std::path::Path) -> anyhow::Result<ExitCode> {
    let r = requestor(data_dir)?;
    let l = r.db().find(lease)?;
    let target = r.ssh_target(&l)?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = ssh::exec(&target, &command.join(" "), &mut stdout, &mut stderr).await?;
    use tokio::io::AsyncWriteExt;
    let _ = stdout.flush().await;
    let _ = stderr.flush().await;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
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
        owner: args
            .owner
            .as_deref()
            .map(|o| o.parse().map_err(|_| anyhow::anyhow!("--owner `{o}` is not a peer id")))
            .transpose()?,
    })
}

async fn offers_cmd(args: OffersArgs, data_dir: &std::path::Path) -> anyhow::Result<()> {
    let mut filter = offer_filter(&args)?;
    filter.exclude = blocked_providers(data_dir)?;
    let bootstrap = multiaddrs(&args.swarm.bootstrap)?;
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let key = peervm_protocol::SigningKey::from_seed(&seed);
    let node = offers::join_as(key, &bootstrap, Duration::from_secs(args.timeout), args.trust.peers()?).await?;
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
