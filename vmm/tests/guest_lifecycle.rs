//! One real guest under TCG, shared by several checks (each TCG boot costs seconds of a
//! 2-core box): SSH with the lease's key, what the guest sees, refused logins, the host
//! key, the cgroup's limits, the CPU quota holding a burner, usage counters, and a
//! teardown that leaves nothing behind. Once per backend: QEMU run by vmm, and QEMU run
//! by libvirtd (docs/vmm.md "The libvirt backend").

mod guest_harness;

use std::time::{Duration, Instant};

use guest_harness::{DEFAULT_SITE, Kind, Ssh, TestState, guest_env, leftovers, login, random_key, serial, spec};
use peervm_vmm::{EgressPolicy, GuestState, Hypervisor, QemuHypervisor};

const VCPUS: u32 = 2;
const MEMORY_MIB: u32 = 256;

#[ignore = "needs root: boots a guest"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ssh_resources_auth_cpu_quota_and_teardown() {
    lifecycle(Kind::Qemu).await;
}

#[ignore = "needs root: boots a guest under libvirtd"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ssh_resources_auth_cpu_quota_and_teardown_under_libvirt() {
    lifecycle(Kind::Libvirt).await;
}

async fn lifecycle(kind: Kind) {
    guest_env();
    kind.require();
    let _serial = serial().await;
    let state = TestState::for_backend(DEFAULT_SITE, kind);
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let (spec, key) = spec(3, VCPUS, MEMORY_MIB, EgressPolicy::Deny);
    let lease = spec.lease_id;
    let host_key = spec.host_key.public_key();
    let user = spec.ssh_user.clone();

    let t = Instant::now();
    let vm = hv.start(spec.clone()).await.expect("guest start");
    eprintln!("guest ready in {:?} (boot_time {:?}), ssh at {}", t.elapsed(), vm.boot_time, vm.ssh_addr);
    assert_eq!(vm.ssh_addr.port(), guest_harness::PORT_BASE + 3);
    assert_eq!(vm.host_key, spec.host_key.public_openssh());

    // -- SSH with the authorized key: command, exit code, output ---------------------
    let ssh = login(vm.ssh_addr, &host_key, &user, &key).await;
    let (code, out) = ssh.exec("echo hello from $(hostname); exit 3", Duration::from_secs(30)).await.unwrap();
    assert_eq!(code, 3, "exit code of the command");
    assert_eq!(out.trim(), format!("hello from peervm-{}", lease.short_hex(8)));
    let (code, out) = ssh.exec("id -u; nproc; grep MemTotal /proc/meminfo", Duration::from_secs(30)).await.unwrap();
    assert_eq!(code, 0);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "the lease user has full control of its guest");
    assert_eq!(lines[1], VCPUS.to_string(), "guest sees the requested vCPUs");
    let mem_kib: u64 = lines[2].split_whitespace().nth(1).unwrap().parse().unwrap();
    let mem_mib = mem_kib / 1024;
    assert!(
        mem_mib <= u64::from(MEMORY_MIB) && mem_mib + 64 >= u64::from(MEMORY_MIB),
        "guest sees {mem_mib} MiB, requested {MEMORY_MIB}"
    );
    let (_, df) = ssh.exec("df -k /data | tail -1", Duration::from_secs(30)).await.unwrap();
    let data_kib: u64 = df.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
    assert!(data_kib > 900 * 1024 && data_kib <= 1024 * 1024, "data disk is the leased 1 GiB: {df}");

    // -- the console log keeps the boot and stops there: a guest writing to its serial
    //    port cannot fill the provider's disk ---------------------------------------
    let (code, _) = ssh.exec("echo PEERVM-CONSOLE-MARKER > /dev/ttyS0", Duration::from_secs(30)).await.unwrap();
    assert_eq!(code, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let console = std::fs::read_to_string(hv.lease_dir(lease).join("console.log")).unwrap();
    assert!(console.contains("peervm-guest: sshd started"), "boot log missing: {console}");
    match kind {
        Kind::Qemu => assert!(!console.contains("PEERVM-CONSOLE-MARKER"), "console still logged after boot"),
        // virtlogd keeps logging, rotated at its size limit (docs/vmm.md "The libvirt backend")
        Kind::Libvirt => {}
    }

    // -- the presented host key is the provisioned one; other logins are refused ------
    let mut s = Ssh::connect(vm.ssh_addr, None).await.unwrap();
    assert_eq!(s.host_key.key_data(), host_key.key_data(), "host key differs from the provisioned one");
    assert!(!s.login_password(&user, "").await.unwrap(), "empty password accepted");
    assert!(!s.login_password(&user, "lessee").await.unwrap(), "password accepted");
    assert!(!s.login_password("root", "root").await.unwrap(), "root password accepted");
    let mut s = Ssh::connect(vm.ssh_addr, Some(&host_key)).await.unwrap();
    assert!(!s.login_key(&user, &random_key()).await.unwrap(), "a key that is not the lease's was accepted");
    assert!(!s.login_key("root", &random_key()).await.unwrap(), "another key accepted for root");

    // -- the cgroup carries the requested limits, and QEMU is in it --------------------
    let cg = hv.cgroup(lease).unwrap();
    let limits = cg.read_limits().unwrap();
    assert_eq!(limits.cpu_quota_us, Some(u64::from(VCPUS) * limits.cpu_period_us), "CPU quota = vCPUs");
    let overhead = u64::from(hv.config().memory_overhead_mib);
    assert_eq!(limits.memory_max_bytes, (u64::from(MEMORY_MIB) + overhead) << 20);
    assert_eq!(limits.pids_max, u64::from(hv.config().pids_base + VCPUS));
    assert!(cg.procs().contains(&(vm.pid as i32)), "QEMU is not in the lease cgroup");
    let qemu_uid = std::fs::read_to_string(format!("/proc/{}/status", vm.pid))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .unwrap();
    assert_ne!(qemu_uid, "0", "QEMU runs as root");

    // -- lease files are private, and no secret is on QEMU's command line -------------
    use std::os::unix::fs::PermissionsExt;
    let dir = hv.lease_dir(lease);
    // libvirt's QEMU opens overlay and seed by path: its user may traverse the directory
    let dir_mode = if kind == Kind::Libvirt { 0o710 } else { 0o700 };
    assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, dir_mode);
    for f in ["lease.json", "overlay.qcow2", "seed.img", "console.log"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{f} has mode {mode:o}");
    }
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid)).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
    // the host key travels only inside the seed disk, which QEMU gets as a descriptor
    // (libvirt names the lease's files on the command line: QEMU opens them by path)
    let secrets: &[&str] = match kind {
        Kind::Qemu => &["PRIVATE KEY", "ssh_keys", "seed.img", "overlay.qcow2", dir.to_str().unwrap()],
        Kind::Libvirt => &["PRIVATE KEY", "ssh_keys"],
    };
    for secret in secrets {
        assert!(!cmdline.contains(secret), "QEMU's command line shows {secret:?}: {cmdline}");
    }
    assert!(cmdline.contains("-sandbox on") && cmdline.contains("-nodefaults"), "{cmdline}");
    // the seed disk is read-only inside the guest
    let (code, _) = ssh
        .exec(
            "ls /sys/block/*/ro >/dev/null && grep -l 1 /sys/block/vd*/ro | wc -l | grep -qx 1",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(code, 0, "exactly one read-only disk (the seed) in the guest");

    // -- CPU quota: a burner is held to a fractional quota, and is not throttled without it.
    // Verdicts come from the kernel's own counters, not from how much CPU this machine
    // has to spare (docs/testing.md, "Verdicts from counts and events"): under the quota
    // the cgroup is throttled and never uses more than the quota (an upper bound a
    // loaded machine cannot break); without it, the burner burns a full CPU-second with
    // no throttled period at all.
    let quota = 0.25;
    let burn = "timeout 600 sh -c 'while :; do :; done'; true";
    let burner = {
        let ssh = login(vm.ssh_addr, &host_key, &user, &key).await;
        tokio::spawn(async move {
            let _ = ssh.exec(burn, Duration::from_secs(660)).await;
        })
    };
    hv.set_cpu_quota(lease, Some(quota)).unwrap();
    let throttled_from = cg.usage().unwrap().nr_throttled;
    wait_for_usage(&cg, "the cgroup throttled under the quota", |u| u.nr_throttled > throttled_from).await;
    let limited = measure(&cg, Duration::from_secs(6)).await;
    assert!(limited.cores <= quota * 1.15 + 0.02, "quota {quota} not held: used {:.3} cores", limited.cores);
    assert!(limited.throttled_periods > 0, "no throttling recorded under the quota");

    hv.set_cpu_quota(lease, None).unwrap();
    let before = cg.usage().unwrap();
    let after = wait_for_usage(&cg, "a CPU-second burned without the quota", |u| {
        u.cpu_usage_ns >= before.cpu_usage_ns + 1_000_000_000
    })
    .await;
    burner.abort();
    eprintln!(
        "cpu: quota {quota} -> {limited:?}; without it {} throttled periods",
        after.nr_throttled - before.nr_throttled
    );
    assert_eq!(after.nr_throttled, before.nr_throttled, "throttled without a quota");
    hv.set_cpu_quota(lease, Some(f64::from(VCPUS))).unwrap();

    // -- status and usage --------------------------------------------------------------
    let st = hv.status(lease).await.unwrap();
    assert_eq!(st.state, GuestState::Running);
    let usage = hv.usage(lease).await.unwrap();
    eprintln!("usage: {usage:?}");
    assert!(usage.cpu_time > Duration::from_secs(1));
    assert!(usage.memory_current_bytes > u64::from(MEMORY_MIB / 4) << 20);
    assert!(usage.ssh_bytes_in > 0 && usage.ssh_bytes_out > 0 && usage.ssh_connections >= 5);

    // -- teardown: ACPI power-off, then nothing of the lease is left ------------------
    drop(ssh);
    let t = Instant::now();
    hv.stop(lease).await.unwrap();
    eprintln!("stopped in {:?}", t.elapsed());
    let left = leftovers(Some(&lease), state.path(), Some(vm.ssh_addr.port()));
    assert!(left.is_empty(), "left behind after stop: {left:#?}");
    assert!(hv.status(lease).await.is_err());
}

#[derive(Debug)]
struct CpuWindow {
    cores: f64,
    throttled_periods: u64,
}

/// Polls the lease cgroup's counters until `done` holds (a hang guard of 5 minutes, not
/// a verdict); returns the counters that satisfied it.
async fn wait_for_usage(
    cg: &peervm_vmm::LeaseCgroup,
    what: &str,
    done: impl Fn(&peervm_vmm::CgroupUsage) -> bool,
) -> peervm_vmm::CgroupUsage {
    let start = Instant::now();
    loop {
        let u = cg.usage().unwrap();
        if done(&u) {
            return u;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{what}: never happened; last counters {u:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// CPU used by the lease's cgroup over `window`, in cores.
async fn measure(cg: &peervm_vmm::LeaseCgroup, window: Duration) -> CpuWindow {
    let a = cg.usage().unwrap();
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let b = cg.usage().unwrap();
    let secs = t.elapsed().as_secs_f64();
    CpuWindow {
        cores: (b.cpu_usage_ns - a.cpu_usage_ns) as f64 / 1e9 / secs,
        throttled_periods: b.nr_throttled - a.nr_throttled,
    }
}
