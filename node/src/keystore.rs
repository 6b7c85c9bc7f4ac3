//! The node's identity key on disk.
//!
//! File layout (`<data-dir>/identity.key`, mode 0600, in a 0700 directory), JSON:
//!
//! ```json
//! {"format":"peervm-identity","version":1,"peer_id":"12D3Koo...",
//!  "protection":"age-scrypt",
//!  "secret":"-----BEGIN AGE ENCRYPTED FILE-----\n...\n-----END AGE ENCRYPTED FILE-----\n"}
//! ```
//!
//! `protection` names how `secret` holds the 32-byte ed25519 seed:
//!
//! - `age-scrypt` (the default): `secret` is an ASCII-armored [age] file encrypted to a
//!   passphrase (age's scrypt recipient: scrypt key derivation, ChaCha20-Poly1305), whose
//!   plaintext is exactly the 32 seed bytes. The file can be checked with the reference
//!   tool: `jq -r .secret identity.key | age -d` prints the raw seed. The scrypt work
//!   factor is fixed, N = 2^[`SCRYPT_LOG_N`] (256 MiB, about a second on a server core),
//!   not calibrated on the machine that encrypts: age's calibration times a small scrypt
//!   run, so a key written on an idle fast machine could be refused ("excessive work") on
//!   a slower or busy one. Loading accepts factors up to 2^[`SCRYPT_MAX_LOG_N`] (files
//!   made with the `age` tool on a fast machine) and refuses larger ones with a clear
//!   error, which bounds the memory and time a crafted key file can cost.
//! - `plaintext` (development only, `peervm key init --insecure-plaintext`): `secret` is the
//!   hex of the seed. Such files still load, with a one-line warning on every load.
//!
//! `peer_id` sits outside the secret so `peervm key show` works without the passphrase;
//! it prints the recorded PeerId. Whatever decrypts the key (`load`, and so `provider run`,
//! `bootstrap`, `key export`, `key change-password`) checks the seed against `peer_id`, so
//! a file whose parts were mixed up is refused rather than silently becoming another
//! identity.
//!
//! The passphrase comes, in this order ([`PassphraseSource::current`] is the one rule),
//! from the systemd credential `peervm-passphrase` (a file in `$CREDENTIALS_DIRECTORY`,
//! which a unit fills with `LoadCredentialEncrypted=` or `LoadCredential=`; one trailing
//! newline is ignored), from `PEERVM_PASSPHRASE`, else from a prompt on the controlling
//! terminal with echo off (asked twice when a passphrase is set). The credential comes
//! first because a service's environment is visible to more than its credentials are
//! (`systemctl show`, /proc/PID/environ of its user), and a unit that sets both meant the
//! credential. For `key change-password` the new passphrase comes from
//! `PEERVM_NEW_PASSPHRASE` or the prompt, never a credential. Without any source, commands
//! fail with an error naming the variable. A wrong passphrase is [`KeyStoreError::WrongPassphrase`] and never
//! changes the file. Seeds, passphrases and decrypted buffers are zeroised when dropped.
//!
//! Keys created implicitly (`bootstrap` and `provider run` create a missing key so a node
//! keeps its address across restarts) are encrypted when `PEERVM_PASSPHRASE` is set and
//! otherwise written in plaintext with a loud warning: an unattended service has nobody to
//! type a passphrase, and refusing to start would break existing unattended setups. Such a
//! key can be encrypted later, in place and keeping its PeerId, with
//! `peervm key change-password`.
//!
//! [age]: https://age-encryption.org/v1

use std::io::{Read, Write};
use std::iter;
use std::path::{Path, PathBuf};

use age::armor::{ArmoredReader, ArmoredWriter, Format};
use age::secrecy::SecretString;
use peervm_protocol::{PeerId, SigningKey};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::secure_fs::{self, SecureFsError};

const FORMAT: &str = "peervm-identity";
const VERSION: u32 = 1;
const PLAINTEXT: &str = "plaintext";
const AGE_SCRYPT: &str = "age-scrypt";
/// scrypt work factor (log2 N) for keys this program encrypts.
pub const SCRYPT_LOG_N: u8 = 18;
/// The largest scrypt work factor a key file may ask for (2^20: 1 GiB, a few seconds).
pub const SCRYPT_MAX_LOG_N: u8 = 20;
const _: () = assert!(SCRYPT_LOG_N <= SCRYPT_MAX_LOG_N, "our own keys must load");

