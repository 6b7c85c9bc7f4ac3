//! Abuse detection (docs/architecture.md "Abuse detection") with real guests: a guest
//! that opens connections to many ports of a stand-in host is flagged by the
//! new-connections rule within its configured window and, with `action = "isolate"`, loses
//! its network while it, its disk and its console log stay for inspection, as
//! `peervm provider isolate` leaves them; a well-behaved guest that sends at least as many
//! bytes over one connection is checked again and again after its transfer and never
//! flagged.
//!
//! The stand-in host lives in a network namespace of this test at 203.0.113.230 (a /28 of a
//! documentation range, public to the lease's rules, used by no other root test; the test
//! refuses to run on a host that has an address of it), routed
//! through a veth of the test's own named outside the `ad` prefix (lease rules treat `ad*`
//! interfaces as other guests). Tests never send to a real outside address. Verdicts come
//! from events and counts: the audit record and the isolated lease for the positive case,
//! `peervm_abuse_checks_total` moving past the transfer for the negative one.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use common::*;

const SITE: Site = Site { prefix: "pvad", iface: "ad", net: "10.215.32", port_min: 27800, vcpus: 2, memory: "1GiB" };
const METRICS: &str = "127.0.0.1:27830";
const OUTSIDE_NS: &str = "zad-outside";
const OUTSIDE_LINK: &str = "zadout0";
/// A /28 of TEST-NET-3 (203.0.113.224/28) that no other test uses.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 230);
const OUTSIDE_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 225);
const OUTSIDE_PREFIX: u8 = 28;
/// The closed ports the scanner knocks on, and the one port the good guest's transfer
/// goes to.
const SCAN_PORTS: (u16, u16) = (20000, 20199);
const SINK_PORT: u16 = 9000;
/// What the good guest sends over its one connection.
const TRANSFER_KIB: u64 = 1024;
/// The rule under test: 5 new connections per second, checked every 2 s.
const THRESHOLD: u32 = 5;
const INTERVAL_SECS: u64 = 2;

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("run sh");
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The stand-in outside host; removed on drop.
struct Outside;

impl Outside {
    fn create() -> Outside {
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", OUTSIDE_LINK]).output();
        // the host's own networks must not hold the stand-in's addresses, or the guests'
        // traffic could leave the host (docs/vmm.md "The development hosts")
        let addrs = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().expect("ip addr");
        assert!(!stdout(&addrs).contains(" 203.0.113."), "the host has an address in 203.0.113.0/24");
        let o = Outside;
        sh(&format!("ip netns add {OUTSIDE_NS}"));
        sh(&format!("ip link add {OUTSIDE_LINK} type veth peer name eth0 netns {OUTSIDE_NS}"));
        sh(&format!("ip addr add {OUTSIDE_GW}/{OUTSIDE_PREFIX} dev {OUTSIDE_LINK}"));
        sh(&format!("ip link set {OUTSIDE_LINK} up"));
        // replies are forwarded back to the guests: forwarding on this link only
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{OUTSIDE_LINK}/forwarding"), "1").expect("forwarding");
        sh(&format!("ip -n {OUTSIDE_NS} addr add {OUTSIDE}/{OUTSIDE_PREFIX} dev eth0"));
        sh(&format!("ip -n {OUTSIDE_NS} link set eth0 up"));
        sh(&format!("ip -n {OUTSIDE_NS} link set lo up"));
        o
    }

    /// A listener inside the namespace (a thread enters it; the socket stays there).
    fn listen(&self, port: u16) -> std::net::TcpListener {
        let path = format!("/run/netns/{OUTSIDE_NS}");
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this short-lived thread only
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind in the namespace")
        })
        .join()
        .expect("listener thread")
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", OUTSIDE_LINK]).output();
    }
}

/// Receives one connection on `sink` and reads `want` bytes of it (or to its end), then
/// closes it; `None` if no connection comes (bounded by the hang guard).
fn receive(sink: std::net::TcpListener, want: u64) -> std::thread::JoinHandle<Option<u64>> {
    std::thread::spawn(move || {
        sink.set_nonblocking(true).ok()?;
        let (mut s, _) = wait_for(HANG_GUARD, || sink.accept().ok())?;
        s.set_nonblocking(false).ok()?;
        s.set_read_timeout(Some(HANG_GUARD)).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < want {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n as u64,
            }
        }
        Some(got)
        // dropped here: the stream closes, and the guest's nc ends
    })
}

