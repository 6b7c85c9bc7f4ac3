//! The start of an admitted lease's guest, each state committed before the step it names:
//! `provisioning` before the hypervisor starts, `booting` as QEMU is spawned, `running`
//! once the guest's sshd presents the per-lease host key; then the signed grant
//! (docs/architecture.md, "Leases", step 4). A lease ended while it started is stopped
//! here when the start returns.

use std::sync::Arc;

use peervm_protocol::{DenyReason, ExposedPort, LeaseState, ReplyOutcome, SshAccess};
use peervm_vmm::{AuthorizedKey, GuestImage, HostKeySeed, Hypervisor, StartStage, VmSpec, VmmError};
use tokio::sync::watch;

use super::db::{DbError, LeaseRecord};
use super::denial::{Denial, deny, internal};
use super::manager::{LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    pub(super) async fn start_guest(
        &self,
        record: LeaseRecord,
        image: Arc<GuestImage>,
        duration_secs: u64,
    ) -> Result<ReplyOutcome, Denial> {
        let inner = &self.inner;
        let id = record.id;
        inner.db.set_state(&id, LeaseState::Provisioning, "", self.now()).map_err(internal)?;
        let host_key = HostKeySeed::from_bytes(record.host_key_seed);
        let host_key_raw = host_key.public_raw();
        let spec = VmSpec {
            lease_id: vmm_id(&id),
            vcpus: record.spec.vcpus,
            memory_mib: u32::try_from(record.spec.memory_mib).unwrap_or(u32::MAX),
            disk_gib: u32::try_from(record.spec.disk_gib).unwrap_or(u32::MAX),
            image,
            ssh_user: record.ssh_user.clone(),
            authorized_key: AuthorizedKey::from_ed25519(&record.ssh_public_key, "peervm-lease")
                .map_err(|e| deny(DenyReason::InvalidSpec, e.to_string()))?,
            host_key,
            network_slot: record.slot,
            egress: self.terms().egress,
            expose: record.spec.expose.clone(),
            cpu_quota: None,
            progress: None,
        };
        let (progress_tx, mut progress_rx) = watch::channel(StartStage::Provisioning);
        let spec = VmSpec { progress: Some(progress_tx), ..spec };
        // Record the move to booting as it happens, so status shows the stage.
        let db_watch = {
            let this = self.clone();
            tokio::spawn(async move {
                while progress_rx.changed().await.is_ok() {
                    if *progress_rx.borrow() == StartStage::Booting {
                        // Refused (Overtaken) when the lease was stopped meanwhile: the
                        // check after start below sees that and stops the guest.
                        let _ = this.inner.db.set_state(&id, LeaseState::Booting, "", this.now());
                        break;
                    }
                }
            })
        };
        let started = inner.hv.start(spec).await;
        let _ = db_watch.await;
        let vm = match started {
            Ok(vm) => vm,
            Err(e) => {
                tracing::warn!(lease = %id, error = %e, "guest failed to start");
                let detail = format!("the guest failed to start: {e}");
                let _ = inner.db.set_state(&id, LeaseState::Failed, &detail, self.now());
                let _ = self.refresh_capacity();
                return Err(start_failure(&e, &record.spec.image_name, detail));
            }
        };
        // Ended while it booted (the requestor or the operator terminated it)?
        let current = inner.db.get(&id).map_err(internal)?.map(|r| r.state);
        if current != Some(LeaseState::Provisioning) && current != Some(LeaseState::Booting) {
            self.finish_stop(id, "terminated while starting").await;
            return Err(deny(DenyReason::LeaseEnded, "the lease was terminated while its guest started"));
        }
        let started_at = self.now();
        let ends_at = started_at.saturating_add(duration_secs.saturating_mul(1000));
        match inner.db.set_running(&id, started_at, ends_at, started_at) {
            Ok(()) => {}
            // Terminated between the check above and this write.
            Err(DbError::Overtaken { .. } | DbError::Finished { .. }) => {
                self.finish_stop(id, "terminated while starting").await;
                return Err(deny(DenyReason::LeaseEnded, "the lease was terminated while its guest started"));
            }
            Err(e) => return Err(internal(e)),
        }
        inner.metrics.leases_started.inc();
        tracing::info!(lease = %id, port = vm.ssh_addr.port(), boot_ms = vm.boot_time.map(|d| d.as_millis() as u64),
            "lease running");
        Ok(ReplyOutcome::Granted {
            access: SshAccess { host: self.terms().ssh_host.clone(), port: vm.ssh_addr.port(), user: record.ssh_user },
            host_key: host_key_raw,
            started_at_unix_ms: started_at,
            ends_at_unix_ms: ends_at,
            price_per_hour_micros: record.price_per_hour_micros,
            currency: record.currency,
            exposed: vm
                .exposed
                .iter()
                .map(|(guest_port, host_port)| ExposedPort { guest_port: *guest_port, host_port: *host_port })
                .collect(),
        })
    }
}

