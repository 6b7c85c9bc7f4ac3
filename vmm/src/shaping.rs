//! Bandwidth limits of a lease's guest, held by the kernel (docs/vmm.md "Bandwidth
//! limits"): a token bucket filter (`tc qdisc ... tbf`) on the sending side of each
//! direction of the lease's link.
//!
//! ```text
//!  host namespace                    lease namespace
//!  <short><hex12> ══ veth ══════════ uplink ── br0 ── tap0 ══ QEMU ══ guest
//!  root tbf: ingress_mbit            root tbf: egress_mbit
//!  (what the host sends the guest)   (what the guest sends out)
//! ```
//!
//! Both directions leave an interface of ours on their way, so both are shaped where
//! they are sent (queued, not policed), and no IFB device is needed. The qdiscs live on
//! the veth pair and go with it: teardown and reconcile already delete it.

use serde::Deserialize;

use crate::error::VmmError;
use crate::host_command::run;

/// How long a packet may wait in a limit's queue before tbf drops it: room for TCP to
/// keep the bucket busy at the limit (about a round trip of a distant peer) without
/// holding a guest's packets for long.
const QUEUE_LATENCY: &str = "50ms";

/// The smallest bucket: a full-size GSO packet (64 KiB) passes whole, so the kernel need
/// not split the segments the guest's virtio-net hands over (tbf splits what exceeds the
/// bucket).
const MIN_BURST_BYTES: u64 = 64 * 1024;

/// A lease's limits in Mbit/s (10^6 bits per second, tc's `mbit`); `None`: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BandwidthLimits {
    /// What the guest sends.
    pub egress_mbit: Option<u32>,
    /// What the guest receives.
    pub ingress_mbit: Option<u32>,
}

impl BandwidthLimits {
    pub fn is_unlimited(&self) -> bool {
        self.egress_mbit.is_none() && self.ingress_mbit.is_none()
    }
}

/// The arguments after `tc qdisc add dev <if>` for a limit of `mbit`: a root tbf whose
/// bucket holds 10 ms of the rate, at least `MIN_BURST_BYTES`.
pub(crate) fn tbf_args(mbit: u32) -> Vec<String> {
    let bytes_per_sec = u64::from(mbit) * 1_000_000 / 8;
    let burst = (bytes_per_sec / 100).max(MIN_BURST_BYTES);
    ["root", "tbf", "rate", &format!("{mbit}mbit"), "burst", &burst.to_string(), "latency", QUEUE_LATENCY]
        .map(str::to_string)
        .to_vec()
}

/// Puts the limits on a lease's link: `egress` on `ns_uplink` inside `netns`, `ingress`
/// on `host_if` in the host namespace.
pub(crate) async fn apply(
    limits: BandwidthLimits,
    netns: &str,
    ns_uplink: &str,
    host_if: &str,
) -> Result<(), VmmError> {
    if let Some(mbit) = limits.egress_mbit {
        let mut args = vec!["-n", netns, "qdisc", "add", "dev", ns_uplink];
        let tbf = tbf_args(mbit);
        args.extend(tbf.iter().map(String::as_str));
        run("tc", &args, None).await?;
    }
    if let Some(mbit) = limits.ingress_mbit {
        let mut args = vec!["qdisc", "add", "dev", host_if];
        let tbf = tbf_args(mbit);
        args.extend(tbf.iter().map(String::as_str));
        run("tc", &args, None).await?;
    }
    Ok(())
}

/// Replaces the egress limit of a lease's link (or sets one where it had none): what
/// the guest sends is held to `mbit` from now on (abuse detection's throttle).
pub(crate) async fn replace_egress(netns: &str, ns_uplink: &str, mbit: u32) -> Result<(), VmmError> {
    let mut args = vec!["-n", netns, "qdisc", "replace", "dev", ns_uplink];
    let tbf = tbf_args(mbit);
    args.extend(tbf.iter().map(String::as_str));
    run("tc", &args, None).await?;
    Ok(())
}

/// Packets a limit dropped on `dev` (in `netns`, or the host's with `None`): its queue
/// was full. 0 when the link has no limit of ours.
pub(crate) async fn dropped(netns: Option<&str>, dev: &str) -> Result<u64, VmmError> {
    let mut args = Vec::with_capacity(9);
    if let Some(ns) = netns {
        args.extend(["-n", ns]);
    }
    args.extend(["-s", "-j", "qdisc", "show", "dev", dev]);
    let out = run("tc", &args, None).await?;
    parse_tbf_drops(&out).map_err(|detail| VmmError::Command { command: format!("tc {}", args.join(" ")), detail })
}

#[derive(Deserialize)]
struct QdiscStats {
    kind: String,
    #[serde(default)]
    root: bool,
    #[serde(default)]
    drops: u64,
}

/// The drops of the root tbf in `tc -s -j qdisc show dev <if>`'s output (0 without one:
/// the link's default qdisc is not ours).
pub(crate) fn parse_tbf_drops(json: &str) -> Result<u64, String> {
    let qdiscs: Vec<QdiscStats> =
        serde_json::from_str(json).map_err(|e| format!("unexpected output {:?}: {e}", truncate(json)))?;
    Ok(qdiscs.iter().find(|q| q.root && q.kind == "tbf").map_or(0, |q| q.drops))
}

fn truncate(s: &str) -> &str {
    s.get(..s.len().min(120)).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_holds_10_ms_of_the_rate_and_at_least_a_gso_packet() {
        assert_eq!(tbf_args(8), ["root", "tbf", "rate", "8mbit", "burst", "65536", "latency", "50ms"]);
        // 1000 Mbit/s: 125 MB/s, 10 ms of it
        assert_eq!(tbf_args(1000)[5], "1250000");
        assert_eq!(tbf_args(100_000)[5], "125000000");
        assert!(BandwidthLimits::default().is_unlimited());
        assert!(!BandwidthLimits { egress_mbit: Some(1), ingress_mbit: None }.is_unlimited());
    }

    #[test]
    fn drops_come_from_the_root_tbf_only() {
        // iproute2 6.1's `tc -s -j qdisc show dev <veth>` with a limit
        let shaped = r#"[{"kind":"tbf","handle":"8001:","root":true,"refcnt":3,"options":{"rate":1000000,"burst":65536,"lat":50000},"bytes":2120000,"packets":1410,"drops":37,"overlimits":904,"requeues":0,"backlog":0,"qlen":0}]"#;
        assert_eq!(parse_tbf_drops(shaped), Ok(37));
        // without: the default qdisc, whose drops are not a limit's
        let plain = r#"[{"kind":"noqueue","handle":"0:","root":true,"refcnt":2,"options":{},"bytes":0,"packets":0,"drops":5,"overlimits":0,"requeues":0,"backlog":0,"qlen":0}]"#;
        assert_eq!(parse_tbf_drops(plain), Ok(0));
        assert_eq!(parse_tbf_drops("[]"), Ok(0));
        let err = parse_tbf_drops("Cannot find device \"x\"").unwrap_err();
        assert!(err.contains("Cannot find device"), "{err}");
    }
}
