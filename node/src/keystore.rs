//! The node's identity key on disk.
//!
//! File layout (`<data-dir>/identity.key`, mode 0600, in a 0700 directory), JSON:
//!
//! ```json
//! {"format":"peervm-identity","version":1,"peer_id":"12D3Koo...",
//!  "protection":"plaintext","secret":"<hex of the 32-byte ed25519 seed>"}
//! ```
//!
//! `peer_id` sits outside the secret so `peervm key show` works without unlocking the
//! key. `protection` names how `secret` is stored; passphrase encryption at rest adds a
//! value here (an age passphrase-encrypted seed) without changing the rest of the layout.
//! A loaded key is checked against `peer_id`, so a file whose parts were mixed up is
//! refused rather than silently becoming another identity.

use std::path::{Path, PathBuf};

use peervm_protocol::{PeerId, SigningKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::secure_fs::{self, SecureFsError};

const FORMAT: &str = "peervm-identity";
const VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum KeyStoreError {
    #[error(transparent)]
    Fs(#[from] SecureFsError),
    #[error("no identity key at {0}; create one with: peervm key init")]
    Missing(PathBuf),
    #[error("{path} is not a peervm identity key file: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("{path} uses key protection `{protection}`, which this version of peervm cannot read")]
    UnknownProtection { path: PathBuf, protection: String },
    #[error("{path} says its PeerId is {claimed} but its secret belongs to {actual}; the file is corrupt")]
    PeerIdMismatch { path: PathBuf, claimed: String, actual: String },
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    version: u32,
    peer_id: String,
    protection: String,
    secret: String,
}

/// Creates a new random identity at `path` (refusing to overwrite one) and returns it.
pub fn init(path: &Path) -> Result<SigningKey, KeyStoreError> {
    if let Some(dir) = path.parent() {
        secure_fs::ensure_private_dir(dir)?;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut *seed);
    let key = SigningKey::from_seed(&seed);
    let file = KeyFile {
        format: FORMAT.into(),
        version: VERSION,
        peer_id: key.peer_id().to_string(),
        protection: "plaintext".into(),
        secret: hex::encode(*seed),
    };
    let text = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| malformed(path, e))?);
    drop(Zeroizing::new(file.secret));
    secure_fs::write_new_private_file(path, &text)?;
    Ok(key)
}

/// The PeerId recorded in the key file, without reading the secret.
pub fn peer_id(path: &Path) -> Result<PeerId, KeyStoreError> {
    let file = read(path)?;
    file.peer_id.parse().map_err(|e| malformed(path, format!("bad peer_id: {e}")))
}

/// Loads the identity key, checking file modes and that the secret matches the PeerId.
pub fn load(path: &Path) -> Result<SigningKey, KeyStoreError> {
    let file = read(path)?;
    if file.protection != "plaintext" {
        return Err(KeyStoreError::UnknownProtection { path: path.into(), protection: file.protection });
    }
    let secret = Zeroizing::new(file.secret);
    let mut seed = Zeroizing::new([0u8; 32]);
    hex::decode_to_slice(secret.as_bytes(), &mut *seed).map_err(|e| malformed(path, format!("bad secret: {e}")))?;
    let key = SigningKey::from_seed(&seed);
    if key.peer_id().to_string() != file.peer_id {
        return Err(KeyStoreError::PeerIdMismatch {
            path: path.into(),
            claimed: file.peer_id,
            actual: key.peer_id().to_string(),
        });
    }
    Ok(key)
}

fn read(path: &Path) -> Result<KeyFile, KeyStoreError> {
    if !path.exists() {
        return Err(KeyStoreError::Missing(path.into()));
    }
    if let Some(dir) = path.parent() {
        secure_fs::check_private(dir, 0o700)?;
    }
    let bytes = Zeroizing::new(secure_fs::read_private_file(path)?);
    let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| malformed(path, e))?;
    if file.format != FORMAT || file.version != VERSION {
        return Err(malformed(
            path,
            format!("format {} version {} (expected {FORMAT} {VERSION})", file.format, file.version),
        ));
    }
    Ok(file)
}

fn malformed(path: &Path, reason: impl ToString) -> KeyStoreError {
    KeyStoreError::Malformed { path: path.into(), reason: reason.to_string() }
}