/// The denial for a guest that did not start. A guest that ran but never became ready
/// (QEMU refused or quit the image, no sshd with the lease's key by the image's boot
/// deadline) is `boot_failed`, with a short detail for the requestor: the console tail
/// and the host paths stay in the provider's log and lease record. Anything else
/// (a host resource, the image changed on disk) is the provider's own failure.
fn start_failure(e: &VmmError, image: &str, detail: String) -> Denial {
    let why = match e {
        VmmError::QemuExited { status, .. } => format!("QEMU stopped before the guest was ready ({status})"),
        VmmError::NotReady { waited_secs, .. } => {
            format!(
                "no SSH server with the lease's host key answered within {waited_secs} s (the image's boot deadline)"
            )
        }
        VmmError::HostKeyMismatch { .. } => "the guest's SSH server presented another host key than the lease's".into(),
        _ => return deny(DenyReason::Internal, detail),
    };
    deny(DenyReason::BootFailed, format!("the guest of image `{image}` did not boot: {why}"))
}

#[cfg(test)]
mod tests {
    use peervm_protocol::{DenyReason, LeaseState, ReplyOutcome};
    use peervm_vmm::{HostKeySeed, LeaseId, VmmError};

    use super::super::fake_hypervisor::{Committed, Op};
    use super::super::manager::vmm_id;
    use super::super::test_harness::{Harness, T0, denial};

