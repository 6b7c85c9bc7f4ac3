//! The coordinator's handle on its worker processes: this benchmark binary again, started
//! with `PEERVM_LARGE_WORKER`, spoken to by `wire` commands on stdin and replies on
//! stdout; their stderr (progress lines) goes straight to ours. Dropping the handle kills
//! every worker it started, by its own child handle.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::layout::Layout;
use crate::process_stats::Usage;
use crate::wire::{Command, Reply};

struct Worker {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<String>,
}

pub struct Workers {
    workers: Vec<Worker>,
}

impl Workers {
    /// Starts the `layout.procs` workers, each on a tokio runtime of `threads` workers.
    pub fn spawn(layout: Layout, threads: usize) -> Result<Workers, String> {
        let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
        let mut workers = Workers { workers: Vec::new() };
        for w in 0..layout.procs {
            let mut child = Process::new(&exe)
                .arg("--bench")
                .env("PEERVM_LARGE_WORKER", layout.to_env(w))
                .env("PEERVM_LARGE_THREADS", threads.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .map_err(|e| format!("cannot start worker {w}: {e}"))?;
            let (stdin, stdout) = (child.stdin.take().expect("piped"), child.stdout.take().expect("piped"));
            let (tx, replies) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            workers.workers.push(Worker { child, stdin, replies });
        }
        Ok(workers)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.child.id()).collect()
    }

    /// What each worker process uses now.
    pub fn usage(&self) -> Vec<Usage> {
        self.pids().into_iter().map(Usage::of).collect()
    }

    fn send(&mut self, w: usize, command: &Command) -> Result<(), String> {
        let line = serde_json::to_string(command).expect("commands serialize");
        let stdin = &mut self.workers[w].stdin;
        writeln!(stdin, "{line}").and_then(|()| stdin.flush()).map_err(|e| format!("worker {w} gone: {e}"))
    }

    fn receive(&mut self, w: usize, deadline: Instant) -> Result<Reply, String> {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match self.workers[w].replies.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Timeout) => return Err(format!("worker {w} did not answer in time")),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.workers[w].child.try_wait().ok().flatten();
                return Err(format!("worker {w} ended ({status:?})"));
            }
        };
        match serde_json::from_str(&line) {
            Ok(Reply::Error { message }) => Err(format!("worker {w}: {message}")),
            Ok(reply) => Ok(reply),
            Err(e) => Err(format!("worker {w} said {line:?}: {e}")),
        }
    }

    pub fn ask(&mut self, w: usize, command: &Command, timeout: Duration) -> Result<Reply, String> {
        self.send(w, command)?;
        self.receive(w, Instant::now() + timeout)
    }

    /// Sends `command` to every worker at once, then gathers their replies in order.
    pub fn ask_all(&mut self, command: &Command, timeout: Duration) -> Result<Vec<Reply>, String> {
        let deadline = Instant::now() + timeout;
        for w in 0..self.workers.len() {
            self.send(w, command)?;
        }
        (0..self.workers.len()).map(|w| self.receive(w, deadline)).collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}
