//! The helper's side of the socket: one task per connection; the peer's uid is checked
//! before a byte is read, the frame's size before its body, the version before the rest,
//! then the request against the policy and the ledger; only then does the backend act
//! (docs/vmm.md "The VMM helper").

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use super::ledger::{Amounts, Ledger};
use super::policy::{HelperPolicy, refused};
use super::wire::{
    FrameError, Op, Refusal, Reply, ReplyBody, VERSION, WireError, decode_request, read_frame, write_frame,
};
use crate::hypervisor::{Hypervisor, RunningVm};
use crate::lease_id::LeaseId;
use crate::spec::StartStage;

/// Serves a backend to the daemon.
pub struct HelperServer<H> {
    inner: Arc<Inner<H>>,
}

impl<H> Clone for HelperServer<H> {
    fn clone(&self) -> Self {
        HelperServer { inner: self.inner.clone() }
    }
}

struct Inner<H> {
    hv: H,
    /// Changed only by the operator (`set_limits`, on the helper's SIGHUP).
    policy: RwLock<HelperPolicy>,
    ledger: Mutex<Ledger>,
    /// Random per start of the helper: the daemon can tell a restarted helper.
    instance: String,
}

/// Binds the helper's socket at `path`: a stale socket file is replaced, the socket is
/// made 0660 and given the daemon's group, so that file permissions and the peer
/// credential check both keep other users out.
pub fn bind(path: &Path, group: u32) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_dir() => {
            return Err(io::Error::other(format!("{} is a directory, not a socket", path.display())));
        }
        Ok(_) => std::fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    std::os::unix::fs::chown(path, None, Some(group))?;
    Ok(listener)
}

