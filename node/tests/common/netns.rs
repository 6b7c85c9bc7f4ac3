//! A multi-host test bed on one machine: N hosts, each a network namespace with one
//! address on a veth to a test bridge, running `peervm` processes; and the faults to
//! inject: cut a host off (its link down) and heal it, loss and delay on its link,
//! kill -9 and restart a node.
//!
//! Names carry the test's number T, so tests run side by side: namespaces `pvmh<T>-h<N>`,
//! host-side veths `pvmh<T>v<N>`, relay taps `pvmh<T>t<N>`, the bridge `pvmhbr<T>`,
//! addresses 10.250.T.(10+N)/24. Namespaces get no default route: nothing leaves the
//! bridge, and the bridge has no address, so the machine itself is not on the test
//! network. Everything is removed when the [`TestNet`] is dropped, also when the test
//! fails (the node logs' tails are printed then); what a killed earlier run with the same
//! number left behind is removed when it is created.
//!
//! Processes enter a host's namespace with setns(2) between fork and exec, so the child
//! is the `peervm` process itself (killing it kills peervm) and keeps the machine's
//! mounts. `ip netns exec` also execs in place, but it remounts /sys, which hides the
//! cgroup hierarchies a provider needs (it exits with "no usable cgroup hierarchy");
//! [`TestNet::netns_exec`] offers it for one-shot commands such as `peervm offers`.
//!
//! Loss and delay use `tc netem` where the kernel has it, on both ends of the host's
//! link. Kernels without sch_netem (the 2-core CI and development VMs have none) get the
//! same from a relay in the test process: the host's veth leaves the bridge, a tap takes
//! its place, and a thread moves frames between the two (AF_PACKET on the veth, the tap's
//! file descriptor), dropping and delaying them in both directions. Either way a frame
//! between two impaired hosts crosses two impaired links.
//!
//! Every wait here is bounded in time; every loop in count or time. Set
//! PEERVM_KEEP_TESTBED=1 to keep the nodes' data dirs and logs after a run, and
//! PEERVM_TESTBED_LOG to give the nodes another RUST_LOG than `info`.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::common::ProviderToml;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PEERVM: &str = env!("CARGO_BIN_EXE_peervm");

/// Where every node of the test bed serves its metrics, inside its own namespace.
pub const METRICS_PORT: u16 = 9464;

/// The libp2p TCP port every node listens on, at its host's address.
pub const P2P_PORT: u16 = 4001;

/// How long a daemon may take to print its startup line.
const STARTUP: Duration = Duration::from_secs(60);

const NETNS_DIR: &str = "/var/run/netns";

/// Runs a setup command to completion; the error carries its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("test bed setup: {e}"))
}

/// Keeps the machine's IPv6 off the test bridge (no link-local chatter from the root
/// namespace's side of the links).
fn disable_ipv6(ifname: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"), "1");
}

fn link_names() -> Vec<String> {
    run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string()))
        .collect()
}

