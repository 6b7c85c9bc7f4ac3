//! `peervm doctor`: the provider checklist, pass / warn / fail with a fix for each.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use peervm_node::provider::config::ProviderConfig;
use peervm_node::provider::doctor;

use super::provider_data_dir::ProviderDataDir;

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
    let dir = ProviderDataDir::choose(Some((&args.config, &config)), data_dir);
    let mut checks = vec![data_dir_check(&dir)];
    checks.extend(doctor::run(&config, &dir.path).await);
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

/// The first line of the checklist: which data dir every other check looked in, and a
/// warning when the config leaves it to the environment (issue 20: the config decides).
fn data_dir_check(dir: &ProviderDataDir) -> doctor::Check {
    let detail = format!("checked {}", dir.describe());
    match &dir.config {
        Some(_) => doctor::Check { name: "data dir", verdict: doctor::Verdict::Pass, detail, fix: None },
        None => doctor::Check {
            name: "data dir",
            verdict: doctor::Verdict::Warn,
            detail,
            fix: Some(
                "set [node] data_dir in the config, so `provider run`, `doctor` and `provider status` \
                 all use the same directory whatever $PEERVM_DATA_DIR is"
                    .into(),
            ),
        },
    }
}
