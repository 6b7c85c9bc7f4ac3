//! The daemon's side: `HelperHypervisor` implements `Hypervisor` by asking the VMM
//! helper over its socket, one connection per call (docs/vmm.md "The VMM helper"). A
//! helper that restarted is simply reached again at the next call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixStream;

use super::error::HelperError;
use super::wire::{FrameError, Op, Reply, ReplyBody, Request, SeedHex, StartRequest, VERSION, read_frame, write_frame};
use crate::accel::Accel;
use crate::error::VmmError;
use crate::hypervisor::{Hypervisor, ReconcileReport, RunningVm, VmStatus, VmUsage};
use crate::lease_id::LeaseId;
use crate::spec::{StartStage, VmSpec};

/// A backend that is the VMM helper at `socket`.
#[derive(Clone, Debug)]
pub struct HelperHypervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    socket: PathBuf,
    accel: Accel,
    instance: String,
    images: Vec<String>,
}

impl HelperHypervisor {
    /// Reaches the helper and learns its accelerator; fails with the cause (no helper,
    /// refused, another protocol version).
    pub async fn connect(socket: &Path) -> Result<Self, VmmError> {
        let mut conn = open(socket).await?;
        match call(&mut conn, socket, Op::Hello).await? {
            ReplyBody::Hello { accel, instance, images } => Ok(HelperHypervisor {
                inner: Arc::new(Inner { socket: socket.to_path_buf(), accel, instance, images }),
            }),
            other => Err(unexpected(other)),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.inner.socket
    }

    /// Whether the helper verified and offers the image with this sha256 (hex).
    pub fn offers(&self, sha256: &str) -> bool {
        self.inner.images.iter().any(|i| i == sha256)
    }

    /// The helper instance met at `connect`.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    async fn request(&self, op: Op) -> Result<ReplyBody, VmmError> {
        let mut conn = open(&self.inner.socket).await?;
        call(&mut conn, &self.inner.socket, op).await
    }

    /// The start's exchange: the request, `booting` frames passed on, the final reply.
    async fn start_exchange(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        let socket = &self.inner.socket;
        let req = StartRequest {
            lease: spec.lease_id,
            vcpus: spec.vcpus,
            memory_mib: spec.memory_mib,
            disk_gib: spec.disk_gib,
            image: spec.image.sha256_hex(),
            ssh_user: spec.ssh_user.clone(),
            authorized_key: spec.authorized_key.openssh_line().to_string(),
            host_key_seed: SeedHex(hex::encode(spec.host_key.seed_bytes())),
            slot: spec.network_slot,
            egress: spec.egress,
            cpu_quota: spec.cpu_quota,
            expose: spec.expose.clone(),
        };
        let mut conn = open(socket).await?;
        write_frame(&mut conn, &Request { version: VERSION, op: Op::Start(req) })
            .await
            .map_err(|e| transport(socket, e))?;
        loop {
            match read_reply(&mut conn, socket).await? {
                ReplyBody::Booting => {
                    if let Some(p) = &spec.progress {
                        let _ = p.send(StartStage::Booting);
                    }
                }
                ReplyBody::Started(vm) => return Ok(vm),
                ReplyBody::Error(e) => return Err(e.into_vmm()),
                other => return Err(unexpected(other)),
            }
        }
    }
}

async fn open(socket: &Path) -> Result<UnixStream, VmmError> {
    UnixStream::connect(socket)
        .await
        .map_err(|source| HelperError::Connect { path: socket.to_path_buf(), source }.into())
}

fn transport(socket: &Path, e: FrameError) -> VmmError {
    match e {
        FrameError::Closed => HelperError::Transport {
            path: socket.to_path_buf(),
            reason: "the helper closed the connection before it answered (did it restart?)".into(),
        },
        other => HelperError::Transport { path: socket.to_path_buf(), reason: other.to_string() },
    }
    .into()
}

fn unexpected(reply: ReplyBody) -> VmmError {
    HelperError::BadReply(format!("an unexpected reply: {reply:?}")).into()
}

async fn read_reply(conn: &mut UnixStream, socket: &Path) -> Result<ReplyBody, VmmError> {
    let body = read_frame(conn).await.map_err(|e| transport(socket, e))?;
    let reply: Reply = serde_json::from_slice(&body).map_err(|e| HelperError::BadReply(e.to_string()))?;
    if reply.version != VERSION {
        return Err(HelperError::Version { got: reply.version, want: VERSION }.into());
    }
    Ok(reply.reply)
}

/// One request, one reply; an error reply becomes the error.
async fn call(conn: &mut UnixStream, socket: &Path, op: Op) -> Result<ReplyBody, VmmError> {
    write_frame(conn, &Request { version: VERSION, op }).await.map_err(|e| transport(socket, e))?;
    match read_reply(conn, socket).await? {
        ReplyBody::Error(e) => Err(e.into_vmm()),
        reply => Ok(reply),
    }
}

impl Hypervisor for HelperHypervisor {
    fn accel(&self) -> Accel {
        self.inner.accel
    }

    /// Runs on its own task (dropping the future does not cut the exchange). When the
    /// connection fails mid-start, the helper may have a guest for the lease: it is
    /// asked once to stop it, so that a failed start leaves nothing behind.
    async fn start(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
        let this = self.clone();
        let lease = spec.lease_id;
        let outcome = tokio::spawn(async move {
            let result = this.start_exchange(spec).await;
            if let Err(VmmError::Helper(HelperError::Transport { .. })) = &result {
                let _ = this.stop(lease).await;
            }
            result
        })
        .await;
        outcome.map_err(|e| VmmError::Spawn { lease, reason: format!("start task failed: {e}") })?
    }

    async fn stop(&self, lease: LeaseId) -> Result<(), VmmError> {
        match self.request(Op::Stop { lease }).await? {
            ReplyBody::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
        match self.request(Op::Isolate { lease }).await? {
            ReplyBody::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
        match self.request(Op::Throttle { lease, egress_mbit }).await? {
            ReplyBody::Done => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    async fn status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
        match self.request(Op::Status { lease }).await? {
            ReplyBody::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    async fn usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
        match self.request(Op::Usage { lease }).await? {
            ReplyBody::Usage(u) => Ok(u),
            other => Err(unexpected(other)),
        }
    }

    async fn reconcile(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        match self.request(Op::Reconcile { live: live.to_vec() }).await? {
            ReplyBody::Reconciled(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }
}