/// The provider's /metrics, or "" while it does not answer.
fn metrics() -> String {
    let Ok(mut s) = TcpStream::connect(METRICS) else { return String::new() };
    let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

/// The value of the series whose line starts with `series` (name and labels).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn checks() -> u64 {
    metric(&metrics(), "peervm_abuse_checks_total").unwrap_or(0.0) as u64
}

/// Waits until abuse detection has checked `n` more samples than `since`.
fn wait_for_checks(since: u64, n: u64) -> u64 {
    wait_for(HANG_GUARD, || Some(checks()).filter(|c| *c >= since + n)).expect("abuse detection keeps checking")
}

/// The audit log's abuse records.
fn abuse_records(data: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| r["event"] == "abuse")
        .collect()
}

fn lease_row(data: &Path, id: &str) -> serde_json::Value {
    let out = peervm(data, &["provider", "leases", "--json"]);
    assert!(out.status.success(), "provider leases: {}", stderr(&out));
    let rows: serde_json::Value = serde_json::from_str(stdout(&out).trim()).expect("leases JSON");
    rows.as_array().expect("a list").iter().find(|r| r["lease"] == id).cloned().expect("the lease")
}

#[ignore = "needs root: runs a provider that boots guests, and a stand-in host in a namespace"]
#[test]
fn a_port_scanning_guest_is_isolated_and_a_guest_moving_as_many_bytes_over_one_connection_is_not_flagged() {
    Needs::guests().require();
    let _serial = serial();
    let outside = Outside::create();
    let sink = outside.listen(SINK_PORT);
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = SITE.toml(&boot);
    toml.egress = Some("public-only".into());
    toml.metrics = Some(METRICS.into());
    toml.extra_tables = vec![format!(
        "[abuse]\ninterval_secs = {INTERVAL_SECS}\n\
         [abuse.new_connections]\nthreshold = {THRESHOLD}\naction = \"isolate\"\n"
    )];
    let config = toml.write(&root.join("pvad.toml"));
    let data = SITE.data(root);
    let (_provider, line) = spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &data);
    let provider = line["peer_id"].as_str().expect("peer id").to_string();
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider)).expect("the provider's offer is visible");
    let req = root.join("requestor");
    let scanner = lease_create(&req, &boot, &SMALL_LEASE)["lease"].as_str().expect("lease id").to_string();
    let good = lease_create(&req, &boot, &SMALL_LEASE)["lease"].as_str().expect("lease id").to_string();
    for id in [&scanner, &good] {
        let out = peervm(&req, &["exec", id, "--", "true"]);
        assert!(out.status.success(), "exec in {id}: {}", stderr(&out));
    }
    // both guests are watched: a sample of each has been compared with the one before
    wait_for_checks(0, 2);

    // The good guest sends 1 MiB over one connection to the stand-in host; abuse
    // detection checks it three more times after the transfer and flags nothing.
    eprintln!("good guest: sending {TRANSFER_KIB} KiB over one connection");
    let receiver = receive(sink, TRANSFER_KIB * 1024);
    let send = format!("dd if=/dev/zero bs=1024 count={TRANSFER_KIB} 2>/dev/null | nc {OUTSIDE} {SINK_PORT}");
    let out = peervm(&req, &["exec", &good, "--", "sh", "-c", &send]);
    let got = receiver.join().expect("receiver");
    assert_eq!(
        got,
        Some(TRANSFER_KIB * 1024),
        "the good guest's transfer did not arrive: {} {}",
        stdout(&out),
        stderr(&out)
    );
    wait_for_checks(checks(), 3);
    assert_eq!(abuse_records(&data), Vec::<serde_json::Value>::new(), "a well-behaved guest was flagged");

    // The scanner knocks on 200 closed ports of the stand-in host, over and over, in the
    // background (its own session: the end of the SSH session does not stop it): every
    // knock is a new connection, answered by a reset.
    eprintln!("scanner: knocking on ports {}-{} of {OUTSIDE}", SCAN_PORTS.0, SCAN_PORTS.1);
    let (lo, hi) = SCAN_PORTS;
    let scan = format!(
        "setsid sh -c 'while :; do for p in $(seq {lo} {hi}); do nc -w 1 {OUTSIDE} $p </dev/null >/dev/null 2>&1 & \
         done; wait; done' </dev/null >/dev/null 2>&1 &"
    );
    let out = peervm(&req, &["exec", &scanner, "--", "sh", "-c", &scan]);
    assert!(out.status.success(), "scanner: {}", stderr(&out));
    let started = checks();
    let record = wait_for(HANG_GUARD, || abuse_records(&data).into_iter().find(|r| r["lease"] == scanner.as_str()))
        .unwrap_or_else(|| {
            let seen: Vec<String> =
                metrics().lines().filter(|l| l.contains(&scanner) || l.contains("abuse")).map(String::from).collect();
            let guest = peervm(&req, &["exec", &scanner, "--", "sh", "-c", "ip route; ps | grep -c nc"]);
            panic!(
                "the scanner is not flagged; metrics: {seen:#?}\nguest: {}{}\nprovider log tail: {}",
                stdout(&guest),
                stderr(&guest),
                SITE.log(root).lines().rev().take(20).collect::<Vec<_>>().join("\n")
            )
        });
    let flagged_at = checks();
    eprintln!("scanner flagged: {record}");
    assert_eq!(record["rule"], "new_connections", "{record}");
    assert_eq!(record["action"], "isolate", "{record}");
    assert_eq!(record["threshold"], THRESHOLD, "{record}");
    assert!(record["value"].as_f64().is_some_and(|v| v >= f64::from(THRESHOLD)), "{record}");
    assert!(record.get("error").is_none(), "{record}");
    // Within the configured window: a round partly before the scan, one that saw a full
    // interval of it, and the round in flight, two leases each.
    assert!(flagged_at - started <= 6, "flagged only after {} checks of 2 leases", flagged_at - started);

    // Isolated, as `peervm provider isolate` leaves a lease: no network, no SSH for the
    // requestor, but the guest, its disk and its console log are kept.
    let row = wait_for(HANG_GUARD, || Some(lease_row(&data, &scanner)).filter(|r| r["isolated"] == true))
        .expect("the scanner's lease is isolated");
    assert_eq!(row["state"], "running", "{row}");
    let host_if = format!("{}{}", SITE.iface, &scanner[..12]);
    let link = Command::new("ip").args(["-o", "link", "show", &host_if]).output().expect("ip link");
    assert!(stdout(&link).contains("state DOWN"), "the scanner's link is up: {}", stdout(&link));
    let out = peervm(&req, &["exec", &scanner, "--", "echo", "should-not-run"]);
    assert!(!out.status.success() && !stdout(&out).contains("should-not-run"), "the scanner is still reachable");
    assert!(SITE.leftovers(root).iter().any(|l| l.starts_with("process") && l.contains(&scanner)), "guest gone");
    let dir = data.join("vmm/leases").join(&scanner);
    assert!(dir.join("overlay.qcow2").exists() && dir.join("console.log").exists(), "evidence gone");

    // The good guest moved at least as many bytes as the scanner, and is still never
    // flagged now that the rule has shown it fires; it keeps its network and SSH.
    wait_for_checks(checks(), 2);
    let text = metrics();
    let tx = |id: &str| metric(&text, &format!("peervm_lease_guest_tx_bytes{{lease=\"{id}\"}}")).expect("tx bytes");
    assert!(tx(&good) >= tx(&scanner), "the good guest sent {} bytes, the scanner {}", tx(&good), tx(&scanner));
    assert!(abuse_records(&data).iter().all(|r| r["lease"] == scanner.as_str()), "{:?}", abuse_records(&data));
    assert_eq!(lease_row(&data, &good)["isolated"], false);
    let triggers: Vec<&str> = text.lines().filter(|l| l.starts_with("peervm_abuse_triggers_total{")).collect();
    assert_eq!(triggers, [r#"peervm_abuse_triggers_total{rule="new_connections",action="isolate"} 1"#]);
    let out = peervm(&req, &["exec", &good, "--", "true"]);
    assert!(out.status.success(), "the good guest lost SSH: {}", stderr(&out));

    for id in [&scanner, &good] {
        let out = peervm(&data, &["provider", "terminate", id]);
        assert!(out.status.success(), "terminate {id}: {}", stderr(&out));
    }
    let left = SITE.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}
