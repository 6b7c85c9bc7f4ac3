//! `peervm doctor`: the provider checklist of the security guides, each line pass, warn
//! or fail with the fix. Every check looks at the real thing (boots a KVM probe guest,
//! reads the cgroup mounts, asks nftables, hashes the images, stats the files).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::Serialize;

use crate::provider::admin::{AdminReply, AdminRequest, AdminResult};
use crate::provider::config::ProviderConfig;
use crate::provider::kvm_diagnosis::{KvmFacts, diagnose};
use crate::provider::reachability::{PortReport, state_name};
use crate::secure_fs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do about a warn or fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn pass(name: &'static str, detail: impl Into<String>) -> Check {
    Check { name, verdict: Verdict::Pass, detail: detail.into(), fix: None }
}

fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, verdict: Verdict::Warn, detail: detail.into(), fix: Some(fix.into()) }
}

fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name, verdict: Verdict::Fail, detail: detail.into(), fix: Some(fix.into()) }
}

fn command_ok(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs every check for the provider configured by `config` with data in `data_dir`.
pub async fn run(config: &ProviderConfig, data_dir: &Path) -> Vec<Check> {
    let mut checks = vec![check_root(), check_qemu(), check_cgroups(), check_nftables(), check_namespaces()];
    let images = check_images(config, &mut checks);
    checks.push(check_kvm(config, images.first()).await);
    checks.extend(check_files(data_dir));
    checks.push(check_clock());
    checks.push(check_disk(config, data_dir));
    checks.push(check_ssh_ports(config));
    checks.push(check_reachability(config, data_dir).await);
    checks
}

fn check_root() -> Check {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        pass("privileges", "running as root (namespaces, nftables and cgroups need it; QEMU runs unprivileged)")
    } else {
        fail(
            "privileges",
            "not root",
            "run the provider (and doctor) as root; guests run as the unprivileged peervm-qemu user",
        )
    }
}

fn check_qemu() -> Check {
    match command_ok("qemu-system-x86_64", &["--version"]) {
        Ok(v) => pass("qemu", v.lines().next().unwrap_or("present").to_string()),
        Err(e) => fail("qemu", format!("qemu-system-x86_64 does not run: {e}"), "install it: scripts/install-deps"),
    }
}

fn check_cgroups() -> Check {
    match peervm_vmm::CgroupLayout::detect() {
        Ok(peervm_vmm::CgroupLayout::V2 { root }) => pass("cgroups", format!("v2 at {}", root.display())),
        Ok(peervm_vmm::CgroupLayout::V1 { cpu, memory, pids, .. }) => {
            pass("cgroups", format!("v1: cpu {}, memory {}, pids {}", cpu.display(), memory.display(), pids.display()))
        }
        Err(e) => {
            fail("cgroups", e.to_string(), "mount the cgroup v2 hierarchy (or v1 cpu, memory and pids controllers)")
        }
    }
}

fn check_nftables() -> Check {
    match command_ok("nft", &["list", "tables"]) {
        Ok(_) => pass("nftables", "nft answers"),
        Err(e) => fail(
            "nftables",
            format!("nft does not work: {e}"),
            "install nftables (scripts/install-deps) and run as root",
        ),
    }
}

fn check_namespaces() -> Check {
    match command_ok("ip", &["netns", "list"]) {
        Ok(_) if Path::new("/dev/net/tun").exists() => pass("namespaces", "ip netns works; /dev/net/tun present"),
        Ok(_) => fail("namespaces", "/dev/net/tun is missing", "load the tun module: modprobe tun"),
        Err(e) => fail("namespaces", format!("ip netns does not work: {e}"), "install iproute2 (scripts/install-deps)"),
    }
}

fn check_images(config: &ProviderConfig, checks: &mut Vec<Check>) -> Vec<peervm_vmm::GuestImage> {
    let mut ok = Vec::new();
    for img in &config.images {
        match img.open() {
            Ok(opened) if opened.sha256() == img.sha256 => {
                checks.push(pass(
                    "image",
                    format!("{}: every file matches its sha256 ({})", img.name, img.location().display()),
                ));
                ok.push(opened);
            }
            Ok(_) => checks.push(fail(
                "image",
                format!("{}: the manifest changed while doctor ran", img.name),
                "run doctor again",
            )),
            Err(e) => checks.push(fail(
                "image",
                format!("{}: {e}", img.name),
                "rebuild it with scripts/build-guest-image, or fix [[images]] in the config",
            )),
        }
    }
    ok
}

