//! The manager's timers (docs/architecture.md, "Leases", "Timers"): every second, leases
//! past their end are ended (isolated ones wait for the operator) and expired nonces are
//! pruned; every `[abuse] interval_secs` (10 s by default), per-lease usage (its traffic
//! and drops by rule included) goes to metrics and through abuse detection
//! (`abuse_response.rs`), with warnings for a lease at its memory limit and for a host
//! short of the memory it advertises (both also as gauges, for the alerts of
//! packaging/prometheus/peervm-alerts.yml).

use peervm_protocol::{GuestTraffic, LeaseId, LeaseState, LeaseUsage};
use peervm_vmm::{Hypervisor, VmUsage};
use tokio::task::JoinHandle;

use super::db::LeaseRecord;
use super::manager::{LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// A lease's resource use, as the hypervisor reports it; `None` if it cannot.
    pub(super) async fn usage(&self, id: &LeaseId) -> Option<LeaseUsage> {
        self.inner.hv.usage(vmm_id(id)).await.ok().map(|u| lease_usage(&u))
    }

    /// Ends every lease past its end, each on its own task (returned, for a caller that
    /// waits), and prunes expired nonces.
    pub(super) fn end_expired(&self) -> Vec<JoinHandle<()>> {
        let now = self.now();
        let active = match self.inner.db.active() {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "cannot read leases for expiry");
                return Vec::new();
            }
        };
        let ending = expired(&active, now)
            .map(|id| {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.end(id, "expired").await {
                        tracing::error!(lease = %id, error = %e, "cannot end an expired lease");
                    }
                })
            })
            .collect();
        if let Err(e) = self.inner.db.prune_nonces(now) {
            tracing::warn!(error = %e, "cannot prune seen nonces");
        }
        ending
    }

    /// Per-lease usage into metrics and through abuse detection; warnings for a lease at
    /// its memory limit and for a host short of what it advertises. A round that finds
    /// the previous one still running skips.
    pub(super) async fn monitor(&self) {
        let inner = &self.inner;
        let Ok(_round) = inner.monitoring.try_lock() else { return };
        let Ok(active) = inner.db.active() else { return };
        let mut running = 0;
        for record in active.iter().filter(|r| r.state == LeaseState::Running) {
            running += 1;
            let Ok(vm_usage) = inner.hv.usage(vmm_id(&record.id)).await else { continue };
            let u = lease_usage(&vm_usage);
            let ram = record.spec.memory_mib << 20;
            inner.metrics.record_lease_usage(&record.id.to_hex(), &u);
            if let Some(net) = &vm_usage.net {
                inner.metrics.record_lease_drops(&record.id.to_hex(), net);
                self.check_abuse(record, net).await;
            }
            inner.metrics.record_lease_memory_limit(&record.id.to_hex(), ram);
            if u.memory_current_bytes >= ram {
                let first = inner.memory_warned.lock().unwrap_or_else(|p| p.into_inner()).insert(record.id);
                if first {
                    tracing::warn!(lease = %record.id, memory_mib = record.spec.memory_mib,
                        "lease sits at its memory limit (its guest uses all the RAM it leased)");
                }
            }
        }
        inner.metrics.leases_running.set(running);
        let free = *inner.capacity.borrow();
        let available = peervm_vmm::procfs::mem_available_mib();
        inner.metrics.record_host_memory(available, free.memory_mib);
        if let Some(avail) = available
            && avail < free.memory_mib
        {
            tracing::warn!(
                available_mib = avail,
                advertised_free_mib = free.memory_mib,
                "the host has less memory available than this provider advertises as free"
            );
        }
    }
}

