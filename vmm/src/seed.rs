//! The cloud-init NoCloud seed disk: a small FAT volume labelled `cidata` holding
//! meta-data, user-data and network-config (the format stock cloud images read, and the
//! one the minimal image's boot script reads).
//!
//! Two readers, two renderings (the image manifest's `seed`): the minimal image's own
//! reader gets exactly what it always got (docs/guest-image.md "Seed format"); the real
//! cloud-init of debian-12 gets what cloud-init 22.4 accepts without a warning, as
//! scripts/guest-image/debian-12/smoke proved (docs/guest-image.md "The seed it
//! expects").
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
use crate::image::SeedKind;
use crate::lease_id::LeaseId;
use crate::spec::{AuthorizedKey, HostKeySeed};

/// 1 MiB: a FAT12 volume, far larger than the three small files.
const SEED_BYTES: usize = 1024 * 1024;

/// What the guest learns at first boot.
pub struct SeedConfig<'a> {
    pub lease: LeaseId,
    /// Who reads the seed in the guest (`GuestImage::seed_kind`).
    pub kind: SeedKind,
    pub user: &'a str,
    pub authorized_key: &'a AuthorizedKey,
    pub host_key: &'a HostKeySeed,
    pub mac: [u8; 6],
    pub guest_addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// DNS resolvers the guest is given (cloud-init seeds only; the minimal image's seed
    /// stays as it was). Empty: none, which is all a guest whose egress is denied can
    /// use (docs/vmm.md "Network").
    pub nameservers: &'a [Ipv4Addr],
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
    let hostname = format!("peervm-{}", cfg.lease.short_hex(8));
    let meta_data = format!("instance-id: peervm-{hex}\nlocal-hostname: {hostname}\n");
    let private = cfg.host_key.openssh_private(&format!("peervm-{hex}"))?;
    let user_data = match cfg.kind {
        SeedKind::Minimal => minimal_user_data(cfg, &private),
        SeedKind::CloudInit => cloud_init_user_data(cfg, &private, &hostname),
    };
    let mut network_config = format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    set-name: eth0\n    \
         addresses:\n      - {addr}/{len}\n    routes:\n      - to: 0.0.0.0/0\n        via: {gw}\n",
        mac = format_mac(&cfg.mac),
        addr = cfg.guest_addr,
        len = cfg.prefix_len,
        gw = cfg.gateway,
    );
    if cfg.kind == SeedKind::CloudInit && !cfg.nameservers.is_empty() {
        // systemd-networkd hands them to systemd-resolved in debian-12
        network_config.push_str("    nameservers:\n      addresses:\n");
        for ns in cfg.nameservers {
            network_config.push_str(&format!("        - {ns}\n"));
        }
    }
    Ok(SeedFiles { meta_data, user_data, network_config })
}

/// What the minimal image's reader has always been given, byte for byte: its user is a
/// uid 0 account with `/bin/sh`, and it ignores the keys it does not need
/// (docs/guest-image.md "Seed format").
fn minimal_user_data(cfg: &SeedConfig<'_>, private: &str) -> Zeroizing<String> {
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
    push_host_keys(&mut user_data, cfg, private);
    user_data
}

/// The cloud-config cloud-init 22.4 takes without a warning (docs/guest-image.md "The
/// seed it expects"): a normal user with passwordless sudo holding only the requestor's
/// key, no password logins, no keys for root, and the lease's ed25519 host key as the
/// only one. No `ssh_genkeytypes`: 22.4's schema refuses `[]`, and with `ssh_keys`
/// given cloud-init generates no key anyway.
fn cloud_init_user_data(cfg: &SeedConfig<'_>, private: &str, hostname: &str) -> Zeroizing<String> {
    let mut user_data = Zeroizing::new(String::with_capacity(2048));
    user_data.push_str("#cloud-config\n");
    user_data.push_str(&format!("hostname: {hostname}\n"));
    user_data.push_str("users:\n");
    user_data.push_str(&format!("  - name: {}\n", cfg.user));
    user_data.push_str("    lock_passwd: true\n");
    user_data.push_str("    shell: /bin/bash\n");
    user_data.push_str("    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n");
    user_data.push_str("    ssh_authorized_keys:\n");
    user_data.push_str(&format!("      - {}\n", cfg.authorized_key.openssh_line()));
    user_data.push_str("ssh_pwauth: false\n");
    user_data.push_str("disable_root: true\n");
    user_data.push_str("ssh_deletekeys: true\n");
    push_host_keys(&mut user_data, cfg, private);
    user_data
}