async fn check_kvm(config: &ProviderConfig, image: Option<&peervm_vmm::GuestImage>) -> Check {
    let Some(image) = image else {
        return warn("kvm", "no verified image to probe with", "fix the image check first");
    };
    let user = match peervm_vmm::QemuUser::lookup(peervm_vmm::DEFAULT_QEMU_USER) {
        Ok(u) => u,
        Err(_) => peervm_vmm::QemuUser::root(),
    };
    let opts =
        peervm_vmm::ProbeOptions { qemu_binary: "qemu-system-x86_64".into(), user, deadline: Duration::from_secs(20) };
    match peervm_vmm::probe_kvm(image, &opts).await {
        peervm_vmm::KvmProbe::Usable { boot_time } => {
            pass("kvm", format!("a probe guest booted under KVM in {} ms", boot_time.as_millis()))
        }
        peervm_vmm::KvmProbe::Unusable { reason } => {
            // the probe says that KVM failed; the host's facts say why (kvm_diagnosis.rs)
            let facts = KvmFacts::gather(&opts.user.name, opts.user.uid, qemu_gids(&opts.user));
            let why = diagnose(&facts, &reason);
            if config.allow_tcg {
                warn(
                    "kvm",
                    format!(
                        "KVM does not work here: {}; guests run on slow software emulation, advertised as tcg",
                        why.detail
                    ),
                    format!("{} (or keep allow_tcg for a test provider)", why.fix),
                )
            } else {
                fail(
                    "kvm",
                    format!(
                        "KVM does not work here: {}; allow_tcg is false, so the provider will not start",
                        why.detail
                    ),
                    format!("{} (or set [hypervisor] allow_tcg = true)", why.fix),
                )
            }
        }
    }
}

/// The QEMU user's primary and supplementary groups.
fn qemu_gids(user: &peervm_vmm::QemuUser) -> Vec<u32> {
    let mut gids = user.groups.clone();
    gids.push(user.gid);
    gids
}

fn check_files(data_dir: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let mut items: Vec<(PathBuf, u32)> = vec![(data_dir.to_path_buf(), 0o700)];
    for file in ["identity.key", "provider.db", "audit.log", "admin.sock"] {
        let p = data_dir.join(file);
        if p.exists() {
            items.push((p, 0o600));
        }
    }
    if !data_dir.exists() {
        out.push(warn(
            "files",
            format!("{} does not exist yet", data_dir.display()),
            "it is created 0700 at the first start",
        ));
        return out;
    }
    for (path, want) in items {
        match secure_fs::check_private(&path, want) {
            Ok(()) => out.push(pass("files", format!("{} is private ({want:o})", path.display()))),
            Err(e) => out.push(fail("files", e.to_string(), format!("chmod {want:o} {}", path.display()))),
        }
    }
    let key = data_dir.join("identity.key");
    match crate::keystore::protection(&key) {
        Ok(crate::keystore::Protection::AgeScrypt) => out.push(pass("key", "identity key encrypted (age, scrypt)")),
        Ok(crate::keystore::Protection::Plaintext) => out.push(warn(
            "key",
            "identity key is stored unencrypted",
            format!("peervm key change-password --key {}", key.display()),
        )),
        Err(_) if !key.exists() => {
            out.push(warn("key", "no identity key yet", "peervm key init (with PEERVM_PASSPHRASE for a service)"))
        }
        // its mode is reported (with the fix) by the files check
        Err(crate::keystore::KeyStoreError::Fs(_)) => {}
        Err(e) => out.push(fail("key", e.to_string(), "restore the key from its backup, or create a new one")),
    }
    out
}

