//! The node's identity key as the commands that run a node load it.

use std::path::Path;

use anyhow::Context;
use peervm_node::keystore;
use peervm_protocol::SigningKey;

/// Loads the key at `path`, creating it first if it does not exist: encrypted when a
/// passphrase is there without a prompt (the systemd credential `peervm-passphrase` or
/// $PEERVM_PASSPHRASE), otherwise in plaintext with a loud warning, so unattended services
/// keep starting (see the `keystore` module doc).
pub fn load_or_init_key(path: &Path) -> anyhow::Result<SigningKey> {
    if path.exists() {
        Ok(keystore::load(path)?)
    } else if keystore::PassphraseSource::current(keystore::PASSPHRASE_ENV).is_unattended() {
        let pass = keystore::read_passphrase(keystore::PASSPHRASE_ENV, "", false, "the new identity key")?;
        let key = keystore::init(path, Some(&pass)).context("cannot create the identity key")?;
        eprintln!("created encrypted identity key {}", path.display());
        Ok(key)
    } else {
        let key = keystore::init(path, None).context("cannot create the identity key")?;
        warn_plaintext_created(path);
        Ok(key)
    }
}

pub fn warn_plaintext_created(path: &Path) {
    eprintln!(
        "WARNING: created identity key {} UNENCRYPTED (development only): anyone who can read it can \
         impersonate this node. Set {} to create an encrypted key, or encrypt this one with: \
         peervm key change-password",
        path.display(),
        keystore::PASSPHRASE_ENV
    );
}
