//! Network isolation per lease (docs/vmm.md "Network"; SECURITY.md invariant 7).
//!
//! ```text
//!  host network namespace                     lease namespace <long>-<lease hex>
//!  ┌──────────────────────────────┐           ┌──────────────────────────────────────┐
//!  │ SSH forwarder 127.0.0.1:port ─┼─ TCP ─┐   │                                      │
//!  │                               │       │   │   uplink ──┐                         │
//!  │ <short><hex12>  10.213.S.1/30 ├───────┴veth──────────── br0 ── tap0 ══ QEMU ══ guest eth0
//!  │ nft table inet <long>-<hex>   │           │  (no IP addresses in this namespace) │  10.213.S.2/30
//!  └──────────────────────────────┘           └──────────────────────────────────────┘
//! ```
//!
//! The lease namespace is a plain layer-2 bridge with no addresses: QEMU runs inside it
//! and has no network of its own to use. All filtering happens in the host namespace in
//! a table of the lease's own, so removing the table removes every rule of the lease.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::error::VmmError;
use crate::host_command::run;
use crate::lease_id::LeaseId;
use crate::netlink::Netlink;
use crate::shaping::{self, BandwidthLimits};
use crate::spec::EgressPolicy;
use crate::{netns, procfs, tap};

/// Destinations a guest never reaches, under either egress policy: "this network",
/// RFC 1918, CGNAT, loopback, link-local (incl. the cloud metadata address
/// 169.254.169.254), IETF protocol assignments, benchmarking, multicast, reserved and
/// broadcast.
pub const BLOCKED_IPV4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// Whether the lease's nftables table drops packets a guest sends to `addr` under
/// `public-only` (`BLOCKED_IPV4` or the guests' own pool): such an address is no use to
/// a guest as, say, its DNS resolver.
pub fn is_blocked_destination(addr: Ipv4Addr, pool: &AddressPool) -> bool {
    let within = |net: Ipv4Addr, len: u8| {
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len)) };
        u32::from(addr) & mask == u32::from(net) & mask
    };
    within(pool.base, pool.prefix_len)
        || BLOCKED_IPV4.iter().any(|cidr| {
            cidr.split_once('/')
                .and_then(|(net, len)| Some((net.parse().ok()?, len.parse().ok()?)))
                .is_some_and(|(net, len)| within(net, len))
        })
}

/// The comment of the lease table's counter of new flows the guest starts (read back by
/// `traffic.rs`; docs/vmm.md "Traffic accounting").
pub(crate) const NEW_FLOWS_COMMENT: &str = "new connections from the guest";

/// The comment of the counter of new connections the guest starts to TCP port 25 (SMTP),
/// for abuse detection (docs/vmm.md "Traffic accounting").
pub(crate) const SMTP_COMMENT: &str = "new SMTP connections from the guest";

/// The comment of the rule that drops what comes into the guest unasked: its drops are
/// others' packets, not the guest's doing (abuse detection leaves them out).
pub const INBOUND_DROP_COMMENT: &str = "nothing new into the guest";

/// The lease table's set of the addresses the guest started a connection to in the last
/// [`DESTINATIONS_WINDOW_SECS`]: each new connection (re)starts its address's timeout, so
/// the set's size is the distinct destinations of the last minute.
pub(crate) const DESTINATIONS_SET: &str = "recent_destinations";
pub const DESTINATIONS_WINDOW_SECS: u32 = 60;
/// The most addresses the set holds: a guest past it is counted as this many (the
/// kernel adds no more until some time out). Abuse thresholds stay below it.
pub const DESTINATIONS_MAX: u32 = 4096;

/// Interfaces inside the lease namespace; private to it, so fixed names.
pub(crate) const NS_UPLINK: &str = "uplink";
const NS_BRIDGE: &str = "br0";
pub(crate) const NS_TAP: &str = "tap0";

/// Prefixes of every name vmm gives to host objects, so reconcile can find leftovers.
/// `long` names namespaces, nft tables, cgroups and QEMU processes; `short` (2 letters)
/// names host interfaces, whose names are limited to 15 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePrefix {
    long: String,
    short: String,
}

impl NamePrefix {
    pub fn new(long: &str, short: &str) -> Result<Self, VmmError> {
        let ok_long = (2..=16).contains(&long.len())
            && long.bytes().next().is_some_and(|b| b.is_ascii_lowercase())
            && long.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let ok_short = short.len() == 2 && short.bytes().all(|b| b.is_ascii_lowercase());
        if !ok_long || !ok_short {
            return Err(VmmError::InvalidConfig(format!(
                "name prefixes {long:?}/{short:?}: need 2-16 of [a-z0-9] starting with a letter, and 2 of [a-z]"
            )));
        }
        Ok(NamePrefix { long: long.into(), short: short.into() })
    }

