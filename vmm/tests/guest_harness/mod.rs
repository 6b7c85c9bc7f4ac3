//! Shared harness of the guest tests: environment checks, the test image, the backend
//! configuration, an SSH client and the "nothing left behind" inspection.
//!
//! Guest tests need root, QEMU, iproute2, nftables and the minimal image
//! (scripts/install-deps, scripts/build-guest-image). They are `#[ignore]`d in a plain
//! `cargo test`; asked to run (`--include-ignored`, as scripts/test does as root) they
//! fail, naming what is missing, rather than skip (`guest_env`, docs/testing.md).
//!
//! Everything the tests create is named with the prefixes `pvtest`/`pt`, so a reconcile
//! in a test never touches a developer's `peervm` guests, and uses the address pool
//! 10.214.0.0/24 and SSH ports 47100-47163 (`DEFAULT_SITE`). A test binary that may run
//! beside these (its teardown's reconcile sweeps its whole prefix) takes a `Site` of its
//! own.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub use peervm_testenv::Needs;
use peervm_vmm::{
    Accel, AuthorizedKey, Backend, EgressPolicy, GuestImage, HostKeySeed, Hypervisor, LeaseId, NamePrefix,
    QemuHypervisor, QemuUser, ReconcileReport, VmSpec, VmmConfig,
};
use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

pub const PREFIX_LONG: &str = "pvtest";
pub const PREFIX_SHORT: &str = "pt";
pub const PORT_BASE: u16 = 47100;

/// The names, address pool and SSH ports of a test binary's guests.
#[derive(Clone, Copy, Debug)]
pub struct Site {
    pub long: &'static str,
    pub short: &'static str,
    pub pool: &'static str,
    pub port_base: u16,
    pub port_count: u16,
}

pub const DEFAULT_SITE: Site =
    Site { long: PREFIX_LONG, short: PREFIX_SHORT, pool: "10.214.0.0/24", port_base: PORT_BASE, port_count: 64 };

/// Which backend runs a test's guests: the isolation, limit, teardown and crash tests run
/// against both (docs/testing.md, "Both backends").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Qemu,
    /// libvirtd at qemu:///system (scripts/install-deps --libvirt starts it).
    Libvirt,
}

impl Kind {
    /// The first line of a libvirt test, after `guest_env`: libvirtd must answer.
    pub fn require(self) {
        if self == Kind::Libvirt {
            Needs::default().tools(&["virsh"]).require();
            let ok = Command::new("virsh")
                .args(["-c", Backend::DEFAULT_LIBVIRT_URI, "version"])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                ok,
                "libvirtd does not answer at {}: run scripts/install-deps --libvirt",
                Backend::DEFAULT_LIBVIRT_URI
            );
        }
    }
}

/// Guest tests of one binary run one at a time: a 2-core box runs TCG guests slowly
/// enough without them competing, and the CPU test needs a quiet host.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

pub fn image_dir() -> PathBuf {
    peervm_testenv::image_dir("minimal")
}

/// The minimal image, opened (and so verified) once per test binary.
pub fn image() -> Arc<GuestImage> {
    static IMAGE: OnceLock<Arc<GuestImage>> = OnceLock::new();
    IMAGE.get_or_init(|| Arc::new(GuestImage::open(image_dir()).expect("the guest image does not verify"))).clone()
}

/// The first line of every guest test (they are `#[ignore]`d in a plain `cargo test`):
/// fails the test, naming what is missing, unless guests can run here; then makes sure
/// the unprivileged QEMU user exists.
pub fn guest_env() {
    Needs::guests().require();
    QemuUser::ensure(peervm_vmm::DEFAULT_QEMU_USER).expect("cannot create the QEMU user");
}

/// The backend configuration of the tests.
pub fn config(state_dir: &Path) -> VmmConfig {
    config_at(DEFAULT_SITE, state_dir)
}

/// The backend configuration of the tests of `site`.
pub fn config_at(site: Site, state_dir: &Path) -> VmmConfig {
    let mut c = VmmConfig::new(state_dir, Accel::Tcg);
    c.names = NamePrefix::new(site.long, site.short).unwrap();
    c.address_pool = site.pool.parse().unwrap();
    c.ssh_port_base = site.port_base;
    c.ssh_port_count = site.port_count;
    c.ready_timeout = Duration::from_secs(180);
    c.stop_timeout = Duration::from_secs(15);
    c
}

/// The configuration of backend `kind` for the guests of `site`, on `state_dir`.
pub fn config_for(kind: Kind, site: Site, state_dir: &Path) -> VmmConfig {
    let mut c = config_at(site, state_dir);
    if kind == Kind::Libvirt {
        c.backend = Backend::Libvirt { uri: Backend::DEFAULT_LIBVIRT_URI.into() };
    }
    c
}

