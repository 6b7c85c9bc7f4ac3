//! The swarm commands as users run them, as processes over loopback: bootstrap startup
//! output, the provider daemon's graceful stop, `peervm offers` filtering and sorting,
//! and clear errors for unreachable bootstraps and bad input.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Needs, PEERVM, ProviderToml, spawn_json};

/// A stand-in image directory for tests that only parse a config (no provider starts).
fn image_dir(root: &Path) -> PathBuf {
    let dir = root.join("image");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("manifest.json"), br#"{"name":"minimal","version":1}"#).unwrap();
    dir
}

/// A provider config on the real guest image, with names, addresses and ports of its own
/// (`n` picks them), as the providers of one test run side by side.
fn provider_config(root: &Path, n: u8, bootstrap: &str, vcpus: u32, price: &str, region: &str) -> PathBuf {
    provider_toml(n, bootstrap, vcpus, price, region).write(&root.join(format!("p{n}.toml")))
}

fn provider_toml(n: u8, bootstrap: &str, vcpus: u32, price: &str, region: &str) -> ProviderToml {
    let pool = format!("10.217.{n}.0/24");
    let mut t = ProviderToml::new(
        &format!("pvswarm{n}"),
        &format!("s{}", (b'a' + n) as char),
        &pool,
        27500 + u16::from(n) * 16,
        &common::image_dir(),
    );
    t.bootstrap = vec![bootstrap.into()];
    t.region = region.into();
    t.vcpus = vcpus;
    t.memory = "4GiB".into();
    t.disk = "40GiB".into();
    t.per_vcpu_hour = price.into();
    t.per_memory_gib_hour = "0.001".into();
    t.per_disk_gib_hour = "0".into();
    t.egress = None;
    t
}

fn offers(bootstrap: &str, extra: &[&str]) -> (bool, Vec<serde_json::Value>, String) {
    let out = Command::new(PEERVM)
        .args(["offers", "--bootstrap", bootstrap, "--json", "--timeout", "5"])
        .args(extra)
        .env_remove("PEERVM_BOOTSTRAP")
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    (out.status.success(), lines, String::from_utf8_lossy(&out.stderr).into_owned())
}

