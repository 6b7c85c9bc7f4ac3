//! The image check against the real minimal image, and the KVM probe on this host.

mod guest_harness;

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use guest_harness::{TestState, guest_env, image, image_dir, leftovers, login, serial, spec};
use peervm_vmm::{
    Accel, AccelPolicy, EgressPolicy, GuestImage, Hypervisor, ImageError, KvmProbe, ProbeOptions, QemuHypervisor,
    QemuUser, VmmError, probe_kvm, select_accel,
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

/// Runs a host tool the marker test needs; panics with its stderr.
fn host_tool(program: &str, args: &[&str]) {
    let out = std::process::Command::new(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Copies the minimal image to `dir` with its base disk replaced by `disk` (a file made
/// by the caller) and the manifest re-pinned to it: its hashes all match, so only the
/// disk header check stands between that disk and a guest.
fn minimal_with_disk(dir: &std::path::Path, disk: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    for entry in std::fs::read_dir(image_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::copy(disk, dir.join("base.qcow2")).unwrap();
    let bytes = std::fs::read(dir.join("base.qcow2")).unwrap();
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let files = m["files"].as_array_mut().unwrap();
    let entry = files.iter_mut().find(|f| f["path"] == "base.qcow2").expect("minimal pins base.qcow2");
    entry["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
    entry["size"] = bytes.len().into();
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

/// The QEMU processes whose command line names `dir` (the image copies of a test).
fn qemu_using(dir: &std::path::Path) -> Vec<String> {
    let out = std::process::Command::new("pgrep").args(["-af", "qemu-system"]).output().unwrap();
    let needle = dir.display().to_string();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains(&needle)).map(str::to_string).collect()
}

/// A qcow2 whose header names a host file as its backing file: QEMU would read that file
/// into the guest's disk. Here the host file is an ext4 file system holding a marker,
/// which `minimal` would mount on /data. Refused when the image is opened (its hashes all
/// match: only the header check is in the way), and, for a disk swapped in after the
/// image was opened, by the start itself before anything is created. Were the check
/// gone, the image would open, the guest would boot, and this test reads /data in it
/// and fails naming the marker it found there.
#[ignore = "needs root: guest image, QEMU, mkfs.ext4"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_backed_by_a_host_file_is_refused_and_the_host_file_never_reaches_a_guest() {
    guest_env();
    let _serial = serial().await;
    let tmp = tempfile::tempdir().unwrap();
    // QEMU runs as the unprivileged QEMU user and opens the kernel, the initrd and the
    // base by path: without the check it could read all of this
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let marker = format!("PEERVM-HOST-FILE-MARKER-{}", hex::encode(rand::random::<[u8; 8]>()));

    let content = tmp.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("host-secret.txt"), format!("{marker}\n")).unwrap();
    let host_file = tmp.path().join("host-secret.raw");
    host_tool(
        "mkfs.ext4",
        &["-q", "-F", "-L", "host-secret", "-d", content.to_str().unwrap(), host_file.to_str().unwrap(), "16M"],
    );
    std::fs::set_permissions(&host_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let evil = tmp.path().join("evil.qcow2");
    host_tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-b", host_file.to_str().unwrap(), "-F", "raw", evil.to_str().unwrap()],
    );

    // -- an image that pins the disk in its manifest --------------------------------------
    let pinned = tmp.path().join("pinned");
    minimal_with_disk(&pinned, &evil);
    match GuestImage::open(&pinned) {
        Err(ImageError::UnsafeDisk { path, reason }) => {
            assert!(path.ends_with("base.qcow2") && reason.contains("backing file"), "{path:?}: {reason}");
            eprintln!("refused at open: {}", ImageError::UnsafeDisk { path, reason });
        }
        Err(other) => panic!("refused for another reason than its disk header: {other}"),
        Ok(opened) => {
            // the check is gone: show what it was there for, then fail
            let state = TestState::new();
            let hv = QemuHypervisor::new(state.config()).unwrap();
            let (spec, key) = spec(41, 1, 192, EgressPolicy::Deny);
            let spec = peervm_vmm::VmSpec { image: std::sync::Arc::new(opened), ..spec };
            let (user, host_key) = (spec.ssh_user.clone(), spec.host_key.public_key());
            let seen = match hv.start(spec.clone()).await {
                Ok(vm) => {
                    let ssh = login(vm.ssh_addr, &host_key, &user, &key).await;
                    let out = ssh
                        .exec("cat /data/host-secret.txt; ls -la /data", Duration::from_secs(60))
                        .await
                        .map_or_else(|e| e, |(_, out)| out);
                    drop(ssh);
                    let _ = hv.stop(spec.lease_id).await;
                    out
                }
                Err(e) => format!("(the guest did not start: {e})"),
            };
            assert!(!seen.contains(&marker), "THE GUEST READ THE HOST FILE: /data holds the marker {marker}:\n{seen}");
            panic!("an image whose disk names a backing file was opened; in its guest /data showed:\n{seen}");
        }
    }
    assert_eq!(qemu_using(tmp.path()), Vec::<String>::new(), "a QEMU ran with the refused image");

    // -- the same disk swapped in after a clean image was opened ------------------------
    let swapped = tmp.path().join("swapped");
    minimal_with_disk(&swapped, &image_dir().join("base.qcow2"));
    let opened = std::sync::Arc::new(GuestImage::open(&swapped).expect("the clean copy opens"));
    std::fs::copy(&evil, swapped.join("base.qcow2.new")).unwrap();
    std::fs::rename(swapped.join("base.qcow2.new"), swapped.join("base.qcow2")).unwrap();
    let state = TestState::new();
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let (spec, _key) = spec(41, 1, 192, EgressPolicy::Deny);
    let lease = spec.lease_id;
    let spec = peervm_vmm::VmSpec { image: opened, ..spec };
    match hv.start(spec).await {
        Err(VmmError::Image(ImageError::UnsafeDisk { reason, .. })) => {
            assert!(reason.contains("backing file"), "{reason}")
        }
        Err(other) => panic!("refused for another reason than its disk header: {other}"),
        Ok(vm) => panic!("a guest started on a disk that names a backing file: {vm:?}"),
    }
    assert_eq!(qemu_using(tmp.path()), Vec::<String>::new(), "a QEMU ran with the refused image");
    let left = leftovers(Some(&lease), state.path(), Some(guest_harness::PORT_BASE + 41));
    assert!(left.is_empty(), "a refused start left: {left:#?}");
}
