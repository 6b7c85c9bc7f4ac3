//! provider.toml's `[[images]]`: an image directory built by scripts/build-guest-image
//! (`dir`), or an operator's stock cloud image, one disk file (`file`, `sha256`,
//! `format`, ...; docs/guest-image.md "Operators' stock images").
//!
//! Parsing reads no image: a directory's manifest.json is read (its sha256 is what the
//! advert names), a stock file is only looked up. Both are verified in full when the
//! provider starts ([`ImageConfig::open`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use peervm_vmm::{DiskFormat, Firmware, GuestImage, ImageError, MAX_BOOT_DEADLINE_SECS, StockImage};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The account a stock image's seed creates unless `login_user` says otherwise: the
/// name `peervm lease create --user` defaults to, and debian-12's.
pub const DEFAULT_STOCK_LOGIN_USER: &str = "peervm";
/// From QEMU's start to SSH-ready for a stock image unless `boot_deadline_secs` says
/// otherwise: a distribution's cloud-init under software emulation on a busy host
/// needs minutes (docs/guest-image.md, debian-12's measured boots), as debian-12.
pub const DEFAULT_STOCK_BOOT_DEADLINE_SECS: u64 = 300;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawImage {
    name: String,
    /// An image directory with manifest.json.
    dir: Option<PathBuf>,
    /// A stock image's disk file, and what goes with it.
    file: Option<PathBuf>,
    sha256: Option<String>,
    format: Option<String>,
    firmware: Option<String>,
    login_user: Option<String>,
    boot_deadline_secs: Option<u64>,
}

/// Where an offered image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A directory with manifest.json (scripts/build-guest-image).
    Dir(PathBuf),
    /// An operator's stock cloud image.
    Stock(StockImage),
}

/// A guest image the provider offers, with the sha256 its advert names: of the
/// directory's manifest.json, or of the stock image's file (what the distribution
/// publishes in its checksum list).
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub name: String,
    pub source: ImageSource,
    pub sha256: [u8; 32],
}

impl ImageConfig {
    /// The directory or the file, for messages.
    pub fn location(&self) -> &Path {
        match &self.source {
            ImageSource::Dir(dir) => dir,
            ImageSource::Stock(s) => &s.file,
        }
    }

    /// Verifies the image (every file's sha256, the disk header) and opens it. Blocking:
    /// hashes every file.
    pub fn open(&self) -> Result<GuestImage, ImageError> {
        match &self.source {
            ImageSource::Dir(dir) => GuestImage::open(dir),
            ImageSource::Stock(stock) => GuestImage::open_stock(stock),
        }
    }
}

/// Checks the `[[images]]` entries; `Err` is the message for the `images` field.
pub(super) fn parse_images(raw: Vec<RawImage>, base: &Path) -> Result<Vec<ImageConfig>, String> {
    let mut images = Vec::new();
    let mut names = HashSet::new();
    for img in raw {
        if !names.insert(img.name.clone()) {
            return Err(format!("image `{}` is listed twice", img.name));
        }
        let absolute = |p: &PathBuf| if p.is_relative() { base.join(p) } else { p.clone() };
        let image = match (&img.dir, &img.file) {
            (Some(_), Some(_)) => {
                return Err(format!(
                    "image `{}`: give dir (an image built by scripts/build-guest-image) or file (a stock cloud \
                     image), not both",
                    img.name
                ));
            }
            (None, None) => {
                return Err(format!(
                    "image `{}`: give dir = \"<image directory>\" or file = \"<stock cloud image>\"",
                    img.name
                ));
            }
            (Some(dir), None) => {
                let stock_keys = [
                    ("sha256", img.sha256.is_some()),
                    ("format", img.format.is_some()),
                    ("firmware", img.firmware.is_some()),
                    ("login_user", img.login_user.is_some()),
                    ("boot_deadline_secs", img.boot_deadline_secs.is_some()),
                ];
                if let Some((key, _)) = stock_keys.iter().find(|(_, given)| *given) {
                    return Err(format!(
                        "image `{}`: {key} is for a stock image (file = ...); an image directory's manifest.json \
                         says it",
                        img.name
                    ));
                }
                let dir = absolute(dir);
                let manifest = dir.join("manifest.json");
                let bytes = std::fs::read(&manifest).map_err(|e| {
                    format!(
                        "image `{}`: cannot read {}: {e}; build it with scripts/build-guest-image",
                        img.name,
                        manifest.display()
                    )
                })?;
                ImageConfig { name: img.name, source: ImageSource::Dir(dir), sha256: Sha256::digest(&bytes).into() }
            }
            (None, Some(file)) => stock_image(&img, absolute(file))?,
        };
        images.push(image);
    }
    if images.is_empty() {
        return Err("offer at least one image ([[images]] name = ..., dir = ... or file = ...)".into());
    }
    Ok(images)
}

