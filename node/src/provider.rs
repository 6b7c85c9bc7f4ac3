//! `peervm provider run`: the provider daemon. Publishes the signed advert, re-publishes
//! it about every minute (with jitter) and at once when free capacity changes, and
//! publishes a withdrawn advert before it exits on SIGINT/SIGTERM.

use std::time::Duration;

use peervm_protocol::{Accel, Advertisement, ResourceAmounts, Signed, SigningKey, Verified};
use rand::Rng;
use tokio::sync::watch;

use crate::config::ProviderConfig;
use crate::network::{Node, NodeConfig, Role, now_unix_ms};

/// Capacity changes are re-advertised at most this often (DESIGN section 5).
const MIN_CAPACITY_REPUBLISH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("cannot sign the advert: {0}")]
    Sign(#[from] peervm_protocol::SignError),
    #[error(
        "KVM is not known to work on this host and [hypervisor] allow_tcg is false; set allow_tcg = true to offer software-emulated (slow) guests"
    )]
    NoAccel,
}

/// Issues strictly increasing seqs: the wall clock in ms, bumped past the last one, so
/// a restarted provider's adverts still supersede the ones it sent before.
pub struct SeqSource {
    last: u64,
}

impl SeqSource {
    pub fn new() -> Self {
        Self { last: 0 }
    }

    pub fn next(&mut self, now_unix_ms: u64) -> u64 {
        self.last = now_unix_ms.max(self.last + 1);
        self.last
    }
}

impl Default for SeqSource {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Provider {
    config: ProviderConfig,
    key: SigningKey,
    accel: Accel,
    seq: SeqSource,
    node: Node,
    /// Free capacity; the lease manager updates it, the publish loop re-advertises it.
    free_tx: watch::Sender<ResourceAmounts>,
}

impl Provider {
    /// Starts the provider's swarm node and publishes its first advert.
    pub async fn start(
        config: ProviderConfig,
        key: SigningKey,
        metrics: Option<std::sync::Arc<crate::metrics::Metrics>>,
    ) -> Result<Provider, ProviderError> {
        // Until the VMM's KVM probe is wired in, guests run under TCG, which the operator
        // must allow explicitly (DESIGN section 8).
        let accel = if config.allow_tcg { Accel::Tcg } else { return Err(ProviderError::NoAccel) };
        let mut node_config = NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Provider);
        node_config.listen = config.listen.clone();
        node_config.bootstrap = config.bootstrap.clone();
        node_config.metrics = metrics;
        let node = Node::start(node_config).await?;
        let (free_tx, _) = watch::channel(config.resources);
        let mut provider = Provider { config, key, accel, seq: SeqSource::new(), node, free_tx };
        provider.publish(false).await?;
        Ok(provider)
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// A handle to report free capacity (the lease manager holds it).
    pub fn capacity(&self) -> watch::Sender<ResourceAmounts> {
        self.free_tx.clone()
    }

    fn signed_advert(&mut self, withdrawn: bool) -> Result<Verified<Advertisement>, ProviderError> {
        let now = now_unix_ms();
        let seq = self.seq.next(now);
        let free = *self.free_tx.borrow();
        let mut advert = self.config.advert(&self.key, seq, now, self.accel, free, &self.node.listen_addrs);
        advert.withdrawn = withdrawn;
        Ok(Signed::sign(&self.key, &advert)?)
    }

    async fn publish(&mut self, withdrawn: bool) -> Result<(), ProviderError> {
        let advert = self.signed_advert(withdrawn)?;
        self.node.client.publish(advert).await?;
        Ok(())
    }

    /// Runs until SIGINT or SIGTERM, then withdraws the advert and stops.
    pub async fn run_until_signal(mut self) -> Result<(), ProviderError> {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| crate::network::NetworkError::Build(format!("cannot handle SIGTERM: {e}")))?;
        let mut free_rx = self.free_tx.subscribe();
        let mut last_capacity_publish = tokio::time::Instant::now();
        loop {
            let base = self.config.republish_secs as f64;
            // ±10% jitter so providers started together do not publish in lockstep.
            let wait = Duration::from_secs_f64(base * rand::thread_rng().gen_range(0.9..1.1));
            tokio::select! {
                _ = tokio::time::sleep(wait) => self.publish(false).await?,
                changed = free_rx.changed() => {
                    if changed.is_err() { continue; }
                    let since = last_capacity_publish.elapsed();
                    if since < MIN_CAPACITY_REPUBLISH {
                        tokio::time::sleep(MIN_CAPACITY_REPUBLISH - since).await;
                    }
                    last_capacity_publish = tokio::time::Instant::now();
                    self.publish(false).await?;
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
        tracing::info!("withdrawing advert before exit");
        self.publish(true).await?;
        self.node.stop().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_strictly_increases_even_if_the_clock_does_not() {
        let mut s = SeqSource::new();
        assert_eq!(s.next(1000), 1000);
        assert_eq!(s.next(1000), 1001);
        assert_eq!(s.next(500), 1002);
        assert_eq!(s.next(5000), 5000);
    }
}
