//! `peervm lease create | list | status | extend | terminate`: a lease from the
//! requestor's side.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, Subcommand};
use peervm_node::requestor::client::{self, CreateOptions, ProviderChoice, Stage};
use peervm_node::requestor::db::StoredLease;
use peervm_node::requestor::ssh as guest_ssh;
use peervm_node::units;
use peervm_protocol::{ControlAction, LeaseState, ReplyOutcome};

use super::args::{SwarmArgs, TrustArgs};
use super::render::{describe_outcome, end_column, ended_line, format_time, shell_quote};
use super::requestor;

#[derive(Subcommand)]
pub enum LeaseCommand {
    /// Lease a VM: picks an offer, sends a signed request, waits for the guest, pins its
    /// host key and prints how to reach it.
    Create(Box<CreateArgs>),
    /// The leases this requestor holds (from its local store). Requests that never got a
    /// lease (denied, unanswered) are left out unless `--all`.
    List {
        #[arg(long)]
        json: bool,
        /// Also the requests that failed before a grant; a denied one keeps the
        /// provider's signed denial (`denial` in `--json`).
        #[arg(long)]
        all: bool,
    },
    /// Ask the provider for a lease's state and resource use.
    Status {
        lease: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
    /// Make a lease longer, e.g. `--by 1h`.
    Extend {
        lease: String,
        #[arg(long, value_name = "DURATION")]
        by: String,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
    /// End a lease now: the provider stops the guest and frees everything.
    Terminate {
        lease: String,
        #[command(flatten)]
        swarm: SwarmArgs,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    trust: TrustArgs,
    /// A provider's peer id, or `cheapest`.
    #[arg(long, default_value = "cheapest")]
    provider: String,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    #[arg(long, default_value = "512MiB")]
    memory: String,
    #[arg(long, default_value = "2GiB")]
    disk: String,
    #[arg(long, default_value = "minimal")]
    image: String,
    /// Lease length in hours (whole or decimal).
    #[arg(long, conflicts_with = "duration")]
    hours: Option<f64>,
    /// Lease length with a unit: 90s, 30m, 2h, 7d. Default 1h.
    #[arg(long)]
    duration: Option<String>,
    /// Use this ed25519 private key instead of a fresh one per lease.
    #[arg(long, value_name = "PATH")]
    ssh_key: Option<PathBuf>,
    /// Login name in the guest.
    #[arg(long, default_value = "peervm")]
    user: String,
    /// A TCP port of the guest to reach from outside (repeatable); the grant says on
    /// which port of the provider's host.
    #[arg(long = "expose", value_name = "PORT")]
    expose: Vec<u16>,
    /// Most to pay per hour, in currency units (default: the advertised price).
    #[arg(long)]
    max_price: Option<String>,
    /// Seconds to wait for the bootstrap nodes.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Print the lease as JSON on stdout (progress still goes to stderr).
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: LeaseCommand, data_dir: &Path) -> anyhow::Result<ExitCode> {
    lease_cmd(cmd, data_dir).await?;
    Ok(ExitCode::SUCCESS)
}

async fn lease_cmd(cmd: LeaseCommand, data_dir: &Path) -> anyhow::Result<()> {
    match cmd {
        LeaseCommand::Create(args) => create(*args, data_dir).await,
        LeaseCommand::List { json, all } => list(data_dir, json, all),
        LeaseCommand::Status { lease, json, swarm } => {
            let r = requestor::open(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Status, &swarm.addrs()?).await? {
                ReplyOutcome::Status { state, ends_at_unix_ms, usage } => {
                    // the store now holds what the reply taught (when and why it ended)
                    let l = r.db().get(&l.id)?.unwrap_or(l);
                    if json {
                        println!("{}", status_json(&l, state, ends_at_unix_ms, usage.as_ref()));
                    } else {
                        println!("lease     {}", l.id);
                        println!("provider  {}", l.provider);
                        println!("state     {}", state.as_str());
                        match ended_line(&l, peervm_node::clock::now_unix_ms()) {
                            Some(ended) if state.is_finished() => println!("ended     {ended}"),
                            _ if state.is_finished() => println!("ended     {}", state.as_str()),
                            _ => println!("ends      {}", format_time(ends_at_unix_ms)),
                        }
                        if let Some(u) = usage {
                            println!("usage     {}", client::usage_line(&u));
                        }
                        if let Some(a) = &l.access {
                            for p in &a.exposed {
                                println!("exposed   guest port {} at {}:{}", p.guest_port, a.ssh_host, p.host_port);
                            }
                        }
                    }
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
        LeaseCommand::Extend { lease, by, swarm } => {
            let secs = units::parse_duration_secs(&by)?;
            let r = requestor::open(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Extend { additional_secs: secs }, &swarm.addrs()?).await? {
                ReplyOutcome::Extended { ends_at_unix_ms } => {
                    println!("lease {} now ends {}", l.id, format_time(ends_at_unix_ms));
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
        LeaseCommand::Terminate { lease, swarm } => {
            let r = requestor::open(data_dir)?;
            let l = r.db().find(&lease)?;
            match r.control(&l, ControlAction::Terminate, &swarm.addrs()?).await? {
                ReplyOutcome::Terminated { .. } => {
                    println!("lease {} terminated", l.id);
                    Ok(())
                }
                other => bail!("{}", describe_outcome(&other)),
            }
        }
    }
}

/// `lease list`: the leases, newest first; requests that failed before a grant only with
/// `--all` (issue 20: a denial is a receipt, not a lease).
fn list(data_dir: &Path, json: bool, all: bool) -> anyhow::Result<()> {
    let r = requestor::open(data_dir)?;
    let leases = if all { r.db().list()? } else { r.db().list_leased()? };
    if json {
        for l in &leases {
            println!("{}", lease_json(l));
        }
        return Ok(());
    }
    if leases.is_empty() {
        println!("no leases");
    } else {
        // END: when a running lease ends, or when a finished one ended; why it ended
        // follows the provider
        let now = peervm_node::clock::now_unix_ms();
        println!("{:<12}  {:<10}  {:<14}  {:<24}  PROVIDER", "LEASE", "STATE", "END", "SSH");
        for l in &leases {
            let ssh = match &l.access {
                Some(a) => format!("{}@{}:{}", a.ssh_user, a.ssh_host, a.ssh_port),
                None => "-".into(),
            };
            let why =
                if l.state.is_finished() && !l.detail.is_empty() { format!("  {}", l.detail) } else { String::new() };
            println!(
                "{:<12}  {:<10}  {:<14}  {:<24}  {}{why}",
                &l.id.to_hex()[..12],
                l.state.as_str(),
                end_column(l, now),
                ssh,
                l.provider
            );
        }
    }
    if !all {
        let hidden = r.db().list()?.len().saturating_sub(leases.len());
        if hidden > 0 {
            let what = if hidden == 1 { "request" } else { "requests" };
            println!("({hidden} {what} that failed before a grant not shown; `peervm lease list --all` shows them)");
        }
    }
    Ok(())
}

fn lease_json(l: &StoredLease) -> serde_json::Value {
    serde_json::json!({
        "lease": l.id.to_hex(),
        "provider": l.provider.to_string(),
        "state": l.state.as_str(),
        "vcpus": l.spec.vcpus,
        "memory_mib": l.spec.memory_mib,
        "disk_gib": l.spec.disk_gib,
        "image": l.spec.image_name,
        "key_path": l.key_path,
        "ssh": l.access.as_ref().map(|a| serde_json::json!({
            "host": a.ssh_host,
            "port": a.ssh_port,
            "user": a.ssh_user,
            "host_key": guest_ssh::host_key_line(&a.host_key),
        })),
        "exposed": l.access.as_ref().map(|a| a.exposed.iter().map(|p| serde_json::json!({
            "guest_port": p.guest_port,
            "host": a.ssh_host,
            "host_port": p.host_port,
        })).collect::<Vec<_>>()).unwrap_or_default(),
        "ends_at_unix_ms": l.access.as_ref().map(|a| a.ends_at_unix_ms),
        "price_per_hour_micros": l.access.as_ref().map(|a| a.price_per_hour_micros),
        "currency": l.access.as_ref().map(|a| a.currency.clone()),
        "detail": l.detail,
        "ended_at_unix_ms": l.ended_at_unix_ms,
        "denial": l.denial.as_ref().map(hex::encode),
    })
}

/// `lease status --json`: the fields of a `lease list --json` row (SSH access, spec,
/// price), with the provider's signed state, end and usage in place of what was stored.
fn status_json(
    l: &StoredLease,
    state: LeaseState,
    ends_at_unix_ms: u64,
    usage: Option<&peervm_protocol::LeaseUsage>,
) -> serde_json::Value {
    let mut v = lease_json(l);
    v["state"] = state.as_str().into();
    v["ends_at_unix_ms"] = ends_at_unix_ms.into();
    v["usage"] = serde_json::to_value(usage).unwrap_or(serde_json::Value::Null);
    v
}

/// What the provider does in a state `lease create` waits through, from the lease
/// protocol alone (docs/architecture.md, "Lease flow"): the CLI knows no more without
/// asking, and the boot is the wait that can take minutes.
fn waits_for(state: LeaseState) -> Option<&'static str> {
    match state {
        LeaseState::Provisioning => Some("preparing the disk, seed, network and cgroup"),
        LeaseState::Booting => Some("the guest boots; the provider waits for its sshd to show the lease's host key"),
        _ => None,
    }
}

async fn create(args: CreateArgs, data_dir: &Path) -> anyhow::Result<()> {
    let bootstrap = args.swarm.addrs()?;
    let duration_secs = match (&args.hours, &args.duration) {
        (Some(h), _) => {
            if !(h.is_finite() && *h > 0.0 && *h * 3600.0 < u64::MAX as f64) {
                bail!("--hours must be a positive number, got {h}");
            }
            (h * 3600.0).round().max(1.0) as u64
        }
        (None, Some(d)) => units::parse_duration_secs(d)?,
        (None, None) => 3600,
    };
    let provider = if args.provider == "cheapest" {
        ProviderChoice::Cheapest
    } else {
        ProviderChoice::Peer(
            args.provider
                .parse()
                .map_err(|_| anyhow::anyhow!("--provider `{}` is not a peer id or `cheapest`", args.provider))?,
        )
    };
    if args.timeout == 0 {
        bail!("--timeout must be at least 1 second");
    }
    let opts = CreateOptions {
        bootstrap,
        provider,
        vcpus: args.vcpus,
        memory_mib: units::parse_size_mib(&args.memory, 1)?,
        disk_gib: units::parse_size_gib(&args.disk)?,
        image: args.image.clone(),
        duration_secs,
        ssh_key: args.ssh_key.clone(),
        ssh_user: args.user.clone(),
        expose: args.expose.clone(),
        max_price_micros: args.max_price.as_deref().map(units::parse_micros).transpose()?,
        join_timeout: Duration::from_secs(args.timeout),
        trusted_block_lists: args.trust.peers()?,
    };
    let r = requestor::open(data_dir)?;
    let mut stages = Vec::new();
    let lease = r
        .create(&opts, |stage, at| {
            let line = match stage {
                Stage::Joined { peers, offers } => {
                    format!("joined the swarm ({peers} peers, {offers} matching offers)")
                }
                Stage::Chose { provider, price_per_hour_micros, currency } => {
                    format!("chose {provider} at {} {currency}/hour", units::format_micros(*price_per_hour_micros))
                }
                Stage::Sent => "sent the signed lease request".into(),
                Stage::Provider(state) => match waits_for(*state) {
                    Some(what) => format!("provider: {} ({what})", state.as_str()),
                    None => format!("provider: {}", state.as_str()),
                },
                Stage::Still { state, in_state } => {
                    format!("provider: {} ({} s)", state.as_str(), in_state.as_secs())
                }
                Stage::Granted => "granted; host key pinned".into(),
            };
            eprintln!("{:>7.1} s  {line}", at.as_secs_f64());
            stages.push(serde_json::json!({ "stage": line, "at_ms": at.as_millis() as u64 }));
        })
        .await?;
    if args.json {
        let mut v = lease_json(&lease);
        v["stages"] = serde_json::Value::Array(stages);
        println!("{v}");
    } else {
        let target = r.ssh_target(&lease)?;
        let known_hosts = r.known_hosts_path(&lease.id);
        println!(
            "lease {} is running; it ends {}",
            lease.id,
            format_time(lease.access.as_ref().map_or(0, |a| a.ends_at_unix_ms))
        );
        println!("connect with:  peervm ssh {}", &lease.id.to_hex()[..12]);
        let args: Vec<String> =
            guest_ssh::openssh_args(&target, &known_hosts, &[]).iter().map(|a| shell_quote(a)).collect();
        println!("or:            ssh {}", args.join(" "));
        for p in lease.access.iter().flat_map(|a| a.exposed.iter().map(move |p| (a, p))) {
            println!("guest port {} is reached at {}:{}", p.1.guest_port, p.0.ssh_host, p.1.host_port);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use peervm_node::requestor::db::{Access, StoredLease};
    use peervm_protocol::{GuestSpec, LeaseId, LeaseState, LeaseUsage};

    use super::{lease_json, status_json};

    fn granted() -> StoredLease {
        StoredLease {
            id: LeaseId([7; 16]),
            provider: libp2p::PeerId::random(),
            provider_addrs: Vec::new(),
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 2,
                memory_mib: 1024,
                disk_gib: 4,
                image_name: "debian-12".into(),
                image_sha256: [1; 32],
            },
            key_path: "/tmp/k".into(),
            created_at_unix_ms: 1,
            state: LeaseState::Running,
            access: Some(Access {
                ssh_host: "127.0.0.1".into(),
                ssh_port: 27400,
                ssh_user: "peervm".into(),
                host_key: [3; 32],
                ends_at_unix_ms: 1_000,
                price_per_hour_micros: 25_400,
                currency: "USD".into(),
                grant: Vec::new(),
                exposed: Vec::new(),
            }),
            detail: String::new(),
            ended_at_unix_ms: None,
            denial: None,
        }
    }

    #[test]
    fn status_json_has_every_field_of_a_list_row_with_the_providers_state_end_and_usage() {
        let l = granted();
        let usage = LeaseUsage { cpu_usec: 5, ..Default::default() };
        let status = status_json(&l, LeaseState::Ended, 2_000, Some(&usage));
        let row = lease_json(&l);
        for key in row.as_object().unwrap().keys() {
            assert!(status.get(key).is_some(), "status --json lacks `{key}`: {status}");
        }
        assert_eq!(status["ssh"], row["ssh"], "host, port, user and host key as in the list");
        assert_eq!(status["state"], "ended", "the provider's state, not the stored one");
        assert_eq!(status["ends_at_unix_ms"], 2_000);
        assert_eq!(status["usage"]["cpu_usec"], 5);
    }
}