    pub fn long(&self) -> &str {
        &self.long
    }

    pub fn short(&self) -> &str {
        &self.short
    }

    /// Namespace, nft table, cgroup and QEMU guest name of a lease.
    pub fn lease_name(&self, lease: &LeaseId) -> String {
        format!("{}-{}", self.long, lease.hex())
    }

    /// The host end of the lease's veth pair.
    pub fn host_if(&self, lease: &LeaseId) -> String {
        format!("{}{}", self.short, lease.short_hex(12))
    }

    /// The lease's tap while it is in the host namespace: the libvirt backend's domain
    /// opens it there, then vmm moves it into the lease namespace as `tap0`
    /// (docs/vmm.md "The libvirt backend"). 15 bytes, the most a link name may have.
    pub fn host_tap(&self, lease: &LeaseId) -> String {
        format!("{}{}t", self.short, lease.short_hex(12))
    }

    /// The lease a long name belongs to, if it is one of ours.
    pub fn parse_lease_name(&self, name: &str) -> Option<LeaseId> {
        name.strip_prefix(&self.long)?.strip_prefix('-')?.parse().ok()
    }

    /// The 12-digit lease prefix of a host interface name, if it is one of ours.
    /// A host tap's name (`host_tap`) gives the same prefix.
    pub fn parse_host_if<'a>(&self, name: &'a str) -> Option<&'a str> {
        let rest = name.strip_prefix(&self.short)?;
        let rest = rest.strip_suffix('t').filter(|r| r.len() == 12).unwrap_or(rest);
        (rest.len() == 12 && rest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(rest)
    }
}

impl Default for NamePrefix {
    fn default() -> Self {
        NamePrefix { long: "peervm".into(), short: "pv".into() }
    }
}

/// A pool of IPv4 addresses carved into /30s, one per network slot: `.1` is the host
/// end, `.2` the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressPool {
    base: Ipv4Addr,
    prefix_len: u8,
}

/// The two addresses of one slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotAddrs {
    pub host: Ipv4Addr,
    pub guest: Ipv4Addr,
}

pub const SLOT_PREFIX_LEN: u8 = 30;

impl AddressPool {
    pub fn new(base: Ipv4Addr, prefix_len: u8) -> Result<Self, VmmError> {
        if !(8..=30).contains(&prefix_len) {
            return Err(VmmError::InvalidConfig(format!("address pool /{prefix_len}: need a prefix of 8..=30")));
        }
        let mask = u32::MAX << (32 - prefix_len);
        if u32::from(base) & !mask != 0 {
            return Err(VmmError::InvalidConfig(format!("address pool {base}/{prefix_len} is not aligned")));
        }
        Ok(AddressPool { base, prefix_len })
    }

    pub fn slots(&self) -> u32 {
        1u32 << (30 - u32::from(self.prefix_len))
    }

    pub fn slot(&self, slot: u32) -> Option<SlotAddrs> {
        if slot >= self.slots() {
            return None;
        }
        let net = u32::from(self.base) + slot * 4;
        Some(SlotAddrs { host: Ipv4Addr::from(net + 1), guest: Ipv4Addr::from(net + 2) })
    }
}

impl Default for AddressPool {
    /// 10.213.0.0/16: 16384 slots.
    fn default() -> Self {
        AddressPool { base: Ipv4Addr::new(10, 213, 0, 0), prefix_len: 16 }
    }
}

impl fmt::Display for AddressPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix_len)
    }
}

impl FromStr for AddressPool {
    type Err = VmmError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || VmmError::InvalidConfig(format!("address pool {s:?} is not an IPv4 CIDR like 10.213.0.0/16"));
        let (addr, len) = s.split_once('/').ok_or_else(bad)?;
        AddressPool::new(addr.parse().map_err(|_| bad())?, len.parse().map_err(|_| bad())?)
    }
}

/// Everything needed to build (or tear down) one lease's network.
#[derive(Clone, Debug)]
pub(crate) struct LeaseNetwork {
    pub netns: String,
    pub host_if: String,
    pub table: String,
    pub addrs: SlotAddrs,
    pub egress: EgressPolicy,
    pub pool: AddressPool,
    pub short_prefix: String,
    pub limits: BandwidthLimits,
}

