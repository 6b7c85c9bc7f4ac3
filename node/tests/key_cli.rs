//! `peervm key init` / `key show` as a user runs them.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

fn peervm(data_dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peervm"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("PEERVM_DATA_DIR")
        .output()
        .expect("run peervm")
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn key_init_creates_0600_file_in_0700_dir_and_show_prints_the_peer_id() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm(&data, &["key", "init"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let peer_id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(peer_id.starts_with("12D3KooW"), "{peer_id}");
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("identity.key")), 0o600);

    let out = peervm(&data, &["key", "show"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), peer_id);

    // A second init must not replace the identity.
    let out = peervm(&data, &["key", "init"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    assert_eq!(String::from_utf8(peervm(&data, &["key", "show"]).stdout).unwrap().trim(), peer_id);
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
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&key.display().to_string()) && err.contains("chmod 600"), "{err}");

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&data.display().to_string()) && err.contains("chmod 700"), "{err}");
}

#[test]
fn missing_or_corrupt_key_gets_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("peervm key init"));

    assert!(peervm(&data, &["key", "init"]).status.success());
    let key = data.join("identity.key");
    let text = std::fs::read_to_string(&key).unwrap();
    // Swap in another secret: the PeerId no longer matches.
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let secret = v["secret"].as_str().unwrap();
    let tampered = text.replace(secret, &"ab".repeat(32));
    std::fs::write(&key, tampered).unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("corrupt"), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(&key, b"not json").unwrap();
    let out = peervm(&data, &["key", "show"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a peervm identity key file"));
}
