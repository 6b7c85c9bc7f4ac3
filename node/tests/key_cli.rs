//! `peervm key init|show|change-password|export` as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `peervm --data-dir <data_dir> <args>` with exactly the given passphrase variables,
/// in a new session so it has no controlling terminal to prompt on.
fn peervm_env(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_peervm"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("PEERVM_DATA_DIR")
        .env_remove("PEERVM_PASSPHRASE")
        .env_remove("PEERVM_NEW_PASSPHRASE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdin(std::process::Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: setsid is async-signal-safe; it detaches the child from our terminal.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.output().expect("run peervm")
}

const PASS: &str = "correct horse battery staple";

/// With PEERVM_PASSPHRASE set to [`PASS`].
fn peervm(data_dir: &Path, args: &[&str]) -> Output {
    peervm_env(data_dir, args, &[("PEERVM_PASSPHRASE", PASS)])
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap().trim().to_string()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn key_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn key_init_creates_0600_file_in_0700_dir_and_show_prints_the_peer_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm(&data, &["key", "init"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let peer_id = stdout(&out);
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("identity.key")), 0o600);

    // `show` needs no passphrase.
    let out = peervm_env(&data, &["key", "show"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), peer_id);

    // A second init must not replace the identity.
    let out = peervm(&data, &["key", "init"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("refusing to overwrite"));
    assert_eq!(stdout(&peervm(&data, &["key", "show"])), peer_id);
}

#[test]
fn key_readable_by_others_refused_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    assert!(peervm(&data, &["key", "init"]).status.success());
    let key = data.join("identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&key.display().to_string()) && err.contains("chmod 600"), "{err}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&data.display().to_string()) && err.contains("chmod 700"), "{err}");
}

#[test]
fn missing_or_corrupt_key_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("peervm key init"));

    assert!(peervm(&data, &["key", "init", "--insecure-plaintext"]).status.success());
    let key = data.join("identity.key");
    let text = std::fs::read_to_string(&key).unwrap();
    // Swap in another secret: the PeerId no longer matches.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let secret = v["secret"].as_str().unwrap();
    let tampered = text.replace(secret, &"ab".repeat(32));
    std::fs::write(&key, tampered).unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));

    std::fs::write(&key, b"not json").unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not a peervm identity key file"));
}

