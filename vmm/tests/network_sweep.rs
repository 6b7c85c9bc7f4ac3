//! A lease network made by vmm's in-process netlink code and left behind by a crash
//! (issue 19): iproute2 sees its namespace as one of its own (`ip netns list`,
//! `ip netns exec`), with the bridge, tap and uplink a lease start makes, and a reconcile
//! removes namespace, veth pair and nft table although no lease directory names them.
//!
//! The process that makes the network is this test binary run again as a child with
//! NETWORK_ENV set to the lease id: it sets up that lease's network, says so, and waits
//! to be SIGKILLed (bounded: it exits by itself after 5 minutes). No guest is booted.
//!
//! Its own prefixes `pvnw`/`nw`, pool 10.214.32.0/30 and port 47360, so its sweep never
//! meets another test's objects.

mod guest_harness;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use guest_harness::{Needs, Site, TestState, leftovers_at};
use peervm_vmm::network::setup_lease_network;
use peervm_vmm::{AddressPool, EgressPolicy, Hypervisor, LeaseId, NamePrefix, QemuHypervisor, ReconcileReport};

const SITE: Site = Site { long: "pvnw", short: "nw", pool: "10.214.32.0/30", port_base: 47360, port_count: 1 };
const NETWORK_ENV: &str = "PEERVM_VMM_TEST_NETWORK";

/// Not a test of its own: the child process that
/// `a_network_left_by_a_killed_process_is_swept` starts (with NETWORK_ENV set) and kills.
/// Run any other way it does nothing.
#[ignore = "not a test: the child process of a_network_left_by_a_killed_process_is_swept"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_maker_for_sweep_test() {
    let Ok(lease) = std::env::var(NETWORK_ENV) else { return };
    let lease: LeaseId = lease.parse().unwrap();
    let names = NamePrefix::new(SITE.long, SITE.short).unwrap();
    let pool: AddressPool = SITE.pool.parse().unwrap();
    setup_lease_network(&names, &lease, pool.slot(0).unwrap(), EgressPolicy::PublicOnly, pool).await.unwrap();
    println!("NETWORK-READY");
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[ignore = "needs root: makes a lease's namespace, veth pair, tap and nft table"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_left_by_a_killed_process_is_swept() {
    if std::env::var_os(NETWORK_ENV).is_some() {
        return; // this process is the child: only network_maker_for_sweep_test runs
    }
    Needs::root("network namespaces, nftables").tools(&["ip", "nft"]).path("/dev/net/tun", "the tun driver").require();
    let state = TestState::at(SITE);
    let lease = LeaseId::random();
    let ns = format!("{}-{}", SITE.long, lease.hex());
    let host_if = format!("{}{}", SITE.short, lease.short_hex(12));

    // -- a process sets up the lease's network, then dies by SIGKILL -------------------
    let mut child = Maker(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "network_maker_for_sweep_test", "--include-ignored", "--nocapture", "--test-threads=1"])
            .env(NETWORK_ENV, lease.hex())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the child exited before its network was set up").unwrap();
        // libtest prints "test name ... " on the same line first
        if line.contains("NETWORK-READY") {
            break;
        }
    }
    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();

    // -- iproute2 sees the namespace and what the netlink code made --------------------
    let namespaces = must("ip", &["netns", "list"]);
    assert!(namespaces.lines().any(|l| l.split_whitespace().next() == Some(ns.as_str())), "{namespaces}");
    let inside = must("ip", &["netns", "exec", &ns, "ip", "-o", "-d", "link", "show"]);
    let link = |name: &str| {
        inside
            .lines()
            .find(|l| l.split(": ").nth(1).is_some_and(|n| n.split('@').next() == Some(name)))
            .unwrap_or_else(|| panic!("no {name} in the lease namespace:\n{inside}"))
            .to_string()
    };
    let (bridge, uplink, tap) = (link("br0"), link("uplink"), link("tap0"));
    assert!(bridge.contains(",UP") && bridge.contains("bridge"), "{bridge}");
    for port in [&uplink, &tap] {
        assert!(port.contains(",UP") && port.contains("master br0"), "{port}");
    }
    assert!(uplink.contains("veth"), "{uplink}");
    assert!(tap.contains("tun type tap") && tap.contains("vnet_hdr on") && tap.contains("persist on"), "{tap}");
    let addrs = must("ip", &["netns", "exec", &ns, "ip", "-o", "addr", "show"]);
    assert!(!addrs.contains("inet "), "the lease namespace has IPv4 addresses:\n{addrs}");
    let host_end = must("ip", &["-o", "addr", "show", "dev", &host_if]);
    assert!(host_end.contains("inet 10.214.32.1/30"), "{host_end}");
    assert!(must("ip", &["-o", "link", "show", "dev", &host_if]).contains(",UP"));
    must("nft", &["list", "table", "inet", &ns]);

    // -- a reconcile with no live lease sweeps it all ----------------------------------
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let report = hv.reconcile(&[]).await.unwrap();
    assert!(report.removed_leases.is_empty() && report.failed.is_empty(), "{report:?}");
    for want in [format!("netns {ns}"), format!("nft table inet {ns}")] {
        assert!(report.removed_objects.contains(&want), "{want} not reported as removed: {report:?}");
    }
    // the host end went with the namespace, or the sweep deleted it: either way gone
    let left = leftovers_at(SITE, Some(&lease), state.path(), None);
    assert!(left.is_empty(), "left behind after reconcile: {left:#?}");
    assert_eq!(hv.reconcile(&[]).await.unwrap(), ReconcileReport::default());
}

/// The child process, SIGKILLed on drop: a failing test must not leave it running.
/// Declared after the `TestState`, so it is gone before the teardown reconciles.
struct Maker(std::process::Child);

impl Drop for Maker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a host tool that must succeed; its stdout.
fn must(program: &str, args: &[&str]) -> String {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
