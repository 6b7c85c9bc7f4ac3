//! At provider start: re-adopt the live guests of live leases (or hand back the ones
//! this backend still runs), clean up every other lease this host has state for, then
//! sweep every object with the name prefix that no lease owns (docs/vmm.md "Teardown and reconcile"). One failure does not stop the
//! rest: it is listed in the report.

use std::fs;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use super::lease_dir::{LeaseRecord, RecordState, read_record};
use super::process::{GuestProcess, find_guest_processes, wait_gone};
use super::registry::LeaseRuntime;
use super::{QemuHypervisor, Runner};
use crate::cgroup::LeaseCgroup;
use crate::error::VmmError;
use crate::forward::{ForwardCounters, SshForwarder};
use crate::host_command::run;
use crate::hypervisor::{ReconcileReport, RunningVm};
use crate::lease_id::LeaseId;
use crate::netlink::Netlink;
use crate::network::{self, NamePrefix};
use crate::{netns, procfs};

impl QemuHypervisor {
    pub(super) async fn reconcile_leases(&self, live: &[LeaseId]) -> Result<ReconcileReport, VmmError> {
        let cfg = &self.inner.config;
        let mut report = ReconcileReport::default();
        // Guests this backend already runs (a VMM helper that outlived its daemon): the
        // live ones are the caller's again, the others are stopped. A lease still being
        // started is left to its start (the helper stops it when nobody takes the reply).
        for rt in self.inner.leases.all_running() {
            let lease = rt.record.lease;
            if live.contains(&lease) {
                report.adopted.push(rt.running_vm());
                continue;
            }
            match self.stop_lease(lease).await {
                Ok(()) => report.removed_leases.push(lease),
                Err(e) => report.failed.push(format!("lease {lease}: {e}")),
            }
        }
        let dir = cfg.leases_dir();
        let entries = fs::read_dir(&dir).map_err(|e| VmmError::io("cannot list", &dir, e))?;
        for e in entries.flatten() {
            let Some(lease) = e.file_name().to_str().and_then(|s| s.parse::<LeaseId>().ok()) else {
                tracing::warn!(path = %e.path().display(), "not a lease directory: left alone");
                continue;
            };
            if self.inner.leases.contains(lease) {
                continue;
            }
            let adopted = match read_record(&e.path()) {
                Ok(record) if live.contains(&lease) => self.try_adopt(record).await,
                _ => None,
            };
            match adopted {
                Some(vm) => report.adopted.push(vm),
                // one lease that cannot be cleaned must not stop the others
                None => match self.cleanup_lease(lease).await {
                    Ok(()) => report.removed_leases.push(lease),
                    Err(e) => {
                        tracing::error!(%lease, error = %e, "cannot clean up lease");
                        report.failed.push(format!("lease {lease}: {e}"));
                    }
                },
            }
        }
        self.sweep_unowned(&mut report).await;
        self.remove_cgroup_parent_if_unused();
        Ok(report)
    }

