//! The libvirt backend's domain XML for a lease (docs/vmm.md "The libvirt backend"): the
//! same guest as QEMU's command line (command_line.rs) describes, in libvirt's terms.
//!
//! - a transient domain named like every other object of the lease (`<long>-<hex>`),
//!   with peervm's metadata element, so reconcile tells its own domains from an
//!   operator's that happen to carry the prefix;
//! - QEMU as the unprivileged QEMU user (a static DAC label) and `relabel='no'`: libvirt
//!   chowns nothing (it would otherwise hand the image's kernel, initrd and base disk to
//!   the QEMU user while a guest runs); the lease's own files are the QEMU user's already;
//! - the CPU quota as `<cputune>` global period and quota (the whole domain, not per
//!   vCPU), like the QEMU backend's cgroup quota; the memory limit is set on the live
//!   domain (`libvirt.rs`);
//! - the NIC on a tap that exists already (`managed='no'`): vmm made it, and moves it into
//!   the lease namespace once the (paused) domain holds it;
//! - power-off, reboot and crash all end the domain, as `-no-reboot` ends QEMU.

use std::fmt::Write;
use std::path::Path;

use crate::accel::Accel;
use crate::firmware::{Firmware, OVMF_CODE};
use crate::image::{Boot, MachineKind};

/// The namespace of peervm's metadata element in a domain's XML.
pub(crate) const METADATA_URI: &str = "urn:peervm:lease:v1";
/// Its element name (and prefix).
pub(crate) const METADATA_KEY: &str = "peervm";

/// Everything a lease's domain is made of.
pub(crate) struct DomainSpec<'a> {
    pub name: &'a str,
    pub lease_hex: &'a str,
    pub accel: Accel,
    /// TCG's translation buffer (`VmmConfig::tcg_tb_size_for`); unused under KVM.
    pub tcg_tb_size_mib: u32,
    pub machine: MachineKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// CPU time per period, µs; the period is `cpu_period_us`.
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    pub boot: &'a Boot,
    pub qemu_uid: u32,
    pub qemu_gid: u32,
    pub overlay: &'a Path,
    pub base: &'a Path,
    /// `qcow2` or `raw`: the base's format, never probed.
    pub base_format: &'a str,
    pub seed: &'a Path,
    /// UEFI only: the lease's copy of OVMF's variable store.
    pub uefi_vars: Option<&'a Path>,
    pub console: &'a Path,
    pub tap: &'a str,
    pub mac: &'a str,
}

/// Text for an XML attribute or element body.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&apos;").replace('"', "&quot;")
}

fn path(p: &Path) -> String {
    esc(&p.display().to_string())
}

/// The domain XML. Only q35 images: libvirt has no microvm machine.
pub(crate) fn domain_xml(d: &DomainSpec<'_>) -> String {
    let kind = match d.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "qemu",
    };
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{kind}'>");
    let _ = writeln!(x, "  <name>{}</name>", esc(d.name));
    let _ = writeln!(
        x,
        "  <metadata><{METADATA_KEY}:lease xmlns:{METADATA_KEY}='{METADATA_URI}'>{}</{METADATA_KEY}:lease></metadata>",
        esc(d.lease_hex)
    );
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", d.memory_mib);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", d.vcpus);
    let _ = writeln!(
        x,
        "  <seclabel type='static' model='dac' relabel='no'><label>+{}:+{}</label></seclabel>",
        d.qemu_uid, d.qemu_gid
    );
    let _ = writeln!(
        x,
        "  <cputune><global_period>{}</global_period><global_quota>{}</global_quota></cputune>",
        d.cpu_period_us, d.cpu_quota_us
    );
    let machine = match d.machine {
        MachineKind::Q35 | MachineKind::Microvm => "q35",
    };
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='{machine}'>hvm</type>");
    let mut disk_boot = "";
    match d.boot {
        Boot::Direct { kernel, initrd, cmdline } => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", path(kernel));
            let _ = writeln!(x, "    <initrd>{}</initrd>", path(initrd));
            let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(cmdline));
        }
        Boot::Firmware(Firmware::Bios) => disk_boot = "<boot order='1'/>",
        Boot::Firmware(Firmware::Uefi) => {
            disk_boot = "<boot order='1'/>";
            let _ = writeln!(x, "    <loader readonly='yes' type='pflash'>{}</loader>", esc(OVMF_CODE));
            if let Some(vars) = d.uefi_vars {
                let _ = writeln!(x, "    <nvram>{}</nvram>", path(vars));
            }
        }
    }
    let _ = writeln!(x, "  </os>");
    // as MachineKind::qemu_machine(), as far as libvirt 9.0 can say it: no SMM, no
    // VMware I/O port (`smm=off,vmport=off` on `-machine`). The PS/2 controller stays
    // (libvirt 9.0 refuses `<ps2 state='off'/>`: "unexpected feature 'ps2'"), and so do
    // q35's AHCI and SMBus controllers, which libvirt models as the machine's built-in
    // ones with no element for `sata=off,smbus=off` (docs/vmm.md "The libvirt backend")
    // and the same translation buffer as the QEMU backend's `-accel tcg,tb-size=`: left
    // to QEMU 7.2 it is up to 1 GiB (at most an eighth of the host's memory), filled as
    // guest code is translated
    let tcg = match d.accel {
        Accel::Tcg => format!("<tcg><tb-cache unit='MiB'>{}</tb-cache></tcg>", d.tcg_tb_size_mib),
        Accel::Kvm => String::new(),
    };
    let _ = writeln!(x, "  <features><acpi/><smm state='off'/><vmport state='off'/>{tcg}</features>");
    let _ =
        writeln!(x, "  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>");
    let _ = writeln!(x, "  <devices>");
    let _ = writeln!(
        x,
        "    <disk type='file' device='disk'><driver name='qemu' type='qcow2' discard='unmap'/>\
         <source file='{}'/><backingStore type='file'><format type='{}'/><source file='{}'/><backingStore/>\
         </backingStore><target dev='vda' bus='virtio'/>{disk_boot}</disk>",
        path(d.overlay),
        esc(d.base_format),
        path(d.base)
    );
    let _ = writeln!(
        x,
        "    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
         <target dev='vdb' bus='virtio'/><readonly/></disk>",
        path(d.seed)
    );
    // no iPXE option ROM: the guest never boots from the network
    let _ = writeln!(
        x,
        "    <interface type='ethernet'><target dev='{}' managed='no'/><model type='virtio'/>\
         <mac address='{}'/><rom enabled='no'/></interface>",
        esc(d.tap),
        esc(d.mac)
    );
    // virtlogd writes the serial console to the lease's console.log, rotated at its
    // max_size (2 MiB, 3 backups by default): a guest cannot fill the provider's disk
    let _ = writeln!(x, "    <serial type='file'><source path='{}'/></serial>", path(d.console));
    let _ = writeln!(x, "    <controller type='usb' model='none'/>");
    let _ = writeln!(x, "    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>");
    let _ = writeln!(x, "    <memballoon model='none'/>");
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    x
}

