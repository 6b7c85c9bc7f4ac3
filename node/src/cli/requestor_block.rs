//! `peervm block | unblock | blocked`: the providers a requestor refuses to see or use.

use std::path::Path;
use std::process::ExitCode;

use clap::Args;

use super::args::peer_id;
use super::render::format_time;
use super::requestor;

#[derive(Args)]
pub struct BlockArgs {
    peer: String,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args)]
pub struct UnblockArgs {
    peer: String,
}

pub fn block(args: BlockArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let p = peer_id(&args.peer)?;
    requestor::db(data_dir)?.block(&p, &args.reason, peervm_node::clock::now_unix_ms())?;
    println!("blocked {p}: its offers are hidden and it is never leased from");
    Ok(ExitCode::SUCCESS)
}

pub fn unblock(args: UnblockArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let p = peer_id(&args.peer)?;
    if requestor::db(data_dir)?.unblock(&p)? {
        println!("unblocked {p}");
    } else {
        println!("{p} was not blocked");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(data_dir: &Path) -> anyhow::Result<ExitCode> {
    for b in requestor::db(data_dir)?.blocked()? {
        println!("{}  {}  {}", b.peer, format_time(b.at_unix_ms), b.reason);
    }
    Ok(ExitCode::SUCCESS)
}
