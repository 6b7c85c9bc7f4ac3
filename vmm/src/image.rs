//! Guest images: a directory with `manifest.json` that pins every file by sha256
//! (written by scripts/build-guest-image, see docs/guest-image.md).
//!
//! Every file is hashed before its first use (`GuestImage::open`); later starts re-hash a
//! file only when its size, mtime or inode changed, so a modified base is caught without
//! paying ~0.3 s of hashing on every boot. The sha256 of manifest.json itself is what a
//! provider advertises: it pins every file transitively.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ImageError;

/// A manifest larger than this is not one of ours; refuse before parsing.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

#[derive(Deserialize)]
struct Manifest {
    name: String,
    kernel: String,
    initrd: String,
    disk: String,
    #[serde(default)]
    machine: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    microvm: Option<MicrovmManifest>,
    files: Vec<ManifestFile>,
}

#[derive(Deserialize)]
struct MicrovmManifest {
    kernel: String,
    #[serde(default)]
    cmdline: Option<String>,
}

#[derive(Deserialize)]
struct ManifestFile {
    path: String,
    sha256: String,
    size: u64,
}

/// What was true of a file when it last hashed correctly.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        FileStamp {
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ino: meta.ino(),
            dev: meta.dev(),
        }
    }
}

#[derive(Debug)]
struct PinnedFile {
    path: PathBuf,
    sha256: [u8; 32],
    size: u64,
    verified: Mutex<Option<FileStamp>>,
}

/// The machine type a guest boots on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineKind {
    /// `-M microvm`: virtio-mmio devices found through ACPI, no legacy timers (under TCG
    /// the kernel needs `tsc_early_khz`); no faster than q35 under TCG
    /// (docs/guest-image.md "Machine types and measured times").
    Microvm,
    /// `-M q35`: PCI devices and ACPI power-off; the minimal image's machine.
    Q35,
}

/// A verified guest image.
#[derive(Debug)]
pub struct GuestImage {
    dir: PathBuf,
    name: String,
    manifest_sha256: [u8; 32],
    files: Vec<PinnedFile>,
    kernel: PathBuf,
    initrd: PathBuf,
    disk: PathBuf,
    machine: MachineKind,
    cmdline: String,
}

impl GuestImage {
    /// Reads `dir/manifest.json` and checks every file it lists against its size and
    /// sha256. A mismatch is refused with an error naming the file.
    ///
    /// Blocking (hashes ~70 MiB for the minimal image); call it from a blocking context.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ImageError> {
        let dir = fs::canonicalize(dir.as_ref())
            .map_err(|source| ImageError::ReadManifest { path: dir.as_ref().join("manifest.json"), source })?;
        let manifest_path = dir.join("manifest.json");
        let bad = |reason: String| ImageError::BadManifest { path: manifest_path.clone(), reason };
        let raw = read_capped(&manifest_path)?;
        let manifest_sha256: [u8; 32] = Sha256::digest(&raw).into();
        let m: Manifest = serde_json::from_slice(&raw).map_err(|e| bad(e.to_string()))?;

        if m.name.is_empty()
            || m.name.len() > 64
            || !m.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err(bad(format!("image name {:?} is not a short [A-Za-z0-9._-] name", m.name)));
        }
        let mut files = Vec::with_capacity(m.files.len());
        for f in &m.files {
            // plain names only: a manifest must not point outside its directory
            if f.path.is_empty() || f.path.contains('/') || f.path.starts_with('.') || f.path == "manifest.json" {
                return Err(bad(format!("file path {:?} is not a plain file name in the image directory", f.path)));
            }
            let mut sha256 = [0u8; 32];
            hex::decode_to_slice(&f.sha256, &mut sha256)
                .map_err(|_| bad(format!("sha256 of {} is not 64 hex digits", f.path)))?;
            if files.iter().any(|p: &PinnedFile| p.path == dir.join(&f.path)) {
                return Err(bad(format!("file {} is listed twice", f.path)));
            }
            files.push(PinnedFile { path: dir.join(&f.path), sha256, size: f.size, verified: Mutex::new(None) });
        }
        // every file QEMU is given must be pinned
        let pinned = |name: &str, role: &str| -> Result<PathBuf, ImageError> {
            let p = dir.join(name);
            if files.iter().any(|f| f.path == p) {
                Ok(p)
            } else {
                Err(bad(format!("{role} {name:?} is not listed in files (every file used must be pinned)")))
            }
        };
        let disk = pinned(&m.disk, "disk")?;
        let initrd = pinned(&m.initrd, "initrd")?;
        let (kernel, machine, cmdline) = match &m.microvm {
            Some(mv) => (
                pinned(&mv.kernel, "microvm kernel")?,
                MachineKind::Microvm,
                mv.cmdline.clone().or(m.cmdline.clone()).unwrap_or_default(),
            ),
            None => {
                let kind = match m.machine.as_deref() {
                    None | Some("q35") | Some("pc") => MachineKind::Q35,
                    Some("microvm") => MachineKind::Microvm,
                    Some(other) => return Err(bad(format!("machine {other:?} is not supported (q35, microvm)"))),
                };
                (pinned(&m.kernel, "kernel")?, kind, m.cmdline.clone().unwrap_or_default())
            }
        };
        if cmdline.len() > 1024 || cmdline.chars().any(|c| c.is_control()) {
            return Err(bad("kernel command line is too long or has control characters".into()));
        }
        let image = GuestImage { dir, name: m.name, manifest_sha256, files, kernel, initrd, disk, machine, cmdline };
        image.verify()?;
        Ok(image)
    }

    /// Re-checks the files: a file whose size, mtime or inode changed since it last
    /// verified is hashed again. The backend calls this before every start.
    pub fn verify(&self) -> Result<(), ImageError> {
        for f in &self.files {
            let meta = fs::metadata(&f.path).map_err(|source| ImageError::ReadFile { path: f.path.clone(), source })?;
            let stamp = FileStamp::of(&meta);
            let mut verified = f.verified.lock().unwrap_or_else(|p| p.into_inner());
            if *verified == Some(stamp) {
                continue;
            }
            *verified = None;
            let actual = if meta.len() == f.size { Some(sha256_file(&f.path)?) } else { None };
            if actual != Some(f.sha256) {
                return Err(ImageError::HashMismatch {
                    path: f.path.clone(),
                    expected_sha256: hex::encode(f.sha256),
                    actual_sha256: actual.map(hex::encode).unwrap_or_else(|| "(not hashed: size differs)".into()),
                    expected_size: f.size,
                    actual_size: meta.len(),
                });
            }
            *verified = Some(stamp);
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// sha256 of manifest.json: the image's identity in adverts and lease requests.
    pub fn manifest_sha256(&self) -> [u8; 32] {
        self.manifest_sha256
    }

    pub fn manifest_sha256_hex(&self) -> String {
        hex::encode(self.manifest_sha256)
    }

    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    pub fn initrd(&self) -> &Path {
        &self.initrd
    }

    /// The read-only base disk under each lease's overlay.
    pub fn base_disk(&self) -> &Path {
        &self.disk
    }

    pub fn machine(&self) -> MachineKind {
        self.machine
    }

    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }
}

