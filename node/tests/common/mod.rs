//! Process-level harness shared by the CLI tests: peervm processes over loopback, a
//! provider config that runs real guests, and the "nothing left behind" inspection.
//!
//! Tests that run a provider need root, QEMU, iproute2, nftables and the minimal guest
//! image (scripts/install-deps, scripts/build-guest-image): they are `#[ignore]`d in a
//! plain `cargo test` and start with `Needs::guests().require()`, which fails them when
//! the machine lacks any of it (docs/testing.md).
//! Each test gives its provider its own name prefix, address pool and SSH ports, so
//! tests never touch each other's guests, nor a developer's `peervm` ones.
#![allow(dead_code)]

pub use peervm_testenv::Needs;

pub mod provider_toml;
pub use provider_toml::ProviderToml;

/// How long a test waits for an event before it gives up and reports a hang. Only a
/// guard: the verdict is the event itself (docs/testing.md, "Verdicts from counts and
/// events"), so a slow or loaded machine only takes longer, and a correct run never
/// comes near it.
pub const HANG_GUARD: Duration = Duration::from_secs(180);

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const PEERVM: &str = env!("CARGO_BIN_EXE_peervm");

/// A child process killed when dropped (also when a test fails).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn terminate(mut self) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

/// The minimal guest image the providers of these tests offer.
pub fn image_dir() -> PathBuf {
    peervm_testenv::image_dir("minimal")
}

/// Guest tests of one binary run one at a time: TCG guests on a 2-core machine are slow
/// enough without competing with another test's guests.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs a one-shot peervm command to completion.
pub fn peervm(data: &Path, args: &[&str]) -> Output {
    Command::new(PEERVM)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .env_remove("PEERVM_BOOTSTRAP")
        .env_remove("PEERVM_PASSPHRASE")
        .output()
        .expect("run peervm")
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Starts a long-lived peervm command with --json and returns it with its first line.
pub fn spawn_json(args: &[&str], data: &Path) -> (Proc, serde_json::Value) {
    let mut child = Command::new(PEERVM)
        .arg("--data-dir")
        .arg(data)
        .args(args)
        .arg("--json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file(data)))
        .spawn()
        .expect("spawn peervm");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line).expect("read startup line");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| {
        panic!("bad startup line {line:?}: {e}; log:\n{}", std::fs::read_to_string(log_path(data)).unwrap_or_default())
    });
    (Proc(child), v)
}

/// A process's log sits next to its data dir (which the process creates 0700 itself).
pub fn log_path(data: &Path) -> PathBuf {
    data.with_extension("log")
}

fn log_file(data: &Path) -> std::fs::File {
    std::fs::OpenOptions::new().create(true).append(true).open(log_path(data)).expect("log file")
}

pub fn start_bootstrap(root: &Path) -> (Proc, String) {
    let (p, line) = spawn_json(&["bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0"], &root.join("bootstrap"));
    let addr = line["listen_addrs"][0].as_str().expect("bootstrap address").to_string();
    (p, addr)
}

/// Where a test's provider puts its guests: its own names, addresses and ports.
#[derive(Clone, Debug)]
pub struct Site {
    /// Long name prefix (namespaces, nft tables, cgroups, QEMU names).
    pub prefix: &'static str,
    /// 2-letter interface prefix.
    pub iface: &'static str,
    /// The /24 of the address pool, e.g. "10.215.1".
    pub net: &'static str,
    pub port_min: u16,
    pub vcpus: u32,
    pub memory: &'static str,
}

impl Site {
    pub fn config(&self, root: &Path, bootstrap: &str) -> PathBuf {
        self.toml(bootstrap).write(&root.join(format!("{}.toml", self.prefix)))
    }

    /// This site's provider config, for a test to change before writing it.
    pub fn toml(&self, bootstrap: &str) -> ProviderToml {
        let mut t =
            ProviderToml::new(self.prefix, self.iface, &format!("{}.0/24", self.net), self.port_min, &image_dir());
        t.bootstrap = vec![bootstrap.into()];
        t.vcpus = self.vcpus;
        t.memory = self.memory.into();
        t.lease_min_secs = Some(1);
        t
    }

    /// Starts `peervm provider run` with this site's config and data dir.
    pub fn start(&self, root: &Path, bootstrap: &str) -> (Proc, String) {
        let (p, line) = self.start_json(root, bootstrap);
        (p, line["peer_id"].as_str().expect("peer id").to_string())
    }