    #[tokio::test]
    async fn the_grant_carries_the_provisioned_host_key_the_slot_port_the_times_and_the_price() {
        let h = Harness::new();
        let req = h.request();
        let outcome = h.send_request(&req).await;
        let record = h.record(req.lease_id);
        let provisioned = HostKeySeed::from_bytes(record.host_key_seed);
        match outcome {
            ReplyOutcome::Granted {
                access,
                host_key,
                started_at_unix_ms,
                ends_at_unix_ms,
                price_per_hour_micros,
                currency,
                exposed,
            } => {
                assert!(exposed.is_empty(), "nothing asked, nothing exposed: {exposed:?}");
                assert_eq!(
                    (access.host.as_str(), access.port, access.user.as_str()),
                    ("provider.example", 22_000, "alice")
                );
                assert_eq!(host_key, provisioned.public_raw(), "the key the guest was provisioned with");
                assert_eq!((started_at_unix_ms, ends_at_unix_ms), (T0, T0 + 3_600_000));
                assert_eq!((price_per_hour_micros, currency.as_str()), (1138, "EUR"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(record.state, LeaseState::Running);
        assert_eq!((record.started_at_unix_ms, record.ends_at_unix_ms), (Some(T0), T0 + 3_600_000));
        assert!(h.hv.is_running(vmm_id(&req.lease_id)));
    }

    #[tokio::test]
    async fn provisioning_is_committed_before_the_hypervisor_starts_and_running_after() {
        let h = Harness::new();
        let id = h.grant().await;
        let starts = h.hv.calls_of(Op::Start);
        assert_eq!(starts.len(), 1);
        assert_eq!(starts[0].lease, Some(vmm_id(&id)));
        assert_eq!(starts[0].committed, Some(Committed { state: LeaseState::Provisioning, isolated: false }));
        assert_eq!(
            h.states(id),
            [LeaseState::Requested, LeaseState::Provisioning, LeaseState::Booting, LeaseState::Running]
        );
    }

    #[tokio::test]
    async fn a_guest_that_fails_to_start_fails_its_lease_and_frees_its_capacity_and_slot() {
        let h = Harness::new();
        h.hv.fail_start(true);
        let req = h.request();
        let outcome = h.send_request(&req).await;
        let (reason, detail) = denial(&outcome);
        assert_eq!(reason, DenyReason::Internal);
        assert!(detail.starts_with("the guest failed to start: "), "{detail}");
        let record = h.record(req.lease_id);
        assert_eq!(record.state, LeaseState::Failed);
        assert_eq!(record.detail, detail);
        assert_eq!(h.manager.free_capacity_now(), h.terms.total);
        h.hv.fail_start(false);
        match h.send_request(&h.request()).await {
            ReplyOutcome::Granted { access, .. } => assert_eq!(access.port, 22_000, "slot 0 is free again"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_guest_that_never_becomes_ready_is_boot_failed_with_a_detail_free_of_host_details() {
        let h = Harness::new();
        type Case = (fn(LeaseId) -> VmmError, &'static str);
        let cases: [Case; 3] = [
            (
                |lease| VmmError::NotReady {
                    lease,
                    waited_secs: 20,
                    last_error: "connect 10.0.0.2:22: refused".into(),
                },
                "within 20 s",
            ),
            (
                |lease| VmmError::QemuExited {
                    lease,
                    status: "exit status: 1".into(),
                    console: "qemu: could not load kernel '/var/cache/peervm/images/x/vmlinuz'".into(),
                },
                "QEMU stopped before the guest was ready (exit status: 1)",
            ),
            (
                |lease| VmmError::HostKeyMismatch { lease, presented: "ssh-ed25519 AAAA".into(), expected: "x".into() },
                "another host key",
            ),
        ];
        for (error, says) in cases {
            h.hv.fail_boot(Some(error));
            let req = h.request();
            let outcome = h.send_request(&req).await;
            let (reason, detail) = denial(&outcome);
            assert_eq!(reason, DenyReason::BootFailed, "{detail}");
            assert!(detail.starts_with("the guest of image `tiny` did not boot: "), "{detail}");
            assert!(detail.contains(says), "{detail}");
            for host_detail in ["10.0.0.2", "/var/cache", "AAAA"] {
                assert!(!detail.contains(host_detail), "{detail}");
            }
            // the provider's own record keeps the whole error
            let record = h.record(req.lease_id);
            assert_eq!(record.state, LeaseState::Failed);
            assert!(record.detail.starts_with("the guest failed to start: "), "{}", record.detail);
            assert_eq!(h.manager.free_capacity_now(), h.terms.total);
        }
        h.hv.fail_boot(None);
        assert!(matches!(h.send_request(&h.request()).await, ReplyOutcome::Granted { .. }), "the next lease runs");
    }

    #[tokio::test]
    async fn a_lease_ended_while_its_guest_starts_is_stopped_when_the_start_returns() {
        let h = Harness::build(|_| {}, |hv| hv.hold_starts());
        let req = h.request();
        let id = req.lease_id;
        let (outcome, ()) = tokio::join!(h.send_request(&req), async {
            h.hv.start_entered().await;
            h.manager.end(id, "terminated by the operator").await.unwrap();
            assert_eq!(h.state(id), LeaseState::Stopping);
            assert!(h.hv.calls_of(Op::Stop).is_empty(), "the start task stops it, not `end`");
            h.hv.release_start();
        });
        assert_eq!(denial(&outcome), (DenyReason::LeaseEnded, "the lease was terminated while its guest started"));
        let stops = h.hv.calls_of(Op::Stop);
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].committed.map(|c| c.state), Some(LeaseState::Stopping));
        assert_eq!(h.state(id), LeaseState::Ended);
        assert!(!h.hv.is_running(vmm_id(&id)));
        assert_eq!(h.manager.free_capacity_now(), h.terms.total);
    }
}
