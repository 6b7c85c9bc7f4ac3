//! `peervm man --out DIR`: the manual pages, generated from the clap definitions
//! (clap_mangen): `peervm.1` and one page per subcommand (`peervm-provider-run.1`, ...),
//! as Debian packaging installs them into /usr/share/man/man1.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, CommandFactory};

#[derive(Args)]
pub struct ManArgs {
    /// Directory the pages are written to (created if missing; existing pages are
    /// replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Writes every page into `dir`; returns their file names, sorted.
pub fn write_pages(dir: &Path) -> anyhow::Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), dir)
        .with_context(|| format!("cannot write the manual pages into {}", dir.display()))?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("peervm") && n.ends_with(".1"))
        .collect();
    names.sort();
    Ok(names)
}

pub fn run(args: ManArgs) -> anyhow::Result<std::process::ExitCode> {
    let pages = write_pages(&args.out)?;
    eprintln!("wrote {} manual pages into {}", pages.len(), args.out.display());
    Ok(std::process::ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_for_the_binary_and_each_subcommand_naming_what_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let pages = write_pages(dir.path()).unwrap();
        for page in
            ["peervm.1", "peervm-provider.1", "peervm-provider-run.1", "peervm-provider-reload.1", "peervm-offers.1"]
        {
            assert!(pages.iter().any(|p| p == page), "no {page} in {pages:?}");
        }
        let main = std::fs::read_to_string(dir.path().join("peervm.1")).unwrap();
        assert!(main.starts_with(".ie") || main.contains(".TH peervm 1"), "not a man page:\n{main}");
        for word in ["offers", "provider", "lease", "completions", "man"] {
            assert!(main.contains(word), "peervm.1 does not mention `{word}`");
        }
        let reload = std::fs::read_to_string(dir.path().join("peervm-provider-reload.1")).unwrap();
        assert!(reload.contains("SIGHUP"), "{reload}");
    }
}