impl LeaseNetwork {
    pub fn new(names: &NamePrefix, lease: &LeaseId, addrs: SlotAddrs, egress: EgressPolicy, pool: AddressPool) -> Self {
        LeaseNetwork {
            netns: names.lease_name(lease),
            host_if: names.host_if(lease),
            table: names.lease_name(lease),
            addrs,
            egress,
            pool,
            short_prefix: names.short().to_string(),
            limits: BandwidthLimits::default(),
        }
    }

    /// The same network with the bandwidth limits `limits` (docs/vmm.md "Bandwidth limits").
    pub fn with_limits(self, limits: BandwidthLimits) -> Self {
        LeaseNetwork { limits, ..self }
    }

    /// Creates namespace, veth pair, bridge, tap, bandwidth limits and nft table. On
    /// error the caller tears down (every step is undone by `teardown`).
    pub async fn setup(&self) -> Result<(), VmmError> {
        self.setup_with(true).await
    }

    /// The same without the tap: the libvirt backend's domain opens a tap in the host
    /// namespace, which `adopt_host_tap` then moves in.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub async fn setup_without_tap(&self) -> Result<(), VmmError> {
        self.setup_with(false).await
    }

    /// Moves the host tap `host_tap` into the lease namespace as `tap0`, on the bridge,
    /// up: the guest's NIC is then where a QEMU-backend guest's is.
    #[cfg_attr(not(feature = "libvirt"), allow(dead_code))]
    pub async fn adopt_host_tap(&self, host_tap: &str) -> Result<(), VmmError> {
        let ns = self.netns.as_str();
        Netlink::host()?.move_into(host_tap, &netns::open(ns)?, NS_TAP).await?;
        let inside = Netlink::inside(ns).await?;
        let bridge = inside.index(NS_BRIDGE).await?;
        inside.set(NS_TAP, Some(bridge), true).await
    }

    async fn setup_with(&self, tap: bool) -> Result<(), VmmError> {
        let ns = self.netns.as_str();
        let hif = self.host_if.as_str();
        netns::create(ns).await?;
        let host = Netlink::host()?;
        // the peer is created directly inside the lease namespace: no temporary name
        // in the host namespace to leak
        host.add_veth_into(hif, NS_UPLINK, &netns::open(ns)?).await?;
        // no IPv6 on the host end: the guest must not reach the host over link-local v6
        set_sysctl(&format!("net/ipv6/conf/{hif}/disable_ipv6"), "1");
        let index = host.index(hif).await?;
        host.add_address(hif, index, self.addrs.host, SLOT_PREFIX_LEN).await?;
        host.set(hif, None, true).await?;
        if self.egress == EgressPolicy::PublicOnly {
            // per-interface forwarding: the host's global ip_forward is left alone; the
            // uplink's forwarding is the operator's decision (docs/vmm.md)
            set_sysctl(&format!("net/ipv4/conf/{hif}/forwarding"), "1");
        }
        if tap {
            let in_ns = ns.to_string();
            netns::enter(ns, move || {
                tap::create_persistent(NS_TAP).map_err(|source| VmmError::Link {
                    name: NS_TAP.into(),
                    netns: Some(in_ns),
                    action: "create (tap)",
                    source,
                })
            })
            .await?;
        }
        let inside = Netlink::inside(ns).await?;
        inside.add_bridge(NS_BRIDGE).await?;
        let bridge = inside.index(NS_BRIDGE).await?;
        inside.set(NS_UPLINK, Some(bridge), true).await?;
        if tap {
            inside.set(NS_TAP, Some(bridge), true).await?;
        }
        // on the veth pair: gone with it (docs/vmm.md "Bandwidth limits")
        shaping::apply(self.limits, ns, NS_UPLINK, hif).await?;
        run("nft", &["-f", "-"], Some(self.nft_ruleset().as_bytes())).await?;
        Ok(())
    }

    /// The lease's nft table. Base chains run before the usual filter priority (-10) and
    /// only ever drop or accept traffic of this lease's interface; an accept here does
    /// not override a drop elsewhere, so the host's own firewall still applies.
    pub fn nft_ruleset(&self) -> String {
        let hif = &self.host_if;
        let guest = self.addrs.guest;
        let pool = self.pool;
        let short = &self.short_prefix;
        let blocked =
            BLOCKED_IPV4.iter().map(|s| s.to_string()).chain([pool.to_string()]).collect::<Vec<_>>().join(", ");
        let (egress_rules, nat) = match self.egress {
            EgressPolicy::Deny => ("        counter drop comment \"egress deny\"\n".to_string(), String::new()),
            EgressPolicy::PublicOnly => (
                format!(
                    "        ip daddr @blocked counter drop comment \"private, local and special ranges\"\n\
                     \x20       oifname \"{short}*\" counter drop comment \"no guest to guest\"\n\
                     \x20       accept\n"
                ),
                format!(
                    "    chain postrouting {{\n\
                     \x20       type nat hook postrouting priority 100; policy accept;\n\
                     \x20       ip saddr {guest} oifname != \"{short}*\" masquerade\n\
                     \x20   }}\n"
                ),
            ),
        };
        format!(
            "table inet {table} {{\n\
             \x20   set blocked {{\n\
             \x20       type ipv4_addr; flags interval; auto-merge;\n\
             \x20       elements = {{ {blocked} }}\n\
             \x20   }}\n\
             \x20   set {DESTINATIONS_SET} {{\n\
             \x20       type ipv4_addr; flags dynamic, timeout; timeout {DESTINATIONS_WINDOW_SECS}s; size {DESTINATIONS_MAX};\n\
             \x20   }}\n\
             \x20   chain input {{\n\
             \x20       type filter hook input priority -10; policy accept;\n\
             \x20       iifname \"{hif}\" ct state established,related accept comment \"replies to the SSH forwarder\"\n\
             \x20       iifname \"{hif}\" counter drop comment \"nothing from the guest to the host itself\"\n\
             \x20   }}\n\
             \x20   chain forward {{\n\
             \x20       type filter hook forward priority -10; policy accept;\n\
             \x20       iifname \"{hif}\" jump from_guest\n\
             \x20       oifname \"{hif}\" ct state established,related accept\n\
             \x20       oifname \"{hif}\" counter drop comment \"{INBOUND_DROP_COMMENT}\"\n\
             \x20   }}\n\
             \x20   chain from_guest {{\n\
             \x20       ip saddr != {guest} counter drop comment \"spoofed source\"\n\
             \x20       meta nfproto ipv6 counter drop comment \"IPv6\"\n\
             \x20       ct state new counter comment \"{NEW_FLOWS_COMMENT}\"\n\
             \x20       ct state new update @{DESTINATIONS_SET} {{ ip daddr }}\n\
             \x20       tcp dport 25 ct state new counter comment \"{SMTP_COMMENT}\"\n\
             {egress_rules}\
             \x20   }}\n\
             {nat}\
             }}\n",
            table = self.table,
        )
    }
}

