//! The provider's configuration file (TOML), validated at start with clear errors.

use std::path::{Path, PathBuf};

use libp2p::Multiaddr;
use peervm_protocol::{Accel, Pricing, ResourceAmounts, SshEndpoint};
// TCG's translation buffer per guest that is accepted, as in a manifest
use peervm_vmm::image::TCG_TB_SIZE_MIB;
use serde::Deserialize;
use thiserror::Error;

use crate::units;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The TOML does not parse or does not fit the schema; the cause names the line.
    #[error("config {path}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
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
    #[serde(default)]
    network: RawNetwork,
    #[serde(default)]
    leases: RawLeases,
    #[serde(default)]
    blocklists: RawBlockLists,
    #[serde(default)]
    abuse: RawAbuse,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlockLists {
    /// Peer ids of operators whose signed block lists this provider applies.
    #[serde(default)]
    trust: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNetwork {
    /// IPv4 pool the guests' /30 links come from.
    pool: Option<String>,
    /// "deny" or "public-only".
    egress: Option<String>,
    /// Public IPv4 resolvers given to guests allowed out (cloud-init images' network-config).
    #[serde(default)]
    guest_dns: Vec<String>,
    /// Guest TCP ports one lease may expose (0: none), each on a port of
    /// `expose_port_min..=expose_port_max`, a block of `max_exposed_ports` per lease slot.
    #[serde(default)]
    max_exposed_ports: u16,
    expose_port_min: Option<u16>,
    expose_port_max: Option<u16>,
    /// Whether guest ports below 1024 may be exposed.
    #[serde(default)]
    expose_privileged: bool,
    /// Bandwidth limits of each lease's guest, out and in, in Mbit/s (0 or absent: none).
    #[serde(default)]
    egress_mbit: u32,
    #[serde(default)]
    ingress_mbit: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeases {
    /// Most leases at once (default: as many as the SSH port range and the pool allow).
    max_leases: Option<u32>,
    /// Shortest and longest lease accepted, in seconds.
    min_secs: Option<u64>,
    max_secs: Option<u64>,
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
    /// Refresh tokens instead of re-signed adverts (docs/protocol.md, section 4a): one
    /// every this many seconds; 0 turns them off.
    refresh_secs: Option<u64>,
    /// With refresh tokens on: how long one chain of tokens lasts before the provider signs
    /// a new advert anyway.
    resign_secs: Option<u64>,
    /// A file with the owner's signed delegation to this node (`peervm owner delegate`).
    delegation: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    host: String,
    port_min: u16,
    port_max: u16,
    /// The address the per-lease SSH ports are bound to; default: `host` when it is an IP
    /// address, else 0.0.0.0.
    listen: Option<String>,
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
    /// Boot a probe guest under KVM at start (default true). With `allow_tcg` and
    /// `probe_kvm = false` the provider uses software emulation without probing.
    probe_kvm: Option<bool>,
    /// Prefix of the names of every host object of a guest (namespaces, nft tables,
    /// cgroups: 2-16 of a-z0-9) and of its host interfaces (2 letters). Two providers on
    /// one host need different prefixes: each cleans up what carries its own at start.
    name_prefix: Option<String>,
    iface_prefix: Option<String>,
    /// MiB of TCG's translation buffer per guest (QEMU `-accel tcg,tb-size=`), when guests
    /// run under software emulation; default: the image's manifest's, else 128. The buffer
    /// is most of the host memory a TCG guest takes beyond its RAM, and a smaller one slows
    /// a large guest down (BENCHMARKS.md, "Guests").
    tcg_tb_size_mib: Option<u32>,
    /// Who runs the guests' QEMU: "qemu" (the provider itself, the default) or "libvirt"
    /// (libvirtd, as transient domains operators see with virsh; docs/vmm.md "The libvirt
    /// backend").
    backend: Option<String>,
    /// The libvirt backend's libvirtd (default qemu:///system).
    libvirt_uri: Option<String>,
    /// The libvirt backend's lease directories (overlays, seed disks): libvirt's QEMU
    /// opens them by path, so the QEMU user must be able to traverse to it (default
    /// /var/lib/peervm-libvirt).
    libvirt_lease_dir: Option<PathBuf>,
}

/// Where the libvirt backend keeps lease directories by default (`[hypervisor]
/// libvirt_lease_dir`).
pub const DEFAULT_LIBVIRT_LEASE_DIR: &str = "/var/lib/peervm-libvirt";

use super::abuse_config::{RawAbuse, parse_abuse};
pub use super::image_config::{ImageConfig, ImageSource};
use super::image_config::{RawImage, parse_images};

/// The highest bandwidth limit accepted (100 Gbit/s): beyond it a limit is a typo.
const MAX_LIMIT_MBIT: u32 = 100_000;

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
    /// The owner's signed delegation (checked against the node key at start).
    pub delegation: Option<Vec<u8>>,
    pub ttl_secs: u64,
    /// Without refresh tokens: how often the advert is signed again.
    pub republish_secs: u64,
    /// Refresh tokens (`advert.refresh_secs`, `advert.resign_secs`), or None for a
    /// re-signed advert every `republish_secs`.
    pub refresh: Option<RefreshTerms>,
    pub ssh: SshEndpoint,
    pub resources: ResourceAmounts,
    pub pricing: Pricing,
    pub allow_tcg: bool,
    pub probe_kvm: bool,
    /// `None`: the image's, else the VMM's default (`VmmConfig::tcg_tb_size_for`).
    pub tcg_tb_size_mib: Option<u32>,
    /// Who runs the guests' QEMU (`[hypervisor] backend`).
    pub backend: peervm_vmm::Backend,
    /// The libvirt backend's lease directories (`[hypervisor] libvirt_lease_dir`).
    pub libvirt_lease_dir: PathBuf,
    pub names: peervm_vmm::NamePrefix,
    pub images: Vec<ImageConfig>,
    pub ssh_listen: std::net::IpAddr,
    pub address_pool: peervm_vmm::AddressPool,
    pub egress: peervm_vmm::EgressPolicy,
    /// Resolvers for guests under `egress = "public-only"` (none under "deny").
    pub guest_dns: Vec<std::net::Ipv4Addr>,
    /// Exposed ports (docs/architecture.md "Exposed ports"): how many per lease, whether
    /// privileged ones, and the host port range (`None` when none is exposed).
    pub max_exposed_ports: u16,
    pub expose_privileged: bool,
    pub expose_ports: Option<std::ops::RangeInclusive<u16>>,
    /// Bandwidth limits of each lease's guest in Mbit/s, enforced by the host's kernel
    /// (docs/vmm.md "Bandwidth limits"); `None`: no limit.
    pub egress_mbit: Option<u32>,
    pub ingress_mbit: Option<u32>,
    /// Most concurrent leases: the smallest of the config's limit, the SSH port range
    /// and the address pool.
    pub max_leases: u32,
    pub min_lease_secs: u64,
    pub max_lease_secs: u64,
    /// Signers whose block lists are applied.
    pub trusted_block_lists: std::collections::HashSet<libp2p::PeerId>,
    /// Abuse detection (`[abuse]`; docs/architecture.md "Abuse detection").
    pub abuse: super::lease::abuse::AbuseConfig,
}

impl ProviderConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
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
        let refresh = refresh_terms(ttl_secs, raw.advert.refresh_secs, raw.advert.resign_secs)
            .map_err(|(field, message)| invalid(field, message))?;
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

        let ssh_listen = match &raw.ssh.listen {
            Some(l) => l.parse().map_err(|_| invalid("ssh.listen", format!("`{l}` is not an IP address")))?,
            None => ssh.host.parse().unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
        };
        let address_pool = match &raw.network.pool {
            Some(p) => p.parse().map_err(|e: peervm_vmm::VmmError| invalid("network.pool", e.to_string()))?,
            None => peervm_vmm::AddressPool::default(),
        };
        let egress = match &raw.network.egress {
            Some(e) => e.parse().map_err(|e: peervm_vmm::VmmError| invalid("network.egress", e.to_string()))?,
            None => peervm_vmm::EgressPolicy::Deny,
        };
        let guest_dns = raw
            .network
            .guest_dns
            .iter()
            .map(|a| a.parse().map_err(|_| invalid("network.guest_dns", format!("`{a}` is not an IPv4 address"))))
            .collect::<Result<Vec<std::net::Ipv4Addr>, _>>()?;
        let defaults = peervm_vmm::NamePrefix::default();
        let names = peervm_vmm::NamePrefix::new(
            raw.hypervisor.name_prefix.as_deref().unwrap_or(defaults.long()),
            raw.hypervisor.iface_prefix.as_deref().unwrap_or(defaults.short()),
        )
        .map_err(|e| invalid("hypervisor.name_prefix", e.to_string()))?;
        let port_count = u32::from(ssh.port_max - ssh.port_min) + 1;
        let mut max_leases = port_count.min(address_pool.slots());
        if let Some(m) = raw.leases.max_leases {
            if m == 0 {
                return Err(invalid("leases.max_leases", "must be at least 1".into()));
            }
            max_leases = max_leases.min(m);
        }
        let n = &raw.network;
        let expose_ports = match (n.max_exposed_ports, n.expose_port_min, n.expose_port_max) {
            (0, _, _) => None,
            (max, Some(lo), Some(hi)) => {
                if max as usize > peervm_protocol::MAX_EXPOSED_PORTS {
                    return Err(invalid(
                        "network.max_exposed_ports",
                        format!("{max} is more than {}", peervm_protocol::MAX_EXPOSED_PORTS),
                    ));
                }
                let needed = u64::from(max) * u64::from(max_leases);
                if lo < 1024 || lo > hi || u64::from(hi - lo) + 1 < needed {
                    return Err(invalid(
                        "network.expose_port_min",
                        format!(
                            "the range {lo}-{hi} must lie above 1023 and hold max_exposed_ports ({max}) x                              leases.max_leases ({max_leases}) = {needed} ports: a block per lease, so that it                              never runs out"
                        ),
                    ));
                }
                let ssh_range = ssh.port_min..=ssh.port_max;
                if ssh_range.contains(&lo) || ssh_range.contains(&hi) || (lo < ssh.port_min && hi > ssh.port_max) {
                    return Err(invalid(
                        "network.expose_port_min",
                        format!("the range {lo}-{hi} overlaps ssh's ports"),
                    ));
                }
                Some(lo..=hi)
            }
            (_, _, _) => {
                return Err(invalid(
                    "network.max_exposed_ports",
                    "needs network.expose_port_min and network.expose_port_max".into(),
                ));
            }
        };
        let limit = |field: &'static str, mbit: u32| match mbit {
            0 => Ok(None),
            m if m > MAX_LIMIT_MBIT => Err(invalid(field, format!("{m} Mbit/s is more than {MAX_LIMIT_MBIT}"))),
            m => Ok(Some(m)),
        };
        let egress_mbit = limit("network.egress_mbit", n.egress_mbit)?;
        let ingress_mbit = limit("network.ingress_mbit", n.ingress_mbit)?;
        let abuse = parse_abuse(raw.abuse, egress_mbit).map_err(|(field, m)| invalid(field, m))?;
        let min_lease_secs = raw.leases.min_secs.unwrap_or(60);
        let max_lease_secs = raw.leases.max_secs.unwrap_or(peervm_protocol::lease::MAX_LEASE_SECS);
        if min_lease_secs == 0
            || min_lease_secs > max_lease_secs
            || max_lease_secs > peervm_protocol::lease::MAX_LEASE_SECS
        {
            return Err(invalid(
                "leases",
                format!(
                    "min_secs {min_lease_secs} and max_secs {max_lease_secs} must satisfy 1 <= min <= max <= {}",
                    peervm_protocol::lease::MAX_LEASE_SECS
                ),
            ));
        }

        let delegation = match &raw.advert.delegation {
            None => None,
            Some(p) => {
                let p = if p.is_relative() { base.join(p) } else { p.clone() };
                Some(
                    std::fs::read(&p)
                        .map_err(|e| invalid("advert.delegation", format!("cannot read {}: {e}", p.display())))?,
                )
            }
        };
        let trusted_block_lists = raw
            .blocklists
            .trust
            .iter()
            .map(|p| {
                p.parse::<libp2p::PeerId>().map_err(|_| invalid("blocklists.trust", format!("`{p}` is not a peer id")))
            })
            .collect::<Result<_, _>>()?;

        let images = parse_images(raw.images, base).map_err(|m| invalid("images", m))?;

        let config = ProviderConfig {
            listen,
            bootstrap,
            data_dir: raw.node.data_dir,
            metrics,
            region: raw.advert.region,
            country: raw.advert.country,
            beneficiary: raw.advert.beneficiary,
            delegation,
            ttl_secs,
            republish_secs,
            refresh,
            ssh,
            resources,
            pricing,
            allow_tcg: raw.hypervisor.allow_tcg,
            probe_kvm: raw.hypervisor.probe_kvm.unwrap_or(true),
            tcg_tb_size_mib: raw.hypervisor.tcg_tb_size_mib,
            backend: match raw.hypervisor.backend.as_deref() {
                None | Some("qemu") => peervm_vmm::Backend::Qemu,
                Some("libvirt") => peervm_vmm::Backend::Libvirt {
                    uri: raw
                        .hypervisor
                        .libvirt_uri
                        .clone()
                        .unwrap_or_else(|| peervm_vmm::Backend::DEFAULT_LIBVIRT_URI.to_string()),
                },
                Some(other) => {
                    return Err(invalid("hypervisor.backend", format!("{other:?}: give \"qemu\" or \"libvirt\"")));
                }
            },
            libvirt_lease_dir: raw
                .hypervisor
                .libvirt_lease_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBVIRT_LEASE_DIR)),
            names,
            images,
            ssh_listen,
            address_pool,
            egress,
            guest_dns,
            max_exposed_ports: if expose_ports.is_some() { raw.network.max_exposed_ports } else { 0 },
            expose_privileged: raw.network.expose_privileged,
            expose_ports,
            egress_mbit,
            ingress_mbit,
            max_leases,
            min_lease_secs,
            max_lease_secs,
            trusted_block_lists,
            abuse,
        };
        if let Some(tb) = config.tcg_tb_size_mib
            && !TCG_TB_SIZE_MIB.contains(&tb)
        {
            return Err(invalid(
                "hypervisor.tcg_tb_size_mib",
                format!("{tb} MiB is outside {}..={} MiB", TCG_TB_SIZE_MIB.start(), TCG_TB_SIZE_MIB.end()),
            ));
        }
        if !config.allow_tcg && !config.probe_kvm {
            return Err(invalid(
                "hypervisor",
                "probe_kvm = false needs allow_tcg = true (without the probe only software emulation is known to work)"
                    .into(),
            ));
        }
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
            network: (self.max_exposed_ports > 0 || self.egress_mbit.is_some() || self.ingress_mbit.is_some())
                .then_some(peervm_protocol::NetworkOffer {
                    max_exposed_ports: self.max_exposed_ports,
                    privileged_ports: self.expose_privileged,
                    egress_mbit: self.egress_mbit,
                    ingress_mbit: self.ingress_mbit,
                }),
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
                .map(|i| peervm_protocol::ImageOffer { name: i.name.clone(), sha256: i.sha256 })
                .collect(),
            beneficiary: self.beneficiary.clone(),
            withdrawn: false,
            delegation: self.delegation.clone(),
            reachability: None,
            refresh: None,
        }
    }
}

