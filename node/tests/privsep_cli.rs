//! Privilege separation (docs/architecture.md "Privilege separation"; SECURITY.md
//! "Privilege separation"): the provider daemon runs as an unprivileged user with no
//! capabilities and its guests run in the root VMM helper; a lease works through the
//! helper; killing the daemon leaves the guest running and the restarted daemon takes it
//! back; killing the helper leaves the guest running and the restarted helper re-adopts
//! it, port and all; the real helper lets no other uid in.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// The test's daemon user (not `peervm`: a real install on this host keeps its own).
const DAEMON_USER: &str = "peervm-test";

fn account(name: &str) -> (u32, u32) {
    if peervm_vmm::account::Account::lookup(name).expect("lookup").is_none() {
        let out = Command::new("useradd")
            .args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name])
            .output()
            .expect("run useradd");
        assert!(out.status.success() || peervm_vmm::account::Account::lookup(name).ok().flatten().is_some());
    }
    let a = peervm_vmm::account::Account::lookup(name).expect("lookup").expect("the test user exists");
    (a.uid, a.gid)
}

/// A line of /proc/PID/status, e.g. `Uid` or `CapEff`, without its label.
fn proc_status(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Starts a peervm command, as `uid`/`gid` when given, and returns it with its JSON
/// startup line; its stderr goes to `log`.
fn spawn_as(ids: Option<(u32, u32)>, args: &[&str], log: &Path) -> (Proc, serde_json::Value) {
    let mut cmd = Command::new(PEERVM);
    cmd.args(args)
        .arg("--json")
        .env("RUST_LOG", "info")
        .env_remove("PEERVM_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::OpenOptions::new().create(true).append(true).open(log).expect("log file")));
    if let Some((uid, gid)) = ids {
        // as root, std drops the supplementary groups when it sets the uid
        cmd.uid(uid).gid(gid);
    }
    let mut child = cmd.spawn().expect("spawn peervm");
    let mut line = String::new();
    use std::io::BufRead;
    std::io::BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("startup line");
    let v = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!("bad startup line {line:?}: {e}; log:\n{}", std::fs::read_to_string(log).unwrap_or_default())
    });
    (Proc(child), v)
}

struct Halves {
    config: PathBuf,
    state: PathBuf,
    socket: PathBuf,
    data: PathBuf,
    ids: (u32, u32),
    root: PathBuf,
}

impl Halves {
    fn helper(&self) -> (Proc, serde_json::Value) {
        spawn_as(
            None,
            &[
                "vmm-helper",
                "--config",
                self.config.to_str().expect("utf8"),
                "--state-dir",
                self.state.to_str().expect("utf8"),
                "--socket",
                self.socket.to_str().expect("utf8"),
                "--daemon-user",
                DAEMON_USER,
            ],
            &self.root.join("helper.log"),
        )
    }

    fn daemon(&self) -> (Proc, serde_json::Value) {
        spawn_as(
            Some(self.ids),
            &[
                "--data-dir",
                self.data.to_str().expect("utf8"),
                "provider",
                "run",
                "--config",
                self.config.to_str().expect("utf8"),
                "--vmm-socket",
                self.socket.to_str().expect("utf8"),
            ],
            &self.root.join("daemon.log"),
        )
    }

    fn lease_dirs(&self) -> usize {
        std::fs::read_dir(self.state.join("leases")).map(|d| d.count()).unwrap_or(0)
    }
}

fn kill9(p: Proc) {
    // SAFETY: kill(2) on our own child's pid
    unsafe { libc::kill(p.pid(), libc::SIGKILL) };
    drop(p);
}

fn guest_runs(site: &Site, root: &Path) -> bool {
    site.leftovers(root).iter().any(|l| l.starts_with("process "))
}