fn read_capped(path: &Path) -> Result<Vec<u8>, ImageError> {
    let file = File::open(path).map_err(|source| ImageError::ReadManifest { path: path.to_path_buf(), source })?;
    let mut raw = Vec::new();
    file.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|source| ImageError::ReadManifest { path: path.to_path_buf(), source })?;
    if raw.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(ImageError::BadManifest {
            path: path.to_path_buf(),
            reason: format!("larger than {MAX_MANIFEST_BYTES} bytes"),
        });
    }
    Ok(raw)
}

fn sha256_file(path: &Path) -> Result<[u8; 32], ImageError> {
    let err = |source| ImageError::ReadFile { path: path.to_path_buf(), source };
    let mut file = File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_image(dir: &Path, microvm: bool) {
        let files = [("vmlinuz", b"kernel".as_slice()), ("initrd.img", b"initrd"), ("base.qcow2", b"disk")];
        let mut listed = Vec::new();
        for (name, data) in files {
            fs::write(dir.join(name), data).unwrap();
            listed.push(serde_json::json!({
                "path": name, "sha256": hex::encode(Sha256::digest(data)), "size": data.len()
            }));
        }
        let mut m = serde_json::json!({
            "name": "minimal", "kernel": "vmlinuz", "initrd": "initrd.img", "disk": "base.qcow2",
            "machine": "q35", "cmdline": "console=ttyS0", "files": listed,
        });
        if microvm {
            m["microvm"] = serde_json::json!({"kernel": "vmlinuz", "cmdline": "console=ttyS0 quiet"});
        }
        fs::write(dir.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    #[test]
    fn opens_and_pins_files() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), true);
        let img = GuestImage::open(dir.path()).unwrap();
        assert_eq!(img.name(), "minimal");
        assert_eq!(img.machine(), MachineKind::Microvm);
        assert_eq!(img.cmdline(), "console=ttyS0 quiet");
        let raw = fs::read(dir.path().join("manifest.json")).unwrap();
        assert_eq!(img.manifest_sha256(), <[u8; 32]>::from(Sha256::digest(&raw)));
        write_image(dir.path(), false);
        assert_eq!(GuestImage::open(dir.path()).unwrap().machine(), MachineKind::Q35);
    }

    #[test]
    fn modified_file_is_refused_after_open_too() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let img = GuestImage::open(dir.path()).unwrap();
        // same size, different bytes: only the hash can tell
        fs::write(dir.path().join("initrd.img"), b"INITRD").unwrap();
        let err = img.verify().unwrap_err().to_string();
        assert!(err.contains("initrd.img") && err.contains("does not match"), "{err}");
        let err = GuestImage::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("initrd.img"), "{err}");
    }

    #[test]
    fn manifest_cannot_point_outside_or_leave_files_unpinned() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let path = dir.path().join("manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        m["files"][0]["path"] = "../etc/passwd".into();
        fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(GuestImage::open(dir.path()), Err(ImageError::BadManifest { .. })));
        write_image(dir.path(), false);
        let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        m["initrd"] = "other.img".into();
        fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
        let err = GuestImage::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("not listed"), "{err}");
    }
}
