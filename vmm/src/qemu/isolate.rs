//! Incident response: a running guest loses its SSH port and its link but keeps running,
//! with its disk and console log, until it is stopped (SECURITY.md "Incident response").

use super::QemuHypervisor;
use crate::error::VmmError;
use crate::host_command::run;
use crate::lease_id::LeaseId;

impl QemuHypervisor {
    pub(super) async fn isolate_lease(&self, lease: LeaseId) -> Result<(), VmmError> {
        let rt = self.inner.leases.running(lease)?;
        // closes the port and every open connection
        rt.close_port();
        let host_if = self.inner.config.names.host_if(&lease);
        run("ip", &["link", "set", &host_if, "down"], None).await?;
        tracing::warn!(%lease, "guest isolated: no network until it is stopped");
        Ok(())
    }
}
