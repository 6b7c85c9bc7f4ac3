//! The libvirt backend against what it did not make (docs/vmm.md "The libvirt backend"):
//! a libvirtd that does not answer, a domain with the lease prefix that an operator
//! defined, and a domain of ours that a crashed provider left with no lease. None boots a
//! guest: the stray domain is a paused QEMU with no disk.
//!
//! Site `pvlv`/`lv` (no other test's reconcile sweeps it), pool 10.214.40.0/29, SSH ports
//! 47380-47381.

mod guest_harness;

use std::process::Command;

use guest_harness::{Kind, Site, TestState, guest_env, leftovers_at, serial, spec};
use peervm_vmm::{Backend, EgressPolicy, Hypervisor, LeaseId, QemuHypervisor, VmmError};

const SITE: Site = Site { long: "pvlv", short: "lv", pool: "10.214.40.0/29", port_base: 47380, port_count: 2 };
const URI: &str = Backend::DEFAULT_LIBVIRT_URI;

fn virsh(args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh").arg("-c").arg(URI).args(args).output().expect("virsh");
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn domains() -> Vec<String> {
    virsh(&["list", "--all", "--name"]).1.lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

/// A domain named like a lease of `SITE`, removed on drop (an operator's, for this test).
struct OperatorDomain(String);

impl Drop for OperatorDomain {
    fn drop(&mut self) {
        let _ = virsh(&["destroy", &self.0]);
        let _ = virsh(&["undefine", &self.0]);
    }
}

#[ignore = "needs root: talks to libvirtd"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_libvirtd_that_does_not_answer_is_a_clear_error_and_leaves_nothing() {
    guest_env();
    Kind::Libvirt.require();
    // its teardown reconciles the site: not while the other test has domains there
    let _serial = serial().await;
    let state = TestState::for_backend(SITE, Kind::Libvirt);
    let mut config = state.config();
    // libvirtd down, as seen from a client: nothing listens on its socket
    let uri = format!("qemu:///system?socket={}/no-libvirtd.sock", state.path().display());
    config.backend = Backend::Libvirt { uri: uri.clone() };
    let err = QemuHypervisor::new(config).err().expect("a backend without libvirtd");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(matches!(&err, VmmError::Libvirt { uri: u, .. } if *u == uri), "{err:?}");
    assert!(text.contains("cannot connect") && text.contains("is libvirtd running?"), "{text}");
    assert!(!state.path().join("leases").exists(), "a backend that could not start made its lease root");
}

#[ignore = "needs root: defines libvirt domains"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_with_the_prefix_that_are_not_ours_are_left_alone_and_ours_are_removed() {
    guest_env();
    Kind::Libvirt.require();
    let _serial = serial().await;
    let state = TestState::for_backend(SITE, Kind::Libvirt);
    let hv = QemuHypervisor::new(state.config()).unwrap();

    // -- an operator's persistent domain that carries a lease name of this prefix -------
    let (spec, _) = spec(0, 1, 128, EgressPolicy::Deny);
    let lease = spec.lease_id;
    let name = format!("{}-{}", SITE.long, lease.hex());
    let xml_path = state.path().join("operator.xml");
    std::fs::write(
        &xml_path,
        format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><os><type>hvm</type></os></domain>"
        ),
    )
    .unwrap();
    let (ok, out) = virsh(&["define", xml_path.to_str().unwrap()]);
    assert!(ok, "virsh define: {out}");
    let operator = OperatorDomain(name.clone());

    // a lease of that name is refused before anything of it is made
    let err = hv.start(spec.clone()).await.expect_err("a lease whose domain name is taken");
    assert!(matches!(&err, VmmError::ForeignDomain { name: n } if *n == name), "{err:?}");
    let left = leftovers_at(SITE, Some(&lease), state.path(), None);
    assert_eq!(left, [format!("libvirt domain {name}")], "only the operator's domain");

    // reconcile leaves it, and says so
    let report = hv.reconcile(&[]).await.unwrap();
    eprintln!("{report:?}");
    assert!(report.failed.iter().any(|f| f.contains(&name) && f.contains("not made by this provider")), "{report:?}");
    assert!(report.removed_objects.is_empty(), "{report:?}");
    assert!(domains().contains(&name), "reconcile removed an operator's domain");
    drop(operator);

    // -- a domain of ours that a crashed provider left, with no lease: removed -----------
    let stray = LeaseId::random();
    let stray_name = format!("{}-{}", SITE.long, stray.hex());
    let xml = format!(
        "<domain type='qemu'><name>{stray_name}</name><metadata><peervm:lease xmlns:peervm='urn:peervm:lease:v1'>{}\
         </peervm:lease></metadata><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><memballoon model='none'/></devices></domain>",
        stray.hex()
    );
    std::fs::write(&xml_path, xml).unwrap();
    let (ok, out) = virsh(&["create", xml_path.to_str().unwrap(), "--paused"]);
    assert!(ok, "virsh create: {out}");
    let _cleanup = OperatorDomain(stray_name.clone());
    assert!(!leftovers_at(SITE, Some(&stray), state.path(), None).is_empty());
    let report = hv.reconcile(&[]).await.unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.removed_objects, [format!("domain {stray_name}")], "{report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    let left = leftovers_at(SITE, None, state.path(), None);
    assert!(left.is_empty(), "left behind: {left:#?}");
    // a second reconcile finds nothing
    assert_eq!(hv.reconcile(&[]).await.unwrap(), Default::default());
}