    /// Re-adopts the guest of `record` if its QEMU is still the one we started and its
    /// isolation is intact.
    async fn try_adopt(&self, record: LeaseRecord) -> Option<RunningVm> {
        let cfg = &self.inner.config;
        let lease = record.lease;
        let (Some(pid), Some(ticks), RecordState::Running) = (record.pid, record.pid_start_ticks, record.state) else {
            return None;
        };
        if procfs::process_start_ticks(pid) != Some(ticks) {
            tracing::info!(%lease, "guest is gone: cleaning up");
            return None;
        }
        let name = cfg.names.lease_name(&lease);
        let cgroup = match self.adoptable_cgroup(lease, pid).await {
            Some(cg) => cg,
            None => {
                tracing::warn!(%lease, "guest is alive but its domain is not this provider's: not adopting it");
                return None;
            }
        };
        let intact = netns::list().ok()?.contains(&name)
            && network::list_tables().await.ok()?.contains(&name)
            && cgroup.procs().contains(&pid);
        if !intact {
            tracing::warn!(%lease, "guest is alive but its isolation is incomplete: not adopting it");
            return None;
        }
        if self.inner.leases.slot_taken(record.slot) {
            return None;
        }
        let counters = Arc::new(ForwardCounters::default());
        let listen = SocketAddr::new(record.listen, record.port);
        let forwarder = if record.isolated {
            // an isolated guest stays cut off: no SSH port, its link down (isolate.rs)
            let host_if = cfg.names.host_if(&lease);
            if let Err(e) = async { Netlink::host()?.set(&host_if, None, false).await }.await {
                tracing::warn!(%lease, error = %e, "cannot keep the isolated guest's link down: not adopting");
                return None;
            }
            None
        } else {
            match SshForwarder::start(listen, SocketAddr::new(IpAddr::V4(record.guest_ip), 22), counters.clone()).await
            {
                Ok(f) => Some(f),
                Err(e) => {
                    tracing::warn!(%lease, error = %e, "cannot re-open the SSH port: not adopting");
                    return None;
                }
            }
        };
        let exposed = if record.isolated {
            Vec::new()
        } else {
            match super::provision::start_exposed(record.listen, record.guest_ip, &record.exposed).await {
                Ok(relays) => relays,
                Err(e) => {
                    tracing::warn!(%lease, error = %e, "cannot re-open the exposed ports: not adopting");
                    return None;
                }
            }
        };
        let rt = Arc::new(LeaseRuntime {
            dir: self.lease_dir(lease),
            process: tokio::sync::Mutex::new(GuestProcess::Adopted { pid, start_ticks: ticks }),
            forwarder: Mutex::new(forwarder),
            exposed: Mutex::new(exposed),
            counters,
            cgroup,
            started: Instant::now(),
            boot_time: OnceLock::new(),
            throttled_mbit: Default::default(),
            record,
        });
        let vm = rt.running_vm();
        if !self.inner.leases.adopt(lease, rt) {
            return None;
        }
        tracing::info!(%lease, pid, "re-adopted live guest");
        Some(vm)
    }

