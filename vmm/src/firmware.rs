//! The firmware that boots a stock image's own boot loader (docs/vmm.md "Images",
//! docs/guest-image.md "Operators' stock images"): SeaBIOS or OVMF, both from Debian
//! packages.

use std::path::Path;

use crate::error::ImageError;

/// OVMF's code, read-only and shared by every guest (Debian's `ovmf` package; the 4 MiB
/// build, whose variable store has room for what current distributions write).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// OVMF's empty variable store: each lease gets a writable copy of its own in its lease
/// directory (boot entries the guest writes must not reach another guest), removed with
/// the directory at teardown.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// How the firmware finds the boot loader of a disk booted without `-kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default for q35 (Debian's `seabios`, a dependency of
    /// `qemu-system-x86`): the disk's MBR boot code (GRUB's boot.img + core.img in a
    /// BIOS boot partition for a GPT disk).
    Bios,
    /// OVMF from Debian's `ovmf` package as two pflash drives: the disk's EFI system
    /// partition (`\EFI\BOOT\BOOTX64.EFI` on a fresh image).
    Uefi,
}

impl Firmware {
    /// The name provider.toml uses (`firmware = "bios"` / `"uefi"`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "bios" => Some(Firmware::Bios),
            "uefi" => Some(Firmware::Uefi),
            _ => None,
        }
    }

    /// Whether the files QEMU will load exist: refused at start, not at the first lease.
    /// SeaBIOS is part of QEMU's own install, so only OVMF is checked.
    pub fn check_installed(&self) -> Result<(), ImageError> {
        match self {
            Firmware::Bios => Ok(()),
            Firmware::Uefi => {
                for file in [OVMF_CODE, OVMF_VARS] {
                    if !Path::new(file).is_file() {
                        return Err(ImageError::FirmwareMissing { firmware: self.as_str(), path: file.into() });
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_nothing_else_parses() {
        for f in [Firmware::Bios, Firmware::Uefi] {
            assert_eq!(Firmware::parse(f.as_str()), Some(f));
        }
        for bad in ["BIOS", "efi", "", "uefi "] {
            assert_eq!(Firmware::parse(bad), None, "{bad:?}");
        }
    }
}