/// The kernel's own view: adjtimex reports whether the clock is synchronised (NTP).
fn check_clock() -> Check {
    // SAFETY: adjtimex with modes = 0 only reads the kernel's clock state into `tx`.
    let mut tx: libc::timex = unsafe { std::mem::zeroed() };
    let state = unsafe { libc::adjtimex(&mut tx) };
    if state == libc::TIME_ERROR || (tx.status & libc::STA_UNSYNC) != 0 {
        warn(
            "clock",
            "the system clock is not synchronised: adverts and lease messages carry times that peers check (30 s skew allowed)",
            "run an NTP client (chrony or systemd-timesyncd)",
        )
    } else {
        pass("clock", format!("synchronised (estimated error {} us)", tx.esterror))
    }
}

fn check_disk(config: &ProviderConfig, data_dir: &Path) -> Check {
    let probe = if data_dir.exists() { data_dir } else { data_dir.parent().unwrap_or(Path::new("/")) };
    let Ok(cpath) = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()) else {
        return warn("disk", "the data dir path cannot be passed to statvfs", "use a plain path");
    };
    // SAFETY: statvfs writes into `st`, which outlives the call; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(cpath.as_ptr(), &mut st) } != 0 {
        return warn("disk", format!("cannot stat {}", probe.display()), "check the data dir");
    }
    let free_gib = (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) >> 30;
    let offered = config.resources.disk_gib;
    if free_gib >= offered {
        pass("disk", format!("{free_gib} GiB free for the {offered} GiB offered"))
    } else {
        warn(
            "disk",
            format!("only {free_gib} GiB free at {} but {offered} GiB offered", probe.display()),
            "offer less disk ([resources] disk) or free space (overlays grow up to the leased size)",
        )
    }
}

/// Where the kernel picks source ports for outgoing connections.
const EPHEMERAL_RANGE: &str = "net/ipv4/ip_local_port_range";

/// The overlap of the SSH port range with the kernel's ephemeral range, if any: a port
/// there can be held by any outgoing connection on the host, and a lease whose port is
/// taken fails to start ("Address already in use").
pub fn ephemeral_overlap(ssh: (u16, u16), ephemeral: (u16, u16)) -> Option<(u16, u16)> {
    let lo = ssh.0.max(ephemeral.0);
    let hi = ssh.1.min(ephemeral.1);
    (lo <= hi).then_some((lo, hi))
}

/// Parses the two numbers of `ip_local_port_range` ("32768\t60999").
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(lo)), Some(Ok(hi)), None) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

fn check_ssh_ports(config: &ProviderConfig) -> Check {
    let ssh = (config.ssh.port_min, config.ssh.port_max);
    let Some(ephemeral) = peervm_vmm::procfs::read_sysctl(EPHEMERAL_RANGE).ok().as_deref().and_then(parse_port_range)
    else {
        return warn(
            "ssh ports",
            format!("cannot read {}", peervm_vmm::procfs::sysctl_path(EPHEMERAL_RANGE)),
            "check that /proc is mounted",
        );
    };
    match ephemeral_overlap(ssh, ephemeral) {
        None => pass(
            "ssh ports",
            format!("{}-{} is outside the ephemeral range {}-{}", ssh.0, ssh.1, ephemeral.0, ephemeral.1),
        ),
        Some((lo, hi)) => warn(
            "ssh ports",
            format!(
                "ports {lo}-{hi} of the SSH range are in the kernel's ephemeral range {}-{}: an outgoing connection can hold one and a lease on it fails to start",
                ephemeral.0, ephemeral.1
            ),
            "move [ssh] port_min/port_max below the ephemeral range (the default is 22000-22999)",
        ),
    }
}

/// Reachability from outside: the running provider's last dial-back verification (other
/// peers dialed its libp2p and SSH ports back), else a static look at the config.
async fn check_reachability(config: &ProviderConfig, data_dir: &Path) -> Check {
    let socket = crate::provider::admin::socket_path(data_dir);
    let status =
        tokio::time::timeout(Duration::from_secs(5), crate::provider::admin::call(&socket, &AdminRequest::Status))
            .await;
    if let Ok(Ok(AdminReply::Ok(AdminResult::Status(status)))) = status
        && let Some(report) = &status.reachability
    {
        return verified_reachability(report);
    }
    let mut check = static_reachability(config);
    check.detail.push_str(" (no dial-back result: the provider is not running, or no peer has checked yet)");
    check
}

