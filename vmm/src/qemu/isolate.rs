//! Incident response: a running guest loses its SSH port and its link but keeps running,
//! with its disk and console log, until it is stopped (SECURITY.md "Incident response").
//! The lease's record says so, so that a re-adoption after a restart keeps it cut off.

use super::QemuHypervisor;
use super::lease_dir::{read_record, write_record};
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::netlink::Netlink;

impl QemuHypervisor {
    pub(super) async fn isolate_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let rt = self.inner.leases.running(lease)?;
        // closes the port and every open connection
        rt.close_port();
        let mut record = read_record(&rt.dir)?;
        if !record.isolated {
            record.isolated = true;
            write_record(&rt.dir, &record)?;
        }
        let host_if = self.inner.config.names.host_if(&lease);
        Netlink::host()?.set(&host_if, None, false).await?;
        tracing::warn!(%lease, "guest isolated: no network until it is stopped");
        Ok(())
    }
}
