//! SECURITY.md invariant 9 across a provider crash: the managing process is SIGKILLed
//! while its guest runs; a new backend re-adopts the guest of a live lease (reachable
//! again on its port), and a reconcile with no live lease removes it and every stray
//! object with the prefix. Once per backend (QEMU run by vmm, and by libvirtd: there the
//! guest is a domain the dead provider left behind).
//!
//! The managing process is this test binary run again as a child with
//! PEERVM_VMM_TEST_MANAGER set: it starts one guest, prints its port, and waits to be
//! killed (bounded: it exits by itself after 5 minutes).

mod guest_harness;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_harness::{DEFAULT_SITE, Kind, TestState, config_for, guest_env, leftovers, login, serial, spec};
use peervm_vmm::{EgressPolicy, Hypervisor, LeaseId, QemuHypervisor};

const MANAGER_ENV: &str = "PEERVM_VMM_TEST_MANAGER";
/// Set to `libvirt` for the manager of the libvirt run.
const BACKEND_ENV: &str = "PEERVM_VMM_TEST_BACKEND";
const SLOT: u32 = 30;

/// Not a test of its own: the child process that `sigkill_of_manager_then_reconcile`
/// starts (with MANAGER_ENV set) and kills. Run any other way it does nothing.
#[ignore = "not a test: the child process of sigkill_of_manager_then_reconcile_leaves_nothing"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_process_for_crash_test() {
    let Ok(state_dir) = std::env::var(MANAGER_ENV) else { return };
    let kind = if std::env::var(BACKEND_ENV).as_deref() == Ok("libvirt") { Kind::Libvirt } else { Kind::Qemu };
    let hv = QemuHypervisor::new(config_for(kind, DEFAULT_SITE, &PathBuf::from(&state_dir))).unwrap();
    let (spec, key) = spec(SLOT, 1, 192, EgressPolicy::Deny);
    let vm = hv.start(spec.clone()).await.unwrap();
    // what the parent needs to log in: lease, port, host key and the client key
    println!(
        "MANAGER-READY {} {} {} {}",
        spec.lease_id,
        vm.ssh_addr.port(),
        hex::encode(spec.host_key.public_raw()),
        hex::encode(key.key_data().ed25519().unwrap().private.to_bytes())
    );
    tokio::time::sleep(Duration::from_secs(300)).await;
}

#[ignore = "needs root: boots a guest and kills its manager"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_manager_then_reconcile_leaves_nothing() {
    crash_and_reconcile(Kind::Qemu).await;
}

#[ignore = "needs root: boots a guest under libvirtd and kills its manager"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_manager_then_reconcile_leaves_nothing_under_libvirt() {
    crash_and_reconcile(Kind::Libvirt).await;
}