/// Removes whichever of the named objects exist.
pub(crate) async fn teardown_names(
    table: Option<&str>,
    netns: Option<&str>,
    host_if: Option<&str>,
) -> Result<(), VmmError> {
    let mut first_error = None;
    if let Some(t) = table
        && list_tables().await?.iter().any(|x| x == t)
        && let Err(e) = run("nft", &["delete", "table", "inet", t], None).await
    {
        first_error.get_or_insert(e);
    }
    // the namespace takes the veth pair with it, once nothing holds it any more
    if let Some(ns) = netns
        && let Err(e) = netns::delete(ns).await
    {
        first_error.get_or_insert(e);
    }
    // a veth whose peer never reached the namespace, or one the kernel has not freed yet
    if let Some(h) = host_if
        && let Err(e) = async { Netlink::host()?.delete(h).await }.await
    {
        first_error.get_or_insert(e);
    }
    first_error.map_or(Ok(()), Err)
}

/// Names of the `inet` nft tables.
pub(crate) async fn list_tables() -> Result<Vec<String>, VmmError> {
    let out = run("nft", &["list", "tables", "inet"], None).await?;
    Ok(out.lines().filter_map(|l| l.strip_prefix("table inet ")).map(|s| s.trim().to_string()).collect())
}

/// Sets up the network of `lease` alone (no bandwidth limits), as a lease start does.
/// Not for the node: for vmm/examples/netns_bench.rs (BENCHMARKS.md) and
/// vmm/tests/network_sweep.rs.
#[doc(hidden)]
pub async fn setup_lease_network(
    names: &NamePrefix,
    lease: &LeaseId,
    addrs: SlotAddrs,
    egress: EgressPolicy,
    pool: AddressPool,
) -> Result<(), VmmError> {
    LeaseNetwork::new(names, lease, addrs, egress, pool).setup().await
}

/// Removes what `setup_lease_network` made, as a lease's teardown does.
#[doc(hidden)]
pub async fn teardown_lease_network(names: &NamePrefix, lease: &LeaseId) -> Result<(), VmmError> {
    let name = names.lease_name(lease);
    teardown_names(Some(&name), Some(&name), Some(&names.host_if(lease))).await
}