impl<H: Hypervisor + Clone + 'static> HelperServer<H> {
    /// `adopted`: the guests the backend re-adopted at the helper's start, counted in
    /// the ledger from the first request on.
    pub fn new(hv: H, policy: HelperPolicy, adopted: &[RunningVm]) -> Self {
        let instance = hex::encode(rand::random::<[u8; 8]>());
        let policy = RwLock::new(policy);
        HelperServer {
            inner: Arc::new(Inner { hv, policy, ledger: Mutex::new(Ledger::from_running(adopted)), instance }),
        }
    }

    /// Accepts connections until the listener fails.
    pub async fn serve(self, listener: UnixListener) -> io::Error {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let this = self.clone();
                    tokio::spawn(async move { this.connection(stream).await });
                }
                Err(e) => return e,
            }
        }
    }

    fn policy(&self) -> RwLockReadGuard<'_, HelperPolicy> {
        self.inner.policy.read().unwrap_or_else(|p| p.into_inner())
    }

    /// New totals and egress ceiling from the operator's config (the helper's SIGHUP);
    /// guests already running keep what they have.
    pub fn set_limits(&self, totals: Amounts, egress: crate::spec::EgressPolicy) {
        let mut policy = self.inner.policy.write().unwrap_or_else(|p| p.into_inner());
        policy.totals = totals;
        policy.egress = egress;
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.inner.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the guests hold now.
    pub fn held(&self) -> Amounts {
        self.ledger().total()
    }

    async fn connection(self, mut stream: UnixStream) {
        let uid = match stream.peer_cred() {
            Ok(c) => c.uid(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the peer credentials of a connection: closing it");
                return;
            }
        };
        let checked = self.policy().check_peer(uid);
        if let Err(e) = checked {
            tracing::warn!(uid, "refused a connection from a uid that is not the daemon's");
            send(&mut stream, ReplyBody::Error(e)).await;
            return;
        }
        let body = match read_frame(&mut stream).await {
            Ok(body) => body,
            Err(FrameError::TooLarge { len }) => {
                tracing::warn!(len, "refused a request over the size cap");
                let e = refused(Refusal::TooLarge, FrameError::TooLarge { len }.to_string());
                send(&mut stream, ReplyBody::Error(e)).await;
                return;
            }
            Err(_) => return,
        };
        let request = match decode_request(&body) {
            Ok(r) => r,
            Err((reason, message)) => {
                tracing::warn!(reason = reason.as_str(), %message, "refused a request");
                send(&mut stream, ReplyBody::Error(refused(reason, message))).await;
                return;
            }
        };
        let reply = match request.op {
            Op::Start(req) => return self.start(stream, req).await,
            op => self.act(op).await,
        };
        if let ReplyBody::Error(WireError::Refused { reason, message }) = &reply {
            tracing::warn!(reason = reason.as_str(), %message, "refused a request");
        }
        send(&mut stream, reply).await;
    }

    /// Every request but a start: the lease must be one of the helper's.
    async fn act(&self, op: Op) -> ReplyBody {
        let hv = &self.inner.hv;
        // the refusal for a lease the helper does not hold
        let unknown = |lease: &LeaseId| {
            (!self.ledger().contains(lease))
                .then(|| ReplyBody::Error(refused(Refusal::UnknownLease, format!("lease {lease} has no guest here"))))
        };
        match op {
            Op::Hello => {
                let mut images: Vec<String> = self.policy().images.keys().cloned().collect();
                images.sort();
                ReplyBody::Hello { accel: hv.accel(), instance: self.inner.instance.clone(), images }
            }
            Op::Start(_) => ReplyBody::Error(WireError::Other { message: "start is served by start()".into() }),
            Op::Stop { lease } => {
                if let Some(r) = unknown(&lease) {
                    return r;
                }
                match hv.stop(lease).await {
                    Ok(()) => {
                        self.ledger().release(&lease);
                        ReplyBody::Done
                    }
                    Err(e) => {
                        if matches!(e, crate::VmmError::UnknownLease(_)) {
                            self.ledger().release(&lease);
                        }
                        ReplyBody::Error((&e).into())
                    }
                }
            }
            Op::Isolate { lease } => match unknown(&lease) {
                Some(r) => r,
                None => hv.isolate(lease).await.map_or_else(|e| ReplyBody::Error((&e).into()), |()| ReplyBody::Done),
            },
            Op::Throttle { lease, egress_mbit } => {
                if let Some(r) = unknown(&lease) {
                    return r;
                }
                let checked = self.policy().check_throttle(egress_mbit);
                if let Err(e) = checked {
                    return ReplyBody::Error(e);
                }
                hv.throttle(lease, egress_mbit)
                    .await
                    .map_or_else(|e| ReplyBody::Error((&e).into()), |()| ReplyBody::Done)
            }
            Op::Status { lease } => match unknown(&lease) {
                Some(r) => r,
                None => hv.status(lease).await.map_or_else(|e| ReplyBody::Error((&e).into()), ReplyBody::Status),
            },
            Op::Usage { lease } => match unknown(&lease) {
                Some(r) => r,
                None => hv.usage(lease).await.map_or_else(|e| ReplyBody::Error((&e).into()), ReplyBody::Usage),
            },
            Op::Reconcile { live } => match hv.reconcile(&live).await {
                Ok(report) => {
                    self.ledger().replace(&report.adopted);
                    ReplyBody::Reconciled(report)
                }
                Err(e) => ReplyBody::Error((&e).into()),
            },
        }
    }

    /// A start: checked, reserved in the ledger, run on its own task; `booting` is sent
    /// when QEMU runs. A guest whose daemon is gone when it is ready (the reply cannot be
    /// written) is stopped: nobody would grant it.
    async fn start(self, mut stream: UnixStream, req: super::wire::StartRequest) {
        let lease = req.lease;
        let checked = self.policy().spec(&req);
        let mut spec = match checked {
            Ok(spec) => spec,
            Err(e) => {
                if let WireError::Refused { reason, message } = &e {
                    tracing::warn!(%lease, reason = reason.as_str(), %message, "refused a start");
                }
                send(&mut stream, ReplyBody::Error(e)).await;
                return;
            }
        };
        let reserved = {
            let mut ledger = self.ledger();
            if ledger.contains(&lease) {
                Err(WireError::LeaseExists { lease })
            } else {
                let amounts = Amounts::new(req.vcpus, req.memory_mib, req.disk_gib);
                let totals = self.policy().totals;
                ledger.reserve(lease, amounts, &totals).map_err(|m| refused(Refusal::Resources, m))
            }
        };
        if let Err(e) = reserved {
            tracing::warn!(%lease, error = ?e, "refused a start");
            send(&mut stream, ReplyBody::Error(e)).await;
            return;
        }
        let (progress, mut stage) = watch::channel(StartStage::Provisioning);
        spec.progress = Some(progress);
        let hv = self.inner.hv.clone();
        let mut task = tokio::spawn(async move { hv.start(spec).await });
        let mut told_booting = false;
        let outcome = loop {
            // biased: a start that reached booting says so before its final reply
            tokio::select! {
                biased;
                changed = stage.changed(), if !told_booting => {
                    if changed.is_err() || *stage.borrow() == StartStage::Booting {
                        told_booting = true;
                    }
                    if changed.is_ok() && *stage.borrow() == StartStage::Booting {
                        send(&mut stream, ReplyBody::Booting).await;
                    }
                }
                joined = &mut task => break joined,
            }
        };
        match outcome {
            Ok(Ok(vm)) => {
                if !send(&mut stream, ReplyBody::Started(vm)).await {
                    tracing::warn!(%lease, "the daemon left before its guest was ready: stopping the guest");
                    match self.inner.hv.stop(lease).await {
                        Ok(()) => self.ledger().release(&lease),
                        Err(e) => tracing::error!(%lease, error = %e, "cannot stop the unclaimed guest"),
                    }
                }
            }
            Ok(Err(e)) => {
                self.ledger().release(&lease);
                send(&mut stream, ReplyBody::Error((&e).into())).await;
            }
            Err(e) => {
                self.ledger().release(&lease);
                send(
                    &mut stream,
                    ReplyBody::Error(WireError::Other { message: format!("the start task failed: {e}") }),
                )
                .await;
            }
        }
    }
}