/// Environment variable holding the key passphrase.
pub const PASSPHRASE_ENV: &str = "PEERVM_PASSPHRASE";
/// Environment variable holding the new passphrase for `peervm key change-password`.
pub const NEW_PASSPHRASE_ENV: &str = "PEERVM_NEW_PASSPHRASE";
/// The systemd credential holding the key passphrase (`LoadCredentialEncrypted=
/// peervm-passphrase:...` in a unit), read from `$CREDENTIALS_DIRECTORY`.
pub const PASSPHRASE_CREDENTIAL: &str = "peervm-passphrase";
/// Where systemd puts a service's credentials (systemd.exec(5), "Credentials").
pub const CREDENTIALS_DIRECTORY_ENV: &str = "CREDENTIALS_DIRECTORY";

/// Where a passphrase comes from (module doc: the order and why).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassphraseSource {
    /// The `peervm-passphrase` file in systemd's credentials directory.
    Credential(PathBuf),
    /// An environment variable.
    Env(&'static str),
    /// A prompt on the controlling terminal, if there is one.
    Terminal,
}

impl PassphraseSource {
    /// The rule: for the key's passphrase (`PEERVM_PASSPHRASE`), the systemd credential
    /// when `credentials_dir` holds one; then `env` when it is set; else the terminal.
    pub fn decide(env: &'static str, credentials_dir: Option<&Path>, env_is_set: bool) -> Self {
        if env == PASSPHRASE_ENV
            && let Some(file) = credentials_dir.map(|d| d.join(PASSPHRASE_CREDENTIAL))
            && file.exists()
        {
            return PassphraseSource::Credential(file);
        }
        if env_is_set { PassphraseSource::Env(env) } else { PassphraseSource::Terminal }
    }

    /// [`PassphraseSource::decide`] on this process's environment.
    pub fn current(env: &'static str) -> Self {
        let dir = std::env::var_os(CREDENTIALS_DIRECTORY_ENV).map(PathBuf::from);
        Self::decide(env, dir.as_deref(), std::env::var_os(env).is_some())
    }

