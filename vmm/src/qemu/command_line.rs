//! QEMU's command line for a guest (docs/vmm.md "QEMU"): isolation options, the
//! machine from the image manifest, and lease files by descriptor number only.

use std::path::Path;

use crate::accel::Accel;
use crate::image::MachineKind;
use crate::procfs;

/// Inputs of the QEMU command line. Only descriptor numbers and public paths go on it:
/// any host user can read a command line (docs/vmm.md "Per-lease files"), so the seed
/// disk (host key) and the overlay are passed as open descriptors.
pub(super) struct GuestArgs<'a> {
    pub name: &'a str,
    pub accel: Accel,
    pub tcg_tb_size_mib: u32,
    pub machine: MachineKind,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub cmdline: &'a str,
    pub qmp_fd: i32,
    pub overlay_fds: (i32, i32),
    pub seed_fd: i32,
    pub tap_fd: i32,
    pub mac: [u8; 6],
}

pub(super) fn qemu_args(a: &GuestArgs<'_>) -> Vec<String> {
    let (machine, blk, net, rng) = match a.machine {
        MachineKind::Microvm => ("microvm,acpi=on", "virtio-blk-device", "virtio-net-device", "virtio-rng-device"),
        MachineKind::Q35 => ("q35", "virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci"),
    };
    let mut v: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| v.extend(items.iter().map(|s| s.to_string()));
    push(&["-name", &format!("guest={},debug-threads=on", a.name)]);
    // nothing QEMU would add by itself (default NIC, VGA, monitor on stdio...)
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    // seccomp: no exec, no privilege changes, no obsolete syscalls, no resource tweaks
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    // the guest powering off or rebooting ends QEMU: the lease's guest never restarts
    // behind the provider's back
    push(&["-no-reboot"]);
    let accel = a.accel.qemu_args(a.tcg_tb_size_mib);
    v.extend(accel);
    let mut push = |items: &[&str]| v.extend(items.iter().map(|s| s.to_string()));
    push(&["-M", machine]);
    push(&["-smp", &a.vcpus.to_string(), "-m", &a.memory_mib.to_string()]);
    push(&["-kernel", &a.kernel.display().to_string(), "-initrd", &a.initrd.display().to_string()]);
    let mut cmdline = a.cmdline.to_string();
    if a.machine == MachineKind::Microvm
        && a.accel == Accel::Tcg
        && let Some(khz) = host_tsc_khz()
    {
        // microvm under TCG has no timer to calibrate the TSC against and about half the
        // boots hang without its rate (docs/guest-image.md "Machine types")
        cmdline.push_str(&format!(" tsc_early_khz={khz}"));
    }
    push(&["-append", &cmdline]);
    push(&["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]);
    push(&[
        "-chardev",
        &format!("socket,id=qmp,fd={},server=on,wait=off", a.qmp_fd),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&["-add-fd", &format!("fd={},set=1,opaque=overlay-rw", a.overlay_fds.0)]);
    push(&["-add-fd", &format!("fd={},set=1,opaque=overlay-ro", a.overlay_fds.1)]);
    push(&["-drive", "file=/dev/fdset/1,if=none,id=disk0,format=qcow2,discard=unmap"]);
    push(&["-device", &format!("{blk},drive=disk0")]);
    push(&["-add-fd", &format!("fd={},set=2,opaque=seed", a.seed_fd)]);
    push(&["-drive", "file=/dev/fdset/2,if=none,id=seed0,format=raw,readonly=on"]);
    push(&["-device", &format!("{blk},drive=seed0")]);
    push(&["-netdev", &format!("tap,id=net0,fd={},vhost=off", a.tap_fd)]);
    // romfile= (empty): no iPXE option ROM, the kernel is booted directly
    let rom = if a.machine == MachineKind::Q35 { ",romfile=" } else { "" };
    push(&["-device", &format!("{net},netdev=net0,mac={}{rom}", crate::seed::format_mac(&a.mac))]);
    push(&["-device", rng]);
    v
}

/// The host's TSC rate (TCG's guest TSC runs at it).
fn host_tsc_khz() -> Option<u64> {
    procfs::cpu_mhz().map(|mhz| (mhz * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_is_isolated_and_carries_no_secret() {
        let args = qemu_args(&GuestArgs {
            name: "peervm-0123",
            accel: Accel::Tcg,
            tcg_tb_size_mib: 64,
            machine: MachineKind::Microvm,
            vcpus: 2,
            memory_mib: 256,
            kernel: Path::new("/img/vmlinux"),
            initrd: Path::new("/img/initrd.img"),
            cmdline: "console=ttyS0",
            qmp_fd: 10,
            overlay_fds: (11, 12),
            seed_fd: 13,
            tap_fd: 14,
            mac: [0x52, 0x54, 0, 1, 2, 3],
        });
        let joined = args.join(" ");
        for must in [
            "-nodefaults",
            "-sandbox on,",
            "-accel tcg,tb-size=64",
            "-M microvm,acpi=on",
            "-smp 2 -m 256",
            "socket,id=qmp,fd=10,server=on",
            "file=/dev/fdset/2,if=none,id=seed0,format=raw,readonly=on",
            "tap,id=net0,fd=14",
            "mac=52:54:00:01:02:03",
            "-name guest=peervm-0123,debug-threads=on",
        ] {
            assert!(joined.contains(must), "missing {must:?} in {joined}");
        }
        // no file of the lease by name: seed (host key) and overlay go by descriptor
        assert!(!joined.contains("seed.img") && !joined.contains("overlay.qcow2") && !joined.contains("PRIVATE"));
        // QEMU is told every drive's format, never left to probe it (docs/vmm.md "QEMU");
        // the base's format is pinned in the overlay's header (provision.rs, `-F`)
        let drives: Vec<&String> = args.windows(2).filter(|w| w[0] == "-drive").map(|w| &w[1]).collect();
        assert_eq!(drives.len(), 2, "{joined}");
        for d in drives {
            assert!(d.contains(",format=qcow2,") || d.contains(",format=raw,"), "{d}");
        }
    }
}