/// Writes a reply frame; whether it was written.
async fn send(stream: &mut UnixStream, reply: ReplyBody) -> bool {
    write_frame(stream, &Reply { version: VERSION, reply }).await.is_ok()
}

#[cfg(test)]
mod tests {
    //! The helper's refusals over a real socket, against a backend that only records
    //! what reaches it: a refused request must reach nothing. The real backend's path
    //! is proven by node/tests/privsep_cli.rs (root, a real guest).
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::{Duration, SystemTime};

    use tokio::io::AsyncWriteExt;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::accel::Accel;
    use crate::error::VmmError;
    use crate::helper::HelperHypervisor;
    use crate::helper::policy::one_file_image;
    use crate::helper::wire::{MAX_FRAME, Request, SeedHex, StartRequest};
    use crate::hypervisor::{ReconcileReport, VmStatus, VmUsage};
    use crate::spec::{EgressPolicy, HostKeySeed, VmSpec};

    /// Records every call; a start waits for a permit when `gate` is set.
    #[derive(Clone, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<String>>>,
        gate: Option<Arc<Semaphore>>,
    }

    impl Recorder {
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
        fn note(&self, s: String) {
            self.calls.lock().unwrap().push(s);
        }
    }

    impl Hypervisor for Recorder {
        fn accel(&self) -> Accel {
            Accel::Tcg
        }
        async fn start(&self, spec: VmSpec) -> Result<RunningVm, VmmError> {
            self.note(format!("start {}", spec.lease_id));
            if let Some(p) = &spec.progress {
                let _ = p.send(StartStage::Booting);
            }
            if let Some(g) = &self.gate {
                let _ = g.acquire().await;
            }
            Ok(RunningVm {
                lease_id: spec.lease_id,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_gib: spec.disk_gib,
                pid: 1,
                accel: Accel::Tcg,
                ssh_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 2222)),
                guest_ip: Ipv4Addr::new(10, 0, 0, 2),
                exposed: Vec::new(),
                host_key: spec.host_key.public_openssh(),
                started_at: SystemTime::UNIX_EPOCH,
                boot_time: Some(Duration::from_secs(1)),
            })
        }
        async fn stop(&self, lease: LeaseId) -> Result<(), VmmError> {
            self.note(format!("stop {lease}"));
            Ok(())
        }
        async fn isolate(&self, lease: LeaseId) -> Result<(), VmmError> {
            self.note(format!("isolate {lease}"));
            Ok(())
        }
        async fn throttle(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
            self.note(format!("throttle {lease} {egress_mbit}"));
            Ok(())
        }
        async fn status(&self, lease: LeaseId) -> Result<VmStatus, VmmError> {
            self.note(format!("status {lease}"));
            Err(VmmError::UnknownLease(lease))
        }
        async fn usage(&self, lease: LeaseId) -> Result<VmUsage, VmmError> {
            self.note(format!("usage {lease}"));
            Ok(VmUsage::default())
        }
        async fn reconcile(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
            self.note(format!("reconcile {}", live.len()));
            Ok(ReconcileReport::default())
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        socket: std::path::PathBuf,
        hv: Recorder,
        image: String,
    }

    fn my_ids() -> (u32, u32) {
        // SAFETY: getuid(2) and getgid(2) cannot fail
        unsafe { (libc::getuid(), libc::getgid()) }
    }

    /// A helper on a socket in a temporary directory, letting `daemon_uid` in; 2 vCPUs,
    /// 1 GiB and 10 GiB on the host.
    async fn helper(daemon_uid: u32, gate: Option<Arc<Semaphore>>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let image = one_file_image(dir.path());
        let sha = image.sha256_hex();
        let policy = HelperPolicy::new(daemon_uid, [image], Amounts::new(2, 1024, 10), EgressPolicy::Deny, 8);
        let hv = Recorder { gate, ..Default::default() };
        let socket = dir.path().join("vmm.sock");
        let listener = bind(&socket, my_ids().1).unwrap();
        tokio::spawn(HelperServer::new(hv.clone(), policy, &[]).serve(listener));
        Setup { _dir: dir, socket, hv, image: sha }
    }

    fn start_req(lease: u8, vcpus: u32, image: &str) -> StartRequest {
        StartRequest {
            lease: LeaseId::from_bytes([lease; 16]),
            vcpus,
            memory_mib: 256,
            disk_gib: 1,
            image: image.into(),
            ssh_user: "peervm".into(),
            authorized_key: HostKeySeed::from_bytes([9; 32]).public_openssh(),
            host_key_seed: SeedHex("01".repeat(32)),
            slot: u32::from(lease),
            egress: EgressPolicy::Deny,
            cpu_quota: None,
            expose: Vec::new(),
        }
    }

    /// Sends raw bytes, returns the helper's replies up to the final one (`booting`
    /// frames first).
    async fn exchange_all(socket: &Path, bytes: &[u8]) -> Vec<ReplyBody> {
        let mut s = UnixStream::connect(socket).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut replies = Vec::new();
        loop {
            let body = read_frame(&mut s).await.unwrap();
            let reply = serde_json::from_slice::<Reply>(&body).unwrap().reply;
            let last = reply != ReplyBody::Booting;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    /// The final reply.
    async fn exchange(socket: &Path, bytes: &[u8]) -> ReplyBody {
        exchange_all(socket, bytes).await.pop().unwrap()
    }

    async fn request_all(socket: &Path, op: Op) -> Vec<ReplyBody> {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request { version: VERSION, op }).await.unwrap();
        exchange_all(socket, &buf).await
    }

    async fn request(socket: &Path, op: Op) -> ReplyBody {
        request_all(socket, op).await.pop().unwrap()
    }

    fn refusal(reply: ReplyBody) -> Refusal {
        match reply {
            ReplyBody::Error(WireError::Refused { reason, .. }) => reason,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_connection_from_another_uid_is_refused_before_its_request_is_read() {
        let h = helper(my_ids().0 + 1, None).await;
        let r = request(&h.socket, Op::Start(start_req(1, 1, &h.image))).await;
        assert_eq!(refusal(r), Refusal::PeerUid);
        let e = HelperHypervisor::connect(&h.socket).await.unwrap_err().to_string();
        assert!(e.contains("peer_uid") && e.contains("may not use the VMM helper"), "{e}");
        assert!(h.hv.calls().is_empty(), "{:?}", h.hv.calls());
    }

    #[tokio::test]
    async fn a_request_over_the_size_cap_or_of_another_version_is_refused() {
        let h = helper(my_ids().0, None).await;
        let mut big = ((MAX_FRAME + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"{\"version\":1");
        assert_eq!(refusal(exchange(&h.socket, &big).await), Refusal::TooLarge);
        let mut v2 = Vec::new();
        write_frame(&mut v2, &serde_json::json!({"version": 2, "op": "hello"})).await.unwrap();
        assert_eq!(refusal(exchange(&h.socket, &v2).await), Refusal::Version);
        assert!(h.hv.calls().is_empty(), "{:?}", h.hv.calls());
    }

    #[tokio::test]
    async fn a_bad_name_an_unknown_image_too_much_or_an_unknown_lease_reaches_nothing() {
        let h = helper(my_ids().0, None).await;
        let bad_user = StartRequest { ssh_user: "../root".into(), ..start_req(1, 1, &h.image) };
        assert_eq!(refusal(request(&h.socket, Op::Start(bad_user)).await), Refusal::BadName);
        let unknown = start_req(1, 1, &"0".repeat(64));
        assert_eq!(refusal(request(&h.socket, Op::Start(unknown)).await), Refusal::UnknownImage);
        assert_eq!(refusal(request(&h.socket, Op::Start(start_req(1, 3, &h.image))).await), Refusal::Resources);
        let lease = LeaseId::from_bytes([7; 16]);
        for op in [
            Op::Stop { lease },
            Op::Isolate { lease },
            Op::Throttle { lease, egress_mbit: 1 },
            Op::Status { lease },
            Op::Usage { lease },
        ] {
            assert_eq!(refusal(request(&h.socket, op).await), Refusal::UnknownLease);
        }
        assert!(h.hv.calls().is_empty(), "{:?}", h.hv.calls());
    }

    #[tokio::test]
    async fn a_throttle_that_would_not_slow_a_guest_down_reaches_nothing() {
        let h = helper(my_ids().0, None).await;
        let client = HelperHypervisor::connect(&h.socket).await.unwrap();
        let lease = LeaseId::from_bytes([1; 16]);
        assert!(matches!(request(&h.socket, Op::Start(start_req(1, 1, &h.image))).await, ReplyBody::Started(_)));
        for egress_mbit in [0, crate::helper::policy::MAX_THROTTLE_MBIT + 1] {
            assert_eq!(refusal(request(&h.socket, Op::Throttle { lease, egress_mbit }).await), Refusal::Throttle);
        }
        let e = client.throttle(lease, 0).await.unwrap_err().to_string();
        assert!(e.contains("throttle") && e.contains("0 Mbit/s"), "{e}");
        assert!(!h.hv.calls().iter().any(|c| c.starts_with("throttle")), "{:?}", h.hv.calls());
        client.throttle(lease, 2).await.unwrap();
        assert!(h.hv.calls().contains(&format!("throttle {lease} 2")), "{:?}", h.hv.calls());
    }

    #[tokio::test]
    async fn guests_together_stay_within_the_host_totals_through_the_client() {
        let h = helper(my_ids().0, None).await;
        let client = HelperHypervisor::connect(&h.socket).await.unwrap();
        assert_eq!(client.accel(), Accel::Tcg);
        assert!(client.offers(&h.image));
        let a = request_all(&h.socket, Op::Start(start_req(1, 2, &h.image))).await;
        assert!(matches!(a.as_slice(), [ReplyBody::Booting, ReplyBody::Started(_)]), "{a:?}");
        let b = request(&h.socket, Op::Start(start_req(2, 1, &h.image))).await;
        assert_eq!(refusal(b), Refusal::Resources, "2 of 2 vCPUs are held");
        client.stop(LeaseId::from_bytes([1; 16])).await.unwrap();
        // with the first guest stopped, the second fits; started through the client
        let dir = tempfile::tempdir().unwrap();
        let spec = client_spec(one_file_image(dir.path()), 2);
        let (tx, rx) = tokio::sync::watch::channel(StartStage::Provisioning);
        let vm = client.start(VmSpec { progress: Some(tx), ..spec }).await.unwrap();
        assert_eq!((vm.lease_id, vm.vcpus), (LeaseId::from_bytes([2; 16]), 1));
        assert_eq!(*rx.borrow(), StartStage::Booting, "the client passed booting on");
        let again = client.start(client_spec(one_file_image(dir.path()), 2)).await.unwrap_err();
        assert!(matches!(again, VmmError::LeaseExists(_)), "{again}");
        let calls = h.hv.calls();
        assert_eq!(calls.iter().filter(|c| c.starts_with("start")).count(), 2, "{calls:?}");
    }

    fn client_spec(image: Arc<crate::image::GuestImage>, lease: u8) -> VmSpec {
        VmSpec {
            lease_id: LeaseId::from_bytes([lease; 16]),
            vcpus: 1,
            memory_mib: 256,
            disk_gib: 1,
            image,
            ssh_user: "peervm".into(),
            authorized_key: crate::spec::AuthorizedKey::parse(&HostKeySeed::from_bytes([9; 32]).public_openssh())
                .unwrap(),
            host_key: HostKeySeed::from_bytes([4; 32]),
            network_slot: u32::from(lease),
            egress: EgressPolicy::Deny,
            expose: Vec::new(),
            cpu_quota: None,
            progress: None,
        }
    }

    #[tokio::test]
    async fn a_guest_whose_daemon_left_mid_start_is_stopped() {
        let gate = Arc::new(Semaphore::new(0));
        let h = helper(my_ids().0, Some(gate.clone())).await;
        let mut s = UnixStream::connect(&h.socket).await.unwrap();
        write_frame(&mut s, &Request { version: VERSION, op: Op::Start(start_req(3, 1, &h.image)) }).await.unwrap();
        // the start is under way once the helper says booting; then the daemon goes
        let body = read_frame(&mut s).await.unwrap();
        assert_eq!(serde_json::from_slice::<Reply>(&body).unwrap().reply, ReplyBody::Booting);
        drop(s);
        gate.add_permits(1);
        let lease = LeaseId::from_bytes([3; 16]);
        let stopped = format!("stop {lease}");
        for _ in 0..2000 {
            if h.hv.calls().contains(&stopped) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(h.hv.calls().contains(&stopped), "{:?}", h.hv.calls());
        // and its amounts are free again
        assert!(matches!(request(&h.socket, Op::Start(start_req(4, 2, &h.image))).await, ReplyBody::Started(_)));
    }
}
