//! A large simulated swarm: hundreds of real `peervm_node::network::Node`s in one process
//! over loopback TCP (TCP+QUIC transports built, TCP used; gossipsub, kad and sync as in
//! production, `target_peers` 8). For each size it measures how long the swarm takes to
//! form (every node has a peer), then publishes 10 adverts from 10 different providers and
//! follows their coverage (the share of nodes whose store holds each advert) until every
//! node has every advert; lets the swarm settle (past connection trimming, until its
//! connections stop changing) and does the same with 10 more providers; and records the
//! process's memory, threads, file descriptors and CPU use, and the nodes' dial failures
//! by cause.
//!
//! Run: `cargo bench -p peervm-tests --bench large_swarm`. Prints one JSON object per
//! figure (name, value, unit) on stdout and a human summary on stderr. Settings:
//! - `PEERVM_LARGE_SIZES=100,500`: the sizes (default 100 … 2000);
//! - `PEERVM_LARGE_NOFILE=<n>`: set the open-file limit, soft and hard, to `n` (raising the
//!   hard limit needs CAP_SYS_RESOURCE); by default the soft limit is raised to the hard one;
//! - `PEERVM_LARGE_MAX_RSS_MIB=<n>`: end a size whose memory passes `n` MiB (default 8192),
//!   so a run cannot push a shared machine into the OOM killer.
//!
//! Each size runs in a child process (this binary again, with `PEERVM_LARGE_CHILD=<n>`),
//! so the memory, threads and descriptors measured are that size's alone, and a size that
//! exhausts the machine cannot take the others down. A size gets about 4 minutes. The
//! series stops when a swarm does not form, a child dies, or two sizes in a row fail.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use peervm_node::network::{Node, NodeConfig, NodeEvent, Role};
use peervm_protocol::SigningKey;
use peervm_tests::{advert, holds, signed, unique_key};
use tokio::sync::broadcast::error::RecvError;

const DEFAULT_SIZES: [usize; 7] = [100, 250, 500, 750, 1000, 1500, 2000];
/// Adverts published per size, each by a different provider.
const ADVERTS: usize = 10;
/// Node starts in flight at once (each waits ~100 ms for its listener to settle).
const START_CONCURRENCY: usize = 64;
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
/// The whole size (start, formation, settle, propagation) ends within about this.
const SIZE_BUDGET: Duration = Duration::from_secs(240);
const PROPAGATION_DEADLINE: Duration = Duration::from_secs(60);
/// The parent kills a child that runs longer than this.
const CHILD_TIMEOUT: Duration = Duration::from_secs(360);
const COVERAGE_POLL: Duration = Duration::from_millis(25);
/// Coverage is recorded when these times (ms after the first publish) have passed.
const CHECKPOINTS_MS: [u64; 9] = [100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000];
/// Time to reach these coverages is recorded per advert.
const THRESHOLDS: [f64; 4] = [0.5, 0.9, 0.99, 1.0];
const DEFAULT_MAX_RSS_MIB: u64 = 8192;

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let wanted = std::env::var("PEERVM_LARGE_NOFILE").ok().and_then(|v| v.parse().ok());
    let limits = set_nofile_limit(wanted);
    if let Some(w) = wanted.filter(|w| *w != limits.0) {
        eprintln!("could not set the open-file limit to {w} (raising the hard limit needs CAP_SYS_RESOURCE)");
    }
    match std::env::var("PEERVM_LARGE_CHILD").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(n) => child(n, limits),
        None => parent(limits),
    }
}

// ---------------------------------------------------------------------------------------
// Process figures. The /proc files are opened once and re-read, so they can still be read
// when the swarm has used up every file descriptor.

/// Sets the open-file limit to `wanted` (soft and hard), or raises the soft limit to the
/// hard one; returns (soft, hard) afterwards.
fn set_nofile_limit(wanted: Option<u64>) -> (u64, u64) {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `r` is a valid, writable rlimit for the duration of every call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return (0, 0);
        }
        let target = match wanted {
            Some(w) => libc::rlimit { rlim_cur: w as libc::rlim_t, rlim_max: (w as libc::rlim_t).max(r.rlim_max) },
            None => libc::rlimit { rlim_cur: r.rlim_max, rlim_max: r.rlim_max },
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &target) == 0 {
            r = target;
        }
    }
    (r.rlim_cur, r.rlim_max)
}