fn netns_names() -> Vec<String> {
    run("ip", &["netns", "list"])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn owned_link(id: u8, name: &str) -> bool {
    name == format!("pvmhbr{id}") || name.starts_with(&format!("pvmh{id}v")) || name.starts_with(&format!("pvmh{id}t"))
}

/// What of test bed `id` exists on the machine: namespaces and links (veths, taps,
/// the bridge). Empty after a [`TestNet`] was dropped.
pub fn leftovers(id: u8) -> Vec<String> {
    let ns = format!("pvmh{id}-");
    let mut out: Vec<String> =
        netns_names().into_iter().filter(|n| n.starts_with(&ns)).map(|n| format!("netns {n}")).collect();
    out.extend(link_names().into_iter().filter(|l| owned_link(id, l)).map(|l| format!("link {l}")));
    out
}

/// SIGKILLs every process in one of test bed `id`'s namespaces (those of a run that was
/// killed before it could clean up; a live test bed's own are reaped before this).
fn kill_processes_in(id: u8) {
    let prefix = format!("pvmh{id}-");
    let ours: Vec<(u64, u64)> = netns_names()
        .iter()
        .filter(|n| n.starts_with(&prefix))
        .filter_map(|n| std::fs::metadata(Path::new(NETNS_DIR).join(n)).ok())
        .map(|m| (m.dev(), m.ino()))
        .collect();
    if ours.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<libc::pid_t>().ok()) else { continue };
        let Ok(m) = std::fs::metadata(e.path().join("ns/net")) else { continue };
        if ours.contains(&(m.dev(), m.ino())) {
            // SAFETY: kill(2); the pid is in a namespace only this test bed uses
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Removes whatever test bed `id` has on the machine: processes left in its namespaces,
/// then links (deleting a veth deletes its namespace end too), then the namespaces.
fn remove_all(id: u8) {
    kill_processes_in(id);
    let bridge = format!("pvmhbr{id}");
    let mut links: Vec<String> = link_names().into_iter().filter(|l| owned_link(id, l)).collect();
    // the bridge last, once its ports are gone
    links.sort_by_key(|l| *l == bridge);
    for l in links {
        let _ = run("ip", &["link", "delete", &l]);
    }
    let ns = format!("pvmh{id}-");
    for n in netns_names().into_iter().filter(|n| n.starts_with(&ns)) {
        let _ = run("ip", &["netns", "delete", &n]);
    }
}

/// A host of the test bed.
#[derive(Clone, Debug)]
pub struct Host {
    /// Its network namespace.
    pub ns: String,
    /// The bridge-side end of its link (in the machine's namespace); its own end is `eth0`.
    pub veth: String,
    pub addr: Ipv4Addr,
}

/// Packet loss and delay on a host's link, each direction.
#[derive(Clone, Copy, Debug)]
pub struct Impairment {
    pub loss_percent: f64,
    pub delay: Duration,
}

/// How an impairment is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImpairBackend {
    /// `tc netem` on both ends of the link.
    Netem,
    /// The userspace relay (the kernel has no sch_netem).
    Relay,
}

/// A long-lived `peervm` process (bootstrap or provider) on a host.
pub struct Node {
    pub host: usize,
    pub name: String,
    /// Its data dir; `<data>.log` holds its stderr (RUST_LOG=info), `<data>.out` its stdout.
    pub data: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    /// The `--json` startup line of its current run.
    pub startup: serde_json::Value,
    pub restarts: u32,
}

impl Node {
    pub fn peer_id(&self) -> &str {
        self.startup["peer_id"].as_str().unwrap_or_else(|| panic!("{} has not started", self.name))
    }

    /// Its first dialable address, ending in /p2p/<peer id>.
    pub fn addr(&self) -> String {
        self.startup["listen_addrs"][0]
            .as_str()
            .unwrap_or_else(|| panic!("{} has no listen address: {}", self.name, self.startup))
            .to_string()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    fn kill(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = child.kill(); // SIGKILL
        child.wait().ok()
    }
}

/// What [`TestNet::udp_echo_probe`] measured.
#[derive(Clone, Copy, Debug)]
pub struct EchoProbe {
    pub sent: usize,
    pub echoed: usize,
    pub min_rtt: Option<Duration>,
}

/// A one-shot command's result.
#[derive(Debug)]
pub struct Outcome {
    /// None: it ran out of time and was killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// A child killed when dropped (a one-shot command of a failing test).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The test bed. Dropping it kills its processes and removes every namespace, link and
/// relay it made.
pub struct TestNet {
    id: u8,
    bridge: String,
    hosts: Vec<Host>,
    nodes: Vec<Node>,
    relays: HashMap<usize, Relay>,
    dir: tempfile::TempDir,
    runs: AtomicU64,
}

impl TestNet {
    /// Builds test bed `id` (1..=250) with `hosts` hosts.
    pub fn new(id: u8, hosts: usize) -> TestNet {
        assert!((1..=250).contains(&id), "test bed number {id} is not 1..=250");
        remove_all(id);
        // the files of a run killed before its clean-up
        let prefix = format!("pvmh{id}-");
        for e in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
        let mut net = TestNet {
            id,
            bridge: format!("pvmhbr{id}"),
            hosts: Vec::new(),
            nodes: Vec::new(),
            relays: HashMap::new(),
            dir: tempfile::Builder::new().prefix(&format!("pvmh{id}-")).tempdir().expect("temp dir"),
            runs: AtomicU64::new(0),
        };
        must("ip", &["link", "add", "name", &net.bridge, "type", "bridge"]);
        disable_ipv6(&net.bridge);
        must("ip", &["link", "set", &net.bridge, "up"]);
        for _ in 0..hosts {
            net.add_host();
        }
        net
    }

    /// Adds a host: a namespace, a veth from its `eth0` to the bridge, the next address.
    pub fn add_host(&mut self) -> usize {
        let n = self.hosts.len();
        assert!(n < 200, "at most 200 hosts");
        let host = Host {
            ns: format!("pvmh{}-h{n}", self.id),
            veth: format!("pvmh{}v{n}", self.id),
            addr: Ipv4Addr::new(10, 250, self.id, 10 + n as u8),
        };
        self.hosts.push(host.clone());
        must("ip", &["netns", "add", &host.ns]);
        must("ip", &["link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", &host.ns]);
        disable_ipv6(&host.veth);
        must("ip", &["link", "set", &host.veth, "master", &self.bridge, "up"]);
        must("ip", &["-n", &host.ns, "addr", "add", &format!("{}/24", host.addr), "dev", "eth0"]);
        must("ip", &["-n", &host.ns, "link", "set", "eth0", "up"]);
        must("ip", &["-n", &host.ns, "link", "set", "lo", "up"]);
        n
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    pub fn host(&self, host: usize) -> &Host {
        &self.hosts[host]
    }

    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// A directory for the test's files (removed with the test bed).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn ns_path(&self, host: usize) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.hosts[host].ns)
    }

    /// `program` to be run inside `host`'s namespace (setns between fork and exec: the
    /// child is `program` itself, with the machine's mounts).
    pub fn command(&self, host: usize, program: impl AsRef<OsStr>) -> Command {
        let path = self.ns_path(host);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and only calls setns(2)
        // and prctl(2), both async-signal-safe, on a descriptor the closure owns (O_CLOEXEC).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                die_with_parent()
            });
        }
        cmd
    }

    /// `ip netns exec <host's namespace> program`: execs in place (the child is
    /// `program`), with /sys remounted for the namespace.
    pub fn netns_exec(&self, host: usize, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.hosts[host].ns]).arg(program);
        // SAFETY: prctl(2) is async-signal-safe
        unsafe { cmd.pre_exec(die_with_parent) };
        cmd
    }

    /// Runs `cmd` to completion, killing it after `within`. Output goes through files,
    /// so a chatty command cannot block on a full pipe.
    pub fn run_bounded(&self, mut cmd: Command, within: Duration) -> Outcome {
        let k = self.runs.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir().join(format!("run-{k}.out"));
        let err_path = self.dir().join(format!("run-{k}.err"));
        let start = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).expect("stdout file"))
            .stderr(File::create(&err_path).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut child = Reaped(child);
        let status = loop {
            if let Ok(Some(s)) = child.0.try_wait() {
                break Some(s);
            }
            if start.elapsed() > within {
                break None; // Reaped kills it
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(child);
        let read = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap_or_default();
            let _ = std::fs::remove_file(p);
            text
        };
        Outcome { status, stdout: read(&out_path), stderr: read(&err_path), elapsed: start.elapsed() }
    }

    /// Starts `peervm --data-dir <dir>/<name> <args> --json` on `host` without waiting for it.
    pub fn launch(&mut self, host: usize, name: &str, args: &[String]) -> usize {
        assert!(self.nodes.iter().all(|n| n.name != name), "two nodes named {name}");
        self.nodes.push(Node {
            host,
            name: name.to_string(),
            data: self.dir().join(name),
            args: args.to_vec(),
            child: None,
            startup: serde_json::Value::Null,
            restarts: 0,
        });
        let i = self.nodes.len() - 1;
        self.start_process(i);
        i
    }

    fn start_process(&mut self, i: usize) {
        let node = &self.nodes[i];
        let out = File::create(node.data.with_extension("out")).expect("stdout file");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.data.with_extension("log"))
            .expect("log file");
        let mut cmd = self.command(node.host, PEERVM);
        cmd.arg("--data-dir")
            .arg(&node.data)
            .args(&node.args)
            .arg("--json")
            .env("RUST_LOG", std::env::var("PEERVM_TESTBED_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("PEERVM_BOOTSTRAP")
            .env_remove("PEERVM_PASSPHRASE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {}: {e}", node.name));
        let node = &mut self.nodes[i];
        node.child = Some(child);
        node.startup = serde_json::Value::Null;
    }

    /// Waits (bounded) for a launched node's startup line.
    pub fn await_startup(&mut self, i: usize) -> &Node {
        let start = Instant::now();
        let out_path = self.nodes[i].data.with_extension("out");
        loop {
            let text = std::fs::read_to_string(&out_path).unwrap_or_default();
            if let Some((line, _)) = text.split_once('\n') {
                let node = &mut self.nodes[i];
                node.startup = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("{}: bad startup line {line:?}: {e}", node.name));
                return node;
            }
            let node = &mut self.nodes[i];
            if let Some(Ok(Some(status))) = node.child.as_mut().map(Child::try_wait) {
                panic!("{} exited at start ({status}):\n{}", node.name, tail(&node.log(), 30));
            }
            if start.elapsed() > STARTUP {
                panic!("{} printed no startup line within {STARTUP:?}:\n{}", node.name, tail(&node.log(), 30));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts a node and waits for its startup line.
    pub fn spawn(&mut self, host: usize, name: &str, args: &[String]) -> usize {
        let i = self.launch(host, name, args);
        self.await_startup(i);
        i
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        self.nodes[i].child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL, as a crash: nothing is flushed or withdrawn. Returns once it is reaped.
    pub fn kill9(&mut self, i: usize) -> Option<ExitStatus> {
        self.nodes[i].kill()
    }

    /// Starts a node again with the same arguments and data dir (so the same identity),
    /// killing it first if it still runs, and waits for its startup line.
    pub fn restart(&mut self, i: usize) -> &Node {
        self.nodes[i].kill();
        self.nodes[i].restarts += 1;
        self.start_process(i);
        self.await_startup(i)
    }

    /// Checks that node `i` is a `peervm` process in its host's namespace.
    pub fn check_in_namespace(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let pid = node.pid().ok_or_else(|| format!("{} is not running", node.name))?;
        self.check_process(pid, node.host).map_err(|e| format!("{}: {e}", node.name))
    }

    /// Checks that process `pid` runs `peervm` in `host`'s namespace.
    pub fn check_process(&self, pid: u32, host: usize) -> Result<(), String> {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).map_err(|e| format!("pid {pid}: {e}"))?;
        if exe != Path::new(PEERVM) {
            return Err(format!("pid {pid} is {}, not peervm", exe.display()));
        }
        // /proc/<pid>/ns/net and the namespace's bind mount: the same device and inode
        let inode = |p: &Path| std::fs::metadata(p).map(|m| (m.dev(), m.ino())).map_err(|e| e.to_string());
        if inode(Path::new(&format!("/proc/{pid}/ns/net")))? != inode(&self.ns_path(host))? {
            return Err(format!("pid {pid} is not in {}", self.hosts[host].ns));
        }
        Ok(())
    }

    /// Runs `f` on a thread of its own inside `host`'s namespace (setns(2) changes only
    /// that thread's namespace; the thread ends with `f`). None if it cannot enter.
    pub fn in_namespace<T: Send + 'static>(&self, host: usize, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let path = self.ns_path(host);
        std::thread::spawn(move || {
            let ns = File::open(path).ok()?;
            // SAFETY: setns(2) on a descriptor we hold; it changes only this thread's namespace.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return None;
            }
            Some(f())
        })
        .join()
        .ok()
        .flatten()
    }

    /// `GET path` from 127.0.0.1:`port` inside `host`'s namespace (bounded: 2 s to
    /// connect, 2 s to answer). None when nothing answers.
    pub fn http_get(&self, host: usize, port: u16, path: &str) -> Option<String> {
        let request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n");
        self.in_namespace(host, move || {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
            conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            conn.write_all(request.as_bytes()).ok()?;
            let mut body = String::new();
            conn.read_to_string(&mut body).ok()?;
            Some(body)
        })
        .flatten()
    }

    /// Measures the path from `from` to `to` and back: `count` UDP datagrams (5 ms apart)
    /// to an echo on `to`, with how many came back and the shortest round trip. Bounded:
    /// the echo stops when the sender is done, the sender 1.5 s after the last reply.
    pub fn udp_echo_probe(&self, from: usize, to: usize, count: usize) -> EchoProbe {
        const PORT: u16 = 9_000;
        let target = SocketAddr::from((self.hosts[to].addr, PORT));
        let done = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let echo_done = done.clone();
        let path = self.ns_path(to);
        let echo = std::thread::spawn(move || {
            let ns = File::open(path).expect("namespace");
            // SAFETY: setns(2) on a descriptor we hold; it changes only this thread's namespace.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let sock = std::net::UdpSocket::bind(target).expect("bind the echo");
            sock.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
            let _ = ready_tx.send(());
            let start = Instant::now();
            let mut buf = [0u8; 64];
            while !echo_done.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(60) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("the echo did not start");
        let probe = self
            .in_namespace(from, move || {
                let sock = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
                sock.set_nonblocking(true).expect("nonblocking");
                let mut sent_at = Vec::with_capacity(count);
                let mut probe = EchoProbe { sent: count, echoed: 0, min_rtt: None };
                let mut buf = [0u8; 64];
                let mut last = Instant::now();
                let mut receive = |sent_at: &[Instant], probe: &mut EchoProbe, last: &mut Instant| {
                    while let Ok((8, _)) = sock.recv_from(&mut buf) {
                        let i = u64::from_be_bytes(buf[..8].try_into().unwrap_or_default()) as usize;
                        if let Some(at) = sent_at.get(i) {
                            let rtt = at.elapsed();
                            probe.echoed += 1;
                            probe.min_rtt = Some(probe.min_rtt.map_or(rtt, |m: Duration| m.min(rtt)));
                            *last = Instant::now();
                        }
                    }
                };
                for i in 0..count {
                    sent_at.push(Instant::now());
                    let _ = sock.send_to(&(i as u64).to_be_bytes(), target);
                    std::thread::sleep(Duration::from_millis(5));
                    receive(&sent_at, &mut probe, &mut last);
                }
                let end = Instant::now();
                while last.max(end).elapsed() < Duration::from_millis(1500) {
                    std::thread::sleep(Duration::from_millis(10));
                    receive(&sent_at, &mut probe, &mut last);
                }
                probe
            })
            .expect("enter the sender's namespace");
        done.store(true, Ordering::Relaxed);
        let _ = echo.join();
        probe
    }

    /// A metric (without labels) of the node on `host`, from its metrics endpoint at
    /// 127.0.0.1:[`METRICS_PORT`] in the host's namespace.
    pub fn metric(&self, host: usize, name: &str) -> Option<f64> {
        let body = self.http_get(host, METRICS_PORT, "/metrics")?;
        body.lines().find_map(|l| {
            let mut parts = l.split_whitespace();
            (parts.next() == Some(name)).then(|| parts.next().and_then(|v| v.parse().ok())).flatten()
        })
    }

    /// Cuts `host` off: its link goes down on the bridge side, as a pulled cable; the
    /// host's own configuration stays as it is.
    pub fn cut(&self, host: usize) {
        must("ip", &["link", "set", &self.hosts[host].veth, "down"]);
    }

    /// Undoes [`cut`](Self::cut).
    pub fn heal(&self, host: usize) {
        must("ip", &["link", "set", &self.hosts[host].veth, "up"]);
    }

    /// Loss and delay on `host`'s link, both directions (replacing an earlier one).
    pub fn impair(&mut self, host: usize, imp: Impairment) -> ImpairBackend {
        self.clear_impairment(host);
        let h = self.hosts[host].clone();
        let netem = [
            "root".to_string(),
            "netem".into(),
            "delay".into(),
            format!("{}us", imp.delay.as_micros()),
            "loss".into(),
            format!("{}%", imp.loss_percent),
        ];
        let netem: Vec<&str> = netem.iter().map(String::as_str).collect();
        let inside = [&["-n", &h.ns, "qdisc", "replace", "dev", "eth0"][..], &netem].concat();
        match run("tc", &inside) {
            Ok(_) => {
                must("tc", &[&["qdisc", "replace", "dev", &h.veth][..], &netem].concat());
                ImpairBackend::Netem
            }
            Err(e) if e.contains("unknown") => {
                let tap = format!("pvmh{}t{host}", self.id);
                let seed = 0x9e37_79b9_7f4a_7c15 ^ (((self.id as u64) << 32) | host as u64);
                let relay = Relay::start(&self.bridge, &h.veth, &tap, imp, seed)
                    .unwrap_or_else(|r| panic!("no netem ({e}) and the relay failed: {r}"));
                self.relays.insert(host, relay);
                ImpairBackend::Relay
            }
            Err(e) => panic!("tc netem: {e}"),
        }
    }

    /// Removes `host`'s loss and delay.
    pub fn clear_impairment(&mut self, host: usize) {
        self.relays.remove(&host); // its drop puts the veth back on the bridge
        let h = &self.hosts[host];
        let _ = run("tc", &["-n", &h.ns, "qdisc", "del", "dev", "eth0", "root"]);
        let _ = run("tc", &["qdisc", "del", "dev", &h.veth, "root"]);
    }

    /// The last `lines` lines of every node's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!("--- {} on {} ---\n{}\n", n.name, self.hosts[n.host].ns, tail(&n.log(), lines)));
        }
        out
    }

    // peervm specifics

    /// `peervm key init --insecure-plaintext` into `<dir>/<name>` (a node's data dir), so
    /// its peer id is known before it starts; returns the peer id.
    pub fn init_key(&self, name: &str) -> String {
        let mut cmd = Command::new(PEERVM);
        cmd.arg("--data-dir").arg(self.dir().join(name)).args(["key", "init", "--insecure-plaintext"]);
        let out = self.run_bounded(cmd, Duration::from_secs(20));
        assert!(out.success(), "key init for {name}: {}", out.stderr);
        out.stdout.trim().to_string()
    }

    /// `/ip4/<host's address>/tcp/4001`.
    pub fn p2p_addr(&self, host: usize) -> String {
        format!("/ip4/{}/tcp/{P2P_PORT}", self.hosts[host].addr)
    }

    /// Starts `peervm bootstrap` on `host` (listening on its address, metrics on
    /// [`METRICS_PORT`]) and waits for its startup line.
    pub fn spawn_bootstrap(&mut self, host: usize, name: &str, others: &[String]) -> usize {
        let i = self.launch_bootstrap(host, name, others);
        self.await_startup(i);
        i
    }

    pub fn launch_bootstrap(&mut self, host: usize, name: &str, others: &[String]) -> usize {
        let mut args: Vec<String> = vec![
            "bootstrap".into(),
            "--listen".into(),
            self.p2p_addr(host),
            "--metrics".into(),
            format!("127.0.0.1:{METRICS_PORT}"),
        ];
        for o in others {
            args.extend(["--bootstrap".into(), o.clone()]);
        }
        self.launch(host, name, &args)
    }

    /// Starts `peervm provider run` on `host` with `config` without waiting for it.
    pub fn launch_provider(&mut self, host: usize, name: &str, config: &ProviderConfig) -> usize {
        let path = self.dir().join(format!("{name}.toml"));
        std::fs::write(&path, config.render(self, host)).expect("write provider config");
        let args = ["provider".to_string(), "run".into(), "--config".into(), path.display().to_string()];
        self.launch(host, name, &args)
    }

    /// `peervm <args>` as a requestor on `host` (data dir `<dir>/requestor-h<host>`), run
    /// with `ip netns exec` and killed after `within`.
    pub fn requestor(&self, host: usize, args: &[&str], within: Duration) -> Outcome {
        let mut cmd = self.netns_exec(host, PEERVM);
        cmd.arg("--data-dir").arg(self.dir().join(format!("requestor-h{host}"))).args(args);
        cmd.env_remove("PEERVM_BOOTSTRAP");
        self.run_bounded(cmd, within)
    }

    /// `peervm offers --json` through `bootstraps`, run on `host` with `ip netns exec`
    /// (bounded: `--timeout 5`, killed after 30 s). The offers, or why there are none.
    pub fn offers(&self, host: usize, bootstraps: &[String]) -> Result<Vec<serde_json::Value>, String> {
        let mut args = vec!["offers", "--json", "--timeout", "5"];
        for b in bootstraps {
            args.extend(["--bootstrap", b.as_str()]);
        }
        let out = self.requestor(host, &args, Duration::from_secs(30));
        if !out.success() {
            return Err(format!("offers on host {host} failed ({:?}): {}", out.status, out.stderr.trim()));
        }
        out.stdout.lines().map(|l| serde_json::from_str(l).map_err(|e| format!("bad offers line {l:?}: {e}"))).collect()
    }

    /// Live adverts node `i` holds (its `peervm_advert_store_size` gauge).
    pub fn store_size(&self, i: usize) -> Option<u64> {
        self.metric(self.nodes[i].host, "peervm_advert_store_size").map(|v| v as u64)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if std::thread::panicking() {
            eprintln!("test bed {} failed; node logs:\n{}", self.id, self.log_tails(40));
        }
        if std::env::var_os("PEERVM_KEEP_TESTBED").is_some() {
            self.dir.disable_cleanup(true);
            eprintln!("test bed {}: logs and data kept in {}", self.id, self.dir().display());
        }
        self.relays.clear();
        remove_all(self.id);
    }
}

