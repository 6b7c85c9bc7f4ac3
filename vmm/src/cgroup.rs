//! A cgroup per lease: CPU quota, memory limit and pids limit (docs/vmm.md "Cgroups";
//! SECURITY.md invariant 8), on cgroup v1 (one directory per controller hierarchy) or v2
//! (one directory in the unified hierarchy).
//!
//! The files are written directly rather than through cgroups-rs: the handful of files we
//! need is smaller than the dependency, and the same code can be pointed at a temporary
//! directory to test the v2 writes on a host whose kernel only offers v1.
//!
//! Layout: `<hierarchy>/<parent>/<parent>-<lease hex>`, where `parent` is the name
//! prefix (`peervm`), so reconcile finds every lease cgroup under one directory.

use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cgroup_placement::Placement;
use crate::error::VmmError;
use crate::procfs;

/// The CFS period we use: 100 ms, the kernel default; quota is expressed against it.
pub const CPU_PERIOD_US: u64 = 100_000;

/// `destroy` tries this many times, `DESTROY_PAUSE` apart, before it reports the cgroup
/// as busy: about 5 s for killed tasks to be reaped.
const DESTROY_ATTEMPTS: u32 = 250;
const DESTROY_PAUSE: Duration = Duration::from_millis(20);

/// Where the controllers we need are mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupLayout {
    /// cgroup v1: each controller has its own hierarchy (some may share one mount).
    V1 { cpu: PathBuf, cpuacct: PathBuf, memory: PathBuf, pids: PathBuf },
    /// cgroup v2: one unified hierarchy.
    V2 { root: PathBuf },
}

impl CgroupLayout {
    /// Reads /proc/self/mountinfo. v1 wins when the memory controller is bound to a v1
    /// hierarchy (a controller bound to v1 is absent from v2, e.g. hybrid hosts with an
    /// empty /sys/fs/cgroup/unified); otherwise the cgroup2 mount is used, and in it the
    /// subtree systemd delegated to this process if there is one (cgroup_placement.rs).
    pub fn detect() -> Result<Self, VmmError> {
        let text = procfs::self_mountinfo().map_err(|e| VmmError::io("cannot read", procfs::SELF_MOUNTINFO, e))?;
        Ok(match Self::from_mountinfo(&text)? {
            CgroupLayout::V2 { root: mount } => CgroupLayout::V2 { root: v2_root(&mount) },
            v1 => v1,
        })
    }

    pub(crate) fn from_mountinfo(text: &str) -> Result<Self, VmmError> {
        let mut v1: Vec<(PathBuf, Vec<String>)> = Vec::new();
        let mut v2: Option<PathBuf> = None;
        for line in text.lines() {
            let Some((pre, post)) = line.split_once(" - ") else { continue };
            let mount_point = match pre.split(' ').nth(4) {
                Some(p) => PathBuf::from(unescape_mountinfo(p)),
                None => continue,
            };
            let mut post = post.split(' ');
            let fstype = post.next().unwrap_or_default();
            let _source = post.next();
            let options = post.next().unwrap_or_default();
            match fstype {
                "cgroup" => v1.push((mount_point, options.split(',').map(str::to_string).collect())),
                "cgroup2" if v2.is_none() => v2 = Some(mount_point),
                _ => {}
            }
        }
        let find = |ctrl: &str| v1.iter().find(|(_, opts)| opts.iter().any(|o| o == ctrl)).map(|(p, _)| p.clone());
        if let Some(memory) = find("memory") {
            let missing =
                |c: &str| VmmError::NoCgroups(format!("cgroup v1 is in use but the {c} controller is not mounted"));
            return Ok(CgroupLayout::V1 {
                cpu: find("cpu").ok_or_else(|| missing("cpu"))?,
                cpuacct: find("cpuacct").ok_or_else(|| missing("cpuacct"))?,
                pids: find("pids").ok_or_else(|| missing("pids"))?,
                memory,
            });
        }
        v2.map(|root| CgroupLayout::V2 { root }).ok_or_else(|| {
            VmmError::NoCgroups(
                "neither a cgroup v1 memory hierarchy nor a cgroup2 mount in this mount namespace \
                     (`ip netns exec` remounts /sys without them: to run a provider in a network \
                     namespace, enter only the network namespace, e.g. `nsenter --net=/run/netns/NAME`)"
                    .into(),
            )
        })
    }

    pub fn version(&self) -> u8 {
        match self {
            CgroupLayout::V1 { .. } => 1,
            CgroupLayout::V2 { .. } => 2,
        }
    }

