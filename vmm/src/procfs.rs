//! What the kernel says in /proc: processes (pids, start times, command lines), this
//! process's mount table, the CPU's clock rate, available memory, and sysctls.
//!
//! One reader per file, each with its parser split out and unit-tested on fixed text.
//! Public so that the node reads the same files the same way (e.g. the provider's
//! memory check).

use std::fs;
use std::io;

/// This process's mount table (the cgroup layout is detected from it).
pub const SELF_MOUNTINFO: &str = "/proc/self/mountinfo";

/// The ids of every process visible in /proc.
pub fn pids() -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())).collect()
}

/// Start time (clock ticks since boot) of a live process; `None` when it is gone or a
/// zombie (a zombie runs nothing). With the pid it names one process for good: a pid
/// the kernel recycles gets another start time.
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    parse_start_ticks(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command line of a process, split at NULs.
pub fn process_cmdline(pid: i32) -> Option<Vec<String>> {
    Some(parse_cmdline(&fs::read(format!("/proc/{pid}/cmdline")).ok()?))
}

/// The mount table of this process.
/// /proc/<pid>/cgroup: the process's cgroup in each hierarchy.
pub fn process_cgroups(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()
}

pub fn self_mountinfo() -> io::Result<String> {
    fs::read_to_string(SELF_MOUNTINFO)
}

/// The first CPU's clock rate in MHz (`cpu MHz` of /proc/cpuinfo).
pub fn cpu_mhz() -> Option<f64> {
    parse_cpu_mhz(&fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// `MemAvailable` of /proc/meminfo, in MiB.
pub fn mem_available_mib() -> Option<u64> {
    parse_mem_available_kib(&fs::read_to_string("/proc/meminfo").ok()?).map(|kib| kib / 1024)
}

/// The path of a sysctl, e.g. `net/ipv4/ip_local_port_range`.
pub fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{name}")
}

/// Reads a sysctl, e.g. `net/ipv4/ip_local_port_range`.
pub fn read_sysctl(name: &str) -> io::Result<String> {
    fs::read_to_string(sysctl_path(name))
}

/// Sets a sysctl, e.g. `net/ipv4/conf/<interface>/forwarding`.
pub fn write_sysctl(name: &str, value: &str) -> io::Result<()> {
    fs::write(sysctl_path(name), value)
}

fn parse_start_ticks(stat: &str) -> Option<u64> {
    // fields after the parenthesised command name, which may itself contain spaces and
    // parentheses: the last ')' ends it
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    // field 22 of stat(5), the 20th after the state
    fields.get(19)?.parse().ok()
}

fn parse_cmdline(raw: &[u8]) -> Vec<String> {
    raw.split(|b| *b == 0).filter(|s| !s.is_empty()).map(|s| String::from_utf8_lossy(s).into_owned()).collect()
}

fn parse_cpu_mhz(cpuinfo: &str) -> Option<f64> {
    cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?.split(':').nth(1)?.trim().parse().ok()
}

fn parse_mem_available_kib(meminfo: &str) -> Option<u64> {
    meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_survives_odd_command_names_and_zombies_have_none() {
        let stat = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 900 0 0 0 12 5 0 0 20 0 3 0 987654 1000 100";
        assert_eq!(parse_start_ticks(stat), Some(987654));
        let zombie = "4242 (qemu) Z 1 4242 4242 0 -1 4194560 900 0 0 0 12 5 0 0 20 0 3 0 987654 0 0";
        assert_eq!(parse_start_ticks(zombie), None);
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn cmdline_splits_at_nuls() {
        assert_eq!(
            parse_cmdline(b"qemu\0-name\0guest=a,debug-threads=on\0"),
            ["qemu", "-name", "guest=a,debug-threads=on"]
        );
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn cpuinfo_and_meminfo_fields() {
        assert_eq!(parse_cpu_mhz("processor\t: 0\ncpu MHz\t\t: 2999.998\ncache size\t: 1 KB\n"), Some(2999.998));
        assert_eq!(parse_cpu_mhz("processor\t: 0\n"), None);
        assert_eq!(parse_mem_available_kib("MemTotal:  8000 kB\nMemAvailable:    2048000 kB\n"), Some(2048000));
        assert_eq!(parse_mem_available_kib("MemTotal:  8000 kB\n"), None);
    }

    #[test]
    fn this_process_is_visible() {
        let me = std::process::id() as i32;
        assert!(pids().contains(&me));
        assert!(process_start_ticks(me).is_some());
        assert!(process_cmdline(me).is_some_and(|a| !a.is_empty()));
        assert!(self_mountinfo().is_ok_and(|m| !m.is_empty()));
        assert_eq!(sysctl_path("net/ipv4/ip_forward"), "/proc/sys/net/ipv4/ip_forward");
    }
}
