//! A lease end to end on a provider whose guests libvirtd runs (`[hypervisor] backend =
//! "libvirt"`, docs/vmm.md "The libvirt backend"): `peervm lease create` from the CLI,
//! the guest seen by `virsh` as a transient domain named like the lease, a command run
//! in it, and a terminate that leaves nothing, in `virsh list --all` either.
//!
//! Site `pvlb`/`lb`, pool 10.215.40.0/24, SSH ports 27900+.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn virsh_domains() -> Vec<String> {
    let out = Command::new("virsh").args(["-c", "qemu:///system", "list", "--all", "--name"]).output().expect("virsh");
    stdout(&out).lines().map(|l| l.trim().to_string()).filter(|l| !l.is_empty()).collect()
}

#[ignore = "needs root: runs a provider whose guests libvirtd boots"]
#[test]
fn a_lease_on_a_libvirt_provider_is_a_domain_operators_see_and_ends_without_a_trace() {
    Needs::guests().tools(&["virsh"]).require();
    let _serial = serial();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    // the lease directories go below it: libvirt's QEMU (the QEMU user) traverses to them
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).unwrap();
    let lease_dir = root.join("libvirt-leases");
    let site = Site { prefix: "pvlb", iface: "lb", net: "10.215.40", port_min: 27900, vcpus: 1, memory: "1GiB" };
    let (_boot, boot) = start_bootstrap(root);
    let mut toml = site.toml(&boot);
    toml.extra_hypervisor =
        vec!["backend = \"libvirt\"".into(), format!("libvirt_lease_dir = \"{}\"", lease_dir.display())];
    let config = toml.write(&root.join("pvlb.toml"));
    let (provider, line) = spawn_json(&["provider", "run", "--config", config.to_str().unwrap()], &site.data(root));
    let provider_id = line["peer_id"].as_str().expect("peer id").to_string();
    let req = root.join("requestor");
    wait_for(HANG_GUARD, || free_vcpus(&boot, &provider_id)).expect("the provider's offer is visible");

    let lease = lease_create(&req, &boot, &SMALL_LEASE);
    let id = lease["lease"].as_str().expect("lease id").to_string();
    assert_eq!(lease["state"], "running", "{lease}");

    // operators see the guest with their own tooling, named like every object of the lease
    let domain = format!("pvlb-{id}");
    assert!(virsh_domains().contains(&domain), "virsh list --all: {:?}", virsh_domains());
    let info = Command::new("virsh").args(["-c", "qemu:///system", "dominfo", &domain]).output().unwrap();
    assert!(stdout(&info).contains("Persistent:     no"), "a transient domain: {}", stdout(&info));

    // the requestor reaches it as any guest, with the pinned host key
    let out = peervm(&req, &["exec", &id, "--", "sh", "-c", "nproc; id -u"]);
    assert!(out.status.success(), "exec: {}", stderr(&out));
    assert_eq!(stdout(&out).split_whitespace().collect::<Vec<_>>(), ["1", "0"], "{}", stdout(&out));

    let out = peervm(&req, &["lease", "terminate", &id]);
    assert!(out.status.success(), "terminate: {}", stderr(&out));
    let left = site.wait_clean(root, HANG_GUARD);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(!virsh_domains().contains(&domain), "the domain outlived its lease");
    let dirs: Vec<_> =
        std::fs::read_dir(&lease_dir).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(dirs.is_empty(), "lease directories left: {dirs:?}");
    drop(provider);
}
