//! The lease's SSH key pair: a fresh ed25519 key made for each lease, or the user's own
//! (`--ssh-key`), read with OpenSSH's own strictness about file modes.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{Algorithm, PrivateKey, PublicKey};
use zeroize::Zeroizing;

use super::{SshError, absolute, io};

/// A lease's SSH key pair on the requestor side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKey {
    pub private_path: PathBuf,
    pub public_raw: [u8; 32],
    /// `ssh-ed25519 AAAA... comment`
    pub public_line: String,
}

/// Creates `path` with `mode` in the same call that creates it (never an existing file)
/// and writes `data`; removes the file again if the write fails.
pub(super) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), SshError> {
    let mut f = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io(path))?;
    let written = f.write_all(data).and_then(|()| f.sync_all()).map_err(io(path));
    if written.is_err() {
        let _ = std::fs::remove_file(path);
    }
    written
}

pub(super) fn pub_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".pub");
    PathBuf::from(s)
}

/// `ssh-ed25519 AAAA... comment`, without the trailing space ssh-key leaves for an empty
/// comment.
pub(super) fn public_line(key: &PublicKey) -> Result<String, SshError> {
    key.to_openssh()
        .map(|s| s.trim_end().to_string())
        .map_err(|source| SshError::KeyFormat { what: "cannot encode the public key".into(), source })
}

fn ed25519_raw(key: &PublicKey) -> Result<[u8; 32], SshError> {
    key.key_data()
        .ed25519()
        .map(|k| k.0)
        .ok_or_else(|| SshError::Key(format!("the key is {}, only ssh-ed25519 is accepted", key.algorithm())))
}

/// Makes a fresh ed25519 key pair: the private key (OpenSSH format) at `path`, created
/// 0600 by the call that creates it, and the public key at `path.pub`. Refuses to
/// overwrite either; the parent directory must exist.
pub fn generate_key(path: &Path, comment: &str) -> Result<LeaseKey, SshError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|source| SshError::KeyFormat { what: "cannot encode the key".into(), source })?;
    let line = public_line(key.public_key())?;
    let public_raw = ed25519_raw(key.public_key())?;
    let pubp = pub_path(path);
    if pubp.exists() {
        return Err(SshError::Io { path: pubp, source: std::io::ErrorKind::AlreadyExists.into() });
    }
    write_new(path, pem.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pubp, format!("{line}\n").as_bytes(), 0o644) {
        // this call created the private key a moment ago: no key pair is left half-made
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(LeaseKey { private_path: absolute(path), public_raw, public_line: line })
}

/// Reads an OpenSSH ed25519 private key, refusing (like OpenSSH) a file that group or
/// others can access. The key may still be passphrase-protected.
pub(super) fn read_private_key(path: &Path) -> Result<PrivateKey, SshError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if !meta.is_file() {
        return Err(SshError::Key(format!("{} is not a file", path.display())));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SshError::Key(format!(
            "{} has mode {mode:04o}: a private key must not be accessible by group or others \
             (OpenSSH refuses it too); fix it with: chmod 600 {}",
            path.display(),
            path.display()
        )));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io(path))?);
    let text = text.trim();
    if text.starts_with("ssh-") || text.starts_with("ecdsa-") || text.starts_with("sk-") {
        return Err(SshError::Key(format!(
            "{} is a public key; give the private key (the file without .pub)",
            path.display()
        )));
    }
    if !text.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----") {
        let what = if text.starts_with("-----BEGIN RSA") {
            "an RSA key in PEM format"
        } else if text.starts_with("-----BEGIN EC") {
            "an ECDSA key in PEM format"
        } else if text.starts_with("-----BEGIN") {
            "a PEM file, not an OpenSSH private key"
        } else {
            "not an OpenSSH private key"
        };
        return Err(SshError::Key(format!(
            "{} is {what}; peervm takes ed25519 keys in OpenSSH format (ssh-keygen -t ed25519)",
            path.display()
        )));
    }
    let key = PrivateKey::from_openssh(text).map_err(|source| SshError::KeyFormat {
        what: format!("{} is not a readable OpenSSH private key", path.display()),
        source,
    })?;
    if key.algorithm() != Algorithm::Ed25519 {
        return Err(SshError::Key(format!(
            "{} is an {} key; peervm takes ssh-ed25519 keys only (ssh-keygen -t ed25519)",
            path.display(),
            key.algorithm()
        )));
    }
    Ok(key)
}

