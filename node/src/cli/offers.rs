//! `peervm offers`: the verified offers on the market that match, cheapest first; with
//! `--watch`, again whenever the market changes.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use peervm_node::advert_store::OfferFilter;
use peervm_node::network::{Node, NodeEvent};
use peervm_node::requestor::offers;
use peervm_node::units;

use super::args::{SwarmArgs, TrustArgs};
use super::requestor;

#[derive(Args)]
pub struct OffersArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// At least this many free vCPUs (also the vCPUs the price is quoted for).
    #[arg(long)]
    vcpus: Option<u32>,
    /// At least this much free memory, e.g. 4GiB or 512MiB.
    #[arg(long)]
    memory: Option<String>,
    /// At least this much free disk, e.g. 20GiB.
    #[arg(long)]
    disk: Option<String>,
    /// Highest price per hour for the requested size, in currency units, e.g. 0.05.
    #[arg(long)]
    max_price: Option<String>,
    /// Only offers priced in this currency.
    #[arg(long)]
    currency: Option<String>,
    #[arg(long)]
    region: Option<String>,
    /// kvm or tcg.
    #[arg(long)]
    accel: Option<String>,
    /// Offers that have this image.
    #[arg(long)]
    image: Option<String>,
    /// Only providers run for this owner (its peer id, from their delegation).
    #[arg(long, value_name = "PEER_ID")]
    owner: Option<String>,
    /// Only providers that let a lease expose at least this many guest TCP ports
    /// (`lease create --expose`).
    #[arg(long, value_name = "N")]
    exposed_ports: Option<u16>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep running and print the offers again whenever the market changes.
    #[arg(long)]
    watch: bool,
    /// Show at most this many offers (0 = all).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Seconds to wait for the bootstrap nodes.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
}

fn offer_filter(args: &OffersArgs) -> anyhow::Result<OfferFilter> {
    Ok(OfferFilter {
        min_vcpus: args.vcpus,
        min_memory_mib: args.memory.as_deref().map(|m| units::parse_size_mib(m, 1)).transpose()?,
        min_disk_gib: args.disk.as_deref().map(units::parse_size_gib).transpose()?,
        max_price_micros: args.max_price.as_deref().map(units::parse_micros).transpose()?,
        currency: args.currency.clone(),
        region: args.region.clone(),
        accel: args.accel.as_deref().map(str::parse).transpose().map_err(anyhow::Error::msg)?,
        image: args.image.clone(),
        exclude: Default::default(),
        owner: args
            .owner
            .as_deref()
            .map(|o| o.parse().map_err(|_| anyhow::anyhow!("--owner `{o}` is not a peer id")))
            .transpose()?,
        min_exposed_ports: args.exposed_ports,
    })
}

pub async fn run(args: OffersArgs, data_dir: &Path) -> anyhow::Result<ExitCode> {
    let mut filter = offer_filter(&args)?;
    filter.exclude = requestor::blocked_providers(data_dir)?;
    let bootstrap = args.swarm.addrs()?;
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let mut seed = zeroize::Zeroizing::new([0u8; 32]);
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, seed.as_mut());
    let key = peervm_protocol::SigningKey::from_seed(&seed);
    // `--watch` follows the whole market; a one-shot look asks only for what it shows.
    let market = if args.watch {
        offers::Market::Whole
    } else {
        offers::Market::Matching { filter: &filter, limit: args.limit }
    };
    let node = offers::join_as(key, &bootstrap, Duration::from_secs(args.timeout), args.trust.peers()?, market).await?;
    let print = |node: &Node| {
        let list = offers::current(node, &filter, args.limit);
        if args.json {
            for line in offers::lines(&list) {
                println!("{}", serde_json::to_string(&line).unwrap_or_default());
            }
        } else if list.is_empty() {
            println!("no offers match");
        } else {
            print!("{}", offers::table(&list, &filter));
        }
    };
    print(&node);
    if args.watch {
        let mut events = node.subscribe();
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Ok(NodeEvent::AdvertStored { .. }) | Ok(NodeEvent::AdvertsExpired(_)) => {
                        // Coalesce bursts (a sync page) into one redraw.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        while events.try_recv().is_ok() {}
                        if !args.json { println!(); }
                        print(&node);
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
    }
    node.stop().await;
    Ok(ExitCode::SUCCESS)
}
