//! `peervm`: one binary for providers, requestors and bootstrap nodes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use peervm_node::{keystore, paths};

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
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Create a new identity key (refuses to overwrite an existing one).
    Init {
        /// Key file. Default: <data-dir>/identity.key.
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Print this node's PeerId.
    Show {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peervm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let data_dir = cli.data_dir.unwrap_or_else(paths::default_data_dir);
    match cli.command {
        Command::Key(KeyCommand::Init { key }) => {
            let path = key.unwrap_or_else(|| paths::identity_key_path(&data_dir));
            let k = keystore::init(&path).context("cannot create the identity key")?;
            eprintln!("created identity key {}", path.display());
            println!("{}", k.peer_id());
        }
        Command::Key(KeyCommand::Show { key }) => {
            let path = key.unwrap_or_else(|| paths::identity_key_path(&data_dir));
            // Loading (not just reading the PeerId) proves the file is intact.
            let k = keystore::load(&path)?;
            println!("{}", k.peer_id());
        }
    }
    Ok(())
}
