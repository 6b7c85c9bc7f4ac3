//! The image check against the real minimal image, and the KVM probe on this host.

mod guest_harness;

use std::time::{Duration, Instant};

use guest_harness::{guest_env, image, image_dir, serial};
use peervm_vmm::{
    Accel, AccelPolicy, GuestImage, ImageError, KvmProbe, ProbeOptions, QemuUser, probe_kvm, select_accel,
};
use sha2::{Digest, Sha256};

/// A byte flipped in a copy of the image: refused, with the file named.
#[ignore = "needs root: guest image and QEMU"]
#[test]
fn corrupted_image_refused() {
    guest_env();
    let real = image();
    let raw = std::fs::read(image_dir().join("manifest.json")).unwrap();
    assert_eq!(real.sha256(), <[u8; 32]>::from(Sha256::digest(&raw)), "advertised image id");

    let copy = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(image_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), copy.path().join(entry.file_name())).unwrap();
    }
    let opened = GuestImage::open(copy.path()).expect("an intact copy opens");

    // same size, one bit different: only the hash can tell
    let victim = copy.path().join("initrd.img");
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&victim, &bytes).unwrap();

    let err = GuestImage::open(copy.path()).unwrap_err();
    assert!(matches!(&err, ImageError::HashMismatch { path, .. } if path.ends_with("initrd.img")), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("initrd.img") && msg.contains("does not match its manifest"), "{msg}");
    eprintln!("refused: {msg}");
    // an image opened before the change is refused at its next use too
    let err = opened.verify().unwrap_err().to_string();
    assert!(err.contains("initrd.img"), "{err}");
}

/// On the development hosts KVM is broken (docs/vmm.md "The development hosts"): the
/// probe must say so, with a reason,
/// within its deadline, and the policy then picks TCG only where allowed. Set
/// PEERVM_EXPECT_KVM=1 on a host where KVM works.
#[ignore = "needs root: guest image and QEMU"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvm_probe_reports_unusable_kvm_with_a_reason() {
    guest_env();
    let _serial = serial().await;
    let img = image();
    let expect_kvm = std::env::var("PEERVM_EXPECT_KVM").is_ok_and(|v| v == "1");
    let deadline = Duration::from_secs(8);
    // as the user real guests run as (its access to /dev/kvm counts), and as root, which
    // gets past the device's permissions and exercises the boot-under-a-deadline path
    for user in [QemuUser::lookup(peervm_vmm::DEFAULT_QEMU_USER).unwrap(), QemuUser::root()] {
        let opts = ProbeOptions { qemu_binary: "qemu-system-x86_64".into(), user: user.clone(), deadline };
        let t = Instant::now();
        let probe = probe_kvm(&img, &opts).await;
        let took = t.elapsed();
        eprintln!("KVM probe as {} took {took:?}: {probe:?}", user.name);
        assert!(took < deadline + Duration::from_secs(10), "probe overran its deadline: {took:?}");
        match (&probe, expect_kvm) {
            (KvmProbe::Unusable { reason }, false) => {
                assert!(!reason.trim().is_empty());
                assert_eq!(select_accel(AccelPolicy::KvmOrTcg, &probe).unwrap(), Accel::Tcg);
                assert!(select_accel(AccelPolicy::KvmOnly, &probe).is_err());
            }
            (KvmProbe::Usable { .. }, true) => {
                assert_eq!(select_accel(AccelPolicy::KvmOrTcg, &probe).unwrap(), Accel::Kvm);
            }
            (other, _) => panic!("KVM probe as {}: {other:?} (PEERVM_EXPECT_KVM={expect_kvm})", user.name),
        }
    }
    let leftover = std::process::Command::new("pgrep").args(["-f", "accel kvm"]).output().unwrap();
    assert!(leftover.stdout.is_empty(), "probe QEMU left running");
}

/// Disks made by the real qemu-img that would make QEMU read a host file (a backing file,
/// an external data file), or that are not the format the manifest says: refused by
/// `GuestImage::open` before any QEMU sees them, though the manifest pins their hashes.
#[ignore = "needs root: QEMU's qemu-img (scripts/install-deps)"]
#[test]
fn a_disk_reaching_a_host_file_or_of_another_format_is_refused() {
    guest_env();
    let dir = tempfile::tempdir().unwrap();
    let host_file = dir.path().join("host-secret");
    std::fs::write(&host_file, b"a host file a guest must never read").unwrap();
    let qemu_img = |args: &[&str]| {
        let out = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img runs");
        assert!(out.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let image_with = |name: &str, make: &dyn Fn(&str), format: &str| -> Result<GuestImage, ImageError> {
        let img = dir.path().join(name);
        std::fs::create_dir_all(&img).unwrap();
        let disk = img.join("base.qcow2");
        make(disk.to_str().unwrap());
        let mut files = Vec::new();
        for (file, bytes) in [("vmlinuz", b"kernel".to_vec()), ("base.qcow2", std::fs::read(&disk).unwrap())] {
            if file == "vmlinuz" {
                std::fs::write(img.join(file), &bytes).unwrap();
            }
            files.push(
                serde_json::json!({"path": file, "sha256": hex::encode(Sha256::digest(&bytes)), "size": bytes.len()}),
            );
        }
        let m = serde_json::json!({"name": name, "kernel": "vmlinuz", "initrd": "vmlinuz", "disk": "base.qcow2",
            "disk_format": format, "files": files});
        std::fs::write(img.join("manifest.json"), m.to_string()).unwrap();
        GuestImage::open(&img)
    };
    let host = host_file.to_str().unwrap().to_string();

    let plain = image_with("plain", &|d| qemu_img(&["create", "-q", "-f", "qcow2", d, "64M"]), "qcow2");
    assert!(plain.is_ok(), "a standalone qcow2 opens: {plain:?}");

    let backing =
        image_with("backing", &|d| qemu_img(&["create", "-q", "-f", "qcow2", "-b", &host, "-F", "raw", d]), "qcow2");
    let err = backing.expect_err("a qcow2 backed by a host file");
    assert!(matches!(&err, ImageError::UnsafeDisk { reason, .. } if reason.contains("backing file")), "{err}");

    let data_file = dir.path().join("data-file");
    let external = image_with(
        "external",
        &|d| {
            let opt = format!("data_file={}", data_file.display());
            qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opt, d, "64M"])
        },
        "qcow2",
    );
    let err = external.expect_err("a qcow2 with an external data file");
    assert!(matches!(&err, ImageError::UnsafeDisk { reason, .. } if reason.contains("external data file")), "{err}");

    let declared_raw = image_with("raw", &|d| qemu_img(&["create", "-q", "-f", "qcow2", d, "64M"]), "raw");
    let err = declared_raw.expect_err("a qcow2 declared raw");
    assert!(matches!(&err, ImageError::UnsafeDisk { reason, .. } if reason.contains("says raw")), "{err}");
}