async fn crash_and_reconcile(kind: Kind) {
    if std::env::var_os(MANAGER_ENV).is_some() {
        return; // this process is the manager child: only manager_process_for_crash_test runs
    }
    guest_env();
    kind.require();
    let _serial = serial().await;
    let state = TestState::for_backend(DEFAULT_SITE, kind);

    // -- the manager starts a guest, then dies by SIGKILL ----------------------------
    let mut child = Manager(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "manager_process_for_crash_test", "--include-ignored", "--nocapture", "--test-threads=1"])
            .env(MANAGER_ENV, state.path())
            .env(BACKEND_ENV, if kind == Kind::Libvirt { "libvirt" } else { "qemu" })
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let ready = loop {
        let line = lines.next().expect("manager exited before its guest was ready").unwrap();
        // libtest prints "test name ... " on the same line first
        if let Some(i) = line.find("MANAGER-READY ") {
            break line[i + "MANAGER-READY ".len()..].to_string();
        }
    };
    let f: Vec<&str> = ready.split(' ').collect();
    let lease: LeaseId = f[0].parse().unwrap();
    let port: u16 = f[1].parse().unwrap();
    let host_key = peervm_vmm::AuthorizedKey::from_ed25519(&hex_32(f[2]), "").unwrap().public_key().clone();
    let key = russh::keys::PrivateKey::from(russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&hex_32(f[3])));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let ssh = login(addr, &host_key, "lessee", &key).await;
    assert_eq!(ssh.exec("echo before", Duration::from_secs(30)).await.unwrap().1.trim(), "before");
    drop(ssh);

    child.0.kill().unwrap(); // SIGKILL
    child.0.wait().unwrap();
    // the guest outlives its manager; its port died with the manager's forwarder
    let before = leftovers(Some(&lease), state.path(), None);
    assert!(before.iter().any(|l| l.starts_with("process")), "guest did not survive its manager: {before:?}");
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err());

    // -- a new backend re-adopts the live lease's guest --------------------------------
    {
        let hv = QemuHypervisor::new(state.config()).unwrap();
        let report = hv.reconcile(&[lease]).await.unwrap();
        assert_eq!(report.adopted.len(), 1, "{report:?}");
        assert!(report.removed_leases.is_empty(), "{report:?}");
        assert_eq!(report.adopted[0].ssh_addr, addr);
        let ssh = login(addr, &host_key, "lessee", &key).await;
        assert_eq!(ssh.exec("echo after", Duration::from_secs(30)).await.unwrap().1.trim(), "after");
        assert_eq!(hv.status(lease).await.unwrap().state, peervm_vmm::GuestState::Running);
        assert!(hv.usage(lease).await.unwrap().cpu_time > Duration::ZERO);
    } // dropped without stop: like a second crash, the guest keeps running

    // -- strays with the prefix that no lease owns -------------------------------------
    let stray = LeaseId::random();
    let stray_name = format!("{}-{}", guest_harness::PREFIX_LONG, stray.hex());
    let stray_link = format!("{}{}", guest_harness::PREFIX_SHORT, stray.short_hex(12));
    run(&["ip", "netns", "add", &stray_name]);
    // a veth whose peer never moved into a namespace (a crash in the middle of setup)
    run(&["ip", "link", "add", &stray_link, "type", "veth", "peer", "name", &format!("{stray_link}x")]);
    run(&["nft", "add", "table", "inet", &stray_name]);
    let hv = QemuHypervisor::new(state.config()).unwrap();
    let stray_cgroup =
        peervm_vmm::LeaseCgroup::new(hv.cgroup_layout().clone(), guest_harness::PREFIX_LONG, &stray_name);
    stray_cgroup
        .create(&peervm_vmm::CgroupLimits {
            cpu_quota_us: None,
            cpu_period_us: 100_000,
            memory_max_bytes: 64 << 20,
            pids_max: 10,
        })
        .unwrap();
    assert!(!leftovers(Some(&stray), state.path(), None).is_empty());

    // -- reconcile with no live lease: nothing is left ---------------------------------
    let t = Instant::now();
    let report = hv.reconcile(&[]).await.unwrap();
    eprintln!("reconcile took {:?}: {report:?}", t.elapsed());
    assert_eq!(report.removed_leases, vec![lease]);
    assert!(report.failed.is_empty(), "{report:?}");
    for want in ["netns", "link", "nft table", "cgroup"] {
        assert!(
            report.removed_objects.iter().any(|o| o.starts_with(want) && o.contains(&stray.short_hex(12))),
            "stray {want} not reported as removed: {report:?}"
        );
    }
    let left = leftovers(None, state.path(), Some(port));
    assert!(left.is_empty(), "left behind after crash and reconcile: {left:#?}");
    // a second reconcile finds nothing to do
    let again = hv.reconcile(&[]).await.unwrap();
    assert_eq!(again, Default::default());
}

/// The manager child process, SIGKILLed on drop: a failing test must not leave it
/// running (it would hold its guest's SSH port for minutes). Declared after the
/// `TestState`, so it is gone before the teardown reconciles.
struct Manager(std::process::Child);

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hex_32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).unwrap();
    out
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}
