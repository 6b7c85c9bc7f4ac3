//! `peervm doctor`: the provider checklist, pass / warn / fail with a fix for each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use peervm_node::provider::config::ProviderConfig;
use peervm_node::provider::doctor;

#[derive(Args)]
pub struct DoctorArgs {
    /// Provider config (TOML).
    #[arg(long, value_name = "PATH", default_value = "/etc/peervm/provider.toml")]
    config: PathBuf,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: DoctorArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let config = ProviderConfig::load(&args.config)?;
    let dir = config.data_dir.clone().unwrap_or_else(|| data_dir.to_path_buf());
    let checks = doctor::run(&config, &dir).await;
    if args.json {
        println!("{}", serde_json::to_string(&checks)?);
    } else {
        print!("{}", doctor::render(&checks));
    }
    if checks.iter().any(|c| c.verdict == doctor::Verdict::Fail) {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