    /// The distinct hierarchy roots (v1 controllers may share a mount).
    fn roots(&self) -> Vec<PathBuf> {
        match self {
            CgroupLayout::V1 { cpu, cpuacct, memory, pids } => {
                let mut roots: Vec<PathBuf> = Vec::new();
                for r in [cpu, cpuacct, memory, pids] {
                    if !roots.contains(r) {
                        roots.push(r.clone());
                    }
                }
                roots
            }
            CgroupLayout::V2 { root } => vec![root.clone()],
        }
    }

    /// Names of the lease cgroups under `parent` (in any hierarchy): reconcile's view.
    pub fn list_children(&self, parent: &str) -> Vec<String> {
        let mut names = Vec::new();
        for root in self.roots() {
            let Ok(entries) = fs::read_dir(root.join(parent)) else { continue };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir())
                    && let Some(n) = e.file_name().to_str()
                    && !names.iter().any(|x: &String| x == n)
                {
                    names.push(n.to_string());
                }
            }
        }
        names
    }
}

/// Where lease cgroups go in the unified hierarchy mounted at `mount`: the subtree systemd
/// delegated to this process, or the mount itself (cgroup_placement.rs).
fn v2_root(mount: &Path) -> PathBuf {
    let placement = Placement::of_self(mount);
    match &placement {
        Placement::Delegated { subtree } => tracing::debug!(subtree, "lease cgroups go in the delegated subtree"),
        Placement::HierarchyRoot { reason: Some(reason) } => tracing::warn!("{reason}"),
        Placement::HierarchyRoot { reason: None } => {}
    }
    placement.root(mount)
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8)
        {
            out.push(v as char);
            i += 4;
            continue;
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

/// The limits a lease's cgroup carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupLimits {
    /// CPU time per period in µs; `None`: unlimited.
    pub cpu_quota_us: Option<u64>,
    pub cpu_period_us: u64,
    pub memory_max_bytes: u64,
    pub pids_max: u64,
}

impl CgroupLimits {
    /// `cores` of CPU time (may be fractional) per period.
    pub fn quota_for_cores(cores: f64) -> u64 {
        // at least 1 ms per period: the kernel's minimum quota
        ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
    }
}

/// Counters read from a lease's cgroup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    /// CPU time used by every task of the cgroup, ns.
    pub cpu_usage_ns: u64,
    pub nr_periods: u64,
    pub nr_throttled: u64,
    pub throttled_ns: u64,
    pub memory_current_bytes: u64,
    /// High-water mark (v1 max_usage_in_bytes, v2 memory.peak where the kernel has it).
    pub memory_peak_bytes: Option<u64>,
}

/// One lease's cgroup (in each hierarchy for v1).
#[derive(Clone, Debug)]
pub struct LeaseCgroup {
    layout: CgroupLayout,
    parent: String,
    name: String,
    /// `(hierarchy root, directory)`: where the lease's cgroup is in that hierarchy when
    /// someone else placed it (libvirt, docs/vmm.md "The libvirt backend"); other
    /// hierarchies use `<root>/<parent>/<name>`.
    placed: Vec<(PathBuf, PathBuf)>,
}

impl LeaseCgroup {
    pub fn new(layout: CgroupLayout, parent: &str, name: &str) -> Self {
        LeaseCgroup { layout, parent: parent.to_string(), name: name.to_string(), placed: Vec::new() }
    }

