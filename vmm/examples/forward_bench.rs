//! Forwarding benchmark (issue 16): what a guest's service gets through an exposed port
//! and through the SSH forwarder, against the direct path over the lease's veth, in one
//! run on one guest; and the host CPU each path costs (docs/vmm.md "Exposed ports").
//!
//! The guest (minimal image, 1 vCPU, TCG) serves a file of `MiB` MiB (random bytes as
//! base64 text, so that neither SSH nor anything else could shrink it) with busybox httpd on
//! port 8080, exposed on a host port. Each round downloads it three ways, in turn:
//!   direct   HTTP GET to the guest's address over the lease's veth (no relay; the
//!            lease's nftables rules and counters are on the path, as on every path)
//!   exposed  HTTP GET to the exposed host port (the in-process relay, forward.rs)
//!   ssh      `cat` of the same file over SSH through the SSH forwarder (the relay, plus
//!            SSH's encryption in the guest's sshd and in this process's client)
//! The client runs in this process for all three, so the relay's own CPU per MiB is this
//! process's CPU on `exposed` minus that on `direct`. Then, once, the direct path with the
//! lease's nftables table removed: what the isolation rules and their counters cost on
//! the path. And the cost of one traffic-accounting read (`usage()`), which is off the
//! path: the lease monitor reads every 10 s.
//!
//! Run as root, after scripts/install-deps and scripts/build-guest-image:
//!     cargo run --release -p peervm-vmm --example forward_bench -- [rounds] [MiB]
//! Progress and a summary go to stderr; stdout gets one JSON object per figure (name,
//! value, unit), which `scripts/bench` collects.

#[path = "../tests/guest_harness/mod.rs"]
mod guest_harness;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use guest_harness::{Site, Ssh, TestState, guest_env, login, spec};
use peervm_vmm::{EgressPolicy, Hypervisor, QemuHypervisor};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Names, pool and ports of the bench's guest, apart from every test's.
const SITE: Site = Site { long: "pvfw", short: "fw", pool: "10.214.16.0/24", port_base: 47340, port_count: 2 };
const EXPOSE_BASE: u16 = 47344;
const HTTP_PORT: u16 = 8080;

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the zeroed struct it is given
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

struct Sample {
    mib_per_s: f64,
    cpu_ms_per_mib: f64,
}

fn sample(bytes: u64, elapsed: Duration, cpu: Duration) -> Sample {
    let mib = bytes as f64 / f64::from(1 << 20);
    Sample { mib_per_s: mib / elapsed.as_secs_f64(), cpu_ms_per_mib: cpu.as_secs_f64() * 1e3 / mib }
}

