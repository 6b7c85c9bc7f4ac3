//! SECURITY.md invariant 7 with real guests: a guest cannot reach another guest, the
//! host's own addresses, or private ranges; with egress `deny` it reaches nothing at
//! all, and with `public-only` it does reach a public address (the positive control
//! that shows the drops come from the rules, not from a missing route).
//!
//! "Outside" is a stand-in host in a network namespace of this test (tests never send
//! to a real outside address: docs/vmm.md "The development hosts"): 198.51.100.10
//! (documentation range, treated as public) and
//! 10.254.0.10 (private), routed from the host through a veth of the test's own (named
//! outside the `pt` prefix: lease rules treat `pt*` interfaces as other guests).

mod guest_harness;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use guest_harness::{DEFAULT_SITE, Kind, Ssh, TestState, guest_env, leftovers, login, serial, spec};
use peervm_vmm::{EgressPolicy, Hypervisor, QemuHypervisor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const OUTSIDE_NS: &str = "pvtest-outside";
const OUTSIDE_LINK: &str = "outside0";
const PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PUBLIC_GW: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 10);
const PRIVATE_GW: Ipv4Addr = Ipv4Addr::new(10, 254, 0, 1);
const WEB_PORT: u16 = 8080;
const HOST_PORT: u16 = 47290;

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The stand-in outside host; removed on drop.
struct Outside;

impl Outside {
    fn create() -> Outside {
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", OUTSIDE_LINK]).output();
        let o = Outside;
        sh(&format!("ip netns add {OUTSIDE_NS}"));
        sh(&format!("ip link add {OUTSIDE_LINK} type veth peer name eth0 netns {OUTSIDE_NS}"));
        sh(&format!("ip addr add {PUBLIC_GW}/24 dev {OUTSIDE_LINK}"));
        sh(&format!("ip addr add {PRIVATE_GW}/24 dev {OUTSIDE_LINK}"));
        sh(&format!("ip link set {OUTSIDE_LINK} up"));
        // replies from outside are forwarded back to the guest: forwarding on this link
        // only (the host's global ip_forward is untouched)
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{OUTSIDE_LINK}/forwarding"), "1").unwrap();
        sh(&format!("ip -n {OUTSIDE_NS} addr add {PUBLIC}/24 dev eth0"));
        sh(&format!("ip -n {OUTSIDE_NS} addr add {PRIVATE}/24 dev eth0"));
        sh(&format!("ip -n {OUTSIDE_NS} link set eth0 up"));
        sh(&format!("ip -n {OUTSIDE_NS} link set lo up"));
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "delete", OUTSIDE_NS]).output();
        let _ = Command::new("ip").args(["link", "delete", OUTSIDE_LINK]).output();
    }
}

/// A tiny HTTP server counting connections per local address.
fn serve(listener: std::net::TcpListener, hits: Arc<[AtomicU64; 2]>, addrs: [IpAddr; 2]) {
    listener.set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(listener).unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            if let Ok(local) = s.local_addr()
                && let Some(i) = addrs.iter().position(|a| *a == local.ip())
            {
                hits[i].fetch_add(1, Ordering::SeqCst);
            }
            tokio::spawn(async move {
                let mut buf = [0u8; 512];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nreached\n").await;
            });
        }
    });
}

/// Binds a listener inside `ns` (a thread enters the namespace; the socket stays there).
fn listen_in_netns(ns: &str, port: u16) -> std::net::TcpListener {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on this short-lived thread only
        assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
        std::net::TcpListener::bind(("0.0.0.0", port)).unwrap()
    })
    .join()
    .unwrap()
}

/// Runs an HTTP GET from the guest; true if it got the page. (busybox nc: the image's
/// busybox wget crashes.)
async fn guest_fetch(ssh: &Ssh, addr: IpAddr, port: u16) -> bool {
    let cmd = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} {port} 2>/dev/null");
    let (_, out) = ssh.exec(&cmd, Duration::from_secs(30)).await.unwrap();
    out.contains("reached")
}

/// Fetches from several addresses at once (blocked attempts each wait out nc's
/// timeout, so they run in parallel); returns which ones got the page.
async fn guest_fetch_all(ssh: &Ssh, addrs: &[Ipv4Addr], port: u16) -> Vec<bool> {
    let mut script = String::new();
    for a in addrs {
        script.push_str(&format!(
            "(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {a} {port} 2>/dev/null | grep -q reached && echo '{a} reached' || echo '{a} blocked') &\n"
        ));
    }
    script.push_str("wait\n");
    let (_, out) = ssh.exec(&script, Duration::from_secs(60)).await.unwrap();
    addrs.iter().map(|a| out.lines().any(|l| l == format!("{a} reached"))).collect()
}

/// Opens a TCP connection from the guest and reports whether an SSH banner came back.
async fn guest_sees_ssh(ssh: &Ssh, addr: IpAddr) -> bool {
    let cmd = format!("nc -w 2 {addr} 22 </dev/null 2>/dev/null | head -c 64");
    let (_, out) = ssh.exec(&cmd, Duration::from_secs(30)).await.unwrap();
    out.contains("SSH-")
}

