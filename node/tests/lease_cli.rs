//! Leases end to end, as users run them: a bootstrap, a provider running real guests
//! (TCG) and the requestor CLI, as processes over loopback.

mod common;

use std::path::Path;

use common::*;

fn lease_id(lease: &serde_json::Value) -> String {
    lease["lease"].as_str().expect("lease id").to_string()
}

fn status_json(data: &Path, id: &str) -> serde_json::Value {
    let out = peervm(data, &["lease", "status", id, "--json"]);
    assert!(out.status.success(), "status failed: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).expect("status JSON")
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn lease_full_flow_exec_extend_terminate_leaves_nothing() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvla", iface: "la", net: "10.215.0", port_min: 27200, vcpus: 2, memory: "2GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    let req = root.join("requestor");
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("the provider's offer is visible");

    let lease =
        lease_create(&req, &boot, &["--vcpus", "1", "--memory", "256MiB", "--disk", "1GiB", "--duration", "10m"]);
    let id = lease_id(&lease);
    assert_eq!(lease["provider"], provider_id.as_str());
    assert_eq!(lease["state"], "running");
    let stages: Vec<&str> = lease["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert!(stages.iter().any(|s| s.starts_with("granted")), "{stages:?}");
    // The per-lease key is 0600.
    let key_path = lease["key_path"].as_str().unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(key_path).unwrap().permissions().mode() & 0o777, 0o600);

    // The advert shows the capacity taken.
    wait_for(HANG_GUARD, || (free_vcpus(&boot, &provider_id) == Some(1)).then_some(()))
        .expect("advert shows 1 of 2 vCPUs free");

    // exec: output and exit code pass through.
    let out = peervm(&req, &["exec", &id[..8], "--", "uname", "-a"]);
    assert!(out.status.success(), "exec failed: {}", stderr(&out));
    assert!(stdout(&out).contains("Linux"), "{}", stdout(&out));
    let out = peervm(&req, &["exec", &id, "--", "nproc"]);
    assert_eq!(stdout(&out).trim(), "1", "the guest has the leased vCPU count");
    let out = peervm(&req, &["exec", &id, "--", "sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "exit code passes through: {}", stderr(&out));
    // the remote command is exactly the argv: quotes, spaces and `$` reach it unchanged
    let out = peervm(&req, &["exec", &id, "--", "printf", "[%s]", "a b", "it's", "$HOME", ""]);
    assert_eq!(stdout(&out), "[a b][it's][$HOME][]", "exec passes the argv unchanged: {}", stderr(&out));

    // OpenSSH with the pinned key and the lease key.
    let out = peervm(&req, &["ssh", &id, "--", "-o", "BatchMode=yes", "echo", "via-openssh"]);
    assert!(stdout(&out).contains("via-openssh"), "peervm ssh: {} {}", stdout(&out), stderr(&out));
    let config = stdout(&peervm(&req, &["ssh-config", &id]));
    assert!(config.contains("StrictHostKeyChecking yes") && config.contains("HostKeyAlias"), "{config}");

    // Status carries usage from the provider.
    let st = status_json(&req, &id);
    assert_eq!(st["state"], "running");
    // the same access fields as the lease's `lease list --json` row
    assert_eq!(st["ssh"], lease["ssh"], "status --json shows the SSH host, port, user and pinned key: {st}");
    assert!(st["ssh"]["port"].as_u64().is_some() && st["ssh"]["host_key"].is_string(), "{st}");
    assert!(st["usage"]["memory_current_bytes"].as_u64().unwrap() > 0, "{st}");
    assert!(st["usage"]["cpu_usec"].as_u64().unwrap() > 0, "{st}");
    assert!(st["usage"]["net_rx_bytes"].as_u64().unwrap() > 0, "ssh bytes are counted: {st}");

    // Extend moves the end.
    let before = st["ends_at_unix_ms"].as_u64().unwrap();
    let out = peervm(&req, &["lease", "extend", &id, "--by", "30m"]);
    assert!(out.status.success(), "extend: {}", stderr(&out));
    let after = status_json(&req, &id)["ends_at_unix_ms"].as_u64().unwrap();
    assert_eq!(after, before + 30 * 60 * 1000);

    // Terminate: the guest and everything of it is gone, capacity is back.
    let out = peervm(&req, &["lease", "terminate", &id]);
    assert!(out.status.success(), "terminate: {}", stderr(&out));
    assert_eq!(status_json(&req, &id)["state"], "ended");
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    wait_for(HANG_GUARD, || (free_vcpus(&boot, &provider_id) == Some(2)).then_some(()))
        .expect("advert shows all vCPUs free again");
    let list = stdout(&peervm(&req, &["lease", "list"]));
    assert!(list.contains(&id[..12]) && list.contains("ended"), "{list}");
    // An ended lease says when it ended and why, never when it "ends".
    let row = list.lines().find(|l| l.starts_with(&id[..12])).unwrap_or_default();
    assert!(row.contains(" ago") && row.ends_with("terminated by you") && !row.contains(" in "), "{list}");
    let st = status_json(&req, &id);
    assert_eq!(st["detail"], "terminated by you", "{st}");
    assert!(st["ended_at_unix_ms"].as_u64().unwrap() <= peervm_node::clock::now_unix_ms(), "{st}");
    let text = stdout(&peervm(&req, &["lease", "status", &id]));
    assert!(text.contains("\nended     ") && text.contains("ago: terminated by you"), "{text}");
    assert!(!text.contains("ends "), "{text}");
    eprintln!("lease list, then lease status, of the terminated lease:\n{list}{text}");
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn host_key_that_differs_from_the_pinned_one_is_refused_by_ssh_and_exec() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvlk", iface: "lk", net: "10.215.4", port_min: 27260, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");
    let req = root.join("requestor");
    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease_id(&lease);
    assert!(peervm(&req, &["exec", &id, "--", "true"]).status.success());

    // Pin another key, as if the provider's guest were swapped or the route hijacked.
    {
        let db = peervm_node::requestor::db::RequestorDb::open(&req.join("requestor.db")).unwrap();
        let lease_id = peervm_protocol::LeaseId::from_hex(&id).unwrap();
        db.set_host_key(&lease_id, [9u8; 32]).unwrap();
    }
    let out = peervm(&req, &["exec", &id, "--", "echo", "should-not-run"]);
    assert!(!out.status.success());
    assert!(!stdout(&out).contains("should-not-run"));
    assert!(stderr(&out).to_lowercase().contains("host key"), "{}", stderr(&out));
    let out = peervm(&req, &["ssh", &id, "--", "-o", "BatchMode=yes", "echo", "should-not-run"]);
    assert!(!out.status.success());
    assert!(!stdout(&out).contains("should-not-run"));
    assert!(stderr(&out).to_uppercase().contains("HOST KEY"), "{}", stderr(&out));

    assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn lease_expiry_ends_the_guest_and_frees_capacity() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvle", iface: "le", net: "10.215.1", port_min: 27220, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");
    let req = root.join("requestor");
    let lease = lease_create(&req, &boot, &["--memory", "256MiB", "--disk", "1GiB", "--duration", "20s"]);
    let id = lease_id(&lease);
    wait_for(HANG_GUARD, || (free_vcpus(&boot, &provider_id) == Some(0)).then_some(()))
        .expect("advert shows the vCPU taken");

    let ended = wait_for(HANG_GUARD, || {
        let st = status_json(&req, &id);
        (st["state"] == "ended").then_some(st)
    });
    assert!(ended.is_some(), "lease did not end at its time; log:\n{}", site.log(root));
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    wait_for(HANG_GUARD, || (free_vcpus(&boot, &provider_id) == Some(1)).then_some(()))
        .expect("advert shows the vCPU free again");
    let out = peervm(&req, &["exec", &id, "--", "true"]);
    assert!(!out.status.success(), "an ended lease's guest is unreachable");
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn provider_killed_under_a_running_lease_then_restarted_serves_or_cleans_it() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvlr", iface: "lr", net: "10.215.2", port_min: 27240, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");
    let req = root.join("requestor");
    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease_id(&lease);
    assert!(peervm(&req, &["exec", &id, "--", "echo", "before"]).status.success());

    // SIGKILL: no withdrawal, no teardown.
    // SAFETY: kill(2) on our own child
    unsafe { libc::kill(provider.pid(), libc::SIGKILL) };
    drop(provider);
    let (_provider, again) = site.start(root, &boot);
    assert_eq!(again, provider_id, "same identity after restart");

    // It listens on a new port now: the requestor finds it again through the swarm.
    let out = peervm(&req, &["lease", "status", &id, "--json", "--bootstrap", &boot]);
    assert!(out.status.success(), "status after restart: {}", stderr(&out));
    let st: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    match st["state"].as_str() {
        Some("running") => {
            let out = peervm(&req, &["exec", &id, "--", "echo", "after"]);
            assert!(stdout(&out).contains("after"), "re-adopted guest unreachable: {}", stderr(&out));
            assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
        }
        Some("failed") => {}
        other => panic!("lease is {other:?} after the restart: {st}"),
    }
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn several_leases_in_parallel_on_one_provider() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvlp", iface: "lp", net: "10.215.3", port_min: 27250, vcpus: 3, memory: "2GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let (_provider, provider_id) = site.start(root, &boot);
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("offer visible");

    let handles: Vec<_> = (0..3)
        .map(|i| {
            let req = root.join(format!("requestor-{i}"));
            let boot = boot.clone();
            std::thread::spawn(move || {
                let lease = lease_create(&req, &boot, &SMALL_LEASE);
                (req, lease_id(&lease))
            })
        })
        .collect();
    let leases: Vec<_> = handles.into_iter().map(|h| h.join().expect("lease thread")).collect();
    let mut ports = std::collections::HashSet::new();
    for (req, id) in &leases {
        let out = peervm(req, &["exec", id, "--", "hostname"]);
        assert!(out.status.success(), "exec on {id}: {}", stderr(&out));
        let list: serde_json::Value =
            serde_json::from_str(stdout(&peervm(req, &["lease", "list", "--json"])).lines().next().unwrap()).unwrap();
        ports.insert(list["ssh"]["port"].as_u64().unwrap());
    }
    assert_eq!(ports.len(), 3, "each lease has its own SSH port");
    // A fourth does not fit: every vCPU is taken.
    let out = lease_create_from(&root.join("requestor-x"), &boot, &provider_id);
    assert!(!out.status.success());
    for (req, id) in &leases {
        assert!(peervm(req, &["lease", "terminate", id]).status.success());
    }
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}
