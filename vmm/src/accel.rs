//! Acceleration: KVM where it works, software emulation (TCG) only when the provider's
//! config allows it (docs/vmm.md "Acceleration").
//!
//! "Works" is decided by booting: /dev/kvm can exist, open and answer ioctls on hosts
//! where guests still hang or die (docs/vmm.md "The development hosts": nested KVM
//! there aborts on an MSR, hangs after the BIOS, or dies with "emulation failure"). So
//! the probe boots the image's kernel under KVM with the same QEMU options as a real
//! guest, and calls KVM usable only when the guest reaches userspace before a deadline.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::error::VmmError;
use crate::image::{Boot, GuestImage};
use crate::launch::Launch;
use crate::qemu_user::QemuUser;

/// The accelerator guests run on; it goes into the advert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(&self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }

    /// QEMU's accelerator and CPU options. The probe uses the same, so a probe that
    /// passes means real guests boot.
    pub(crate) fn qemu_args(&self, tcg_tb_size_mib: u32) -> Vec<String> {
        match self {
            Accel::Kvm => vec!["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()],
            // The translation cache is capped: QEMU's default (1 GiB) would let TCG's
            // host memory per guest grow far past the guest's RAM.
            Accel::Tcg => vec!["-accel".into(), format!("tcg,tb-size={tcg_tb_size_mib}")],
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the provider's config allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccelPolicy {
    /// KVM or nothing: a provider that will not sell slow guests.
    KvmOnly,
    /// KVM when the probe passes, else TCG (explicit opt-in, advertised as `tcg`).
    KvmOrTcg,
    /// TCG without probing (tests, hosts known to lack KVM).
    TcgOnly,
}

/// The outcome of `probe_kvm`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmProbe {
    /// A guest reached userspace under KVM after `boot_time`.
    Usable {
        boot_time: Duration,
    },
    Unusable {
        reason: String,
    },
}

/// Picks the accelerator for this provider, or says why there is none.
pub fn select_accel(policy: AccelPolicy, probe: &KvmProbe) -> Result<Accel, VmmError> {
    match (policy, probe) {
        (AccelPolicy::TcgOnly, _) => Ok(Accel::Tcg),
        (_, KvmProbe::Usable { .. }) => Ok(Accel::Kvm),
        (AccelPolicy::KvmOrTcg, KvmProbe::Unusable { reason }) => {
            tracing::warn!(%reason, "KVM unusable: guests run on software emulation (TCG)");
            Ok(Accel::Tcg)
        }
        (AccelPolicy::KvmOnly, KvmProbe::Unusable { reason }) => {
            Err(VmmError::NoAcceleration { reason: reason.clone() })
        }
    }
}

/// How to probe.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub qemu_binary: PathBuf,
    /// The user real guests run as: its access to /dev/kvm is part of "usable".
    pub user: QemuUser,
    pub deadline: Duration,
}

/// Console lines that show the guest kernel reached userspace: the kernel's own (with
/// the console log level raised for the probe) or the minimal image's first milestone.
const USERSPACE_MARKERS: &[&str] = &["Run /init as init process", "peervm-guest:"];

/// Boots `image` under KVM and reports whether its kernel reached userspace before the
/// deadline. Never fails: every problem is a reason for `Unusable`.
pub async fn probe_kvm(image: &GuestImage, opts: &ProbeOptions) -> KvmProbe {
    let unusable = |reason: String| KvmProbe::Unusable { reason };
    if let Err(e) = std::fs::metadata("/dev/kvm") {
        return unusable(format!("/dev/kvm: {e}"));
    }
    let Boot::Direct { kernel, initrd, cmdline } = image.boot() else {
        // the probe watches for the kernel's own userspace marker, which only a kernel
        // booted with the probe's log level prints
        return unusable(format!("image {} boots by firmware: the probe needs one with a kernel", image.name()));
    };
    if let Err(e) = image.verify() {
        return unusable(format!("cannot probe with image {}: {e}", image.name()));
    }
    let mut args: Vec<String> = vec![
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-sandbox".into(),
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into(),
        "-no-reboot".into(),
        "-serial".into(),
        "stdio".into(),
        "-m".into(),
        "128".into(),
        "-smp".into(),
        "1".into(),
    ];
    args.extend(Accel::Kvm.qemu_args(0));
    args.extend(["-M".to_string(), image.machine().qemu_machine().to_string()]);
    args.extend([
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        // a later loglevel= wins over the image's "quiet": the kernel's own userspace
        // marker is printed at info level
        format!("{cmdline} loglevel=7 panic=-1"),
    ]);
    let launch = Launch {
        program: &opts.qemu_binary,
        args,
        user: &opts.user,
        netns: None,
        cgroup_procs: Vec::new(),
        inherit: Vec::new(),
        tap: None,
        output: None,
    };
    let started = Instant::now();
    let mut child = match launch.spawn() {
        Ok(c) => c,
        Err(e) => return unusable(format!("cannot start {}: {e}", opts.qemu_binary.display())),
    };
    let (Some(stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        let _ = child.start_kill();
        return unusable("QEMU's output was not captured".into());
    };
    let mut lines = BufReader::new(stdout).lines();
    let mut last_line = String::new();
    let watch = async {
        loop {
            match lines.next_line().await {
                Ok(Some(line)) => {
                    if USERSPACE_MARKERS.iter().any(|m| line.contains(m)) {
                        return true;
                    }
                    if !line.trim().is_empty() {
                        last_line = line.trim().chars().take(200).collect();
                    }
                }
                // QEMU exited (or its output closed) without reaching userspace
                _ => return false,
            }
        }
    };
    let outcome = tokio::time::timeout(opts.deadline, watch).await;
    let _ = child.start_kill();
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    let mut err_text = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), stderr.read_to_string(&mut err_text)).await;
    let err_text: String = err_text.trim().lines().last().unwrap_or_default().chars().take(300).collect();
    match outcome {
        Ok(true) => KvmProbe::Usable { boot_time: started.elapsed() },
        Ok(false) => unusable(format!(
            "QEMU with -accel kvm exited before the guest reached userspace ({}){}",
            status.map(|s| s.map(|s| s.to_string()).unwrap_or_default()).unwrap_or_default(),
            if err_text.is_empty() { String::new() } else { format!(": {err_text}") }
        )),
        Err(_) => unusable(format!(
            "the guest did not reach userspace under KVM within {:?} (last console line: {:?}){}",
            opts.deadline,
            last_line,
            if err_text.is_empty() { String::new() } else { format!("; QEMU: {err_text}") }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_decides_the_accelerator() {
        let ok = KvmProbe::Usable { boot_time: Duration::from_secs(1) };
        let broken = KvmProbe::Unusable { reason: "hangs".into() };
        assert_eq!(select_accel(AccelPolicy::KvmOnly, &ok).unwrap(), Accel::Kvm);
        assert_eq!(select_accel(AccelPolicy::KvmOrTcg, &ok).unwrap(), Accel::Kvm);
        assert_eq!(select_accel(AccelPolicy::KvmOrTcg, &broken).unwrap(), Accel::Tcg);
        assert_eq!(select_accel(AccelPolicy::TcgOnly, &ok).unwrap(), Accel::Tcg);
        let err = select_accel(AccelPolicy::KvmOnly, &broken).unwrap_err().to_string();
        assert!(err.contains("hangs") && err.contains("TCG"), "{err}");
    }
}
