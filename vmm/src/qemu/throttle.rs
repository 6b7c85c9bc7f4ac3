//! Abuse response (docs/vmm.md "Abuse detection"): a running guest's outbound traffic is
//! held to a low rate by replacing the egress qdisc of its link (`shaping.rs`); its SSH
//! port, its other traffic rules and its disk stay as they are. Like a bandwidth limit, the
//! qdisc lives on the veth pair and goes with it when the lease is torn down.

use std::sync::atomic::Ordering::Relaxed;

use super::QemuHypervisor;
use crate::error::VmmError;
use crate::lease_id::LeaseId;
use crate::network::NS_UPLINK;
use crate::shaping;

impl QemuHypervisor {
    pub(super) async fn throttle_lease(&self, lease: LeaseId, egress_mbit: u32) -> Result<(), VmmError> {
        if egress_mbit == 0 {
            return Err(VmmError::InvalidSpec("a throttle of 0 Mbit/s: isolate the lease instead".into()));
        }
        let rt = self.inner.leases.running(lease)?;
        let netns = self.inner.config.names.lease_name(&lease);
        shaping::replace_egress(&netns, NS_UPLINK, egress_mbit).await?;
        rt.throttled_mbit.store(egress_mbit, Relaxed);
        tracing::warn!(%lease, egress_mbit, "guest throttled: its outbound traffic is held to this rate until it stops");
        Ok(())
    }
}
