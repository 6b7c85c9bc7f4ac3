//! Coverage and propagation of one batch of adverts, computed from when each node stored
//! each advert (its own `AdvertStored` timestamp, gathered from every worker), not from
//! polling: an advert's time to a coverage is the arrival of the node that made it so,
//! counted from when its publish command was sent.

use std::time::Duration;

use crate::report::{Outcome, Reporter, ms, percentile};
use crate::wire::ProviderArrivals;

/// Coverage is reported at these times (ms after an advert's publish command).
const CHECKPOINTS_MS: [u64; 9] = [100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000];
/// Time to reach these coverages is reported.
const THRESHOLDS: [f64; 4] = [0.5, 0.9, 0.99, 1.0];

/// One advert of a batch, with the arrivals gathered from every worker.
pub struct Advert {
    pub sent_ns: u64,
    pub arrivals: ProviderArrivals,
}

pub struct Batch<'a> {
    pub label: &'a str,
    pub adverts: Vec<Advert>,
    /// Nodes running when the batch was published.
    pub nodes: usize,
    /// Nodes lacking at least one advert of the batch at its end.
    pub lacking_any: usize,
    /// The peer count of each of them at the end.
    pub lacking_degrees: Vec<usize>,
    /// How long the batch was followed, from its first publish.
    pub followed: Duration,
    pub deadline: Duration,
    /// Cores busy (all workers) while it was followed.
    pub cpu_cores: f64,
}

impl Batch<'_> {
    pub fn report(&self, r: &mut Reporter, out: &mut Outcome) {
        let label = self.label;
        let total = self.nodes.max(1);
        // Each advert's arrivals relative to its publish, sorted; an arrival without a
        // timestamp (its watcher lagged) counts as at the end of the batch, an upper bound.
        let relative: Vec<Vec<Duration>> = self
            .adverts
            .iter()
            .map(|a| {
                let mut t: Vec<Duration> =
                    a.arrivals.at_ns.iter().map(|at| Duration::from_nanos(at.saturating_sub(a.sent_ns))).collect();
                t.extend(std::iter::repeat_n(self.followed, a.arrivals.untimed));
                t.sort();
                t
            })
            .collect();
        let untimed: usize = self.adverts.iter().map(|a| a.arrivals.untimed).sum();
        r.figure(&format!("{label}_arrivals_without_event"), untimed as f64, "arrivals");

        let mut acks: Vec<Duration> = Vec::new();
        for a in &self.adverts {
            match &a.arrivals.ack {
                Some(Ok(at)) => acks.push(Duration::from_nanos(at.saturating_sub(a.sent_ns))),
                Some(Err(e)) => out.failed.push(format!("{label}: a publish failed: {e}")),
                None => out.failed.push(format!("{label}: a publish got no answer")),
            }
        }
        acks.sort();
        if !acks.is_empty() {
            r.figure(&format!("{label}_publish_ack_p50"), ms(percentile(&acks, 0.5)), "ms");
            r.figure(&format!("{label}_publish_ack_max"), ms(*acks.last().expect("not empty")), "ms");
        }

        for th in THRESHOLDS {
            // The k-th arrival (1-based) brings the advert to `th` of the nodes.
            let k = ((th * total as f64) - 1e-9).ceil().max(1.0) as usize;
            let mut times: Vec<Duration> = relative.iter().filter_map(|t| t.get(k - 1).copied()).collect();
            times.sort();
            let level = if th >= 1.0 { "full".to_string() } else { format!("{}pct", (th * 100.0).round()) };
            if !times.is_empty() {
                r.figure(&format!("{label}_propagation_{level}_p50"), ms(percentile(&times, 0.5)), "ms");
                r.figure(&format!("{label}_propagation_{level}_p99"), ms(percentile(&times, 0.99)), "ms");
                r.figure(&format!("{label}_propagation_{level}_max"), ms(*times.last().expect("not empty")), "ms");
            }
            r.figure(&format!("{label}_propagation_{level}_missed"), (relative.len() - times.len()) as f64, "adverts");
        }
        // Every (node, advert) arrival: what one node waits for one advert.
        let mut each: Vec<Duration> = relative.iter().flatten().copied().collect();
        each.sort();
        if !each.is_empty() {
            r.figure(&format!("{label}_each_node_p50"), ms(percentile(&each, 0.5)), "ms");
            r.figure(&format!("{label}_each_node_p99"), ms(percentile(&each, 0.99)), "ms");
            r.figure(&format!("{label}_each_node_max"), ms(*each.last().expect("not empty")), "ms");
        }
        let coverage_at = |t: &Vec<Duration>, cp: Duration| t.partition_point(|x| *x <= cp) as f64 / total as f64;
        for cp in CHECKPOINTS_MS.map(Duration::from_millis).into_iter().filter(|cp| *cp <= self.deadline) {
            if relative.is_empty() || (cp > self.followed && relative.iter().any(|t| t.len() < total)) {
                // Not followed that long, and not complete: the coverage then is unknown.
                continue;
            }
            let cov: Vec<f64> = relative.iter().map(|t| coverage_at(t, cp)).collect();
            let mean = cov.iter().sum::<f64>() / cov.len() as f64;
            let min = cov.iter().copied().fold(1.0, f64::min);
            r.figure(&format!("{label}_coverage_at_{}ms_mean", cp.as_millis()), 100.0 * mean, "%");
            r.figure(&format!("{label}_coverage_at_{}ms_min", cp.as_millis()), 100.0 * min, "%");
        }
        let final_min = relative.iter().map(|t| t.len() as f64 / total as f64).fold(1.0, f64::min);
        r.figure(&format!("{label}_coverage_final_min"), 100.0 * final_min, "%");
        r.figure(&format!("{label}_nodes_lacking_an_advert"), self.lacking_any as f64, "nodes");
        // Isolated nodes, or connected ones gossip missed?
        let (mut none, mut one, mut few, mut more) = (0, 0, 0, 0);
        for &d in &self.lacking_degrees {
            match d {
                0 => none += 1,
                1 => one += 1,
                2..=3 => few += 1,
                _ => more += 1,
            }
        }
        for (bucket, count) in [("0", none), ("1", one), ("2_3", few), ("4_or_more", more)] {
            r.figure(&format!("{label}_nodes_lacking_an_advert_with_{bucket}_peers"), count as f64, "nodes");
        }
        if !self.lacking_degrees.is_empty() {
            r.progress(&format!(
                "{label}: nodes lacking an advert by their peer count: 0: {none}, 1: {one}, 2-3: {few}, 4+: {more}"
            ));
        }
        r.figure(&format!("{label}_cpu_cores_busy_propagating"), self.cpu_cores, "cores");
        let full = relative.iter().filter(|t| t.len() >= total).count();
        r.progress(&format!(
            "{label}: {full}/{} adverts reached every node; lowest final coverage {:.1}%; publish acks {:.0}-{:.0} ms",
            relative.len(),
            100.0 * final_min,
            acks.first().map(|d| ms(*d)).unwrap_or(0.0),
            acks.last().map(|d| ms(*d)).unwrap_or(0.0),
        ));
        if full < relative.len() {
            out.failed.push(format!(
                "{label}: {} of {} adverts did not reach every node within {} s ({} nodes lacked one; lowest \
                 coverage {:.1}%)",
                relative.len() - full,
                relative.len(),
                self.deadline.as_secs(),
                self.lacking_any,
                100.0 * final_min
            ));
        }
    }
}
