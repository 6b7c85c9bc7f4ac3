//! A large simulated swarm: hundreds to thousands of real `peervm_node::network::Node`s
//! over loopback TCP (TCP+QUIC transports built, TCP used; gossipsub, kad and sync as in
//! production, `target_peers` 8), spread over several worker processes. For each size it
//! measures how long the swarm takes to form (every node has a peer), then publishes 10
//! adverts from 10 different providers and follows their coverage (the share of nodes
//! whose store holds each advert, timed by each node's own `AdvertStored` event) until
//! every node has every advert; lets the swarm settle (past connection trimming, until its
//! connections stop changing) and does the same with 10 more providers; and records the
//! workers' memory, threads, file descriptors and CPU use, and the nodes' dial failures by
//! cause.
//!
//! Run: `cargo bench -p peervm-tests --bench large_swarm`. Prints one JSON object per
//! figure (name, value, unit) on stdout and a human summary on stderr. Settings:
//! - `PEERVM_LARGE_SIZES=100,500`: the sizes (default 100 … 2000);
//! - `PEERVM_LARGE_PROCS=<k>`: worker processes per size (default: one per 400 nodes, so
//!   that no process's descriptor table fills: with both ends of a loopback connection in
//!   one process each connection costs it 2 descriptors, across processes 1 each);
//! - `PEERVM_LARGE_THREADS=<t>`: tokio runtime workers per worker process (default 1);
//! - `PEERVM_LARGE_NOFILE=<n>`: set the open-file limit, soft and hard, to `n` (raising the
//!   hard limit needs CAP_SYS_RESOURCE); by default the soft limit is raised to the hard one;
//! - `PEERVM_LARGE_MAX_RSS_MIB=<n>`: end a size whose workers together pass `n` MiB
//!   (default 8192), so a run cannot push a shared machine into the OOM killer.
//!
//! The process that `cargo bench` starts is the coordinator (`coordinator.rs`): it runs no
//! node, starts the workers of each size (this binary again, with `PEERVM_LARGE_WORKER`,
//! `worker.rs`) and drives them through the phases over their stdin and stdout
//! (`wire.rs`). Times cross processes on CLOCK_MONOTONIC. A size gets about 4 minutes;
//! the series stops when a swarm does not form, a worker dies, or two sizes in a row fail.

mod coordinator;
mod layout;
mod process_stats;
mod propagation;
mod report;
mod wire;
mod worker;
mod workers;

use coordinator::{ADVERTS, Settings};
use layout::Layout;
use process_stats::{load_avg, set_nofile_limit};
use report::Verdict;

const DEFAULT_SIZES: [usize; 7] = [100, 250, 500, 750, 1000, 1500, 2000];
const DEFAULT_MAX_RSS_MIB: u64 = 8192;
/// One runtime thread per worker process: with several workers on this machine's 2 cores,
/// 2 threads each measured no better, within the spread between runs (BENCHMARKS.md,
/// "Several processes").
const DEFAULT_THREADS: usize = 1;

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let wanted = env("PEERVM_LARGE_NOFILE");
    let nofile = set_nofile_limit(wanted);
    let threads = env("PEERVM_LARGE_THREADS").unwrap_or(DEFAULT_THREADS).max(1);
    if let Some((layout, me)) = std::env::var("PEERVM_LARGE_WORKER").ok().and_then(|v| Layout::from_env(&v)) {
        worker::run(layout, me, threads);
        return;
    }
    if let Some(w) = wanted.filter(|w| *w != nofile.0) {
        eprintln!("could not set the open-file limit to {w} (raising the hard limit needs CAP_SYS_RESOURCE)");
    }
    let sizes: Vec<usize> = std::env::var("PEERVM_LARGE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    let settings = Settings {
        procs: env("PEERVM_LARGE_PROCS"),
        threads,
        max_rss_mib: env("PEERVM_LARGE_MAX_RSS_MIB").unwrap_or(DEFAULT_MAX_RSS_MIB),
        nofile,
    };
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0);
    eprintln!(
        "large swarm: sizes {sizes:?}, {cores} cores, open-file limit {} (hard {}), load average {:.2}",
        nofile.0,
        nofile.1,
        load_avg()
    );
    let mut results = Vec::new();
    let mut failed_in_a_row = 0;
    for n in sizes {
        let result = coordinator::run(n, &settings);
        let stop = match &result.verdict {
            Verdict::Ok => {
                failed_in_a_row = 0;
                false
            }
            Verdict::Limit(why) => {
                eprintln!("[n={n}] LIMIT: {why}");
                failed_in_a_row = 0;
                false
            }
            Verdict::Failed(why) => {
                eprintln!("[n={n}] FAILED: {why}");
                failed_in_a_row += 1;
                failed_in_a_row >= 2
            }
            Verdict::Fatal(why) => {
                eprintln!("[n={n}] FATAL: {why}");
                true
            }
        };
        results.push(result);
        if stop {
            break;
        }
    }
    report::summary(&results, ADVERTS);
}
