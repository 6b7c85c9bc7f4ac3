//! One size of the series, driven from this process: it starts the workers, has worker 0
//! start the bootstrap nodes and every worker its other nodes, waits for formation,
//! publishes a fresh batch, lets the swarm settle, publishes a settled batch, and turns
//! what the workers report (and what /proc says of them) into the size's figures. It runs
//! no node itself, so its own descriptors and CPU are not the swarm's.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::layout::Layout;
use crate::process_stats::{Usage, load_avg, mono_ns};
use crate::propagation::{Advert, Batch};
use crate::report::{Outcome, Reporter, SizeResult, ms};
use crate::wire::{Command, ProviderArrivals, Publication, Reply};
use crate::workers::Workers;

/// Adverts published per batch, each by a different provider.
pub const ADVERTS: usize = 10;
/// Start of the first node to every node having a peer.
const FORMATION_DEADLINE: Duration = Duration::from_secs(60);
/// The first batch of adverts (published straight after formation) gets this long.
const FRESH_DEADLINE: Duration = Duration::from_secs(30);
/// After formation, wait at least this long, past the nodes' connection trimming (which
/// closes extra connections once they are older than the 30 s grace, checked every 10 s),
/// and then until the number of connections stops changing.
const SETTLE_MIN: Duration = Duration::from_secs(50);
const SETTLE_MAX: Duration = Duration::from_secs(75);
const SETTLE_SAMPLE: Duration = Duration::from_secs(2);
/// CPU use once settled is averaged over this (the nodes' maintenance ticks every 10 s).
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// The whole size (start, formation, settle, propagation) ends within about this.
const SIZE_BUDGET: Duration = Duration::from_secs(240);
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(60);
/// How often a batch's coverage so far is asked for (to end it once complete).
const COVERAGE_POLL: Duration = Duration::from_millis(100);
/// A worker's answer to a command that does not start nodes.
const ANSWER: Duration = Duration::from_secs(30);

pub struct Settings {
    /// Worker processes (`None`: `layout::NODES_PER_PROC` nodes each).
    pub procs: Option<usize>,
    /// Tokio runtime workers in each worker process.
    pub threads: usize,
    pub max_rss_mib: u64,
    /// The open-file limit (soft, hard) the workers inherit.
    pub nofile: (u64, u64),
}

pub fn run(n: usize, settings: &Settings) -> SizeResult {
    let started = Instant::now();
    let mut r = Reporter::new(n);
    let mut out = Outcome::default();
    let layout = Layout::new(n, settings.procs);
    match Workers::spawn(layout, settings.threads) {
        Ok(mut workers) => {
            let mut size = Size { layout, settings, workers: &mut workers, r: &mut r, out: &mut out, t0: started };
            if let Err(e) = size.run() {
                size.r.progress(&format!("ended: {e}"));
                size.out.fatal(e);
            }
        }
        Err(e) => out.fatal(e),
    }
    SizeResult { n, figures: r.figures, verdict: out.verdict(), took: started.elapsed() }
}

struct Size<'a> {
    layout: Layout,
    settings: &'a Settings,
    workers: &'a mut Workers,
    r: &'a mut Reporter,
    out: &'a mut Outcome,
    t0: Instant,
}

/// Usage of all workers summed, and when it was read.
#[derive(Clone, Copy)]
struct Sample {
    usage: Usage,
    at: Instant,
}

impl Sample {
    fn cores_since(&self, earlier: &Sample) -> f64 {
        (self.usage.cpu.saturating_sub(earlier.usage.cpu)).as_secs_f64()
            / (self.at - earlier.at).as_secs_f64().max(1e-9)
    }
}

/// What the workers counted, summed over them.
#[derive(Default)]
struct Tallies {
    causes: HashMap<String, u64>,
    disconnections: u64,
    upkeep: Vec<(String, u64)>,
}

fn links(degrees: &[Option<usize>]) -> usize {
    degrees.iter().flatten().sum::<usize>() / 2
}

fn unexpected(reply: Reply) -> String {
    format!("unexpected reply {reply:?}")
}