/// What the signed status says of a guest's use: its SSH bytes as `net_rx/tx_bytes`, and
/// its link's whole traffic as `guest_net` when the hypervisor counted it
/// (docs/protocol.md section 7).
fn lease_usage(u: &VmUsage) -> LeaseUsage {
    LeaseUsage {
        cpu_usec: u.cpu_time.as_micros().min(u128::from(u64::MAX)) as u64,
        memory_current_bytes: u.memory_current_bytes,
        memory_peak_bytes: u.memory_peak_bytes.unwrap_or(u.memory_current_bytes),
        net_rx_bytes: u.ssh_bytes_in,
        net_tx_bytes: u.ssh_bytes_out,
        uptime_secs: u.uptime.as_secs(),
        guest_net: u.net.as_ref().map(|n| GuestTraffic {
            rx_bytes: n.bytes_in,
            rx_packets: n.packets_in,
            tx_bytes: n.bytes_out,
            tx_packets: n.packets_out,
            new_connections: n.new_connections,
            dropped_packets: n.dropped_total(),
        }),
    }
}

/// The running leases whose end is at or before `now`. An isolated lease is evidence: it
/// waits for the operator (SECURITY.md, "Incident response").
fn expired(active: &[LeaseRecord], now: u64) -> impl Iterator<Item = LeaseId> + '_ {
    active
        .iter()
        .filter(move |r| r.state == LeaseState::Running && r.ends_at_unix_ms <= now && !r.isolated)
        .map(|r| r.id)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use peervm_protocol::LeaseState;
    use peervm_vmm::VmUsage;

    use super::super::admission::nonce_kept_until;
    use super::super::db::DbError;
    use super::super::fake_hypervisor::Op;
    use super::super::manager::vmm_id;
    use super::super::test_harness::{Harness, T0};

    /// A time no test reaches.
    const FAR: u64 = T0 + 1_000_000_000;

    async fn tick(h: &Harness) {
        for end in h.manager.end_expired() {
            end.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_lease_ends_at_its_end_and_not_a_millisecond_before() {
        let h = Harness::new();
        let id = h.grant().await; // ends at T0 + 1 h
        h.clock.set(T0 + 3_600_000 - 1);
        tick(&h).await;
        assert_eq!(h.state(id), LeaseState::Running);
        h.clock.advance(1);
        tick(&h).await;
        let record = h.record(id);
        assert_eq!((record.state, record.detail.as_str()), (LeaseState::Ended, "expired"));
        let stops = h.hv.calls_of(Op::Stop);
        assert_eq!(stops.len(), 1);
        assert_eq!(stops[0].committed.map(|c| c.state), Some(LeaseState::Stopping));
        assert_eq!(h.manager.free_capacity_now(), h.terms.total);
    }

    #[tokio::test]
    async fn an_extended_lease_runs_to_its_new_end() {
        use peervm_protocol::{ControlAction, ReplyOutcome};
        let h = Harness::new();
        let id = h.grant().await;
        let extend = h.control(id, ControlAction::Extend { additional_secs: 600 });
        assert!(matches!(h.send_control(&extend).await, ReplyOutcome::Extended { .. }));
        h.clock.set(T0 + 3_600_000);
        tick(&h).await;
        assert_eq!(h.state(id), LeaseState::Running);
        h.clock.set(T0 + 4_200_000);
        tick(&h).await;
        assert_eq!(h.state(id), LeaseState::Ended);
    }

    #[tokio::test]
    async fn seen_nonces_are_forgotten_only_after_they_can_no_longer_be_fresh() {
        let h = Harness::new();
        let req = h.request();
        h.send_request(&req).await;
        let kept_until = nonce_kept_until(req.valid_until_unix_ms);
        h.clock.set(kept_until);
        tick(&h).await;
        let kept = h.db().record_nonce(&req.requestor, req.nonce, FAR);
        assert!(matches!(kept, Err(DbError::Replay { .. })), "still kept at {kept_until}: {kept:?}");
        h.clock.set(kept_until + 1);
        tick(&h).await;
        assert!(h.db().record_nonce(&req.requestor, req.nonce, FAR).is_ok(), "pruned after {kept_until}");
    }

    #[tokio::test]
    async fn monitoring_counts_running_leases_and_warns_once_about_a_lease_at_its_memory_limit() {
        let h = Harness::new();
        let full = h.grant().await; // 256 MiB
        let calm = h.grant().await;
        h.hv.set_usage(vmm_id(&full), VmUsage { memory_current_bytes: 256 << 20, ..Default::default() });
        h.hv.set_usage(
            vmm_id(&calm),
            VmUsage { memory_current_bytes: 1 << 20, uptime: Duration::from_secs(3), ..Default::default() },
        );
        h.manager.monitor().await;
        assert_eq!(h.manager.inner.metrics.leases_running.get(), 2);
        let warned = h.manager.inner.memory_warned.lock().unwrap().clone();
        assert_eq!(warned, [full].into_iter().collect());
        h.manager.end(full, "test").await.unwrap();
        assert!(h.manager.inner.memory_warned.lock().unwrap().is_empty(), "forgotten when the lease ends");
        h.manager.monitor().await;
        assert_eq!(h.manager.inner.metrics.leases_running.get(), 1);
    }

    #[tokio::test]
    async fn monitoring_exports_each_lease_limit_and_the_host_against_its_advert() {
        let h = Harness::new();
        let id = h.grant().await; // 256 MiB
        h.hv.set_usage(vmm_id(&id), VmUsage { memory_current_bytes: 1 << 20, ..Default::default() });
        h.manager.monitor().await;
        let metrics = &h.manager.inner.metrics;
        let label = crate::metrics::LeaseLabel { lease: id.to_hex() };
        assert_eq!(metrics.lease_memory_limit_bytes.get_or_create(&label).get(), 256 << 20);
        let free = h.manager.free_capacity_now().memory_mib;
        assert_eq!(metrics.advertised_free_memory_bytes.get(), i64::try_from(free << 20).unwrap());
        // The test host's own MemAvailable: present on Linux, so some memory.
        assert!(metrics.host_memory_available_bytes.get() > 0);
        h.manager.end(id, "test").await.unwrap();
        assert!(!metrics.render().contains(&id.to_hex()), "the lease's series are forgotten when it ends");
    }

    #[tokio::test]
    async fn a_guest_s_traffic_goes_to_metrics_and_the_signed_status_beside_its_ssh_bytes() {
        use peervm_protocol::{ControlAction, GuestTraffic, ReplyOutcome};
        let h = Harness::new();
        let id = h.grant().await;
        let net = peervm_vmm::NetUsage {
            bytes_in: 5_000,
            packets_in: 50,
            bytes_out: 9_000,
            packets_out: 90,
            new_connections: 4,
            smtp_connections: 0,
            recent_destinations: 1,
            dropped: [("egress deny".to_string(), 6), ("spoofed source".to_string(), 1)].into(),
            limit_dropped_out: 2,
            limit_dropped_in: 0,
        };
        h.hv.set_usage(
            vmm_id(&id),
            VmUsage { ssh_bytes_in: 7, ssh_bytes_out: 8, net: Some(net), ..Default::default() },
        );
        h.manager.monitor().await;
        let out = h.manager.inner.metrics.render();
        let hex = id.to_hex();
        for line in [
            format!(r#"peervm_lease_net_rx_bytes{{lease="{hex}"}} 7"#),
            format!(r#"peervm_lease_guest_rx_bytes{{lease="{hex}"}} 5000"#),
            format!(r#"peervm_lease_guest_tx_bytes{{lease="{hex}"}} 9000"#),
            format!(r#"peervm_lease_guest_new_connections{{lease="{hex}"}} 4"#),
            format!(r#"peervm_lease_guest_dropped_packets{{lease="{hex}",rule="egress deny"}} 6"#),
            format!(r#"peervm_lease_guest_limit_dropped_packets{{lease="{hex}",direction="out"}} 2"#),
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
        let ReplyOutcome::Status { usage: Some(u), .. } = h.send_control(&h.control(id, ControlAction::Status)).await
        else {
            panic!("no usage in the status");
        };
        assert_eq!((u.net_rx_bytes, u.net_tx_bytes), (7, 8), "the SSH bytes keep their meaning");
        let want = GuestTraffic {
            rx_bytes: 5_000,
            rx_packets: 50,
            tx_bytes: 9_000,
            tx_packets: 90,
            new_connections: 4,
            dropped_packets: 7,
        };
        assert_eq!(u.guest_net, Some(want));
        h.manager.end(id, "test").await.unwrap();
        assert!(!h.manager.inner.metrics.render().contains(&hex), "forgotten with the lease");
    }
}
