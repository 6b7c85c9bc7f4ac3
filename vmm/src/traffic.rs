//! Traffic accounting of a lease's guest (docs/vmm.md "Traffic accounting"): bytes and
//! packets from the host end of its link, new flows (all, and to SMTP), the distinct
//! destinations of the last minute and each isolation rule's drops from the counters and
//! the set of its nft table, and the bandwidth limits' drops from tc.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::error::VmmError;
use crate::host_command::run;
use crate::hypervisor::NetUsage;
use crate::network::{DESTINATIONS_SET, NEW_FLOWS_COMMENT, NS_UPLINK, SMTP_COMMENT};
use crate::shaping::{self, BandwidthLimits};

/// The names of a lease's network objects, as `network.rs` made them.
pub(crate) struct LeaseLink<'a> {
    pub netns: &'a str,
    pub host_if: &'a str,
    pub table: &'a str,
}

/// Reads every counter of the lease's traffic. One file read per link counter, one `nft`
/// run, and one `tc` run per direction that has a limit, the commands side by side.
pub(crate) async fn read(link: &LeaseLink<'_>, limits: BandwidthLimits) -> Result<NetUsage, VmmError> {
    let nft = async {
        let out = run("nft", &["-j", "list", "table", "inet", link.table], None).await?;
        parse_nft_counters(&out)
            .map_err(|detail| VmmError::Command { command: format!("nft -j list table inet {}", link.table), detail })
    };
    let out_drops = async {
        if limits.egress_mbit.is_some() { shaping::dropped(Some(link.netns), NS_UPLINK).await } else { Ok(0) }
    };
    let in_drops =
        async { if limits.ingress_mbit.is_some() { shaping::dropped(None, link.host_if).await } else { Ok(0) } };
    let (rules, limit_dropped_out, limit_dropped_in) = tokio::try_join!(nft, out_drops, in_drops)?;
    let counters = read_link_counters(link.host_if)?;
    Ok(NetUsage {
        // the host end sends what the guest receives, and receives what it sends
        bytes_in: counters.tx_bytes,
        packets_in: counters.tx_packets,
        bytes_out: counters.rx_bytes,
        packets_out: counters.rx_packets,
        new_connections: rules.new_connections,
        smtp_connections: rules.smtp_connections,
        recent_destinations: rules.recent_destinations,
        dropped: rules.dropped,
        limit_dropped_out,
        limit_dropped_in,
    })
}

/// The host end's own counters, as the kernel keeps them for every interface.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LinkCounters {
    pub rx_bytes: u64,
    pub rx_packets: u64,
    pub tx_bytes: u64,
    pub tx_packets: u64,
}

fn read_link_counters(dev: &str) -> Result<LinkCounters, VmmError> {
    let read = |name: &str| -> Result<u64, VmmError> {
        let path = format!("/sys/class/net/{dev}/statistics/{name}");
        let text = std::fs::read_to_string(&path).map_err(|e| VmmError::io("cannot read", &path, e))?;
        parse_counter(&text).ok_or_else(|| {
            VmmError::io("cannot read", &path, std::io::Error::other(format!("not a counter: {:?}", text.trim())))
        })
    };
    Ok(LinkCounters {
        rx_bytes: read("rx_bytes")?,
        rx_packets: read("rx_packets")?,
        tx_bytes: read("tx_bytes")?,
        tx_packets: read("tx_packets")?,
    })
}

