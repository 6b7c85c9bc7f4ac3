//! An operator's stock cloud image end to end through the CLI (docs/guest-image.md
//! "Operators' stock images"): provider.toml names one qcow2 file by path and sha256,
//! the provider verifies it at start, boots it by firmware (SeaBIOS, the image's own
//! GRUB and kernel) under TCG on a qcow2 overlay the size of the lease, and its
//! cloud-init takes the provider's NoCloud seed. Stock images cannot be downloaded on
//! the test machines, so the image is `debian-12-stock`, built from Debian packages in
//! the shape of Debian's genericcloud (scripts/build-guest-image debian-12-stock).

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use common::*;
use sha2::{Digest, Sha256};

const STOCK: &str = "debian-12-stock";
/// The image's virtual size (scripts/guest-image/debian-12-stock/build: 2 GiB, as
/// Debian's genericcloud).
const STOCK_VIRTUAL_SIZE: u64 = 2 << 30;

fn stock_file() -> PathBuf {
    peervm_testenv::image_dir(STOCK).join("debian-12-stock.qcow2")
}

/// What an operator runs: `sha256sum FILE`.
fn sha256_hex(path: &std::path::Path) -> String {
    let mut file = std::fs::File::open(path).expect("open the stock image");
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read the stock image");
        if n == 0 {
            return hex::encode(hasher.finalize());
        }
        hasher.update(&buf[..n]);
    }
}

/// `peervm exec -- sh -c COMMAND` (the pinned host key, the lease's key): stdout, or a panic
/// with stderr.
fn exec(req: &std::path::Path, id: &str, command: &str) -> String {
    let out = peervm(req, &["exec", id, "--", "sh", "-c", command]);
    assert!(out.status.success(), "`{command}` failed: {}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

#[ignore = "needs root: runs a provider that boots a stock image by firmware"]
#[test]
fn a_stock_image_boots_by_firmware_grows_to_the_lease_and_a_smaller_disk_is_denied() {
    Needs::guests().and(Needs::default().path(stock_file(), "scripts/build-guest-image debian-12-stock")).require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let site = Site { prefix: "pvst", iface: "st", net: "10.215.22", port_min: 27450, vcpus: 2, memory: "2GiB" };
    let file = stock_file();
    let sha256 = sha256_hex(&file);
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    // the longest deadline a provider accepts: a systemd + cloud-init guest under TCG on
    // a 2-core machine shared with other guests (docs/guest-image.md "Measured boot times")
    toml.extra_image_tables.push(format!(
        "[[images]]\nname = \"{STOCK}\"\nfile = \"{}\"\nsha256 = \"{sha256}\"\nformat = \"qcow2\"\nfirmware = \"bios\"\n\
         boot_deadline_secs = 480\n",
        file.display()
    ));
    let config = toml.write(&root.join("pvst.toml"));
    let (_provider, line) =
        spawn_json(&["provider", "run", "--config", config.to_str().expect("utf8")], &site.data(root));
    let provider_id = line["peer_id"].as_str().expect("peer id").to_string();
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("the provider's offer is visible");
    let offer = offers(&boot).into_iter().find(|o| o["provider"] == provider_id.as_str()).expect("offer");
    assert!(offer["images"].as_array().unwrap().iter().any(|i| i == STOCK), "{offer}");
    let req = root.join("requestor");

    // A disk smaller than the image: denied before anything is made for it.
    let out = peervm(
        &req,
        &[
            "lease",
            "create",
            "--bootstrap",
            &boot,
            "--image",
            STOCK,
            "--memory",
            "1GiB",
            "--disk",
            "1GiB",
            "--duration",
            "10m",
        ],
    );
    let err = stderr(&out);
    assert!(!out.status.success(), "a 1 GiB lease of a 2 GiB image was granted: {}", stdout(&out));
    assert!(
        err.contains("invalid_spec") && err.contains(&format!("needs a disk of at least {STOCK_VIRTUAL_SIZE} bytes")),
        "{err}"
    );
    let left = site.leftovers(root);
    assert!(left.is_empty(), "a denied lease left {left:?}");

    // A 4 GiB lease: the firmware boots the image's GRUB and kernel, cloud-init grows
    // the root partition and file system to the lease's disk.
    let t0 = Instant::now();
    let lease =
        lease_create(&req, &boot, &["--image", STOCK, "--memory", "1GiB", "--disk", "4GiB", "--duration", "30m"]);
    let granted = t0.elapsed();
    let id = lease["lease"].as_str().expect("lease id").to_string();
    assert_eq!(lease["state"], "running", "{lease}");

    // QEMU booted by firmware: no -kernel, the root disk first.
    let procs = std::process::Command::new("pgrep").args(["-a", "-f", "qemu-system.*guest=pvst-"]).output().unwrap();
    let qemu = stdout(&procs);
    assert!(qemu.contains("bootindex=0") && !qemu.contains("-kernel"), "{qemu}");
    // The provider pinned the lease to the file's sha256 (what the advert names).
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(site.data(root).join("vmm/leases").join(&id).join("lease.json")).expect("lease record"),
    )
    .expect("lease record JSON");
    assert_eq!(record["image_sha256"], sha256.as_str());

    // OpenSSH as the seed's user, with the pinned host key only (peervm ssh writes a
    // known_hosts holding the lease's key and sets StrictHostKeyChecking yes).
    let out = peervm(&req, &["ssh", &id, "--", "-o", "BatchMode=yes", "id -un; sudo -n true && echo sudo-ok"]);
    assert_eq!(stdout(&out).lines().collect::<Vec<_>>(), ["peervm", "sudo-ok"], "{}", stderr(&out));
    // the image's own kernel, loaded by its GRUB (which adds BOOT_IMAGE=)
    assert!(exec(&req, &id, "cat /proc/cmdline").contains("BOOT_IMAGE=/boot/vmlinuz-"));
    // cloud-init finished (bounded: `timeout` ends the wait if it never does)
    let status = exec(&req, &id, "timeout 600 cloud-init status --wait --long; echo exit=$?");
    assert!(status.contains("status: done") && status.contains("exit=0"), "{status}");
    // the seed's ed25519 key is the only host key
    let keys = exec(&req, &id, "ls /etc/ssh | grep ^ssh_host_");
    assert_eq!(keys.split_whitespace().collect::<Vec<_>>(), ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]);
    // growpart and resizefs: the root partition ends at the disk's end, `df /` shows the
    // lease's 4 GiB less the file system's own overhead
    let sizes = exec(&req, &id, "lsblk -bndo SIZE /dev/vda /dev/vda1; df -B1 --output=size / | tail -1");
    let sizes: Vec<u64> = sizes.split_whitespace().map(|s| s.parse().expect("a size")).collect();
    let [disk, part, fs] = sizes[..] else { panic!("{sizes:?}") };
    assert_eq!(disk, 4 << 30, "the guest's disk is the lease's");
    assert!(part > disk - (130 << 20), "root partition {part} not grown to the disk {disk}");
    assert!(fs > (3584 << 20) && fs <= disk, "df / says {fs} bytes on a 4 GiB lease");
    eprintln!(
        "stock image: granted and SSH-ready after {:.1} s; disk {disk}, root partition {part}, df / {fs} bytes",
        granted.as_secs_f64()
    );

    let out = peervm(&req, &["lease", "terminate", &id]);
    assert!(out.status.success(), "terminate: {}", stderr(&out));
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
}
