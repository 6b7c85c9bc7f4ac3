//! Boot benchmark (issue 4): time from `start(VmSpec)` to SSH-ready, side by side with a
//! bare `qemu-system-x86_64` boot of the same image (same kernel, initrd, overlay, seed
//! disk and machine options) with user-mode networking and a host port forward, timed to
//! the same readiness check (SSH key exchange with the provisioned host key). Also the
//! host memory per guest beyond its RAM: QEMU's RSS minus the RSS of the guest-RAM
//! mapping.
//!
//! Run as root, after scripts/install-deps and scripts/build-guest-image:
//!     cargo run -p peervm-vmm --example boot_bench -- [runs] [memory_mib]
//! Runs alternate (bare, vmm, bare, vmm...) so that both see the same host load.
//! Progress and a summary go to stderr; stdout gets one JSON object per figure (name,
//! value, unit), which `scripts/bench` collects.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peervm_vmm::readiness::{SshProbe, probe_ssh};
use peervm_vmm::seed::{SeedConfig, write_seed_disk};
use peervm_vmm::{
    Accel, AuthorizedKey, EgressPolicy, GuestImage, HostKeySeed, Hypervisor, LeaseId, NamePrefix, QemuHypervisor,
    QemuUser, VmSpec, VmmConfig,
};

const BARE_PORT: u16 = 47390;

fn image_dir() -> PathBuf {
    std::env::var_os("PEERVM_IMAGE_DIR").map(PathBuf::from).unwrap_or("/var/cache/peervm/images".into()).join("minimal")
}

fn authorized_key() -> AuthorizedKey {
    AuthorizedKey::from_ed25519(&HostKeySeed::random().public_raw(), "bench").expect("key")
}

/// RSS of the whole process and of its guest-RAM mapping, in KiB.
fn rss_split(pid: u32, memory_mib: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(v)) => size = v.parse().unwrap_or(0),
            (Some("Rss:"), Some(v)) => {
                let rss: u64 = v.parse().unwrap_or(0);
                total += rss;
                // the guest's RAM is one anonymous mapping of exactly its size
                if size == u64::from(memory_mib) * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    (total, guest)
}

struct Sample {
    ready: Duration,
    rss_kib: u64,
    guest_rss_kib: u64,
}

