//! What an image's disk file says about itself, checked before QEMU ever opens it.
//!
//! A qcow2 header can name a backing file or an external data file: QEMU would then read
//! that host path on the guest's behalf (a known way to leak host files into a guest).
//! An image's disk must stand alone, and must be the format its manifest declares (QEMU
//! is always given `format=`, so it never probes; see docs/vmm.md "Images").
//! Layout: QEMU's docs/interop/qcow2.txt (all fields big-endian).

use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::error::ImageError;
use crate::image::DiskFormat;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Version 3 headers are at least 104 bytes; version 2 ones 72.
const HEADER_V2_BYTES: usize = 72;
const HEADER_V3_BYTES: usize = 104;
/// incompatible_features bit 2: the guest data lives in an external data file.
const INCOMPAT_EXTERNAL_DATA_FILE: u64 = 1 << 2;

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// The header of a standalone qcow2 v3 disk of `virtual_size` bytes, as
/// `qemu-img create -f qcow2` starts one. Test fixtures write it as a whole "disk": it
/// passes [`check`], though QEMU would need the tables that follow it to boot from it.
pub fn qcow2_v3_header(virtual_size: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_V3_BYTES];
    h[..4].copy_from_slice(&QCOW2_MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes()); // cluster_bits: 64 KiB clusters
    h[24..32].copy_from_slice(&virtual_size.to_be_bytes());
    h[100..104].copy_from_slice(&(HEADER_V3_BYTES as u32).to_be_bytes()); // header_length
    h
}

/// Refuses a disk whose header does not match `format`, or a qcow2 that reaches outside
/// itself (a backing file or an external data file). Returns the disk's virtual size in
/// bytes, what the guest sees: the qcow2 header's `size`, a raw file's length. A lease's
/// disk must be at least that large (`GuestImage::check_lease`): an overlay smaller than
/// its base would cut the base's file system short.
pub fn check(path: &Path, format: DiskFormat) -> Result<u64, ImageError> {
    let read_err = |source| ImageError::ReadFile { path: path.into(), source };
    let mut head = Vec::with_capacity(HEADER_V3_BYTES);
    let file = File::open(path).map_err(read_err)?;
    let file_len = file.metadata().map_err(read_err)?.len();
    file.take(HEADER_V3_BYTES as u64).read_to_end(&mut head).map_err(read_err)?;
    check_header(&head, format).map_err(|reason| ImageError::UnsafeDisk { path: path.into(), reason })?;
    let size = match format {
        DiskFormat::Qcow2 => be_u64(&head, 24),
        DiskFormat::Raw => file_len,
    };
    if size == 0 {
        return Err(ImageError::UnsafeDisk { path: path.into(), reason: "the disk's virtual size is 0".into() });
    }
    Ok(size)
}

/// The decision on the first bytes of a disk file; `Err` says why it is refused.
pub fn check_header(head: &[u8], format: DiskFormat) -> Result<(), String> {
    let is_qcow2 = head.len() >= 4 && head[..4] == QCOW2_MAGIC;
    match format {
        DiskFormat::Raw if is_qcow2 => {
            Err("the manifest says raw but the file is a qcow2 image; give its real format".into())
        }
        DiskFormat::Raw => Ok(()),
        DiskFormat::Qcow2 if !is_qcow2 => Err("the manifest says qcow2 but the file has no qcow2 header".into()),
        DiskFormat::Qcow2 => {
            if head.len() < HEADER_V2_BYTES {
                return Err("the qcow2 header is truncated".into());
            }
            let version = be_u32(head, 4);
            let backing_offset = be_u64(head, 8);
            let backing_size = be_u32(head, 16);
            if backing_offset != 0 || backing_size != 0 {
                return Err("the qcow2 image names a backing file; an image's disk must stand alone".into());
            }
            match version {
                2 => Ok(()),
                3 if head.len() < HEADER_V3_BYTES => Err("the qcow2 v3 header is truncated".into()),
                3 if be_u64(head, 72) & INCOMPAT_EXTERNAL_DATA_FILE != 0 => {
                    Err("the qcow2 image keeps its data in an external data file; an image's disk must stand alone"
                        .into())
                }
                3 => Ok(()),
                v => Err(format!("qcow2 version {v} is not supported (2 or 3)")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_v3() -> Vec<u8> {
        qcow2_v3_header(64 << 20)
    }

    #[test]
    fn a_standalone_qcow2_and_a_raw_disk_pass() {
        assert_eq!(check_header(&qcow2_v3(), DiskFormat::Qcow2), Ok(()));
        let mut v2 = qcow2_v3();
        v2[4..8].copy_from_slice(&2u32.to_be_bytes());
        assert_eq!(check_header(&v2[..HEADER_V2_BYTES], DiskFormat::Qcow2), Ok(()));
        assert_eq!(check_header(&[0u8; 512], DiskFormat::Raw), Ok(()));
    }

    #[test]
    fn a_qcow2_naming_a_backing_file_is_refused() {
        let mut h = qcow2_v3();
        h[8..16].copy_from_slice(&0x200u64.to_be_bytes());
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        let err = check_header(&h, DiskFormat::Qcow2).unwrap_err();
        assert!(err.contains("backing file"), "{err}");
        // a size alone (offset 0) is just as suspect
        let mut h = qcow2_v3();
        h[16..20].copy_from_slice(&11u32.to_be_bytes());
        assert!(check_header(&h, DiskFormat::Qcow2).is_err());
    }

    #[test]
    fn a_qcow2_with_an_external_data_file_is_refused() {
        let mut h = qcow2_v3();
        h[72..80].copy_from_slice(&INCOMPAT_EXTERNAL_DATA_FILE.to_be_bytes());
        let err = check_header(&h, DiskFormat::Qcow2).unwrap_err();
        assert!(err.contains("external data file"), "{err}");
    }

    #[test]
    fn the_virtual_size_is_the_qcow2_size_field_or_the_raw_length() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("q");
        std::fs::write(&q, qcow2_v3_header(3 << 30)).unwrap();
        assert_eq!(check(&q, DiskFormat::Qcow2).unwrap(), 3 << 30);
        let r = dir.path().join("r");
        std::fs::write(&r, vec![0u8; 4096]).unwrap();
        assert_eq!(check(&r, DiskFormat::Raw).unwrap(), 4096);
        std::fs::write(&r, b"").unwrap();
        assert!(matches!(check(&r, DiskFormat::Raw), Err(ImageError::UnsafeDisk { .. })));
    }

    #[test]
    fn a_disk_whose_format_is_not_the_declared_one_is_refused() {
        assert!(check_header(&qcow2_v3(), DiskFormat::Raw).unwrap_err().contains("says raw"));
        assert!(check_header(&[0u8; 512], DiskFormat::Qcow2).unwrap_err().contains("no qcow2 header"));
        assert!(check_header(&qcow2_v3()[..40], DiskFormat::Qcow2).unwrap_err().contains("truncated"));
        let mut v4 = qcow2_v3();
        v4[4..8].copy_from_slice(&4u32.to_be_bytes());
        assert!(check_header(&v4, DiskFormat::Qcow2).unwrap_err().contains("version 4"));
    }
}
