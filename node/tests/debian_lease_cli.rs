//! A debian-12 lease end to end as a requestor runs it (issue 13, docs/guest-image.md
//! "The debian-12 image"): a provider offering `debian-12` next to `minimal`, then
//! `peervm lease create --image debian-12`, `peervm exec` and OpenSSH with the lease's
//! pinned known_hosts. In the guest: systemd is up, the real cloud-init took the
//! provider's seed without a warning, the lease's user has passwordless sudo and apt, the
//! root file system has the leased size, the only SSH host key is the pinned one, only
//! the requestor's key gets in and no password does; terminate leaves nothing.
//!
//! The suite's one debian-12 boot: a systemd guest under software emulation takes
//! minutes (docs/testing.md).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::*;

const IMAGE: &str = "debian-12";
const DISK_GIB: u64 = 4;

/// Units a guest without a route out may fail on: they fetch or sync over the network.
/// Anything else failing is a broken image or seed.
const NEEDS_NETWORK: [&str; 5] = [
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "systemd-networkd-wait-online.service",
    "systemd-timesyncd.service",
    "chrony.service",
];

/// `peervm exec -- sh -c CMD`: one shell command line in the guest; its output and exit code.
fn exec(req: &Path, id: &str, cmd: &str) -> (Option<i32>, String) {
    let out = peervm(req, &["exec", id, "--", "sh", "-c", cmd]);
    let text = stdout(&out);
    eprintln!("$ {cmd}\n{text}{}", stderr(&out));
    (out.status.code(), text)
}

/// As [`exec`], for a command that must succeed.
fn exec_ok(req: &Path, id: &str, cmd: &str) -> String {
    let (code, text) = exec(req, id, cmd);
    assert_eq!(code, Some(0), "`{cmd}` failed: {text}");
    text
}

/// The lease's `peervm ssh-config` Host block written to a file, with some of its lines
/// replaced (keyword, new argument), for OpenSSH runs that try other ways in. The block
/// keeps the pinned known_hosts, so a refusal is the guest's and not a host key mismatch.
fn ssh_config_with(req: &Path, id: &str, changes: &[(&str, &str)], extra: &[&str], name: &str) -> (PathBuf, String) {
    let out = peervm(req, &["ssh-config", id]);
    assert!(out.status.success(), "ssh-config: {}", stderr(&out));
    let block = stdout(&out);
    let alias = block.lines().next().and_then(|l| l.strip_prefix("Host ")).expect("Host line").trim().to_string();
    let mut text = String::new();
    for line in block.lines() {
        let keyword = line.split_whitespace().next().unwrap_or("");
        match changes.iter().find(|(k, _)| *k == keyword) {
            Some((k, v)) => text += &format!("    {k} {v}\n"),
            None => text += &format!("{line}\n"),
        }
    }
    for line in extra {
        text += &format!("    {line}\n");
    }
    let path = req.join(name);
    std::fs::write(&path, &text).unwrap();
    (path, alias)
}

/// OpenSSH with only the given config file, running `true` in the guest.
fn openssh(config: &Path, alias: &str) -> Output {
    Command::new("ssh").arg("-F").arg(config).args(["-o", "BatchMode=yes", alias, "true"]).output().expect("run ssh")
}

/// The methods in OpenSSH's "Permission denied (publickey,password)." line: what the
/// server still offers after refusing.
fn offered_methods(stderr: &str) -> Option<String> {
    let rest = stderr.split("Permission denied (").nth(1)?;
    Some(rest.split(')').next()?.to_string())
}

