//! The QEMU process of a guest: spawned with the lease's descriptors and isolation,
//! watched (our child, or a process re-adopted after a restart, recognised by its pid
//! and start time), and killed; and QEMU processes found by their `-name guest=` alone,
//! for cleanup without any state file.

use std::fs::{self, File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::process::Child;

use super::command_line::{GuestArgs, qemu_args};
use super::config::VmmConfig;
use super::lease_dir::{CONSOLE_FILE, OVERLAY_FILE, QMP_FILE, SEED_FILE, UEFI_VARS_FILE};
use crate::cgroup::LeaseCgroup;
use crate::error::VmmError;
use crate::firmware::Firmware;
use crate::image::Boot;
use crate::launch::{Launch, TapAttach, reserve_fd};
use crate::network::{LeaseNetwork, NS_TAP};
use crate::procfs;
use crate::qemu_user::QemuUser;
use crate::spec::VmSpec;

/// QEMU as our child (started here) or as a process we re-adopted after a restart.
pub(super) enum GuestProcess {
    Child(Child),
    Adopted { pid: i32, start_ticks: u64 },
}

impl GuestProcess {
    pub fn is_alive(&mut self) -> bool {
        match self {
            GuestProcess::Child(c) => matches!(c.try_wait(), Ok(None)),
            GuestProcess::Adopted { pid, start_ticks } => procfs::process_start_ticks(*pid) == Some(*start_ticks),
        }
    }

    pub fn exit_status(&mut self) -> String {
        match self {
            GuestProcess::Child(c) => match c.try_wait() {
                Ok(Some(s)) => s.to_string(),
                _ => "running".into(),
            },
            GuestProcess::Adopted { .. } => "exited".into(),
        }
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        match self {
            GuestProcess::Child(c) => tokio::time::timeout(timeout, c.wait()).await.is_ok(),
            GuestProcess::Adopted { .. } => loop {
                if !self.is_alive() {
                    return true;
                }
                if Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }

    pub async fn kill(&mut self) {
        match self {
            GuestProcess::Child(c) => {
                let _ = c.start_kill();
            }
            GuestProcess::Adopted { pid, start_ticks } => {
                if procfs::process_start_ticks(*pid) == Some(*start_ticks) {
                    // SAFETY: kill(2) on the pid we verified is our QEMU
                    unsafe {
                        libc::kill(*pid, libc::SIGKILL);
                    }
                }
            }
        }
        self.wait_exit(Duration::from_secs(5)).await;
    }
}

/// A lease file QEMU writes through its fd set, opened read-write and read-only: QEMU
/// asks the set for a read-only descriptor while it probes the image.
fn open_rw_and_ro(path: &Path) -> Result<(OwnedFd, OwnedFd), VmmError> {
    let err = |e| VmmError::io("cannot open", path, e);
    let rw = OpenOptions::new().read(true).write(true).open(path).map_err(err)?;
    let ro = File::open(path).map_err(err)?;
    Ok((rw.into(), ro.into()))
}

/// Starts QEMU for `spec`: opens every lease file in this (root) process and passes the
/// descriptors, so QEMU, which runs unprivileged, opens none of them by path
/// (docs/vmm.md "Per-lease files").
pub(super) fn spawn_qemu(
    cfg: &VmmConfig,
    user: &QemuUser,
    spec: &VmSpec,
    dir: &Path,
    network: &LeaseNetwork,
    cgroup: &LeaseCgroup,
    mac: [u8; 6],
) -> Result<Child, VmmError> {
    let lease = spec.lease_id;
    let spawn_err = |what: &str, e: std::io::Error| VmmError::Spawn { lease, reason: format!("{what}: {e}") };

    let qmp_path = dir.join(QMP_FILE);
    let _ = fs::remove_file(&qmp_path);
    // the lease dir is root-only 0700: no other user reaches the socket
    let qmp = UnixListener::bind(&qmp_path).map_err(|e| VmmError::io("cannot listen on", &qmp_path, e))?;
    let (overlay_rw, overlay_ro) = open_rw_and_ro(&dir.join(OVERLAY_FILE))?;
    let seed_path = dir.join(SEED_FILE);
    let seed: OwnedFd = File::open(&seed_path).map_err(|e| VmmError::io("cannot open", &seed_path, e))?.into();
    // UEFI: the lease's variable store (provision.rs copied it), read-write and read-only
    // like the overlay
    let uefi_vars = match spec.image.boot() {
        Boot::Firmware(Firmware::Uefi) => Some(open_rw_and_ro(&dir.join(UEFI_VARS_FILE))?),
        _ => None,
    };
    let console_path = dir.join(CONSOLE_FILE);
    let console = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&console_path)
        .map_err(|e| VmmError::io("cannot create", &console_path, e))?;
    let netns = (crate::netns::path(&network.netns), crate::netns::open(&network.netns)?);
    let procs = cgroup.open_procs_files()?;
    let tap_placeholder = reserve_fd().map_err(|e| spawn_err("cannot reserve a descriptor", e))?;

    let qmp_fd: OwnedFd = qmp.into();
    let args = qemu_args(&GuestArgs {
        name: &cfg.names.lease_name(&lease),
        accel: cfg.accel,
        tcg_tb_size_mib: cfg.tcg_tb_size_for(&spec.image),
        machine: spec.image.machine(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        boot: spec.image.boot(),
        qmp_fd: qmp_fd.as_raw_fd(),
        overlay_fds: (overlay_rw.as_raw_fd(), overlay_ro.as_raw_fd()),
        seed_fd: seed.as_raw_fd(),
        uefi_vars_fds: uefi_vars.as_ref().map(|(rw, ro)| (rw.as_raw_fd(), ro.as_raw_fd())),
        tap_fd: tap_placeholder.as_raw_fd(),
        mac,
    });
    Launch {
        program: &cfg.qemu_binary,
        args,
        user,
        netns: Some(netns),
        cgroup_procs: procs,
        inherit: [qmp_fd, overlay_rw, overlay_ro, seed]
            .into_iter()
            .chain(uefi_vars.into_iter().flat_map(|(rw, ro)| [rw, ro]))
            .collect(),
        tap: Some(TapAttach { name: NS_TAP.into(), placeholder: tap_placeholder }),
        output: Some(console),
    }
    .spawn()
    .map_err(|source| VmmError::Launch { lease, source })
}

/// Waits (a few seconds at most) until the killed processes are gone.
pub(super) async fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while pids.iter().any(|p| procfs::process_start_ticks(*p).is_some()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs the QEMU processes of guest `name` and waits until they are gone.
pub(super) async fn kill_guest_processes(prefix: &str, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let found: Vec<(i32, String)> = find_guest_processes(prefix).into_iter().filter(|(_, n)| n == name).collect();
        if found.is_empty() || Instant::now() >= deadline {
            return;
        }
        for (pid, _) in &found {
            // SAFETY: kill(2) on a QEMU carrying the lease's guest name
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Live processes whose QEMU `-name guest=<name>` starts with `prefix-`: the guests of
/// some vmm with that name prefix, found without any state file.
pub(super) fn find_guest_processes(prefix: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for pid in procfs::pids() {
        let Some(args) = procfs::process_cmdline(pid) else { continue };
        if let Some(name) = guest_name(&args, prefix)
            && procfs::process_start_ticks(pid).is_some()
        {
            found.push((pid, name));
        }
    }
    found
}

/// The `guest=` name of a QEMU command line, if it carries `prefix-`.
fn guest_name(args: &[String], prefix: &str) -> Option<String> {
    let name = args
        .windows(2)
        .find(|w| w[0] == "-name")
        .and_then(|w| w[1].split(',').find_map(|kv| kv.strip_prefix("guest=")))?;
    name.starts_with(&format!("{prefix}-")).then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guests_are_recognised_by_their_name_prefix() {
        let args = |name: &str| ["qemu-system-x86_64", "-name", name, "-m", "256"].map(String::from).to_vec();
        assert_eq!(guest_name(&args("guest=peervm-ab12,debug-threads=on"), "peervm").as_deref(), Some("peervm-ab12"));
        assert_eq!(guest_name(&args("debug-threads=on,guest=peervm-ab12"), "peervm").as_deref(), Some("peervm-ab12"));
        assert_eq!(guest_name(&args("guest=pvtest-ab12"), "peervm"), None);
        assert_eq!(guest_name(&args("guest=peervmx-ab12"), "peervm"), None);
        assert_eq!(guest_name(&["sleep".to_string(), "-name".to_string()], "peervm"), None);
    }
}
