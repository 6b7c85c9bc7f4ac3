//! Acting on abuse detection (docs/architecture.md "Abuse detection"): the monitor hands
//! each running lease's traffic sample to `abuse.rs`'s decision; every rule that fires is
//! written to the audit log, counted in `peervm_abuse_triggers_total{rule,action}` and
//! logged as a warning, and the most severe action among them is applied once: a throttle
//! through the hypervisor, an isolate exactly as `peervm provider isolate` does
//! (`incident.rs`). An isolated lease is evidence and is not checked any more.

use std::sync::Arc;

use peervm_vmm::{Hypervisor, NetUsage};

use super::abuse::{AbuseConfig, Action, Sample};
use super::db::LeaseRecord;
use super::manager::{LeaseManager, vmm_id};

impl<H: Hypervisor + Clone + 'static> LeaseManager<H> {
    /// The abuse detection settings in force now.
    pub fn abuse_config(&self) -> Arc<AbuseConfig> {
        self.inner.abuse.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// New settings (a reload): they apply from the next check; what a rule already did to
    /// a lease stands, and a rule whose action was raised may act once more.
    pub fn set_abuse_config(&self, config: AbuseConfig) {
        *self.inner.abuse.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(config);
    }

    /// Checks one running lease's traffic; acts on the rules that fired.
    pub(super) async fn check_abuse(&self, record: &LeaseRecord, net: &NetUsage) {
        if record.isolated {
            return;
        }
        let inner = &self.inner;
        let config = self.abuse_config();
        let sample = Sample::of(self.now(), net);
        let fired = {
            let mut watch = inner.abuse_watch.lock().unwrap_or_else(|p| p.into_inner());
            watch.entry(record.id).or_default().observe(&config, sample)
        };
        let Some(fired) = fired else { return };
        inner.metrics.abuse_checks.inc();
        let Some(strongest) = fired.iter().map(|t| t.action).max() else { return };
        let applied = match strongest {
            Action::Warn => Ok(()),
            Action::Throttle => {
                inner.hv.throttle(vmm_id(&record.id), config.throttle_mbit).await.map_err(|e| e.to_string())
            }
            Action::Isolate => self.isolate(record.id).await.map_err(|e| e.to_string()),
        };
        for t in &fired {
            inner.metrics.abuse_trigger(t.rule.as_str(), t.action.as_str());
            let mut fields = serde_json::json!({
                "lease": record.id.to_hex(),
                "requestor": record.requestor.to_string(),
                "rule": t.rule.as_str(),
                "value": (t.value * 100.0).round() / 100.0,
                "threshold": t.threshold,
                "unit": t.rule.unit(),
                "action": t.action.as_str(),
            });
            if t.action == Action::Throttle {
                fields["throttle_mbit"] = config.throttle_mbit.into();
            }
            if let Err(e) = &applied {
                fields["error"] = e.as_str().into();
            }
            self.audit("abuse", fields);
            tracing::warn!(
                lease = %record.id,
                requestor = %record.requestor,
                rule = t.rule.as_str(),
                value = format!("{:.2}", t.value),
                threshold = t.threshold,
                unit = t.rule.unit(),
                action = t.action.as_str(),
                "abuse detection: a rule fired"
            );
        }
        if let Err(e) = applied {
            tracing::error!(lease = %record.id, action = strongest.as_str(), error = %e,
                "abuse detection could not act on a lease");
        }
    }
}

#[cfg(test)]
mod tests {
    use peervm_vmm::{NetUsage, VmUsage};

    use super::super::abuse::{AbuseConfig, Action, Rule, Threshold};
    use super::super::fake_hypervisor::{Committed, Op};
    use super::super::manager::vmm_id;
    use super::super::test_harness::Harness;
    use crate::provider::audit::AuditLog;

    fn net(new_connections: u64) -> VmUsage {
        VmUsage { net: Some(NetUsage { new_connections, ..NetUsage::default() }), ..VmUsage::default() }
    }

    fn with(rule: Rule, threshold: u32, action: Action) -> AbuseConfig {
        let mut c = AbuseConfig::default();
        c.rules.insert(rule, Threshold { threshold, action });
        c
    }

    fn triggers(h: &Harness) -> String {
        h.manager.inner.metrics.render().lines().filter(|l| l.starts_with("peervm_abuse_triggers_total{")).collect()
    }