/// A provider's config on the test bed: listens on its host's address (metrics on
/// 127.0.0.1:[`METRICS_PORT`] in its namespace), advertises SSH there, and has names and
/// a guest address pool of its own. No lease is made, so no guest ever starts.
#[derive(Clone, Debug)]
pub struct ProviderConfig {
    pub bootstrap: Vec<String>,
    /// `[hypervisor] name_prefix` (2-16 of a-z0-9) and `iface_prefix` (2 letters).
    pub name_prefix: String,
    pub iface_prefix: String,
    /// `[network] pool`, e.g. 10.219.3.0/24.
    pub pool: String,
    pub ttl_secs: u64,
    pub republish_secs: u64,
    pub vcpus: u32,
    pub image_dir: PathBuf,
}

impl ProviderConfig {
    fn render(&self, net: &TestNet, host: usize) -> String {
        let mut t = ProviderToml::new(&self.name_prefix, &self.iface_prefix, &self.pool, 22000, &self.image_dir);
        t.listen = net.p2p_addr(host);
        t.bootstrap = self.bootstrap.clone();
        t.metrics = Some(format!("127.0.0.1:{METRICS_PORT}"));
        t.region = "testbed".into();
        t.ttl_secs = Some(self.ttl_secs);
        t.republish_secs = Some(self.republish_secs);
        t.ssh_host = net.hosts[host].addr.to_string();
        t.port_max = 22003;
        t.vcpus = self.vcpus;
        t.disk = "10GiB".into();
        t.render()
    }
}

