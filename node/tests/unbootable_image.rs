//! Images whose guest never boots, offered by a real provider and leased through the CLI:
//! each lease fails with the provider's signed `boot_failed` denial, which the requestor
//! shows and records; nothing of the lease is left on the host, and the provider's next
//! lease runs (issue 13 item 5; docs/vmm.md "Images", "What is refused, and where").

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

/// A copy of the minimal image under `root/name`, with `replace` (the manifest entry whose
/// file gets new bytes, "kernel" or "initrd": minimal's kernel file is `vmlinux` since it
/// boots the ELF) swapped in, the manifest's `name`, `cmdline` and `boot_deadline_secs` set, and every
/// file re-pinned: the image verifies, so only its boot can fail.
fn broken_minimal(root: &Path, name: &str, replace: (&str, Vec<u8>), cmdline: &str, deadline_secs: u64) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(image_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    let path = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    // `replace.0` names a manifest entry ("kernel", "initrd"): whatever file it points at
    let file = m[replace.0].as_str().expect("the manifest names the file").to_string();
    std::fs::write(dir.join(file), &replace.1).unwrap();
    m["name"] = name.into();
    m["cmdline"] = cmdline.into();
    m["boot_deadline_secs"] = deadline_secs.into();
    for f in m["files"].as_array_mut().unwrap() {
        let bytes = std::fs::read(dir.join(f["path"].as_str().unwrap())).unwrap();
        f["sha256"] = hex::encode(Sha256::digest(&bytes)).into();
        f["size"] = bytes.len().into();
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    dir
}

/// An arm64 kernel as the x86_64 QEMU sees one: the arm64 `Image` header
/// (Linux Documentation/arch/arm64/booting.rst: `MZ` EFI stub, image size, flags, the
/// magic "ARM\x64" at byte 56) and a body of random bytes.
fn arm64_kernel() -> Vec<u8> {
    let mut k = vec![0u8; 64];
    k[..4].copy_from_slice(&[0x4d, 0x5a, 0x00, 0x91]);
    k[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
    k[24..32].copy_from_slice(&0xau64.to_le_bytes());
    k[56..60].copy_from_slice(b"ARM\x64");
    k.extend((0..1 << 20).map(|_| rand::random::<u8>()));
    k
}

#[ignore = "needs root: runs a provider that boots guests"]
#[test]
fn an_unbootable_image_fails_its_lease_with_a_signed_boot_failed_and_leaves_nothing() {
    Needs::guests().require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // QEMU runs as the unprivileged QEMU user and opens kernels and initrds by path
    let images = tempfile::tempdir().unwrap();
    std::fs::set_permissions(images.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // not x86_64: QEMU refuses the kernel and exits before the guest runs
    let arm64 = broken_minimal(images.path(), "arm64", ("kernel", arm64_kernel()), "console=ttyS0", 60);
    // x86_64 but unbootable: the kernel finds no init in a garbage initrd and panics,
    // and with panic=0 it stays there: only the image's boot deadline ends the wait
    let garbage: Vec<u8> = (0..1 << 16).map(|_| rand::random::<u8>()).collect();
    let hang = broken_minimal(images.path(), "hang", ("initrd", garbage), "console=ttyS0 panic=0", 20);

    let site = Site { prefix: "pvub", iface: "ub", net: "10.215.24", port_min: 27500, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    toml.extra_images = vec![("arm64".into(), arm64), ("hang".into(), hang)];
    let config = toml.write(&root.join("pvub.toml"));
    let (_provider, line) = spawn_json(&["provider", "run", "--config", config.to_str().unwrap()], &site.data(root));
    let provider = line["peer_id"].as_str().expect("peer id").to_string();
    let req = root.join("requestor");

    for (image, says) in [
        ("arm64", "QEMU stopped before the guest was ready"),
        ("hang", "no SSH server with the lease's host key answered within"),
    ] {
        wait_for_free_vcpus(&boot, &provider, HANG_GUARD).expect("the provider offers a free vCPU");
        let mut args = vec!["lease", "create", "--bootstrap", &boot, "--provider", &provider, "--image", image];
        args.extend_from_slice(&SMALL_LEASE);
        let out = peervm(&req, &args);
        let err = stderr(&out);
        eprintln!("lease of `{image}`:\n{err}");
        assert!(!out.status.success(), "a lease of `{image}` was granted");
        // the requestor verified the provider's signature on the reply before it
        // stored and showed the reason (docs/protocol.md, the `denied` outcome)
        let expected =
            format!("the provider denied the request: boot_failed: the guest of image `{image}` did not boot");
        assert!(err.contains(&expected) && err.contains(says), "{err}\nprovider log:\n{}", site.log(root));
        let rows = |args: &[&str]| -> Vec<serde_json::Value> {
            stdout(&peervm(&req, args)).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
        };
        // a denied request is no lease: only `--all` lists it, with the signed denial
        let stored = rows(&["lease", "list", "--json", "--all"]);
        let mine = stored.iter().find(|l| l["image"] == image).unwrap_or_else(|| panic!("{stored:?}"));
        assert_eq!(mine["state"], "failed", "{mine}");
        assert!(mine["detail"].as_str().unwrap_or("").starts_with("denied: boot_failed: "), "{mine}");
        assert!(mine["denial"].as_str().is_some_and(|hex| !hex.is_empty()), "the signed denial is kept: {mine}");
        let default = rows(&["lease", "list", "--json"]);
        assert!(default.iter().all(|l| l["lease"] != mine["lease"]), "listed without --all: {default:?}");
        let left = site.wait_clean(root, HANG_GUARD);
        assert!(left.is_empty(), "a failed boot of `{image}` left: {left:?}");
    }

    // the provider is still healthy: its next lease runs, and ends clean
    wait_for_free_vcpus(&boot, &provider, HANG_GUARD).expect("the vCPU is offered again");
    let lease = lease_create(&req, &boot, &[&["--provider", provider.as_str()][..], &SMALL_LEASE[..]].concat());
    let id = lease["lease"].as_str().unwrap().to_string();
    let out = peervm(&req, &["exec", &id, "--", "echo", "alive"]);
    assert!(stdout(&out).contains("alive"), "the next lease's guest: {}", stderr(&out));
    assert!(peervm(&req, &["lease", "terminate", &id]).status.success());
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}