/// A spec and the requestor's private key that matches its authorized key.
pub fn spec(slot: u32, vcpus: u32, memory_mib: u32, egress: EgressPolicy) -> (VmSpec, PrivateKey) {
    let client_key = random_key();
    let authorized = AuthorizedKey::parse(&client_key.public_key().to_openssh().unwrap()).unwrap();
    let spec = VmSpec {
        lease_id: LeaseId::random(),
        vcpus,
        memory_mib,
        disk_gib: 1,
        image: image(),
        ssh_user: "lessee".into(),
        expose: Vec::new(),
        authorized_key: authorized,
        host_key: HostKeySeed::random(),
        network_slot: slot,
        egress,
        cpu_quota: None,
        progress: None,
    };
    (spec, client_key)
}

/// A fresh ed25519 key pair.
pub fn random_key() -> PrivateKey {
    PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&rand::random()))
}

struct Recorder {
    expected: Option<PublicKey>,
    seen: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Recorder {
    type Error = russh::Error;
    async fn check_server_key(&mut self, key: &PublicKeyOrCertificate) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else { return Ok(false) };
        *self.seen.lock().unwrap() = Some(key.clone());
        Ok(self.expected.as_ref().is_none_or(|e| e.key_data() == key.key_data()))
    }
}

/// An SSH session to a guest, through its forwarded port.
pub struct Ssh {
    handle: client::Handle<Recorder>,
    pub host_key: PublicKey,
}

impl Ssh {
    /// Connects, pinning `expected` as the host key (`None`: accept any, and record it).
    pub async fn connect(addr: SocketAddr, expected: Option<&PublicKey>) -> Result<Ssh, String> {
        let seen = Arc::new(Mutex::new(None));
        let handler = Recorder { expected: expected.cloned(), seen: seen.clone() };
        let config = Arc::new(client::Config { nodelay: true, ..Default::default() });
        let handle = tokio::time::timeout(Duration::from_secs(30), client::connect(config, addr, handler))
            .await
            .map_err(|_| format!("no SSH handshake with {addr} in 30 s"))?
            .map_err(|e| format!("ssh {addr}: {e}"))?;
        let host_key = seen.lock().unwrap().clone().ok_or("no host key seen")?;
        Ok(Ssh { handle, host_key })
    }

    pub async fn login_key(&mut self, user: &str, key: &PrivateKey) -> Result<bool, String> {
        let k = PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None);
        let r = self.handle.authenticate_publickey(user, k).await.map_err(|e| e.to_string())?;
        Ok(r.success())
    }

    pub async fn login_password(&mut self, user: &str, password: &str) -> Result<bool, String> {
        let r = self.handle.authenticate_password(user, password).await.map_err(|e| e.to_string())?;
        Ok(r.success())
    }

    /// Runs `cmd`, returning exit status and stdout (bounded by `timeout`).
    pub async fn exec(&self, cmd: &str, timeout: Duration) -> Result<(u32, String), String> {
        let run = async {
            let mut ch = self.handle.channel_open_session().await.map_err(|e| e.to_string())?;
            ch.exec(true, cmd).await.map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            let mut status = None;
            let mut seen = Vec::new();
            while let Some(msg) = ch.wait().await {
                match msg {
                    russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
                    russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                    other => seen.push(format!("{other:?}")),
                }
            }
            let out = String::from_utf8_lossy(&out).into_owned();
            let status =
                status.ok_or_else(|| format!("`{cmd}`: no exit status (output {out:?}, messages {seen:?})"))?;
            Ok::<_, String>((status, out))
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| format!("`{cmd}` did not finish in {timeout:?}"))?
    }
}

/// Connects and logs in with the lease's key.
pub async fn login(addr: SocketAddr, host_key: &PublicKey, user: &str, key: &PrivateKey) -> Ssh {
    let mut s = Ssh::connect(addr, Some(host_key)).await.expect("ssh connect");
    assert!(s.login_key(user, key).await.expect("ssh auth"), "the lease's key was refused");
    s
}

fn command_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd).args(args).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

/// Everything of `lease` (or, with `None`, of any lease with the test prefix) that is
/// still on the host: processes, cgroups, namespaces, interfaces, nft tables, libvirt
/// domains, lease files, and a listening SSH port. Inspected with the host's own tools,
/// not vmm's.
pub fn leftovers(lease: Option<&LeaseId>, state_dir: &Path, port: Option<u16>) -> Vec<String> {
    leftovers_at(DEFAULT_SITE, lease, state_dir, port)
}

