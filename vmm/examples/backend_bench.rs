//! Backend benchmark (issue 19): lease start to SSH-ready, and stop to nothing left, for
//! each backend in one run: QEMU run by vmm, and QEMU run by libvirtd (docs/vmm.md "The
//! libvirt backend"). Same image, spec and host; runs alternate (qemu, libvirt, qemu...)
//! so both see the same load.
//!
//! Run as root, after scripts/install-deps --libvirt and scripts/build-guest-image:
//!     cargo run --release -p peervm-vmm --example backend_bench -- [runs]
//! Progress and a summary go to stderr; stdout gets one JSON object per figure (name,
//! value, unit), which `scripts/bench` collects (group boot).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peervm_vmm::{
    Accel, AuthorizedKey, Backend, EgressPolicy, GuestImage, HostKeySeed, Hypervisor, LeaseId, NamePrefix,
    QemuHypervisor, QemuUser, VmSpec, VmmConfig,
};

fn image_dir() -> PathBuf {
    std::env::var_os("PEERVM_IMAGE_DIR").map(PathBuf::from).unwrap_or("/var/cache/peervm/images".into()).join("minimal")
}

/// A backend of its own: names, pool and ports apart from every test's and bench's.
async fn backend(state: &Path, libvirt: bool) -> QemuHypervisor {
    let (index, short) = if libvirt { (1u16, "bl") } else { (0, "bq") };
    let mut config = VmmConfig::new(state.join(short), Accel::Tcg);
    config.names = NamePrefix::new(&format!("pvbk{index}"), short).expect("names");
    config.address_pool = format!("10.216.{}.0/24", 20 + index).parse().expect("pool");
    config.ssh_port_base = 47480 + 8 * index;
    config.ssh_port_count = 8;
    if libvirt {
        config.backend = Backend::Libvirt { uri: Backend::DEFAULT_LIBVIRT_URI.into() };
        // straight below the 0711 directory: the QEMU user traverses to it
        config.lease_root = Some(state.join("libvirt-leases"));
    }
    let t = Instant::now();
    let hv = QemuHypervisor::new(config).expect("backend (libvirt: scripts/install-deps --libvirt)");
    eprintln!("{} backend ready in {:?}", if libvirt { "libvirt" } else { "qemu" }, t.elapsed());
    let _ = hv.reconcile(&[]).await;
    hv
}

/// Start to SSH-ready and stop, in ms.
async fn one(hv: &QemuHypervisor, image: &Arc<GuestImage>) -> (f64, f64) {
    let spec = VmSpec {
        lease_id: LeaseId::random(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        image: image.clone(),
        ssh_user: "bench".into(),
        authorized_key: AuthorizedKey::from_ed25519(&HostKeySeed::random().public_raw(), "bench").expect("key"),
        host_key: HostKeySeed::random(),
        network_slot: 0,
        egress: EgressPolicy::Deny,
        expose: Vec::new(),
        cpu_quota: None,
        progress: None,
    };
    let t = Instant::now();
    hv.start(spec.clone()).await.expect("start");
    let start = t.elapsed();
    // the guest settles (its boot scripts finish) before the power button
    tokio::time::sleep(Duration::from_secs(2)).await;
    let t = Instant::now();
    hv.stop(spec.lease_id).await.expect("stop");
    (start.as_secs_f64() * 1000.0, t.elapsed().as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

fn figure(name: &str, value: f64, unit: &str) {
    println!("{{\"name\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    QemuUser::ensure(peervm_vmm::DEFAULT_QEMU_USER).expect("QEMU user");
    let image = Arc::new(GuestImage::open(image_dir()).expect("image (run scripts/build-guest-image)"));
    // the libvirt backend's lease directories go below it: the QEMU user traverses it
    let state = tempfile::Builder::new().permissions(std::os::unix::fs::PermissionsExt::from_mode(0o711)).tempdir();
    let state = state.expect("state dir");
    let qemu = backend(state.path(), false).await;
    let libvirt = backend(state.path(), true).await;
    let (mut q, mut l) = (Vec::new(), Vec::new());
    for run in 1..=runs {
        let a = one(&qemu, &image).await;
        eprintln!("run {run}: qemu    start->ssh {:7.0} ms  stop {:6.0} ms", a.0, a.1);
        let b = one(&libvirt, &image).await;
        eprintln!("run {run}: libvirt start->ssh {:7.0} ms  stop {:6.0} ms", b.0, b.1);
        q.push(a);
        l.push(b);
    }
    let (qs, qt) = (median(q.iter().map(|s| s.0).collect()), median(q.iter().map(|s| s.1).collect()));
    let (ls, lt) = (median(l.iter().map(|s| s.0).collect()), median(l.iter().map(|s| s.1).collect()));
    eprintln!(
        "median of {runs}: qemu start->ssh {qs:.0} ms, stop {qt:.0} ms; libvirt start->ssh {ls:.0} ms, stop {lt:.0} ms"
    );
    figure("backend_qemu_start_to_ssh_ms", qs, "ms");
    figure("backend_qemu_stop_ms", qt, "ms");
    figure("backend_libvirt_start_to_ssh_ms", ls, "ms");
    figure("backend_libvirt_stop_ms", lt, "ms");
}
