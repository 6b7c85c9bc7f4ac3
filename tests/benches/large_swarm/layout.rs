//! Which process runs which nodes: `procs` workers, each a contiguous range of the global
//! node indices 0..n, the bootstrap nodes (the first `boot_count`) all in worker 0.

use std::ops::Range;

#[derive(Debug, Clone, Copy)]
pub struct Layout {
    pub n: usize,
    pub procs: usize,
    pub boot_count: usize,
}

/// Nodes per worker when `PEERVM_LARGE_PROCS` does not say: a few hundred nodes keep a
/// worker's descriptors (about 13 per node, fewer when a connection's other end is in
/// another process) far below the 20,000 this container allows.
pub const NODES_PER_PROC: usize = 400;

impl Layout {
    pub fn new(n: usize, procs: Option<usize>) -> Layout {
        let boot_count = 4.max(n.div_ceil(250)).min(n);
        let procs = procs.unwrap_or_else(|| n.div_ceil(NODES_PER_PROC)).clamp(1, n.max(1));
        Layout { n, procs, boot_count }
    }

    /// The global indices worker `w` runs; worker 0's range always holds every bootstrap node.
    pub fn range(&self, w: usize) -> Range<usize> {
        let cut = |w: usize| if w == 0 { 0 } else { (w * self.n / self.procs).max(self.boot_count).min(self.n) };
        cut(w)..cut(w + 1)
    }

    /// The environment a worker process is started with, and read back by it.
    pub fn to_env(self, w: usize) -> String {
        format!("{},{},{},{w}", self.n, self.procs, self.boot_count)
    }

    pub fn from_env(v: &str) -> Option<(Layout, usize)> {
        let parts: Vec<usize> = v.split(',').map(|x| x.parse().ok()).collect::<Option<_>>()?;
        let [n, procs, boot_count, w] = parts[..] else { return None };
        (w < procs).then_some((Layout { n, procs, boot_count }, w))
    }
}