    #[tokio::test]
    async fn a_scanning_lease_is_isolated_once_audited_and_counted_and_a_quiet_one_is_left_alone() {
        let mut h = Harness::new();
        let audit = std::sync::Arc::new(AuditLog::open(&h.dir.path().join("audit.log"), 1 << 20, 1).unwrap());
        h.manager = h.manager.with_audit(audit.clone());
        h.manager.set_abuse_config(with(Rule::NewConnections, 5, Action::Isolate));
        let scanner = h.grant().await;
        let quiet = h.grant().await;
        h.hv.set_usage(vmm_id(&scanner), net(0));
        h.hv.set_usage(vmm_id(&quiet), net(0));
        h.manager.monitor().await;
        assert!(h.hv.calls_of(Op::Isolate).is_empty(), "the first sample is only a baseline");
        h.clock.advance(10_000);
        h.hv.set_usage(vmm_id(&scanner), net(500));
        h.hv.set_usage(vmm_id(&quiet), net(1));
        h.manager.monitor().await;
        let isolates = h.hv.calls_of(Op::Isolate);
        assert_eq!(isolates.len(), 1);
        assert_eq!(isolates[0].lease, Some(vmm_id(&scanner)));
        assert_eq!(
            isolates[0].committed,
            Some(Committed { state: peervm_protocol::LeaseState::Running, isolated: true })
        );
        assert!(h.record(scanner).isolated && !h.record(quiet).isolated);
        assert_eq!(triggers(&h), r#"peervm_abuse_triggers_total{rule="new_connections",action="isolate"} 1"#);
        let log = std::fs::read_to_string(audit.path()).unwrap();
        let records: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["event"] == "abuse")
            .collect();
        assert_eq!(records.len(), 1, "{log}");
        let r = &records[0];
        assert_eq!(r["lease"], scanner.to_hex());
        assert_eq!((r["rule"].as_str(), r["action"].as_str()), (Some("new_connections"), Some("isolate")));
        assert_eq!((r["value"].as_f64(), r["threshold"].as_u64()), (Some(50.0), Some(5)));
        assert_eq!(h.manager.inner.metrics.abuse_checks.get(), 2);
        // the isolated lease is evidence: no longer checked, never isolated again
        h.clock.advance(10_000);
        h.hv.set_usage(vmm_id(&scanner), net(5_000));
        h.manager.monitor().await;
        assert_eq!(h.hv.calls_of(Op::Isolate).len(), 1);
        assert_eq!(h.manager.inner.metrics.abuse_checks.get(), 3, "only the quiet lease was checked");
    }

    #[tokio::test]
    async fn a_throttle_holds_the_guest_to_the_configured_rate_and_a_warning_only_warns() {
        let h = Harness::new();
        let mut c = with(Rule::Smtp, 1, Action::Throttle);
        c.throttle_mbit = 3;
        c.rules.insert(Rule::NewConnections, Threshold { threshold: 2, action: Action::Warn });
        h.manager.set_abuse_config(c);
        let id = h.grant().await;
        let usage = |new_connections, smtp_connections| VmUsage {
            net: Some(NetUsage { new_connections, smtp_connections, ..NetUsage::default() }),
            ..VmUsage::default()
        };
        h.hv.set_usage(vmm_id(&id), usage(0, 0));
        h.manager.monitor().await;
        h.clock.advance(10_000);
        h.hv.set_usage(vmm_id(&id), usage(30, 0));
        h.manager.monitor().await;
        assert_eq!(triggers(&h), r#"peervm_abuse_triggers_total{rule="new_connections",action="warn"} 1"#);
        assert!(h.hv.calls_of(Op::Throttle).is_empty(), "a warning acts on nothing");
        h.clock.advance(10_000);
        h.hv.set_usage(vmm_id(&id), usage(60, 10));
        h.manager.monitor().await;
        assert_eq!(h.hv.throttled(vmm_id(&id)), Some(3));
        h.clock.advance(10_000);
        h.hv.set_usage(vmm_id(&id), usage(90, 20));
        h.manager.monitor().await;
        assert_eq!(h.hv.calls_of(Op::Throttle).len(), 1, "throttled once");
        assert!(!h.record(id).isolated);
        let out = h.manager.inner.metrics.render();
        assert!(out.contains(r#"peervm_abuse_triggers_total{rule="smtp",action="throttle"} 1"#), "{out}");
        // the watch is forgotten with the lease
        h.manager.end(id, "test").await.unwrap();
        assert!(h.manager.inner.abuse_watch.lock().unwrap().is_empty());
    }
}