fn wait_for_offers(bootstrap: &str, n: usize) -> Vec<serde_json::Value> {
    let start = Instant::now();
    loop {
        let (ok, lines, err) = offers(bootstrap, &[]);
        assert!(ok, "offers failed: {err}");
        if lines.len() >= n || start.elapsed() > common::HANG_GUARD {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[ignore = "needs root: runs a provider (guest image, cgroups, namespaces)"]
#[test]
fn offers_filters_and_sorts_and_provider_withdraws_on_sigterm() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (_boot, started) = spawn_json(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], &root.join("b"));
    assert_eq!(started["role"], "bootstrap");
    let boot = started["listen_addrs"][0].as_str().unwrap().to_string();
    assert!(boot.contains("/p2p/12D3KooW"), "{boot}");

    let specs = [("cheap", 2, "0.010", "eu"), ("mid", 8, "0.020", "us"), ("dear", 4, "0.040", "eu")];
    let mut providers = Vec::new();
    for (n, (name, vcpus, price, region)) in (0u8..).zip(specs) {
        let cfg = provider_config(root, n, &boot, vcpus, price, region);
        let (p, line) =
            spawn_json(&["provider", "run", "--config", cfg.to_str().unwrap()], &root.join(format!("data-{name}")));
        assert_eq!(line["role"], "provider");
        providers.push((p, line["peer_id"].as_str().unwrap().to_string()));
    }

    let all = wait_for_offers(&boot, 3);
    assert_eq!(all.len(), 3, "{all:?}");
    let prices: Vec<u64> = all.iter().map(|o| o["price_per_hour_micros"].as_u64().unwrap()).collect();
    let mut sorted = prices.clone();
    sorted.sort();
    assert_eq!(prices, sorted, "offers are not cheapest first");
    assert_eq!(all[0]["provider"], providers[0].1.as_str());

    // Filters: vCPUs, region, max price, accel, image.
    let (_, four, _) = offers(&boot, &["--vcpus", "4"]);
    let names: Vec<&str> = four.iter().map(|o| o["provider"].as_str().unwrap()).collect();
    // At 4 vCPUs: mid costs 4*0.02=0.08, dear 4*0.04=0.16; cheap has only 2 vCPUs.
    assert_eq!(names, vec![providers[1].1.as_str(), providers[2].1.as_str()]);
    let (_, eu, _) = offers(&boot, &["--region", "eu"]);
    assert_eq!(eu.len(), 2);
    let (_, capped, _) = offers(&boot, &["--max-price", "0.02"]);
    assert_eq!(capped.len(), 2, "{capped:?}");
    let (_, big, _) = offers(&boot, &["--memory", "8GiB"]);
    assert!(big.is_empty());
    let (_, kvm, _) = offers(&boot, &["--accel", "kvm"]);
    assert!(kvm.is_empty());
    let (_, img, _) = offers(&boot, &["--image", "minimal", "--disk", "40GiB"]);
    assert_eq!(img.len(), 3);

    // SIGTERM: the provider publishes a withdrawn advert before it exits.
    let (cheap, cheap_id) = providers.remove(0);
    let status = cheap.terminate().expect("provider stops on SIGTERM");
    assert!(status.success(), "provider exit: {status:?}");
    let start = Instant::now();
    loop {
        let (_, lines, _) = offers(&boot, &[]);
        if !lines.iter().any(|o| o["provider"] == cheap_id.as_str()) {
            break;
        }
        // The withdrawal is the event; the deadline stays well below the advert's 300 s
        // TTL, so a listing that only ran out cannot pass for a withdrawal.
        assert!(start.elapsed() < Duration::from_secs(120), "withdrawn provider still listed");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A provider keeps its advert live with refresh tokens (docs/protocol.md, section 4a):
/// with a 30 s lifetime and a token every 10 s, `peervm offers` still lists the advert it
/// signed first (the same seq) after that advert's signed expiry, with an expiry the
/// tokens pushed past it.
#[ignore = "needs root: runs a provider (guest image, cgroups, namespaces)"]
#[test]
fn refresh_tokens_keep_a_providers_offer_listed_past_its_signed_expiry_without_a_new_signature() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (_boot, started) = spawn_json(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], &root.join("b"));
    let boot = started["listen_addrs"][0].as_str().unwrap().to_string();
    let mut t = provider_toml(6, &boot, 1, "0.010", "eu");
    (t.ttl_secs, t.refresh_secs) = (Some(30), Some(10));
    let cfg = t.write(&root.join("p6.toml"));
    let (_p, line) = spawn_json(&["provider", "run", "--config", cfg.to_str().unwrap()], &root.join("data-p"));
    let id = line["peer_id"].as_str().unwrap().to_string();

    wait_for_offers(&boot, 1);
    // `seq` is the provider's clock when it signed (docs/architecture.md, "Provider
    // daemon"), so an advert's signed expiry is 30 s after its seq. The provider may sign
    // again early (its port verification's result goes into the advert); what must not
    // happen is an advert listed after its signed expiry being the one it just signed.
    let start = Instant::now();
    let mut seen = None;
    let listed = loop {
        let (ok, lines, err) = offers(&boot, &[]);
        assert!(ok, "offers failed: {err}");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        match lines.iter().find(|o| o["provider"] == id.as_str()) {
            Some(ours) => {
                let seq = ours["seq"].as_u64().unwrap();
                if now > seq + 35_000 {
                    break ours.clone();
                }
                seen = Some(seq);
            }
            None => panic!("the offer was gone (last seen with seq {seen:?}): no token kept it live"),
        }
        assert!(start.elapsed() < common::HANG_GUARD * 2, "no advert of the provider lived past its signed expiry");
        std::thread::sleep(Duration::from_millis(500));
    };
    let seq = listed["seq"].as_u64().unwrap();
    assert!(
        listed["expires_at_unix_ms"].as_u64().is_some_and(|e| e > seq + 30_000),
        "the listed expiry is not past the signed one: {listed}"
    );
}

#[test]
fn offers_exits_nonzero_with_a_clear_message_when_no_bootstrap_answers() {
    let out = Command::new(PEERVM)
        .args([
            "offers",
            "--timeout",
            "3",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/1",
            "--bootstrap",
            "/ip4/127.0.0.1/tcp/2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("could not reach any bootstrap node"), "{err}");
    assert_eq!(err.lines().count(), 1, "one clear line, not a backtrace: {err}");

    let out = Command::new(PEERVM).args(["offers"]).env_remove("PEERVM_BOOTSTRAP").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--bootstrap"));
}

#[test]
fn bad_multiaddr_and_bad_config_get_one_clear_message() {
    let out = Command::new(PEERVM).args(["offers", "--bootstrap", "not-an-address"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`not-an-address` is not a multiaddr"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let cases = [("[ssh]\nhost = 1", "config"), ("", "missing field")];
    for (text, expect) in cases {
        let cfg = tmp.path().join("bad.toml");
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(PEERVM)
            .arg("--data-dir")
            .arg(tmp.path().join("d"))
            .args(["provider", "run", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect) && err.contains("bad.toml"), "{err}");
    }
    // A valid file with an invalid value names the field.
    let good = provider_config(tmp.path(), 9, "/ip4/127.0.0.1/tcp/1", 2, "0.01", "eu");
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("memory = \"4GiB\"", "memory = \"lots\"")
        .replace(&common::image_dir().display().to_string(), image_dir(tmp.path()).to_str().unwrap());
    std::fs::write(&good, text).unwrap();
    let out = Command::new(PEERVM)
        .arg("--data-dir")
        .arg(tmp.path().join("d"))
        .args(["provider", "run", "--config", good.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("resources.memory"), "{err}");
}

#[test]
fn example_provider_config_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/provider.toml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = image_dir(tmp.path());
    let text = text.replace("/var/cache/peervm/images/minimal", img.to_str().unwrap());
    let cfg = peervm_node::provider::config::ProviderConfig::parse(&text, Path::new("examples/provider.toml")).unwrap();
    assert_eq!(cfg.ttl_secs, 300);
    assert_eq!(cfg.republish_secs, 60);
    assert_eq!(cfg.resources.memory_mib, 2048);
    assert_eq!(cfg.pricing.per_vcpu_hour_micros, 10_000);
    // Debian's default ephemeral range: the example's SSH ports must stay out of it.
    let ssh = (cfg.ssh.port_min, cfg.ssh.port_max);
    assert_eq!(peervm_node::provider::doctor::ephemeral_overlap(ssh, (32768, 60999)), None, "{ssh:?}");
}

#[test]
fn packaged_provider_config_is_valid_and_keeps_state_in_the_service_directory() {
    // packaging/debian/provider.toml, the Debian package's conffile
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/debian/provider.toml")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let img = image_dir(tmp.path());
    let text = text.replace("/var/cache/peervm/images/minimal", img.to_str().unwrap());
    let cfg =
        peervm_node::provider::config::ProviderConfig::parse(&text, Path::new("/etc/peervm/provider.toml")).unwrap();
    // StateDirectory=peervm of peervm-provider.service
    assert_eq!(cfg.data_dir.as_deref(), Some(Path::new("/var/lib/peervm")));
    assert!(!cfg.allow_tcg, "a packaged host offers KVM guests unless the operator allows TCG");
    let ssh = (cfg.ssh.port_min, cfg.ssh.port_max);
    assert_eq!(peervm_node::provider::doctor::ephemeral_overlap(ssh, (32768, 60999)), None, "{ssh:?}");
}

#[test]
fn metrics_are_served_on_loopback_only() {
    use std::io::{Read, Write};
    let tmp = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let (_boot, _) =
        spawn_json(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics", &metrics], &tmp.path().join("b"));
    let mut body = String::new();
    let start = Instant::now();
    while body.is_empty() && start.elapsed() < common::HANG_GUARD {
        if let Ok(mut conn) = std::net::TcpStream::connect(&metrics) {
            conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
            conn.read_to_string(&mut body).unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    for name in ["peervm_adverts_accepted_total", "peervm_advert_store_size", "peervm_peers_connected"] {
        assert!(body.contains(name), "{name} missing from {body}");
    }

    let out = Command::new(PEERVM)
        .arg("--data-dir")
        .arg(tmp.path().join("b2"))
        .args(["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics", "0.0.0.0:9464"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback address"));
}

#[ignore = "needs root: runs a provider (guest image, cgroups, namespaces)"]
#[test]
fn blocking_a_provider_hides_its_offers_on_the_requestor_side() {
    Needs::guests().require();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let (_boot, started) = spawn_json(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], &root.join("b"));
    let boot = started["listen_addrs"][0].as_str().unwrap().to_string();
    let cfg = provider_config(root, 5, &boot, 2, "0.01", "eu");
    let (_p, line) = spawn_json(&["provider", "run", "--config", cfg.to_str().unwrap()], &root.join("data-p5"));
    let provider = line["peer_id"].as_str().unwrap().to_string();
    assert_eq!(wait_for_offers(&boot, 1).len(), 1);

    let req = root.join("requestor");
    let run = |args: &[&str]| {
        Command::new(PEERVM).arg("--data-dir").arg(&req).args(args).env_remove("PEERVM_BOOTSTRAP").output().unwrap()
    };
    assert!(run(&["block", &provider, "--reason", "sold a dead VM"]).status.success());
    let listed = String::from_utf8_lossy(&run(&["blocked"]).stdout).into_owned();
    assert!(listed.contains(&provider) && listed.contains("sold a dead VM"), "{listed}");
    let out = run(&["offers", "--bootstrap", &boot, "--json", "--timeout", "5"]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "a blocked provider's offer is shown");
    let out = run(&["lease", "create", "--bootstrap", &boot, "--provider", &provider, "--memory", "256MiB"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("you blocked provider"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(run(&["unblock", &provider]).status.success());
    let out = run(&["offers", "--bootstrap", &boot, "--json", "--timeout", "5"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&provider), "unblocked provider's offer is back");
}