fn push_host_keys(user_data: &mut String, cfg: &SeedConfig<'_>, private: &str) {
    user_data.push_str("ssh_keys:\n");
    user_data.push_str("  ed25519_private: |\n");
    for line in private.lines() {
        user_data.push_str("    ");
        user_data.push_str(line);
        user_data.push('\n');
    }
    user_data.push_str(&format!("  ed25519_public: {}\n", cfg.host_key.public_openssh()));
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
            kind: SeedKind::Minimal,
            user: "alice",
            authorized_key: key,
            host_key: host,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            guest_addr: Ipv4Addr::new(10, 213, 0, 2),
            prefix_len: 30,
            gateway: Ipv4Addr::new(10, 213, 0, 1),
            nameservers: &[],
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
    fn the_minimal_seed_is_byte_identical_to_what_it_was() {
        use sha2::{Digest, Sha256};
        let host = HostKeySeed::from_bytes([3; 32]);
        let key = AuthorizedKey::from_ed25519(&HostKeySeed::from_bytes([4; 32]).public_raw(), "me").unwrap();
        // nameservers are for cloud-init only: the minimal image's seed does not change
        let nameservers = [Ipv4Addr::new(9, 9, 9, 9)];
        let files = render(&SeedConfig { nameservers: &nameservers, ..config(&key, &host) }).unwrap();
        let sha = |s: &str| hex::encode(Sha256::digest(s.as_bytes()));
        // sha256 of the three files as the provider wrote them before debian-12 (commit
        // be062ad), for this config
        assert_eq!(sha(&files.meta_data), "0a2817acdafa06d932074d9a6061d2bb22eb4e0067e1f1b7de116f2a34f18cfa");
        assert_eq!(sha(&files.user_data), "71749906b320f9004e69213c683c6eb23c3b20fc2be082279fa5c7b4364d7b3e");
        assert_eq!(sha(&files.network_config), "f16a04617d84bc22e02e4bf12d9a97e5524aa66798af0b3bd0a4ccf93b8b8245");
    }

    fn yaml(text: &str) -> serde_yaml::Value {
        serde_yaml::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
    }

    fn keys(v: &serde_yaml::Value) -> Vec<&str> {
        let mut k: Vec<&str> = v.as_mapping().unwrap().keys().map(|k| k.as_str().unwrap()).collect();
        k.sort();
        k
    }

    #[test]
    fn the_cloud_init_seed_is_the_cloud_config_cloud_init_accepts() {
        let host = HostKeySeed::from_bytes([3; 32]);
        let key = AuthorizedKey::from_ed25519(&HostKeySeed::from_bytes([4; 32]).public_raw(), "me").unwrap();
        let nameservers = [Ipv4Addr::new(9, 9, 9, 9), Ipv4Addr::new(149, 112, 112, 112)];
        let cfg =
            SeedConfig { kind: SeedKind::CloudInit, user: "peervm", nameservers: &nameservers, ..config(&key, &host) };
        let files = render(&cfg).unwrap();
        assert!(files.user_data.starts_with("#cloud-config\n"), "cloud-init needs the header line");

        let ud = yaml(&files.user_data);
        assert_eq!(
            keys(&ud),
            ["disable_root", "hostname", "ssh_deletekeys", "ssh_keys", "ssh_pwauth", "users"],
            "exactly these keys; no ssh_genkeytypes (cloud-init 22.4 refuses [])"
        );
        assert_eq!(ud["hostname"].as_str(), Some("peervm-5a5a5a5a"));
        assert_eq!(ud["ssh_pwauth"].as_bool(), Some(false));
        assert_eq!(ud["disable_root"].as_bool(), Some(true));
        assert_eq!(ud["ssh_deletekeys"].as_bool(), Some(true));
        let users = ud["users"].as_sequence().unwrap();
        assert_eq!(users.len(), 1, "one user, no `default` entry");
        let u = &users[0];
        assert_eq!(keys(u), ["lock_passwd", "name", "shell", "ssh_authorized_keys", "sudo"]);
        assert_eq!(u["name"].as_str(), Some("peervm"));
        assert_eq!(u["lock_passwd"].as_bool(), Some(true));
        assert_eq!(u["shell"].as_str(), Some("/bin/bash"));
        assert_eq!(u["sudo"].as_str(), Some("ALL=(ALL) NOPASSWD:ALL"));
        let authorized: Vec<&str> =
            u["ssh_authorized_keys"].as_sequence().unwrap().iter().map(|k| k.as_str().unwrap()).collect();
        assert_eq!(authorized, [key.openssh_line()], "only the requestor's key");
        let hk = &ud["ssh_keys"];
        assert_eq!(keys(hk), ["ed25519_private", "ed25519_public"], "the lease's ed25519 key only");
        assert_eq!(hk["ed25519_public"].as_str(), Some(host.public_openssh().as_str()));
        let private = russh::keys::PrivateKey::from_openssh(hk["ed25519_private"].as_str().unwrap()).unwrap();
        assert_eq!(private.public_key().key_data(), host.public_key().key_data(), "the private half of the pinned key");

        let md = yaml(&files.meta_data);
        assert_eq!(md["instance-id"].as_str(), Some(format!("peervm-{}", "5a".repeat(16)).as_str()));
        assert_eq!(md["local-hostname"].as_str(), Some("peervm-5a5a5a5a"));

        let nc = yaml(&files.network_config);
        assert_eq!(nc["version"].as_u64(), Some(2));
        let eth0 = &nc["ethernets"]["eth0"];
        assert_eq!(keys(eth0), ["addresses", "match", "nameservers", "routes", "set-name"]);
        assert_eq!(eth0["match"]["macaddress"].as_str(), Some("52:54:00:12:34:56"));
        assert_eq!(eth0["addresses"][0].as_str(), Some("10.213.0.2/30"));
        assert_eq!(eth0["routes"][0]["to"].as_str(), Some("0.0.0.0/0"));
        assert_eq!(eth0["routes"][0]["via"].as_str(), Some("10.213.0.1"));
        let ns: Vec<&str> =
            eth0["nameservers"]["addresses"].as_sequence().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(ns, ["9.9.9.9", "149.112.112.112"]);

        // without resolvers (egress denied) the key is left out, not written empty
        let files = render(&SeedConfig { nameservers: &[], ..cfg }).unwrap();
        assert_eq!(
            keys(&yaml(&files.network_config)["ethernets"]["eth0"]),
            ["addresses", "match", "routes", "set-name"]
        );
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