/// One HTTP/1.0 GET of the file; the body must be `size` bytes.
async fn http_get(addr: SocketAddr, size: u64) -> Sample {
    let (t, c) = (Instant::now(), cpu_time());
    let mut s = TcpStream::connect(addr).await.unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.write_all(b"GET /blob HTTP/1.0\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let (elapsed, cpu) = (t.elapsed(), cpu_time() - c);
    // the body, plus a header of a few hundred bytes
    assert!(got >= size && got < size + 1024, "GET {addr}: {got} bytes for a {size}-byte file");
    sample(got, elapsed, cpu)
}

/// The same file over SSH (`cat`), through the SSH forwarder. The file is base64 text,
/// so the session's output (a `String`) has exactly its bytes.
async fn ssh_cat(ssh: &Ssh, size: u64) -> Sample {
    let (t, c) = (Instant::now(), cpu_time());
    let (status, out) = ssh.exec("cat /tmp/www/blob", Duration::from_secs(600)).await.unwrap();
    let (elapsed, cpu) = (t.elapsed(), cpu_time() - c);
    assert_eq!(status, 0);
    assert_eq!(out.len() as u64, size, "ssh cat returned {} bytes", out.len());
    sample(size, elapsed, cpu)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{}", serde_json::json!({ "name": name, "value": (value * 1000.0).round() / 1000.0, "unit": unit }));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let mib: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let size = mib << 20;
    guest_env();

    let state = TestState::at(SITE);
    let mut config = state.config();
    (config.expose_port_base, config.expose_port_count, config.expose_ports_per_slot) = (EXPOSE_BASE, 2, 1);
    let hv = QemuHypervisor::new(config).expect("backend");
    let (mut spec, key) = spec(0, 1, 256, EgressPolicy::Deny);
    spec.expose = vec![HTTP_PORT];
    let lease = spec.lease_id;
    let vm = hv.start(spec.clone()).await.expect("guest");
    let ssh = login(vm.ssh_addr, &spec.host_key.public_key(), &spec.ssh_user, &key).await;
    let (status, out) = ssh
        .exec(
            &format!(
                "mkdir -p /tmp/www && head -c {raw} /dev/urandom | base64 -w 0 | head -c {size} >/tmp/www/blob \
                 && busybox httpd -p {HTTP_PORT} -h /tmp/www && echo served",
                raw = size / 4 * 3 + 3
            ),
            Duration::from_secs(300),
        )
        .await
        .unwrap();
    assert!(status == 0 && out.contains("served"), "guest httpd: {out}");
    let exposed = SocketAddr::new(vm.ssh_addr.ip(), vm.exposed[0].1);
    let direct = SocketAddr::new(vm.guest_ip.into(), HTTP_PORT);
    eprintln!("forward_bench: {rounds} rounds of {mib} MiB, 1 vCPU, TCG; direct {direct}, exposed {exposed}");

    let (mut d, mut e, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let (a, b, c) = (http_get(direct, size).await, http_get(exposed, size).await, ssh_cat(&ssh, size).await);
        eprintln!(
            "  round {round}: direct {:.1} MiB/s ({:.1} ms CPU/MiB), exposed {:.1} MiB/s ({:.1}), ssh {:.1} MiB/s ({:.1})",
            a.mib_per_s, a.cpu_ms_per_mib, b.mib_per_s, b.cpu_ms_per_mib, c.mib_per_s, c.cpu_ms_per_mib
        );
        d.push(a);
        e.push(b);
        s.push(c);
    }
    let rate = |v: &[Sample]| median(v.iter().map(|x| x.mib_per_s).collect());
    let cpu = |v: &[Sample]| median(v.iter().map(|x| x.cpu_ms_per_mib).collect());
    figure("forward_direct_mib_per_s", rate(&d), "MiB/s");
    figure("forward_exposed_mib_per_s", rate(&e), "MiB/s");
    figure("forward_ssh_mib_per_s", rate(&s), "MiB/s");
    figure("forward_direct_cpu_per_mib", cpu(&d), "ms");
    figure("forward_exposed_cpu_per_mib", cpu(&e), "ms");
    figure("forward_ssh_cpu_per_mib", cpu(&s), "ms");
    figure("forward_relay_cpu_per_mib", cpu(&e) - cpu(&d), "ms");

    // accounting, off the path: one usage() read (cgroup, link counters, nft)
    const READS: u32 = 20;
    let t = Instant::now();
    for _ in 0..READS {
        hv.usage(lease).await.expect("usage");
    }
    figure("forward_usage_read_ms", t.elapsed().as_secs_f64() * 1e3 / f64::from(READS), "ms");

    // the rules and counters on the path: the direct path without the lease's table
    let table = hv.config().names.lease_name(&lease);
    let out = Command::new("nft").args(["delete", "table", "inet", &table]).output().expect("nft");
    assert!(out.status.success(), "nft delete table {table}: {}", String::from_utf8_lossy(&out.stderr));
    let bare: Vec<Sample> = {
        let mut v = Vec::new();
        for _ in 0..rounds {
            v.push(http_get(direct, size).await);
        }
        v
    };
    figure("forward_direct_no_rules_mib_per_s", rate(&bare), "MiB/s");
    figure("forward_direct_no_rules_cpu_per_mib", cpu(&bare), "ms");
    eprintln!(
        "medians: direct {:.1} MiB/s, exposed {:.1}, ssh {:.1}; without the lease's rules {:.1}; relay CPU {:.2} ms/MiB",
        rate(&d),
        rate(&e),
        rate(&s),
        rate(&bare),
        cpu(&e) - cpu(&d)
    );

    drop(ssh);
    hv.stop(lease).await.expect("stop");
    drop(hv);
    drop(state);
}