fn set_sysctl(name: &str, value: &str) {
    if let Err(e) = procfs::write_sysctl(name, value) {
        tracing::warn!(path = %procfs::sysctl_path(name), error = %e, "cannot set sysctl");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocked_destinations_are_the_ruleset_s() {
        let pool: AddressPool = "10.213.0.0/16".parse().unwrap();
        for blocked in ["10.213.0.1", "10.1.2.3", "127.0.0.53", "169.254.169.254", "192.168.1.1", "100.64.0.1"] {
            assert!(is_blocked_destination(blocked.parse().unwrap(), &pool), "{blocked}");
        }
        for public in ["9.9.9.9", "1.1.1.1", "198.51.100.10"] {
            assert!(!is_blocked_destination(public.parse().unwrap(), &pool), "{public}");
        }
        let public_pool: AddressPool = "198.51.100.0/24".parse().unwrap();
        assert!(is_blocked_destination("198.51.100.10".parse().unwrap(), &public_pool), "the guests' own pool");
    }

    #[test]
    fn pool_carves_slots() {
        let pool: AddressPool = "10.213.0.0/16".parse().unwrap();
        assert_eq!(pool.slots(), 16384);
        let s = pool.slot(0).unwrap();
        assert_eq!((s.host, s.guest), (Ipv4Addr::new(10, 213, 0, 1), Ipv4Addr::new(10, 213, 0, 2)));
        let s = pool.slot(16383).unwrap();
        assert_eq!((s.host, s.guest), (Ipv4Addr::new(10, 213, 255, 253), Ipv4Addr::new(10, 213, 255, 254)));
        assert!(pool.slot(16384).is_none());
        assert!("10.213.0.1/16".parse::<AddressPool>().is_err());
        assert!("10.213.0.0/31".parse::<AddressPool>().is_err());
        assert_eq!("10.213.0.0/30".parse::<AddressPool>().unwrap().slots(), 1);
    }

    #[test]
    fn names_fit_and_parse_back() {
        let p = NamePrefix::default();
        let id = LeaseId::from_bytes([0xc3; 16]);
        assert_eq!(p.host_if(&id), "pvc3c3c3c3c3c3");
        assert!(p.host_if(&id).len() <= 15);
        assert_eq!(p.parse_lease_name(&p.lease_name(&id)), Some(id));
        assert_eq!(p.parse_lease_name("peervm-xyz"), None);
        assert_eq!(p.parse_host_if("pvc3c3c3c3c3c3"), Some("c3c3c3c3c3c3"));
        assert_eq!(p.parse_host_if("pvc3c3"), None);
        assert_eq!(p.host_tap(&id), "pvc3c3c3c3c3c3t");
        assert_eq!(p.parse_host_if(&p.host_tap(&id)), Some("c3c3c3c3c3c3"));
        assert_eq!(p.parse_host_if("pvc3c3c3c3c3c3x"), None);
        assert_eq!(p.parse_host_if("eth0"), None);
        assert!(NamePrefix::new("Peervm", "pv").is_err());
        assert!(NamePrefix::new("pvtest", "ptx").is_err());
    }

    #[test]
    fn ruleset_drops_what_invariant_7_says() {
        let pool: AddressPool = "10.213.0.0/16".parse().unwrap();
        let id = LeaseId::from_bytes([1; 16]);
        let names = NamePrefix::default();
        let net = LeaseNetwork::new(&names, &id, pool.slot(5).unwrap(), EgressPolicy::PublicOnly, pool);
        let rules = net.nft_ruleset();
        assert!(rules.starts_with(&format!("table inet peervm-{} {{", id.hex())));
        for must in [
            "169.254.0.0/16",
            "100.64.0.0/10",
            "10.213.0.0/16",
            "iifname \"pv010101010101\" counter drop",
            "ip saddr != 10.213.0.22 counter drop",
            "oifname \"pv*\" counter drop",
            "masquerade",
            "meta nfproto ipv6 counter drop comment \"IPv6\"",
            "ct state new counter comment \"new connections from the guest\"",
            "ct state new update @recent_destinations { ip daddr }",
            "tcp dport 25 ct state new counter comment \"new SMTP connections from the guest\"",
            "flags dynamic, timeout; timeout 60s; size 4096;",
        ] {
            assert!(rules.contains(must), "missing {must:?} in\n{rules}");
        }
        let deny = LeaseNetwork::new(&names, &id, pool.slot(5).unwrap(), EgressPolicy::Deny, pool).nft_ruleset();
        assert!(deny.contains("counter drop comment \"egress deny\""));
        assert!(!deny.contains("masquerade") && !deny.contains("        accept\n"));
    }
}