/// A provider's refresh tokens (docs/protocol.md, section 4a): the chain each advert
/// carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshTerms {
    /// A token every this many seconds (the chain's `period_s`).
    pub period_secs: u32,
    /// Tokens in one chain: after `period_secs * count` the provider signs a new advert.
    pub count: u32,
}

/// How long one chain lasts by default: a whole advert a day costs a node 5 KB/s at
/// 100,000 providers (docs/bandwidth.md), and a node that lost an advert gets it back at
/// the latest then (or at its next sync).
pub const DEFAULT_RESIGN_SECS: u64 = 24 * 3600;

/// `advert.refresh_secs` and `advert.resign_secs`, checked. By default a token comes every
/// third of the advert's lifetime (100 s at 300 s): a node that misses one token still
/// holds the advert when the next arrives. Tokens need a period of at least 10 s
/// (the protocol's floor), so a lifetime under 30 s turns them off by default.
fn refresh_terms(
    ttl_secs: u64,
    refresh_secs: Option<u64>,
    resign_secs: Option<u64>,
) -> Result<Option<RefreshTerms>, (&'static str, String)> {
    let min = u64::from(peervm_protocol::refresh::MIN_PERIOD_S);
    let period = refresh_secs.unwrap_or(if ttl_secs / 3 >= min { ttl_secs / 3 } else { 0 });
    if period == 0 {
        return Ok(None);
    }
    if period < min || period * 2 > ttl_secs {
        return Err((
            "advert.refresh_secs",
            format!(
                "must be 0 (off) or {min}..={} (at most half of ttl_secs, {ttl_secs}, so the advert never lapses \
                 between two tokens), got {period}",
                ttl_secs / 2
            ),
        ));
    }
    let max_count = u64::from(peervm_protocol::refresh::MAX_COUNT);
    let resign = resign_secs.unwrap_or(DEFAULT_RESIGN_SECS.min(period * max_count));
    if resign < period || resign > period * max_count {
        return Err((
            "advert.resign_secs",
            format!(
                "must be {period}..={} (from refresh_secs to {max_count} tokens of refresh_secs), got {resign}",
                period * max_count
            ),
        ));
    }
    let count = resign / period;
    Ok(Some(RefreshTerms { period_secs: period as u32, count: count as u32 }))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config_with_network(network: &str) -> Result<ProviderConfig, ConfigError> {
        let tmp = tempfile::tempdir().unwrap();
        let img = tmp.path().join("image");
        std::fs::create_dir_all(&img).unwrap();
        std::fs::write(img.join("manifest.json"), br#"{"name":"minimal","version":1}"#).unwrap();
        let text = format!(
            "[ssh]\nhost = \"127.0.0.1\"\nport_min = 22000\nport_max = 22009\n\
             [resources]\nvcpus = 1\nmemory = \"1GiB\"\ndisk = \"10GiB\"\n\
             [pricing]\ncurrency = \"USD\"\nper_vcpu_hour = \"0.01\"\nper_memory_gib_hour = \"0\"\nper_disk_gib_hour = \"0\"\n\
             [network]\n{network}\n\
             [[images]]\nname = \"minimal\"\ndir = \"{}\"\n",
            img.display()
        );
        ProviderConfig::parse(&text, Path::new("provider.toml"))
    }

    #[test]
    fn refresh_tokens_default_to_a_third_of_the_lifetime_and_bad_terms_name_their_field() {
        assert_eq!(refresh_terms(300, None, None), Ok(Some(RefreshTerms { period_secs: 100, count: 864 })));
        assert_eq!(refresh_terms(300, Some(150), Some(3600)), Ok(Some(RefreshTerms { period_secs: 150, count: 24 })));
        // Off on request, and by default when a third of the lifetime is under 10 s.
        assert_eq!(refresh_terms(300, Some(0), None), Ok(None));
        assert_eq!(refresh_terms(29, None, None), Ok(None));
        // A chain holds at most 1,024 tokens: at 10 s, 2 h 50 min by default.
        assert_eq!(refresh_terms(30, None, None), Ok(Some(RefreshTerms { period_secs: 10, count: 1024 })));
        // Below the protocol's floor, above half the lifetime, a chain shorter than one
        // period or of more than 1,024 tokens.
        for (refresh, resign, field) in [
            (Some(9), None, "advert.refresh_secs"),
            (Some(151), None, "advert.refresh_secs"),
            (Some(100), Some(99), "advert.resign_secs"),
            (Some(100), Some(102_401), "advert.resign_secs"),
        ] {
            let err = refresh_terms(300, refresh, resign).unwrap_err();
            assert_eq!(err.0, field, "{refresh:?} {resign:?}: {}", err.1);
        }
    }

    #[test]
    fn guest_dns_is_a_list_of_ipv4_addresses_named_in_the_error() {
        let cfg = config_with_network("egress = \"public-only\"\nguest_dns = [\"9.9.9.9\", \"1.1.1.1\"]").unwrap();
        assert_eq!(cfg.guest_dns, [std::net::Ipv4Addr::new(9, 9, 9, 9), std::net::Ipv4Addr::new(1, 1, 1, 1)]);
        assert!(config_with_network("").unwrap().guest_dns.is_empty());
        let err = config_with_network("guest_dns = [\"dns.example\"]").unwrap_err().to_string();
        assert!(err.contains("network.guest_dns") && err.contains("dns.example"), "{err}");
    }

    #[test]
    fn the_abuse_section_is_optional_and_its_errors_name_the_field() {
        use crate::provider::lease::abuse::{AbuseConfig, Action, Rule};
        assert_eq!(config_with_network("").unwrap().abuse, AbuseConfig::default());
        let text = "[abuse]\ninterval_secs = 3\n[abuse.new_connections]\nthreshold = 5\naction = \"isolate\"";
        let cfg = config_with_network(text).unwrap();
        assert_eq!(cfg.abuse.interval, std::time::Duration::from_secs(3));
        assert_eq!(cfg.abuse.rule(Rule::NewConnections).action, Action::Isolate);
        let err = config_with_network("egress_mbit = 1\n[abuse.smtp]\naction = \"throttle\"").unwrap_err().to_string();
        assert!(err.contains("abuse.throttle_mbit") && err.contains("network.egress_mbit"), "{err}");
        let err = config_with_network("[abuse]\nnew_connection = 5").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }

    /// `[hypervisor] backend` picks who runs QEMU; the libvirt backend's URI and lease
    /// directory reach the VMM's config (docs/vmm.md "The libvirt backend").
    #[test]
    fn the_backend_is_qemu_unless_libvirt_is_asked_for() {
        let state = std::path::PathBuf::from("/tmp/state");
        let default = config_with_network("").unwrap();
        assert_eq!(default.backend, peervm_vmm::Backend::Qemu);
        let vmm = crate::provider::daemon::vmm_config(&default, state.clone(), peervm_vmm::Accel::Tcg);
        assert_eq!((vmm.backend, vmm.lease_root), (peervm_vmm::Backend::Qemu, None));
        let lv = config_with_network("[hypervisor]\nbackend = \"libvirt\"").unwrap();
        let vmm = crate::provider::daemon::vmm_config(&lv, state.clone(), peervm_vmm::Accel::Tcg);
        assert_eq!(vmm.backend, peervm_vmm::Backend::Libvirt { uri: "qemu:///system".into() });
        assert_eq!(vmm.lease_root.as_deref(), Some(std::path::Path::new(DEFAULT_LIBVIRT_LEASE_DIR)));
        let custom = config_with_network(
            "[hypervisor]\nbackend = \"libvirt\"\nlibvirt_uri = \"qemu+ssh://h/system\"\nlibvirt_lease_dir = \"/srv/l\"",
        )
        .unwrap();
        let vmm = crate::provider::daemon::vmm_config(&custom, state, peervm_vmm::Accel::Tcg);
        assert_eq!(vmm.backend, peervm_vmm::Backend::Libvirt { uri: "qemu+ssh://h/system".into() });
        assert_eq!(vmm.lease_root.as_deref(), Some(std::path::Path::new("/srv/l")));
        let err = config_with_network("[hypervisor]\nbackend = \"xen\"").unwrap_err().to_string();
        assert!(err.contains("hypervisor.backend") && err.contains("xen"), "{err}");
    }

    /// `[hypervisor] tcg_tb_size_mib` reaches the VMM's QEMU options; absent, the VMM
    /// takes the image's or its default; out of range, the error names the field.
    #[test]
    fn the_tcg_translation_buffer_size_is_optional_bounded_and_reaches_the_vmm() {
        let state = std::path::PathBuf::from("/nonexistent");
        let default = config_with_network("").unwrap();
        assert_eq!(default.tcg_tb_size_mib, None);
        let vmm = crate::provider::daemon::vmm_config(&default, state.clone(), peervm_vmm::Accel::Tcg);
        assert_eq!(vmm.tcg_tb_size_mib, None);
        let small = config_with_network("[hypervisor]\ntcg_tb_size_mib = 32").unwrap();
        assert_eq!(small.tcg_tb_size_mib, Some(32));
        assert_eq!(
            crate::provider::daemon::vmm_config(&small, state, peervm_vmm::Accel::Tcg).tcg_tb_size_mib,
            Some(32)
        );
        for bad in ["4", "5000"] {
            let err = config_with_network(&format!("[hypervisor]\ntcg_tb_size_mib = {bad}")).unwrap_err().to_string();
            assert!(err.contains("hypervisor.tcg_tb_size_mib") && err.contains(bad), "{err}");
        }
    }

    #[test]
    fn bandwidth_limits_are_mbit_per_second_zero_or_absent_for_none_and_advertised() {
        let key = peervm_protocol::samples::numbered_key(0);
        let none = config_with_network("").unwrap();
        assert_eq!((none.egress_mbit, none.ingress_mbit), (None, None));
        assert_eq!(none.advert(&key, 1, 0, Accel::Tcg, none.resources, &[]).network, None);
        let zero = config_with_network("egress_mbit = 0\ningress_mbit = 0").unwrap();
        assert_eq!((zero.egress_mbit, zero.ingress_mbit), (None, None));
        let cfg = config_with_network("egress_mbit = 100\ningress_mbit = 20").unwrap();
        assert_eq!((cfg.egress_mbit, cfg.ingress_mbit), (Some(100), Some(20)));
        let offer = cfg.advert(&key, 1, 0, Accel::Tcg, cfg.resources, &[]).network.unwrap();
        assert_eq!((offer.egress_mbit, offer.ingress_mbit, offer.max_exposed_ports), (Some(100), Some(20), 0));
        let only_out = config_with_network("egress_mbit = 5").unwrap();
        let offer = only_out.advert(&key, 1, 0, Accel::Tcg, only_out.resources, &[]).network.unwrap();
        assert_eq!((offer.egress_mbit, offer.ingress_mbit), (Some(5), None));
        let err = config_with_network("egress_mbit = 100001").unwrap_err().to_string();
        assert!(err.contains("network.egress_mbit") && err.contains("100001"), "{err}");
        let err = config_with_network("ingress_mbit = -1").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    }
}
