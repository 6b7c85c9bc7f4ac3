//! Where a node keeps its files (docs/architecture.md, "Files and keys").

use std::path::PathBuf;

/// The data directory: `--data-dir`, else `$PEERVM_DATA_DIR`, else
/// `$XDG_DATA_HOME/peervm`, else `~/.local/share/peervm`. A provider service uses
/// `/var/lib/peervm` through its config.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PEERVM_DATA_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(dir).join("peervm");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".local/share/peervm"),
        None => PathBuf::from("/var/lib/peervm"),
    }
}

/// The identity key file inside a data directory.
pub fn identity_key_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("identity.key")
}