fn stock_image(img: &RawImage, file: PathBuf) -> Result<ImageConfig, String> {
    let name = &img.name;
    if let Err(e) = std::fs::metadata(&file) {
        return Err(format!("image `{name}`: cannot read {}: {e}", file.display()));
    }
    let Some(hex_sha) = &img.sha256 else {
        return Err(format!(
            "image `{name}`: a stock image needs sha256 = \"<64 hex digits>\" (sha256sum {}; compare with the \
             distribution's published checksums)",
            file.display()
        ));
    };
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(hex_sha, &mut sha256)
        .map_err(|_| format!("image `{name}`: sha256 `{hex_sha}` is not 64 hex digits"))?;
    let format = match img.format.as_deref() {
        Some(f) => {
            DiskFormat::parse(f).ok_or_else(|| format!("image `{name}`: format `{f}` is not \"qcow2\" or \"raw\""))?
        }
        None => {
            return Err(format!(
                "image `{name}`: a stock image needs format = \"qcow2\" or \"raw\" (QEMU is never left to guess \
                 it; `qemu-img info {}` shows it)",
                file.display()
            ));
        }
    };
    let firmware = match img.firmware.as_deref() {
        None => Firmware::Bios,
        Some(f) => {
            Firmware::parse(f).ok_or_else(|| format!("image `{name}`: firmware `{f}` is not \"bios\" or \"uefi\""))?
        }
    };
    let login_user = img.login_user.clone().unwrap_or_else(|| DEFAULT_STOCK_LOGIN_USER.into());
    peervm_vmm::spec::validate_user_name(&login_user).map_err(|e| format!("image `{name}`: login_user: {e}"))?;
    let deadline = img.boot_deadline_secs.unwrap_or(DEFAULT_STOCK_BOOT_DEADLINE_SECS);
    if !(1..=MAX_BOOT_DEADLINE_SECS).contains(&deadline) {
        return Err(format!("image `{name}`: boot_deadline_secs {deadline} is outside 1..={MAX_BOOT_DEADLINE_SECS}"));
    }
    Ok(ImageConfig {
        name: name.clone(),
        source: ImageSource::Stock(StockImage {
            name: name.clone(),
            file,
            sha256,
            format,
            firmware,
            login_user,
            boot_deadline: Duration::from_secs(deadline),
        }),
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `entries` (TOML `[[images]]` tables) with `base` as the config's directory.
    fn parse(entries: &str, base: &Path) -> Result<Vec<ImageConfig>, String> {
        #[derive(Deserialize)]
        struct Doc {
            images: Vec<RawImage>,
        }
        let doc: Doc = toml::from_str(entries).map_err(|e| e.to_string())?;
        parse_images(doc.images, base)
    }

    const SHA: &str = "2b3c6a3a37a8b2b8f8b4e3b7d1e7f6a5c4b3a2918f7e6d5c4b3a29181716a5b4";

    #[test]
    fn a_stock_image_takes_its_keys_with_defaults_and_a_relative_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("cloud.qcow2"), b"x").unwrap();
        let images = parse(
            &format!("[[images]]\nname = \"debian-12-genericcloud\"\nfile = \"cloud.qcow2\"\nsha256 = \"{SHA}\"\nformat = \"qcow2\"\n"),
            tmp.path(),
        )
        .unwrap();
        let want = StockImage {
            name: "debian-12-genericcloud".into(),
            file: tmp.path().join("cloud.qcow2"),
            sha256: hex::decode(SHA).unwrap().try_into().unwrap(),
            format: DiskFormat::Qcow2,
            firmware: Firmware::Bios,
            login_user: "peervm".into(),
            boot_deadline: Duration::from_secs(300),
        };
        assert_eq!(images[0].source, ImageSource::Stock(want.clone()));
        assert_eq!(images[0].sha256, want.sha256, "the advert names the file's sha256");
        let images = parse(
            &format!(
                "[[images]]\nname = \"ubuntu-24.04\"\nfile = \"{}\"\nsha256 = \"{}\"\nformat = \"raw\"\n\
                 firmware = \"uefi\"\nlogin_user = \"ubuntu\"\nboot_deadline_secs = 420\n",
                tmp.path().join("cloud.qcow2").display(),
                SHA.to_uppercase()
            ),
            Path::new("/elsewhere"),
        )
        .unwrap();
        let ImageSource::Stock(s) = &images[0].source else { panic!("not stock") };
        assert_eq!(
            (s.format, s.firmware, s.login_user.as_str(), s.boot_deadline.as_secs()),
            (DiskFormat::Raw, Firmware::Uefi, "ubuntu", 420)
        );
        assert_eq!(s.file, tmp.path().join("cloud.qcow2"));
    }

    #[test]
    fn each_mistake_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("c.img"), b"x").unwrap();
        std::fs::create_dir(tmp.path().join("img")).unwrap();
        std::fs::write(tmp.path().join("img/manifest.json"), b"{}").unwrap();
        let stock = |extra: &str| format!("[[images]]\nname = \"s\"\nfile = \"c.img\"\n{extra}\n");
        let ok = format!("sha256 = \"{SHA}\"\nformat = \"qcow2\"");
        let cases = [
            (stock("format = \"qcow2\""), "needs sha256"),
            (stock(&format!("sha256 = \"{}\"\nformat = \"qcow2\"", &SHA[1..])), "not 64 hex digits"),
            (stock(&format!("sha256 = \"{SHA}\"")), "needs format"),
            (stock(&format!("sha256 = \"{SHA}\"\nformat = \"vmdk\"")), "`vmdk` is not"),
            (stock(&format!("{ok}\nfirmware = \"efi\"")), "firmware `efi`"),
            (stock(&format!("{ok}\nlogin_user = \"Root!\"")), "login_user"),
            (stock(&format!("{ok}\nboot_deadline_secs = 0")), "boot_deadline_secs 0"),
            (stock(&format!("{ok}\nboot_deadline_secs = 481")), "boot_deadline_secs 481"),
            (stock(&format!("{ok}\ndir = \"img\"")), "not both"),
            ("[[images]]\nname = \"s\"\n".into(), "give dir"),
            ("[[images]]\nname = \"s\"\ndir = \"img\"\nformat = \"raw\"\n".into(), "format is for a stock image"),
            (format!("[[images]]\nname = \"s\"\nfile = \"missing.img\"\n{ok}\n"), "cannot read"),
            (format!("{}{}", stock(&ok), stock(&ok)), "listed twice"),
            ("images = []".into(), "at least one image"),
        ];
        for (toml, want) in cases {
            let err = parse(&toml, tmp.path()).map(|_| ()).unwrap_err();
            assert!(err.contains(want), "{toml:?}: {err:?} lacks {want:?}");
        }
        assert!(parse(&stock(&ok), tmp.path()).is_ok());
        assert!(parse("[[images]]\nname = \"d\"\ndir = \"img\"\n", tmp.path()).is_ok());
    }
}
