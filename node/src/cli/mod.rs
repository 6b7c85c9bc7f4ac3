//! The `peervm` command tree (clap) and its dispatch: one module per command, each with
//! its arguments and what it does. Errors reach the user through `anyhow` here, at the
//! binary's edge; the library below keeps typed errors.

mod announce;
mod args;
mod bootstrap;
mod completions;
mod doctor;
mod identity;
mod key;
mod lease;
mod man;
mod offers;
mod owner;
mod provider;
mod provider_admin;
mod provider_data_dir;
mod provider_status;
pub(crate) mod render;
mod requestor;
mod requestor_block;
mod ssh;
mod vmm_helper;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "peervm", version, about = "A peer-to-peer market for virtual machines")]
pub struct Cli {
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
    Key(key::KeyCommand),
    /// Run a bootstrap node: Kademlia server, sync server and gossip relay.
    Bootstrap(bootstrap::BootstrapArgs),
    /// Provider commands.
    #[command(subcommand)]
    Provider(provider::ProviderCommand),
    /// List the verified offers on the market, cheapest first.
    Offers(offers::OffersArgs),
    /// Lease a VM, and look after your leases.
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    /// Open an SSH session to a lease's guest (OpenSSH, pinned host key, lease key).
    Ssh(ssh::SshArgs),
    /// Run a command in a lease's guest (built-in SSH client); exits with its exit code.
    Exec(ssh::ExecArgs),
    /// Print a Host block for ~/.ssh/config that reaches a lease's guest.
    SshConfig(ssh::SshConfigArgs),
    /// Block a provider on your side: its offers are hidden and never leased.
    Block(requestor_block::BlockArgs),
    /// Lift a block of a provider.
    Unblock(requestor_block::UnblockArgs),
    /// The providers you blocked.
    Blocked,
    /// Owner keys: delegate a node key to run for an owner.
    #[command(subcommand)]
    Owner(owner::OwnerCommand),
    /// Check this machine against the provider checklist: each line pass / warn / fail
    /// with its fix. Exits non-zero when something fails.
    Doctor(doctor::DoctorArgs),
    /// Print the shell completion script for bash, zsh or fish (also elvish, powershell).
    Completions(completions::CompletionsArgs),
    /// Write the manual pages (peervm.1 and one per subcommand) into a directory.
    Man(man::ManArgs),
    /// Run the privileged VMM helper (as root) for a provider daemon that runs as its own
    /// user: it alone creates guests, cgroups, namespaces and firewall tables.
    VmmHelper(vmm_helper::VmmHelperArgs),
}

/// Runs the command the user asked for; the exit code is the command's own (`exec`
/// passes the remote one through, `doctor` fails when a check fails).
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let data_dir = cli.data_dir.clone().unwrap_or_else(peervm_node::paths::default_data_dir);
    let data_dir = data_dir.as_path();
    match cli.command {
        Command::Key(cmd) => key::run(cmd, data_dir),
        Command::Bootstrap(args) => bootstrap::run(args, data_dir).await,
        Command::Provider(cmd) => provider::run(cmd, data_dir).await,
        Command::Offers(args) => offers::run(args, data_dir).await,
        Command::Lease(cmd) => lease::run(cmd, data_dir).await,
        Command::Ssh(args) => ssh::ssh(args, data_dir),
        Command::Exec(args) => ssh::exec(args, data_dir).await,
        Command::SshConfig(args) => ssh::ssh_config(args, data_dir),
        Command::Block(args) => requestor_block::block(args, data_dir),
        Command::Unblock(args) => requestor_block::unblock(args, data_dir),
        Command::Blocked => requestor_block::list(data_dir),
        Command::Owner(cmd) => owner::run(cmd),
        Command::Doctor(args) => doctor::run(args, data_dir).await,
        Command::Completions(args) => completions::run(args),
        Command::Man(args) => man::run(args),
        Command::VmmHelper(args) => vmm_helper::run(args).await,
    }
}
