//! Reloading provider.toml while the daemon runs (SIGHUP, `systemctl reload`,
//! `peervm provider reload`; docs/architecture.md, "Reload"): which changed fields the
//! running daemon can take, and which only a restart can. A reload is all or nothing: if
//! any changed field needs a restart, nothing applies and the running config stays.

use crate::provider::config::{ConfigError, ProviderConfig, RefreshTerms};
use crate::provider::lease::abuse::Rule;

/// What changed between the running config and the file, by the field names of
/// provider.toml.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigDiff {
    /// Changed fields the running daemon applies: what it advertises and the terms it
    /// grants new leases under. Running leases keep the terms they were granted under.
    pub live: Vec<&'static str>,
    /// Changed fields that only a restart applies: what the swarm, the guests' host
    /// plumbing or the verified images were built from at start.
    pub restart: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("reload refused, the running config stays: {0}")]
    Config(#[from] ConfigError),
    #[error(
        "reload refused, the running config stays: {} cannot change while the provider runs; restart it to apply {}",
        .fields.join(", "),
        if .fields.len() == 1 { "it" } else { "them" }
    )]
    NeedsRestart { fields: Vec<&'static str> },
    #[error(
        "reload refused, the running config stays: [advert] delegation: {0}; ask the owner for a new one: peervm owner delegate --node <this node's peer id>"
    )]
    Delegation(peervm_protocol::DelegationError),
    #[error("reload: cannot recompute free capacity under the new resources")]
    Capacity(#[source] crate::provider::lease::db::DbError),
    #[error("reload: the swarm node stopped")]
    Network(#[source] crate::network::NetworkError),
    /// The new config applied, but its advert could not be signed or sent; the next
    /// republish tries again.
    #[error("reload: applied, but the new advert was not published")]
    Publish(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ReloadError {
    /// The message and its causes on one line, as the log and the admin reply show it
    /// (a TOML error names its line only in its cause).
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(e) = cause {
            text.push_str(": ");
            text.push_str(&e.to_string());
            cause = e.source();
        }
        text
    }
}

impl ConfigDiff {
    /// Compares every field of `new` with `old`. The match below names every field of
    /// `ProviderConfig`, so a field added later does not compile until it is sorted into
    /// live or restart.
    pub fn between(old: &ProviderConfig, new: &ProviderConfig) -> ConfigDiff {
        let ProviderConfig {
            listen,
            bootstrap,
            data_dir,
            metrics,
            region,
            country,
            beneficiary,
            delegation,
            ttl_secs,
            republish_secs,
            refresh,
            ssh,
            resources,
            pricing,
            allow_tcg,
            probe_kvm,
            tcg_tb_size_mib,
            backend,
            libvirt_lease_dir,
            names,
            images,
            ssh_listen,
            address_pool,
            egress,
            guest_dns,
            max_exposed_ports,
            expose_privileged,
            expose_ports,
            egress_mbit,
            ingress_mbit,
            max_leases,
            min_lease_secs,
            max_lease_secs,
            trusted_block_lists,
            abuse,
        } = new;
        let mut diff = ConfigDiff::default();
        let mut live = |field: &'static str, changed: bool| {
            if changed {
                diff.live.push(field);
            }
        };
        // The advert's fields: the next advert carries them.
        live("advert.region", *region != old.region);
        live("advert.country", *country != old.country);
        live("advert.beneficiary", *beneficiary != old.beneficiary);
        live("advert.delegation", *delegation != old.delegation);
        live("advert.ttl_secs", *ttl_secs != old.ttl_secs);
        live("advert.republish_secs", *republish_secs != old.republish_secs);
        live("advert.refresh_secs", refresh.map(|r| r.period_secs) != old.refresh.map(|r| r.period_secs));
        let chain_secs = |r: &RefreshTerms| u64::from(r.period_secs) * u64::from(r.count);
        live(
            "advert.resign_secs",
            matches!((refresh, &old.refresh), (Some(a), Some(b)) if chain_secs(a) != chain_secs(b)),
        );
        // The terms of new leases (and the advert's totals and prices).
        live("resources.vcpus", resources.vcpus != old.resources.vcpus);
        live("resources.memory", resources.memory_mib != old.resources.memory_mib);
        live("resources.disk", resources.disk_gib != old.resources.disk_gib);
        live("pricing.currency", pricing.currency != old.pricing.currency);
        live("pricing.per_vcpu_hour", pricing.per_vcpu_hour_micros != old.pricing.per_vcpu_hour_micros);
        live(
            "pricing.per_memory_gib_hour",
            pricing.per_memory_gib_hour_micros != old.pricing.per_memory_gib_hour_micros,
        );
        live("pricing.per_disk_gib_hour", pricing.per_disk_gib_hour_micros != old.pricing.per_disk_gib_hour_micros);
        // The effective limit, which the SSH ports and the pool also bound: when they
        // change it moves too, but then the reload is refused for them anyway.
        live("leases.max_leases", *max_leases != old.max_leases);
        live("leases.min_secs", *min_lease_secs != old.min_lease_secs);
        live("leases.max_secs", *max_lease_secs != old.max_lease_secs);
        // Whose block lists apply: the swarm re-applies the lists it holds.
        live("blocklists.trust", *trusted_block_lists != old.trusted_block_lists);
        // Abuse detection: the next check applies the new settings to every lease.
        live("abuse.interval_secs", abuse.interval != old.abuse.interval);
        live("abuse.throttle_mbit", abuse.throttle_mbit != old.abuse.throttle_mbit);
        for rule in Rule::ALL {
            let field = match rule {
                Rule::NewConnections => "abuse.new_connections",
                Rule::Destinations => "abuse.destinations",
                Rule::Smtp => "abuse.smtp",
                Rule::Dropped => "abuse.dropped",
            };
            live(field, abuse.rule(rule) != old.abuse.rule(rule));
        }

        let mut restart = |field: &'static str, changed: bool| {
            if changed {
                diff.restart.push(field);
            }
        };
        // The swarm's listeners, dials and the metrics listener are bound at start.
        restart("node.listen", *listen != old.listen);
        restart("node.bootstrap", *bootstrap != old.bootstrap);
        restart("node.data_dir", *data_dir != old.data_dir);
        restart("node.metrics", *metrics != old.metrics);
        // Running leases hold SSH ports, addresses and host objects named from these.
        restart("ssh.host", ssh.host != old.ssh.host);
        restart("ssh.port_min", ssh.port_min != old.ssh.port_min);
        restart("ssh.port_max", ssh.port_max != old.ssh.port_max);
        restart("ssh.listen", *ssh_listen != old.ssh_listen);
        restart("network.pool", *address_pool != old.address_pool);
        restart("network.egress", *egress != old.egress);
        restart("network.guest_dns", *guest_dns != old.guest_dns);
        // running leases hold host ports of the range; the helper holds the rule
        restart("network.max_exposed_ports", *max_exposed_ports != old.max_exposed_ports);
        restart("network.expose_privileged", *expose_privileged != old.expose_privileged);
        restart("network.expose_port_min", expose_ports != &old.expose_ports);
        // the helper reads the limits at its start and sets them up with each lease
        restart("network.egress_mbit", *egress_mbit != old.egress_mbit);
        restart("network.ingress_mbit", *ingress_mbit != old.ingress_mbit);
        restart("hypervisor.allow_tcg", *allow_tcg != old.allow_tcg);
        restart("hypervisor.probe_kvm", *probe_kvm != old.probe_kvm);
        // the helper builds its QEMU command lines from the config it read at start
        restart("hypervisor.tcg_tb_size_mib", *tcg_tb_size_mib != old.tcg_tb_size_mib);
        // running guests stay with the backend that started them
        restart("hypervisor.backend", *backend != old.backend);
        restart("hypervisor.libvirt_lease_dir", *libvirt_lease_dir != old.libvirt_lease_dir);
        restart("hypervisor.name_prefix", names.long() != old.names.long());
        restart("hypervisor.iface_prefix", names.short() != old.names.short());
        // Images are opened and verified at start; a changed manifest or file is a changed
        // image (a stock image's source holds its firmware, format and login user too).
        let same_images = images.len() == old.images.len()
            && images
                .iter()
                .zip(&old.images)
                .all(|(a, b)| a.name == b.name && a.source == b.source && a.sha256 == b.sha256);
        restart("images", !same_images);
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.restart.is_empty()
    }

    /// The live fields to apply, or the refusal naming every field that needs a restart.
    pub fn decide(self) -> Result<Vec<&'static str>, ReloadError> {
        if self.restart.is_empty() { Ok(self.live) } else { Err(ReloadError::NeedsRestart { fields: self.restart }) }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A valid config file and the image directories it can point at; each test case
    /// changes one line of it.
    struct Base {
        dir: tempfile::TempDir,
        image: std::path::PathBuf,
    }

    impl Base {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let image = dir.path().join("image");
            std::fs::create_dir_all(&image).unwrap();
            std::fs::write(image.join("manifest.json"), br#"{"name":"minimal","version":1}"#).unwrap();
            let other = dir.path().join("other");
            std::fs::create_dir_all(&other).unwrap();
            std::fs::write(other.join("manifest.json"), br#"{"name":"other","version":1}"#).unwrap();
            Base { dir, image }
        }

        fn text(&self) -> String {
            format!(
                "[node]\nlisten = [\"/ip4/127.0.0.1/tcp/4002\"]\nbootstrap = []\n\
                 [advert]\nregion = \"eu\"\n\
                 [ssh]\nhost = \"127.0.0.1\"\nport_min = 22000\nport_max = 22009\n\
                 [resources]\nvcpus = 2\nmemory = \"1GiB\"\ndisk = \"10GiB\"\n\
                 [pricing]\ncurrency = \"USD\"\nper_vcpu_hour = \"0.01\"\nper_memory_gib_hour = \"0\"\nper_disk_gib_hour = \"0\"\n\
                 [hypervisor]\nallow_tcg = true\n\
                 [network]\npool = \"10.77.0.0/24\"\n\
                 [leases]\nmin_secs = 60\nmax_leases = 4\n\
                 [blocklists]\ntrust = []\n\
                 [[images]]\nname = \"minimal\"\ndir = \"{}\"\n",
                self.image.display()
            )
        }

        fn parse(&self, text: &str) -> ProviderConfig {
            ProviderConfig::parse(text, Path::new("provider.toml")).unwrap_or_else(|e| panic!("{e}: {text}"))
        }

        /// The base config with `line` added to `[table]` (TOML refuses a key twice, so
        /// the base must not set it already).
        fn with(&self, table: &str, line: &str) -> ProviderConfig {
            let text = self.text();
            let header = format!("[{table}]\n");
            let text = if let Some(at) = text.find(&header) {
                let at = at + header.len();
                format!("{}{line}\n{}", &text[..at], &text[at..])
            } else {
                format!("{header}{line}\n{text}")
            };
            self.parse(&text)
        }

        /// The base config with the line starting `key =` replaced by `line`.
        fn replaced(&self, key: &str, line: &str) -> ProviderConfig {
            let text = self.text();
            let mut found = false;
            let text: String = text
                .lines()
                .map(|l| {
                    if l.starts_with(&format!("{key} =")) && !found {
                        found = true;
                        line.to_string()
                    } else {
                        l.to_string()
                    }
                })
                .collect::<Vec<_>>()
                .join("\n");
            assert!(found, "no `{key} =` line in the base config");
            self.parse(&text)
        }
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let b = Base::new();
        let diff = ConfigDiff::between(&b.parse(&b.text()), &b.parse(&b.text()));
        assert!(diff.is_empty(), "{diff:?}");
        assert_eq!(diff.decide().unwrap(), Vec::<&str>::new());
    }

    #[test]
    fn each_live_field_applies_and_is_named() {
        let b = Base::new();
        let old = b.parse(&b.text());
        let signer = peervm_protocol::samples::numbered_key(7).peer_id();
        // The file is read at parse and verified by the daemon; any bytes differ here.
        let delegation = b.dir.path().join("delegation.cbor");
        std::fs::write(&delegation, b"signed by the owner").unwrap();
        let cases: Vec<(&str, ProviderConfig)> = vec![
            ("advert.region", b.replaced("region", "region = \"us\"")),
            ("advert.country", b.with("advert", "country = \"DE\"")),
            ("advert.beneficiary", b.with("advert", "beneficiary = \"0x00000000000000000000000000000000000000aa\"")),
            ("advert.delegation", b.with("advert", &format!("delegation = \"{}\"", delegation.display()))),
            // (Its refresh period is the default's, 100 s, set: a third of 200 s is not.)
            ("advert.ttl_secs", b.with("advert", "ttl_secs = 200\nrefresh_secs = 100")),
            ("advert.republish_secs", b.with("advert", "republish_secs = 30")),
            ("advert.refresh_secs", b.with("advert", "refresh_secs = 0")),
            ("advert.resign_secs", b.with("advert", "resign_secs = 3600")),
            ("resources.vcpus", b.replaced("vcpus", "vcpus = 3")),
            ("resources.memory", b.replaced("memory", "memory = \"2GiB\"")),
            ("resources.disk", b.replaced("disk", "disk = \"20GiB\"")),
            ("pricing.currency", b.replaced("currency", "currency = \"EUR\"")),
            ("pricing.per_vcpu_hour", b.replaced("per_vcpu_hour", "per_vcpu_hour = \"0.02\"")),
            ("pricing.per_memory_gib_hour", b.replaced("per_memory_gib_hour", "per_memory_gib_hour = \"0.001\"")),
            ("pricing.per_disk_gib_hour", b.replaced("per_disk_gib_hour", "per_disk_gib_hour = \"0.001\"")),
            ("leases.max_leases", b.replaced("max_leases", "max_leases = 2")),
            ("leases.min_secs", b.replaced("min_secs", "min_secs = 120")),
            ("leases.max_secs", b.with("leases", "max_secs = 7200")),
            ("blocklists.trust", b.replaced("trust", &format!("trust = [\"{signer}\"]"))),
            ("abuse.interval_secs", b.with("abuse", "interval_secs = 3")),
            ("abuse.throttle_mbit", b.with("abuse", "throttle_mbit = 4")),
            ("abuse.new_connections", b.with("abuse.new_connections", "action = \"isolate\"")),
            ("abuse.destinations", b.with("abuse.destinations", "threshold = 30")),
            ("abuse.smtp", b.with("abuse.smtp", "threshold = 1")),
            ("abuse.dropped", b.with("abuse.dropped", "action = \"throttle\"")),
        ];
        for (field, new) in cases {
            let diff = ConfigDiff::between(&old, &new);
            assert_eq!(diff, ConfigDiff { live: vec![field], restart: vec![] }, "{field}");
            assert_eq!(diff.decide().unwrap(), vec![field], "{field}");
        }
    }

    #[test]
    fn each_field_that_needs_a_restart_is_named_and_refuses_the_whole_reload() {
        let b = Base::new();
        let old = b.parse(&b.text());
        let other_image = b.image.with_file_name("other");
        let cases: Vec<(&str, ProviderConfig)> = vec![
            ("node.listen", b.replaced("listen", "listen = [\"/ip4/127.0.0.1/tcp/4003\"]")),
            ("node.bootstrap", b.replaced("bootstrap", "bootstrap = [\"/ip4/192.0.2.1/tcp/4001\"]")),
            ("node.data_dir", b.with("node", "data_dir = \"/var/lib/elsewhere\"")),
            ("node.metrics", b.with("node", "metrics = \"127.0.0.1:9464\"")),
            ("ssh.host", b.replaced("host", "host = \"provider.example\"\nlisten = \"127.0.0.1\"")),
            ("ssh.port_min", b.replaced("port_min", "port_min = 22001")),
            ("ssh.port_max", b.replaced("port_max", "port_max = 22008")),
            ("ssh.listen", b.with("ssh", "listen = \"0.0.0.0\"")),
            ("network.pool", b.replaced("pool", "pool = \"10.78.0.0/24\"")),
            ("network.egress", b.with("network", "egress = \"public-only\"")),
            ("network.guest_dns", b.with("network", "guest_dns = [\"9.9.9.9\"]")),
            ("network.egress_mbit", b.with("network", "egress_mbit = 50")),
            ("network.ingress_mbit", b.with("network", "ingress_mbit = 50")),
            ("hypervisor.name_prefix", b.with("hypervisor", "name_prefix = \"other\"")),
            ("hypervisor.iface_prefix", b.with("hypervisor", "iface_prefix = \"zz\"")),
            ("images", b.replaced("dir", &format!("dir = \"{}\"", other_image.display()))),
        ];
        for (field, new) in cases {
            let diff = ConfigDiff::between(&old, &new);
            assert_eq!(diff, ConfigDiff { live: vec![], restart: vec![field] }, "{field}");
            match diff.decide() {
                Err(ReloadError::NeedsRestart { fields }) => assert_eq!(fields, vec![field]),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn hypervisor_switches_need_a_restart() {
        let b = Base::new();
        let old = b.parse(&b.text());
        let tcg_only = b.replaced("allow_tcg", "allow_tcg = true\nprobe_kvm = false");
        assert_eq!(ConfigDiff::between(&old, &tcg_only).restart, vec!["hypervisor.probe_kvm"]);
        let kvm_only = b.replaced("allow_tcg", "allow_tcg = false");
        assert_eq!(ConfigDiff::between(&old, &kvm_only).restart, vec!["hypervisor.allow_tcg"]);
    }

    #[test]
    fn a_mixed_change_is_refused_whole_and_the_message_names_every_restart_field() {
        let b = Base::new();
        let old = b.parse(&b.text());
        let text = b
            .text()
            .replace("per_vcpu_hour = \"0.01\"", "per_vcpu_hour = \"0.05\"")
            .replace("port_min = 22000", "port_min = 22100")
            .replace("port_max = 22009", "port_max = 22109")
            .replace("tcp/4002", "tcp/4010");
        let diff = ConfigDiff::between(&old, &b.parse(&text));
        assert_eq!(diff.live, vec!["pricing.per_vcpu_hour"]);
        assert_eq!(diff.restart, vec!["node.listen", "ssh.port_min", "ssh.port_max"]);
        let message = diff.decide().unwrap_err().to_string();
        assert_eq!(
            message,
            "reload refused, the running config stays: node.listen, ssh.port_min, ssh.port_max cannot change \
             while the provider runs; restart it to apply them"
        );
    }
}
