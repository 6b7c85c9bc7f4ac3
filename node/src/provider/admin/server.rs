//! The provider's side of the admin socket: binds it 0600, checks each caller's uid,
//! rate limits and audits every call, and carries out the request on the lease manager.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use peervm_protocol::LeaseId;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::AdminError;
use super::protocol::{
    AdminReply, AdminRequest, AdminResult, Blocked, BlockedPeer, Isolated, LeaseEntry, LockState, NodeInfo, Published,
    Reloaded, StatusReport, Terminated, Transition, Unblocked,
};
use crate::network::rate_limit::{RateLimit, TokenBucket};
use crate::provider::ProviderLeases;
use crate::provider::audit::AuditLog;
use crate::provider::reachability::SharedReachability;

/// A request line is small; anything longer is refused.
const MAX_REQUEST: usize = 4096;
/// Admin calls per second (burst 20): an operator's scripts, not a flood.
const CALLS_PER_SEC: f64 = 10.0;
const CALLS_BURST: f64 = 20.0;

/// A `reload` handed to the daemon, which owns the config: it answers on this channel
/// with what applied, or the refusal the operator reads.
pub type ReloadCall = tokio::sync::oneshot::Sender<Result<Reloaded, String>>;

/// Binds the socket (mode 0600 from creation: the umask is narrowed around `bind`) and
/// serves it in the background. `reload` reaches the daemon's loop (none: `reload` is
/// refused).
pub fn serve(
    path: &Path,
    leases: ProviderLeases,
    info: NodeInfo,
    audit: Option<Arc<AuditLog>>,
    reachability: SharedReachability,
    reload: Option<tokio::sync::mpsc::Sender<ReloadCall>>,
) -> Result<tokio::task::JoinHandle<()>, AdminError> {
    // A socket left by a killed provider is ours to replace (the directory is 0700).
    let _ = std::fs::remove_file(path);
    // SAFETY: umask(2) only swaps the process's file creation mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|source| AdminError::Bind { path: path.to_path_buf(), source })?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let ctx = Arc::new(Ctx { leases, info, audit, me, bucket: std::sync::Mutex::new(None), reachability, reload });
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let ctx = ctx.clone();
            tokio::spawn(async move { ctx.connection(stream).await });
        }
    }))
}

struct Ctx {
    leases: ProviderLeases,
    info: NodeInfo,
    audit: Option<Arc<AuditLog>>,
    me: u32,
    bucket: std::sync::Mutex<Option<TokenBucket>>,
    reachability: SharedReachability,
    reload: Option<tokio::sync::mpsc::Sender<ReloadCall>>,
}

impl Ctx {
    fn audit(&self, fields: serde_json::Value) {
        if let Some(a) = &self.audit {
            a.record("admin", fields);
        }
    }

