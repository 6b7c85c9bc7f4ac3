//! Guest images: a directory with `manifest.json` that pins every file by sha256
//! (written by scripts/build-guest-image, see docs/guest-image.md), or an operator's
//! stock cloud image, one disk file pinned by the sha256 provider.toml gives
//! (`stock.rs`, docs/guest-image.md "Operators' stock images").
//!
//! Every file is hashed before its first use (`GuestImage::open`); later starts re-hash a
//! file only when its size, mtime, ctime or inode changed, so a modified base is caught
//! without paying ~0.3 s of hashing on every boot. The base disk's header is read again
//! before every start (docs/vmm.md "Images"). What a provider advertises is the image's
//! sha256 ([`GuestImage::sha256`]): of manifest.json, which pins every file
//! transitively, or of a stock image's disk file, which the distribution publishes.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{ImageError, VmmError};
use crate::firmware::Firmware;
use crate::user_name::is_valid_user_name;

mod stock;
pub use stock::StockImage;

/// A manifest larger than this is not one of ours; refuse before parsing.
const MAX_MANIFEST_BYTES: u64 = 64 * 1024;

/// The longest boot deadline a manifest may ask for: well beyond any guest measured
/// (docs/guest-image.md; debian-12 under loaded TCG took up to 180 s to its first
/// login), and short enough that the grant still reaches a requestor who waits on its
/// lease stream (node's `LEASE_REQUEST_TIMEOUT`, 600 s, which a node test ties to this).
pub const MAX_BOOT_DEADLINE_SECS: u64 = 480;

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
    // The fields below came with the debian-12 image (docs/guest-image.md "Output" of
    // "The debian-12 image"); each is optional and its default is what `minimal` was
    // before they existed.
    #[serde(default)]
    disk_role: DiskRole,
    #[serde(default)]
    disk_format: Option<String>,
    #[serde(default)]
    disk_virtual_size: Option<u64>,
    #[serde(default)]
    boot_deadline_secs: Option<u64>,
    #[serde(default)]
    login_user: Option<String>,
    #[serde(default)]
    seed: SeedKind,
    /// The TCG translation buffer the image's guests boot in as fast as in the default
    /// (docs/guest-image.md "manifest.json"); absent: the backend's default.
    #[serde(default)]
    tcg_tb_size_mib: Option<u32>,
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

/// What was true of a file when it last hashed correctly. The ctime is in it because a
/// writer can put the mtime back (utimensat) but not the ctime: any write or
/// `touch -d` moves it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct FileStamp {
    size: u64,
    mtime: i64,
    mtime_nsec: i64,
    ctime: i64,
    ctime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> Self {
        FileStamp {
            size: meta.len(),
            mtime: meta.mtime(),
            mtime_nsec: meta.mtime_nsec(),
            ctime: meta.ctime(),
            ctime_nsec: meta.ctime_nsec(),
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

impl MachineKind {
    /// QEMU's `-M` value. q35 without the devices it adds even under `-nodefaults` that
    /// no guest of ours uses: the AHCI controller (`sata`, 1.6 MiB of buffers), the SMBus
    /// controller, VMware's I/O port, SMM and the PS/2 controller (`i8042`); each PCI
    /// device also costs a copy of the memory map (docs/vmm.md "Host memory per
    /// guest"). The KVM probe, guests and boot_bench all use this.
    pub fn qemu_machine(self) -> &'static str {
        match self {
            // microvm's virtio-mmio devices are found through ACPI only
            // (docs/guest-image.md "Machine types and measured times")
            MachineKind::Microvm => "microvm,acpi=on",
            MachineKind::Q35 => "q35,sata=off,smbus=off,vmport=off,smm=off,i8042=off",
        }
    }
}

/// How QEMU starts the guest's kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Boot {
    /// QEMU loads the image's kernel and initrd itself (`-kernel`, `-initrd`, `-append`):
    /// the images built by scripts/build-guest-image (their manifest names both).
    Direct { kernel: PathBuf, initrd: PathBuf, cmdline: String },
    /// The firmware boots the disk's own boot loader (`bootindex=0` on the root disk):
    /// operators' stock images.
    Firmware(Firmware),
}