/// In a forked child before exec: SIGKILL when the thread that spawned it ends, so a test
/// process killed before its clean-up leaves no node running (every child is reaped
/// before the thread that started it ends). Survives exec, `ip netns exec`'s too.
fn die_with_parent() -> std::io::Result<()> {
    // SAFETY: prctl(2) with PR_SET_PDEATHSIG and a signal number
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// The userspace relay: loss and delay without sch_netem.

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Frames carry a virtio_net_hdr (10 bytes) on both the tap and the packet socket, so
/// offloads (partial checksums, TSO) pass through the relay unchanged.
const IFF_VNET_HDR: libc::c_short = 0x4000;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// Frames held per direction at most (beyond that they are dropped).
const RELAY_QUEUE: usize = 4096;
/// The relay thread looks at its stop flag at least this often.
const RELAY_TICK: Duration = Duration::from_millis(50);

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn os_error(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn open_tap(name: &str) -> Result<OwnedFd, String> {
    if name.len() > 15 {
        return Err(format!("interface name {name} is too long"));
    }
    // SAFETY: open(2) with a NUL-terminated path
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(os_error("open /dev/net/tun"));
    }
    // SAFETY: fd was just opened and is owned by nobody else
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes)
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(os_error(&format!("TUNSETIFF {name}")));
    }
    Ok(fd)
}

