//! The one provider.toml the process tests write: every test's provider starts from
//! [`ProviderToml::new`] (real guest image, TCG allowed, no egress, its own names, pool
//! and SSH ports) and changes only the fields its scenario is about.

use std::path::{Path, PathBuf};

/// A provider config file's fields, as examples/provider.toml documents them.
#[derive(Clone, Debug)]
pub struct ProviderToml {
    pub listen: String,
    pub bootstrap: Vec<String>,
    pub metrics: Option<String>,
    pub region: String,
    pub ttl_secs: Option<u64>,
    pub republish_secs: Option<u64>,
    /// `[advert] refresh_secs`; `None` leaves the provider's default.
    pub refresh_secs: Option<u64>,
    pub ssh_host: String,
    /// Below the kernel's ephemeral ports (32768 and up), or an outgoing connection
    /// may hold a guest's port: `peervm provider doctor` warns about that.
    pub port_min: u16,
    pub port_max: u16,
    pub vcpus: u32,
    pub memory: String,
    pub disk: String,
    pub per_vcpu_hour: String,
    pub per_memory_gib_hour: String,
    pub per_disk_gib_hour: String,
    /// `[hypervisor] name_prefix` (2-16 of a-z0-9) and `iface_prefix` (2 letters).
    pub name_prefix: String,
    pub iface_prefix: String,
    /// `[network] pool`, e.g. "10.215.1.0/24".
    pub pool: String,
    /// `[network] egress`; `None` leaves the provider's default.
    pub egress: Option<String>,
    /// `[leases] min_secs`; `None` leaves the provider's default.
    pub lease_min_secs: Option<u64>,
    pub image_dir: PathBuf,
    /// More `[[images]]` offered next to `minimal`, as (name, image directory).
    pub extra_images: Vec<(String, PathBuf)>,
    /// Further `[[images]]` tables, rendered as given after those (e.g. an operator's
    /// stock image: `file`, `sha256`, `format`...).
    pub extra_image_tables: Vec<String>,
    /// More `[network]` lines, e.g. `max_exposed_ports = 2`.
    pub extra_network: Vec<String>,
    /// Lines added to `[hypervisor]`.
    pub extra_hypervisor: Vec<String>,
    /// Further tables, rendered as given at the end (e.g. `[abuse]`).
    pub extra_tables: Vec<String>,
}

impl ProviderToml {
    /// A provider on loopback with the given names, pool and first SSH port (16 ports).
    pub fn new(name_prefix: &str, iface_prefix: &str, pool: &str, port_min: u16, image_dir: &Path) -> Self {
        Self {
            listen: "/ip4/127.0.0.1/tcp/0".into(),
            bootstrap: Vec::new(),
            metrics: None,
            region: "test".into(),
            ttl_secs: None,
            republish_secs: None,
            refresh_secs: None,
            ssh_host: "127.0.0.1".into(),
            port_min,
            port_max: port_min + 15,
            vcpus: 1,
            memory: "1GiB".into(),
            disk: "20GiB".into(),
            per_vcpu_hour: "0.01".into(),
            per_memory_gib_hour: "0.004".into(),
            per_disk_gib_hour: "0.0001".into(),
            name_prefix: name_prefix.into(),
            iface_prefix: iface_prefix.into(),
            pool: pool.into(),
            egress: Some("deny".into()),
            lease_min_secs: None,
            image_dir: image_dir.into(),
            extra_images: Vec::new(),
            extra_image_tables: Vec::new(),
            extra_network: Vec::new(),
            extra_hypervisor: Vec::new(),
            extra_tables: Vec::new(),
        }
    }

    pub fn render(&self) -> String {
        let quoted = |v: &[String]| v.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
        let mut t = String::new();
        t += &format!("[node]\nlisten = [\"{}\"]\nbootstrap = [{}]\n", self.listen, quoted(&self.bootstrap));
        if let Some(m) = &self.metrics {
            t += &format!("metrics = \"{m}\"\n");
        }
        t += &format!("[advert]\nregion = \"{}\"\n", self.region);
        if let Some(s) = self.ttl_secs {
            t += &format!("ttl_secs = {s}\n");
        }
        if let Some(s) = self.republish_secs {
            t += &format!("republish_secs = {s}\n");
        }
        if let Some(s) = self.refresh_secs {
            t += &format!("refresh_secs = {s}\n");
        }
        t += &format!(
            "[ssh]\nhost = \"{}\"\nport_min = {}\nport_max = {}\n",
            self.ssh_host, self.port_min, self.port_max
        );
        t += &format!("[resources]\nvcpus = {}\nmemory = \"{}\"\ndisk = \"{}\"\n", self.vcpus, self.memory, self.disk);
        t += &format!(
            "[pricing]\ncurrency = \"USD\"\nper_vcpu_hour = \"{}\"\nper_memory_gib_hour = \"{}\"\nper_disk_gib_hour = \"{}\"\n",
            self.per_vcpu_hour, self.per_memory_gib_hour, self.per_disk_gib_hour
        );
        t += &format!(
            "[hypervisor]\nallow_tcg = true\nprobe_kvm = false\nname_prefix = \"{}\"\niface_prefix = \"{}\"\n",
            self.name_prefix, self.iface_prefix
        );
        for line in &self.extra_hypervisor {
            t += line;
            t += "\n";
        }
        t += &format!("[network]\npool = \"{}\"\n", self.pool);
        if let Some(e) = &self.egress {
            t += &format!("egress = \"{e}\"\n");
        }
        for line in &self.extra_network {
            t += line;
            t += "\n";
        }
        if let Some(s) = self.lease_min_secs {
            t += &format!("[leases]\nmin_secs = {s}\n");
        }
        t += &format!("[[images]]\nname = \"minimal\"\ndir = \"{}\"\n", self.image_dir.display());
        for (name, dir) in &self.extra_images {
            t += &format!("[[images]]\nname = \"{name}\"\ndir = \"{}\"\n", dir.display());
        }
        for table in &self.extra_image_tables {
            t += table;
        }
        for table in &self.extra_tables {
            t += table;
        }
        t
    }

    /// Writes the file to `path`; returns the path.
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.render()).expect("write provider config");
        path.to_path_buf()
    }
}