async fn bare_boot(image: &GuestImage, dir: &Path, memory_mib: u32) -> Sample {
    let host_key = HostKeySeed::random();
    let overlay = dir.join("bare-overlay.qcow2");
    let seed = dir.join("bare-seed.img");
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(&seed);
    let base = image.base_disk().display().to_string();
    let ok = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", &base, &overlay.display().to_string(), "1G"])
        .status()
        .expect("qemu-img");
    assert!(ok.success());
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let key = authorized_key();
    write_seed_disk(
        &seed,
        &SeedConfig {
            lease: LeaseId::random(),
            kind: image.seed_kind(),
            user: "bench",
            authorized_key: &key,
            host_key: &host_key,
            mac,
            guest_addr: Ipv4Addr::new(10, 99, 0, 2),
            prefix_len: 29,
            gateway: Ipv4Addr::new(10, 99, 0, 1),
            nameservers: &[],
        },
    )
    .expect("seed");
    let (machine, blk, net, rng) = match image.machine() {
        peervm_vmm::MachineKind::Microvm => {
            ("microvm,acpi=on", "virtio-blk-device", "virtio-net-device", "virtio-rng-device")
        }
        peervm_vmm::MachineKind::Q35 => ("q35", "virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci"),
    };
    let rom = if image.machine() == peervm_vmm::MachineKind::Q35 { ",romfile=" } else { "" };
    let peervm_vmm::Boot::Direct { kernel, initrd, cmdline } = image.boot() else {
        panic!("boot_bench measures direct kernel boot; image {} boots by firmware", image.name());
    };
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-accel", "tcg,tb-size=128", "-M", machine, "-smp", "1", "-m", &memory_mib.to_string()])
        .args(["-kernel", &kernel.display().to_string(), "-initrd", &initrd.display().to_string()])
        .args(["-append", cmdline])
        .args(["-drive", &format!("file={},if=none,id=disk0,format=qcow2,discard=unmap", overlay.display())])
        .args(["-device", &format!("{blk},drive=disk0")])
        .args(["-drive", &format!("file={},if=none,id=seed0,format=raw,readonly=on", seed.display())])
        .args(["-device", &format!("{blk},drive=seed0")])
        .args([
            "-netdev",
            &format!(
                "user,id=net0,restrict=on,net=10.99.0.0/29,host=10.99.0.1,hostfwd=tcp:127.0.0.1:{BARE_PORT}-10.99.0.2:22"
            ),
        ])
        .args(["-device", &format!("{net},netdev=net0,mac=52:54:00:12:34:56{rom}"), "-device", rng])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let expected = host_key.public_key();
    let target = SocketAddr::from(([127, 0, 0, 1], BARE_PORT));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // short attempts: slirp accepts at once and holds the connection while the
        // guest's network is still down, so a long attempt would only add latency
        match probe_ssh(target, &expected, Duration::from_secs(1)).await {
            SshProbe::Ready => break,
            SshProbe::WrongKey { presented } => panic!("bare guest presented {presented}"),
            SshProbe::NotYet(e) => assert!(Instant::now() < deadline, "bare guest not ready: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_kib, guest_rss_kib) = rss_split(child.id(), memory_mib);
    let _ = child.kill();
    let _ = child.wait();
    Sample { ready, rss_kib, guest_rss_kib }
}

async fn vmm_boot(hv: &QemuHypervisor, image: &Arc<GuestImage>, memory_mib: u32) -> Sample {
    let spec = VmSpec {
        lease_id: LeaseId::random(),
        vcpus: 1,
        memory_mib,
        disk_gib: 1,
        image: image.clone(),
        ssh_user: "bench".into(),
        authorized_key: authorized_key(),
        host_key: HostKeySeed::random(),
        network_slot: 0,
        egress: EgressPolicy::Deny,
        expose: Vec::new(),
        cpu_quota: None,
        progress: None,
    };
    let t = Instant::now();
    let vm = hv.start(spec.clone()).await.expect("start");
    let ready = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_kib, guest_rss_kib) = rss_split(vm.pid, memory_mib);
    let cg = hv.usage(spec.lease_id).await.expect("usage");
    eprintln!("  vmm cgroup memory.current {} MiB", cg.memory_current_bytes >> 20);
    hv.stop(spec.lease_id).await.expect("stop");
    Sample { ready, rss_kib, guest_rss_kib }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let memory_mib: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    QemuUser::ensure(peervm_vmm::DEFAULT_QEMU_USER).expect("QEMU user");
    let image = Arc::new(GuestImage::open(image_dir()).expect("image (run scripts/build-guest-image)"));
    let state = std::env::temp_dir().join(format!("peervm-bench-{}", std::process::id()));
    let mut config = VmmConfig::new(&state, Accel::Tcg);
    config.names = NamePrefix::new("pvbench", "pb").expect("names");
    config.address_pool = "10.215.0.0/24".parse().expect("pool");
    config.ssh_port_base = 47400;
    config.ssh_port_count = 16;
    let hv = QemuHypervisor::new(config).expect("backend");
    let _ = hv.reconcile(&[]).await;
    let scratch = state.join("bare");
    std::fs::create_dir_all(&scratch).expect("scratch dir");

    eprintln!("boot_bench: {runs} runs each, 1 vCPU, {memory_mib} MiB, TCG, image {}", image.name());
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let b = bare_boot(&image, &scratch, memory_mib).await;
        let v = vmm_boot(&hv, &image, memory_mib).await;
        eprintln!(
            "run {i}: bare {:>6.0} ms  vmm {:>6.0} ms | RSS beyond guest RAM: bare {:>4} MiB, vmm {:>4} MiB \
             (guest RAM touched: {} / {} MiB)",
            b.ready.as_secs_f64() * 1e3,
            v.ready.as_secs_f64() * 1e3,
            (b.rss_kib - b.guest_rss_kib) / 1024,
            (v.rss_kib - v.guest_rss_kib) / 1024,
            b.guest_rss_kib / 1024,
            v.guest_rss_kib / 1024,
        );
        bare.push(b);
        ours.push(v);
    }
    let mb = median(bare.iter().map(|s| s.ready.as_secs_f64() * 1e3).collect());
    let mv = median(ours.iter().map(|s| s.ready.as_secs_f64() * 1e3).collect());
    let over_b = median(bare.iter().map(|s| (s.rss_kib - s.guest_rss_kib) as f64 / 1024.0).collect());
    let over_v = median(ours.iter().map(|s| (s.rss_kib - s.guest_rss_kib) as f64 / 1024.0).collect());
    let overhead = mv - mb;
    let budget = (mb * 0.15).max(500.0);
    eprintln!("median ready: bare {mb:.0} ms, vmm start() {mv:.0} ms, ratio {:.3}", mv / mb);
    eprintln!(
        "overhead {overhead:.0} ms against a budget of {budget:.0} ms (max of 15% and 500 ms): {}",
        if overhead <= budget { "within target" } else { "OVER target" }
    );
    eprintln!("median QEMU RSS beyond guest RAM: bare {over_b:.0} MiB, vmm {over_v:.0} MiB");
    let figures = [
        ("boot_bare_qemu_to_ssh_ready_median", mb, "ms"),
        ("boot_vmm_start_to_ssh_ready_median", mv, "ms"),
        ("boot_vmm_overhead_ratio", mv / mb, "ratio"),
        ("boot_vmm_overhead", overhead, "ms"),
        ("boot_qemu_rss_beyond_guest_ram_bare_median", over_b, "MiB"),
        ("boot_qemu_rss_beyond_guest_ram_vmm_median", over_v, "MiB"),
        ("boot_runs", runs as f64, "runs"),
    ];
    for (name, value, unit) in figures {
        println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
    }
    let _ = std::fs::remove_dir_all(&state);
}