/// What the image's disk is to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskRole {
    /// A blank data disk beside a root file system in the initrd (`minimal`'s `/data`).
    #[default]
    Data,
    /// The guest's root file system: the lease's disk must be at least
    /// `disk_virtual_size`, and the guest grows its file system to the lease's size.
    Root,
}

/// The format of the base disk, what QEMU is told (`format=`, the overlay's backing
/// format): QEMU never probes a format (docs/vmm.md "QEMU": a probed raw disk whose
/// bytes look like a qcow2 header could name a host file as its backing file).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFormat {
    Qcow2,
    Raw,
}

impl DiskFormat {
    /// The name QEMU and qemu-img take.
    pub fn as_str(&self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    /// The format a manifest or provider.toml names (`"qcow2"`, `"raw"`); nothing else.
    pub fn parse(name: &str) -> Option<Self> {
        [DiskFormat::Qcow2, DiskFormat::Raw].into_iter().find(|f| f.as_str() == name)
    }
}

/// Who reads the NoCloud seed in the guest, which decides what the provider writes
/// there (docs/guest-image.md "Seed format" and "The seed it expects").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SeedKind {
    /// The minimal image's own boot script, which reads only the provider's shape.
    #[default]
    Minimal,
    /// The real cloud-init (22.4 in debian-12), which validates the whole cloud-config.
    CloudInit,
}

/// A verified guest image.
#[derive(Debug)]
pub struct GuestImage {
    dir: PathBuf,
    name: String,
    sha256: [u8; 32],
    files: Vec<PinnedFile>,
    boot: Boot,
    disk: PathBuf,
    machine: MachineKind,
    disk_role: DiskRole,
    disk_format: DiskFormat,
    disk_virtual_size: Option<u64>,
    /// What the base disk's own header says (`disk_header::check`), whatever the manifest
    /// claims.
    base_virtual_size: u64,
    boot_deadline: Option<Duration>,
    login_user: Option<String>,
    seed: SeedKind,
    tcg_tb_size_mib: Option<u32>,
}