/// A raw packet socket on `ifname`: every frame it receives, none it sends.
fn packet_socket(ifname: &str) -> Result<OwnedFd, String> {
    let c_name = CString::new(ifname).map_err(|e| e.to_string())?;
    // SAFETY: if_nametoindex with a NUL-terminated name
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(os_error(&format!("no interface {ifname}")));
    }
    // Protocol 0: nothing arrives before bind names the interface.
    // SAFETY: socket(2) with constant arguments
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) };
    if fd < 0 {
        return Err(os_error("AF_PACKET socket"));
    }
    // SAFETY: fd was just opened and is owned by nobody else
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for opt in [PACKET_VNET_HDR, PACKET_IGNORE_OUTGOING] {
        // SAFETY: an int option, passed with its size
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(os_error(&format!("setsockopt SOL_PACKET {opt}")));
        }
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as libc::c_ushort;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = index as libc::c_int;
    // SAFETY: bind(2) with a sockaddr_ll and its size
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(os_error(&format!("bind to {ifname}")));
    }
    Ok(fd)
}

/// A link with loss and delay in the test process: the host's veth off the bridge, a tap
/// on it, a thread in between. Dropping it stops the thread, removes the tap and puts
/// the veth back on the bridge.
struct Relay {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    veth: String,
    bridge: String,
}

