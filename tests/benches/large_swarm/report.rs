//! The figures of one size (one JSON object each on stdout, as `scripts/bench` reads
//! them), what went wrong in it, and the summary table of the whole series on stderr.

use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

/// Prints figures of one size as `large_swarm_<n>_nodes_<figure>` and keeps them for the
/// summary.
pub struct Reporter {
    pub n: usize,
    pub figures: HashMap<String, f64>,
}

impl Reporter {
    pub fn new(n: usize) -> Reporter {
        Reporter { n, figures: HashMap::new() }
    }

    pub fn figure(&mut self, figure: &str, value: f64, unit: &str) {
        println!("{{\"name\":\"large_swarm_{}_nodes_{figure}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}", self.n);
        let _ = std::io::stdout().flush();
        self.figures.insert(figure.to_string(), value);
    }

    pub fn progress(&self, what: &str) {
        eprintln!("[n={}] {what}", self.n);
    }
}

/// What went wrong in one size. `failed`: the swarm did not do its job (form, deliver);
/// `ran_out`: a resource of the machine was used up (the swarm may still have coped);
/// `fatal`: nothing after this point is worth measuring.
#[derive(Default)]
pub struct Outcome {
    pub failed: Vec<String>,
    pub ran_out: Vec<String>,
    pub fatal: bool,
}

impl Outcome {
    pub fn fatal(&mut self, why: String) {
        self.failed.push(why);
        self.fatal = true;
    }

    pub fn verdict(&self) -> Verdict {
        let mut parts = self.failed.clone();
        parts.extend(self.ran_out.iter().map(|r| format!("ran out of {r}")));
        let text = parts.join("; ");
        match (self.failed.is_empty(), self.ran_out.is_empty()) {
            (true, true) => Verdict::Ok,
            (true, false) => Verdict::Limit(text),
            (false, _) if self.fatal => Verdict::Fatal(text),
            (false, _) => Verdict::Failed(text),
        }
    }
}

pub enum Verdict {
    Ok,
    /// A resource ran out but the swarm still formed and delivered everything.
    Limit(String),
    /// The swarm did not form or deliver everything.
    Failed(String),
    /// Nothing larger is worth trying (did not form, memory cap, a worker died).
    Fatal(String),
}

pub struct SizeResult {
    pub n: usize,
    pub figures: HashMap<String, f64>,
    pub verdict: Verdict,
    pub took: Duration,
}

pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> T {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn summary(results: &[SizeResult], adverts: usize) {
    let f = |r: &SizeResult, k: &str| r.figures.get(k).copied();
    let show = |v: Option<f64>, scale: f64, digits: usize| match v {
        Some(v) => format!("{:.*}", digits, v / scale),
        None => "-".to_string(),
    };
    let delivered = |r: &SizeResult, batch: &str| match f(r, &format!("{batch}_propagation_full_missed")) {
        Some(m) => format!("{}/{adverts}", adverts - m as usize),
        None => "-".into(),
    };
    let times = |r: &SizeResult, batch: &str| {
        ["p50", "p99", "max"].map(|p| show(f(r, &format!("{batch}_propagation_full_{p}")), 1.0, 0)).join("/")
    };
    eprintln!();
    eprintln!("Large simulated swarm (loopback TCP):");
    let row = |cells: [&str; 15]| {
        let widths = [5, 5, 6, 5, 17, 5, 17, 6, 13, 9, 6, 7, 6, 5, 5];
        let line: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:>w$}")).collect();
        eprintln!("{}", line.join(" "));
    };
    row([
        "nodes",
        "procs",
        "form_s",
        "fresh",
        "p50/p99/max",
        "sttld",
        "p50/p99/max",
        "conns",
        "deg mean/max",
        "cov@1s/5s",
        "RSS",
        "MiB/nd",
        "fds",
        "cpu",
        "load",
    ]);
    for r in results {
        let degree = format!("{}/{}", show(f(r, "degree_mean"), 1.0, 1), show(f(r, "degree_max"), 1.0, 0));
        let cov = format!(
            "{}/{}",
            show(f(r, "settled_coverage_at_1000ms_mean"), 1.0, 0),
            show(f(r, "settled_coverage_at_5000ms_mean"), 1.0, 0)
        );
        row([
            &r.n.to_string(),
            &show(f(r, "processes"), 1.0, 0),
            &show(f(r, "formation"), 1000.0, 1),
            &delivered(r, "fresh"),
            &times(r, "fresh"),
            &delivered(r, "settled"),
            &times(r, "settled"),
            &show(f(r, "links"), 1.0, 0),
            &degree,
            &cov,
            &show(f(r, "rss"), 1.0, 0),
            &show(f(r, "rss_per_node"), 1024.0, 2),
            &show(f(r, "fds"), 1.0, 0),
            &show(f(r, "cpu_cores_busy_settled"), 1.0, 2),
            &show(f(r, "load_avg_before"), 1.0, 2),
        ]);
    }
    eprintln!(
        "(form_s: first start to every node having a peer; fresh/sttld: adverts of the batch published right after \
         formation / once connections stopped changing that reached every node, p50/p99/max ms to reach them all; \
         conns, deg: connections and peers per node once settled; cov: settled batch, mean % of nodes; RSS, fds: all \
         workers; cpu: cores busy once settled, all workers; load: 1-min load average before the size)"
    );
    for r in results {
        let (what, why) = match &r.verdict {
            Verdict::Ok => continue,
            Verdict::Limit(w) => ("limit", w),
            Verdict::Failed(w) => ("FAILED", w),
            Verdict::Fatal(w) => ("FATAL", w),
        };
        eprintln!("{:>5} nodes, {what} after {:.0} s: {why}", r.n, r.took.as_secs_f64());
    }
}
