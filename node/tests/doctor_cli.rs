//! `peervm doctor` on this machine: each check with its verdict, and a failing check
//! (a key readable by others) turns into a non-zero exit with the fix.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

#[ignore = "needs root: checks a provider host (root, QEMU, guest image)"]
#[test]
fn doctor_reports_each_check_and_fails_on_a_key_readable_by_others() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvdr", iface: "dr", net: "10.215.13", port_min: 27360, vcpus: 1, memory: "1GiB" };
    let config = site.config(root, "/ip4/127.0.0.1/tcp/1");
    let data = site.data(root);
    assert!(peervm(&data, &["key", "init", "--insecure-plaintext"]).status.success());

    let run = || {
        let out = peervm(&data, &["doctor", "--config", config.to_str().unwrap(), "--json"]);
        let checks: Vec<serde_json::Value> = serde_json::from_str(stdout(&out).trim())
            .unwrap_or_else(|e| panic!("doctor JSON {:?}: {e}; {}", stdout(&out), stderr(&out)));
        (out.status.code(), checks)
    };
    let (code, checks) = run();
    let verdict = |checks: &[serde_json::Value], name: &str| -> Vec<String> {
        checks.iter().filter(|c| c["name"] == name).map(|c| c["verdict"].as_str().unwrap().to_string()).collect()
    };
    for name in ["privileges", "qemu", "cgroups", "nftables", "namespaces", "image", "files", "ssh ports"] {
        assert!(verdict(&checks, name).iter().all(|v| v == "pass"), "{name}: {checks:?}");
    }
    // This machine has no working KVM (nested): a warning, since the config allows TCG.
    assert!(!verdict(&checks, "kvm").is_empty());
    assert_eq!(verdict(&checks, "key"), ["warn"], "a plaintext key is a warning");
    assert_eq!(code, Some(0), "{checks:?}");

    let key = data.join("identity.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, checks) = run();
    assert_eq!(code, Some(1));
    let failed: Vec<&serde_json::Value> = checks.iter().filter(|c| c["verdict"] == "fail").collect();
    assert!(!failed.is_empty());
    assert!(failed.iter().all(|c| c["detail"].as_str().unwrap().contains("identity.key")), "{failed:?}");
    assert!(failed.iter().any(|c| c["fix"].as_str().unwrap().contains("chmod 600")), "{failed:?}");

    let human = stdout(&peervm(&data, &["doctor", "--config", config.to_str().unwrap()]));
    assert!(human.contains("FAIL") && human.contains("fix: chmod 600"), "{human}");
}