/// The host's own global IPv4 addresses outside the test's links.
fn host_addresses() -> Vec<Ipv4Addr> {
    let out = Command::new("ip").args(["-4", "-o", "addr", "show", "scope", "global"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            let dev = l.split_whitespace().nth(1).unwrap_or("");
            !dev.starts_with("pt") && !dev.starts_with("pv") && dev != OUTSIDE_LINK
        })
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .collect()
}

#[ignore = "needs root: boots guests in namespaces with nftables"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reach_neither_each_other_nor_host_nor_private_ranges() {
    isolation(Kind::Qemu).await;
}

#[ignore = "needs root: boots guests under libvirtd, in namespaces with nftables"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_reach_neither_each_other_nor_host_nor_private_ranges_under_libvirt() {
    isolation(Kind::Libvirt).await;
}

async fn isolation(kind: Kind) {
    guest_env();
    kind.require();
    let _serial = serial().await;
    let _outside = Outside::create();
    let outside_hits = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    serve(listen_in_netns(OUTSIDE_NS, WEB_PORT), outside_hits.clone(), [PUBLIC.into(), PRIVATE.into()]);
    let host_accepts = {
        // a listener on every host address; every accepted connection counts
        let l = std::net::TcpListener::bind(("0.0.0.0", HOST_PORT)).unwrap();
        let n = Arc::new(AtomicU64::new(0));
        let n2 = n.clone();
        l.set_nonblocking(true).unwrap();
        let l = TcpListener::from_std(l).unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                n2.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\nreached\n").await;
            }
        });
        n
    };

    let state = TestState::for_backend(DEFAULT_SITE, kind);
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let (spec_a, key_a) = spec(10, 1, 192, EgressPolicy::PublicOnly);
    let (spec_b, key_b) = spec(11, 1, 192, EgressPolicy::Deny);
    let (a, b) = tokio::join!(hv.start(spec_a.clone()), hv.start(spec_b.clone()));
    let (a, b) = (a.expect("guest A"), b.expect("guest B"));
    let ssh_a = login(a.ssh_addr, &spec_a.host_key.public_key(), &spec_a.ssh_user, &key_a).await;
    let ssh_b = login(b.ssh_addr, &spec_b.host_key.public_key(), &spec_b.ssh_user, &key_b).await;

    // positive control: public-only reaches a public address (routing and NAT work)
    assert!(guest_fetch(&ssh_a, PUBLIC.into(), WEB_PORT).await, "public-only guest cannot reach a public address");
    assert_eq!(outside_hits[0].load(Ordering::SeqCst), 1);

    // public-only still never reaches private ranges; egress deny reaches nothing outside
    let (from_a, from_b) = tokio::join!(
        guest_fetch_all(&ssh_a, &[PRIVATE], WEB_PORT),
        guest_fetch_all(&ssh_b, &[PUBLIC, PRIVATE], WEB_PORT)
    );
    assert!(!from_a[0], "public-only guest reached a private address");
    assert!(!from_b[0], "deny guest reached a public address");
    assert!(!from_b[1], "deny guest reached a private address");
    assert_eq!(outside_hits[1].load(Ordering::SeqCst), 0, "the private stand-in saw a connection");
    assert_eq!(outside_hits[0].load(Ordering::SeqCst), 1, "the deny guest reached the stand-in");

    // no guest to guest, either way (both sshds listen: the host reaches them)
    let (a_to_b, b_to_a) =
        tokio::join!(guest_sees_ssh(&ssh_a, b.guest_ip.into()), guest_sees_ssh(&ssh_b, a.guest_ip.into()));
    assert!(!a_to_b, "guest A reached guest B");
    assert!(!b_to_a, "guest B reached guest A");
    assert!(Ssh::connect(b.ssh_addr, Some(&spec_b.host_key.public_key())).await.is_ok());

    // no guest to the host's own addresses: the gateway of its link, the host's
    // addresses on the test's links and on its real interfaces
    let a_gw = Ipv4Addr::from(u32::from(a.guest_ip) - 1);
    let b_gw = Ipv4Addr::from(u32::from(b.guest_ip) - 1);
    let mut host_addrs = vec![a_gw, b_gw, PUBLIC_GW, PRIVATE_GW];
    host_addrs.extend(host_addresses());
    let (from_a, from_b) =
        tokio::join!(guest_fetch_all(&ssh_a, &host_addrs, HOST_PORT), guest_fetch_all(&ssh_b, &host_addrs, HOST_PORT));
    for (i, addr) in host_addrs.iter().enumerate() {
        assert!(!from_a[i], "guest A reached the host at {addr}");
        assert!(!from_b[i], "guest B reached the host at {addr}");
    }
    assert_eq!(host_accepts.load(Ordering::SeqCst), 0, "the host listener saw a connection from a guest");
    // ...while the host itself reaches that listener on the same addresses
    for addr in &host_addrs {
        let s =
            std::net::TcpStream::connect_timeout(&SocketAddr::new((*addr).into(), HOST_PORT), Duration::from_secs(2));
        assert!(s.is_ok(), "control: host cannot reach its own listener at {addr}");
    }

    drop((ssh_a, ssh_b));
    let (sa, sb) = tokio::join!(hv.stop(spec_a.lease_id), hv.stop(spec_b.lease_id));
    sa.unwrap();
    sb.unwrap();
    let left = leftovers(None, state.path(), None);
    assert!(left.is_empty(), "left behind: {left:#?}");
}