/// The verdict on a dial-back report: every port passes
/// [`reachable`](crate::provider::reachability::PortProbe::reachable), or the
/// ones that do not are named with the fix.
fn verified_reachability(report: &PortReport) -> Check {
    let bad: Vec<String> =
        report.unreachable().map(|p| format!("{} port {} {}", p.kind.as_str(), p.port, state_name(p.state))).collect();
    let (by, ip) = (&report.by, &report.observed_ip);
    if bad.is_empty() {
        pass("reachability", format!("{by} dialed {ip} back: libp2p port open, SSH port range not filtered"))
    } else {
        fail(
            "reachability",
            format!("{by} dialed {ip} back: {}", bad.join(", ")),
            "open these TCP ports in the host's and the network's firewall (and forward them through NAT)",
        )
    }
}

fn static_reachability(config: &ProviderConfig) -> Check {
    let loopback_only = config.listen.iter().all(|a| {
        a.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_loopback()))
            || a.iter().any(|p| matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_loopback()))
    });
    let ssh_loopback = config.ssh.host == "127.0.0.1" || config.ssh.host == "localhost" || config.ssh.host == "::1";
    if loopback_only || ssh_loopback {
        warn(
            "reachability",
            format!(
                "the provider listens or advertises SSH on loopback only (listen {:?}, ssh host {}): only this machine can lease",
                config.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                config.ssh.host
            ),
            "listen on a public address and set [ssh] host to the address requestors reach",
        )
    } else {
        pass(
            "reachability",
            format!(
                "listening on {} public address(es); SSH ports {}-{} on {}",
                config.listen.len(),
                config.ssh.port_min,
                config.ssh.port_max,
                config.ssh.host
            ),
        )
    }
}

/// Renders the checks for a terminal.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
        let tag = match c.verdict {
            Verdict::Pass => "pass",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        out.push_str(&format!("{tag:<4}  {:<12}  {}\n", c.name, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("{:<4}  {:<12}  fix: {fix}\n", "", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_range_overlapping_the_ephemeral_range_is_found() {
        assert_eq!(ephemeral_overlap((22000, 22999), (32768, 60999)), None);
        assert_eq!(ephemeral_overlap((47270, 47285), (32768, 60999)), Some((47270, 47285)));
        assert_eq!(ephemeral_overlap((32000, 33000), (32768, 60999)), Some((32768, 33000)));
        assert_eq!(ephemeral_overlap((60999, 61010), (32768, 60999)), Some((60999, 60999)));
        assert_eq!(ephemeral_overlap((61000, 61010), (32768, 60999)), None);
    }

    #[test]
    fn a_dial_back_report_passes_or_names_the_unreachable_ports() {
        use crate::network::dialback::PortState;
        use crate::provider::reachability::{PortKind, PortProbe};
        let mut report = PortReport {
            by: "12D3KooWpeer".into(),
            checked_at_unix_ms: 1,
            observed_ip: "198.51.100.7".into(),
            ports: vec![
                PortProbe { kind: PortKind::Libp2p, port: 4001, state: PortState::Open },
                PortProbe { kind: PortKind::Ssh, port: 22000, state: PortState::Closed },
            ],
        };
        let ok = verified_reachability(&report);
        assert_eq!(ok.verdict, Verdict::Pass);
        assert_eq!(ok.detail, "12D3KooWpeer dialed 198.51.100.7 back: libp2p port open, SSH port range not filtered");
        report.ports[0].state = PortState::Closed;
        report.ports.push(PortProbe { kind: PortKind::Ssh, port: 22099, state: PortState::Filtered });
        let bad = verified_reachability(&report);
        assert_eq!(bad.verdict, Verdict::Fail);
        assert_eq!(
            bad.detail,
            "12D3KooWpeer dialed 198.51.100.7 back: libp2p port 4001 closed, ssh port 22099 filtered"
        );
    }

    #[test]
    fn ephemeral_range_file_is_parsed_strictly() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("a b"), None);
        assert_eq!(parse_port_range("1 2 3"), None);
    }
}
