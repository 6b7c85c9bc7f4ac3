//! A lease's directory, `<state dir>/leases/<lease hex>/` (0700): the names of its files,
//! their modes, and the state record `lease.json` (0600).
//!
//! The record is written before any resource of the lease exists and removed after the
//! last one is gone, so after a crash at any point reconcile knows every lease that may
//! have left something behind, and can re-adopt a live guest (its QEMU pid, port and
//! addresses).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::accel::Accel;
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::spec::EgressPolicy;

pub(super) const RECORD_FILE: &str = "lease.json";
pub(super) const OVERLAY_FILE: &str = "overlay.qcow2";
pub(super) const SEED_FILE: &str = "seed.img";
pub(super) const CONSOLE_FILE: &str = "console.log";
pub(super) const QMP_FILE: &str = "qmp.sock";
/// The lease's copy of OVMF's variable store (UEFI stock images only).
pub(super) const UEFI_VARS_FILE: &str = "uefi-vars.fd";
const RECORD_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(super) enum RecordState {
    /// Resources are being created; no guest to re-adopt.
    Provisioning,
    /// QEMU runs with `pid`.
    Running,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(super) struct LeaseRecord {
    pub version: u32,
    pub lease: LeaseId,
    pub state: RecordState,
    pub pid: Option<i32>,
    /// /proc/<pid>/stat start time: a recycled pid is not mistaken for our QEMU.
    pub pid_start_ticks: Option<u64>,
    pub slot: u32,
    pub listen: IpAddr,
    pub port: u16,
    pub host_ip: Ipv4Addr,
    pub guest_ip: Ipv4Addr,
    pub accel: Accel,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub cpu_quota: Option<f64>,
    pub egress: EgressPolicy,
    pub host_key: String,
    pub image_sha256: String,
    pub started_at_unix: u64,
    /// Cut off by `isolate`: a re-adoption (after a restart of the daemon or of the VMM
    /// helper) must not re-open its SSH port (SECURITY.md "Incident response").
    #[serde(default)]
    pub isolated: bool,
    /// Exposed guest ports: `(guest port, host port)`.
    #[serde(default)]
    pub exposed: Vec<(u16, u16)>,
}

impl LeaseRecord {
    pub fn new_version() -> u32 {
        RECORD_VERSION
    }
}

/// Creates a directory 0700 (and its parents, also 0700): modes are set at creation,
/// never fixed up afterwards (docs/vmm.md "Per-lease files"; SECURITY.md invariant 10).
pub(super) fn create_private_dir(path: &Path) -> Result<(), VmmError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| VmmError::io("cannot create directory", path, e))
}

/// Creates a directory (not its parents) that only root may list and the QEMU user's
/// group may only traverse: 0710 root:`gid`. For the libvirt backend, whose QEMU opens
/// the lease's overlay and seed by path (docs/vmm.md "The libvirt backend"). Mode and
/// group are set right after mkdir, before anything is in it, because the process umask
/// (077 in the VMM helper) would strip the group bit from the mode given to mkdir.
pub(super) fn create_traversable_dir(path: &Path, gid: u32) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |e| VmmError::io("cannot create directory", path, e);
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(err(e)),
    }
    std::os::unix::fs::chown(path, Some(0), Some(gid)).map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o710)).map_err(err)
}

/// Whether `user` can traverse every directory down to `dir` (execute permission as
/// owner, group member or other): the libvirt backend's QEMU must reach its lease's files.
#[cfg(feature = "libvirt")]
pub(super) fn check_traversable(dir: &Path, user: &crate::qemu_user::QemuUser) -> Result<(), VmmError> {
    use std::os::unix::fs::MetadataExt;
    for d in dir.ancestors().filter(|d| !d.as_os_str().is_empty()) {
        let m = fs::metadata(d).map_err(|e| VmmError::io("cannot inspect", d, e))?;
        let mode = m.mode();
        let ok = if m.uid() == user.uid {
            mode & 0o100 != 0
        } else if user.groups.contains(&m.gid()) || m.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(VmmError::InvalidConfig(format!(
                "the libvirt backend's lease directory {} is below {}, which the QEMU user {} cannot traverse \
                 (mode {:o}); choose another [hypervisor] libvirt_lease_dir, or give {} execute permission for \
                 that user",
                dir.display(),
                d.display(),
                user.name,
                mode & 0o7777,
                d.display()
            )));
        }
    }
    Ok(())
}

/// Creates an empty file 0600; fails if it exists.
pub(super) fn create_private_file(path: &Path) -> Result<(), VmmError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|e| VmmError::io("cannot create", path, e))
}

/// Writes the record atomically (temporary file 0600, fsync, rename).
pub(super) fn write_record(dir: &Path, record: &LeaseRecord) -> Result<(), VmmError> {
    let path = dir.join(RECORD_FILE);
    let tmp = dir.join(".lease.json.tmp");
    let _ = fs::remove_file(&tmp);
    let data = serde_json::to_vec_pretty(record).map_err(|e| VmmError::io("cannot encode", &path, e.into()))?;
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| VmmError::io("cannot create", &tmp, e))?;
    f.write_all(&data).and_then(|_| f.sync_all()).map_err(|e| VmmError::io("cannot write", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| VmmError::io("cannot rename into", &path, e))?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

pub(super) fn read_record(dir: &Path) -> Result<LeaseRecord, VmmError> {
    let path = dir.join(RECORD_FILE);
    let data = fs::read(&path).map_err(|e| VmmError::io("cannot read", &path, e))?;
    serde_json::from_slice(&data).map_err(|e| VmmError::io("cannot parse", &path, e.into()))
}

/// The last lines of the console log, for an error message.
pub(super) fn console_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn record_round_trips_with_private_modes() {
        let dir = tempfile::tempdir().unwrap();
        let lease_dir = dir.path().join("leases/abc");
        create_private_dir(&lease_dir).unwrap();
        assert_eq!(fs::metadata(&lease_dir).unwrap().permissions().mode() & 0o777, 0o700);
        let r = LeaseRecord {
            version: 1,
            lease: LeaseId::from_bytes([9; 16]),
            state: RecordState::Running,
            pid: Some(42),
            pid_start_ticks: Some(7),
            slot: 3,
            listen: "127.0.0.1".parse().unwrap(),
            port: 2222,
            host_ip: Ipv4Addr::new(10, 213, 0, 13),
            guest_ip: Ipv4Addr::new(10, 213, 0, 14),
            accel: Accel::Tcg,
            vcpus: 2,
            memory_mib: 256,
            disk_gib: 1,
            cpu_quota: Some(0.5),
            egress: EgressPolicy::Deny,
            host_key: "ssh-ed25519 AAAA".into(),
            image_sha256: "00".into(),
            started_at_unix: 1,
            isolated: false,
            exposed: vec![(80, 30000)],
        };
        write_record(&lease_dir, &r).unwrap();
        assert_eq!(fs::metadata(lease_dir.join(RECORD_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(read_record(&lease_dir).unwrap(), r);
        write_record(&lease_dir, &r).unwrap();
    }
}
