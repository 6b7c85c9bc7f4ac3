//! `peervm completions SHELL`: the shell completion script of the whole command tree,
//! generated from the same clap definitions the binary parses with (clap_complete), so it
//! never drifts from the commands. Packaging installs the bash, zsh and fish ones.

use std::io::Write;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args)]
pub struct CompletionsArgs {
    /// The shell to complete for, e.g. `peervm completions bash > /etc/bash_completion.d/peervm`.
    #[arg(value_enum)]
    pub shell: Shell,
}

/// The completion script for `shell`.
pub fn script(shell: Shell) -> Vec<u8> {
    let mut cmd = super::Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "peervm", &mut out);
    out
}

pub fn run(args: CompletionsArgs) -> anyhow::Result<std::process::ExitCode> {
    std::io::stdout().lock().write_all(&script(args.shell))?;
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shell_gets_a_script_that_knows_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let text = String::from_utf8(script(shell)).expect("a script is text");
            for word in ["offers", "provider", "reload", "lease", "completions", "man", "--data-dir"] {
                assert!(text.contains(word), "{shell}: no `{word}` in\n{text}");
            }
        }
    }
}
