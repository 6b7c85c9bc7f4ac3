//! Bandwidth limits and traffic accounting with a real guest (docs/vmm.md "Bandwidth
//! limits", "Traffic accounting"): a guest allowed out (`public-only`) sends a bounded
//! transfer to a stand-in host and receives one from it; each direction runs at its
//! limit, within a generous tolerance, and, once the test removes that limit's qdisc, the
//! same transfer of the same guest runs well past it (the control that shows the limit
//! is what held it). The usage counters grow by at least the bytes moved.
//!
//! The stand-in host lives in a network namespace of this test at 203.0.113.20 (a
//! documentation range, public to the lease's rules and used by no other test), routed
//! through a veth of the test's own named outside the `bw` prefix (lease rules treat
//! `bw*` interfaces as other guests). Tests never send to a real outside address
//! (docs/vmm.md "The development hosts"). Throughput is bytes over the time a bounded
//! transfer took; no deadline is the verdict.

mod guest_harness;

use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_harness::{Site, Ssh, TestState, guest_env, leftovers_at, login, serial, spec};
use peervm_vmm::{BandwidthLimits, EgressPolicy, Hypervisor, LeaseId, NetUsage, QemuHypervisor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Names, pool and ports of this binary's guests: apart from every other guest test's, so
/// that its teardown's sweep touches nothing of theirs.
const SITE: Site = Site { long: "pvbw", short: "bw", pool: "10.214.8.0/24", port_base: 47320, port_count: 8 };
const SINK_NS: &str = "pvbw-sink";
const SINK_LINK: &str = "sinkbw0";
const SINK: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const SINK_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const UPLOAD_PORT: u16 = 9101;
const DOWNLOAD_PORT: u16 = 9102;

const EGRESS_MBIT: u32 = 2;
const INGRESS_MBIT: u32 = 4;
/// 1 MiB each way: about 4 s at the egress limit, 2 s at the ingress one.
const TRANSFER: u64 = 1 << 20;
/// Measured payload throughput must lie within these fractions of the limit. tbf counts
/// whole frames (about 4 % of a full TCP segment is headers) and lets its 64 KiB bucket
/// through at once (6 % of the transfer): the payload comes out near 1.0 of the limit.
const TOLERANCE: (f64, f64) = (0.5, 1.2);
/// Without the limit the same transfer must beat it by this much.
const CONTROL_FACTOR: f64 = 1.5;

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The stand-in outside host; removed on drop.
struct Sink;

impl Sink {
    fn create() -> Sink {
        let _ = Command::new("ip").args(["netns", "delete", SINK_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", SINK_LINK]).output();
        let s = Sink;
        sh(&format!("ip netns add {SINK_NS}"));
        sh(&format!("ip link add {SINK_LINK} type veth peer name eth0 netns {SINK_NS}"));
        sh(&format!("ip addr add {SINK_GW}/24 dev {SINK_LINK}"));
        sh(&format!("ip link set {SINK_LINK} up"));
        // replies from the sink are forwarded back to the guest: forwarding on this link
        // only (the host's global ip_forward is untouched)
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{SINK_LINK}/forwarding"), "1").unwrap();
        sh(&format!("ip -n {SINK_NS} addr add {SINK}/24 dev eth0"));
        sh(&format!("ip -n {SINK_NS} link set eth0 up"));
        sh(&format!("ip -n {SINK_NS} link set lo up"));
        s
    }

    /// A listener inside the sink's namespace (a thread enters it; the socket stays).
    fn listen(&self, port: u16) -> TcpListener {
        let path = format!("/run/netns/{SINK_NS}");
        let l = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this short-lived thread only
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
        })
        .join()
        .unwrap();
        l.set_nonblocking(true).unwrap();
        TcpListener::from_std(l).unwrap()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", SINK_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", SINK_LINK]).output();
    }
}

/// Payload throughput in Mbit/s of `bytes` in `elapsed`.
fn mbit(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 * 8.0 / elapsed.as_secs_f64() / 1e6
}

/// The guest sends `TRANSFER` bytes to the sink; the sink times them from its first read
/// to its last (the first read's bytes excluded). Returns Mbit/s.
async fn upload(ssh: &Ssh, sink: &TcpListener) -> f64 {
    let cmd = format!("dd if=/dev/zero bs=1024 count={} 2>/dev/null | nc {SINK} {UPLOAD_PORT}", TRANSFER / 1024);
    let receive = async {
        let (mut s, _) = sink.accept().await.unwrap();
        let mut buf = vec![0u8; 64 * 1024];
        let (mut got, mut first) = (0u64, None);
        while got < TRANSFER {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "the guest's upload ended after {got} of {TRANSFER} bytes");
            first.get_or_insert((Instant::now(), n as u64));
            got += n as u64;
        }
        let (t0, first_bytes) = first.unwrap();
        (got - first_bytes, t0.elapsed())
        // dropped here: the sink closes, and the guest's nc ends
    };
    let (ran, (bytes, elapsed)) = tokio::join!(ssh.exec(&cmd, Duration::from_secs(300)), receive);
    ran.unwrap();
    mbit(bytes, elapsed)
}

