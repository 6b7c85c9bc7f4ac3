//! The provider's admin API (DESIGN section 10): a Unix socket, created 0600 inside the
//! 0700 data directory, that answers only connections from the provider's own user (the
//! kernel's peer credentials, checked on every connection), one JSON request and one
//! JSON reply per line. Never on TCP. Every call is rate limited and audited.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use peervm_protocol::LeaseId;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::network::rate_limit::TokenBucket;
use crate::provider::ProviderLeases;
use crate::provider::audit::AuditLog;
use crate::provider::reachability::SharedReachability;

/// A request line is small; anything longer is refused.
const MAX_REQUEST: usize = 4096;
/// Admin calls per second (burst 20): an operator's scripts, not a flood.
const CALLS_PER_SEC: f64 = 10.0;
const CALLS_BURST: f64 = 20.0;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    Status,
    Leases,
    Terminate { lease: String },
    Isolate { lease: String },
    Block { peer: String, reason: String },
    Unblock { peer: String },
    Blocked,
    Lock,
    Unlock,
    PublishBlocklist,
}

impl AdminRequest {
    fn name(&self) -> &'static str {
        match self {
            AdminRequest::Status => "status",
            AdminRequest::Leases => "leases",
            AdminRequest::Terminate { .. } => "terminate",
            AdminRequest::Isolate { .. } => "isolate",
            AdminRequest::Block { .. } => "block",
            AdminRequest::Unblock { .. } => "unblock",
            AdminRequest::Blocked => "blocked",
            AdminRequest::Lock => "lock",
            AdminRequest::Unlock => "unlock",
            AdminRequest::PublishBlocklist => "publish_blocklist",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl AdminReply {
    fn ok(result: serde_json::Value) -> Self {
        AdminReply { ok: true, error: None, result }
    }

    fn err(e: impl std::fmt::Display) -> Self {
        AdminReply { ok: false, error: Some(e.to_string()), result: serde_json::Value::Null }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot listen on the admin socket {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error(
        "cannot reach the provider's admin socket {path}: {source} (is `peervm provider run` running with this data dir, as this user?)"
    )]
    Connect { path: PathBuf, source: std::io::Error },
    #[error("admin socket {path}: {reason}")]
    Protocol { path: PathBuf, reason: String },
}

/// The socket of a provider's data directory.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.sock")
}

/// What `status` reports besides the leases.
#[derive(Debug, Clone, Serialize)]
pub struct NodeInfo {
    pub peer_id: String,
    pub listen_addrs: Vec<String>,
    pub accel: String,
}

/// Binds the socket (mode 0600 from creation: the umask is narrowed around `bind`) and
/// serves it in the background.
pub fn serve(
    path: &Path,
    leases: ProviderLeases,
    info: NodeInfo,
    audit: Option<Arc<AuditLog>>,
    reachability: SharedReachability,
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
    let ctx = Arc::new(Ctx { leases, info, audit, me, bucket: std::sync::Mutex::new(None), reachability });
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
            let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{\"ok\":false}".into());
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
            bucket.get_or_insert_with(|| TokenBucket::new(CALLS_PER_SEC, CALLS_BURST, now)).try_take(1.0, now)
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
        let reply = self.execute(&request).await;
        self.audit(serde_json::json!({
            "uid": self.me,
            "cmd": request.name(),
            "request": request,
            "outcome": if reply.ok { "ok" } else { "error" },
            "error": reply.error,
        }));
        reply
    }

    async fn execute(&self, request: &AdminRequest) -> AdminReply {
        let leases = &self.leases;
        let parse_lease = |s: &str| LeaseId::from_hex(s).ok_or_else(|| format!("`{s}` is not a 32-hex-digit lease id"));
        let parse_peer = |s: &str| s.parse::<PeerId>().map_err(|_| format!("`{s}` is not a peer id"));
        match request {
            AdminRequest::Status => {
                let active = match leases.db().active() {
                    Ok(a) => a,
                    Err(e) => return AdminReply::err(e),
                };
                let free = leases.free_capacity_now();
                AdminReply::ok(serde_json::json!({
                    "node": self.info,
                    "locked": leases.is_locked(),
                    "leases_active": active.len(),
                    "total": leases.terms().total,
                    "free": free,
                    "reachability": self.reachability.lock().unwrap_or_else(|p| p.into_inner()).clone(),
                }))
            }
            AdminRequest::Leases => match leases.list(1000) {
                Ok(list) => AdminReply::ok(serde_json::Value::Array(
                    list.iter()
                        .map(|r| {
                            let mut v = lease_json(r);
                            let transitions = leases.db().transitions(&r.id).unwrap_or_default();
                            v["transitions"] = transitions
                                .iter()
                                .map(|(at, state, detail)| {
                                    serde_json::json!({
                                        "at_unix_ms": at,
                                        "state": state.as_str(),
                                        "detail": detail,
                                    })
                                })
                                .collect();
                            v
                        })
                        .collect(),
                )),
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::Terminate { lease } => match parse_lease(lease) {
                Ok(id) => match leases.end(id, "terminated by the operator").await {
                    Ok(()) => AdminReply::ok(serde_json::json!({"terminated": id.to_hex()})),
                    Err(e) => AdminReply::err(e),
                },
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::Isolate { lease } => match parse_lease(lease) {
                Ok(id) => match leases.isolate(id).await {
                    Ok(()) => AdminReply::ok(serde_json::json!({"isolated": id.to_hex()})),
                    Err(e) => AdminReply::err(e),
                },
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::Block { peer, reason } => match parse_peer(peer) {
                Ok(p) => match leases.block(p, reason).await {
                    Ok(ended) => AdminReply::ok(serde_json::json!({
                        "blocked": p.to_string(),
                        "ended_leases": ended.iter().map(|l| l.to_hex()).collect::<Vec<_>>(),
                    })),
                    Err(e) => AdminReply::err(e),
                },
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::Unblock { peer } => match parse_peer(peer) {
                Ok(p) => match leases.unblock(p).await {
                    Ok(was) => AdminReply::ok(serde_json::json!({"unblocked": p.to_string(), "was_blocked": was})),
                    Err(e) => AdminReply::err(e),
                },
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::Blocked => match leases.db().blocked() {
                Ok(list) => AdminReply::ok(serde_json::Value::Array(
                    list.iter()
                        .map(|b| serde_json::json!({"peer": b.peer.to_string(), "reason": b.reason, "at_unix_ms": b.at_unix_ms}))
                        .collect(),
                )),
                Err(e) => AdminReply::err(e),
            },
            AdminRequest::PublishBlocklist => {
                let list = match leases.signed_block_list() {
                    Ok(l) => l,
                    Err(e) => return AdminReply::err(e),
                };
                let entries = list.body().entries.len();
                let seq = list.body().seq;
                let Some(network) = leases.network() else { return AdminReply::err("no swarm node") };
                match network.publish_block_list(list).await {
                    Ok(()) => AdminReply::ok(serde_json::json!({"published_entries": entries, "seq": seq})),
                    Err(e) => AdminReply::err(e),
                }
            }
            AdminRequest::Lock => {
                leases.set_locked(true);
                AdminReply::ok(serde_json::json!({"locked": true}))
            }
            AdminRequest::Unlock => {
                leases.set_locked(false);
                AdminReply::ok(serde_json::json!({"locked": false}))
            }
        }
    }
}

fn lease_json(r: &crate::provider::lease::db::LeaseRecord) -> serde_json::Value {
    serde_json::json!({
        "lease": r.id.to_hex(),
        "requestor": r.requestor.to_string(),
        "state": r.state.as_str(),
        "vcpus": r.spec.vcpus,
        "memory_mib": r.spec.memory_mib,
        "disk_gib": r.spec.disk_gib,
        "image": r.spec.image_name,
        "slot": r.slot,
        "price_per_hour_micros": r.price_per_hour_micros,
        "currency": r.currency,
        "requested_at_unix_ms": r.requested_at_unix_ms,
        "started_at_unix_ms": r.started_at_unix_ms,
        "ends_at_unix_ms": r.ends_at_unix_ms,
        "isolated": r.isolated,
        "detail": r.detail,
    })
}

async fn write_reply(stream: &mut UnixStream, reply: &AdminReply) -> std::io::Result<()> {
    let mut text = serde_json::to_string(reply).unwrap_or_default();
    text.push('\n');
    stream.write_all(text.as_bytes()).await
}

/// Sends one request to the provider at `path` and returns its reply.
pub async fn call(path: &Path, request: &AdminRequest) -> Result<AdminReply, AdminError> {
    let protocol = |reason: String| AdminError::Protocol { path: path.to_path_buf(), reason };
    let mut stream =
        UnixStream::connect(path).await.map_err(|source| AdminError::Connect { path: path.to_path_buf(), source })?;
    let mut line = serde_json::to_string(request).map_err(|e| protocol(e.to_string()))?;
    line.push('\n');
    // A refused connection is answered and closed at once: the write can then fail,
    // and the refusal is still there to read.
    let written = stream.write_all(line.as_bytes()).await;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), reader.read_line(&mut answer))
        .await
        .map_err(|_| protocol("no answer within 120 s".into()))?;
    if answer.trim().is_empty() {
        let reason = match (written, read) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            _ => "the provider closed the connection without an answer".into(),
        };
        return Err(protocol(reason));
    }
    serde_json::from_str(answer.trim()).map_err(|e| protocol(format!("bad answer {answer:?}: {e}")))
}
