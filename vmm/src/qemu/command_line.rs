//! QEMU's command line for a guest (docs/vmm.md "QEMU"): isolation options, the
//! machine from the image manifest, how it boots (the image's kernel, or the firmware
//! and the disk's own boot loader), and lease files by descriptor number only.

use crate::accel::Accel;
use crate::firmware::{Firmware, OVMF_CODE};
use crate::image::{Boot, MachineKind};
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
    pub boot: &'a Boot,
    pub qmp_fd: i32,
    pub overlay_fds: (i32, i32),
    pub seed_fd: i32,
    /// The lease's own copy of OVMF's variable store (read-write, read-only), for
    /// `Boot::Firmware(Firmware::Uefi)`.
    pub uefi_vars_fds: Option<(i32, i32)>,
    pub tap_fd: i32,
    pub mac: [u8; 6],
}

pub(super) fn qemu_args(a: &GuestArgs<'_>) -> Vec<String> {
    let (blk, net, rng) = match a.machine {
        MachineKind::Microvm => ("virtio-blk-device", "virtio-net-device", "virtio-rng-device"),
        MachineKind::Q35 => ("virtio-blk-pci", "virtio-net-pci", "virtio-rng-pci"),
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
    push(&["-M", a.machine.qemu_machine()]);
    push(&["-smp", &a.vcpus.to_string(), "-m", &a.memory_mib.to_string()]);
    // the root disk is the one the firmware boots; direct kernel boot needs no index
    let mut bootindex = "";
    match a.boot {
        Boot::Direct { kernel, initrd, cmdline } => {
            push(&["-kernel", &kernel.display().to_string(), "-initrd", &initrd.display().to_string()]);
            let mut cmdline = cmdline.clone();
            if a.machine == MachineKind::Microvm
                && a.accel == Accel::Tcg
                && let Some(khz) = host_tsc_khz()
            {
                // microvm under TCG has no timer to calibrate the TSC against and about
                // half the boots hang without its rate (docs/guest-image.md "Machine types")
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
            push(&["-append", &cmdline]);
        }
        // SeaBIOS: QEMU's default firmware, nothing to add
        Boot::Firmware(Firmware::Bios) => bootindex = ",bootindex=0",
        Boot::Firmware(Firmware::Uefi) => {
            bootindex = ",bootindex=0";
            // OVMF's code is public and shared; the variable store is the lease's own
            // copy, passed by descriptor like every lease file
            push(&["-drive", &format!("if=pflash,unit=0,format=raw,readonly=on,file={OVMF_CODE}")]);
            if let Some((rw, ro)) = a.uefi_vars_fds {
                push(&["-add-fd", &format!("fd={rw},set=3,opaque=uefi-vars-rw")]);
                push(&["-add-fd", &format!("fd={ro},set=3,opaque=uefi-vars-ro")]);
                push(&["-drive", "if=pflash,unit=1,format=raw,file=/dev/fdset/3"]);
            }
        }
    }
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
    push(&["-device", &format!("{blk},drive=disk0{bootindex}")]);
    push(&["-add-fd", &format!("fd={},set=2,opaque=seed", a.seed_fd)]);
    push(&["-drive", "file=/dev/fdset/2,if=none,id=seed0,format=raw,readonly=on"]);
    push(&["-device", &format!("{blk},drive=seed0")]);
    push(&["-netdev", &format!("tap,id=net0,fd={},vhost=off", a.tap_fd)]);
    // romfile= (empty): no iPXE option ROM; the kernel is booted directly or the
    // firmware boots the root disk, never the network
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
    use std::path::PathBuf;

    use super::*;

    fn direct() -> Boot {
        Boot::Direct {
            kernel: PathBuf::from("/img/vmlinux"),
            initrd: PathBuf::from("/img/initrd.img"),
            cmdline: "console=ttyS0".into(),
        }
    }

    fn args(machine: MachineKind, boot: &Boot, uefi_vars_fds: Option<(i32, i32)>) -> Vec<String> {
        qemu_args(&GuestArgs {
            name: "peervm-0123",
            accel: Accel::Tcg,
            tcg_tb_size_mib: 64,
            machine,
            vcpus: 2,
            memory_mib: 256,
            boot,
            qmp_fd: 10,
            overlay_fds: (11, 12),
            seed_fd: 13,
            uefi_vars_fds,
            tap_fd: 14,
            mac: [0x52, 0x54, 0, 1, 2, 3],
        })
    }

    /// The values of every `flag` in `args`.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn command_line_is_isolated_and_carries_no_secret() {
        let args = args(MachineKind::Microvm, &direct(), None);
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
        assert_eq!(values(&args, "-kernel"), ["/img/vmlinux"]);
        assert!(!joined.contains("bootindex") && !joined.contains("pflash"), "{joined}");
    }

    #[test]
    fn a_firmware_boot_has_no_kernel_and_boots_the_root_disk() {
        for (fw, pflash) in [(Firmware::Bios, 0), (Firmware::Uefi, 2)] {
            let args = args(MachineKind::Q35, &Boot::Firmware(fw), Some((15, 16)));
            let joined = args.join(" ");
            for absent in ["-kernel", "-initrd", "-append", "-bios"] {
                assert!(!args.iter().any(|a| a == absent), "{fw:?}: {absent} in {joined}");
            }
            assert_eq!(values(&args, "-device").iter().filter(|d| d.contains("bootindex")).count(), 1);
            assert!(values(&args, "-device").contains(&"virtio-blk-pci,drive=disk0,bootindex=0"), "{joined}");
            assert!(joined.contains("romfile="), "no network boot ROM: {joined}");
            // none of the q35 devices no guest uses (docs/vmm.md "Host memory per guest")
            assert_eq!(values(&args, "-M"), ["q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off"]);
            let drives = values(&args, "-drive");
            assert_eq!(drives.iter().filter(|d| d.starts_with("if=pflash")).count(), pflash, "{joined}");
            // every drive names its format, the pflash ones too
            assert!(drives.iter().all(|d| d.contains("format=")), "{joined}");
            if fw == Firmware::Uefi {
                assert!(
                    drives.contains(&"if=pflash,unit=0,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd")
                );
                // the variable store is the lease's copy, by descriptor
                assert!(drives.contains(&"if=pflash,unit=1,format=raw,file=/dev/fdset/3"), "{joined}");
                assert!(joined.contains("-add-fd fd=15,set=3,") && joined.contains("-add-fd fd=16,set=3,"));
                assert!(!joined.contains("OVMF_VARS"), "{joined}");
            }
        }
    }
}