/// The sink sends `TRANSFER` bytes to the guest, which times them with its own uptime
/// clock from before it connects until its `nc` has read them all. Returns Mbit/s.
async fn download(ssh: &Ssh, sink: &TcpListener) -> f64 {
    let cmd = format!(
        "a=$(cut -d' ' -f1 /proc/uptime); n=$(nc {SINK} {DOWNLOAD_PORT} </dev/null | wc -c); \
         b=$(cut -d' ' -f1 /proc/uptime); echo \"$n $a $b\""
    );
    let send = async {
        let (mut s, _) = sink.accept().await.unwrap();
        s.write_all(&vec![0u8; TRANSFER as usize]).await.unwrap();
        s.shutdown().await.unwrap();
        // until the guest's nc closes too: it has read everything by then
        let mut rest = [0u8; 16];
        while s.read(&mut rest).await.unwrap_or(0) > 0 {}
    };
    let (ran, ()) = tokio::join!(ssh.exec(&cmd, Duration::from_secs(300)), send);
    let (_, out) = ran.unwrap();
    let fields: Vec<&str> = out.split_whitespace().collect();
    let [n, a, b] = fields[..] else { panic!("unexpected guest output {out:?}") };
    assert_eq!(n.parse::<u64>().unwrap(), TRANSFER, "the guest received {n} bytes");
    let secs = b.parse::<f64>().unwrap() - a.parse::<f64>().unwrap();
    mbit(TRANSFER, Duration::from_secs_f64(secs))
}

async fn net_usage(hv: &QemuHypervisor, lease: LeaseId) -> NetUsage {
    hv.usage(lease).await.unwrap().net.expect("the guest's traffic counters")
}

fn assert_near_limit(what: &str, measured: f64, limit: u32) {
    let (lo, hi) = (TOLERANCE.0 * f64::from(limit), TOLERANCE.1 * f64::from(limit));
    assert!(
        (lo..=hi).contains(&measured),
        "{what}: {measured:.2} Mbit/s is outside {lo:.2}..={hi:.2} of its {limit} Mbit/s limit"
    );
}

#[ignore = "needs root: boots a guest in a namespace with tc limits and nftables"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_is_held_to_its_bandwidth_limits_and_its_traffic_is_counted() {
    guest_env();
    let _serial = serial().await;
    let sink = Sink::create();
    let (uploads, downloads) = (sink.listen(UPLOAD_PORT), sink.listen(DOWNLOAD_PORT));

    let state = TestState::at(SITE);
    let mut config = state.config();
    config.limits = BandwidthLimits { egress_mbit: Some(EGRESS_MBIT), ingress_mbit: Some(INGRESS_MBIT) };
    let hv = QemuHypervisor::new(config).unwrap();
    let (spec, key) = spec(1, 1, 192, EgressPolicy::PublicOnly);
    let lease = spec.lease_id;
    let vm = hv.start(spec.clone()).await.expect("guest");
    let ssh = login(vm.ssh_addr, &spec.host_key.public_key(), &spec.ssh_user, &key).await;

    // the cost of accounting: one usage read (cgroup, link counters, nft, tc per limit)
    // against the cgroup's counters alone (what a read cost before); printed, not judged
    const READS: u32 = 20;
    let cgroup = hv.cgroup(lease).unwrap();
    let t = Instant::now();
    for _ in 0..READS {
        cgroup.usage().unwrap();
    }
    eprintln!("cgroup counters alone: {:.2} ms each", t.elapsed().as_secs_f64() * 1e3 / f64::from(READS));
    let t = Instant::now();
    for _ in 0..READS {
        hv.usage(lease).await.unwrap();
    }
    eprintln!(
        "usage read with traffic accounting: {:.1} ms each ({READS} reads)",
        t.elapsed().as_secs_f64() * 1e3 / f64::from(READS)
    );

    let before = net_usage(&hv, lease).await;
    let up = upload(&ssh, &uploads).await;
    let after_up = net_usage(&hv, lease).await;
    let down = download(&ssh, &downloads).await;
    let after_down = net_usage(&hv, lease).await;
    eprintln!("with limits {EGRESS_MBIT}/{INGRESS_MBIT} Mbit/s: upload {up:.2} Mbit/s, download {down:.2} Mbit/s");
    eprintln!("counters before {before:?}\nafter the upload {after_up:?}\nafter the download {after_down:?}");
    assert_near_limit("upload", up, EGRESS_MBIT);
    assert_near_limit("download", down, INGRESS_MBIT);

    // the counters saw every byte (and more: headers, SSH, ACKs)
    assert!(after_up.bytes_out - before.bytes_out >= TRANSFER, "{before:?} -> {after_up:?}");
    assert!(after_down.bytes_in - after_up.bytes_in >= TRANSFER, "{after_up:?} -> {after_down:?}");
    assert!(after_up.packets_out - before.packets_out >= TRANSFER / 65536, "{before:?} -> {after_up:?}");
    assert!(after_up.new_connections > before.new_connections, "the upload's connection is a new flow");
    assert!(after_down.new_connections > after_up.new_connections, "the download's connection is a new flow");
    for rule in ["spoofed source", "IPv6", "private, local and special ranges", "no guest to guest"] {
        assert!(after_down.dropped.contains_key(rule), "no counter for {rule:?}: {:?}", after_down.dropped);
    }

    // control: the same guest without its limits' qdiscs runs well past them
    let host_if = hv.config().names.host_if(&lease);
    let netns = hv.config().names.lease_name(&lease);
    sh(&format!("tc -n {netns} qdisc del dev uplink root"));
    sh(&format!("tc qdisc del dev {host_if} root"));
    let (free_up, free_down) = (upload(&ssh, &uploads).await, download(&ssh, &downloads).await);
    eprintln!("without limits: upload {free_up:.2} Mbit/s, download {free_down:.2} Mbit/s");
    assert!(free_up > CONTROL_FACTOR * f64::from(EGRESS_MBIT), "control upload only {free_up:.2} Mbit/s");
    assert!(free_down > CONTROL_FACTOR * f64::from(INGRESS_MBIT), "control download only {free_down:.2} Mbit/s");

    drop(ssh);
    hv.stop(lease).await.unwrap();
    let left = leftovers_at(SITE, Some(&lease), state.path(), Some(vm.ssh_addr.port()));
    assert!(left.is_empty(), "left behind: {left:#?}");
    drop(sink);
}
