//! Running the host tools vmm relies on (`nft`, `tc`, `qemu-img`): output captured, a
//! deadline on each, and a failure reported with the command line and its stderr.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::VmmError;

/// No tool we call takes more than a fraction of a second; a hung one must not hang a
/// lease start forever.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `program args...`, feeding `stdin` if given; returns stdout.
pub(crate) async fn run(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<String, VmmError> {
    let shown = || std::iter::once(program).chain(args.iter().copied()).collect::<Vec<_>>().join(" ");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("LC_ALL", "C");
    let mut child = cmd.spawn().map_err(|e| VmmError::Command { command: shown(), detail: e.to_string() })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input).await.map_err(|e| VmmError::Command { command: shown(), detail: e.to_string() })?;
        drop(pipe);
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| VmmError::Command { command: shown(), detail: format!("no answer within {COMMAND_TIMEOUT:?}") })?
        .map_err(|e| VmmError::Command { command: shown(), detail: e.to_string() })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(VmmError::Command {
            command: shown(),
            detail: format!("{}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        })
    }
}
