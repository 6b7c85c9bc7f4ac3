//! The unprivileged system user QEMU runs as (docs/vmm.md "The QEMU user"). QEMU gets no file by
//! path that it could not read anyway (kernel, initrd and base image are world-readable);
//! the lease's overlay, seed disk, QMP socket and tap device are handed over as open
//! descriptors, so lease directories stay root-only.

use std::ffi::{CStr, CString};
use std::process::Command;

use crate::error::VmmError;

/// The default user name.
pub const DEFAULT_QEMU_USER: &str = "peervm-qemu";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (e.g. `kvm`, for /dev/kvm).
    pub groups: Vec<u32>,
}

impl QemuUser {
    /// Looks the user up in the system's user database.
    pub fn lookup(name: &str) -> Result<Self, VmmError> {
        let err = |reason: String| VmmError::QemuUser { user: name.to_string(), reason };
        let account = crate::account::Account::lookup(name)
            .map_err(|e| err(format!("user lookup failed: {e}")))?
            .ok_or_else(|| {
                err(format!(
                    "no such user; create it with `useradd --system --no-create-home --home-dir /nonexistent \
                     --shell /usr/sbin/nologin {name}` (and add it to group kvm for KVM), or call QemuUser::ensure"
                ))
            })?;
        let (uid, gid) = (account.uid, account.gid);
        let cname = CString::new(name).map_err(|_| err("name contains NUL".into()))?;
        let mut groups = vec![0 as libc::gid_t; 256];
        let mut n = groups.len() as libc::c_int;
        // SAFETY: getgrouplist with a buffer of n entries; n is updated to the count
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if rc < 0 {
            return Err(err("member of more than 256 groups".into()));
        }
        groups.truncate(n.max(0) as usize);
        Ok(QemuUser { name: name.to_string(), uid, gid, groups })
    }

    /// Looks the user up and creates it as a system user (no home, no login shell) when it
    /// does not exist yet. When a `kvm` group exists the user joins it, so that QEMU can
    /// open /dev/kvm on hosts where the device is group-accessible.
    pub fn ensure(name: &str) -> Result<Self, VmmError> {
        if let Ok(u) = Self::lookup(name) {
            return Ok(u);
        }
        let mut cmd = Command::new("useradd");
        cmd.args(["--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"]);
        if group_exists("kvm") {
            cmd.args(["--groups", "kvm"]);
        }
        let out = cmd
            .arg(name)
            .output()
            .map_err(|e| VmmError::QemuUser { user: name.into(), reason: format!("cannot run useradd: {e}") })?;
        // a concurrent ensure may have won the race: only the lookup decides
        if !out.status.success() && Self::lookup(name).is_err() {
            return Err(VmmError::QemuUser {
                user: name.into(),
                reason: format!("useradd failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            });
        }
        Self::lookup(name)
    }

    /// Root, for a KVM probe that should ignore /dev/kvm's permissions.
    pub fn root() -> Self {
        QemuUser { name: "root".into(), uid: 0, gid: 0, groups: vec![0] }
    }
}

fn group_exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else { return false };
    // SAFETY: getgrnam returns a pointer to static storage or NULL; we only test it
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    !g.is_null() && !unsafe { CStr::from_ptr((*g).gr_name) }.to_bytes().is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_root_and_explains_a_missing_user() {
        let root = QemuUser::lookup("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = QemuUser::lookup("peervm-no-such-user-x").unwrap_err().to_string();
        assert!(err.contains("useradd"), "{err}");
    }
}