/// "ssh-ed25519 AAAA..." of an OpenSSH public key line (the comment dropped).
fn key_fields(line: &str) -> String {
    line.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

#[ignore = "needs root: runs a provider that boots a debian-12 guest"]
#[test]
fn debian_lease_through_the_cli_gives_a_usable_locked_down_guest() {
    Needs::guests().and(Needs::image(IMAGE)).require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvdb", iface: "db", net: "10.215.20", port_min: 27400, vcpus: 2, memory: "2GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    toml.extra_images.push((IMAGE.into(), peervm_testenv::image_dir(IMAGE)));
    let config = toml.write(&root.join("pvdb.toml"));
    let (_provider, started) =
        spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &site.data(root));
    let provider_id = started["peer_id"].as_str().expect("peer id").to_string();
    let offer = wait_for(HANG_GUARD, || {
        offers(&boot).into_iter().find(|o| {
            o["provider"] == provider_id.as_str()
                && o["images"].as_array().is_some_and(|i| i.iter().any(|n| n == IMAGE))
        })
    });
    assert!(offer.is_some(), "the provider's offer names {IMAGE}; log:\n{}", site.log(root));

    // -- lease create, as a process, as a user types it ------------------------------------
    let req = root.join("requestor");
    let t = Instant::now();
    let disk = format!("{DISK_GIB}GiB");
    let args = ["lease", "create", "--bootstrap", &boot, "--image", IMAGE, "--vcpus", "2", "--memory", "1GiB"];
    let args = [&args[..], &["--disk", &disk, "--duration", "30m", "--json"]].concat();
    let out = peervm(&req, &args);
    let created = t.elapsed();
    eprintln!("lease create took {created:?}; its stderr:\n{}", stderr(&out));
    assert!(out.status.success(), "lease create failed: {}\nprovider log:\n{}", stderr(&out), site.log(root));
    let lease: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("lease JSON");
    let id = lease["lease"].as_str().expect("lease id").to_string();
    assert_eq!(lease["state"], "running");
    assert_eq!(lease["image"], IMAGE);
    assert_eq!(lease["ssh"]["user"], "peervm", "debian-12 logs in as its login user");
    let stages: Vec<&str> = lease["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(stages.iter().any(|s| s.starts_with("provider: booting")), "{stages:?}");
    assert!(stages.iter().any(|s| s.starts_with("granted")), "{stages:?}");

    // -- systemd and cloud-init ---------------------------------------------------------------
    // A unit stuck starting would hang `--wait`: `timeout` turns that into a state to show.
    let (_, state) = exec(&req, &id, "timeout 600 systemctl is-system-running --wait");
    let state = state.trim();
    if state != "running" {
        let failed = exec_ok(&req, &id, "systemctl --failed --no-legend --plain");
        eprintln!("system is {state}; failed units:\n{failed}");
        let units: Vec<&str> = failed.lines().filter_map(|l| l.split_whitespace().next()).collect();
        assert!(
            state == "degraded" && !units.is_empty() && units.iter().all(|u| NEEDS_NETWORK.contains(u)),
            "systemd is {state:?} with failed units {units:?}"
        );
    }
    let ci = exec_ok(&req, &id, "cloud-init status --wait >/dev/null; cloud-init status --long");
    eprintln!("cloud-init done {:?} after lease create started", t.elapsed());
    assert!(ci.contains("status: done") && !ci.contains("rror"), "cloud-init: {ci}");
    let (code, schema) = exec(&req, &id, "sudo -n cloud-init schema --system 2>&1");
    assert!(code == Some(0) && schema.contains("Valid cloud-config"), "the seed is valid cloud-config: {schema}");
    let warnings = exec_ok(&req, &id, "sudo -n grep -E 'WARNING|Traceback' /var/log/cloud-init.log; true");
    assert!(warnings.trim().is_empty(), "cloud-init warned: {warnings}");

    // -- the lease's user: sudo, apt, not root, the seed's hostname ----------------------------
    exec_ok(&req, &id, "sudo -n true");
    let apt = exec_ok(&req, &id, "apt-get --version");
    assert!(apt.starts_with("apt "), "apt-get --version: {apt}");
    let who = exec_ok(&req, &id, "id -un; id -u; hostname");
    let who: Vec<&str> = who.lines().collect();
    assert_eq!(who.first(), Some(&"peervm"));
    assert_ne!(who.get(1), Some(&"0"), "a normal user, not root");
    assert_eq!(who.get(2).copied(), Some(format!("peervm-{}", &id[..8]).as_str()), "the seed's hostname");

    // -- the root file system grew to the leased size (within ext4's overhead) -----------------
    let df = exec_ok(&req, &id, "df -B1 --output=size / | tail -1");
    let root_bytes: u64 = df.trim().parse().unwrap_or_else(|_| panic!("df: {df:?}"));
    let leased = DISK_GIB << 30;
    eprintln!("/ is {root_bytes} bytes of a {leased}-byte lease disk");
    assert!(root_bytes <= leased && root_bytes * 100 >= leased * 95, "/ is {root_bytes} bytes, leased {leased}");

    // -- the only host key is the lease's, and it is the pinned one ----------------------------
    let files = exec_ok(&req, &id, "ls /etc/ssh | grep '^ssh_host_'");
    assert_eq!(files.split_whitespace().collect::<Vec<_>>(), ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]);
    let known_hosts = std::fs::read_to_string(req.join("leases").join(&id).join("known_hosts")).expect("known_hosts");
    let pinned = known_hosts.lines().next().and_then(|l| l.split_once(' ')).map(|(_, k)| key_fields(k));
    assert_eq!(pinned.as_deref(), lease["ssh"]["host_key"].as_str(), "known_hosts pins the grant's key");
    let public = exec_ok(&req, &id, "sudo -n cat /etc/ssh/ssh_host_ed25519_key.pub");
    assert_eq!(Some(key_fields(&public)), pinned, "the guest's host key file is the pinned key");

    // -- only the requestor's key, and only for peervm -----------------------------------------
    let key_path = lease["key_path"].as_str().expect("key path");
    let mine = Command::new("ssh-keygen").args(["-y", "-f", key_path]).output().expect("ssh-keygen");
    let mine = key_fields(&stdout(&mine));
    assert!(mine.starts_with("ssh-ed25519 "), "the lease key: {mine:?}");
    let authorized = exec_ok(&req, &id, "cat ~/.ssh/authorized_keys");
    let keys: Vec<String> =
        authorized.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).map(key_fields).collect();
    assert_eq!(keys, [mine], "peervm's authorized_keys holds exactly the requestor's key");
    let rooted = exec_ok(&req, &id, "sudo -n cat /root/.ssh/authorized_keys 2>/dev/null; true");
    assert!(rooted.lines().all(|l| l.trim().is_empty() || l.starts_with('#')), "root has keys: {rooted}");

    // -- OpenSSH, as `peervm ssh` runs it, with the pinned known_hosts -------------------------
    let out = peervm(&req, &["ssh", &id, "--", "-o", "BatchMode=yes", "echo", "via-openssh"]);
    assert!(stdout(&out).contains("via-openssh"), "peervm ssh: {} {}", stdout(&out), stderr(&out));

    // -- other ways in are shut: a password, another key, root ---------------------------------
    let sshd = exec_ok(
        &req,
        &id,
        "sudo -n sshd -T | grep -Ei '^(passwordauthentication|kbdinteractiveauthentication|permitrootlogin) '",
    );
    assert!(sshd.contains("passwordauthentication no"), "sshd: {sshd}");
    assert!(sshd.contains("kbdinteractiveauthentication no"), "sshd: {sshd}");
    let (config, alias) = ssh_config_with(
        &req,
        &id,
        &[
            ("PreferredAuthentications", "password,keyboard-interactive"),
            ("PubkeyAuthentication", "no"),
            ("PasswordAuthentication", "yes"),
            ("KbdInteractiveAuthentication", "yes"),
        ],
        &["NumberOfPasswordPrompts 0"],
        "password.conf",
    );
    let out = openssh(&config, &alias);
    let err = stderr(&out);
    eprintln!("password login: {err}");
    assert!(!out.status.success(), "password login got in");
    // The refusal names what the server still offers: public keys only, no password.
    assert_eq!(offered_methods(&err).as_deref(), Some("publickey"), "{err}");

    let other = root.join("other_key");
    let made = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&other).output().unwrap();
    assert!(made.status.success(), "ssh-keygen: {}", stderr(&made));
    let (config, alias) =
        ssh_config_with(&req, &id, &[("IdentityFile", other.to_str().unwrap())], &[], "other-key.conf");
    let out = openssh(&config, &alias);
    assert!(!out.status.success(), "a key that is not the lease's got in");
    assert_eq!(offered_methods(&stderr(&out)).as_deref(), Some("publickey"), "{}", stderr(&out));
    let (config, alias) = ssh_config_with(&req, &id, &[("User", "root")], &[], "root.conf");
    let out = openssh(&config, &alias);
    assert!(!out.status.success(), "root got in with the lease's key");
    assert_eq!(offered_methods(&stderr(&out)).as_deref(), Some("publickey"), "{}", stderr(&out));
    // The same config as the user it was made for gets in: the refusals above are the key
    // and the user, not the config.
    let (config, alias) = ssh_config_with(&req, &id, &[], &[], "same.conf");
    let out = openssh(&config, &alias);
    assert!(out.status.success(), "the lease's own config: {}", stderr(&out));

    // -- terminate: nothing of the lease is left -----------------------------------------------
    let t = Instant::now();
    let out = peervm(&req, &["lease", "terminate", &id]);
    assert!(out.status.success(), "terminate: {}", stderr(&out));
    let left = site.wait_clean(root, HANG_GUARD);
    eprintln!("terminated and clean in {:?}", t.elapsed());
    assert!(left.is_empty(), "left behind: {left:?}");
}
