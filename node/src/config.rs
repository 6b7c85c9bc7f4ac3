//! The provider's configuration file (TOML), validated at start with clear errors.

use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use peervm_protocol::{Accel, Pricing, ResourceAmounts, SshEndpoint};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::units;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {field}: {message}")]
    Invalid { path: PathBuf, field: &'static str, message: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    node: RawNode,
    #[serde(default)]
    advert: RawAdvert,
    ssh: RawSsh,
    resources: RawResources,
    pricing: RawPricing,
    #[serde(default)]
    hypervisor: RawHypervisor,
    #[serde(default)]
    images: Vec<RawImage>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    #[serde(default)]
    listen: Vec<String>,
    #[serde(default)]
    bootstrap: Vec<String>,
    data_dir: Option<PathBuf>,
    metrics: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdvert {
    #[serde(default)]
    region: String,
    country: Option<String>,
    beneficiary: Option<String>,
    ttl_secs: Option<u64>,
    republish_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    host: String,
    port_min: u16,
    port_max: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResources {
    vcpus: u32,
    memory: String,
    disk: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPricing {
    currency: String,
    per_vcpu_hour: String,
    per_memory_gib_hour: String,
    per_disk_gib_hour: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHypervisor {
    #[serde(default)]
    allow_tcg: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    name: String,
    dir: PathBuf,
}

/// A guest image the provider offers, pinned by the sha256 of its manifest.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    pub name: String,
    pub dir: PathBuf,
    pub manifest_sha256: [u8; 32],
}

/// A validated provider configuration.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub data_dir: Option<PathBuf>,
    pub metrics: Option<std::net::SocketAddr>,
    pub region: String,
    pub country: Option<String>,
    pub beneficiary: Option<String>,
    pub ttl_secs: u64,
    pub republish_secs: u64,
    pub ssh: SshEndpoint,
    pub resources: ResourceAmounts,
    pub pricing: Pricing,
    pub allow_tcg: bool,
    pub images: Vec<ImageConfig>,
}

impl ProviderConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })?;
        let invalid = |field: &'static str, message: String| ConfigError::Invalid { path: path.into(), field, message };
        let base = path.parent().unwrap_or(Path::new("."));

        let listen = if raw.node.listen.is_empty() {
            vec!["/ip4/0.0.0.0/tcp/4002".parse().unwrap_or_else(|_| unreachable!())]
        } else {
            parse_addrs(&raw.node.listen).map_err(|m| invalid("node.listen", m))?
        };
        let bootstrap = parse_addrs(&raw.node.bootstrap).map_err(|m| invalid("node.bootstrap", m))?;
        let metrics = match raw.node.metrics {
            None => None,
            Some(m) => {
                let addr: std::net::SocketAddr = m
                    .parse()
                    .map_err(|_| invalid("node.metrics", format!("`{m}` is not an address like 127.0.0.1:9464")))?;
                if !addr.ip().is_loopback() {
                    return Err(invalid(
                        "node.metrics",
                        format!("{addr} is not loopback; metrics are served on 127.0.0.1 only"),
                    ));
                }
                Some(addr)
            }
        };

        let max_ttl = peervm_protocol::advert::MAX_ADVERT_LIFETIME_MS / 1000;
        let ttl_secs = raw.advert.ttl_secs.unwrap_or(max_ttl);
        if ttl_secs == 0 || ttl_secs > max_ttl {
            return Err(invalid("advert.ttl_secs", format!("must be 1..={max_ttl}, got {ttl_secs}")));
        }
        let republish_secs = raw.advert.republish_secs.unwrap_or(60.min(ttl_secs.div_ceil(2)));
        if republish_secs == 0 || republish_secs >= ttl_secs {
            return Err(invalid(
                "advert.republish_secs",
                format!(
                    "must be at least 1 and below ttl_secs ({ttl_secs}) so the advert never lapses, got {republish_secs}"
                ),
            ));
        }

        if raw.resources.vcpus == 0 {
            return Err(invalid("resources.vcpus", "must be at least 1".into()));
        }
        let memory_mib =
            units::parse_size_mib(&raw.resources.memory, 1).map_err(|e| invalid("resources.memory", e.to_string()))?;
        let disk_gib =
            units::parse_size_gib(&raw.resources.disk).map_err(|e| invalid("resources.disk", e.to_string()))?;
        let resources = ResourceAmounts { vcpus: raw.resources.vcpus, memory_mib, disk_gib };

        let money = |field: &'static str, v: &str| units::parse_micros(v).map_err(|e| invalid(field, e.to_string()));
        let pricing = Pricing {
            currency: raw.pricing.currency.clone(),
            per_vcpu_hour_micros: money("pricing.per_vcpu_hour", &raw.pricing.per_vcpu_hour)?,
            per_memory_gib_hour_micros: money("pricing.per_memory_gib_hour", &raw.pricing.per_memory_gib_hour)?,
            per_disk_gib_hour_micros: money("pricing.per_disk_gib_hour", &raw.pricing.per_disk_gib_hour)?,
        };

        let ssh = SshEndpoint { host: raw.ssh.host, port_min: raw.ssh.port_min, port_max: raw.ssh.port_max };
        if ssh.port_min == 0 || ssh.port_min > ssh.port_max {
            return Err(invalid(
                "ssh",
                format!("port range {}-{} is empty or starts at 0", ssh.port_min, ssh.port_max),
            ));
        }

        let mut images = Vec::new();
        for img in raw.images {
            let dir = if img.dir.is_relative() { base.join(&img.dir) } else { img.dir.clone() };
            let manifest = dir.join("manifest.json");
            let bytes = std::fs::read(&manifest).map_err(|e| {
                invalid(
                    "images",
                    format!(
                        "image `{}`: cannot read {}: {e}; build it with scripts/build-guest-image",
                        img.name,
                        manifest.display()
                    ),
                )
            })?;
            images.push(ImageConfig { name: img.name, dir, manifest_sha256: Sha256::digest(&bytes).into() });
        }
        if images.is_empty() {
            return Err(invalid("images", "offer at least one image ([[images]] name = ..., dir = ...)".into()));
        }

        let config = ProviderConfig {
            listen,
            bootstrap,
            data_dir: raw.node.data_dir,
            metrics,
            region: raw.advert.region,
            country: raw.advert.country,
            beneficiary: raw.advert.beneficiary,
            ttl_secs,
            republish_secs,
            ssh,
            resources,
            pricing,
            allow_tcg: raw.hypervisor.allow_tcg,
            images,
        };
        // The advert this config produces must pass the same checks every receiver applies.
        let probe_key = peervm_protocol::samples::numbered_key(0);
        config
            .advert(&probe_key, 1, 0, Accel::Tcg, config.resources, &[])
            .check_well_formed()
            .map_err(|e| invalid("advert", e.to_string()))?;
        Ok(config)
    }

    /// The advert this provider publishes.
    pub fn advert(
        &self,
        key: &peervm_protocol::SigningKey,
        seq: u64,
        now_unix_ms: u64,
        accel: Accel,
        free: ResourceAmounts,
        listen_addrs: &[Multiaddr],
    ) -> peervm_protocol::Advertisement {
        peervm_protocol::Advertisement {
            version: peervm_protocol::advert::ADVERT_VERSION,
            provider: key.peer_id(),
            seq,
            issued_at_unix_ms: now_unix_ms,
            expires_at_unix_ms: now_unix_ms + self.ttl_secs * 1000,
            listen_addrs: listen_addrs.iter().take(peervm_protocol::advert::MAX_LISTEN_ADDRS).cloned().collect(),
            ssh: self.ssh.clone(),
            resources: peervm_protocol::Resources { total: self.resources, free },
            pricing: self.pricing.clone(),
            region: self.region.clone(),
            country: self.country.clone(),
            hypervisor: peervm_protocol::HypervisorInfo { accel, arch: std::env::consts::ARCH.into() },
            images: self
                .images
                .iter()
                .map(|i| peervm_protocol::ImageOffer { name: i.name.clone(), sha256: i.manifest_sha256 })
                .collect(),
            beneficiary: self.beneficiary.clone(),
            withdrawn: false,
        }
    }
}

/// Parses multiaddrs, each error naming the bad one.
pub fn parse_addrs(list: &[String]) -> Result<Vec<Multiaddr>, String> {
    list.iter()
        .map(|s| {
            s.parse::<Multiaddr>().map_err(|e| {
                format!("`{s}` is not a multiaddr ({e}); example: /ip4/203.0.113.7/tcp/4001/p2p/12D3KooW...")
            })
        })
        .collect()
}
