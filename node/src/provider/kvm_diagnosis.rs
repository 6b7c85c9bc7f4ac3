//! Why the KVM probe failed, for `peervm doctor`: the probe boot (docs/architecture.md,
//! "Provider daemon") only says that a guest did not run under KVM; the host's facts
//! (the CPU's virtualization flags, the kvm modules, /dev/kvm and who may open it) tell
//! the causes apart, and each has its own fix (issue 20).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// What the host shows about KVM, gathered by [`KvmFacts::gather`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmFacts {
    /// /proc/cpuinfo lists `vmx` (Intel VT-x) or `svm` (AMD-V).
    pub cpu_virt_flags: bool,
    /// /proc/cpuinfo lists `hypervisor`: this machine is itself a virtual machine.
    pub in_vm: bool,
    /// /sys/module/kvm exists.
    pub kvm_module: bool,
    /// /sys/module/kvm_intel, kvm_amd or kvm_pvm (KVM without VT-x/AMD-V, for guests of
    /// some clouds) exists.
    pub vendor_module: bool,
    /// /dev/kvm as (mode, owner uid, group gid), `None` when there is no such device.
    pub device: Option<(u32, u32, u32)>,
    /// The QEMU user: name, uid and every group it is in.
    pub qemu_user: String,
    pub qemu_uid: u32,
    pub qemu_gids: Vec<u32>,
}

/// Why KVM does not work, one cause per fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmCause {
    /// The CPU shows no VT-x/AMD-V: off in the firmware, or absent.
    NoCpuSupport,
    /// A virtual machine whose host does not pass virtualization through.
    NestedOff,
    /// The CPU can, but the kvm modules are not loaded.
    ModuleNotLoaded,
    /// The modules are loaded but there is no /dev/kvm (a container without the device).
    NoDevice,
    /// /dev/kvm exists but the QEMU user may not open it read-write.
    Permission,
    /// Everything is in place in a VM, yet the guest did not run: nested KVM is broken.
    NestedBroken,
    /// Everything is in place on bare metal, yet the guest did not run.
    ProbeFailed,
}

/// A cause with what was seen and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmDiagnosis {
    pub cause: KvmCause,
    pub detail: String,
    pub fix: String,
}

impl KvmFacts {
    /// Reads the facts of this host for the QEMU user `name`, `uid`, `gids`.
    pub fn gather(qemu_user: &str, qemu_uid: u32, qemu_gids: Vec<u32>) -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split(':').nth(1).unwrap_or("").split_whitespace())
            .collect();
        let device = std::fs::metadata("/dev/kvm").ok().map(|m| (m.mode() & 0o7777, m.uid(), m.gid()));
        KvmFacts {
            cpu_virt_flags: flags.iter().any(|f| *f == "vmx" || *f == "svm"),
            in_vm: flags.contains(&"hypervisor"),
            kvm_module: Path::new("/sys/module/kvm").exists(),
            vendor_module: ["kvm_intel", "kvm_amd", "kvm_pvm"]
                .iter()
                .any(|m| Path::new("/sys/module").join(m).exists()),
            device,
            qemu_user: qemu_user.to_string(),
            qemu_uid,
            qemu_gids,
        }
    }

    /// True when the QEMU user may open /dev/kvm read-write by its mode bits.
    fn qemu_user_can_open(&self, (mode, uid, gid): (u32, u32, u32)) -> bool {
        let rw = |shift: u32| (mode >> shift) & 0o6 == 0o6;
        self.qemu_uid == 0 || (self.qemu_uid == uid && rw(6)) || (self.qemu_gids.contains(&gid) && rw(3)) || rw(0)
    }
}