/// The translation buffers a manifest may ask for (below 8 MiB TCG mostly retranslates;
/// beyond 4 GiB it is a typo), as provider.toml's `[hypervisor] tcg_tb_size_mib`.
pub const TCG_TB_SIZE_MIB: std::ops::RangeInclusive<u32> = 8..=4096;

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

        if !is_valid_image_name(&m.name) {
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
        let disk_format = match m.disk_format.as_deref() {
            // before the field existed every base was qcow2
            None => DiskFormat::Qcow2,
            Some(name) => DiskFormat::parse(name).ok_or_else(|| ImageError::UnsupportedDiskFormat {
                path: manifest_path.clone(),
                format: name.to_string(),
            })?,
        };
        if m.disk_virtual_size == Some(0) {
            return Err(bad("disk_virtual_size is 0".into()));
        }
        if m.disk_role == DiskRole::Root && m.disk_virtual_size.is_none() {
            // without it a lease too small for the root file system could not be refused
            return Err(bad("a disk_role \"root\" image must give disk_virtual_size".into()));
        }
        let boot_deadline = match m.boot_deadline_secs {
            None => None,
            Some(s @ 1..=MAX_BOOT_DEADLINE_SECS) => Some(Duration::from_secs(s)),
            Some(s) => {
                return Err(bad(format!("boot_deadline_secs {s} is outside 1..={MAX_BOOT_DEADLINE_SECS}")));
            }
        };
        if let Some(user) = &m.login_user
            && !is_valid_user_name(user)
        {
            return Err(bad(format!("login_user {user:?} is not a valid user name")));
        }
        if let Some(tb) = m.tcg_tb_size_mib
            && !TCG_TB_SIZE_MIB.contains(&tb)
        {
            return Err(bad(format!(
                "tcg_tb_size_mib {tb} is outside {}..={}",
                TCG_TB_SIZE_MIB.start(),
                TCG_TB_SIZE_MIB.end()
            )));
        }
        let mut image = GuestImage {
            dir,
            name: m.name,
            sha256: manifest_sha256,
            files,
            boot: Boot::Direct { kernel, initrd, cmdline },
            disk,
            machine,
            disk_role: m.disk_role,
            disk_format,
            disk_virtual_size: m.disk_virtual_size,
            base_virtual_size: 0,
            boot_deadline,
            login_user: m.login_user,
            seed: m.seed,
            tcg_tb_size_mib: m.tcg_tb_size_mib,
        };
        image.verify_files()?;
        // only after the hash matched: the header is then the one the manifest pins, and
        // a corrupt download is reported as such
        image.base_virtual_size = crate::disk_header::check(&image.disk, image.disk_format)?;
        Ok(image)
    }

    /// Re-checks the image before a start: the base disk's header (a read of 104 bytes,
    /// so every time, whatever the stamps below say), then the files: one whose size,
    /// mtime, ctime or inode changed since it last verified is hashed again. The backend
    /// calls this before every start, so a disk swapped after `open` is refused there.
    pub fn verify(&self) -> Result<(), ImageError> {
        crate::disk_header::check(&self.disk, self.disk_format)?;
        self.verify_files()
    }

    fn verify_files(&self) -> Result<(), ImageError> {
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

    /// The image's identity in adverts and lease requests: the sha256 of manifest.json,
    /// or of a stock image's disk file (docs/protocol.md, `ImageOffer`).
    pub fn sha256(&self) -> [u8; 32] {
        self.sha256
    }

    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Direct kernel boot (with the manifest's kernel, initrd and command line) or the
    /// firmware.
    pub fn boot(&self) -> &Boot {
        &self.boot
    }

    /// The read-only base disk under each lease's overlay.
    pub fn base_disk(&self) -> &Path {
        &self.disk
    }

    pub fn machine(&self) -> MachineKind {
        self.machine
    }

    pub fn disk_role(&self) -> DiskRole {
        self.disk_role
    }

    /// The base disk's format: the overlay's backing format.
    pub fn disk_format(&self) -> DiskFormat {
        self.disk_format
    }

    /// The base disk's virtual size in bytes, when the manifest gives it.
    pub fn disk_virtual_size(&self) -> Option<u64> {
        self.disk_virtual_size
    }

    /// The smallest disk a lease of this image may have: the larger of the manifest's
    /// `disk_virtual_size` and what the base disk's header says, so a manifest that
    /// understates its disk cannot get a lease whose overlay cuts the base short.
    pub fn min_disk_bytes(&self) -> u64 {
        self.disk_virtual_size.unwrap_or(0).max(self.base_virtual_size)
    }

    /// How long from QEMU's start to SSH-ready the image needs at most; `None`: the
    /// backend's default (`VmmConfig::ready_timeout`).
    pub fn boot_deadline(&self) -> Option<Duration> {
        self.boot_deadline
    }

    /// The one account the image is laid out for (`peervm` in debian-12); `None`: any
    /// valid name the lease asks for (`minimal`).
    pub fn login_user(&self) -> Option<&str> {
        self.login_user.as_deref()
    }

    pub fn seed_kind(&self) -> SeedKind {
        self.seed
    }

    /// The TCG translation buffer the manifest says the image's guests need, MiB
    /// (`VmmConfig::tcg_tb_size_for`); `None` for a stock image.
    pub fn tcg_tb_size_mib(&self) -> Option<u32> {
        self.tcg_tb_size_mib
    }

    /// Whether a lease asking for `ssh_user` and a disk of `disk_gib` GiB can run this
    /// image: the user must be the image's login user (the account its seed creates and
    /// the grant names), and the disk must hold the base disk. The provider checks this
    /// at admission and the backend again before it creates anything.
    pub fn check_lease(&self, ssh_user: &str, disk_gib: u32) -> Result<(), VmmError> {
        if let Some(login_user) = &self.login_user
            && login_user != ssh_user
        {
            return Err(VmmError::WrongLoginUser {
                image: self.name.clone(),
                login_user: login_user.clone(),
                requested: ssh_user.to_string(),
            });
        }
        let leased_bytes = u64::from(disk_gib) << 30;
        let needs_bytes = self.min_disk_bytes();
        if leased_bytes < needs_bytes {
            return Err(VmmError::DiskTooSmall { image: self.name.clone(), leased_bytes, needs_bytes });
        }
        Ok(())
    }
}

/// An image name as adverts carry it: 1-64 of `[A-Za-z0-9._-]`.
fn is_valid_image_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
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
        write_image_with_disk(dir, microvm, &crate::disk_header::qcow2_v3_header(64 << 20));
    }

    fn write_image_with_disk(dir: &Path, microvm: bool, disk: &[u8]) {
        let files = [("vmlinuz", b"kernel".as_slice()), ("initrd.img", b"initrd"), ("base.qcow2", disk)];
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
        assert_eq!(
            img.boot(),
            &Boot::Direct {
                kernel: img.dir().join("vmlinuz"),
                initrd: img.dir().join("initrd.img"),
                cmdline: "console=ttyS0 quiet".into()
            }
        );
        let raw = fs::read(dir.path().join("manifest.json")).unwrap();
        assert_eq!(img.sha256(), <[u8; 32]>::from(Sha256::digest(&raw)));
        write_image(dir.path(), false);
        assert_eq!(GuestImage::open(dir.path()).unwrap().machine(), MachineKind::Q35);
    }

    /// Rewrites the manifest of an image made by `write_image` with `edit`.
    fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = dir.join("manifest.json");
        let mut m: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        edit(&mut m);
        fs::write(&path, serde_json::to_vec(&m).unwrap()).unwrap();
    }

    fn debian_like(m: &mut serde_json::Value) {
        m["name"] = "debian-12".into();
        m["disk_role"] = "root".into();
        m["disk_format"] = "qcow2".into();
        m["disk_virtual_size"] = 738197504u64.into();
        m["boot_deadline_secs"] = 300.into();
        m["login_user"] = "peervm".into();
        m["seed"] = "cloud-init".into();
        m["source_date_epoch"] = 1796005301u64.into();
    }

    /// A manifest may give its guests' TCG translation buffer; the operator's size, when
    /// set, wins; without either the default; out of range the manifest is refused.
    #[test]
    fn a_manifest_may_give_its_guests_translation_buffer() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let mut config = crate::VmmConfig::new("/nonexistent", crate::Accel::Tcg);
        let plain = GuestImage::open(dir.path()).unwrap();
        assert_eq!(plain.tcg_tb_size_mib(), None);
        assert_eq!(config.tcg_tb_size_for(&plain), crate::DEFAULT_TCG_TB_SIZE_MIB);
        edit_manifest(dir.path(), |m| m["tcg_tb_size_mib"] = 40.into());
        let small = GuestImage::open(dir.path()).unwrap();
        assert_eq!(small.tcg_tb_size_mib(), Some(40));
        assert_eq!(config.tcg_tb_size_for(&small), 40);
        config.tcg_tb_size_mib = Some(128);
        assert_eq!(config.tcg_tb_size_for(&small), 128);
        assert_eq!(config.tcg_tb_size_for(&plain), 128);
        for bad in [4u32, 5000] {
            edit_manifest(dir.path(), |m| m["tcg_tb_size_mib"] = bad.into());
            let err = GuestImage::open(dir.path()).unwrap_err().to_string();
            assert!(err.contains("tcg_tb_size_mib") && err.contains(&bad.to_string()), "{err}");
        }
    }

    #[test]
    fn a_manifest_without_the_new_fields_is_minimal_as_before() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let img = GuestImage::open(dir.path()).unwrap();
        assert_eq!(img.disk_role(), DiskRole::Data);
        assert_eq!(img.disk_format(), DiskFormat::Qcow2);
        assert_eq!(img.disk_virtual_size(), None);
        assert_eq!(img.boot_deadline(), None);
        assert_eq!(img.login_user(), None);
        assert_eq!(img.seed_kind(), SeedKind::Minimal);
        assert!(img.check_lease("anyone", 1).is_ok(), "minimal takes any user and any disk");
    }

    #[test]
    fn the_debian_fields_are_typed() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        edit_manifest(dir.path(), debian_like);
        let img = GuestImage::open(dir.path()).unwrap();
        assert_eq!(img.disk_role(), DiskRole::Root);
        assert_eq!(img.disk_format(), DiskFormat::Qcow2);
        assert_eq!(img.disk_virtual_size(), Some(738197504));
        assert_eq!(img.boot_deadline(), Some(Duration::from_secs(300)));
        assert_eq!(img.login_user(), Some("peervm"));
        assert_eq!(img.seed_kind(), SeedKind::CloudInit);
        assert!(
            matches!(img.boot(), Boot::Direct { cmdline, .. } if cmdline == "console=ttyS0"),
            "the kernel command line is used as it is"
        );
        // the disk is a qcow2: declared raw, it is refused rather than handed to QEMU as raw
        edit_manifest(dir.path(), |m| m["disk_format"] = "raw".into());
        assert!(matches!(GuestImage::open(dir.path()), Err(ImageError::UnsafeDisk { .. })));
    }

    #[test]
    fn a_disk_format_qemu_would_have_to_guess_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for format in ["vmdk", "QCOW2", "", "qcow2,backing=x"] {
            write_image(dir.path(), false);
            edit_manifest(dir.path(), |m| m["disk_format"] = format.into());
            match GuestImage::open(dir.path()) {
                Err(ImageError::UnsupportedDiskFormat { format: f, .. }) => assert_eq!(f, format),
                other => panic!("{format:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn bad_new_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        type Edit = fn(&mut serde_json::Value);
        let cases: [(&str, Edit); 7] = [
            ("root without size", |m| m["disk_virtual_size"] = serde_json::Value::Null),
            ("size 0", |m| m["disk_virtual_size"] = 0.into()),
            ("deadline 0", |m| m["boot_deadline_secs"] = 0.into()),
            ("deadline too long", |m| m["boot_deadline_secs"] = 3601.into()),
            ("bad login user", |m| m["login_user"] = "Root!".into()),
            ("unknown seed", |m| m["seed"] = "ignition".into()),
            ("unknown role", |m| m["disk_role"] = "swap".into()),
        ];
        for (what, edit) in cases {
            write_image(dir.path(), false);
            edit_manifest(dir.path(), |m| {
                debian_like(m);
                edit(m);
            });
            assert!(matches!(GuestImage::open(dir.path()), Err(ImageError::BadManifest { .. })), "{what}");
        }
    }

    #[test]
    fn a_lease_must_fit_the_image() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        edit_manifest(dir.path(), |m| {
            debian_like(m);
            m["disk_virtual_size"] = ((2u64 << 30) + 1).into();
        });
        let img = GuestImage::open(dir.path()).unwrap();
        assert!(img.check_lease("peervm", 3).is_ok());
        match img.check_lease("peervm", 2) {
            Err(VmmError::DiskTooSmall { leased_bytes, needs_bytes, .. }) => {
                assert_eq!((leased_bytes, needs_bytes), (2 << 30, (2 << 30) + 1))
            }
            other => panic!("{other:?}"),
        }
        match img.check_lease("alice", 3) {
            Err(VmmError::WrongLoginUser { login_user, requested, .. }) => {
                assert_eq!((login_user.as_str(), requested.as_str()), ("peervm", "alice"))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_disk_larger_than_its_manifest_says_needs_a_lease_that_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let big = (2u64 << 30) + 1;
        // a data-disk image (minimal's kind) whose manifest gives no size: the header does
        write_image_with_disk(dir.path(), false, &crate::disk_header::qcow2_v3_header(big));
        let img = GuestImage::open(dir.path()).unwrap();
        assert_eq!((img.disk_virtual_size(), img.min_disk_bytes()), (None, big));
        assert!(img.check_lease("anyone", 3).is_ok());
        let err = img.check_lease("anyone", 2).unwrap_err();
        assert!(
            matches!(err, VmmError::DiskTooSmall { leased_bytes: 0x8000_0000, needs_bytes, .. } if needs_bytes == big)
        );
        let msg = err.to_string();
        assert!(
            msg.contains("at least 2147483649 bytes (2.00 GiB") && msg.contains("asks for 2147483648 bytes (2.00 GiB)"),
            "{msg}"
        );
        // a manifest understating it changes nothing
        edit_manifest(dir.path(), |m| m["disk_virtual_size"] = (1u64 << 20).into());
        let img = GuestImage::open(dir.path()).unwrap();
        assert!(matches!(img.check_lease("anyone", 2), Err(VmmError::DiskTooSmall { .. })));
        // a raw disk's size is its length
        write_image_with_disk(dir.path(), false, &[0u8; 4096]);
        edit_manifest(dir.path(), |m| m["disk_format"] = "raw".into());
        assert_eq!(GuestImage::open(dir.path()).unwrap().min_disk_bytes(), 4096);
    }

    /// Rewrites `path` in place (same inode, same size) and puts its mtime back, as a
    /// writer hiding the change would; returns once the ctime moved (the kernel's clock
    /// can tick coarser than two writes; a hang guard, not a verdict).
    fn rewrite_keeping_mtime(path: &Path, bytes: &[u8]) {
        let before = fs::metadata(path).unwrap();
        let started = std::time::Instant::now();
        loop {
            fs::write(path, bytes).unwrap();
            File::options().write(true).open(path).unwrap().set_modified(before.modified().unwrap()).unwrap();
            let after = fs::metadata(path).unwrap();
            assert_eq!(
                (after.ino(), after.len(), after.modified().unwrap()),
                (before.ino(), before.len(), before.modified().unwrap())
            );
            if (after.ctime(), after.ctime_nsec()) != (before.ctime(), before.ctime_nsec()) {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(10), "the ctime never moved");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_file_rewritten_with_its_old_mtime_is_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let img = GuestImage::open(dir.path()).unwrap();
        rewrite_keeping_mtime(&dir.path().join("initrd.img"), b"INITRD");
        match img.verify() {
            Err(ImageError::HashMismatch { path, .. }) => assert!(path.ends_with("initrd.img")),
            other => panic!("a rewritten file passed as unchanged: {other:?}"),
        }
    }

    #[test]
    fn a_disk_swapped_after_open_for_one_naming_a_backing_file_is_refused_before_a_start() {
        let dir = tempfile::tempdir().unwrap();
        write_image(dir.path(), false);
        let img = GuestImage::open(dir.path()).unwrap();
        let mut evil = crate::disk_header::qcow2_v3_header(64 << 20);
        evil[8..16].copy_from_slice(&0x68u64.to_be_bytes()); // backing file name at 104...
        evil[16..20].copy_from_slice(&0u32.to_be_bytes()); // ...of length 0: still a backing file
        rewrite_keeping_mtime(&dir.path().join("base.qcow2"), &evil);
        // the header is read before the hashes, whatever the stamps say
        match img.verify() {
            Err(ImageError::UnsafeDisk { reason, .. }) => assert!(reason.contains("backing file"), "{reason}"),
            other => panic!("expected UnsafeDisk from the header check: {other:?}"),
        }
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
