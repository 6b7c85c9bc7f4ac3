//! Where lease cgroups go on a cgroup v2 host (docs/vmm.md "Cgroups", "Delegation"):
//! inside the subtree systemd delegated to the VMM helper when there is one, else under
//! the hierarchy's root as before.
//!
//! packaging/systemd/peervm-vmm.service asks for `Delegate=yes` and
//! `DelegateSubgroup=supervisor`: systemd (254 and later) then starts the helper in the
//! leaf `<service cgroup>/supervisor`, marks the service cgroup with the `trusted.delegate`
//! extended attribute (`user.delegate` under a user manager), and leaves the service
//! cgroup's subtree to the helper. Lease cgroups become `<service cgroup>/<long>/<long>-
//! <lease hex>`: leaves beside the helper's own, with the controllers enabled in the
//! subtree systemd handed over, and nothing written above it.
//!
//! The helper does not move itself into a leaf when systemd started it in the delegated
//! cgroup directly (systemd before 254 ignores `DelegateSubgroup=`): the controllers it
//! would then enable there forbid processes in that cgroup (cgroup v2's "no internal
//! processes" rule), so systemd could not start the next helper in it after a restart
//! while guests run, and guests outlive helper restarts (`KillMode=process`). It keeps
//! the hierarchy-root layout there and says why.

use std::ffi::CString;
use std::path::{Path, PathBuf};

/// The leaf the helper runs in when systemd delegates its subtree (the unit's
/// `DelegateSubgroup=`).
pub const SUPERVISOR_LEAF: &str = "supervisor";

/// The extended attributes systemd sets on a cgroup it delegated (system manager, user
/// manager); the value is "1".
const DELEGATE_XATTRS: [&str; 2] = ["trusted.delegate", "user.delegate"];

/// Where the lease cgroups of this process go, relative to the cgroup2 mount.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Inside the delegated subtree at this path (relative to the mount, no leading `/`).
    Delegated { subtree: String },
    /// Under the hierarchy's root (no delegation: development, containers, hosts without
    /// systemd). `reason` says why, when there was a delegated cgroup that could not be
    /// used.
    HierarchyRoot { reason: Option<String> },
}

impl Placement {
    /// The directory lease cgroups go under, given the cgroup2 mount point.
    pub fn root(&self, mount: &Path) -> PathBuf {
        match self {
            Placement::Delegated { subtree } => mount.join(subtree),
            Placement::HierarchyRoot { .. } => mount.to_path_buf(),
        }
    }

    /// Decides from the process's own v2 cgroup (the `0::` line of /proc/self/cgroup,
    /// `None` when it has none) and whether a cgroup (path relative to the mount) is
    /// marked as delegated.
    pub fn decide(own: Option<&str>, delegated: impl Fn(&str) -> bool) -> Placement {
        let Some(own) = own.map(|p| p.trim_matches('/')).filter(|p| !p.is_empty()) else {
            return Placement::HierarchyRoot { reason: None };
        };
        if let Some((parent, leaf)) = own.rsplit_once('/')
            && leaf == SUPERVISOR_LEAF
            && delegated(parent)
        {
            return Placement::Delegated { subtree: parent.to_string() };
        }
        if delegated(own) {
            return Placement::HierarchyRoot {
                reason: Some(format!(
                    "the delegated cgroup /{own} holds this process itself, not a `{SUPERVISOR_LEAF}` leaf \
                     inside it (systemd 254 or later starts it there from DelegateSubgroup={SUPERVISOR_LEAF}); \
                     lease cgroups stay under the hierarchy's root"
                )),
            };
        }
        Placement::HierarchyRoot { reason: None }
    }

    /// `decide` for this process: /proc/self/cgroup and the cgroups' extended attributes
    /// under `mount`.
    pub fn of_self(mount: &Path) -> Placement {
        Placement::of_process(mount, "self")
    }

    /// `decide` for the process /proc/`pid` ("self" or a number).
    pub fn of_process(mount: &Path, pid: &str) -> Placement {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Placement::decide(own_v2_cgroup(&text), |rel| is_delegated(&mount.join(rel)))
    }
}

/// The unified-hierarchy path in a /proc/PID/cgroup text (its `0::PATH` line).
pub fn own_v2_cgroup(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Whether systemd marked this cgroup directory as delegated.
pub fn is_delegated(dir: &Path) -> bool {
    let Ok(path) = CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    DELEGATE_XATTRS.iter().any(|name| {
        let Ok(name) = CString::new(*name) else { return false };
        let mut value = [0u8; 8];
        // SAFETY: getxattr(2) with valid C strings and a buffer of the length passed
        let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        n > 0 && value[..n as usize].starts_with(b"1")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SVC: &str = "system.slice/peervm-vmm.service";

    #[test]
    fn a_supervisor_leaf_of_a_delegated_cgroup_places_leases_beside_it() {
        let p = Placement::decide(Some("/system.slice/peervm-vmm.service/supervisor"), |c| c == SVC);
        assert_eq!(p, Placement::Delegated { subtree: SVC.into() });
        assert_eq!(p.root(Path::new("/sys/fs/cgroup")), Path::new("/sys/fs/cgroup/system.slice/peervm-vmm.service"));
    }

    #[test]
    fn without_delegation_leases_go_under_the_hierarchy_root() {
        // a leaf named supervisor whose parent systemd did not delegate
        let p = Placement::decide(Some("/system.slice/peervm-vmm.service/supervisor"), |_| false);
        assert_eq!(p, Placement::HierarchyRoot { reason: None });
        // a shell's session scope, a container's root, no v2 line at all
        assert_eq!(Placement::decide(Some("/user.slice/session-1.scope"), |_| false), p);
        assert_eq!(Placement::decide(Some("/"), |_| true), p);
        assert_eq!(Placement::decide(None, |_| true), p);
        assert_eq!(p.root(Path::new("/sys/fs/cgroup")), Path::new("/sys/fs/cgroup"));
    }

    /// systemd before 254 starts the helper in the delegated cgroup itself: enabling
    /// controllers there would lock out the next helper, so the old layout stays, with
    /// the reason naming the fix.
    #[test]
    fn a_helper_in_the_delegated_cgroup_itself_keeps_the_root_layout_and_says_why() {
        let p = Placement::decide(Some("/system.slice/peervm-vmm.service"), |c| c == SVC);
        let Placement::HierarchyRoot { reason: Some(reason) } = p else { panic!("{p:?}") };
        assert!(reason.contains("DelegateSubgroup=supervisor"), "{reason}");
    }

    #[test]
    fn reads_the_unified_line_of_proc_cgroup() {
        let hybrid = "12:pids:/user.slice\n1:name=systemd:/user.slice/x\n0::/user.slice/x\n";
        assert_eq!(own_v2_cgroup(hybrid), Some("/user.slice/x"));
        assert_eq!(own_v2_cgroup("3:memory:/\n"), None);
    }
}
