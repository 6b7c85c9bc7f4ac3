//! Boot benchmark (issues 4 and 18): time from `start(VmSpec)` to SSH-ready, side by side
//! with a bare `qemu-system-x86_64` boot of the same image (same kernel, initrd, overlay,
//! seed disk, machine options and TCG translation-buffer size) with user-mode networking
//! and a host port forward, timed to the same readiness check (SSH key exchange with the
//! provisioned host key). Also the host memory per guest beyond its RAM, from QEMU's
//! smaps and status: resident (RSS), and what one more guest adds, its anonymous pages
//! outside the guest-RAM mapping plus its page tables (QEMU's binary, its libraries and
//! the initrd are page cache, paid once per host), of which TCG's translation buffer
//! (what a KVM guest would not have); docs/vmm.md "Host memory per guest".
//!
//! Run as root, after scripts/install-deps and scripts/build-guest-image:
//!     cargo run -p peervm-vmm --example boot_bench -- [runs] [memory_mib] [tb,tb...]
//! Runs alternate (bare, vmm, bare, vmm...) so that both see the same host load; each
//! translation-buffer size given as the third argument boots in every run too, on a
//! backend of its own. PEERVM_BENCH_IMAGE picks another image of PEERVM_IMAGE_DIR (default:
//! minimal, in /var/cache/peervm/images): a directory with manifest.json, or a stock
//! image's directory holding one `NAME.qcow2` (`debian-12-stock`, booted by firmware as a
//! provider boots an operator's stock image; PEERVM_BENCH_FIRMWARE=uefi for OVMF, default
//! bios). PEERVM_BENCH_BARE=0 leaves out the bare QEMU boots (only the backend's, and
//! each translation-buffer size's, are timed).
//! Progress and a summary go to stderr; stdout gets one JSON object per figure (name,
//! value, unit), which `scripts/bench` collects.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peervm_vmm::firmware::{OVMF_CODE, OVMF_VARS};
use peervm_vmm::readiness::{SshProbe, probe_ssh};
use peervm_vmm::seed::{SeedConfig, write_seed_disk};
use peervm_vmm::{
    Accel, AuthorizedKey, Boot, DiskFormat, EgressPolicy, Firmware, GuestImage, HostKeySeed, Hypervisor, LeaseId,
    NamePrefix, QemuHypervisor, QemuUser, StockImage, VmSpec, VmmConfig,
};
use sha2::{Digest, Sha256};

const BARE_PORT: u16 = 47390;

fn image_dir() -> PathBuf {
    let name = std::env::var("PEERVM_BENCH_IMAGE").unwrap_or_else(|_| "minimal".into());
    std::env::var_os("PEERVM_IMAGE_DIR").map(PathBuf::from).unwrap_or("/var/cache/peervm/images".into()).join(name)
}

/// The image to boot: an image directory (manifest.json), or a stock image's directory
/// with its one disk file, opened as provider.toml's `[[images]]` with `file` would be
/// (docs/guest-image.md "Operators' stock images").
fn open_image() -> GuestImage {
    let dir = image_dir();
    if dir.join("manifest.json").is_file() {
        return GuestImage::open(&dir).expect("image (run scripts/build-guest-image)");
    }
    let name = dir.file_name().and_then(|n| n.to_str()).expect("image name").to_string();
    let file = dir.join(format!("{name}.qcow2"));
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(&file).expect("stock image file"), &mut hasher).expect("hash");
    let firmware = std::env::var("PEERVM_BENCH_FIRMWARE")
        .map(|f| Firmware::parse(&f).expect("PEERVM_BENCH_FIRMWARE: bios or uefi"))
        .unwrap_or(Firmware::Bios);
    GuestImage::open_stock(&StockImage {
        name,
        file,
        sha256: hasher.finalize().into(),
        format: DiskFormat::Qcow2,
        firmware,
        login_user: "peervm".into(),
        boot_deadline: Duration::from_secs(480),
    })
    .expect("stock image")
}

fn authorized_key() -> AuthorizedKey {
    AuthorizedKey::from_ed25519(&HostKeySeed::random().public_raw(), "bench").expect("key")
}

