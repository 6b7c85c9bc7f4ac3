//! `peervm vmm-helper`: run the privileged VMM helper beside an unprivileged provider
//! daemon (node/src/provider/vmm_helper.rs; docs/architecture.md "Privilege separation").

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use peervm_node::provider::config::ProviderConfig;
use peervm_node::provider::vmm_helper::{
    DEFAULT_DAEMON_USER, DEFAULT_SOCKET, DEFAULT_STATE_DIR, HelperOptions, prepare,
};

#[derive(Args)]
pub struct VmmHelperArgs {
    /// The provider's config: images, resources, SSH ports, address pool, egress.
    #[arg(long, value_name = "PATH", default_value = "/etc/peervm/provider.toml")]
    config: PathBuf,
    /// Where lease directories (overlays, seed disks, console logs) live; root-only.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The Unix socket the daemon connects to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// The provider daemon's user: the only one let in.
    #[arg(long, value_name = "USER", default_value = DEFAULT_DAEMON_USER)]
    daemon_user: String,
    /// Print the startup line as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(args: VmmHelperArgs) -> anyhow::Result<ExitCode> {
    // Lease directories and every file the helper creates are root's alone.
    // SAFETY: umask(2) only sets the process's file creation mask.
    unsafe { libc::umask(0o077) };
    let config = ProviderConfig::load(&args.config)?;
    let opts = HelperOptions {
        config,
        state_dir: args.state_dir.clone(),
        socket: args.socket.clone(),
        daemon_user: args.daemon_user.clone(),
    };
    let helper = prepare(opts).await?;
    if args.json {
        let line = serde_json::json!({
            "event": "listening",
            "role": "vmm-helper",
            "socket": helper.socket,
            "daemon_user": args.daemon_user,
            "accel": helper.accel.to_string(),
            "images": helper.images,
            "adopted": helper.adopted,
        });
        println!("{line}");
    } else {
        println!(
            "peervm vmm-helper listening on {} for user {} ({} guests, {} images, accel {})",
            helper.socket.display(),
            args.daemon_user,
            helper.adopted,
            helper.images,
            helper.accel
        );
    }
    peervm_node::service_notify::ready(&format!(
        "serving {} ({} guests re-adopted)",
        helper.socket.display(),
        helper.adopted
    ));
    helper.run_until_signal(&args.config).await?;
    Ok(ExitCode::SUCCESS)
}