/// User plus system CPU time of this process so far.
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; all-zero is a valid value, and getrusage only writes it.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// The text of a /proc file, through a handle opened on first use and kept.
fn proc_text(path: &'static str, slot: &'static OnceLock<Option<Mutex<File>>>) -> String {
    let Some(file) = slot.get_or_init(|| File::open(path).ok().map(Mutex::new)) else { return String::new() };
    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
    let mut text = String::new();
    if file.rewind().is_ok() && file.read_to_string(&mut text).is_ok() { text } else { String::new() }
}

fn status_field(field: &str) -> u64 {
    static STATUS: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    proc_text("/proc/self/status", &STATUS)
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

fn threads() -> u64 {
    status_field("Threads:")
}

/// The 1-minute load average of the machine.
fn load_avg() -> f64 {
    static LOADAVG: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    proc_text("/proc/loadavg", &LOADAVG).split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0.0)
}

/// Open file descriptors (not counting the one that lists them), and whether the table is
/// full: listing it needs one more descriptor, so a full table shows as EMFILE.
fn fds(limit: u64) -> (u64, bool) {
    match std::fs::read_dir("/proc/self/fd") {
        Ok(d) => {
            let open = d.count().saturating_sub(1) as u64;
            (open, open + 8 >= limit)
        }
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => (limit, true),
        Err(_) => (0, false),
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------
// The child: one swarm of `n` nodes.

/// Prints figures of one size as `large_swarm_<n>_nodes_<figure>`.
struct Reporter {
    n: usize,
}

impl Reporter {
    fn figure(&self, figure: &str, value: f64, unit: &str) {
        println!("{{\"name\":\"large_swarm_{}_nodes_{figure}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}", self.n);
        let _ = std::io::stdout().flush();
    }

    fn progress(&self, what: &str) {
        eprintln!("[n={}] {what}", self.n);
    }
}

/// What went wrong in one size. `failed`: the swarm did not do its job (form, deliver);
/// `ran_out`: a resource of the machine was used up (the swarm may still have coped);
/// `fatal`: nothing after this point is worth measuring.
#[derive(Default)]
struct Outcome {
    failed: Vec<String>,
    ran_out: Vec<String>,
    fatal: bool,
}

impl Outcome {
    fn status_line(&self) -> String {
        let mut parts = self.failed.clone();
        parts.extend(self.ran_out.iter().map(|r| format!("ran out of {r}")));
        let text = parts.join("; ").replace('\n', " ");
        match (self.failed.is_empty(), self.ran_out.is_empty()) {
            (true, true) => "STATUS ok".into(),
            (true, false) => format!("STATUS limit: {text}"),
            (false, _) if self.fatal => format!("STATUS fatal: {text}"),
            (false, _) => format!("STATUS fail: {text}"),
        }
    }
}

fn child(n: usize, limits: (u64, u64)) {
    // Open the /proc handles before the swarm can take every descriptor.
    let _ = (rss_kib(), load_avg());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let outcome = rt.block_on(run_swarm(n, limits));
    println!("{}", outcome.status_line());
    let _ = std::io::stdout().flush();
    // Tearing down hundreds of nodes one by one measures nothing; the process exit closes
    // every socket at once.
    std::process::exit(0);
}

/// Connected-peer counts of every node (`None`: its swarm task did not answer in 5 s).
async fn degrees(nodes: &[Node]) -> Vec<Option<usize>> {
    futures::future::join_all(nodes.iter().map(|node| async move {
        tokio::time::timeout(Duration::from_secs(5), node.client.connected_peers())
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|peers| peers.len())
    }))
    .await
}

fn links(degrees: &[Option<usize>]) -> usize {
    degrees.iter().flatten().sum::<usize>() / 2
}

/// Starts a node on a fresh loopback port and has `tally` watch its events.
async fn start(key: SigningKey, role: Role, bootstrap: Vec<Multiaddr>, tally: &Arc<Tally>) -> Result<Node, String> {
    let mut config = NodeConfig::new(key, role);
    config.listen = vec!["/ip4/127.0.0.1/tcp/0".parse().expect("multiaddr")];
    config.bootstrap = bootstrap;
    let node = Node::start(config).await.map_err(|e| e.to_string())?;
    tally.watch(&node);
    Ok(node)
}

/// Dial failures (by cause) and disconnections that every node reported. A watcher that
/// falls behind its node's event channel skips events: the counts are lower bounds.
#[derive(Default)]
struct Tally {
    dial_failures: Mutex<HashMap<String, u64>>,
    disconnections: AtomicU64,
}

impl Tally {
    fn watch(self: &Arc<Self>, node: &Node) {
        let mut events = node.subscribe();
        let tally = self.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::DialFailed { error, .. }) => tally.dial_failed(&error),
                    Ok(NodeEvent::PeerDisconnected(_)) => {
                        tally.disconnections.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => break,
                }
            }
        });
    }

    /// Counts `error` by its cause: the first "<address>: <cause>" part, with addresses
    /// and peer ids blanked so that equal causes count together.
    fn dial_failed(&self, error: &str) {
        let first = error.split("; ").next().unwrap_or(error);
        let cause = if first.starts_with('/') { first.split_once(": ").map_or(first, |(_, c)| c) } else { first };
        let cause: Vec<&str> = cause
            .split_whitespace()
            .map(|w| if w.starts_with("12D3") || w.starts_with('/') { "<…>" } else { w })
            .collect();
        let cause: String = cause.join(" ").chars().take(160).collect();
        *self.dial_failures.lock().unwrap_or_else(|p| p.into_inner()).entry(cause).or_default() += 1;
    }

    /// (total, the three most frequent causes with their counts).
    fn dial_summary(&self) -> (u64, Vec<(String, u64)>) {
        let map = self.dial_failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut causes: Vec<(String, u64)> = map.iter().map(|(k, v)| (k.clone(), *v)).collect();
        causes.sort_by_key(|c| std::cmp::Reverse(c.1));
        causes.truncate(3);
        (map.values().sum(), causes)
    }
}

