//! Where a libvirt domain's QEMU sits in the cgroup tree, seen as the lease's cgroup
//! (docs/vmm.md "The libvirt backend", "Cgroups").
//!
//! libvirt places each domain in a cgroup of its own (`machine/<id>-<name>.libvirt-qemu`
//! on a v1 host without systemd, a `machine.slice` scope with systemd) for the
//! controllers it manages, and applies `<cputune>` and `<memtune>` there. It manages no
//! pids controller, and on some v1 hosts leaves cpuacct alone: in those hierarchies vmm
//! puts QEMU into `<long>/<long>-<hex>` of its own, as it does for a QEMU-backend guest,
//! with the tasks limit, while the domain is still paused. The lease's `LeaseCgroup` is
//! then libvirt's directory where libvirt placed QEMU and vmm's elsewhere, so usage,
//! limits and the tests read the same files for both backends.

use std::fs;
use std::path::{Path, PathBuf};

use crate::cgroup::{CgroupLayout, LeaseCgroup};
use crate::error::VmmError;
use crate::procfs;

/// The controller each hierarchy root of a v1 layout is looked up by.
fn v1_controllers(layout: &CgroupLayout) -> Vec<(&'static str, PathBuf)> {
    match layout {
        CgroupLayout::V1 { cpu, cpuacct, memory, pids } => {
            vec![("cpu", cpu.clone()), ("cpuacct", cpuacct.clone()), ("memory", memory.clone()), ("pids", pids.clone())]
        }
        CgroupLayout::V2 { .. } => Vec::new(),
    }
}

/// The domain's directory for a process path of /proc/<pid>/cgroup: libvirt keeps QEMU's
/// threads in `emulator` and `vcpuN` below the domain's cgroup, which carries the limits.
fn domain_dir(mount: &Path, process_path: &str) -> PathBuf {
    let rel = process_path.trim_start_matches('/');
    let rel = rel.strip_suffix("/emulator").unwrap_or(rel);
    mount.join(rel)
}

/// `base` (the lease's own cgroup names) with libvirt's directories where libvirt placed
/// `pid`, read from `/proc/<pid>/cgroup` (`text`); `mount2` is the cgroup2 mount for a v2
/// layout. Also returns the roots where QEMU sits at the top of the hierarchy (libvirt did
/// not place it): vmm's own cgroup goes there.
pub(crate) fn placed(base: LeaseCgroup, text: &str, mount2: Option<&Path>) -> (LeaseCgroup, Vec<PathBuf>) {
    let lines: Vec<(Vec<&str>, &str)> = text
        .lines()
        .filter_map(|l| {
            let mut it = l.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            Some((ctrls.split(',').collect(), path))
        })
        .collect();
    let mut cg = base;
    let mut unplaced = Vec::new();
    match cg.layout().clone() {
        CgroupLayout::V1 { .. } => {
            for (ctrl, root) in v1_controllers(cg.layout()) {
                match lines.iter().find(|(c, _)| c.contains(&ctrl)) {
                    Some((_, path)) if *path != "/" => cg = cg.placed_at(root.clone(), domain_dir(&root, path)),
                    _ => {
                        if !unplaced.contains(&root) {
                            unplaced.push(root)
                        }
                    }
                }
            }
        }
        CgroupLayout::V2 { root } => match (lines.iter().find(|(c, _)| c == &[""]), mount2) {
            (Some((_, path)), Some(mount)) if *path != "/" => cg = cg.placed_at(root, domain_dir(mount, path)),
            _ => unplaced.push(root),
        },
    }
    (cg, unplaced)
}

/// The lease cgroup of the domain whose QEMU is `pid`.
pub(crate) fn domain_cgroup(base: LeaseCgroup, pid: i32) -> Result<(LeaseCgroup, Vec<PathBuf>), VmmError> {
    let text = procfs::process_cgroups(pid)
        .ok_or_else(|| VmmError::Cgroup { path: format!("/proc/{pid}/cgroup").into(), reason: "cannot read".into() })?;
    let mount2 = match base.layout() {
        CgroupLayout::V2 { .. } => cgroup2_mount(),
        CgroupLayout::V1 { .. } => None,
    };
    Ok(placed(base, &text, mount2.as_deref()))
}

fn cgroup2_mount() -> Option<PathBuf> {
    let text = procfs::self_mountinfo().ok()?;
    match CgroupLayout::from_mountinfo(&text).ok()? {
        CgroupLayout::V2 { root } => Some(root),
        CgroupLayout::V1 { .. } => None,
    }
}

/// Puts the paused domain's QEMU `pid` under its limits where libvirt did not: vmm's own
/// cgroup in the `unplaced` hierarchies (QEMU moves there whole, every thread), and the
/// tasks limit, which libvirt does not set, wherever the pids controller is.
pub(crate) fn complete(cg: &LeaseCgroup, unplaced: &[PathBuf], pid: i32, pids_max: u64) -> Result<(), VmmError> {
    let err = |p: &Path, e: std::io::Error| VmmError::Cgroup { path: p.to_path_buf(), reason: e.to_string() };
    for root in unplaced {
        let dir = cg.dir_in(root);
        fs::create_dir_all(&dir).map_err(|e| err(&dir, e))?;
        let procs = dir.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).map_err(|e| err(&procs, e))?;
    }
    let pids_root = match cg.layout() {
        CgroupLayout::V1 { pids, .. } => pids.clone(),
        CgroupLayout::V2 { root } => root.clone(),
    };
    let max = cg.dir_in(&pids_root).join("pids.max");
    fs::write(&max, pids_max.to_string()).map_err(|e| err(&max, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_s_directories_where_it_placed_qemu_and_ours_elsewhere() {
        let layout = CgroupLayout::V1 {
            cpu: "/cg/cpu".into(),
            cpuacct: "/cg/cpuacct".into(),
            memory: "/cg/memory".into(),
            pids: "/cg/pids".into(),
        };
        let text = "8:pids:/\n4:memory:/machine/qemu-4-pv-ab.libvirt-qemu\n2:cpuacct:/\n\
                    1:cpu:/machine/qemu-4-pv-ab.libvirt-qemu/emulator\n0::/machine/qemu-4-pv-ab.libvirt-qemu/emulator\n";
        let (cg, unplaced) = placed(LeaseCgroup::new(layout, "pv", "pv-ab"), text, None);
        assert_eq!(cg.dir_in(Path::new("/cg/cpu")), Path::new("/cg/cpu/machine/qemu-4-pv-ab.libvirt-qemu"));
        assert_eq!(cg.dir_in(Path::new("/cg/memory")), Path::new("/cg/memory/machine/qemu-4-pv-ab.libvirt-qemu"));
        assert_eq!(cg.dir_in(Path::new("/cg/pids")), Path::new("/cg/pids/pv/pv-ab"));
        assert_eq!(unplaced, [PathBuf::from("/cg/cpuacct"), PathBuf::from("/cg/pids")]);

        let v2 = CgroupLayout::V2 { root: "/cg2/delegated".into() };
        let text = "0::/machine.slice/machine-qemu\\x2d1\\x2dpv\\x2dab.scope/libvirt/emulator\n";
        let (cg, unplaced) = placed(LeaseCgroup::new(v2, "pv", "pv-ab"), text, Some(Path::new("/cg2")));
        assert!(unplaced.is_empty());
        assert_eq!(
            cg.dir_in(Path::new("/cg2/delegated")),
            Path::new("/cg2/machine.slice/machine-qemu\\x2d1\\x2dpv\\x2dab.scope/libvirt")
        );
    }
}