#[ignore = "needs root: runs the VMM helper as root and the daemon as another user, boots a guest"]
#[test]
fn the_daemon_runs_unprivileged_and_a_guest_survives_a_restart_of_either_half() {
    Needs::guests().tools(&["useradd"]).require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // the daemon's user must reach its data dir, the config and the helper's socket
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let site = Site { prefix: "pvps", iface: "ps", net: "10.215.28", port_min: 27600, vcpus: 2, memory: "1GiB" };
    let ids = account(DAEMON_USER);
    let (_boot, boot) = start_bootstrap(root);
    let halves = Halves {
        config: site.config(root, &boot),
        state: root.join("vmm-state"),
        socket: root.join("run/vmm.sock"),
        data: site.data(root),
        ids,
        root: root.to_path_buf(),
    };
    std::fs::create_dir(&halves.data).unwrap();
    std::os::unix::fs::chown(&halves.data, Some(ids.0), Some(ids.1)).unwrap();
    std::fs::set_permissions(&halves.data, std::fs::Permissions::from_mode(0o700)).unwrap();

    let (helper, line) = halves.helper();
    assert_eq!(line["adopted"], 0, "{line}");
    let socket_mode = std::fs::metadata(&halves.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(socket_mode, 0o660, "the socket is for root and the daemon's group only");
    let (daemon, line) = halves.daemon();
    let provider = line["peer_id"].as_str().expect("peer id").to_string();

    // The daemon holds no privilege: its uids are the test user's, its capabilities none.
    let uid = ids.0.to_string();
    assert_eq!(proc_status(daemon.pid(), "Uid"), [uid.as_str(); 4].join(" "));
    assert_eq!(proc_status(daemon.pid(), "CapEff"), "0000000000000000");
    assert_eq!(proc_status(daemon.pid(), "CapPrm"), "0000000000000000");
    assert_eq!(proc_status(helper.pid(), "Uid").split(' ').next(), Some("0"), "the helper is the root half");

    // A whole lease through the helper.
    let req = root.join("requestor");
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider)).expect("the provider's offer is visible");
    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease["lease"].as_str().expect("lease id").to_string();
    let exec = |what: &str| {
        let out = peervm(&req, &["exec", &id, "--", "cat", "/proc/sys/kernel/hostname"]);
        assert!(out.status.success(), "{what}: exec failed: {}", stderr(&out));
    };
    exec("a new lease");
    assert_eq!(halves.lease_dirs(), 1, "the guest's files are in the helper's state dir");
    assert!(!halves.data.join("vmm").exists(), "the daemon keeps no guest state of its own");

    // The daemon dies: the guest runs on; the restarted daemon takes its lease back.
    kill9(daemon);
    assert!(guest_runs(&site, root), "the guest outlives its daemon");
    let (daemon, _) = halves.daemon();
    // the restarted daemon listens on a new port: the bootstrap tells where
    let st = peervm(&req, &["lease", "status", &id, "--json", "--bootstrap", &boot]);
    assert!(st.status.success(), "status after the daemon's restart: {}", stderr(&st));
    let st: serde_json::Value = serde_json::from_str(stdout(&st).trim()).expect("status JSON");
    assert_eq!(st["state"], "running", "{st}");
    exec("after the daemon's restart");

    // The helper dies: the guest runs on; the restarted helper re-adopts it and its port.
    kill9(helper);
    assert!(guest_runs(&site, root), "the guest outlives the helper");
    let (helper, line) = halves.helper();
    assert_eq!(line["adopted"], 1, "{line}");
    exec("after the helper's restart");

    // The real helper lets no other uid in, root included.
    let refused = std::os::unix::net::UnixStream::connect(&halves.socket).and_then(|mut s| {
        use std::io::{Read, Write};
        let body = br#"{"version":1,"op":"hello"}"#;
        // The helper refuses on accept, before it reads anything, and closes: it may be
        // gone before these writes (a broken pipe), and its refusal is still ours to read.
        let sent = s.write_all(&(body.len() as u32).to_be_bytes()).and_then(|()| s.write_all(body));
        if let Err(e) = sent
            && !matches!(e.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
        {
            return Err(e);
        }
        // one frame back: its length, then its JSON (the helper closes without reading
        // the refused request, so reading on to EOF would meet a reset)
        let mut len = [0u8; 4];
        s.read_exact(&mut len)?;
        let mut reply = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut reply)?;
        Ok(String::from_utf8_lossy(&reply).into_owned())
    });
    let refused = refused.expect("the helper answers");
    assert!(refused.contains("peer_uid"), "{refused}");

    let out = peervm(&req, &["lease", "terminate", &id, "--bootstrap", &boot]);
    assert!(out.status.success(), "terminate: {}", stderr(&out));
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(halves.lease_dirs(), 0, "the helper removed the lease's directory");
    daemon.terminate().expect("the daemon stops on SIGTERM");
    helper.terminate().expect("the helper stops on SIGTERM");
    assert!(!halves.socket.exists(), "the helper removes its socket when it stops");
}