    /// As `start`, returning the whole startup line (peer id and listen addresses).
    pub fn start_json(&self, root: &Path, bootstrap: &str) -> (Proc, serde_json::Value) {
        let config = self.config(root, bootstrap);
        spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &self.data(root))
    }

    pub fn data(&self, root: &Path) -> PathBuf {
        root.join(format!("data-{}", self.prefix))
    }

    /// Everything of this site's guests still on the host: namespaces, nft tables, host
    /// interfaces, QEMU processes, cgroups and lease directories.
    pub fn leftovers(&self, root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let run = |cmd: &str| Command::new("sh").args(["-c", cmd]).output().map(|o| stdout(&o)).unwrap_or_default();
        let lease = format!("{}-", self.prefix);
        for line in run("ip netns list").lines() {
            if line.starts_with(&lease) {
                out.push(format!("netns {line}"));
            }
        }
        for line in run("nft list tables").lines() {
            if line.contains(&lease) {
                out.push(format!("nft {line}"));
            }
        }
        for line in run("ip -o link show").lines() {
            if let Some(name) = line.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("")) {
                let rest = name.strip_prefix(self.iface).unwrap_or("");
                // a veth's host end, or a libvirt-backend tap still in the host namespace
                let rest = rest.strip_suffix('t').filter(|r| r.len() == 12).unwrap_or(rest);
                if rest.len() == 12 && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
                    out.push(format!("link {name}"));
                }
            }
        }
        // pgrep itself, not through a shell whose command line would match
        let procs = Command::new("pgrep").args(["-af", &format!("qemu-system.*{lease}")]).output();
        for line in procs.map(|o| stdout(&o)).unwrap_or_default().lines() {
            out.push(format!("process {line}"));
        }
        for base in ["/sys/fs/cgroup/cpu", "/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"] {
            let dir = Path::new(base).join(self.prefix);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for e in entries.flatten() {
                    if e.file_name().to_string_lossy().starts_with(&lease) {
                        out.push(format!("cgroup {}", e.path().display()));
                    }
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.data(root).join("vmm/leases")) {
            for e in entries.flatten() {
                out.push(format!("lease dir {}", e.path().display()));
            }
        }
        out
    }

    /// Waits (bounded) until nothing of this site's guests is left; returns what is.
    pub fn wait_clean(&self, root: &Path, within: Duration) -> Vec<String> {
        let start = Instant::now();
        loop {
            let left = self.leftovers(root);
            if left.is_empty() || start.elapsed() > within {
                return left;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn log(&self, root: &Path) -> String {
        std::fs::read_to_string(log_path(&self.data(root))).unwrap_or_default()
    }
}

/// Polls `f` every 250 ms until it returns Some, for at most `within`.
pub fn wait_for<T>(within: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `peervm offers --json` through `bootstrap`.
pub fn offers(bootstrap: &str) -> Vec<serde_json::Value> {
    offers_with(bootstrap, &[])
}

/// `peervm offers --json` with `extra` filter arguments.
pub fn offers_with(bootstrap: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(PEERVM)
        .args(["offers", "--bootstrap", bootstrap, "--json", "--timeout", "5"])
        .args(extra)
        .env_remove("PEERVM_BOOTSTRAP")
        .output()
        .expect("run offers");
    stdout(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// The free vCPUs `provider` advertises, as seen through `bootstrap`.
pub fn free_vcpus(bootstrap: &str, provider: &str) -> Option<u64> {
    offers(bootstrap).iter().find(|o| o["provider"] == provider).and_then(|o| o["vcpus_free"].as_u64())
}

/// A small lease: 1 vCPU (the default), 256 MiB, 1 GiB of disk, 10 minutes.
pub const SMALL_LEASE: [&str; 6] = ["--memory", "256MiB", "--disk", "1GiB", "--duration", "10m"];

/// Waits (bounded by `within`) until `provider` advertises a free vCPU through `bootstrap`,
/// e.g. after a lease ended: until then a requestor's own offer check refuses before
/// asking the provider.
pub fn wait_for_free_vcpus(bootstrap: &str, provider: &str, within: Duration) -> Option<u64> {
    wait_for(within, || free_vcpus(bootstrap, provider).filter(|v| *v > 0))
}

/// `peervm lease create` of a [`SMALL_LEASE`] from `provider`: the raw output, for
/// requests expected to be refused.
pub fn lease_create_from(data: &Path, bootstrap: &str, provider: &str) -> Output {
    let mut args = vec!["lease", "create", "--bootstrap", bootstrap, "--provider", provider];
    args.extend_from_slice(&SMALL_LEASE);
    peervm(data, &args)
}

/// `peervm lease create` with JSON output; returns the lease JSON or panics with stderr.
pub fn lease_create(data: &Path, bootstrap: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["lease", "create", "--bootstrap", bootstrap, "--json"];
    args.extend_from_slice(extra);
    let out = peervm(data, &args);
    assert!(out.status.success(), "lease create failed: {}", stderr(&out));
    serde_json::from_str(stdout(&out).trim()).unwrap_or_else(|e| panic!("bad lease JSON {:?}: {e}", stdout(&out)))
}