/// A sysfs counter file: a decimal number and a newline.
pub(crate) fn parse_counter(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// What the lease table's counters say.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct RuleCounters {
    pub new_connections: u64,
    pub smtp_connections: u64,
    /// Elements of the set of recent destinations (a count now, not a counter).
    pub recent_destinations: u64,
    /// Packets of each rule that counts and drops, by its comment.
    pub dropped: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct NftList {
    nftables: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct NftSet {
    name: String,
    #[serde(default)]
    elem: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct NftRule {
    chain: String,
    #[serde(default)]
    comment: Option<String>,
    #[serde(default)]
    expr: Vec<serde_json::Value>,
}

/// The counters of `nft -j list table inet <table>`: the new-flows and SMTP counters (by
/// their comments), the size of the recent destinations' set, and every counting rule
/// that drops (by its comment, or its chain's name and position when it has none).
pub(crate) fn parse_nft_counters(json: &str) -> Result<RuleCounters, String> {
    let list: NftList = serde_json::from_str(json)
        .map_err(|e| format!("unexpected output {:?}: {e}", json.get(..json.len().min(120)).unwrap_or(json)))?;
    let mut out = RuleCounters::default();
    let mut unnamed = 0;
    for item in list.nftables {
        if let Some(set) = item.get("set") {
            let set: NftSet = serde_json::from_value(set.clone()).map_err(|e| format!("a set: {e}"))?;
            if set.name == DESTINATIONS_SET {
                out.recent_destinations = set.elem.len() as u64;
            }
            continue;
        }
        let Some(rule) = item.get("rule") else { continue };
        let rule: NftRule = serde_json::from_value(rule.clone()).map_err(|e| format!("a rule: {e}"))?;
        let Some(packets) = rule.expr.iter().find_map(|e| e.get("counter")?.get("packets")?.as_u64()) else {
            continue;
        };
        let drops = rule.expr.iter().any(|e| e.get("drop").is_some());
        match rule.comment {
            Some(c) if c == NEW_FLOWS_COMMENT => out.new_connections = packets,
            Some(c) if c == SMTP_COMMENT => out.smtp_connections = packets,
            Some(c) if drops => *out.dropped.entry(c).or_default() += packets,
            None if drops => {
                unnamed += 1;
                *out.dropped.entry(format!("{} drop {unnamed}", rule.chain)).or_default() += packets;
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `nft -j list table inet ...` of nftables 1.0.6 for a public-only lease (the set's
    /// elements and the nat chain shortened), after some traffic.
    const LISTING: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "peervm-01", "handle": 28}},
 {"set": {"family": "inet", "name": "blocked", "table": "peervm-01", "type": "ipv4_addr", "handle": 1, "flags": ["interval"], "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}},
 {"set": {"family": "inet", "name": "recent_destinations", "table": "peervm-01", "type": "ipv4_addr", "handle": 3, "size": 4096, "flags": ["timeout"], "timeout": 60, "elem": [{"elem": {"val": "198.51.100.7", "timeout": 60, "expires": 41}}, {"elem": {"val": "203.0.113.9", "timeout": 60, "expires": 59}}]}},
 {"chain": {"family": "inet", "table": "peervm-01", "name": "input", "handle": 2, "type": "filter", "hook": "input", "prio": -10, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "input", "handle": 6, "comment": "replies to the SSH forwarder", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "pv010101010101"}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}, {"accept": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "input", "handle": 7, "comment": "nothing from the guest to the host itself", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "pv010101010101"}}, {"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "forward", "handle": 10, "comment": "nothing new into the guest", "expr": [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "pv010101010101"}}, {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 11, "comment": "spoofed source", "expr": [{"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "10.213.0.22"}}, {"counter": {"packets": 1, "bytes": 60}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 12, "expr": [{"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}}, {"counter": {"packets": 2, "bytes": 152}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 13, "comment": "new connections from the guest", "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"counter": {"packets": 41, "bytes": 2460}}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 16, "expr": [{"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"set": {"op": "update", "elem": {"payload": {"protocol": "ip", "field": "daddr"}}, "set": "@recent_destinations"}}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 17, "comment": "new SMTP connections from the guest", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 25}}, {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "new"}}, {"counter": {"packets": 5, "bytes": 300}}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 14, "comment": "private, local and special ranges", "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@blocked"}}, {"counter": {"packets": 12, "bytes": 720}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "peervm-01", "chain": "from_guest", "handle": 15, "expr": [{"accept": null}]}}]}"#;

    #[test]
    fn nft_counters_give_new_flows_smtp_recent_destinations_and_each_rule_s_drops_by_comment() {
        let c = parse_nft_counters(LISTING).unwrap();
        assert_eq!((c.new_connections, c.smtp_connections, c.recent_destinations), (41, 5, 2));
        let want: BTreeMap<String, u64> = [
            ("nothing from the guest to the host itself", 3),
            ("nothing new into the guest", 0),
            ("spoofed source", 1),
            ("from_guest drop 1", 2),
            ("private, local and special ranges", 12),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        assert_eq!(c.dropped, want);
    }

    #[test]
    fn nft_output_that_is_not_a_listing_is_an_error_naming_it() {
        let err = parse_nft_counters("Error: No such file or directory").unwrap_err();
        assert!(err.contains("No such file"), "{err}");
        assert_eq!(parse_nft_counters(r#"{"nftables": []}"#), Ok(RuleCounters::default()));
        assert!(parse_nft_counters(r#"{"nftables": [{"rule": {"expr": 5}}]}"#).is_err());
    }

    #[test]
    fn sysfs_counters_are_decimal_lines() {
        assert_eq!(parse_counter("123456789012\n"), Some(123_456_789_012));
        assert_eq!(parse_counter("0"), Some(0));
        assert_eq!(parse_counter(""), None);
        assert_eq!(parse_counter("-1\n"), None);
    }

    #[test]
    fn link_counters_are_read_from_sysfs() {
        // loopback's counters read like a lease link's
        let lo = read_link_counters("lo").unwrap();
        assert!(lo.rx_bytes >= lo.rx_packets);
        assert!(read_link_counters("no-such-if0").is_err());
    }
}
