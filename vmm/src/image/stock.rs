//! An operator's stock cloud image (Debian genericcloud, Ubuntu cloudimg...): one disk
//! file, pinned by the sha256 in provider.toml, booted by firmware with the image's own
//! boot loader and kernel, first-booted by the image's cloud-init from the provider's
//! NoCloud seed (docs/guest-image.md "Operators' stock images").
//!
//! What is checked before the image is offered, in this order: the file's sha256 (so
//! that everything after reads the bytes the operator pinned), the disk header (the
//! declared format, no backing file, no external data file: `disk_header::check`), the
//! virtual size (a lease's disk may not be smaller), the firmware's files.

use std::fs;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use super::{
    Boot, DiskFormat, DiskRole, FileStamp, GuestImage, MAX_BOOT_DEADLINE_SECS, MachineKind, PinnedFile, SeedKind,
    is_valid_image_name, sha256_file,
};
use crate::error::ImageError;
use crate::firmware::Firmware;
use crate::user_name::is_valid_user_name;

/// What provider.toml says of a stock image (`[[images]]` with `file`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockImage {
    pub name: String,
    /// The disk file (absolute): the QEMU user must be able to read it, as it reads the
    /// base under every lease's overlay.
    pub file: PathBuf,
    /// The file's sha256, as the distribution publishes it (`SHA256SUMS`) or as
    /// `sha256sum` prints it: the image's identity in adverts.
    pub sha256: [u8; 32],
    /// What QEMU is told (`format=`, the overlay's backing format); never probed.
    pub format: DiskFormat,
    pub firmware: Firmware,
    /// The account the seed has cloud-init create; leases must ask for it.
    pub login_user: String,
    /// From QEMU's start to SSH-ready, at most.
    pub boot_deadline: Duration,
}

