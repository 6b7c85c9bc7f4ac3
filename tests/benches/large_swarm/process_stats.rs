//! Figures of a process read from /proc, and the clock every process of the benchmark
//! shares. The coordinator reads its workers' figures from /proc/<pid>/ itself, so a
//! worker whose descriptor table is full can still be measured.

use std::time::{Duration, Instant};

/// Nanoseconds on CLOCK_MONOTONIC: one clock for every process on the machine, unlike
/// `Instant`, whose values cannot cross a process boundary.
pub fn mono_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// `at` (taken by a node in this process) on the shared clock.
pub fn mono_ns_of(at: Instant) -> u64 {
    let (now, now_ns) = (Instant::now(), mono_ns());
    now_ns.saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

/// Sets the open-file limit to `wanted` (soft and hard), or raises the soft limit to the
/// hard one; returns (soft, hard) afterwards. Child processes inherit the result.
pub fn set_nofile_limit(wanted: Option<u64>) -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid, writable rlimit for the duration of every call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        let target = match wanted {
            Some(w) => libc::rlimit { rlim_cur: w as libc::rlim_t, rlim_max: (w as libc::rlim_t).max(r.rlim_max) },
            None => libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max },
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &target) == 0 {
            r = target;
        }
    }
    (r.rlim_cur, r.rlim_max)
}

/// What one process uses, as read from /proc/<pid>/.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kib: u64,
    pub threads: u64,
    /// User plus system CPU time so far.
    pub cpu: Duration,
    pub fds: u64,
}

impl Usage {
    /// The figures of process `pid`; zeros where a file cannot be read (the process ended).
    pub fn of(pid: u32) -> Usage {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
        Usage { rss_kib: field("VmRSS:"), threads: field("Threads:"), cpu: cpu_time(pid), fds }
    }

    pub fn add(self, other: Usage) -> Usage {
        Usage {
            rss_kib: self.rss_kib + other.rss_kib,
            threads: self.threads + other.threads,
            cpu: self.cpu + other.cpu,
            fds: self.fds + other.fds,
        }
    }
}

/// utime + stime of /proc/<pid>/stat, in clock ticks converted to time.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name (field 2) may hold spaces; the fields after its closing ')' do not.
    let Some((_, rest)) = stat.rsplit_once(')') else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ") ".
    let ticks: u64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

/// The 1-minute load average of the machine.
pub fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}
