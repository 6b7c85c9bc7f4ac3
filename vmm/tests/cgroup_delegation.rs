//! Where the VMM helper puts lease cgroups on a cgroup v2 host, decided against the real
//! kernel's files (vmm/src/cgroup_placement.rs, docs/vmm.md "Cgroups"): a process in the
//! `supervisor` leaf of a cgroup marked delegated (`trusted.delegate`, as systemd marks
//! it) places them in that cgroup; without the mark, or from the delegated cgroup itself,
//! under the hierarchy's root.
//!
//! The cgroup2 hierarchy of these hosts has no cpu, memory or pids controller (they are
//! bound to v1), so lease cgroups themselves cannot be made in it here; the unit test
//! `cgroup::tests::v2_under_a_delegated_subtree_writes_nothing_above_it` covers those
//! writes. The cgroups this test makes are named after its pid, and removed at the end.

use std::ffi::CString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use peervm_testenv::Needs;
use peervm_vmm::cgroup_placement::{Placement, SUPERVISOR_LEAF};

/// The unified hierarchy's mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split(' ').nth(4)?;
            post.starts_with("cgroup2 ").then(|| PathBuf::from(mount))
        })
        .expect("a cgroup2 mount (these hosts have one at /sys/fs/cgroup/unified)")
}

fn set_xattr(dir: &Path, name: &str, value: &[u8]) {
    let path = CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    let name = CString::new(name).unwrap();
    // SAFETY: setxattr(2) with valid C strings and the value's own length
    let rc = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(rc, 0, "setxattr on {}: {}", dir.display(), std::io::Error::last_os_error());
}

/// The test's cgroups and the process in them; removed on drop, a failed assertion too.
struct Service {
    dir: PathBuf,
    child: Child,
}

impl Service {
    fn move_into(&self, dir: &Path) {
        fs::write(dir.join("cgroup.procs"), self.child.id().to_string()).unwrap();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir(self.dir.join(SUPERVISOR_LEAF));
        let _ = fs::remove_dir(&self.dir);
    }
}

#[ignore = "needs root: creates cgroups in the unified hierarchy"]
#[test]
fn lease_cgroups_go_in_the_subtree_systemd_delegated_to_the_helper() {
    Needs::root("creates cgroups in the unified hierarchy").require();
    let mount = cgroup2_mount();
    let name = format!("pvdg-{}.service", std::process::id());
    let dir = mount.join(&name);
    fs::create_dir_all(dir.join(SUPERVISOR_LEAF)).unwrap();
    let svc = Service { dir: dir.clone(), child: Command::new("sleep").arg("600").spawn().unwrap() };
    let pid = svc.child.id().to_string();

    // In the leaf of a cgroup nobody delegated: the hierarchy's root, as before.
    svc.move_into(&dir.join(SUPERVISOR_LEAF));
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(own.contains(&format!("0::/{name}/{SUPERVISOR_LEAF}\n")), "{own}");
    assert_eq!(Placement::of_process(&mount, &pid), Placement::HierarchyRoot { reason: None });

    // systemd's mark on the service cgroup: lease cgroups go beside the supervisor leaf.
    set_xattr(&dir, "trusted.delegate", b"1");
    let placed = Placement::of_process(&mount, &pid);
    assert_eq!(placed, Placement::Delegated { subtree: name.clone() });
    assert_eq!(placed.root(&mount), dir);

    // Started in the delegated cgroup itself (systemd before 254): the root layout, and why.
    svc.move_into(&dir);
    match Placement::of_process(&mount, &pid) {
        Placement::HierarchyRoot { reason: Some(reason) } => {
            assert!(reason.contains(&name) && reason.contains("DelegateSubgroup"), "{reason}")
        }
        other => panic!("expected the root layout with a reason, got {other:?}"),
    }

    // The mark's value counts, not only its presence.
    svc.move_into(&dir.join(SUPERVISOR_LEAF));
    set_xattr(&dir, "trusted.delegate", b"0");
    assert_eq!(Placement::of_process(&mount, &pid), Placement::HierarchyRoot { reason: None });
}
