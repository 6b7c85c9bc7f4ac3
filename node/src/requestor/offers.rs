//! `peervm offers`: a one-shot requestor that joins the swarm, asks the nodes it reaches
//! for the offers that match (a filtered sync: a light client, docs/protocol.md section 9),
//! verifies them, and prints them cheapest first; `--watch` pulls the whole market.

use std::time::Duration;

use libp2p::Multiaddr;
use peervm_protocol::SigningKey;
use serde::Serialize;

use crate::advert_store::{Offer, OfferFilter};
use crate::clock::now_unix_ms;
use crate::network::{Node, NodeConfig, NodeEvent, Role};
use crate::units::format_micros;

#[derive(Debug, thiserror::Error)]
pub enum OffersError {
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("no bootstrap node given; pass --bootstrap <multiaddr> (repeatable) or set PEERVM_BOOTSTRAP")]
    NoBootstrap,
    #[error(
        "could not reach any bootstrap node within {secs} s ({tried}); check the addresses and that they are running"
    )]
    Unreachable { secs: u64, tried: String },
}

/// What a one-shot requestor pulls from the nodes it reaches.
#[derive(Debug, Clone, Copy)]
pub enum Market<'a> {
    /// Every advert they hold (a full sync): `--watch`, or a provider looked up by id.
    Whole,
    /// From each node, the `limit` cheapest adverts matching `filter` (0: as many as a
    /// page holds), plus as many as the filter excludes, since the nodes do not know the
    /// requestor's block list (a filtered sync, docs/protocol.md section 9). Each advert
    /// is verified and goes through the accept rule, and the requestor queries its own
    /// store afterwards, so a node can leave offers out but cannot add any that do not
    /// match; asking every node reached limits what one can leave out.
    Matching { filter: &'a OfferFilter, limit: usize },
}

/// The `max_items` of each node's page for `Market::Matching { filter, limit }`.
fn page_size(filter: &OfferFilter, limit: usize) -> u32 {
    let most = crate::network::tuning::SYNC_MAX_PAGE_ITEMS;
    match limit {
        0 => most,
        n => u32::try_from(n.saturating_add(filter.exclude.len())).unwrap_or(u32::MAX).min(most),
    }
}

