//! Which data dir `peervm doctor` and the admin commands (`provider status`, ...) look in
//! for a provider. The config decides: its `[node] data_dir` wins over `--data-dir` and
//! `$PEERVM_DATA_DIR`, as it does for `provider run` (README "Provider"). A config
//! without one leaves it to `--data-dir`, else `$PEERVM_DATA_DIR`, else the default,
//! which can differ between the shell that started the daemon and the one asking, so
//! the output always names the directory used and where it came from (issue 20).

use std::path::{Path, PathBuf};

use peervm_node::provider::config::ProviderConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderDataDir {
    pub path: PathBuf,
    /// The config file whose `[node] data_dir` chose it; `None` for the fallback.
    pub config: Option<PathBuf>,
}

impl ProviderDataDir {
    /// The config's data dir when `config` is given and has one, else `fallback` (what
    /// `--data-dir` / `$PEERVM_DATA_DIR` / the default resolved to).
    pub fn choose(config: Option<(&Path, &ProviderConfig)>, fallback: &Path) -> Self {
        match config {
            Some((path, c)) if c.data_dir.is_some() => {
                ProviderDataDir { path: c.data_dir.clone().unwrap_or_default(), config: Some(path.to_path_buf()) }
            }
            _ => ProviderDataDir { path: fallback.to_path_buf(), config: None },
        }
    }

    /// Where the directory came from, for people.
    pub fn origin(&self) -> String {
        match &self.config {
            Some(config) => format!("[node] data_dir of {}", config.display()),
            None => "--data-dir, else $PEERVM_DATA_DIR, else the default".into(),
        }
    }

    /// `/var/lib/peervm ([node] data_dir of /etc/peervm/provider.toml)`.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.path.display(), self.origin())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use peervm_node::provider::config::ProviderConfig;

    use super::ProviderDataDir;

    /// The example config of the README, which sets no data_dir.
    const EXAMPLE: &str = include_str!("../../../examples/provider.toml");

    fn config(data_dir_line: &str) -> ProviderConfig {
        let text = EXAMPLE.replace("# data_dir = \"/var/lib/peervm\"", data_dir_line);
        assert!(data_dir_line.is_empty() || text.contains(data_dir_line), "the example's data_dir line moved");
        ProviderConfig::parse(&text, Path::new("/etc/p.toml")).unwrap()
    }

    #[test]
    fn the_configs_data_dir_wins_over_the_environment_and_the_flag() {
        let c = config(r#"data_dir = "/srv/provider""#);
        let d = ProviderDataDir::choose(Some((Path::new("/etc/p.toml"), &c)), Path::new("/home/me/requestor"));
        assert_eq!(d.path, Path::new("/srv/provider"));
        assert_eq!(d.describe(), "/srv/provider ([node] data_dir of /etc/p.toml)");
    }

    #[test]
    fn without_one_the_fallback_is_used_and_said_to_be() {
        let c = config("");
        let d = ProviderDataDir::choose(Some((Path::new("/etc/p.toml"), &c)), Path::new("/home/me/requestor"));
        assert_eq!(d.path, Path::new("/home/me/requestor"));
        assert_eq!(d.describe(), "/home/me/requestor (--data-dir, else $PEERVM_DATA_DIR, else the default)");
        assert_eq!(ProviderDataDir::choose(None, Path::new("/x")).config, None);
    }
}
