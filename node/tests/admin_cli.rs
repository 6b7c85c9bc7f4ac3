//! The provider's admin API and incident response, as an operator uses them: the admin
//! socket's access rules, block, isolate, lock, and the audit log they leave.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use common::*;

fn admin(site_data: &Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["provider"];
    full.extend_from_slice(args);
    full.push("--json");
    let out = peervm(site_data, &full);
    assert!(out.status.success(), "peervm provider {args:?}: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("bad JSON {:?}: {e}", stdout(&out)))
}

fn audit_entries(site_data: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(site_data.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn admin_socket_is_0600_and_refuses_a_connection_from_another_uid() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvaa", iface: "aa", net: "10.215.10", port_min: 27300, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    let data = site.data(root);
    let socket = data.join("admin.sock");
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);

    let status = admin(&data, &["status"]);
    assert_eq!(status["node"]["peer_id"], provider_id.as_str());
    assert_eq!(status["locked"], false);

    // Open the file permissions up, as a careless operator might: the kernel's peer
    // credentials still keep another user out.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new(PEERVM)
        .arg("--data-dir")
        .arg(&data)
        .args(["provider", "lock"])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!out.status.success(), "another uid got in: {}", stdout(&out));
    assert!(stderr(&out).contains("refused: uid 65534"), "{}", stderr(&out));
    assert_eq!(admin(&data, &["status"])["locked"], false, "the refused call changed nothing");
    let refused = audit_entries(&data);
    assert!(
        refused.iter().any(|e| e["event"] == "admin" && e["outcome"] == "refused" && e["uid"] == 65534),
        "{refused:?}"
    );

    // Malformed input gets an error, not a crash.
    let out = peervm(&data, &["provider", "terminate", "not-a-lease"]);
    assert!(!out.status.success() && stderr(&out).contains("not a 32-hex-digit lease id"), "{}", stderr(&out));
    assert_eq!(admin(&data, &["status"])["node"]["peer_id"], provider_id.as_str());
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn blocking_a_requestor_ends_its_leases_and_denies_its_next_request() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvab", iface: "ab", net: "10.215.11", port_min: 27320, vcpus: 2, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");
    let data = site.data(root);
    let req = root.join("requestor");
    let first = lease_create(&req, &boot, &SMALL_LEASE);
    let second = lease_create(&req, &boot, &SMALL_LEASE);
    let requestor_id = stdout(&peervm(&req, &["key", "show"])).trim().to_string();

    let blocked = admin(&data, &["block", &requestor_id, "--reason", "abuse report 42"]);
    let mut ended: Vec<String> =
        blocked["ended_leases"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    ended.sort();
    let mut expected =
        vec![first["lease"].as_str().unwrap().to_string(), second["lease"].as_str().unwrap().to_string()];
    expected.sort();
    assert_eq!(ended, expected);
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    // The denial checked here is the provider's: wait for the freed capacity's advert.
    wait_for_free_vcpus(&boot, &provider_id, HANG_GUARD).expect("the freed vCPUs advertised again");

    let out = lease_create_from(&req, &boot, &provider_id);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("blocked"), "{}", stderr(&out));
    assert_eq!(site.leftovers(root), Vec::<String>::new(), "a denied request starts nothing");

    // The block list names the requestor and the reason, and can be lifted.
    let list = admin(&data, &["blocked"]);
    assert_eq!(list[0]["peer"], requestor_id.as_str());
    assert_eq!(list[0]["reason"], "abuse report 42");
    // The operator can warn others: a signed list of its blocks, gossiped to the swarm.
    let published = admin(&data, &["publish-blocklist"]);
    assert_eq!(published["published_entries"], 1, "{published}");
    assert_eq!(admin(&data, &["unblock", &requestor_id])["was_blocked"], true);

    // Everything is in the audit log: the grants, the admin call, the denial.
    let audit = audit_entries(&data);
    assert!(audit.iter().filter(|e| e["event"] == "lease_request" && e["outcome"] == "granted").count() >= 2);
    assert!(audit.iter().any(|e| e["event"] == "admin" && e["cmd"] == "block"), "{audit:?}");
    assert!(audit.iter().any(|e| e["event"] == "lease_request" && e["reason"] == "blocked"), "{audit:?}");
    assert_eq!(std::fs::metadata(data.join("audit.log")).unwrap().permissions().mode() & 0o777, 0o600);

    // Port verification ran: the bootstrap dialed the provider's ports back.
    let status = wait_for(HANG_GUARD, || {
        let s = admin(&data, &["status"]);
        (!s["reachability"].is_null()).then_some(s)
    })
    .expect("a dial-back result after start");
    let ports = status["reachability"]["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["kind"] == "libp2p" && p["state"] == "open"), "{status}");
    assert!(ports.iter().any(|p| p["kind"] == "ssh" && p["state"] != "filtered"), "{status}");
    // ...and the advert carries it.
    let reach = wait_for(HANG_GUARD, || {
        offers(&boot).into_iter().find(|o| o["provider"] == provider_id.as_str()).and_then(|o| {
            let r = o["reachability"].clone();
            (!r.is_null()).then_some(r)
        })
    })
    .expect("the advert reports the port verification");
    assert_eq!(reach["libp2p_open"], true, "{reach}");
    assert_eq!(reach["ssh_reachable"], true, "{reach}");
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn isolate_cuts_a_guest_off_and_keeps_it_until_the_operator_ends_it_and_lock_refuses_leases() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvai", iface: "ai", net: "10.215.12", port_min: 27340, vcpus: 2, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");
    let data = site.data(root);
    let req = root.join("requestor");
    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease["lease"].as_str().unwrap().to_string();
    assert!(peervm(&req, &["exec", &id, "--", "true"]).status.success());

    admin(&data, &["isolate", &id]);
    let out = peervm(&req, &["exec", &id, "--", "echo", "should-not-run"]);
    assert!(!out.status.success() && !stdout(&out).contains("should-not-run"), "isolated guest still reachable");
    // The guest, its disk and its console log are kept as evidence.
    let kept = site.leftovers(root);
    assert!(kept.iter().any(|l| l.starts_with("process")), "{kept:?}");
    let dir = data.join("vmm/leases").join(&id);
    assert!(dir.join("overlay.qcow2").exists() && dir.join("console.log").exists());
    // The requestor cannot destroy it.
    let out = peervm(&req, &["lease", "terminate", &id]);
    assert!(!out.status.success() && stderr(&out).contains("blocked"), "{}", stderr(&out));
    let leases = admin(&data, &["leases"]);
    assert_eq!(leases[0]["isolated"], true);
    assert_eq!(leases[0]["state"], "running");

    admin(&data, &["terminate", &id]);
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");

    wait_for_free_vcpus(&boot, &provider_id, HANG_GUARD).expect("the freed vCPUs advertised again");
    // Locked: no new lease.
    admin(&data, &["lock"]);
    let out = lease_create_from(&req, &boot, &provider_id);
    assert!(!out.status.success() && stderr(&out).contains("locked"), "{}", stderr(&out));
    assert_eq!(admin(&data, &["status"])["locked"], true);
    admin(&data, &["unlock"]);
    assert_eq!(admin(&data, &["status"])["locked"], false);
}

/// An error names its cause once, however many layers carry it (issue: "cannot read
/// config ...: No such file or directory (os error 2): No such file or directory").
#[test]
fn a_missing_config_or_admin_socket_is_reported_with_its_cause_said_once() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nonexistent.toml");
    for args in [vec!["provider", "run", "--config", missing.to_str().unwrap()], vec!["provider", "status"]] {
        let out = peervm(tmp.path(), &args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        assert!(err.starts_with("peervm: "), "{args:?}: {err}");
        assert_eq!(err.matches("os error 2").count(), 1, "{args:?}: the cause said once: {err}");
    }
}