/// Whether a domain's XML carries peervm's metadata for `lease_hex`.
pub(crate) fn is_ours(xml: &str, lease_hex: &str) -> bool {
    xml.contains(METADATA_URI) && xml.contains(&format!(">{lease_hex}</"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn spec<'a>(boot: &'a Boot, name: &'a str) -> DomainSpec<'a> {
        DomainSpec {
            name,
            lease_hex: "0123",
            accel: Accel::Tcg,
            tcg_tb_size_mib: 40,
            machine: MachineKind::Q35,
            vcpus: 2,
            memory_mib: 256,
            cpu_quota_us: 50_000,
            cpu_period_us: 100_000,
            boot,
            qemu_uid: 999,
            qemu_gid: 995,
            overlay: Path::new("/l/0123/overlay.qcow2"),
            base: Path::new("/img/base.qcow2"),
            base_format: "qcow2",
            seed: Path::new("/l/0123/seed.img"),
            uefi_vars: None,
            console: Path::new("/l/0123/console.log"),
            tap: "pt0123456789abt",
            mac: "52:54:00:01:02:03",
        }
    }

    #[test]
    fn the_domain_is_the_lease_s_guest_under_its_limits_and_user() {
        let boot = Boot::Direct {
            kernel: PathBuf::from("/img/vmlinuz"),
            initrd: PathBuf::from("/img/initrd.img"),
            cmdline: "console=ttyS0 a<b".into(),
        };
        let x = domain_xml(&spec(&boot, "pvtest-0123"));
        for must in [
            "<domain type='qemu'>",
            "<name>pvtest-0123</name>",
            "xmlns:peervm='urn:peervm:lease:v1'>0123</peervm:lease>",
            "<memory unit='MiB'>256</memory>",
            "<vcpu>2</vcpu>",
            "relabel='no'><label>+999:+995</label>",
            "<global_period>100000</global_period><global_quota>50000</global_quota>",
            "machine='q35'",
            "<kernel>/img/vmlinuz</kernel>",
            "<cmdline>console=ttyS0 a&lt;b</cmdline>",
            "<source file='/l/0123/overlay.qcow2'/><backingStore type='file'><format type='qcow2'/>",
            "<source file='/l/0123/seed.img'/><target dev='vdb' bus='virtio'/><readonly/>",
            "<target dev='pt0123456789abt' managed='no'/>",
            "<rom enabled='no'/>",
            "<on_reboot>destroy</on_reboot>",
            "<features><acpi/><smm state='off'/><vmport state='off'/><tcg><tb-cache unit='MiB'>40</tb-cache></tcg>\
             </features>",
        ] {
            assert!(x.contains(must), "missing {must:?} in\n{x}");
        }
        assert!(!x.contains("boot order"), "direct kernel boot: {x}");
        assert!(is_ours(&x, "0123"));
        assert!(!is_ours(&x, "4567"));
        assert!(!is_ours("<domain><name>pvtest-0123</name></domain>", "0123"));
    }

    #[test]
    fn a_firmware_boot_boots_the_overlay() {
        let boot = Boot::Firmware(Firmware::Uefi);
        let vars = PathBuf::from("/l/0123/uefi-vars.fd");
        let mut s = spec(&boot, "pvtest-0123");
        s.uefi_vars = Some(&vars);
        s.accel = Accel::Kvm;
        let x = domain_xml(&s);
        assert!(x.contains("<domain type='kvm'>") && x.contains("<boot order='1'/>"), "{x}");
        assert!(!x.contains("<tcg>"), "no translation buffer under KVM: {x}");
        assert!(x.contains("<nvram>/l/0123/uefi-vars.fd</nvram>") && x.contains(OVMF_CODE), "{x}");
        assert!(!x.contains("<kernel>"), "{x}");
    }
}
