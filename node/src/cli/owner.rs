//! `peervm owner delegate`: an owner key (kept offline) signs a delegation that lets a
//! node key run for it, or retires a compromised one.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use peervm_node::keystore;
use peervm_protocol::{Delegation, Signed};

use super::args::peer_id;
use super::render::format_time;

#[derive(Subcommand)]
pub enum OwnerCommand {
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

pub fn run(cmd: OwnerCommand) -> anyhow::Result<ExitCode> {
    let OwnerCommand::Delegate { owner_key, node, days, beneficiary, replaces, out } = cmd;
    let owner = keystore::load(&owner_key)?;
    if days == 0 || days > 366 {
        bail!("--days must be 1..=366");
    }
    let now = peervm_node::clock::now_unix_ms();
    let delegation = Delegation {
        version: peervm_protocol::delegation::DELEGATION_VERSION,
        owner: owner.peer_id(),
        node: peer_id(&node)?,
        not_before_unix_ms: now.saturating_sub(60_000),
        not_after_unix_ms: now + days * 86_400_000,
        beneficiary,
        replaces: replaces.iter().map(|p| peer_id(p)).collect::<anyhow::Result<_>>()?,
    };
    delegation.check_well_formed()?;
    let signed = Signed::sign(&owner, &delegation)?;
    std::fs::write(&out, signed.to_bytes()).with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "owner {} delegates to {} until {}",
        owner.peer_id(),
        delegation.node,
        format_time(delegation.not_after_unix_ms)
    );
    Ok(ExitCode::SUCCESS)
}