impl GuestImage {
    /// Verifies a stock image and makes it offerable: refused with an error naming the
    /// file when its sha256, header, format or size is wrong, or the firmware is missing.
    ///
    /// Blocking (hashes the whole file: ~1 s per 400 MB); call it from a blocking context.
    pub fn open_stock(stock: &StockImage) -> Result<GuestImage, ImageError> {
        let bad = |reason: String| ImageError::BadStockImage { name: stock.name.clone(), reason };
        if !is_valid_image_name(&stock.name) {
            return Err(bad("the name is not 1-64 characters of [A-Za-z0-9._-]".into()));
        }
        if !is_valid_user_name(&stock.login_user) {
            return Err(bad(format!("login_user {:?} is not a valid user name", stock.login_user)));
        }
        let secs = stock.boot_deadline.as_secs();
        if !(1..=MAX_BOOT_DEADLINE_SECS).contains(&secs) {
            return Err(bad(format!("boot_deadline_secs {secs} is outside 1..={MAX_BOOT_DEADLINE_SECS}")));
        }
        stock.firmware.check_installed()?;
        let read_err = |source| ImageError::ReadFile { path: stock.file.clone(), source };
        let path = fs::canonicalize(&stock.file).map_err(read_err)?;
        let meta = fs::metadata(&path).map_err(read_err)?;
        if !meta.is_file() {
            return Err(bad(format!("{} is not a regular file", path.display())));
        }
        // the stamp from before the hash: a file changed while it was hashed is hashed
        // again at the next verify()
        let stamp = FileStamp::of(&meta);
        let actual = sha256_file(&path)?;
        if actual != stock.sha256 {
            return Err(ImageError::StockHashMismatch {
                path,
                expected_sha256: hex::encode(stock.sha256),
                actual_sha256: hex::encode(actual),
            });
        }
        // only after the hash matched: the header is then the one the operator pinned
        let virtual_size = crate::disk_header::check(&path, stock.format)?;
        let dir = path.parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/"));
        Ok(GuestImage {
            dir,
            name: stock.name.clone(),
            sha256: stock.sha256,
            files: vec![PinnedFile {
                path: path.clone(),
                sha256: stock.sha256,
                size: meta.len(),
                verified: Mutex::new(Some(stamp)),
            }],
            boot: Boot::Firmware(stock.firmware),
            disk: path,
            // q35: PCI devices SeaBIOS and OVMF boot from, ACPI power-off
            machine: MachineKind::Q35,
            disk_role: DiskRole::Root,
            disk_format: stock.format,
            disk_virtual_size: Some(virtual_size),
            base_virtual_size: virtual_size,
            boot_deadline: Some(stock.boot_deadline),
            login_user: Some(stock.login_user.clone()),
            // a stock image's cloud-init reads the whole cloud-config
            seed: SeedKind::CloudInit,
            // nothing known of its boot: the backend's default
            tcg_tb_size_mib: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::VmmError;
    use sha2::{Digest, Sha256};

    fn stock(dir: &std::path::Path, data: &[u8], format: DiskFormat) -> StockImage {
        let file = dir.join("cloud.img");
        fs::write(&file, data).unwrap();
        StockImage {
            name: "debian-12-genericcloud".into(),
            file,
            sha256: Sha256::digest(data).into(),
            format,
            firmware: Firmware::Bios,
            login_user: "peervm".into(),
            boot_deadline: Duration::from_secs(300),
        }
    }

    #[test]
    fn a_verified_qcow2_boots_by_firmware_with_its_header_size_as_the_smallest_disk() {
        let dir = tempfile::tempdir().unwrap();
        let data = crate::disk_header::qcow2_v3_header((2 << 30) + 512);
        let spec = stock(dir.path(), &data, DiskFormat::Qcow2);
        let img = GuestImage::open_stock(&spec).unwrap();
        assert_eq!(img.name(), "debian-12-genericcloud");
        assert_eq!(img.sha256(), spec.sha256, "the advertised identity is the file's sha256");
        assert_eq!(img.boot(), &Boot::Firmware(Firmware::Bios));
        assert_eq!(img.base_disk(), fs::canonicalize(&spec.file).unwrap());
        assert_eq!(img.disk_format(), DiskFormat::Qcow2);
        assert_eq!(img.disk_role(), DiskRole::Root);
        assert_eq!(img.disk_virtual_size(), Some((2 << 30) + 512));
        assert_eq!(img.seed_kind(), SeedKind::CloudInit);
        assert_eq!(img.login_user(), Some("peervm"));
        assert_eq!(img.boot_deadline(), Some(Duration::from_secs(300)));
        // a lease's disk must hold the image: 2 GiB is 512 bytes short
        assert!(matches!(img.check_lease("peervm", 2), Err(VmmError::DiskTooSmall { .. })));
        assert!(img.check_lease("peervm", 3).is_ok());
        assert!(matches!(img.check_lease("alice", 3), Err(VmmError::WrongLoginUser { .. })));
        assert!(img.verify().is_ok());
    }

    #[test]
    fn a_raw_image_is_as_large_as_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let img = GuestImage::open_stock(&stock(dir.path(), &[0u8; 8192], DiskFormat::Raw)).unwrap();
        assert_eq!(img.disk_virtual_size(), Some(8192));
        assert_eq!(img.disk_format(), DiskFormat::Raw);
    }

    #[test]
    fn a_sha256_mismatch_is_refused_naming_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = stock(dir.path(), &crate::disk_header::qcow2_v3_header(1 << 30), DiskFormat::Qcow2);
        spec.sha256[0] ^= 1;
        match GuestImage::open_stock(&spec) {
            Err(e @ ImageError::StockHashMismatch { .. }) => {
                let text = e.to_string();
                assert!(text.contains(&hex::encode(spec.sha256)) && text.contains("cloud.img"), "{text}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_file_changed_after_start_is_refused_before_the_next_lease() {
        let dir = tempfile::tempdir().unwrap();
        let spec = stock(dir.path(), &crate::disk_header::qcow2_v3_header(1 << 30), DiskFormat::Qcow2);
        let img = GuestImage::open_stock(&spec).unwrap();
        let mut other = crate::disk_header::qcow2_v3_header(1 << 30);
        other[30] ^= 1;
        fs::write(&spec.file, &other).unwrap();
        assert!(matches!(img.verify(), Err(ImageError::HashMismatch { .. })));
    }

    #[test]
    fn a_header_reaching_outside_or_of_another_format_is_refused_after_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let mut backed = crate::disk_header::qcow2_v3_header(1 << 30);
        backed[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        backed[16..20].copy_from_slice(&10u32.to_be_bytes());
        let err = GuestImage::open_stock(&stock(dir.path(), &backed, DiskFormat::Qcow2)).unwrap_err();
        assert!(err.to_string().contains("backing file"), "{err}");
        // a qcow2 declared raw would let the guest see (and write) qcow2 metadata
        let qcow2 = crate::disk_header::qcow2_v3_header(1 << 30);
        let err = GuestImage::open_stock(&stock(dir.path(), &qcow2, DiskFormat::Raw)).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeDisk { .. }), "{err}");
        let err = GuestImage::open_stock(&stock(dir.path(), &[0u8; 4096], DiskFormat::Qcow2)).unwrap_err();
        assert!(matches!(err, ImageError::UnsafeDisk { .. }), "{err}");
    }

    #[test]
    fn bad_names_users_deadlines_and_paths_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = stock(dir.path(), &[0u8; 4096], DiskFormat::Raw);
        let cases: [(&str, StockImage); 5] = [
            ("name", StockImage { name: "debian 12".into(), ..good.clone() }),
            ("user", StockImage { login_user: "Root!".into(), ..good.clone() }),
            ("deadline 0", StockImage { boot_deadline: Duration::ZERO, ..good.clone() }),
            ("deadline", StockImage { boot_deadline: Duration::from_secs(MAX_BOOT_DEADLINE_SECS + 1), ..good.clone() }),
            ("directory", StockImage { file: dir.path().into(), ..good.clone() }),
        ];
        for (what, spec) in cases {
            assert!(matches!(GuestImage::open_stock(&spec), Err(ImageError::BadStockImage { .. })), "{what}");
        }
        let missing = StockImage { file: dir.path().join("nope.qcow2"), ..good };
        assert!(matches!(GuestImage::open_stock(&missing), Err(ImageError::ReadFile { .. })));
    }
}