impl Relay {
    fn start(bridge: &str, veth: &str, tap_name: &str, imp: Impairment, seed: u64) -> Result<Relay, String> {
        let tap = open_tap(tap_name)?;
        disable_ipv6(tap_name);
        run("ip", &["link", "set", tap_name, "master", bridge, "up"])?;
        run("ip", &["link", "set", veth, "nomaster"])?;
        let sock = match packet_socket(veth) {
            Ok(s) => s,
            Err(e) => {
                let _ = run("ip", &["link", "set", veth, "master", bridge]);
                return Err(e);
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("relay-{veth}"))
            .spawn(move || relay_loop(tap, sock, imp, seed, &flag))
            .map_err(|e| format!("relay thread: {e}"))?;
        Ok(Relay { stop, thread: Some(thread), veth: veth.to_string(), bridge: bridge.to_string() })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join(); // closes the tap, which removes it
        }
        let _ = run("ip", &["link", "set", &self.veth, "master", &self.bridge]);
    }
}

/// xorshift64: a loss decision per frame, reproducible from the seed.
fn lost(state: &mut u64, percent: f64) -> bool {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    ((x >> 11) as f64 / (1u64 << 53) as f64) * 100.0 < percent
}

/// Reads up to 64 frames from `fd` into `queue` (each due `delay` from now), minus the
/// lost ones. True when something was read.
fn take_frames(
    fd: RawFd,
    buf: &mut [u8],
    queue: &mut VecDeque<(Instant, Vec<u8>)>,
    imp: &Impairment,
    rng: &mut u64,
) -> bool {
    let mut any = false;
    for _ in 0..64 {
        // SAFETY: read(2) into a buffer of buf.len() bytes
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break; // EAGAIN, or an error such as ENETDOWN while the link is cut
        }
        any = true;
        if lost(rng, imp.loss_percent) || queue.len() >= RELAY_QUEUE {
            continue;
        }
        queue.push_back((Instant::now() + imp.delay, buf[..n as usize].to_vec()));
    }
    any
}