impl Size<'_> {
    fn sample(&self) -> Sample {
        Sample { usage: self.workers.usage().into_iter().fold(Usage::default(), Usage::add), at: Instant::now() }
    }

    fn degrees(&mut self) -> Result<Vec<Option<usize>>, String> {
        let mut all = Vec::new();
        for reply in self.workers.ask_all(&Command::Degrees, ANSWER)? {
            match reply {
                Reply::Degrees { degrees } => all.extend(degrees),
                other => return Err(unexpected(other)),
            }
        }
        Ok(all)
    }

    /// Ends the size when all workers together pass the memory cap.
    fn check_memory(&mut self, usage: &Usage, when: &str) -> Result<(), String> {
        if usage.rss_kib > self.settings.max_rss_mib * 1024 {
            self.out.ran_out.push(format!("memory: RSS passed the {} MiB cap {when}", self.settings.max_rss_mib));
            return Err("ended early at the memory cap".into());
        }
        Ok(())
    }

    /// Workers whose descriptor table is full (listing it needs a few spare entries).
    fn full_fd_tables(&self) -> usize {
        self.workers.usage().iter().filter(|u| u.fds + 8 >= self.settings.nofile.0).count()
    }

    fn run(&mut self) -> Result<(), String> {
        let (layout, (soft, hard)) = (self.layout, self.settings.nofile);
        self.r.figure("processes", layout.procs as f64, "processes");
        self.r.figure("runtime_threads_per_process", self.settings.threads as f64, "threads");
        self.r.figure("rlimit_nofile", soft as f64, "fds");
        self.r.figure("rlimit_nofile_hard", hard as f64, "fds");
        self.r.figure("bootstrap_nodes", layout.boot_count as f64, "nodes");
        self.r.figure("load_avg_before", load_avg(), "load");
        self.r.progress(&format!(
            "{} worker processes of {:?} nodes, {} runtime threads each",
            layout.procs,
            (0..layout.procs).map(|w| layout.range(w).len()).collect::<Vec<_>>(),
            self.settings.threads
        ));
        let base = self.sample();
        self.t0 = Instant::now();

        let boot = match self.workers.ask(0, &Command::Boot, ANSWER)? {
            Reply::Booted { addrs } => addrs,
            other => return Err(unexpected(other)),
        };
        let mut nodes = 0;
        let mut start_errors = Vec::new();
        for reply in self.workers.ask_all(&Command::Join { boot }, FORMATION_DEADLINE + ANSWER)? {
            match reply {
                Reply::Joined { started, errors } => {
                    nodes += started;
                    start_errors.extend(errors);
                }
                other => return Err(unexpected(other)),
            }
        }
        let n = layout.n;
        self.r.figure("start", ms(self.t0.elapsed()), "ms");
        self.r.figure("start_failures", (n - nodes) as f64, "nodes");
        self.r.progress(&format!("{nodes} of {n} nodes started in {:.1} s", self.t0.elapsed().as_secs_f64()));
        if let Some(first) = start_errors.first() {
            self.out.failed.push(format!("{} of {n} nodes did not start (first: {first})", n - nodes));
        }

        // Formation: every node has at least one peer.
        let (formed, with_peer) = loop {
            let d = self.degrees()?;
            let with_peer = d.iter().filter(|x| x.is_some_and(|k| k >= 1)).count();
            if with_peer == nodes {
                break (Some(self.t0.elapsed()), with_peer);
            }
            if self.t0.elapsed() >= FORMATION_DEADLINE {
                break (None, with_peer);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        self.r.figure("formed_fraction", 100.0 * with_peer as f64 / n as f64, "%");
        match formed {
            Some(took) => {
                self.r.figure("formation", ms(took), "ms");
                self.r.progress(&format!(
                    "formed (every node has a peer) {:.1} s after the first start",
                    took.as_secs_f64()
                ));
            }
            None => {
                self.r.progress(&format!("formation incomplete: {with_peer}/{n} nodes have a peer"));
                self.out.fatal(format!(
                    "formation incomplete: {with_peer} of {n} nodes had a peer {} s after the first start",
                    FORMATION_DEADLINE.as_secs()
                ));
            }
        }
        let formed_at = Instant::now();
        let formed_links = links(&self.degrees()?);
        self.r.figure("links_at_formation", formed_links as f64, "connections");

        // The providers that publish: two batches, spread over the non-bootstrap nodes.
        let spread = |j: usize| layout.boot_count + j * (n - layout.boot_count) / (2 * ADVERTS);
        let fresh: Vec<usize> = (0..ADVERTS).map(|j| spread(2 * j)).collect();
        let settled: Vec<usize> = (0..ADVERTS).map(|j| spread(2 * j + 1)).collect();

        // A first batch straight after formation, while kad is still adding connections.
        let deadline = FRESH_DEADLINE.min(SIZE_BUDGET.saturating_sub(self.t0.elapsed())).max(Duration::from_secs(5));
        self.propagate("fresh", &fresh, nodes, deadline)?;

        // Settle: let gossipsub build its meshes and the nodes trim the extra connections
        // of their first DHT walks, until the number of connections stops changing.
        let mut degrees = self.degrees()?;
        let mut last_links = formed_links;
        let mut history = vec![self.sample()];
        let mut fd_full: Option<(Duration, usize)> = None;
        let mut cpu_settled: f64;
        loop {
            let now_links = links(&degrees);
            let now = self.sample();
            // Over the last CPU_WINDOW: the nodes' periodic work (trimming, DHT walks) comes
            // in 10 s ticks, so one 2 s sample would catch a tick or miss it.
            let since = history.iter().rev().find(|s| now.at - s.at >= CPU_WINDOW).unwrap_or(&history[0]);
            cpu_settled = now.cores_since(since);
            history.push(now);
            if fd_full.is_none() && self.full_fd_tables() > 0 {
                fd_full = Some((self.t0.elapsed(), now_links));
            }
            let elapsed = formed_at.elapsed();
            self.r.progress(&format!(
                "settling {:>2.0} s: {now_links} connections, {} fds, RSS {} MiB, cpu {cpu_settled:.2} cores",
                elapsed.as_secs_f64(),
                now.usage.fds,
                now.usage.rss_kib / 1024
            ));
            self.check_memory(&now.usage, &format!("at {now_links} connections"))?;
            let steady = now_links > 0 && now_links.abs_diff(last_links) * 100 <= now_links;
            if (elapsed >= SETTLE_MIN && steady)
                || elapsed >= SETTLE_MAX
                || self.t0.elapsed() + PROPAGATION_DEADLINE / 4 >= SIZE_BUDGET
            {
                break;
            }
            last_links = now_links;
            std::thread::sleep(SETTLE_SAMPLE);
            degrees = self.degrees()?;
        }
        let settled_sample = self.sample();
        let settled_tallies = self.ask_tallies()?;
        self.r.figure("settle", ms(formed_at.elapsed()), "ms");
        self.settled_figures(&degrees, nodes, &base, &settled_sample, cpu_settled);

        // The second batch, once the connections stopped changing.
        let deadline =
            PROPAGATION_DEADLINE.min(SIZE_BUDGET.saturating_sub(self.t0.elapsed())).max(Duration::from_secs(10));
        self.propagate("settled", &settled, nodes, deadline)?;

        let end = self.sample();
        self.r.figure("rss_end", end.usage.rss_kib as f64 / 1024.0, "MiB");
        let end_links = links(&self.degrees()?);
        self.r.figure("links_end", end_links as f64, "connections");
        self.r.figure("fds_end", end.usage.fds as f64, "fds");
        self.r.figure("load_avg_after", load_avg(), "load");
        self.tally(&settled_tallies)?;
        if fd_full.is_none() && self.full_fd_tables() > 0 {
            fd_full = Some((self.t0.elapsed(), end_links));
        }
        if let Some((at, at_links)) = fd_full {
            self.r.figure("fd_table_full_after", ms(at), "ms");
            self.r.figure("links_when_fd_table_full", at_links as f64, "connections");
            self.out.ran_out.push(format!(
                "file descriptors: a worker's {soft}-entry table was full {:.0} s after the first start, at \
                 {at_links} connections in the swarm",
                at.as_secs_f64()
            ));
        }
        Ok(())
    }

    /// The figures of the settled swarm: connections, memory, descriptors and CPU, in all
    /// and per node.
    fn settled_figures(&mut self, degrees: &[Option<usize>], nodes: usize, base: &Sample, now: &Sample, cpu: f64) {
        let r = &mut *self.r;
        let answered: Vec<usize> = degrees.iter().flatten().copied().collect();
        let unresponsive = degrees.len() - answered.len();
        let link_count = links(degrees);
        if !answered.is_empty() {
            r.figure("degree_min", *answered.iter().min().unwrap_or(&0) as f64, "peers");
            r.figure("degree_mean", answered.iter().sum::<usize>() as f64 / answered.len() as f64, "peers");
            r.figure("degree_max", *answered.iter().max().unwrap_or(&0) as f64, "peers");
            r.figure("isolated_nodes", answered.iter().filter(|&&d| d == 0).count() as f64, "nodes");
            r.figure("links", link_count as f64, "connections");
            let pairs = nodes * nodes.saturating_sub(1) / 2;
            r.figure("links_of_all_pairs", 100.0 * link_count as f64 / pairs.max(1) as f64, "%");
        }
        r.figure("unresponsive_nodes", unresponsive as f64, "nodes");
        if unresponsive > 0 {
            self.out.failed.push(format!("{unresponsive} swarm tasks did not answer within 5 s"));
        }
        let per_node = |total: u64, before: u64| total.saturating_sub(before) as f64 / nodes.max(1) as f64;
        let u = &now.usage;
        r.figure("rss", u.rss_kib as f64 / 1024.0, "MiB");
        r.figure("rss_per_node", per_node(u.rss_kib, base.usage.rss_kib), "KiB");
        if link_count > 0 {
            r.figure(
                "rss_per_connection",
                u.rss_kib.saturating_sub(base.usage.rss_kib) as f64 / link_count as f64,
                "KiB",
            );
        }
        let per_proc = self.workers.usage();
        r.figure("rss_max_process", per_proc.iter().map(|p| p.rss_kib).max().unwrap_or(0) as f64 / 1024.0, "MiB");
        r.figure("fds", u.fds as f64, "fds");
        r.figure("fds_per_node", per_node(u.fds, base.usage.fds), "fds");
        r.figure("fds_max_process", per_proc.iter().map(|p| p.fds).max().unwrap_or(0) as f64, "fds");
        r.figure("threads", u.threads as f64, "threads");
        r.figure("cpu_cores_busy_forming", now.cores_since(base), "cores");
        r.figure("cpu_cores_busy_settled", cpu, "cores");
        r.figure("cpu_per_node_settled", 1000.0 * cpu / nodes.max(1) as f64, "millicores");
        let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1) as f64;
        if cpu >= 0.9 * cores {
            self.out.ran_out.push(format!(
                "CPU: {cpu:.2} of {cores} cores busy with {link_count} connections before the second batch"
            ));
        }
    }

    /// Publishes one advert from each node of `publishers` at once and follows the batch
    /// until every node holds every advert or `deadline` passes.
    fn propagate(&mut self, label: &str, publishers: &[usize], nodes: usize, deadline: Duration) -> Result<(), String> {
        let before = self.sample();
        let mut published: Vec<Publication> = Vec::new();
        for reply in self.workers.ask_all(&Command::Publish { nodes: publishers.to_vec() }, ANSWER)? {
            match reply {
                Reply::Published { adverts } => published.extend(adverts),
                other => return Err(unexpected(other)),
            }
        }
        if published.is_empty() {
            self.out.failed.push(format!("{label}: no advert was published"));
            return Ok(());
        }
        let first_ns = published.iter().map(|p| p.sent_ns).min().unwrap_or_else(mono_ns);
        let providers: Vec<String> = published.iter().map(|p| p.provider.clone()).collect();
        let held_cmd = Command::Held { providers: providers.clone() };
        let mut last_memory_check = Instant::now();
        loop {
            let mut held = vec![0; providers.len()];
            for reply in self.workers.ask_all(&held_cmd, ANSWER)? {
                match reply {
                    Reply::Held { held: h } => held.iter_mut().zip(h).for_each(|(a, b)| *a += b),
                    other => return Err(unexpected(other)),
                }
            }
            let since = Duration::from_nanos(mono_ns().saturating_sub(first_ns));
            if held.iter().all(|h| *h >= nodes) || since >= deadline {
                break;
            }
            if last_memory_check.elapsed() >= SETTLE_SAMPLE {
                last_memory_check = Instant::now();
                let usage = self.sample().usage;
                self.check_memory(&usage, "while propagating")?;
            }
            std::thread::sleep(COVERAGE_POLL);
        }
        let followed = Duration::from_nanos(mono_ns().saturating_sub(first_ns));
        let after = self.sample();

        let mut merged: Vec<ProviderArrivals> = vec![ProviderArrivals::default(); providers.len()];
        let mut lacking_any = 0;
        let mut lacking_degrees = Vec::new();
        for reply in self.workers.ask_all(&Command::Arrivals { providers }, ANSWER)? {
            match reply {
                Reply::Arrivals { per_provider, lacking_any: lacking, lacking_degrees: degrees, .. } => {
                    lacking_any += lacking;
                    lacking_degrees.extend(degrees);
                    for (m, a) in merged.iter_mut().zip(per_provider) {
                        m.at_ns.extend(a.at_ns);
                        m.untimed += a.untimed;
                        m.ack = m.ack.take().or(a.ack);
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        let adverts =
            published.iter().zip(merged).map(|(p, arrivals)| Advert { sent_ns: p.sent_ns, arrivals }).collect();
        let batch = Batch {
            label,
            adverts,
            nodes,
            lacking_any,
            lacking_degrees,
            followed,
            deadline,
            cpu_cores: after.cores_since(&before),
        };
        batch.report(self.r, self.out);
        Ok(())
    }

    /// The workers' tallies, summed: dial failures by cause, disconnections, and the nodes'
    /// upkeep counters.
    fn ask_tallies(&mut self) -> Result<Tallies, String> {
        let mut t = Tallies::default();
        for reply in self.workers.ask_all(&Command::Tally, ANSWER)? {
            match reply {
                Reply::Tally { dial_failures, disconnections: d, upkeep: u } => {
                    t.disconnections += d;
                    for (name, count) in u {
                        match t.upkeep.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, sum)) => *sum += count,
                            None => t.upkeep.push((name, count)),
                        }
                    }
                    for (cause, count) in dial_failures {
                        *t.causes.entry(cause).or_default() += count;
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
        Ok(t)
    }

    /// Reports the whole size's tallies, and how much of the upkeep came after `settled`
    /// (the settled swarm's own, apart from the join's).
    fn tally(&mut self, settled: &Tallies) -> Result<(), String> {
        let t = self.ask_tallies()?;
        self.r.figure("dial_failures", t.causes.values().sum::<u64>() as f64, "dials");
        self.r.figure("disconnections", t.disconnections as f64, "events");
        self.r.figure(
            "disconnections_after_settling",
            t.disconnections.saturating_sub(settled.disconnections) as f64,
            "events",
        );
        for (name, count) in &t.upkeep {
            self.r.figure(name, *count as f64, "events");
            let before = settled.upkeep.iter().find(|(n, _)| n == name).map_or(0, |(_, c)| *c);
            self.r.figure(&format!("{name}_after_settling"), count.saturating_sub(before) as f64, "events");
        }
        let mut causes: Vec<(String, u64)> = t.causes.into_iter().collect();
        causes.sort_by_key(|c| std::cmp::Reverse(c.1));
        for (cause, count) in causes.iter().take(3) {
            self.r.progress(&format!("dial failures: {count} × {cause}"));
        }
        Ok(())
    }
}
