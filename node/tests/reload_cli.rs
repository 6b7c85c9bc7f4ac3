//! Reloading a running provider's config (docs/architecture.md, "Reload"): SIGHUP and
//! `peervm provider reload` apply a price change without a restart, while a lease runs on;
//! a change that needs a restart is refused whole, naming the field.

mod common;

use std::path::Path;

use common::*;

fn offer_of(boot: &str, provider: &str) -> Option<serde_json::Value> {
    offers(boot).into_iter().find(|o| o["provider"] == provider)
}

fn hangup(provider: &Proc) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(provider.pid(), libc::SIGHUP) }, 0, "send SIGHUP");
}

/// Lines of the provider's log that contain every one of `words`.
fn log_lines_with(site: &Site, root: &Path, words: &[&str]) -> usize {
    site.log(root).lines().filter(|l| words.iter().all(|w| l.contains(w))).count()
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn sighup_reprices_the_offer_while_a_lease_runs_on_and_a_restart_only_change_is_refused() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvrl", iface: "rl", net: "10.215.26", port_min: 27550, vcpus: 2, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    let config = toml.write(&root.join("pvrl.toml"));
    let (provider, line) =
        spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &site.data(root));
    let provider_id = line["peer_id"].as_str().expect("peer id").to_string();
    let before = wait_for(HANG_GUARD, || offer_of(&boot, &provider_id)).expect("the provider's offer is visible");
    let req = root.join("requestor");
    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease["lease"].as_str().expect("lease id").to_string();
    assert!(peervm(&req, &["exec", &id, "--", "true"]).status.success(), "the new lease answers");

    // The price per vCPU-hour doubles; SIGHUP; the offer shows it with a newer advert.
    toml.per_vcpu_hour = "0.02".into();
    toml.region = "reloaded".into();
    toml.write(&config);
    hangup(&provider);
    let after = wait_for(HANG_GUARD, || {
        offer_of(&boot, &provider_id).filter(|o| o["price_per_hour_micros"] != before["price_per_hour_micros"])
    })
    .expect("the new price reaches `peervm offers`");
    let micros = |o: &serde_json::Value| o["price_per_hour_micros"].as_u64().expect("price");
    // offers prices 1 vCPU by default: the vCPU part went from 10_000 to 20_000 micros.
    assert_eq!(micros(&after), micros(&before) + 10_000, "before {before} after {after}");
    assert_eq!(after["region"], "reloaded");
    assert!(after["seq"].as_u64() > before["seq"].as_u64(), "a newer advert: {after}");
    assert_eq!(log_lines_with(&site, root, &["config reloaded", "pricing.per_vcpu_hour", "advert.region"]), 1);
    assert!(peervm(&req, &["exec", &id, "--", "true"]).status.success(), "the lease answers after the reload");

    // A new SSH port range cannot apply to a running provider: the admin call and SIGHUP
    // are both refused, naming the field, and the running config stays.
    toml.per_vcpu_hour = "0.03".into();
    toml.port_max = toml.port_min + 7;
    toml.write(&config);
    let out = peervm(&site.data(root), &["provider", "reload"]);
    assert!(!out.status.success(), "a restart-only change was applied: {}", stdout(&out));
    assert!(
        stderr(&out).contains("ssh.port_max") && stderr(&out).contains("the running config stays"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("pricing"), "only fields that need a restart are named: {}", stderr(&out));
    hangup(&provider);
    wait_for(HANG_GUARD, || (log_lines_with(&site, root, &["reload refused", "ssh.port_max"]) >= 2).then_some(()))
        .expect("the refused SIGHUP is logged naming the field");
    // Back to the running file but for the region: the admin call applies it and says what.
    toml.port_max = toml.port_min + 15;
    toml.per_vcpu_hour = "0.02".into();
    toml.region = "again".into();
    toml.write(&config);
    let out = peervm(&site.data(root), &["provider", "reload", "--json"]);
    assert!(out.status.success(), "reload: {}", stderr(&out));
    let reply: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("reload JSON");
    assert_eq!(reply["changed"], serde_json::json!(["advert.region"]), "{reply}");
    let seq = reply["advert_seq"].as_u64().expect("advert seq");
    let again = wait_for(HANG_GUARD, || offer_of(&boot, &provider_id).filter(|o| o["seq"].as_u64() >= Some(seq)))
        .expect("the reloaded advert reaches `peervm offers`");
    assert_eq!((again["region"].as_str(), micros(&again)), (Some("again"), micros(&after)), "{again}");

    let st = peervm(&req, &["lease", "status", &id, "--json"]);
    let st: serde_json::Value = serde_json::from_str(stdout(&st).trim()).expect("status JSON");
    assert_eq!(st["state"], "running", "{st}");
    assert!(peervm(&req, &["exec", &id, "--", "true"]).status.success(), "the lease still answers");
    assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    provider.terminate().expect("the provider stops on SIGTERM");
}