    /// The same cgroup, found at `dir` in the hierarchy mounted at `root`.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(crate) fn placed_at(mut self, root: PathBuf, dir: PathBuf) -> Self {
        self.placed.retain(|(r, _)| *r != root);
        self.placed.push((root, dir));
        self
    }

    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub(crate) fn layout(&self) -> &CgroupLayout {
        &self.layout
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The lease's directory in every hierarchy.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.layout.roots().iter().map(|r| self.dir_in(r)).collect()
    }

    pub(crate) fn dir_in(&self, root: &Path) -> PathBuf {
        match self.placed.iter().find(|(r, _)| r == root) {
            Some((_, dir)) => dir.clone(),
            None => root.join(&self.parent).join(&self.name),
        }
    }

    pub fn exists(&self) -> bool {
        self.dirs().iter().any(|d| d.is_dir())
    }

    /// Creates the cgroup and writes its limits.
    pub fn create(&self, limits: &CgroupLimits) -> Result<(), VmmError> {
        match &self.layout {
            CgroupLayout::V1 { cpu, memory, pids, .. } => {
                for dir in self.dirs() {
                    mkdir_all(&dir)?;
                }
                let cpu_dir = self.dir_in(cpu);
                write(&cpu_dir.join("cpu.cfs_period_us"), &limits.cpu_period_us.to_string())?;
                write(&cpu_dir.join("cpu.cfs_quota_us"), &v1_quota(limits.cpu_quota_us))?;
                let mem_dir = self.dir_in(memory);
                write(&mem_dir.join("memory.limit_in_bytes"), &limits.memory_max_bytes.to_string())?;
                // no swap beyond the limit: memsw (RAM + swap) gets the same bound, where
                // the kernel accounts swap at all
                let memsw = mem_dir.join("memory.memsw.limit_in_bytes");
                if memsw.exists() {
                    write(&memsw, &limits.memory_max_bytes.to_string())?;
                }
                write(&self.dir_in(pids).join("pids.max"), &limits.pids_max.to_string())?;
            }
            CgroupLayout::V2 { root } => {
                // controllers must be enabled in every ancestor's subtree_control
                let parent = root.join(&self.parent);
                enable_v2_controllers(root)?;
                mkdir_all(&parent)?;
                enable_v2_controllers(&parent)?;
                let dir = self.dir_in(root);
                mkdir_all(&dir)?;
                write(&dir.join("cpu.max"), &v2_cpu_max(limits.cpu_quota_us, limits.cpu_period_us))?;
                write(&dir.join("memory.max"), &limits.memory_max_bytes.to_string())?;
                let swap = dir.join("memory.swap.max");
                if swap.exists() {
                    write(&swap, "0")?;
                }
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
            }
        }
        Ok(())
    }

    /// Changes the CPU quota of a running lease.
    pub fn set_cpu_quota(&self, quota_us: Option<u64>, period_us: u64) -> Result<(), VmmError> {
        match &self.layout {
            CgroupLayout::V1 { cpu, .. } => {
                let dir = self.dir_in(cpu);
                write(&dir.join("cpu.cfs_period_us"), &period_us.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &v1_quota(quota_us))
            }
            CgroupLayout::V2 { root } => write(&self.dir_in(root).join("cpu.max"), &v2_cpu_max(quota_us, period_us)),
        }
    }

    /// The limits as the kernel reports them.
    pub fn read_limits(&self) -> Result<CgroupLimits, VmmError> {
        let num = |p: PathBuf| -> Result<Option<u64>, VmmError> {
            let s = read(&p)?;
            let s = s.trim();
            if s == "max" || s == "-1" {
                return Ok(None);
            }
            s.parse().map(Some).map_err(|_| cg_err(&p, format!("unexpected content {s:?}")))
        };
        match &self.layout {
            CgroupLayout::V1 { cpu, memory, pids, .. } => Ok(CgroupLimits {
                cpu_quota_us: num(self.dir_in(cpu).join("cpu.cfs_quota_us"))?,
                cpu_period_us: num(self.dir_in(cpu).join("cpu.cfs_period_us"))?.unwrap_or(CPU_PERIOD_US),
                memory_max_bytes: num(self.dir_in(memory).join("memory.limit_in_bytes"))?.unwrap_or(u64::MAX),
                pids_max: num(self.dir_in(pids).join("pids.max"))?.unwrap_or(u64::MAX),
            }),
            CgroupLayout::V2 { root } => {
                let dir = self.dir_in(root);
                let p = dir.join("cpu.max");
                let cpu_max = read(&p)?;
                let mut it = cpu_max.split_whitespace();
                let quota = it.next().unwrap_or("max");
                let period = it.next().and_then(|s| s.parse().ok()).unwrap_or(CPU_PERIOD_US);
                Ok(CgroupLimits {
                    cpu_quota_us: if quota == "max" {
                        None
                    } else {
                        Some(quota.parse().map_err(|_| cg_err(&p, format!("unexpected content {cpu_max:?}")))?)
                    },
                    cpu_period_us: period,
                    memory_max_bytes: num(dir.join("memory.max"))?.unwrap_or(u64::MAX),
                    pids_max: num(dir.join("pids.max"))?.unwrap_or(u64::MAX),
                })
            }
        }
    }

    /// CPU, throttling and memory counters.
    pub fn usage(&self) -> Result<CgroupUsage, VmmError> {
        match &self.layout {
            CgroupLayout::V1 { cpu, cpuacct, memory, .. } => {
                let stat = read(&self.dir_in(cpu).join("cpu.stat"))?;
                let mem = self.dir_in(memory);
                Ok(CgroupUsage {
                    cpu_usage_ns: read_u64(&self.dir_in(cpuacct).join("cpuacct.usage"))?,
                    nr_periods: stat_field(&stat, "nr_periods"),
                    nr_throttled: stat_field(&stat, "nr_throttled"),
                    throttled_ns: stat_field(&stat, "throttled_time"),
                    memory_current_bytes: read_u64(&mem.join("memory.usage_in_bytes"))?,
                    memory_peak_bytes: read_u64(&mem.join("memory.max_usage_in_bytes")).ok(),
                })
            }
            CgroupLayout::V2 { root } => {
                let dir = self.dir_in(root);
                let stat = read(&dir.join("cpu.stat"))?;
                Ok(CgroupUsage {
                    cpu_usage_ns: stat_field(&stat, "usage_usec").saturating_mul(1000),
                    nr_periods: stat_field(&stat, "nr_periods"),
                    nr_throttled: stat_field(&stat, "nr_throttled"),
                    throttled_ns: stat_field(&stat, "throttled_usec").saturating_mul(1000),
                    memory_current_bytes: read_u64(&dir.join("memory.current"))?,
                    memory_peak_bytes: read_u64(&dir.join("memory.peak")).ok(),
                })
            }
        }
    }

    /// The `cgroup.procs` files, with their paths, opened for writing, for a child to
    /// join before exec (writing "0" moves the writer).
    pub(crate) fn open_procs_files(&self) -> Result<Vec<(PathBuf, File)>, VmmError> {
        self.dirs()
            .iter()
            .map(|d| {
                let p = d.join("cgroup.procs");
                let f = OpenOptions::new().write(true).open(&p).map_err(|e| VmmError::io("cannot open", &p, e))?;
                Ok((p, f))
            })
            .collect()
    }

    /// Processes in the cgroup (any hierarchy).
    pub fn procs(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for d in self.dirs() {
            if let Ok(s) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in s.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    if !pids.contains(&pid) {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// SIGKILLs whatever is left in the cgroup and removes its directories. Idempotent.
    ///
    /// rmdir fails with EBUSY until the kernel has reaped the killed tasks, so this
    /// retries (`DESTROY_ATTEMPTS` times, `DESTROY_PAUSE` apart, about 5 s in all). It is
    /// async because it runs on the teardown path inside the runtime: the pauses must
    /// not hold a worker thread that other leases' tasks need.
    pub async fn destroy(&self) -> Result<(), VmmError> {
        self.destroy_with(DESTROY_ATTEMPTS, DESTROY_PAUSE).await
    }

    async fn destroy_with(&self, attempts: u32, pause: Duration) -> Result<(), VmmError> {
        let mut attempt = 1;
        loop {
            match self.kill_and_remove()? {
                None => return Ok(()),
                Some((d, e)) if attempt >= attempts => {
                    return Err(cg_err(&d, format!("cannot remove: {e} (tasks: {:?})", self.procs())));
                }
                Some(_) => tokio::time::sleep(pause).await,
            }
            attempt += 1;
        }
    }

    /// One attempt of `destroy`: SIGKILL every task, rmdir every directory. Returns the
    /// first directory that is still busy.
    fn kill_and_remove(&self) -> Result<Option<(PathBuf, std::io::Error)>, VmmError> {
        for pid in self.procs() {
            // SAFETY: kill(2) with a pid read from this lease's own cgroup
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let mut busy = None;
        for d in self.dirs() {
            match fs::remove_dir(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                // EBUSY until the killed tasks are gone; a plain directory (tests)
                // reports ENOTEMPTY because of the files we wrote
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && !is_cgroupfs(&d) => {
                    fs::remove_dir_all(&d).map_err(|e| VmmError::io("cannot remove", &d, e))?;
                }
                Err(e) => {
                    busy.get_or_insert((d, e));
                }
            }
        }
        Ok(busy)
    }
}

fn is_cgroupfs(p: &Path) -> bool {
    // A cgroup directory is removed with rmdir although it lists files; remove_dir_all
    // is only for a plain directory standing in for one (the v2 tests).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs with a valid C string and a zeroed out-struct
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    const CGROUP_SUPER_MAGIC: i64 = 0x27e0eb;
    const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
    let t = st.f_type as i64;
    t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
}

fn v1_quota(q: Option<u64>) -> String {
    q.map(|q| q.to_string()).unwrap_or_else(|| "-1".into())
}

fn v2_cpu_max(q: Option<u64>, period: u64) -> String {
    match q {
        Some(q) => format!("{q} {period}"),
        None => format!("max {period}"),
    }
}

fn enable_v2_controllers(dir: &Path) -> Result<(), VmmError> {
    let have = read(&dir.join("cgroup.controllers"))?;
    let missing: Vec<&str> =
        ["cpu", "memory", "pids"].into_iter().filter(|c| !have.split_whitespace().any(|h| h == *c)).collect();
    if !missing.is_empty() {
        return Err(cg_err(dir, format!("controllers {missing:?} are not available (cgroup.controllers: {have:?})")));
    }
    write(&dir.join("cgroup.subtree_control"), "+cpu +memory +pids")
}

fn stat_field(stat: &str, key: &str) -> u64 {
    stat.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

fn cg_err(path: &Path, reason: String) -> VmmError {
    VmmError::Cgroup { path: path.to_path_buf(), reason }
}

fn mkdir_all(p: &Path) -> Result<(), VmmError> {
    fs::create_dir_all(p).map_err(|e| VmmError::io("cannot create cgroup", p, e))
}

fn write(p: &Path, value: &str) -> Result<(), VmmError> {
    fs::write(p, value).map_err(|e| cg_err(p, format!("cannot write {value:?}: {e}")))
}

fn read(p: &Path) -> Result<String, VmmError> {
    fs::read_to_string(p).map_err(|e| cg_err(p, format!("cannot read: {e}")))
}

fn read_u64(p: &Path) -> Result<u64, VmmError> {
    let s = read(p)?;
    s.trim().parse().map_err(|_| cg_err(p, format!("unexpected content {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw
33 30 0:29 / /sys/fs/cgroup/cpu rw,relatime shared:12 - cgroup cgroup rw,cpu
34 30 0:30 / /sys/fs/cgroup/cpuacct rw,relatime shared:13 - cgroup cgroup rw,cpuacct
35 30 0:31 / /sys/fs/cgroup/memory rw,relatime shared:14 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,relatime shared:15 - cgroup cgroup rw,pids
";

    #[test]
    fn detects_v1_on_hybrid_hosts_and_v2_on_unified_ones() {
        let l = CgroupLayout::from_mountinfo(HYBRID).unwrap();
        assert_eq!(
            l,
            CgroupLayout::V1 {
                cpu: "/sys/fs/cgroup/cpu".into(),
                cpuacct: "/sys/fs/cgroup/cpuacct".into(),
                memory: "/sys/fs/cgroup/memory".into(),
                pids: "/sys/fs/cgroup/pids".into(),
            }
        );
        let comounted = "33 30 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
                         35 30 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                         36 30 0:32 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n";
        let l = CgroupLayout::from_mountinfo(comounted).unwrap();
        assert_eq!(l.roots().len(), 3);
        let unified = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(CgroupLayout::from_mountinfo(unified).unwrap(), CgroupLayout::V2 { root: "/sys/fs/cgroup".into() });
        // A mount namespace without cgroups (`ip netns exec`'s): the error says what to do.
        let err = CgroupLayout::from_mountinfo("40 30 0:40 / /sys rw - sysfs sysfs rw\n").unwrap_err().to_string();
        assert!(err.contains("nsenter --net="), "{err}");
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }

    /// The v2 code path against a directory that looks like a cgroup2 root.
    #[tokio::test]
    async fn v2_writes_limits_and_enables_controllers() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::write(r.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        fs::create_dir(r.join("peervm")).unwrap();
        fs::write(r.join("peervm/cgroup.controllers"), "cpu memory pids\n").unwrap();
        let cg = LeaseCgroup::new(CgroupLayout::V2 { root: r.to_path_buf() }, "peervm", "peervm-abc");
        let limits = CgroupLimits {
            cpu_quota_us: Some(150_000),
            cpu_period_us: CPU_PERIOD_US,
            memory_max_bytes: 512 << 20,
            pids_max: 200,
        };
        cg.create(&limits).unwrap();
        let dir = r.join("peervm/peervm-abc");
        assert_eq!(fs::read_to_string(r.join("cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert_eq!(fs::read_to_string(r.join("peervm/cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "150000 100000");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), (512u64 << 20).to_string());
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "200");
        assert_eq!(cg.read_limits().unwrap(), limits);
        assert_eq!(cg.dirs(), vec![dir.clone()]);

        cg.set_cpu_quota(None, CPU_PERIOD_US).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "max 100000");
        assert_eq!(cg.read_limits().unwrap().cpu_quota_us, None);

        fs::write(
            dir.join("cpu.stat"),
            "usage_usec 2500\nuser_usec 2000\nnr_periods 10\nnr_throttled 4\nthrottled_usec 700\n",
        )
        .unwrap();
        fs::write(dir.join("memory.current"), "1234\n").unwrap();
        fs::write(dir.join("memory.peak"), "5678\n").unwrap();
        let u = cg.usage().unwrap();
        assert_eq!(
            u,
            CgroupUsage {
                cpu_usage_ns: 2_500_000,
                nr_periods: 10,
                nr_throttled: 4,
                throttled_ns: 700_000,
                memory_current_bytes: 1234,
                memory_peak_bytes: Some(5678),
            }
        );
        assert_eq!(cg.layout.list_children("peervm"), vec!["peervm-abc".to_string()]);
        cg.destroy().await.unwrap();
        assert!(!dir.exists());
        cg.destroy().await.unwrap();
    }

    /// Under a delegated subtree (cgroup_placement.rs) the controllers are enabled from the
    /// subtree down, and nothing above it (the hierarchy's root, systemd's slices) is
    /// written: systemd owns those.
    #[test]
    fn v2_under_a_delegated_subtree_writes_nothing_above_it() {
        let mount = tempfile::tempdir().unwrap();
        let m = mount.path();
        let svc = m.join("system.slice/peervm-vmm.service");
        fs::create_dir_all(svc.join(crate::cgroup_placement::SUPERVISOR_LEAF)).unwrap();
        fs::write(m.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        fs::write(svc.join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        let placement = Placement::decide(Some("/system.slice/peervm-vmm.service/supervisor"), |c| {
            c == "system.slice/peervm-vmm.service"
        });
        let layout = CgroupLayout::V2 { root: placement.root(m) };
        fs::create_dir(svc.join("peervm")).unwrap();
        fs::write(svc.join("peervm/cgroup.controllers"), "cpu memory pids\n").unwrap();
        let cg = LeaseCgroup::new(layout, "peervm", "peervm-abc");
        let limits =
            CgroupLimits { cpu_quota_us: None, cpu_period_us: CPU_PERIOD_US, memory_max_bytes: 1 << 30, pids_max: 64 };
        cg.create(&limits).unwrap();
        assert_eq!(cg.dirs(), vec![svc.join("peervm/peervm-abc")]);
        assert_eq!(fs::read_to_string(svc.join("cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert!(!m.join("cgroup.subtree_control").exists(), "the hierarchy's root was written");
        assert!(!m.join("system.slice/cgroup.subtree_control").exists(), "systemd's slice was written");
        assert_eq!(fs::read_to_string(svc.join("peervm/peervm-abc/memory.max")).unwrap(), (1u64 << 30).to_string());
    }

    /// A directory that never goes away is reported after the bounded number of
    /// attempts, naming it (the path is a plain file here: rmdir fails every time).
    #[tokio::test]
    async fn destroy_gives_up_after_its_attempts() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("peervm")).unwrap();
        fs::write(root.path().join("peervm/peervm-abc"), "").unwrap();
        let cg = LeaseCgroup::new(CgroupLayout::V2 { root: root.path().to_path_buf() }, "peervm", "peervm-abc");
        let err = cg.destroy_with(3, Duration::from_millis(1)).await.unwrap_err().to_string();
        assert!(err.contains("peervm/peervm-abc") && err.contains("cannot remove"), "{err}");
    }

    #[test]
    fn v2_refuses_a_parent_without_controllers() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("cgroup.controllers"), "hugetlb\n").unwrap();
        let cg = LeaseCgroup::new(CgroupLayout::V2 { root: root.path().to_path_buf() }, "peervm", "peervm-abc");
        let limits =
            CgroupLimits { cpu_quota_us: None, cpu_period_us: CPU_PERIOD_US, memory_max_bytes: 1, pids_max: 1 };
        let err = cg.create(&limits).unwrap_err().to_string();
        assert!(err.contains("not available"), "{err}");
    }

    #[test]
    fn quota_rounding() {
        assert_eq!(CgroupLimits::quota_for_cores(2.0), 200_000);
        assert_eq!(CgroupLimits::quota_for_cores(0.25), 25_000);
        assert_eq!(CgroupLimits::quota_for_cores(0.001), 1000);
    }
}