    async fn connection(&self, mut stream: UnixStream) {
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if uid != Some(self.me) {
            self.audit(serde_json::json!({"uid": uid, "outcome": "refused", "reason": "another user"}));
            tracing::warn!(?uid, "admin connection from another user refused");
            let reply = AdminReply::err(format!(
                "refused: uid {} is not the provider's user (uid {})",
                uid.map_or("unknown".into(), |u| u.to_string()),
                self.me
            ));
            let _ = write_reply(&mut stream, &reply).await;
            return;
        }
        let (read, mut write) = stream.split();
        let mut lines = BufReader::new(read.take(MAX_REQUEST as u64 * 16)).lines();
        while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            let reply = self.call(&line).await;
            let mut text = reply.to_line();
            text.push('\n');
            if write.write_all(text.as_bytes()).await.is_err() {
                break;
            }
        }
    }

    async fn call(&self, line: &str) -> AdminReply {
        let allowed = {
            let mut bucket = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            bucket
                .get_or_insert_with(|| TokenBucket::new(RateLimit { per_sec: CALLS_PER_SEC, burst: CALLS_BURST }, now))
                .try_take(1.0, now)
        };
        if !allowed {
            return AdminReply::err("rate limited: too many admin calls; slow down");
        }
        if line.len() > MAX_REQUEST {
            return AdminReply::err(format!("request over {MAX_REQUEST} bytes"));
        }
        let request: AdminRequest = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => return AdminReply::err(format!("not an admin request: {e}")),
        };
        let reply = match self.execute(&request).await {
            Ok(result) => AdminReply::Ok(result),
            Err(e) => AdminReply::Err(e),
        };
        self.audit(serde_json::json!({
            "uid": self.me,
            "cmd": request.name(),
            "request": request,
            "outcome": if reply.is_ok() { "ok" } else { "error" },
            "error": reply.error(),
        }));
        reply
    }

    /// Carries out `request`; the error is the message the operator sees.
    async fn execute(&self, request: &AdminRequest) -> Result<AdminResult, String> {
        let leases = &self.leases;
        let text = |e: &dyn std::fmt::Display| e.to_string();
        let parse_lease = |s: &str| LeaseId::from_hex(s).ok_or_else(|| format!("`{s}` is not a 32-hex-digit lease id"));
        let parse_peer = |s: &str| s.parse::<PeerId>().map_err(|_| format!("`{s}` is not a peer id"));
        Ok(match request {
            AdminRequest::Status => {
                let active = leases.db().active().map_err(|e| text(&e))?;
                AdminResult::Status(StatusReport {
                    node: self.info.clone(),
                    locked: leases.is_locked(),
                    leases_active: active.len(),
                    total: leases.terms().total,
                    free: leases.free_capacity_now(),
                    reachability: self.reachability.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                })
            }
            AdminRequest::Leases => {
                let list = leases.list(1000).map_err(|e| text(&e))?;
                AdminResult::Leases(
                    list.iter()
                        .map(|r| {
                            let transitions = leases.db().transitions(&r.id).unwrap_or_default();
                            let transitions = transitions
                                .into_iter()
                                .map(|(at_unix_ms, state, detail)| Transition { at_unix_ms, state, detail })
                                .collect();
                            LeaseEntry::new(r, transitions)
                        })
                        .collect(),
                )
            }
            AdminRequest::Terminate { lease } => {
                let id = parse_lease(lease)?;
                leases.end(id, "terminated by the operator").await.map_err(|e| text(&e))?;
                AdminResult::Terminated(Terminated { terminated: id.to_hex() })
            }
            AdminRequest::Isolate { lease } => {
                let id = parse_lease(lease)?;
                leases.isolate(id).await.map_err(|e| text(&e))?;
                AdminResult::Isolated(Isolated { isolated: id.to_hex() })
            }
            AdminRequest::Block { peer, reason } => {
                let p = parse_peer(peer)?;
                let ended = leases.block(p, reason).await.map_err(|e| text(&e))?;
                AdminResult::Blocked(Blocked {
                    blocked: p.to_string(),
                    ended_leases: ended.iter().map(|l| l.to_hex()).collect(),
                })
            }
            AdminRequest::Unblock { peer } => {
                let p = parse_peer(peer)?;
                let was_blocked = leases.unblock(p).await.map_err(|e| text(&e))?;
                AdminResult::Unblocked(Unblocked { unblocked: p.to_string(), was_blocked })
            }
            AdminRequest::Blocked => {
                let list = leases.db().blocked().map_err(|e| text(&e))?;
                AdminResult::BlockList(list.iter().map(BlockedPeer::from).collect())
            }
            AdminRequest::PublishBlocklist => {
                let list = leases.signed_block_list().map_err(|e| text(&e))?;
                let published_entries = list.body().entries.len();
                let seq = list.body().seq;
                let network = leases.network().ok_or("no swarm node")?;
                network.publish_block_list(list).await.map_err(|e| text(&e))?;
                AdminResult::Published(Published { published_entries, seq })
            }
            AdminRequest::Lock => {
                leases.set_locked(true);
                AdminResult::Lock(LockState { locked: true })
            }
            AdminRequest::Unlock => {
                leases.set_locked(false);
                AdminResult::Lock(LockState { locked: false })
            }
            AdminRequest::Reload => {
                let daemon = self.reload.as_ref().ok_or("this provider cannot reload its config")?;
                let (reply, answer) = tokio::sync::oneshot::channel();
                daemon.send(reply).await.map_err(|_| "the provider is stopping")?;
                AdminResult::Reloaded(answer.await.map_err(|_| "the provider is stopping")??)
            }
        })
    }
}

async fn write_reply(stream: &mut UnixStream, reply: &AdminReply) -> std::io::Result<()> {
    let mut text = reply.to_line();
    text.push('\n');
    stream.write_all(text.as_bytes()).await
}