/// A QEMU process's memory, in KiB, from /proc/PID/smaps and /proc/PID/status.
#[derive(Clone, Copy, Default)]
struct Mem {
    /// Resident, whole process (shared library pages included).
    rss: u64,
    /// Resident in the guest-RAM mapping.
    guest_rss: u64,
    /// Private to this process (Private_Clean + Private_Dirty). Read with care: a file
    /// page mapped by this process alone counts as private, so QEMU's binary, its
    /// libraries and the image's initrd count here when no other QEMU runs, and not
    /// when one does (they are page cache, paid once per host).
    private: u64,
    guest_private: u64,
    /// Anonymous pages (the `Anonymous:` fields): memory no other process or the page
    /// cache shares, what one more guest adds to the host whatever else runs.
    anon: u64,
    guest_anon: u64,
    /// Anonymous pages of TCG's translation buffer (the anonymous executable mappings):
    /// what a KVM guest would not have.
    tcg_anon: u64,
    /// QEMU's page tables (`VmPTE`): per guest too, and not in smaps.
    page_tables: u64,
}

impl Mem {
    fn rss_beyond_ram(&self) -> f64 {
        (self.rss - self.guest_rss) as f64 / 1024.0
    }
    fn private_beyond_ram(&self) -> f64 {
        (self.private - self.guest_private) as f64 / 1024.0
    }
    /// The issue 18 figure: host memory one more guest adds beyond its RAM.
    fn beyond_ram(&self) -> f64 {
        (self.anon - self.guest_anon + self.page_tables) as f64 / 1024.0
    }
    fn tcg(&self) -> f64 {
        self.tcg_anon as f64 / 1024.0
    }
    fn beyond_ram_without_tcg(&self) -> f64 {
        self.beyond_ram() - self.tcg()
    }
}