/// Joins through `bootstrap` with the identity `key` (a fresh one for looking at offers;
/// a requestor that leases speaks as itself), applying the block lists of
/// `trusted_block_lists`, pulls `market` from every node that answers, and returns the
/// running node (its store now holds what they sent).
pub async fn join_as(
    key: SigningKey,
    bootstrap: &[Multiaddr],
    timeout: Duration,
    trusted_block_lists: std::collections::HashSet<libp2p::PeerId>,
    market: Market<'_>,
) -> Result<Node, OffersError> {
    if bootstrap.is_empty() {
        return Err(OffersError::NoBootstrap);
    }
    let mut config = NodeConfig::new(key, Role::Requestor);
    config.trusted_block_lists = trusted_block_lists;
    config.bootstrap = bootstrap.to_vec();
    config.sync_on_connect = matches!(market, Market::Whole);
    // A light client holds what it asked for, not the adverts behind relayed tokens.
    config.fetch_missing_adverts = matches!(market, Market::Whole);
    let node = Node::start(config).await?;
    let mut events = node.subscribe();

    // Wait for the first connection or for every dial to fail.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut failures = Vec::new();
    let mut connected = node.client.connected_peers().await?;
    while connected.is_empty() {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        match tokio::time::timeout(remaining, events.recv()).await {
            Ok(Ok(NodeEvent::PeerConnected(p))) => connected.push(p),
            Ok(Ok(NodeEvent::DialFailed { error, .. })) => {
                if !failures.contains(&error) {
                    failures.push(error);
                }
                if failures.len() >= bootstrap.len() {
                    break;
                }
            }
            Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    if connected.is_empty() {
        node.stop().await;
        let tried = if failures.is_empty() { "no answer".to_string() } else { failures.join("; ") };
        return Err(OffersError::Unreachable { secs: timeout.as_secs(), tried });
    }
    // Give the other bootstraps a moment to connect, then sync from everyone we reached.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let peers = node.client.connected_peers().await?;
    let syncs = peers.into_iter().map(|p| {
        let client = node.client.clone();
        async move {
            let pull = async {
                match market {
                    Market::Matching { filter, limit } => client.query_from(p, filter, page_size(filter, limit)).await,
                    Market::Whole => client.sync_from(p).await,
                }
            };
            tokio::time::timeout(timeout, pull).await
        }
    });
    let results = futures::future::join_all(syncs).await;
    let synced = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    if synced == 0 {
        tracing::warn!("no peer answered the sync request; showing what gossip delivered");
    }
    Ok(node)
}

#[derive(Serialize)]
pub struct OfferLine {
    pub provider: String,
    pub price_per_hour: String,
    pub price_per_hour_micros: u64,
    pub currency: String,
    pub vcpus_free: u32,
    pub memory_mib_free: u64,
    pub disk_gib_free: u64,
    pub region: String,
    pub country: Option<String>,
    pub accel: String,
    pub images: Vec<String>,
    pub ssh_host: String,
    pub expires_at_unix_ms: u64,
    pub seq: u64,
    /// The owner that delegated to this provider, if any.
    pub owner: Option<String>,
    /// The provider's last port verification, as it reports it.
    pub reachability: Option<peervm_protocol::Reachability>,
    /// Guest TCP ports a lease may expose (`lease create --expose`).
    pub max_exposed_ports: u16,
}

impl TryFrom<&Offer> for OfferLine {
    type Error = peervm_protocol::VerifyError;
    fn try_from(o: &Offer) -> Result<Self, Self::Error> {
        let advert = o.decode()?;
        let a = advert.body();
        Ok(OfferLine {
            provider: a.provider.to_string(),
            price_per_hour: format_micros(o.price_per_hour_micros),
            price_per_hour_micros: o.price_per_hour_micros,
            currency: a.pricing.currency.clone(),
            vcpus_free: a.resources.free.vcpus,
            memory_mib_free: a.resources.free.memory_mib,
            disk_gib_free: a.resources.free.disk_gib,
            region: a.region.clone(),
            country: a.country.clone(),
            accel: a.hypervisor.accel.as_str().into(),
            images: a.images.iter().map(|i| i.name.clone()).collect(),
            ssh_host: a.ssh.host.clone(),
            // The effective expiry: refresh tokens keep an advert past its signed one.
            expires_at_unix_ms: o.expires_at_unix_ms,
            seq: a.seq,
            owner: a.delegation_at(now_unix_ms()).ok().flatten().map(|d| d.owner.to_string()),
            reachability: a.reachability,
            max_exposed_ports: a.max_exposed_ports(),
        })
    }
}

/// The matching offers in the node's store, cheapest first.
pub fn current(node: &Node, filter: &OfferFilter, limit: usize) -> Vec<Offer> {
    let store = node.store.lock().unwrap_or_else(|p| p.into_inner());
    store.query(filter, now_unix_ms(), limit)
}

/// The display lines of `offers`. An offer whose stored advert does not decode again
/// (it decoded when it was verified, so this is a bug, not bad input) is left out and
/// logged.
pub fn lines(offers: &[Offer]) -> Vec<OfferLine> {
    offers
        .iter()
        .filter_map(|o| match OfferLine::try_from(o) {
            Ok(line) => Some(line),
            Err(e) => {
                tracing::warn!(provider = %o.provider, error = %e, "stored advert does not decode");
                None
            }
        })
        .collect()
}

/// What the PRICE/HOUR column is the price of: the size asked for, where a size not asked
/// for counts nothing (`OfferFilter::price_spec`: 1 vCPU, no memory, no disk), said so
/// instead of "0 MiB, 0 GiB" (issue 20).
pub fn price_heading(filter: &OfferFilter) -> String {
    let spec = filter.price_spec();
    let memory = match filter.min_memory_mib {
        Some(_) => format!("{} MiB", spec.memory_mib),
        None => "no memory".into(),
    };
    let disk = match filter.min_disk_gib {
        Some(_) => format!("{} GiB", spec.disk_gib),
        None => "no disk".into(),
    };
    format!("price for {} vCPU, {memory}, {disk}", spec.vcpus)
}

/// The line under the table when the price leaves part of a lease out.
pub fn price_note(filter: &OfferFilter) -> Option<&'static str> {
    (filter.min_vcpus.is_none() || filter.min_memory_mib.is_none() || filter.min_disk_gib.is_none()).then_some(
        "PRICE/HOUR counts only the size asked for; give --vcpus, --memory and --disk for the price of a whole lease",
    )
}

/// Renders offers as an aligned table.
pub fn table(offers: &[Offer], filter: &OfferFilter) -> String {
    let mut out = format!(
        "{:<52}  {:>12}  {:>5}  {:>9}  {:>8}  {:<12}  {:<5}  {}\n",
        format!("PROVIDER ({})", price_heading(filter)),
        "PRICE/HOUR",
        "VCPUS",
        "MEMORY",
        "DISK",
        "REGION",
        "ACCEL",
        "IMAGES"
    );
    for l in lines(offers) {
        out.push_str(&format!(
            "{:<52}  {:>8} {:<3}  {:>5}  {:>5} MiB  {:>4} GiB  {:<12}  {:<5}  {}\n",
            l.provider,
            l.price_per_hour,
            l.currency,
            l.vcpus_free,
            l.memory_mib_free,
            l.disk_gib_free,
            if l.region.is_empty() { "-" } else { &l.region },
            l.accel,
            l.images.join(",")
        ));
    }
    if let Some(note) = price_note(filter) {
        out.push_str(note);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{price_heading, price_note};
    use crate::advert_store::OfferFilter;

    #[test]
    fn without_a_size_the_heading_says_the_price_is_of_one_vcpu_alone() {
        let none = OfferFilter::default();
        assert_eq!(price_heading(&none), "price for 1 vCPU, no memory, no disk");
        assert!(price_note(&none).unwrap().contains("--vcpus, --memory and --disk"));
        let some = OfferFilter { min_vcpus: Some(2), min_memory_mib: Some(4096), ..Default::default() };
        assert_eq!(price_heading(&some), "price for 2 vCPU, 4096 MiB, no disk");
        assert!(price_note(&some).is_some());
    }

    #[test]
    fn a_whole_size_is_priced_as_asked_with_no_note() {
        let all = OfferFilter {
            min_vcpus: Some(2),
            min_memory_mib: Some(4096),
            min_disk_gib: Some(20),
            ..Default::default()
        };
        assert_eq!(price_heading(&all), "price for 2 vCPU, 4096 MiB, 20 GiB");
        assert_eq!(price_note(&all), None);
    }
}