/// `leftovers` for the guests of `site`.
pub fn leftovers_at(site: Site, lease: Option<&LeaseId>, state_dir: &Path, port: Option<u16>) -> Vec<String> {
    let (prefix_long, prefix_short) = (site.long, site.short);
    let long = match lease {
        Some(l) => format!("{prefix_long}-{}", l.hex()),
        None => format!("{prefix_long}-"),
    };
    let short = match lease {
        Some(l) => format!("{prefix_short}{}", l.short_hex(12)),
        None => prefix_short.to_string(),
    };
    let is_ours_long = |n: &str| n.starts_with(&long) && n.len() == prefix_long.len() + 33;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z'));
        if cmdline.contains(&format!("guest={long}")) && !zombie {
            found.push(format!("process {pid}: {}", cmdline.chars().take(80).collect::<String>()));
        }
    }
    for ns in command_out("ip", &["netns", "list"]).lines().filter_map(|l| l.split_whitespace().next()) {
        if is_ours_long(ns) {
            found.push(format!("netns {ns}"));
        }
    }
    for line in command_out("ip", &["-o", "link", "show"]).lines() {
        let name = line.split(": ").nth(1).unwrap_or("").split('@').next().unwrap_or("");
        let rest = name.strip_prefix(prefix_short).unwrap_or("");
        // a veth's host end, or a libvirt-backend tap still in the host namespace
        let rest = rest.strip_suffix('t').filter(|r| r.len() == 12).unwrap_or(rest);
        if name.starts_with(&short) && rest.len() == 12 && rest.bytes().all(|b| b.is_ascii_hexdigit()) {
            found.push(format!("link {name}"));
        }
    }
    for d in command_out("virsh", &["-c", Backend::DEFAULT_LIBVIRT_URI, "list", "--all", "--name"]).lines() {
        if is_ours_long(d.trim()) {
            found.push(format!("libvirt domain {}", d.trim()));
        }
    }
    for t in command_out("nft", &["list", "tables"]).lines() {
        let name = t.rsplit(' ').next().unwrap_or("");
        if is_ours_long(name) {
            found.push(format!("nft {t}"));
        }
    }
    for hierarchy in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let mut dirs = vec![hierarchy.path().join(prefix_long)];
        if hierarchy.file_name() == prefix_long {
            dirs.push(hierarchy.path());
        }
        for d in dirs {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if is_ours_long(&n) {
                    found.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    let leases = state_dir.join("leases");
    for e in std::fs::read_dir(&leases).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if lease.is_none_or(|l| l.hex() == n) {
            found.push(format!("lease files {}", e.path().display()));
        }
    }
    if let Some(p) = port
        && TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], p)), Duration::from_millis(500)).is_ok()
    {
        found.push(format!("port {p} still listening"));
    }
    found
}

/// A guest test's state directory, and the guard that removes everything the test made
/// with the test prefix when it ends, whether it passed or failed: QEMU processes,
/// namespaces, nftables tables, host links, cgroups and lease files. Guests outlive
/// their manager by design (a provider restart re-adopts them), so without this a
/// failing test would leave its guests running.
///
/// Drop runs a reconcile with no live lease from a fresh backend on this directory
/// (which also sweeps strays with the prefix) before the directory is removed, on a
/// thread of its own with its own runtime: the test's runtime may be unwinding. A test
/// declares it before its backend, so the backend (and its SSH ports) goes first.
pub struct TestState {
    dir: tempfile::TempDir,
    site: Site,
    kind: Kind,
}

impl TestState {
    pub fn new() -> Self {
        Self::at(DEFAULT_SITE)
    }

    /// A state directory for the guests of `site`; its drop sweeps `site`'s prefix only.
    pub fn at(site: Site) -> Self {
        Self::for_backend(site, Kind::Qemu)
    }

    /// The same for guests of backend `kind`. A libvirt test's directory is one the QEMU
    /// user may traverse (0711): its lease directories go in it (docs/vmm.md "The libvirt
    /// backend").
    pub fn for_backend(site: Site, kind: Kind) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("cannot create a state directory");
        if kind == Kind::Libvirt {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        }
        TestState { dir, site, kind }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The backend configuration of the tests, on this directory.
    pub fn config(&self) -> VmmConfig {
        config_for(self.kind, self.site, self.path())
    }
}

impl Drop for TestState {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        let config = self.config();
        let dir = self.path().to_path_buf();
        let site = self.site;
        let outcome = std::thread::spawn(move || -> Result<(ReconcileReport, Vec<String>), String> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("no runtime: {e}"))?;
            let hv = QemuHypervisor::new(config).map_err(|e| format!("no backend: {e}"))?;
            let report = rt.block_on(hv.reconcile(&[])).map_err(|e| format!("reconcile: {e}"))?;
            drop(hv);
            Ok((report, leftovers_at(site, None, &dir, None)))
        })
        .join();
        match outcome {
            Ok(Ok((report, left))) => {
                if failing || report != ReconcileReport::default() {
                    eprintln!("test teardown removed: {report:?}");
                }
                if !left.is_empty() {
                    eprintln!("test teardown could not remove: {left:#?}");
                }
            }
            Ok(Err(e)) => eprintln!("test teardown failed: {e}"),
            Err(_) => eprintln!("test teardown panicked"),
        }
    }
}