/// Watches the process's descriptors and memory against their limits.
struct Limits {
    nofile: u64,
    max_rss_mib: u64,
    fd_full: Option<(Duration, usize)>,
}

impl Limits {
    /// Records when the descriptor table first filled (`links`: connections then).
    fn check_fds(&mut self, since_start: Duration, links: usize) -> u64 {
        let (open, full) = fds(self.nofile);
        if full && self.fd_full.is_none() {
            self.fd_full = Some((since_start, links));
        }
        open
    }

    fn memory_exceeded(&self) -> bool {
        rss_kib() > self.max_rss_mib * 1024
    }
}

/// Runs one size.
async fn run_swarm(n: usize, (soft, hard): (u64, u64)) -> Outcome {
    let r = Reporter { n };
    let mut out = Outcome::default();
    let max_rss_mib =
        std::env::var("PEERVM_LARGE_MAX_RSS_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(DEFAULT_MAX_RSS_MIB);
    let mut limits = Limits { nofile: soft, max_rss_mib, fd_full: None };
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1) as f64;
    let boot_count = 4.max(n.div_ceil(250)).min(n);
    r.figure("rlimit_nofile", soft as f64, "fds");
    r.figure("rlimit_nofile_hard", hard as f64, "fds");
    r.figure("bootstrap_nodes", boot_count as f64, "nodes");
    r.figure("load_avg_before", load_avg(), "load");
    let base_fds = fds(soft).0;
    let base_rss = rss_kib();

    // Bootstrap nodes: the first alone, the others dial it.
    let t0 = Instant::now();
    let cpu0 = cpu_time();
    let tag = |i: usize| (n * 10_000 + i) as u64;
    let tally: Arc<Tally> = Arc::default();
    let first = match start(unique_key(tag(0)), Role::Bootstrap, Vec::new(), &tally).await {
        Ok(node) => node,
        Err(e) => {
            out.failed.push(format!("the first bootstrap node did not start: {e}"));
            out.fatal = true;
            return out;
        }
    };
    let mut nodes = vec![first];
    for i in 1..boot_count {
        match start(unique_key(tag(i)), Role::Bootstrap, nodes[0].listen_addrs.clone(), &tally).await {
            Ok(node) => nodes.push(node),
            Err(e) => {
                out.failed.push(format!("bootstrap node {i} did not start: {e}"));
                out.fatal = true;
                return out;
            }
        }
    }
    let boot_addrs: Vec<Multiaddr> = nodes.iter().map(|b| b.listen_addrs[0].clone()).collect();

    // The providers that publish: two batches of 10, spread over the non-bootstrap nodes.
    let spread = |j: usize| boot_count + j * (n - boot_count) / (2 * ADVERTS);
    let fresh_publishers: Vec<usize> = (0..ADVERTS).map(|j| spread(2 * j)).collect();
    let settled_publishers: Vec<usize> = (0..ADVERTS).map(|j| spread(2 * j + 1)).collect();
    let mut publisher_keys: HashMap<usize, SigningKey> = HashMap::new();

    // Every other node dials one bootstrap node (round robin), `START_CONCURRENCY` at once.
    let permits = Arc::new(tokio::sync::Semaphore::new(START_CONCURRENCY));
    let mut starting = tokio::task::JoinSet::new();
    for i in boot_count..n {
        let key = unique_key(tag(i));
        if fresh_publishers.contains(&i) || settled_publishers.contains(&i) {
            publisher_keys.insert(i, SigningKey::from_seed(&key.seed()));
        }
        let bootstrap = vec![boot_addrs[i % boot_count].clone()];
        let permits = permits.clone();
        let tally = tally.clone();
        starting.spawn(async move {
            let _permit = permits.acquire_owned().await.expect("semaphore open");
            (i, start(key, Role::Provider, bootstrap, &tally).await)
        });
    }
    let mut started: Vec<(usize, Node)> = Vec::new();
    let mut start_errors: Vec<String> = Vec::new();
    loop {
        let left = FORMATION_DEADLINE.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, starting.join_next()).await {
            Ok(Some(Ok((i, Ok(node))))) => started.push((i, node)),
            Ok(Some(Ok((i, Err(e))))) => start_errors.push(format!("node {i}: {e}")),
            Ok(Some(Err(e))) => start_errors.push(format!("start task: {e}")),
            Ok(None) => break,
            Err(_) => {
                start_errors.push(format!("{} nodes still starting at the deadline", starting.len()));
                starting.abort_all();
                break;
            }
        }
    }
    started.sort_by_key(|(i, _)| *i);
    let mut index_of: HashMap<usize, usize> = HashMap::new();
    for (i, node) in started {
        index_of.insert(i, nodes.len());
        nodes.push(node);
    }
    let start_took = t0.elapsed();
    r.figure("start", ms(start_took), "ms");
    r.figure("start_failures", (n - nodes.len()) as f64, "nodes");
    r.progress(&format!("{} of {n} nodes started in {:.1} s", nodes.len(), start_took.as_secs_f64()));
    if !start_errors.is_empty() {
        r.progress(&format!("first start failure: {}", start_errors[0]));
        out.failed.push(format!("{} of {n} nodes did not start (first: {})", n - nodes.len(), start_errors[0]));
    }

    // Formation: every node has at least one peer.
    let (formed, with_peer) = loop {
        let d = degrees(&nodes).await;
        let with_peer = d.iter().filter(|x| x.is_some_and(|k| k >= 1)).count();
        if with_peer == nodes.len() {
            break (Some(t0.elapsed()), with_peer);
        }
        if t0.elapsed() >= FORMATION_DEADLINE {
            break (None, with_peer);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    r.figure("formed_fraction", 100.0 * with_peer as f64 / n as f64, "%");
    match formed {
        Some(took) => {
            r.figure("formation", ms(took), "ms");
            r.progress(&format!("formed (every node has a peer) {:.1} s after the first start", took.as_secs_f64()));
        }
        None => {
            r.progress(&format!("formation incomplete: {with_peer}/{n} nodes have a peer"));
            out.failed.push(format!(
                "formation incomplete: {with_peer} of {n} nodes had a peer {} s after the first start",
                FORMATION_DEADLINE.as_secs()
            ));
            out.fatal = true;
        }
    }

    let mut batch = |publishers: &[usize]| -> Vec<(usize, SigningKey)> {
        publishers.iter().filter_map(|i| Some((*index_of.get(i)?, publisher_keys.remove(i)?))).collect()
    };
    let (fresh, settled) = (batch(&fresh_publishers), batch(&settled_publishers));
    let formed_at = Instant::now();
    let formed_links = links(&degrees(&nodes).await);
    r.figure("links_at_formation", formed_links as f64, "connections");

    // A first batch straight after formation, while kad is still adding connections.
    let fresh_deadline = FRESH_DEADLINE.min(SIZE_BUDGET.saturating_sub(t0.elapsed())).max(Duration::from_secs(5));
    if !propagate(&r, "fresh", &nodes, &fresh, fresh_deadline, &limits, &mut out).await {
        return out;
    }

    // Settle: let gossipsub build its meshes and the nodes trim the extra connections of
    // their first DHT walks, until the number of connections stops changing.
    let mut sample = degrees(&nodes).await;
    let mut last_links = formed_links;
    let (mut cpu_prev, mut wall_prev) = (cpu_time(), Instant::now());
    let mut cpu_settled: f64;
    loop {
        let now_links = links(&sample);
        let open = limits.check_fds(t0.elapsed(), now_links);
        let elapsed = formed_at.elapsed();
        let (cpu_now, wall_now) = (cpu_time(), Instant::now());
        cpu_settled = (cpu_now - cpu_prev).as_secs_f64() / (wall_now - wall_prev).as_secs_f64().max(1e-9);
        (cpu_prev, wall_prev) = (cpu_now, wall_now);
        r.progress(&format!(
            "settling {:>2.0} s: {now_links} connections, {open} fds, RSS {} MiB, cpu {cpu_settled:.2} cores",
            elapsed.as_secs_f64(),
            rss_kib() / 1024
        ));
        if limits.memory_exceeded() {
            out.ran_out
                .push(format!("memory: RSS passed the {} MiB cap at {now_links} connections", limits.max_rss_mib));
            out.failed.push("ended early at the memory cap".into());
            out.fatal = true;
            return out;
        }
        let steady = now_links > 0 && now_links.abs_diff(last_links) * 100 <= now_links;
        if (elapsed >= SETTLE_MIN && steady)
            || elapsed >= SETTLE_MAX
            || t0.elapsed() + PROPAGATION_DEADLINE / 4 >= SIZE_BUDGET
        {
            break;
        }
        last_links = now_links;
        tokio::time::sleep(SETTLE_SAMPLE).await;
        sample = degrees(&nodes).await;
    }
    let wall_formed = t0.elapsed();
    let cpu_formed = cpu_time();
    r.figure("settle", ms(formed_at.elapsed()), "ms");
    let answered: Vec<usize> = sample.iter().flatten().copied().collect();
    let unresponsive = sample.len() - answered.len();
    let link_count = links(&sample);
    if !answered.is_empty() {
        r.figure("degree_min", *answered.iter().min().unwrap_or(&0) as f64, "peers");
        r.figure("degree_mean", answered.iter().sum::<usize>() as f64 / answered.len() as f64, "peers");
        r.figure("degree_max", *answered.iter().max().unwrap_or(&0) as f64, "peers");
        r.figure("isolated_nodes", answered.iter().filter(|&&d| d == 0).count() as f64, "nodes");
        r.figure("links", link_count as f64, "connections");
        let pairs = nodes.len() * (nodes.len() - 1) / 2;
        r.figure("links_of_all_pairs", 100.0 * link_count as f64 / pairs.max(1) as f64, "%");
    }
    r.figure("unresponsive_nodes", unresponsive as f64, "nodes");
    if unresponsive > 0 {
        out.failed.push(format!("{unresponsive} swarm tasks did not answer within 5 s"));
    }
    let (rss, fd_count, thread_count) = (rss_kib(), limits.check_fds(t0.elapsed(), link_count), threads());
    r.figure("rss", rss as f64 / 1024.0, "MiB");
    r.figure("rss_per_node", rss.saturating_sub(base_rss) as f64 / nodes.len() as f64, "KiB");
    if link_count > 0 {
        r.figure("rss_per_connection", rss.saturating_sub(base_rss) as f64 / link_count as f64, "KiB");
    }
    r.figure("fds", fd_count as f64, "fds");
    r.figure("fds_per_node", fd_count.saturating_sub(base_fds) as f64 / nodes.len() as f64, "fds");
    r.figure("threads", thread_count as f64, "threads");
    r.figure("cpu_cores_busy_forming", (cpu_formed - cpu0).as_secs_f64() / wall_formed.as_secs_f64(), "cores");
    r.figure("cpu_cores_busy_settled", cpu_settled, "cores");
    if cpu_settled >= 0.9 * cores {
        out.ran_out.push(format!(
            "CPU: {cpu_settled:.2} of {cores} cores busy with {link_count} connections before the second batch"
        ));
    }

    // The second batch, once the connections stopped growing.
    let deadline = PROPAGATION_DEADLINE.min(SIZE_BUDGET.saturating_sub(t0.elapsed())).max(Duration::from_secs(10));
    if !propagate(&r, "settled", &nodes, &settled, deadline, &limits, &mut out).await {
        return out;
    }

    r.figure("rss_end", rss_kib() as f64 / 1024.0, "MiB");
    let end_links = links(&degrees(&nodes).await);
    r.figure("links_end", end_links as f64, "connections");
    r.figure("fds_end", limits.check_fds(t0.elapsed(), end_links) as f64, "fds");
    r.figure("threads_end", threads() as f64, "threads");
    r.figure("load_avg_after", load_avg(), "load");
    let (dial_failures, causes) = tally.dial_summary();
    r.figure("dial_failures", dial_failures as f64, "dials");
    r.figure("disconnections", tally.disconnections.load(Ordering::Relaxed) as f64, "events");
    for (cause, count) in &causes {
        r.progress(&format!("dial failures: {count} × {cause}"));
    }
    if let Some((at, at_links)) = limits.fd_full {
        r.figure("fd_table_full_after", ms(at), "ms");
        r.figure("links_when_fd_table_full", at_links as f64, "connections");
        out.ran_out.push(format!(
            "file descriptors: the {soft}-entry table was full {:.0} s after the first start, at \
             {at_links} connections (2 descriptors each, both ends being in this process)",
            at.as_secs_f64()
        ));
    }
    out
}

/// Publishes one advert from each of `publishers` (node index, key) at once and follows
/// their coverage until every node holds every advert or `deadline` passes. Each advert's
/// time counts from when its publish command was sent (a busy node's queue counts too).
/// Figures are named `<label>_…`. False when the size must end (memory cap).
async fn propagate(
    r: &Reporter,
    label: &str,
    nodes: &[Node],
    publishers: &[(usize, SigningKey)],
    deadline: Duration,
    limits: &Limits,
    out: &mut Outcome,
) -> bool {
    let cpu_pub = cpu_time();
    let mut providers: Vec<PeerId> = Vec::new();
    let mut published_at: Vec<Instant> = Vec::new();
    let mut publishing = Vec::new();
    for (at, key) in publishers {
        let client = nodes[*at].client.clone();
        let a = signed(key, &advert(key, 1, Duration::from_secs(300)));
        providers.push(key.peer_id());
        published_at.push(Instant::now());
        publishing.push(tokio::spawn(async move {
            let result = tokio::time::timeout(Duration::from_secs(30), client.publish(a)).await;
            (result, Instant::now())
        }));
    }
    if providers.is_empty() {
        out.failed.push(format!("{label}: no advert was published"));
        return true;
    }
    let total = nodes.len() as f64;
    let mut reached: Vec<[Option<Duration>; THRESHOLDS.len()]> = vec![[None; THRESHOLDS.len()]; providers.len()];
    let mut at_checkpoint: Vec<Option<(f64, f64)>> = vec![None; CHECKPOINTS_MS.len()];
    let first_publish = published_at[0];
    let mut coverage: Vec<f64>;
    let mut polls = 0u64;
    loop {
        let now = Instant::now();
        coverage =
            providers.iter().map(|p| nodes.iter().filter(|node| holds(node, p)).count() as f64 / total).collect();
        for (j, c) in coverage.iter().enumerate() {
            for (k, th) in THRESHOLDS.iter().enumerate() {
                if reached[j][k].is_none() && *c >= *th - 1e-9 {
                    reached[j][k] = Some(now - published_at[j]);
                }
            }
        }
        let since = now - first_publish;
        let mean = coverage.iter().sum::<f64>() / coverage.len() as f64;
        let min = coverage.iter().copied().fold(1.0, f64::min);
        for (k, cp) in CHECKPOINTS_MS.iter().enumerate() {
            if at_checkpoint[k].is_none() && since >= Duration::from_millis(*cp) {
                at_checkpoint[k] = Some((mean, min));
            }
        }
        if min >= 1.0 - 1e-9 {
            // Coverage only grows: every later checkpoint within the deadline is full.
            for (k, cp) in CHECKPOINTS_MS.iter().enumerate() {
                if at_checkpoint[k].is_none() && Duration::from_millis(*cp) <= deadline {
                    at_checkpoint[k] = Some((1.0, 1.0));
                }
            }
            break;
        }
        if since >= deadline {
            break;
        }
        polls += 1;
        if polls.is_multiple_of(40) && limits.memory_exceeded() {
            out.ran_out.push(format!("memory: RSS passed the {} MiB cap while propagating", limits.max_rss_mib));
            out.failed.push("ended early at the memory cap".into());
            out.fatal = true;
            return false;
        }
        tokio::time::sleep(COVERAGE_POLL).await;
    }
    let wall_prop = first_publish.elapsed();
    let cpu_prop = (cpu_time() - cpu_pub).as_secs_f64() / wall_prop.as_secs_f64();
    let mut acks = Vec::new();
    for (task, sent) in publishing.into_iter().zip(&published_at) {
        match task.await {
            Ok((Ok(Ok(())), at)) => acks.push(at - *sent),
            Ok((Ok(Err(e)), _)) => out.failed.push(format!("{label}: a publish failed: {e}")),
            Ok((Err(_), _)) => out.failed.push(format!("{label}: a publish got no answer in 30 s")),
            Err(e) => out.failed.push(format!("{label}: a publish task: {e}")),
        }
    }
    acks.sort();
    if !acks.is_empty() {
        r.figure(&format!("{label}_publish_ack_p50"), ms(percentile(&acks, 0.5)), "ms");
        r.figure(&format!("{label}_publish_ack_max"), ms(*acks.last().expect("not empty")), "ms");
    }
    for (k, th) in THRESHOLDS.iter().enumerate() {
        let mut times: Vec<Duration> = reached.iter().filter_map(|x| x[k]).collect();
        times.sort();
        let level = if *th >= 1.0 { "full".to_string() } else { format!("{}pct", (th * 100.0).round()) };
        if !times.is_empty() {
            r.figure(&format!("{label}_propagation_{level}_p50"), ms(percentile(&times, 0.5)), "ms");
            r.figure(&format!("{label}_propagation_{level}_p99"), ms(percentile(&times, 0.99)), "ms");
            r.figure(&format!("{label}_propagation_{level}_max"), ms(*times.last().expect("not empty")), "ms");
        }
        r.figure(&format!("{label}_propagation_{level}_missed"), (providers.len() - times.len()) as f64, "adverts");
    }
    for (k, cp) in CHECKPOINTS_MS.iter().enumerate() {
        if let Some((mean, min)) = at_checkpoint[k] {
            r.figure(&format!("{label}_coverage_at_{cp}ms_mean"), 100.0 * mean, "%");
            r.figure(&format!("{label}_coverage_at_{cp}ms_min"), 100.0 * min, "%");
        }
    }
    let final_min = coverage.iter().copied().fold(1.0, f64::min);
    let lacking = nodes.iter().filter(|node| providers.iter().any(|p| !holds(node, p))).count();
    r.figure(&format!("{label}_coverage_final_min"), 100.0 * final_min, "%");
    r.figure(&format!("{label}_nodes_lacking_an_advert"), lacking as f64, "nodes");
    r.figure(&format!("{label}_cpu_cores_busy_propagating"), cpu_prop, "cores");
    let full = reached.iter().filter(|x| x[THRESHOLDS.len() - 1].is_some()).count();
    r.progress(&format!(
        "{label}: {full}/{} adverts reached every node; lowest final coverage {:.1}%; publish acks {:.0}-{:.0} ms",
        providers.len(),
        100.0 * final_min,
        acks.first().map(|d| ms(*d)).unwrap_or(0.0),
        acks.last().map(|d| ms(*d)).unwrap_or(0.0),
    ));
    if full < providers.len() {
        out.failed.push(format!(
            "{label}: {} of {} adverts did not reach every node within {} s ({lacking} nodes lacked one; lowest \
             coverage {:.1}%)",
            providers.len() - full,
            providers.len(),
            deadline.as_secs(),
            100.0 * final_min
        ));
    }
    true
}

// ---------------------------------------------------------------------------------------
// The parent: one child per size, then the summary.

enum Verdict {
    Ok,
    /// A resource ran out but the swarm still formed and delivered everything.
    Limit(String),
    /// The swarm did not form or deliver everything.
    Failed(String),
    /// Nothing larger is worth trying (did not form, memory cap, child died).
    Fatal(String),
}

struct SizeResult {
    n: usize,
    figures: HashMap<String, f64>,
    verdict: Verdict,
    took: Duration,
}

fn run_child(n: usize) -> SizeResult {
    let started = Instant::now();
    let exe = std::env::current_exe().expect("own executable");
    let spawned = Command::new(exe)
        .arg("--bench")
        .env("PEERVM_LARGE_CHILD", n.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let verdict = Verdict::Fatal(format!("cannot start the child: {e}"));
            return SizeResult { n, figures: HashMap::new(), verdict, took: started.elapsed() };
        }
    };
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let last_err: Arc<Mutex<Option<String>>> = Arc::default();
    let stderr = child.stderr.take().expect("piped");
    let keep = last_err.clone();
    let err_reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            *keep.lock().unwrap_or_else(|p| p.into_inner()) = Some(line);
        }
    });

    let mut figures = HashMap::new();
    let mut verdict: Option<Verdict> = None;
    let mut killed = false;
    let prefix = format!("large_swarm_{n}_nodes_");
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                if let Some(s) = line.strip_prefix("STATUS ") {
                    verdict = Some(if s == "ok" {
                        Verdict::Ok
                    } else if let Some(r) = s.strip_prefix("limit: ") {
                        Verdict::Limit(r.into())
                    } else if let Some(r) = s.strip_prefix("fatal: ") {
                        Verdict::Fatal(r.into())
                    } else {
                        Verdict::Failed(s.trim_start_matches("fail: ").into())
                    });
                } else if let Some((name, value)) = parse_figure(&line) {
                    println!("{line}");
                    let _ = std::io::stdout().flush();
                    figures.insert(name.trim_start_matches(&prefix).to_string(), value);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !killed && started.elapsed() > CHILD_TIMEOUT {
                    // Our own child, by its handle.
                    let _ = child.kill();
                    killed = true;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let exit = child.wait();
    let _ = reader.join();
    let _ = err_reader.join();
    let last = last_err.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
    let verdict = if killed {
        Verdict::Fatal(format!("killed after {} s without finishing (last: {last})", CHILD_TIMEOUT.as_secs()))
    } else {
        match (verdict, exit) {
            (Some(v), _) => v,
            (None, Ok(e)) => Verdict::Fatal(format!("the child ended early ({e}); last message: {last}")),
            (None, Err(e)) => Verdict::Fatal(format!("cannot wait for the child: {e}")),
        }
    };
    SizeResult { n, figures, verdict, took: started.elapsed() }
}

/// `{"name":"x","value":1.0,"unit":"ms"}` → ("x", 1.0).
fn parse_figure(line: &str) -> Option<(String, f64)> {
    let rest = line.strip_prefix("{\"name\":\"")?;
    let (name, rest) = rest.split_once("\",\"value\":")?;
    let (value, _) = rest.split_once(",\"unit\"")?;
    Some((name.to_string(), value.parse().ok()?))
}

fn parent((soft, hard): (u64, u64)) {
    let sizes: Vec<usize> = std::env::var("PEERVM_LARGE_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| DEFAULT_SIZES.to_vec());
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(0);
    eprintln!(
        "large swarm: sizes {sizes:?}, {cores} cores, open-file limit {soft} (hard {hard}), load average {:.2}",
        load_avg()
    );
    let mut results: Vec<SizeResult> = Vec::new();
    let mut failed_in_a_row = 0;
    for n in sizes {
        let result = run_child(n);
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
    summary(&results);
}

fn summary(results: &[SizeResult]) {
    let f = |r: &SizeResult, k: &str| r.figures.get(k).copied();
    let show = |v: Option<f64>, scale: f64, digits: usize| match v {
        Some(v) => format!("{:.*}", digits, v / scale),
        None => "-".to_string(),
    };
    let delivered = |r: &SizeResult, batch: &str| match f(r, &format!("{batch}_propagation_full_missed")) {
        Some(m) => format!("{}/{ADVERTS}", ADVERTS - m as usize),
        None => "-".into(),
    };
    let times = |r: &SizeResult, batch: &str| {
        format!(
            "{}/{}",
            show(f(r, &format!("{batch}_propagation_full_p50")), 1.0, 0),
            show(f(r, &format!("{batch}_propagation_full_max")), 1.0, 0)
        )
    };
    eprintln!();
    eprintln!("Large simulated swarm (loopback TCP, one process per size, 2 runtime workers):");
    let row = |cells: [&str; 15]| {
        eprintln!(
            "{:>5} {:>4} {:>6} {:>5} {:>12} {:>5} {:>13} {:>6} {:>13} {:>9} {:>6} {:>6} {:>6} {:>5} {:>5}",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            cells[4],
            cells[5],
            cells[6],
            cells[7],
            cells[8],
            cells[9],
            cells[10],
            cells[11],
            cells[12],
            cells[13],
            cells[14]
        )
    };
    row([
        "nodes",
        "boot",
        "form_s",
        "fresh",
        "p50/max",
        "sttld",
        "p50/max",
        "conns",
        "deg mean/max",
        "cov@1s/5s",
        "RSS",
        "KiB/cn",
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
            &show(f(r, "bootstrap_nodes"), 1.0, 0),
            &show(f(r, "formation"), 1000.0, 1),
            &delivered(r, "fresh"),
            &times(r, "fresh"),
            &delivered(r, "settled"),
            &times(r, "settled"),
            &show(f(r, "links"), 1.0, 0),
            &degree,
            &cov,
            &show(f(r, "rss"), 1.0, 0),
            &show(f(r, "rss_per_connection"), 1.0, 0),
            &show(f(r, "fds"), 1.0, 0),
            &show(f(r, "cpu_cores_busy_settled"), 1.0, 2),
            &show(f(r, "load_avg_before"), 1.0, 2),
        ]);
    }
    eprintln!(
        "(form_s: first start to every node having a peer; fresh/sttld: adverts of the batch published right after \
         formation / once connections stopped growing that reached every node, p50/max ms to reach them all; conns, \
         deg: connections and peers per node once settled; cov: settled batch, % of nodes; KiB/cn: RSS per \
         connection; cpu: cores busy once settled; load: 1-min load average before the size)"
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