    /// True when nobody has to type the passphrase.
    pub fn is_unattended(&self) -> bool {
        !matches!(self, PassphraseSource::Terminal)
    }
}

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
    #[error("wrong passphrase for {path}")]
    WrongPassphrase { path: PathBuf },
    #[error(
        "no passphrase for {what}: set {env} or run from a terminal to be prompted \
         (for development only: peervm key init --insecure-plaintext){reason}"
    )]
    NoPassphrase { what: String, env: &'static str, reason: String },
    #[error("{0}")]
    BadPassphrase(String),
    #[error("cannot read the systemd credential {path}")]
    Credential {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encrypt the identity key for {path}: {reason}")]
    Encrypt { path: PathBuf, reason: String },
}

/// How the seed is stored in the key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// Hex seed, development only.
    Plaintext,
    /// age file encrypted to a passphrase (scrypt recipient), ASCII-armored.
    AgeScrypt,
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
/// With a passphrase the seed is age-encrypted; `None` writes the development-only
/// plaintext format (the caller warns the user).
pub fn init(path: &Path, passphrase: Option<&SecretString>) -> Result<SigningKey, KeyStoreError> {
    if let Some(dir) = path.parent() {
        secure_fs::ensure_private_dir(dir)?;
    }
    if path.exists() {
        return Err(SecureFsError::Exists { path: path.into() }.into());
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut *seed);
    let key = SigningKey::from_seed(&seed);
    let text = encode(path, &seed, passphrase)?;
    secure_fs::write_new_private_file(path, &text)?;
    Ok(key)
}

/// The PeerId recorded in the key file, without reading the secret.
pub fn peer_id(path: &Path) -> Result<PeerId, KeyStoreError> {
    let file = read(path)?;
    recorded_peer_id(path, &file)
}

/// How the key file at `path` protects its secret.
pub fn protection(path: &Path) -> Result<Protection, KeyStoreError> {
    let file = read(path)?;
    parse_protection(path, &file.protection)
}

/// Loads the identity key, checking file modes and that the secret matches the PeerId.
/// An encrypted key takes its passphrase from the systemd credential, `PEERVM_PASSPHRASE`
/// or a terminal prompt (module doc);
/// a plaintext key loads silently: it was warned about when it was created, and `peervm
/// doctor` and `key export` say so again (issue 20: not on every command).
pub fn load(path: &Path) -> Result<SigningKey, KeyStoreError> {
    let file = read(path)?;
    match parse_protection(path, &file.protection)? {
        Protection::Plaintext => decode(path, file, None),
        Protection::AgeScrypt => {
            let pass = read_passphrase(
                PASSPHRASE_ENV,
                &format!("Passphrase for {}: ", path.display()),
                false,
                &format!("the identity key {}", path.display()),
            )?;
            decode(path, file, Some(&pass))
        }
    }
}

/// Loads the identity key with an explicit passphrase: no prompt, no warning. An
/// encrypted file with `None` is [`KeyStoreError::NoPassphrase`]; a plaintext file
/// ignores the passphrase.
pub fn load_with(path: &Path, passphrase: Option<&SecretString>) -> Result<SigningKey, KeyStoreError> {
    let file = read(path)?;
    decode(path, file, passphrase)
}

/// Re-encrypts the key at `path` under `new`, atomically, keeping its PeerId. `old`
/// unlocks an encrypted file and is ignored for a plaintext one (which this encrypts).
/// On any error, including a wrong `old`, the file is left as it was.
pub fn change_passphrase(path: &Path, old: Option<&SecretString>, new: &SecretString) -> Result<PeerId, KeyStoreError> {
    let key = load_with(path, old)?;
    rewrite_encrypted(path, &key, new)
}

/// Atomically replaces the key file at `path` with `key` encrypted under `passphrase`.
/// `key` must be the identity the file records (as returned by [`load_with`]), so this
/// can change the protection of a key but never the identity behind a path.
pub fn rewrite_encrypted(path: &Path, key: &SigningKey, passphrase: &SecretString) -> Result<PeerId, KeyStoreError> {
    let recorded = peer_id(path)?;
    if recorded != key.peer_id() {
        return Err(KeyStoreError::PeerIdMismatch {
            path: path.into(),
            claimed: recorded.to_string(),
            actual: key.peer_id().to_string(),
        });
    }
    let text = encode(path, &key.seed(), Some(passphrase))?;
    secure_fs::replace_private_file(path, &text)?;
    Ok(recorded)
}

/// Reads a passphrase from the environment variable `env`, else from the controlling
/// terminal with echo off (asking twice when `confirm`). `what` names the key in errors.
pub fn read_passphrase(
    env: &'static str,
    prompt: &str,
    confirm: bool,
    what: &str,
) -> Result<SecretString, KeyStoreError> {
    match PassphraseSource::current(env) {
        PassphraseSource::Credential(path) => return read_credential(&path),
        PassphraseSource::Env(_) | PassphraseSource::Terminal => {}
    }
    if let Some(value) = std::env::var_os(env) {
        let value = Zeroizing::new(
            value.into_string().map_err(|_| KeyStoreError::BadPassphrase(format!("{env} is not valid UTF-8")))?,
        );
        if value.is_empty() {
            return Err(KeyStoreError::BadPassphrase(format!(
                "{env} is set but empty; an empty passphrase is refused"
            )));
        }
        return Ok(SecretString::from(value.to_string()));
    }
    let no_tty =
        |e: std::io::Error| KeyStoreError::NoPassphrase { what: what.to_string(), env, reason: format!(" ({e})") };
    // Opening /dev/tty fails without a controlling terminal; then no prompt is possible.
    std::fs::File::open("/dev/tty").map_err(no_tty)?;
    let first = Zeroizing::new(rpassword::prompt_password(prompt).map_err(no_tty)?);
    if first.is_empty() {
        return Err(KeyStoreError::BadPassphrase("empty passphrase refused".into()));
    }
    if confirm {
        let second = Zeroizing::new(rpassword::prompt_password("Repeat the passphrase: ").map_err(no_tty)?);
        if *first != *second {
            return Err(KeyStoreError::BadPassphrase("the passphrases do not match".into()));
        }
    }
    Ok(SecretString::from(first.to_string()))
}

/// A passphrase from a systemd credential file: one trailing newline (as `echo ... |
/// systemd-creds encrypt` leaves) is not part of it; an empty one is refused.
pub fn read_credential(path: &Path) -> Result<SecretString, KeyStoreError> {
    let bytes =
        Zeroizing::new(std::fs::read(path).map_err(|source| KeyStoreError::Credential { path: path.into(), source })?);
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| KeyStoreError::BadPassphrase(format!("the systemd credential {} is not UTF-8", path.display())))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
    if text.is_empty() {
        return Err(KeyStoreError::BadPassphrase(format!(
            "the systemd credential {} is empty; an empty passphrase is refused",
            path.display()
        )));
    }
    Ok(SecretString::from(text.to_string()))
}