/// The cause of a failed probe (which said `reason`) from the host's `facts`.
pub fn diagnose(facts: &KvmFacts, reason: &str) -> KvmDiagnosis {
    let d = |cause, detail: String, fix: &str| KvmDiagnosis { cause, detail, fix: fix.to_string() };
    let Some(device) = facts.device else {
        if !facts.cpu_virt_flags && facts.in_vm {
            return d(
                KvmCause::NestedOff,
                "this machine is a virtual machine and its host does not pass VT-x/AMD-V through (no vmx/svm \
                 flag in /proc/cpuinfo, no /dev/kvm)"
                    .into(),
                "enable nested virtualization for this VM on its host (e.g. kvm_intel nested=1 and CPU model \
                 host-passthrough), or run the provider on bare metal",
            );
        }
        if !facts.cpu_virt_flags {
            return d(
                KvmCause::NoCpuSupport,
                "the CPU shows no VT-x/AMD-V (no vmx/svm flag in /proc/cpuinfo), so there is no /dev/kvm".into(),
                "enable Intel VT-x or AMD-V (SVM) in the firmware setup, or use a CPU that has it",
            );
        }
        if !facts.kvm_module || !facts.vendor_module {
            return d(
                KvmCause::ModuleNotLoaded,
                "the CPU supports virtualization but the kvm modules are not loaded (no /dev/kvm)".into(),
                "modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD); if it refuses, `dmesg` says why \
                 (often: disabled in the firmware)",
            );
        }
        return d(
            KvmCause::NoDevice,
            "the kvm modules are loaded but /dev/kvm does not exist (a container without the device?)".into(),
            "give this system the device: `mknod /dev/kvm c 10 232` (udev normally makes it), or run a \
             container with --device /dev/kvm",
        );
    };
    if !facts.qemu_user_can_open(device) {
        let (mode, uid, gid) = device;
        return d(
            KvmCause::Permission,
            format!(
                "the QEMU user {} (uid {}) cannot open /dev/kvm (mode {:04o}, owner uid {uid}, group gid {gid})",
                facts.qemu_user, facts.qemu_uid, mode
            ),
            "let the QEMU user open it: make /dev/kvm group kvm mode 0660 (udev rule KERNEL==\"kvm\", \
             GROUP=\"kvm\", MODE=\"0660\"; Debian's udev does this) and add the user to it: \
             usermod -aG kvm peervm-qemu",
        );
    }
    if facts.in_vm {
        return d(
            KvmCause::NestedBroken,
            format!("/dev/kvm opens but the probe guest did not run under nested KVM ({reason})"),
            "fix nested virtualization on this VM's host (a newer host kernel, CPU model host-passthrough), \
             run on bare metal, or keep allow_tcg for a test provider",
        );
    }
    d(
        KvmCause::ProbeFailed,
        format!("/dev/kvm opens but the probe guest did not run under KVM ({reason})"),
        "look at `dmesg` for kvm errors and at the probe's reason; keep allow_tcg until it boots",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_UID: u32 = 990;
    const KVM_GID: u32 = 104;

    /// A bare-metal host where everything works: root:kvm 0660, the QEMU user in kvm.
    fn working() -> KvmFacts {
        KvmFacts {
            cpu_virt_flags: true,
            in_vm: false,
            kvm_module: true,
            vendor_module: true,
            device: Some((0o660, 0, KVM_GID)),
            qemu_user: "peervm-qemu".into(),
            qemu_uid: QEMU_UID,
            qemu_gids: vec![QEMU_UID, KVM_GID],
        }
    }

    fn cause(f: &KvmFacts) -> KvmCause {
        diagnose(f, "probe said no").cause
    }

    #[test]
    fn a_device_only_root_may_open_is_a_permission_problem_with_the_group_fix() {
        let mut f = working();
        f.device = Some((0o600, 0, 0));
        let dx = diagnose(&f, "x");
        assert_eq!(dx.cause, KvmCause::Permission);
        assert!(dx.detail.contains("peervm-qemu") && dx.detail.contains("0600"), "{}", dx.detail);
        assert!(dx.fix.contains("usermod -aG kvm peervm-qemu"), "{}", dx.fix);
        // the group has rw but the user is not in it
        f.device = Some((0o660, 0, KVM_GID));
        f.qemu_gids = vec![QEMU_UID];
        assert_eq!(cause(&f), KvmCause::Permission);
        // read-only for the group is not enough
        f.qemu_gids = vec![KVM_GID];
        f.device = Some((0o640, 0, KVM_GID));
        assert_eq!(cause(&f), KvmCause::Permission);
    }

    #[test]
    fn who_may_open_the_device_follows_its_mode_bits() {
        let mut f = working();
        for (device, gids, uid, opens) in [
            ((0o660, 0, KVM_GID), vec![KVM_GID], QEMU_UID, true),
            ((0o666, 0, 0), vec![], QEMU_UID, true),
            ((0o600, QEMU_UID, 0), vec![], QEMU_UID, true),
            ((0o600, 0, 0), vec![], 0, true), // a QEMU run as root
            ((0o606, 0, 0), vec![], QEMU_UID, true),
            ((0o604, 0, 0), vec![], QEMU_UID, false),
            ((0o060, QEMU_UID, KVM_GID), vec![], QEMU_UID, false),
        ] {
            f.device = Some(device);
            f.qemu_gids = gids;
            f.qemu_uid = uid;
            assert_eq!(cause(&f) != KvmCause::Permission, opens, "{device:?}");
        }
    }

    #[test]
    fn no_device_is_told_apart_by_cpu_flags_vm_and_modules() {
        let mut f = working();
        f.device = None;
        assert_eq!(cause(&f), KvmCause::NoDevice);
        f.vendor_module = false;
        assert_eq!(cause(&f), KvmCause::ModuleNotLoaded);
        f.kvm_module = false;
        let dx = diagnose(&f, "x");
        assert_eq!(dx.cause, KvmCause::ModuleNotLoaded);
        assert!(dx.fix.contains("modprobe kvm_intel"), "{}", dx.fix);
        f.cpu_virt_flags = false;
        let dx = diagnose(&f, "x");
        assert_eq!(dx.cause, KvmCause::NoCpuSupport);
        assert!(dx.fix.contains("firmware"), "{}", dx.fix);
        f.in_vm = true;
        let dx = diagnose(&f, "x");
        assert_eq!(dx.cause, KvmCause::NestedOff);
        assert!(dx.fix.contains("nested"), "{}", dx.fix);
    }

    #[test]
    fn a_device_that_opens_but_does_not_boot_is_broken_nested_kvm_in_a_vm() {
        let mut f = working();
        let dx = diagnose(&f, "no userspace within 20 s");
        assert_eq!(dx.cause, KvmCause::ProbeFailed);
        assert!(dx.detail.contains("no userspace within 20 s"), "{}", dx.detail);
        f.in_vm = true;
        let dx = diagnose(&f, "no userspace within 20 s");
        assert_eq!(dx.cause, KvmCause::NestedBroken);
        assert!(dx.detail.contains("nested KVM") && dx.detail.contains("no userspace within 20 s"), "{}", dx.detail);
    }

    #[test]
    fn gathering_the_facts_of_this_host_never_fails() {
        let f = KvmFacts::gather("peervm-qemu", QEMU_UID, vec![]);
        assert_eq!(f.qemu_uid, QEMU_UID);
        // whatever this host is, some cause comes out with a fix
        assert!(!diagnose(&f, "x").fix.is_empty());
    }
}