fn memory_split(pid: u32, memory_mib: u32) -> Mem {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut m = Mem::default();
    // one mapping at a time: its header line, then its fields, VmFlags last
    let (mut size, mut rss, mut private, mut anon_pages, mut anon) = (0, 0, 0, 0, false);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let (Some(key), value) = (f.next(), f.next()) else { continue };
        let v: u64 = value.and_then(|v| v.parse().ok()).unwrap_or(0);
        match key {
            "Size:" => size = v,
            "Rss:" => rss = v,
            "Private_Clean:" => private = v,
            "Private_Dirty:" => private += v,
            "Anonymous:" => anon_pages = v,
            "VmFlags:" => {
                m.rss += rss;
                m.private += private;
                m.anon += anon_pages;
                // the guest's RAM is one anonymous mapping of exactly its size
                if size == u64::from(memory_mib) * 1024 {
                    m.guest_rss += rss;
                    m.guest_private += private;
                    m.guest_anon += anon_pages;
                } else if anon && line.split_whitespace().any(|fl| fl == "ex") {
                    m.tcg_anon += anon_pages;
                }
            }
            // a mapping's header: address range, perms, offset, dev, inode, [path]
            k if k.contains('-') && k.chars().all(|c| c.is_ascii_hexdigit() || c == '-') => {
                anon = line.split_whitespace().nth(5).is_none();
            }
            _ => {}
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    m.page_tables = status
        .lines()
        .find_map(|l| l.strip_prefix("VmPTE:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    m
}

struct Sample {
    ready: Duration,
    mem: Mem,
}

async fn bare_boot(image: &GuestImage, dir: &Path, memory_mib: u32, tb_size_mib: u32) -> Sample {
    let host_key = HostKeySeed::random();
    let overlay = dir.join("bare-overlay.qcow2");
    let seed = dir.join("bare-seed.img");
    let _ = std::fs::remove_file(&overlay);
    let _ = std::fs::remove_file(&seed);
    let base = image.base_disk().display().to_string();
    let size = format!("{}G", image.min_disk_bytes().div_ceil(1 << 30).max(1));
    let ok = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            image.disk_format().as_str(),
            "-b",
            &base,
            &overlay.display().to_string(),
            &size,
        ])
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
            user: image.login_user().unwrap_or("bench"),
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
    let machine = image.machine().qemu_machine();
    let (blk, net, rng) = match image.machine() {
        peervm_vmm::MachineKind::Microvm => ("virtio-blk-device", "virtio-net-device", "virtio-rng-device"),
        peervm_vmm::MachineKind::Q35 => ("virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci"),
    };
    let rom = if image.machine() == peervm_vmm::MachineKind::Q35 { ",romfile=" } else { "" };
    // how it boots, as the backend's command line (vmm/src/qemu/command_line.rs)
    let (mut boot, mut bootindex) = (Vec::<String>::new(), "");
    match image.boot() {
        Boot::Direct { kernel, initrd, cmdline } => {
            let (k, i) = (kernel.display().to_string(), initrd.display().to_string());
            boot.extend(["-kernel".into(), k, "-initrd".into(), i, "-append".into(), cmdline.clone()]);
        }
        Boot::Firmware(Firmware::Bios) => bootindex = ",bootindex=0",
        Boot::Firmware(Firmware::Uefi) => {
            bootindex = ",bootindex=0";
            let vars = dir.join("bare-vars.fd");
            std::fs::copy(OVMF_VARS, &vars).expect("OVMF variable store");
            boot.extend(["-drive".into(), format!("if=pflash,unit=0,format=raw,readonly=on,file={OVMF_CODE}")]);
            boot.extend(["-drive".into(), format!("if=pflash,unit=1,format=raw,file={}", vars.display())]);
        }
    }
    let t = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-accel", &format!("tcg,tb-size={tb_size_mib}"), "-M", machine, "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
        .args(&boot)
        .args(["-drive", &format!("file={},if=none,id=disk0,format=qcow2,discard=unmap", overlay.display())])
        .args(["-device", &format!("{blk},drive=disk0{bootindex}")])
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
    let mem = memory_split(child.id(), memory_mib);
    let _ = child.kill();
    let _ = child.wait();
    Sample { ready, mem }
}

async fn vmm_boot(hv: &QemuHypervisor, image: &Arc<GuestImage>, memory_mib: u32) -> Sample {
    let spec = VmSpec {
        lease_id: LeaseId::random(),
        vcpus: 1,
        memory_mib,
        // the image's root file system needs at least its own size (debian-12)
        disk_gib: image.min_disk_bytes().div_ceil(1 << 30).max(1) as u32,
        image: image.clone(),
        ssh_user: image.login_user().unwrap_or("bench").into(),
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
    let mem = memory_split(vm.pid, memory_mib);
    let cg = hv.usage(spec.lease_id).await.expect("usage");
    eprintln!("  vmm cgroup memory.current {} MiB", cg.memory_current_bytes >> 20);
    hv.stop(spec.lease_id).await.expect("stop");
    Sample { ready, mem }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

/// A backend of its own (names, pool and ports apart from the others') whose TCG
/// translation buffer is `tb_size_mib` (`None`: the image's, else the default).
async fn backend(state: &Path, index: u16, tb_size_mib: Option<u32>) -> QemuHypervisor {
    let mut config = VmmConfig::new(state.join(format!("vmm{index}")), Accel::Tcg);
    let short = format!("b{}", char::from(b'a' + index as u8));
    config.names = NamePrefix::new(&format!("pvbench{index}"), &short).expect("names");
    config.address_pool = format!("10.216.{index}.0/24").parse().expect("pool");
    config.ssh_port_base = 47400 + 16 * index;
    config.ssh_port_count = 16;
    config.tcg_tb_size_mib = tb_size_mib;
    let hv = QemuHypervisor::new(config).expect("backend");
    let _ = hv.reconcile(&[]).await;
    hv
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let memory_mib: u32 = args.next().and_then(|s| s.parse().ok()).unwrap_or(256);
    // other translation-buffer sizes to boot side by side with the default, e.g. "128,16"
    let candidates: Vec<u32> =
        args.next().map(|s| s.split(',').filter_map(|t| t.parse().ok()).collect()).unwrap_or_default();
    QemuUser::ensure(peervm_vmm::DEFAULT_QEMU_USER).expect("QEMU user");
    let image = Arc::new(open_image());
    let with_bare = std::env::var("PEERVM_BENCH_BARE").map_or(true, |v| v != "0");
    let state = std::env::temp_dir().join(format!("peervm-bench-{}", std::process::id()));
    let hv = backend(&state, 0, None).await;
    // the image's own size when its manifest gives one, as a provider's guests get it
    let tb = hv.config().tcg_tb_size_for(&image);
    let mut others = Vec::new();
    for (i, c) in candidates.iter().enumerate() {
        others.push((*c, backend(&state, 1 + i as u16, Some(*c)).await, Vec::new()));
    }
    let scratch = state.join("bare");
    std::fs::create_dir_all(&scratch).expect("scratch dir");

    eprintln!(
        "boot_bench: {runs} runs each, 1 vCPU, {memory_mib} MiB, TCG (tb-size {tb} MiB; also {candidates:?}), image {} \
         ({:?})",
        image.name(),
        image.boot(),
    );
    let (mut bare, mut ours) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let b = if with_bare { Some(bare_boot(&image, &scratch, memory_mib, tb).await) } else { None };
        let v = vmm_boot(&hv, &image, memory_mib).await;
        let bare_text = b.as_ref().map_or(String::new(), |b| {
            format!(
                "bare {:>6.0} ms (RSS beyond guest RAM {:.0} MiB, guest RAM touched {} MiB)  ",
                b.ready.as_secs_f64() * 1e3,
                b.mem.rss_beyond_ram(),
                b.mem.guest_rss / 1024
            )
        });
        eprintln!(
            "run {i}: {bare_text}vmm {:>6.0} ms | beyond guest RAM: RSS {:.0} MiB; {:.1} MiB (anonymous + page \
             tables), of which TCG buffer {:.1} MiB; private {:.0} MiB (guest RAM touched: {} MiB)",
            v.ready.as_secs_f64() * 1e3,
            v.mem.rss_beyond_ram(),
            v.mem.beyond_ram(),
            v.mem.tcg(),
            v.mem.private_beyond_ram(),
            v.mem.guest_rss / 1024,
        );
        for (c, backend, samples) in &mut others {
            let s = vmm_boot(backend, &image, memory_mib).await;
            eprintln!(
                "       vmm tb-size {c}: {:>6.0} ms | beyond guest RAM {:.1} MiB, of which TCG buffer {:.1} MiB",
                s.ready.as_secs_f64() * 1e3,
                s.mem.beyond_ram(),
                s.mem.tcg(),
            );
            samples.push(s);
        }
        bare.extend(b);
        ours.push(v);
    }
    let ready = |v: &[Sample]| median(v.iter().map(|s| s.ready.as_secs_f64() * 1e3).collect());
    let mem = |v: &[Sample], f: fn(&Mem) -> f64| median(v.iter().map(|s| f(&s.mem)).collect());
    let mv = ready(&ours);
    if !bare.is_empty() {
        let mb = ready(&bare);
        let overhead = mv - mb;
        let budget = (mb * 0.15).max(500.0);
        eprintln!("median ready: bare {mb:.0} ms, vmm start() {mv:.0} ms, ratio {:.3}", mv / mb);
        eprintln!(
            "overhead {overhead:.0} ms against a budget of {budget:.0} ms (max of 15% and 500 ms): {}",
            if overhead <= budget { "within target" } else { "OVER target" }
        );
        eprintln!("median RSS beyond guest RAM, bare: {:.0} MiB", mem(&bare, Mem::rss_beyond_ram));
        figure("boot_bare_qemu_to_ssh_ready_median", mb, "ms");
        figure("boot_vmm_overhead_ratio", mv / mb, "ratio");
        figure("boot_vmm_overhead", overhead, "ms");
        figure("boot_qemu_rss_beyond_guest_ram_bare_median", mem(&bare, Mem::rss_beyond_ram), "MiB");
    }
    eprintln!(
        "median: vmm start() to SSH-ready {mv:.0} ms; beyond guest RAM: RSS {:.0} MiB, {:.1} MiB anonymous + page \
         tables ({:.1} MiB without the TCG buffer); private {:.0} MiB",
        mem(&ours, Mem::rss_beyond_ram),
        mem(&ours, Mem::beyond_ram),
        mem(&ours, Mem::beyond_ram_without_tcg),
        mem(&ours, Mem::private_beyond_ram),
    );
    figure("boot_vmm_start_to_ssh_ready_median", mv, "ms");
    figure("boot_tcg_tb_size", f64::from(tb), "MiB");
    figure("boot_qemu_rss_beyond_guest_ram_vmm_median", mem(&ours, Mem::rss_beyond_ram), "MiB");
    figure("boot_qemu_private_beyond_guest_ram_vmm_median", mem(&ours, Mem::private_beyond_ram), "MiB");
    figure("boot_qemu_beyond_guest_ram_vmm_median", mem(&ours, Mem::beyond_ram), "MiB");
    figure("boot_qemu_tcg_buffer_vmm_median", mem(&ours, Mem::tcg), "MiB");
    figure("boot_qemu_beyond_guest_ram_without_tcg_vmm_median", mem(&ours, Mem::beyond_ram_without_tcg), "MiB");
    for (c, _, samples) in &others {
        let r = ready(samples);
        eprintln!(
            "tb-size {c}: median ready {r:.0} ms ({:.3} of tb-size {tb}), beyond guest RAM {:.1} MiB \
             ({:.1} MiB without the TCG buffer)",
            r / mv,
            mem(samples, Mem::beyond_ram),
            mem(samples, Mem::beyond_ram_without_tcg),
        );
        figure(&format!("boot_vmm_tb{c}_start_to_ssh_ready_median"), r, "ms");
        figure(&format!("boot_vmm_tb{c}_ready_ratio_to_default"), r / mv, "ratio");
        figure(&format!("boot_vmm_tb{c}_beyond_guest_ram_median"), mem(samples, Mem::beyond_ram), "MiB");
    }
    figure("boot_runs", runs as f64, "runs");
    let _ = std::fs::remove_dir_all(&state);
}
