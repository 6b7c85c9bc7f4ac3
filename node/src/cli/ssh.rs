//! `peervm ssh | exec | ssh-config`: reach a leased guest with its pinned host key and
//! the lease's key.

use std::path::Path;
use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use peervm_node::requestor::ssh as guest_ssh;

use super::requestor;

#[derive(Args)]
pub struct SshArgs {
    /// Lease id (or a unique prefix of at least 4 hex digits).
    lease: String,
    /// Extra arguments for ssh (after --), e.g. a remote command.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Args)]
pub struct ExecArgs {
    lease: String,
    /// The command and its arguments (after --), run exactly as given: each argument is
    /// quoted for the guest's shell. For a shell command line: `-- sh -c 'a && b'`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(Args)]
pub struct SshConfigArgs {
    lease: String,
}

/// Replaces this process with OpenSSH, pinned to the grant's host key.
pub fn ssh(args: SshArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let r = requestor::open(data_dir)?;
    let l = r.db().find(&args.lease)?;
    let known_hosts = r.pin_host_key(&l)?;
    let argv = guest_ssh::openssh_args(&r.ssh_target(&l)?, &known_hosts, &args.args);
    let err = std::process::Command::new("ssh").args(&argv).exec();
    bail!("cannot run ssh (install openssh-client, or use `peervm exec`): {err}")
}

/// Runs the command with the built-in client; the remote exit code becomes ours. The
/// argv is quoted for the guest's `sh`, so the command run is exactly the argv given.
pub async fn exec(args: ExecArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let r = requestor::open(data_dir)?;
    let l = r.db().find(&args.lease)?;
    let target = r.ssh_target(&l)?;
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let code = guest_ssh::exec(&target, &guest_ssh::command_line(&args.command), &mut stdout, &mut stderr).await?;
    use tokio::io::AsyncWriteExt;
    let _ = stdout.flush().await;
    let _ = stderr.flush().await;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(255)))
}

pub fn ssh_config(args: SshConfigArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let r = requestor::open(data_dir)?;
    let l = r.db().find(&args.lease)?;
    let known_hosts = r.pin_host_key(&l)?;
    print!("{}", guest_ssh::ssh_config_block(&r.ssh_target(&l)?, &known_hosts));
    Ok(ExitCode::SUCCESS)
}
