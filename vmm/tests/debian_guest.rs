//! One real debian-12 guest under TCG through the backend (docs/guest-image.md "The
//! debian-12 image"): the real cloud-init takes the provider's seed, the lease's user
//! logs in with the lease's key and has passwordless sudo, the root file system has the
//! leased size, the only SSH host key is the pinned one, and a stop leaves nothing.
//! One boot: a systemd guest under software emulation takes minutes.

mod guest_harness;

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_harness::{Needs, Ssh, TestState, guest_env, leftovers, login, random_key, serial};
use peervm_vmm::{AuthorizedKey, EgressPolicy, GuestImage, HostKeySeed, Hypervisor, LeaseId, QemuHypervisor, VmSpec};

const IMAGE: &str = "debian-12";
const DISK_GIB: u32 = 4;
const LONG: Duration = Duration::from_secs(300);

#[ignore = "needs root: boots a debian-12 guest under TCG"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_guest_runs_cloud_init_with_the_lease_user_key_disk_and_host_key() {
    Needs::guests().and(Needs::image(IMAGE)).require();
    guest_env();
    let _serial = serial().await;
    let image = Arc::new(GuestImage::open(peervm_testenv::image_dir(IMAGE)).expect("the debian-12 image verifies"));
    let user = image.login_user().expect("debian-12 names its login user").to_string();
    let state = TestState::new();
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let client_key = random_key();
    let spec = VmSpec {
        lease_id: LeaseId::random(),
        vcpus: 2,
        memory_mib: 1024,
        disk_gib: DISK_GIB,
        image: image.clone(),
        ssh_user: user.clone(),
        authorized_key: AuthorizedKey::parse(&client_key.public_key().to_openssh().unwrap()).unwrap(),
        host_key: HostKeySeed::random(),
        network_slot: 5,
        egress: EgressPolicy::Deny,
        cpu_quota: None,
        progress: None,
    };
    let lease = spec.lease_id;
    let host_key = spec.host_key.public_key();

    // the wait for SSH is the image's boot deadline (300 s), not the tests' 180 s default
    let t = Instant::now();
    let vm = hv.start(spec.clone()).await.expect("debian-12 guest start");
    eprintln!("debian-12 ready in {:?} (boot_time {:?}), ssh at {}", t.elapsed(), vm.boot_time, vm.ssh_addr);
    assert_eq!(vm.host_key, spec.host_key.public_openssh());

    // -- the lease's user, with the lease's key, against the pinned host key -----------
    let ssh = login(vm.ssh_addr, &host_key, &user, &client_key).await;
    let run = |cmd: &'static str| {
        let ssh = &ssh;
        async move { ssh.exec(cmd, LONG).await.unwrap_or_else(|e| panic!("{cmd}: {e}")) }
    };
    let (_, ci) = run("cloud-init status --wait >/dev/null; cloud-init status --long").await;
    eprintln!("{ci}");
    eprintln!("cloud-init done {:?} after start", t.elapsed());
    assert!(ci.contains("status: done") && !ci.contains("rror"), "cloud-init: {ci}");
    let (code, schema) = run("sudo -n cloud-init schema --system 2>&1").await;
    assert!(code == 0 && schema.contains("Valid cloud-config"), "the seed is valid cloud-config: {schema}");
    let (_, warnings) = run("sudo -n grep -E 'WARNING|Traceback' /var/log/cloud-init.log; true").await;
    assert!(warnings.trim().is_empty(), "cloud-init warned: {warnings}");

    let (code, _) = run("sudo -n true").await;
    assert_eq!(code, 0, "passwordless sudo");
    let (_, who) = run("id -un; id -u; hostname").await;
    let who: Vec<&str> = who.lines().collect();
    assert_eq!(who[0], user);
    assert_ne!(who[1], "0", "a normal user, not root");
    assert_eq!(who[2], format!("peervm-{}", lease.short_hex(8)), "the seed's hostname");

    // -- the root file system grew to the leased size (within ext4's overhead) ---------
    let (_, df) = run("df -B1 --output=size / | tail -1").await;
    let root_bytes: u64 = df.trim().parse().unwrap_or_else(|_| panic!("df: {df:?}"));
    let leased = u64::from(DISK_GIB) << 30;
    eprintln!("/ is {root_bytes} bytes of a {leased}-byte lease disk");
    assert!(root_bytes <= leased && root_bytes * 100 >= leased * 95, "/ is {root_bytes} bytes, leased {leased}");

    // -- the only host key is the lease's, and it is the pinned one ---------------------
    let (_, files) = run("ls /etc/ssh | grep '^ssh_host_'").await;
    assert_eq!(files.split_whitespace().collect::<Vec<_>>(), ["ssh_host_ed25519_key", "ssh_host_ed25519_key.pub"]);
    // cloud-init writes both halves 0600 root
    let (_, public) = run("sudo -n cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub").await;
    assert_eq!(public.trim(), spec.host_key.public_openssh(), "the guest's host key file is the pinned key");

    // -- other ways in are shut ----------------------------------------------------------
    let mut s = Ssh::connect(vm.ssh_addr, Some(&host_key)).await.unwrap();
    assert!(!s.login_password(&user, "").await.unwrap(), "empty password accepted");
    assert!(!s.login_key(&user, &random_key()).await.unwrap(), "a key that is not the lease's was accepted");
    assert!(!s.login_key("root", &client_key).await.unwrap(), "root took the lease's key");

    // -- stop: nothing of the lease is left ------------------------------------------------
    drop(ssh);
    drop(s);
    let t = Instant::now();
    hv.stop(lease).await.unwrap();
    eprintln!("stopped in {:?}", t.elapsed());
    let left = leftovers(Some(&lease), state.path(), Some(vm.ssh_addr.port()));
    assert!(left.is_empty(), "left behind after stop: {left:#?}");
}
