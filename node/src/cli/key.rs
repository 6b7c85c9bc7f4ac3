//! `peervm key`: create, show, re-encrypt and export a node's identity key.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use peervm_node::keystore;

use super::identity::warn_plaintext_created;

#[derive(Subcommand)]
pub enum KeyCommand {
    /// Create a new identity key, encrypted with a passphrase ($PEERVM_PASSPHRASE, else
    /// asked twice on the terminal). Refuses to overwrite an existing one.
    Init {
        /// Key file. Default: <data-dir>/identity.key.
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
        /// Store the key unencrypted (development only; anyone who can read the file can
        /// impersonate this node).
        #[arg(long)]
        insecure_plaintext: bool,
    },
    /// Print this node's PeerId (as recorded in the key file; needs no passphrase).
    Show {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Change the key's passphrase, keeping its PeerId: the old one from $PEERVM_PASSPHRASE
    /// or a prompt, the new one from $PEERVM_NEW_PASSPHRASE or a prompt (asked twice).
    /// Encrypts a plaintext key.
    ChangePassword {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
    /// Print the 32-byte ed25519 seed as hex, for backup or migration (needs the passphrase).
    Export {
        #[arg(long, value_name = "PATH")]
        key: Option<PathBuf>,
    },
}

pub fn run(cmd: KeyCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let path_or_default = |key: Option<PathBuf>| key.unwrap_or_else(|| peervm_node::paths::identity_key_path(data_dir));
    match cmd {
        KeyCommand::Init { key, insecure_plaintext } => {
            let path = path_or_default(key);
            if path.exists() {
                // Fail before asking for a passphrase.
                return Err(peervm_node::secure_fs::SecureFsError::Exists { path }.into());
            }
            let k = if insecure_plaintext {
                let k = keystore::init(&path, None).context("cannot create the identity key")?;
                warn_plaintext_created(&path);
                k
            } else {
                let what = format!("the new identity key {}", path.display());
                let pass = keystore::read_passphrase(keystore::PASSPHRASE_ENV, "New passphrase: ", true, &what)?;
                let k = keystore::init(&path, Some(&pass)).context("cannot create the identity key")?;
                eprintln!("created encrypted identity key {}", path.display());
                k
            };
            println!("{}", k.peer_id());
        }
        KeyCommand::Show { key } => {
            let path = path_or_default(key);
            // A plaintext key is loaded, which proves the file is intact; an encrypted one
            // shows the recorded PeerId without the passphrase (loading it checks it).
            let peer_id = match keystore::protection(&path)? {
                keystore::Protection::Plaintext => keystore::load(&path)?.peer_id(),
                keystore::Protection::AgeScrypt => keystore::peer_id(&path)?,
            };
            println!("{peer_id}");
        }
        KeyCommand::ChangePassword { key } => {
            let path = path_or_default(key);
            let what = format!("the identity key {}", path.display());
            let old = match keystore::protection(&path)? {
                keystore::Protection::Plaintext => None,
                keystore::Protection::AgeScrypt => Some(keystore::read_passphrase(
                    keystore::PASSPHRASE_ENV,
                    &format!("Current passphrase for {}: ", path.display()),
                    false,
                    &what,
                )?),
            };
            // Check the old passphrase before asking for a new one.
            let k = keystore::load_with(&path, old.as_ref())?;
            let new = keystore::read_passphrase(keystore::NEW_PASSPHRASE_ENV, "New passphrase: ", true, &what)?;
            let peer_id = keystore::rewrite_encrypted(&path, &k, &new)?;
            eprintln!("changed the passphrase of {}", path.display());
            println!("{peer_id}");
        }
        KeyCommand::Export { key } => {
            let path = path_or_default(key);
            if keystore::protection(&path)? == keystore::Protection::Plaintext {
                eprintln!("{}", keystore::plaintext_warning(&path));
            }
            let k = keystore::load(&path)?;
            eprintln!(
                "warning: the line below is this node's secret key; anyone who sees it can impersonate {}",
                k.peer_id()
            );
            let hex = zeroize::Zeroizing::new(hex::encode(*k.seed()));
            println!("{}", *hex);
        }
    }
    Ok(ExitCode::SUCCESS)
}