/// Writes the frames of `queue` that are due by `now` to `fd` (failures are losses).
fn give_frames(fd: RawFd, queue: &mut VecDeque<(Instant, Vec<u8>)>, now: Instant) {
    while queue.front().is_some_and(|(due, _)| *due <= now) {
        let Some((_, frame)) = queue.pop_front() else { break };
        // SAFETY: write(2) of a buffer of frame.len() bytes
        let _ = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
    }
}

fn relay_loop(tap: OwnedFd, sock: OwnedFd, imp: Impairment, seed: u64, stop: &AtomicBool) {
    let mut rng = seed | 1;
    let mut to_host: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut to_bridge: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut buf = vec![0u8; 70_000];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        give_frames(tap.as_raw_fd(), &mut to_bridge, now);
        give_frames(sock.as_raw_fd(), &mut to_host, now);
        let next = [to_bridge.front(), to_host.front()].into_iter().flatten().map(|(due, _)| *due).min();
        let wait = next.map_or(RELAY_TICK, |due| due.saturating_duration_since(now)).min(RELAY_TICK);
        let mut fds = [
            libc::pollfd { fd: tap.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll(2) on two pollfds we own
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, wait.as_micros().div_ceil(1000) as libc::c_int) };
        if ready <= 0 {
            continue;
        }
        let mut read = false;
        if fds[0].revents != 0 {
            read |= take_frames(tap.as_raw_fd(), &mut buf, &mut to_host, &imp, &mut rng);
        }
        if fds[1].revents != 0 {
            read |= take_frames(sock.as_raw_fd(), &mut buf, &mut to_bridge, &imp, &mut rng);
        }
        if !read {
            // an error condition without data (a link going down): do not spin on it
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
