//! The cloud-init NoCloud seed disk: a small FAT volume labelled `cidata` holding
//! meta-data, user-data and network-config (the format stock cloud images read, and the
//! one the minimal image's boot script reads).
//!
//! The volume is built in memory with `fatfs` (no mkfs.vfat/mtools, no mount) and
//! written once to a 0600 file that QEMU receives read-only by descriptor. It carries
//! the per-lease host private key, which is why it never goes on the QEMU command line
//! and the buffer is zeroised after use.

use std::fs::OpenOptions;
use std::io::{Cursor, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use zeroize::Zeroizing;

use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::spec::{AuthorizedKey, HostKeySeed};

/// 1 MiB: a FAT12 volume, far larger than the three small files.
const SEED_BYTES: usize = 1024 * 1024;

/// What the guest learns at first boot.
pub struct SeedConfig<'a> {
    pub lease: LeaseId,
    pub user: &'a str,
    pub authorized_key: &'a AuthorizedKey,
    pub host_key: &'a HostKeySeed,
    pub mac: [u8; 6],
    pub guest_addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

pub(crate) struct SeedFiles {
    pub meta_data: String,
    pub user_data: Zeroizing<String>,
    pub network_config: String,
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Renders the three NoCloud files. Every value written here is validated or generated
/// by us (user name, canonical key line, PEM base64, addresses), so no YAML escaping is
/// needed and none can be injected.
pub(crate) fn render(cfg: &SeedConfig<'_>) -> Result<SeedFiles, VmmError> {
    let hex = cfg.lease.hex();
    let meta_data = format!("instance-id: peervm-{hex}\nlocal-hostname: peervm-{}\n", cfg.lease.short_hex(8));

    let private = cfg.host_key.openssh_private(&format!("peervm-{hex}"))?;
    let mut user_data = Zeroizing::new(String::with_capacity(2048));
    user_data.push_str("#cloud-config\n");
    user_data.push_str("users:\n");
    user_data.push_str(&format!("  - name: {}\n", cfg.user));
    user_data.push_str("    lock_passwd: true\n");
    user_data.push_str("    shell: /bin/sh\n");
    user_data.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    user_data.push_str("    ssh_authorized_keys:\n");
    user_data.push_str(&format!("      - {}\n", cfg.authorized_key.openssh_line()));
    user_data.push_str("ssh_pwauth: false\n");
    user_data.push_str("disable_root: false\n");
    user_data.push_str("ssh_deletekeys: true\n");
    user_data.push_str("ssh_genkeytypes: []\n");
    user_data.push_str("ssh_keys:\n");
    user_data.push_str("  ed25519_private: |\n");
    for line in private.lines() {
        user_data.push_str("    ");
        user_data.push_str(line);
        user_data.push('\n');
    }
    user_data.push_str(&format!("  ed25519_public: {}\n", cfg.host_key.public_openssh()));

    let network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    set-name: eth0\n    \
         addresses:\n      - {addr}/{len}\n    routes:\n      - to: 0.0.0.0/0\n        via: {gw}\n",
        mac = format_mac(&cfg.mac),
        addr = cfg.guest_addr,
        len = cfg.prefix_len,
        gw = cfg.gateway,
    );
    Ok(SeedFiles { meta_data, user_data, network_config })
}

/// Builds the FAT image in memory.
pub(crate) fn build_image(files: &SeedFiles) -> Result<Zeroizing<Vec<u8>>, VmmError> {
    let fat = |e: std::io::Error| VmmError::InvalidSpec(format!("cannot build the seed FAT volume: {e}"));
    let mut buf = Zeroizing::new(vec![0u8; SEED_BYTES]);
    {
        let mut cursor = Cursor::new(&mut buf[..]);
        fatfs::format_volume(&mut cursor, fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "))
            .map_err(fat)?;
        cursor.set_position(0);
        let fs = fatfs::FileSystem::new(cursor, fatfs::FsOptions::new()).map_err(fat)?;
        {
            let root = fs.root_dir();
            for (name, data) in [
                ("meta-data", files.meta_data.as_bytes()),
                ("user-data", files.user_data.as_bytes()),
                ("network-config", files.network_config.as_bytes()),
            ] {
                let mut f = root.create_file(name).map_err(fat)?;
                f.truncate().map_err(fat)?;
                f.write_all(data).map_err(fat)?;
                f.flush().map_err(fat)?;
            }
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(buf)
}

/// Writes the seed disk to `path` (created 0600, must not exist). The backend does this
/// for every lease; it is public for tools that boot the image by hand (the benchmark).
pub fn write_seed_disk(path: &Path, cfg: &SeedConfig<'_>) -> Result<(), VmmError> {
    let files = render(cfg)?;
    let image = build_image(&files)?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| VmmError::io("cannot create seed disk", path, e))?;
    out.write_all(&image).map_err(|e| VmmError::io("cannot write seed disk", path, e))?;
    out.sync_all().map_err(|e| VmmError::io("cannot write seed disk", path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn config<'a>(key: &'a AuthorizedKey, host: &'a HostKeySeed) -> SeedConfig<'a> {
        SeedConfig {
            lease: LeaseId::from_bytes([0x5a; 16]),
            user: "alice",
            authorized_key: key,
            host_key: host,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            guest_addr: Ipv4Addr::new(10, 213, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 213, 0, 1),
        }
    }

    #[test]
    fn renders_the_nocloud_shape() {
        let host = HostKeySeed::from_bytes([3; 32]);
        let key = AuthorizedKey::from_ed25519(&HostKeySeed::from_bytes([4; 32]).public_raw(), "me").unwrap();
        let files = render(&config(&key, &host)).unwrap();
        assert_eq!(
            files.meta_data,
            format!("instance-id: peervm-{}\nlocal-hostname: peervm-5a5a5a5a\n", "5a".repeat(16))
        );
        let ud = files.user_data.as_str();
        assert!(ud.starts_with("#cloud-config\nusers:\n  - name: alice\n    lock_passwd: true\n"), "{ud}");
        assert!(ud.contains(&format!("      - {}\n", key.openssh_line())));
        assert!(ud.contains("ssh_pwauth: false\n"));
        assert!(ud.contains("  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n"));
        assert!(ud.contains("    -----END OPENSSH PRIVATE KEY-----\n"));
        assert!(ud.contains(&format!("  ed25519_public: {}\n", host.public_openssh())));
        let nc = &files.network_config;
        assert!(nc.contains("      macaddress: \"52:54:00:12:34:56\"\n"), "{nc}");
        assert!(nc.contains("      - 10.213.0.2/30\n") && nc.contains("        via: 10.213.0.1\n"), "{nc}");
    }

    #[test]
    fn fat_volume_reads_back_with_label() {
        let host = HostKeySeed::from_bytes([3; 32]);
        let key = AuthorizedKey::from_ed25519(&HostKeySeed::from_bytes([4; 32]).public_raw(), "me").unwrap();
        let cfg = config(&key, &host);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_seed_disk(&path, &cfg).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(write_seed_disk(&path, &cfg).is_err(), "an existing seed must not be overwritten");

        let disk = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(disk, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let expected = render(&cfg).unwrap();
        let mut ud = String::new();
        fs.root_dir().open_file("user-data").unwrap().read_to_string(&mut ud).unwrap();
        assert_eq!(ud, *expected.user_data);
        let mut nc = String::new();
        fs.root_dir().open_file("network-config").unwrap().read_to_string(&mut nc).unwrap();
        assert_eq!(nc, expected.network_config);
    }
}