#[test]
fn encrypted_key_with_another_peer_id_is_refused_as_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(peervm(&a, &["key", "init"]).status.success());
    let other = stdout(&peervm(&b, &["key", "init"]));
    let key = a.join("identity.key");
    let mut v = key_json(&key);
    v["peer_id"] = other.into();
    std::fs::write(&key, serde_json::to_vec(&v).unwrap()).unwrap();
    let out = peervm(&a, &["key", "export"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("corrupt"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn wrong_passphrase_is_a_clear_error_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    assert!(peervm(&data, &["key", "init"]).status.success());
    let key = data.join("identity.key");
    let before = std::fs::read(&key).unwrap();
    let wrong = [("PEERVM_PASSPHRASE", "not the passphrase"), ("PEERVM_NEW_PASSPHRASE", "new one")];
    let expected = format!("wrong passphrase for {}", key.display());

    for args in [
        &["key", "export"][..],
        &["key", "change-password"][..],
        &["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"][..],
    ] {
        let out = peervm_env(&data, args, &wrong);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(&expected), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
        assert_eq!(std::fs::read(&key).unwrap(), before, "{args:?} changed the key file");
    }
    assert_eq!(mode(&key), 0o600);
    // No temporary file left behind either.
    assert_eq!(std::fs::read_dir(&data).unwrap().count(), 1);
}

#[test]
fn no_passphrase_and_no_terminal_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm_env(&data, &["key", "init"], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("PEERVM_PASSPHRASE") && err.contains("--insecure-plaintext"), "{err}");
    assert!(!data.join("identity.key").exists());

    assert!(peervm(&data, &["key", "init"]).status.success());
    let out = peervm_env(&data, &["key", "export"], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("PEERVM_PASSPHRASE"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn change_password_keeps_the_peer_id_and_only_the_new_passphrase_works() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let peer_id = stdout(&peervm(&data, &["key", "init"]));
    let seed = stdout(&peervm(&data, &["key", "export"]));
    let key = data.join("identity.key");
    let before = std::fs::read(&key).unwrap();

    let out = peervm_env(
        &data,
        &["key", "change-password"],
        &[("PEERVM_PASSPHRASE", PASS), ("PEERVM_NEW_PASSPHRASE", "a new passphrase")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), peer_id);
    assert_ne!(std::fs::read(&key).unwrap(), before);
    assert_eq!(mode(&key), 0o600);
    assert_eq!(stdout(&peervm_env(&data, &["key", "show"], &[])), peer_id);

    let out = peervm_env(&data, &["key", "export"], &[("PEERVM_PASSPHRASE", "a new passphrase")]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), seed);
    let out = peervm(&data, &["key", "export"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong passphrase"), "{}", stderr(&out));

    // Without a new passphrase the file stays as it is.
    let now = std::fs::read(&key).unwrap();
    let out = peervm_env(&data, &["key", "change-password"], &[("PEERVM_PASSPHRASE", "a new passphrase")]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("PEERVM_NEW_PASSPHRASE"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&key).unwrap(), now);
}

#[test]
fn encrypted_key_file_never_contains_the_raw_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let peer_id = stdout(&peervm(&data, &["key", "init"]));
    let out = peervm(&data, &["key", "export"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
    let seed_hex = stdout(&out);
    assert_eq!(seed_hex.len(), 64, "{seed_hex}");
    let seed: Vec<u8> = (0..32).map(|i| u8::from_str_radix(&seed_hex[2 * i..2 * i + 2], 16).unwrap()).collect();

    let key = data.join("identity.key");
    let bytes = std::fs::read(&key).unwrap();
    let text = String::from_utf8_lossy(&bytes).to_lowercase();
    assert!(!text.contains(&seed_hex.to_lowercase()));
    assert!(!bytes.windows(seed.len()).any(|w| w == seed.as_slice()));
    let v = key_json(&key);
    assert_eq!(v["protection"], "age-scrypt");
    assert_eq!(v["peer_id"], peer_id.as_str());
    let secret = v["secret"].as_str().unwrap();
    assert!(secret.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"), "{secret}");
}

#[test]
fn insecure_plaintext_warns_loudly_and_change_password_encrypts_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm_env(&data, &["key", "init", "--insecure-plaintext"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("WARNING") && stderr(&out).contains("UNENCRYPTED"), "{}", stderr(&out));
    let peer_id = stdout(&out);
    let key = data.join("identity.key");
    assert_eq!(key_json(&key)["protection"], "plaintext");

    // Loads without a passphrase, with a warning each time.
    let out = peervm_env(&data, &["key", "export"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("NOT encrypted"), "{}", stderr(&out));
    let seed = stdout(&out);
    assert_eq!(key_json(&key)["secret"], seed.as_str());

    let out = peervm_env(&data, &["key", "change-password"], &[("PEERVM_NEW_PASSPHRASE", PASS)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), peer_id);
    assert_eq!(key_json(&key)["protection"], "age-scrypt");
    assert!(!std::fs::read_to_string(&key).unwrap().contains(&seed));
    assert_eq!(stdout(&peervm(&data, &["key", "export"])), seed);
}

/// A plaintext key is warned about once, when a requestor command creates it; the
/// commands after that say nothing about it (issue 20: `doctor` and `key export` still do).
#[test]
fn a_plaintext_requestor_key_is_warned_about_when_created_not_on_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let warned = |out: &Output| {
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        (e.contains("UNENCRYPTED") || e.contains("NOT encrypted"), e)
    };
    let out = peervm_env(&data, &["lease", "list"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(key_json(&data.join("identity.key"))["protection"], "plaintext");
    let (first, text) = warned(&out);
    assert!(first, "the key's creation is warned about: {text}");
    for _ in 0..2 {
        let out = peervm_env(&data, &["lease", "list"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "no leases");
        let (again, text) = warned(&out);
        assert!(!again, "a later command warns again: {text}");
    }
    let (export, text) = warned(&peervm_env(&data, &["key", "export"], &[]));
    assert!(export, "key export still says the key is not encrypted: {text}");
}

/// A service's passphrase as a systemd credential (`$CREDENTIALS_DIRECTORY/peervm-passphrase`,
/// e.g. from `LoadCredentialEncrypted=`): it unlocks the key without the variable, and
/// it wins over the variable when both are set.
#[test]
fn the_systemd_credential_unlocks_the_key_and_comes_before_the_variable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let init = peervm(&data, &["key", "init"]);
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let peer_id = String::from_utf8_lossy(&init.stdout).trim().to_string();
    let creds = tmp.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("peervm-passphrase"), format!("{PASS}\n")).unwrap();
    let creds_dir = creds.to_str().unwrap();

    let out = peervm_env(&data, &["key", "export"], &[("CREDENTIALS_DIRECTORY", creds_dir)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&peer_id), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(creds.join("peervm-passphrase"), "not the passphrase").unwrap();
    let both = [("CREDENTIALS_DIRECTORY", creds_dir), ("PEERVM_PASSPHRASE", PASS)];
    let out = peervm_env(&data, &["key", "export"], &both);
    assert!(!out.status.success(), "the variable was used although a credential is there");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("wrong passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the credential file, the variable applies again.
    std::fs::remove_file(creds.join("peervm-passphrase")).unwrap();
    assert!(peervm_env(&data, &["key", "export"], &both).status.success());
}