/// `--ssh-key PATH`: the user's own ed25519 private key (OpenSSH format, passphrase or
/// not). The public half is the one stored in the key file, which OpenSSH keeps readable
/// in encrypted keys too; when `PATH.pub` exists it must hold the same key, and its line
/// (with its comment) is the one returned. A private key that group or others can access
/// is refused, as OpenSSH does.
pub fn load_key(path: &Path) -> Result<LeaseKey, SshError> {
    let private = read_private_key(path)?;
    let mut public = private.public_key().clone();
    let pubp = pub_path(path);
    match std::fs::read_to_string(&pubp) {
        Ok(line) => {
            let from_file = PublicKey::from_openssh(line.trim()).map_err(|source| SshError::KeyFormat {
                what: format!("{} is not an OpenSSH public key", pubp.display()),
                source,
            })?;
            if from_file.key_data() != public.key_data() {
                return Err(SshError::Key(format!(
                    "{} does not hold the public key of {}; regenerate it with: ssh-keygen -y -f {} > {}",
                    pubp.display(),
                    path.display(),
                    path.display(),
                    pubp.display()
                )));
            }
            public = from_file;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(SshError::Io { path: pubp, source: e }),
    }
    Ok(LeaseKey { private_path: absolute(path), public_raw: ed25519_raw(&public)?, public_line: public_line(&public)? })
}

/// `ssh-ed25519 AAAA...` for a raw ed25519 host key.
pub fn host_key_line(raw: &[u8; 32]) -> String {
    // Encoding a 32-byte ed25519 key cannot fail; an empty line would pin nothing, so
    // OpenSSH would refuse the guest rather than accept any key.
    public_line(&PublicKey::from(Ed25519PublicKey(*raw))).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use russh::keys::EcdsaCurve;

    use super::*;
    use crate::requestor::ssh::fixtures::{TestRng, mode};

    #[test]
    fn generated_key_is_0600_parses_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let k = generate_key(&path, "peervm-lease-test").unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(k.private_path, path);
        assert!(k.public_line.starts_with("ssh-ed25519 AAAA") && k.public_line.ends_with(" peervm-lease-test"));
        let pub_text = std::fs::read_to_string(pub_path(&path)).unwrap();
        assert_eq!(pub_text, format!("{}\n", k.public_line));
        let parsed = PublicKey::from_openssh(pub_text.trim()).unwrap();
        assert_eq!(parsed.key_data().ed25519().unwrap().0, k.public_raw);
        let private = PrivateKey::from_openssh(std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(private.public_key().key_data(), parsed.key_data());

        let before = std::fs::read(&path).unwrap();
        assert!(matches!(generate_key(&path, "again"), Err(SshError::Io { .. })), "overwrote a key");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // a stray .pub alone also stops it, and no private key is left behind
        let other = dir.path().join("other");
        std::fs::write(pub_path(&other), "x").unwrap();
        assert!(generate_key(&other, "x").is_err());
        assert!(!other.exists());
        // the parent must exist
        assert!(generate_key(&dir.path().join("missing/id"), "x").is_err());
    }

    #[test]
    fn load_key_round_trips_generated_and_encrypted_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        let k = generate_key(&path, "peervm-lease-test").unwrap();
        assert_eq!(load_key(&path).unwrap(), k);
        // without the .pub file the key file alone is enough
        std::fs::remove_file(pub_path(&path)).unwrap();
        assert_eq!(load_key(&path).unwrap().public_raw, k.public_raw);

        // a passphrase-protected key: the public half is readable without the passphrase
        let mut plain = PrivateKey::from(Ed25519Keypair::from_seed(&[9; 32]));
        plain.set_comment("me@laptop");
        let encrypted = plain.encrypt(&mut TestRng, "secret").unwrap();
        let enc_path = dir.path().join("id_enc");
        write_new(&enc_path, encrypted.to_openssh(LineEnding::LF).unwrap().as_bytes(), 0o600).unwrap();
        let loaded = load_key(&enc_path).unwrap();
        assert_eq!(loaded.public_raw, *Ed25519Keypair::from_seed(&[9; 32]).public.as_ref());
        // its .pub supplies the comment, and must be the same key
        write_new(&pub_path(&enc_path), format!("{}\n", public_line(plain.public_key()).unwrap()).as_bytes(), 0o644)
            .unwrap();
        assert!(load_key(&enc_path).unwrap().public_line.ends_with(" me@laptop"));
        std::fs::write(pub_path(&enc_path), format!("{}\n", k.public_line)).unwrap();
        let err = load_key(&enc_path).unwrap_err().to_string();
        assert!(err.contains("does not hold the public key"), "{err}");
    }

    #[test]
    fn load_key_refuses_open_modes_other_algorithms_and_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id_ed25519");
        generate_key(&path, "x").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, SshError::Key(_)) && err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(load_key(&path).is_err());

        let ecdsa = PrivateKey::random(&mut TestRng, Algorithm::Ecdsa { curve: EcdsaCurve::NistP256 }).unwrap();
        let ecdsa_path = dir.path().join("id_ecdsa");
        write_new(&ecdsa_path, ecdsa.to_openssh(LineEnding::LF).unwrap().as_bytes(), 0o600).unwrap();
        let err = load_key(&ecdsa_path).unwrap_err().to_string();
        assert!(err.contains("ecdsa-sha2-nistp256") && err.contains("ssh-ed25519 keys only"), "{err}");

        let rsa_pem = dir.path().join("id_rsa");
        write_new(&rsa_pem, b"-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n", 0o600).unwrap();
        assert!(load_key(&rsa_pem).unwrap_err().to_string().contains("RSA key in PEM format"));

        let public_only = dir.path().join("given_pub");
        write_new(&public_only, std::fs::read(pub_path(&path)).unwrap().as_slice(), 0o600).unwrap();
        assert!(load_key(&public_only).unwrap_err().to_string().contains("is a public key"));

        let missing = dir.path().join("missing");
        match load_key(&missing) {
            Err(SshError::Io { path, source }) => {
                assert_eq!(path, missing);
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }
}