/// The one-line warning about a plaintext key at `path`, for the commands that show it.
pub fn plaintext_warning(path: &Path) -> String {
    format!("warning: identity key {} is NOT encrypted; encrypt it with: peervm key change-password", path.display())
}

/// The key file's bytes for `seed`, encrypted when a passphrase is given.
fn encode(
    path: &Path,
    seed: &[u8; 32],
    passphrase: Option<&SecretString>,
) -> Result<Zeroizing<Vec<u8>>, KeyStoreError> {
    let key = SigningKey::from_seed(seed);
    let (protection, secret) = match passphrase {
        None => (PLAINTEXT, Zeroizing::new(hex::encode(seed))),
        Some(pass) => (AGE_SCRYPT, Zeroizing::new(encrypt(path, seed, pass)?)),
    };
    let file = KeyFile {
        format: FORMAT.into(),
        version: VERSION,
        peer_id: key.peer_id().to_string(),
        protection: protection.into(),
        secret: secret.to_string(),
    };
    let text = Zeroizing::new(serde_json::to_vec_pretty(&file).map_err(|e| malformed(path, e))?);
    drop(Zeroizing::new(file.secret));
    Ok(text)
}

fn encrypt(path: &Path, seed: &[u8; 32], pass: &SecretString) -> Result<String, KeyStoreError> {
    let err = |e: &dyn std::fmt::Display| KeyStoreError::Encrypt { path: path.into(), reason: e.to_string() };
    let mut recipient = age::scrypt::Recipient::new(pass.clone());
    recipient.set_work_factor(SCRYPT_LOG_N);
    let encryptor =
        age::Encryptor::with_recipients(iter::once(&recipient as &dyn age::Recipient)).map_err(|e| err(&e))?;
    let mut out = Vec::new();
    let armored = ArmoredWriter::wrap_output(&mut out, Format::AsciiArmor).map_err(|e| err(&e))?;
    let mut writer = encryptor.wrap_output(armored).map_err(|e| err(&e))?;
    writer.write_all(seed).map_err(|e| err(&e))?;
    writer.finish().and_then(|armor| armor.finish()).map_err(|e| err(&e))?;
    String::from_utf8(out).map_err(|e| err(&e))
}

fn decrypt(path: &Path, armored: &str, pass: &SecretString) -> Result<Zeroizing<[u8; 32]>, KeyStoreError> {
    let bad = |reason: String| malformed(path, format!("bad age-encrypted secret: {reason}"));
    let decryptor = age::Decryptor::new(ArmoredReader::new(armored.as_bytes())).map_err(|e| bad(e.to_string()))?;
    if !decryptor.is_scrypt() {
        return Err(bad("not encrypted to a passphrase".into()));
    }
    let mut identity = age::scrypt::Identity::new(pass.clone());
    identity.set_max_work_factor(SCRYPT_MAX_LOG_N);
    let mut reader = decryptor.decrypt(iter::once(&identity as &dyn age::Identity)).map_err(|e| match e {
        age::DecryptError::DecryptionFailed | age::DecryptError::KeyDecryptionFailed => {
            KeyStoreError::WrongPassphrase { path: path.into() }
        }
        other => bad(other.to_string()),
    })?;
    let mut seed = Zeroizing::new([0u8; 32]);
    reader.read_exact(&mut *seed).map_err(|e| bad(format!("reading the seed: {e}")))?;
    let mut extra = Zeroizing::new([0u8; 1]);
    match reader.read(&mut *extra) {
        Ok(0) => Ok(seed),
        Ok(_) => Err(bad("the seed is longer than 32 bytes".into())),
        Err(e) => Err(bad(format!("reading the seed: {e}"))),
    }
}