    /// The lease cgroup of a guest to re-adopt: the plain one for the QEMU backend; for
    /// libvirt, where libvirt placed the domain's QEMU (`None` unless the domain is there
    /// and ours).
    async fn adoptable_cgroup(&self, lease: LeaseId, pid: i32) -> Option<LeaseCgroup> {
        match &self.inner.runner {
            Runner::Direct => {
                let _ = pid;
                Some(self.lease_cgroup(&lease))
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => {
                let name = self.inner.config.names.lease_name(&lease);
                match lv.find(&name, &lease.hex()).await {
                    Ok(Some(d)) if d.ours => {}
                    _ => return None,
                }
                super::domain_cgroup::domain_cgroup(self.lease_cgroup(&lease), pid).ok().map(|(cg, _)| cg)
            }
        }
    }

    /// libvirt backend: destroys the domains with our prefix that are ours and belong to
    /// no lease; reports those that are not ours and leaves them (their names, whose
    /// QEMU the process sweep must not touch either).
    async fn sweep_domains(&self, report: &mut ReconcileReport) -> Vec<String> {
        match &self.inner.runner {
            Runner::Direct => {
                let _ = report;
                Vec::new()
            }
            #[cfg(feature = "libvirt")]
            Runner::Libvirt(lv) => {
                let names = self.inner.config.names.clone();
                let owned: Vec<LeaseId> = self.inner.leases.ids();
                let parse = names.clone();
                let found =
                    match lv.list_prefixed(names.long(), move |n| parse.parse_lease_name(n).map(|l| l.hex())).await {
                        Ok(found) => found,
                        Err(e) => {
                            report.failed.push(format!("listing libvirt domains: {e}"));
                            return Vec::new();
                        }
                    };
                let mut foreign = Vec::new();
                for d in found {
                    let lease = names.parse_lease_name(&d.name);
                    if !d.ours {
                        report.failed.push(VmmError::ForeignDomain { name: d.name.clone() }.to_string());
                        foreign.push(d.name);
                        continue;
                    }
                    let Some(lease) = lease.filter(|l| !owned.contains(l)) else { continue };
                    match lv.destroy_ours(&d.name, &lease.hex()).await {
                        Ok(_) => report.removed_objects.push(format!("domain {}", d.name)),
                        Err(e) => report.failed.push(format!("domain {}: {e}", d.name)),
                    }
                }
                foreign
            }
        }
    }

    /// Removes processes, namespaces, tables, host interfaces and cgroups with our name
    /// prefix that belong to no lease of this backend.
    async fn sweep_unowned(&self, report: &mut ReconcileReport) {
        let foreign = self.sweep_domains(report).await;
        let names = &self.inner.config.names;
        let owned: Vec<LeaseId> = self.inner.leases.ids();
        let unowned = |name: &str| names.parse_lease_name(name).is_some_and(|l| !owned.contains(&l));
        let mut killed = Vec::new();
        for (pid, name) in find_guest_processes(names.long()) {
            if unowned(&name) && !foreign.contains(&name) {
                // SAFETY: kill(2) on a QEMU carrying our guest name prefix that no lease owns
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                killed.push(pid);
                report.removed_objects.push(format!("process {pid} ({name})"));
            }
        }
        wait_gone(&killed).await;

        match network::list_tables().await {
            Ok(tables) => {
                for t in tables.iter().filter(|t| unowned(t)) {
                    remove_object(report, format!("nft table inet {t}"), "nft", &["delete", "table", "inet", t]).await;
                }
            }
            Err(e) => report.failed.push(format!("listing nft tables: {e}")),
        }
        match netns::list() {
            Ok(all) => {
                for ns in all.iter().filter(|n| unowned(n)) {
                    record(report, format!("netns {ns}"), netns::delete(ns).await);
                }
            }
            Err(e) => report.failed.push(format!("listing network namespaces: {e}")),
        }
        let links = async {
            let host = Netlink::host()?;
            let names = host.link_names().await?;
            Ok::<_, VmmError>((host, names))
        };
        match links.await {
            Ok((host, links)) => {
                for link in unowned_host_ifs(names, &owned, &links) {
                    // gone already (with its namespace) is not a failure, and not a removal
                    match host.delete(link).await {
                        Ok(true) => report.removed_objects.push(format!("link {link}")),
                        Ok(false) => {}
                        Err(e) => report.failed.push(format!("link {link}: {e}")),
                    }
                }
            }
            Err(e) => report.failed.push(format!("listing links: {e}")),
        }
        for cg in self.inner.cgroups.list_children(names.long()) {
            if unowned(&cg) {
                let what = format!("cgroup {}/{cg}", names.long());
                match LeaseCgroup::new(self.inner.cgroups.clone(), names.long(), &cg).destroy().await {
                    Ok(()) => report.removed_objects.push(what),
                    Err(e) => report.failed.push(format!("{what}: {e}")),
                }
            }
        }
    }
}

/// Runs a removal command and records the outcome in the report.
async fn remove_object(report: &mut ReconcileReport, what: String, program: &str, args: &[&str]) {
    record(report, what, run(program, args, None).await.map(drop));
}

/// Records the outcome of a removal in the report.
fn record(report: &mut ReconcileReport, what: String, result: Result<(), VmmError>) {
    match result {
        Ok(()) => report.removed_objects.push(what),
        Err(e) => report.failed.push(format!("{what}: {e}")),
    }
}

/// The host interfaces among `links` that carry the short prefix and belong to none of
/// the `owned` leases.
fn unowned_host_ifs<'a>(names: &NamePrefix, owned: &[LeaseId], links: &'a [String]) -> Vec<&'a str> {
    links
        .iter()
        .map(String::as_str)
        .filter(|link| names.parse_host_if(link).is_some_and(|short| !owned.iter().any(|l| l.short_hex(12) == short)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_takes_unowned_host_ifs_of_its_prefix_only() {
        let names = NamePrefix::new("pvtest", "pt").unwrap();
        let owned = LeaseId::from_bytes([0xab; 16]);
        let links: Vec<String> = [
            "lo",
            "eth0",
            "ptabababababab",
            "pt0123456789ab",
            "pt0123456789a",
            "pt0123456789abc",
            "pv0123456789ab",
            "ptXYZ456789abc",
        ]
        .map(str::to_string)
        .to_vec();
        assert_eq!(unowned_host_ifs(&names, &[owned], &links), ["pt0123456789ab"]);
        assert_eq!(unowned_host_ifs(&names, &[], &links), ["ptabababababab", "pt0123456789ab"]);
    }
}