fn decode(path: &Path, file: KeyFile, passphrase: Option<&SecretString>) -> Result<SigningKey, KeyStoreError> {
    let secret = Zeroizing::new(file.secret);
    let seed = match parse_protection(path, &file.protection)? {
        Protection::Plaintext => {
            let mut seed = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(secret.as_bytes(), &mut *seed)
                .map_err(|e| malformed(path, format!("bad secret: {e}")))?;
            seed
        }
        Protection::AgeScrypt => {
            let Some(pass) = passphrase else {
                return Err(KeyStoreError::NoPassphrase {
                    what: format!("the identity key {}", path.display()),
                    env: PASSPHRASE_ENV,
                    reason: String::new(),
                });
            };
            decrypt(path, &secret, pass)?
        }
    };
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

fn parse_protection(path: &Path, protection: &str) -> Result<Protection, KeyStoreError> {
    match protection {
        PLAINTEXT => Ok(Protection::Plaintext),
        AGE_SCRYPT => Ok(Protection::AgeScrypt),
        other => Err(KeyStoreError::UnknownProtection { path: path.into(), protection: other.into() }),
    }
}

fn recorded_peer_id(path: &Path, file: &KeyFile) -> Result<PeerId, KeyStoreError> {
    file.peer_id.parse().map_err(|e| malformed(path, format!("bad peer_id: {e}")))
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

#[cfg(test)]
mod tests {
    use age::secrecy::ExposeSecret;

    use super::*;

    fn pass(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[test]
    fn encrypted_round_trip_and_typed_wrong_passphrase() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data/identity.key");
        let key = init(&path, Some(&pass("right"))).unwrap();
        assert_eq!(protection(&path).unwrap(), Protection::AgeScrypt);
        assert_eq!(peer_id(&path).unwrap(), key.peer_id());
        let before = std::fs::read(&path).unwrap();
        assert!(!String::from_utf8_lossy(&before).contains(&hex::encode(*key.seed())));

        let err = load_with(&path, Some(&pass("wrong"))).unwrap_err();
        assert!(matches!(err, KeyStoreError::WrongPassphrase { .. }), "{err}");
        assert_eq!(err.to_string(), format!("wrong passphrase for {}", path.display()));
        assert!(matches!(load_with(&path, None), Err(KeyStoreError::NoPassphrase { .. })));
        let err = change_passphrase(&path, Some(&pass("wrong")), &pass("new")).unwrap_err();
        assert!(matches!(err, KeyStoreError::WrongPassphrase { .. }), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);

        assert_eq!(load_with(&path, Some(&pass("right"))).unwrap().peer_id(), key.peer_id());
    }

    #[test]
    fn the_systemd_credential_comes_before_the_variable_and_only_for_the_key_passphrase() {
        let creds = tempfile::tempdir().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let file = creds.path().join(PASSPHRASE_CREDENTIAL);
        std::fs::write(&file, "from systemd\n").unwrap();
        let decide = PassphraseSource::decide;
        assert_eq!(decide(PASSPHRASE_ENV, Some(creds.path()), true), PassphraseSource::Credential(file.clone()));
        assert_eq!(decide(PASSPHRASE_ENV, Some(creds.path()), false), PassphraseSource::Credential(file.clone()));
        assert_eq!(decide(PASSPHRASE_ENV, Some(empty.path()), true), PassphraseSource::Env(PASSPHRASE_ENV));
        assert_eq!(decide(PASSPHRASE_ENV, None, true), PassphraseSource::Env(PASSPHRASE_ENV));
        assert_eq!(decide(PASSPHRASE_ENV, None, false), PassphraseSource::Terminal);
        assert!(!PassphraseSource::Terminal.is_unattended());
        // A new passphrase is typed by an operator, never taken from the service's credential.
        assert_eq!(decide(NEW_PASSPHRASE_ENV, Some(creds.path()), false), PassphraseSource::Terminal);
        assert_eq!(decide(NEW_PASSPHRASE_ENV, Some(creds.path()), true), PassphraseSource::Env(NEW_PASSPHRASE_ENV));

        // The credential's passphrase, without its trailing newline, unlocks the key.
        let key_path = creds.path().join("data/identity.key");
        let key = init(&key_path, Some(&pass("from systemd"))).unwrap();
        let from_file = read_credential(&file).unwrap();
        assert_eq!(load_with(&key_path, Some(&from_file)).unwrap().peer_id(), key.peer_id());
        std::fs::write(&file, "from systemd\r\n").unwrap();
        assert_eq!(read_credential(&file).unwrap().expose_secret(), "from systemd");
        std::fs::write(&file, "two lines\n\n").unwrap();
        assert_eq!(read_credential(&file).unwrap().expose_secret(), "two lines\n", "only one newline is dropped");
        std::fs::write(&file, "\n").unwrap();
        let err = read_credential(&file).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let err = read_credential(&empty.path().join(PASSPHRASE_CREDENTIAL)).unwrap_err();
        assert!(matches!(err, KeyStoreError::Credential { .. }), "{err}");
    }

    #[test]
    fn plaintext_key_is_encrypted_by_change_passphrase() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data/identity.key");
        let key = init(&path, None).unwrap();
        assert_eq!(protection(&path).unwrap(), Protection::Plaintext);
        assert_eq!(load_with(&path, None).unwrap().peer_id(), key.peer_id());
        assert_eq!(change_passphrase(&path, None, &pass("p")).unwrap(), key.peer_id());
        assert_eq!(protection(&path).unwrap(), Protection::AgeScrypt);
        assert_eq!(*load_with(&path, Some(&pass("p"))).unwrap().seed(), *key.seed());
    }

    /// The work factor recorded in an armored age file's scrypt stanza.
    fn scrypt_log_n(armored: &str) -> Option<u8> {
        let mut bytes = Vec::new();
        ArmoredReader::new(armored.as_bytes()).read_to_end(&mut bytes).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let line = text.lines().find(|l| l.starts_with("-> scrypt "))?;
        line.split(' ').nth(3)?.parse().ok()
    }

    #[test]
    fn keys_are_encrypted_with_the_fixed_work_factor_not_one_calibrated_on_this_machine() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data/identity.key");
        init(&path, Some(&pass("p"))).unwrap();
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let secret = file["secret"].as_str().unwrap();
        assert_eq!(scrypt_log_n(secret), Some(SCRYPT_LOG_N));
        change_passphrase(&path, Some(&pass("p")), &pass("q")).unwrap();
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(scrypt_log_n(file["secret"].as_str().unwrap()), Some(SCRYPT_LOG_N));
    }

    #[test]
    fn a_key_file_asking_for_an_excessive_scrypt_work_factor_is_refused_without_running_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("data/identity.key");
        init(&path, Some(&pass("p"))).unwrap();
        let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let mut bytes = Vec::new();
        ArmoredReader::new(file["secret"].as_str().unwrap().as_bytes()).read_to_end(&mut bytes).unwrap();
        let from = format!(" {SCRYPT_LOG_N}\n");
        // One above the bound: age's own default bound (its calibration + 4) would accept
        // it on most machines and run it.
        let to = format!(" {}\n", SCRYPT_MAX_LOG_N + 1);
        let at = bytes.windows(from.len()).position(|w| w == from.as_bytes()).expect("the stanza's work factor");
        bytes.splice(at..at + from.len(), to.bytes());
        let mut out = Vec::new();
        let mut w = ArmoredWriter::wrap_output(&mut out, Format::AsciiArmor).unwrap();
        w.write_all(&bytes).unwrap();
        w.finish().unwrap();
        file["secret"] = String::from_utf8(out).unwrap().into();
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        // 2^21 would take 2 GiB and seconds; the refusal comes first.
        let t = std::time::Instant::now();
        let err = load_with(&path, Some(&pass("p"))).unwrap_err();
        assert!(matches!(err, KeyStoreError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("bad age-encrypted secret"), "{err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(30));
    }
}
