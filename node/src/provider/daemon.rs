//! `peervm provider run`: the provider daemon. Verifies its images, probes KVM, recovers
//! the leases of a previous run, then publishes the signed advert, re-publishes it about
//! every minute (with jitter) and at once when free capacity changes, serves leases, and
//! publishes a withdrawn advert before it exits on SIGINT/SIGTERM. On SIGHUP (or the
//! admin socket's `reload`) it re-reads its config and applies what can change at run
//! time (reload.rs). Running guests outlive a stop of the daemon; the next start
//! re-adopts them (or fails and cleans them).
//!
//! Its guests run in the VMM helper (`peervm vmm-helper`, vmm_helper.rs) when it is given
//! the helper's socket, or when it does not run as root; a daemon running as root without
//! one runs them itself, for development (docs/architecture.md "Privilege separation").

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use peervm_protocol::{Accel, Advertisement, ResourceAmounts, Signed, SigningKey, Verified};
use peervm_vmm::helper::HelperHypervisor;
use peervm_vmm::{AccelPolicy, GuestImage, Hypervisor, ProbeOptions, QemuHypervisor, QemuUser, VmmConfig};
use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::clock::now_unix_ms;
use crate::metrics::Metrics;
use crate::network::{Node, NodeConfig, Role};
use crate::provider::ProviderLeases;
use crate::provider::admin;
use crate::provider::advert_chain::{AdvertChain, Next};
use crate::provider::audit::{self, AuditLog};
use crate::provider::config::ProviderConfig;
use crate::provider::lease::db::ProviderDb;
use crate::provider::lease::{LeaseManager, LeaseTerms};
use crate::provider::reachability::{PortReport, SharedReachability, spawn_port_check};
use crate::provider::reload::{ConfigDiff, ReloadError};
use crate::provider::vmm_backend::VmmBackend;

/// Capacity changes are re-advertised at most this often (docs/architecture.md,
/// "Provider daemon"): a burst of leases must not become a burst of adverts.
const MIN_CAPACITY_REPUBLISH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error(transparent)]
    Network(#[from] crate::network::NetworkError),
    #[error("cannot make the advert's refresh chain: {0}")]
    Refresh(#[from] peervm_protocol::RefreshError),
    #[error("cannot sign the advert: {0}")]
    Sign(#[from] peervm_protocol::SignError),
    #[error(
        "KVM does not work on this host ({reason}) and [hypervisor] allow_tcg is false; set allow_tcg = true to offer software-emulated (slow) guests"
    )]
    NoAccel { reason: String },
    #[error("image `{name}`: {source}")]
    Image { name: String, source: peervm_vmm::ImageError },
    #[error("image `{name}` changed since the config was read (its sha256 differs); restart the provider")]
    ImageChanged { name: String },
    #[error(transparent)]
    Vmm(#[from] peervm_vmm::VmmError),
    #[error(transparent)]
    Db(#[from] crate::provider::lease::db::DbError),
    #[error(transparent)]
    Lease(#[from] crate::provider::lease::LeaseError),
    #[error(transparent)]
    Fs(#[from] crate::secure_fs::SecureFsError),
    #[error(transparent)]
    Admin(#[from] crate::provider::admin::AdminError),
    /// The daemon could not install its SIGTERM or SIGHUP handler (it stops on SIGTERM,
    /// reloads on SIGHUP).
    #[error("cannot handle SIGTERM and SIGHUP")]
    Signal(#[source] std::io::Error),
    #[error(
        "image `{name}` (sha256 {sha256}) is not one the VMM helper at {socket} offers: the helper reads another \
         provider.toml, or its images changed; give both the same config and restart the helper"
    )]
    HelperImage { name: String, sha256: String, socket: PathBuf },
    #[error("the VMM helper must run as root (it creates cgroups, network namespaces and nftables tables)")]
    HelperNotRoot,
    #[error("daemon user {user:?}: {reason}")]
    DaemonUser { user: String, reason: String },
    #[error("cannot listen on the VMM helper's socket {path}: {source}")]
    HelperSocket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "[advert] delegation: {0}; ask the owner for a new one: peervm owner delegate --node <this node's peer id>"
    )]
    Delegation(peervm_protocol::DelegationError),
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
    leases: ProviderLeases,
    lease_task: tokio::task::JoinHandle<()>,
    admin_task: tokio::task::JoinHandle<()>,
    admin_path: std::path::PathBuf,
    port_check: tokio::task::JoinHandle<()>,
    reachability: SharedReachability,
    /// Told when a port verification finished: the advert then carries its result.
    reach_notify: Arc<tokio::sync::Notify>,
    /// SIGHUP, installed at start: from then on a SIGHUP reloads instead of killing.
    hangup: tokio::signal::unix::Signal,
    /// `reload` calls from the admin socket.
    reload_rx: mpsc::Receiver<admin::ReloadCall>,
    /// The refresh chain of the advert published last (docs/protocol.md, section 4a);
    /// None with refresh tokens off, after a withdrawal, or once a lock stopped them.
    chain: Option<AdvertChain>,
}

impl Provider {
    /// Verifies the images, picks the accelerator, opens the lease database, recovers the
    /// leases of a previous run, starts the swarm node and publishes the first advert.
    /// `data_dir` holds the lease database and the guests' state (0700).
    pub async fn start(
        config: ProviderConfig,
        key: SigningKey,
        data_dir: &Path,
        metrics: Option<Arc<Metrics>>,
        vmm_socket: Option<&Path>,
    ) -> Result<Provider, ProviderError> {
        // Before anything else: a SIGHUP from here on reloads instead of killing the daemon.
        let hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).map_err(ProviderError::Signal)?;
        crate::secure_fs::ensure_private_dir(data_dir)?;
        check_delegation(&config, &key).map_err(ProviderError::Delegation)?;
        let images = open_images(&config)?;
        let hv = match vmm_socket {
            Some(socket) => {
                let helper = HelperHypervisor::connect(socket).await?;
                for (name, image) in &images {
                    if !helper.offers(&image.sha256_hex()) {
                        return Err(ProviderError::HelperImage {
                            name: name.clone(),
                            sha256: image.sha256_hex(),
                            socket: socket.to_path_buf(),
                        });
                    }
                }
                tracing::info!(socket = %socket.display(), "guests run in the VMM helper");
                VmmBackend::Helper(helper)
            }
            None => {
                // SAFETY: geteuid(2) cannot fail
                if unsafe { libc::geteuid() } == 0 {
                    tracing::warn!(
                        "running guests in this process as root: for development only; in production run the \
                         daemon as its own user beside `peervm vmm-helper` (docs/architecture.md, \
                         \"Privilege separation\")"
                    );
                }
                let accel = select_accel(&config, &images).await?;
                let vmm = vmm_config(&config, data_dir.join("vmm"), accel);
                QemuUser::ensure(&vmm.qemu_user)?;
                VmmBackend::InProcess(QemuHypervisor::new(vmm)?)
            }
        };
        let vmm_accel = hv.accel();
        tracing::info!(accel = %vmm_accel, "guests run with this accelerator");
        let accel = match vmm_accel {
            peervm_vmm::Accel::Kvm => Accel::Kvm,
            peervm_vmm::Accel::Tcg => Accel::Tcg,
        };

        let db = ProviderDb::open(&data_dir.join("provider.db"))?;

        let metrics = metrics.unwrap_or_default();
        let (free_tx, _) = watch::channel(config.resources);
        let terms = LeaseTerms {
            total: config.resources,
            pricing: config.pricing.clone(),
            images: images.into_iter().map(|(name, i)| (name, Arc::new(i))).collect::<HashMap<_, _>>(),
            ssh_host: config.ssh.host.clone(),
            max_leases: config.max_leases,
            egress: config.egress,
            max_exposed_ports: config.max_exposed_ports,
            expose_privileged: config.expose_privileged,
            min_lease_secs: config.min_lease_secs,
            max_lease_secs: config.max_lease_secs,
        };

        let audit =
            Arc::new(AuditLog::open(&data_dir.join("audit.log"), audit::DEFAULT_MAX_BYTES, audit::DEFAULT_KEEP)?);
        let (inbox_tx, inbox_rx) = mpsc::channel(64);
        let mut node_config = NodeConfig::new(SigningKey::from_seed(&key.seed()), Role::Provider);
        node_config.listen = config.listen.clone();
        node_config.bootstrap = config.bootstrap.clone();
        node_config.metrics = Some(metrics.clone());
        node_config.lease_inbox = Some(inbox_tx);
        node_config.audit = Some(audit.clone());
        node_config.trusted_block_lists = config.trusted_block_lists.clone();
        let node = Node::start(node_config).await?;

        let leases = LeaseManager::new(
            SigningKey::from_seed(&key.seed()),
            db,
            hv,
            terms,
            free_tx.clone(),
            metrics,
            Some(node.client.clone()),
        )
        .with_audit(audit.clone())
        .with_list_blocked(node.list_blocked.clone());
        leases.set_abuse_config(config.abuse.clone());
        leases.apply_block_list().await?;
        let report = leases.recover().await?;
        if !(report.adopted.is_empty() && report.failed.is_empty() && report.ended.is_empty()) {
            tracing::info!(
                adopted = report.adopted.len(),
                failed = report.failed.len(),
                ended = report.ended.len(),
                removed = report.removed_objects.len(),
                "recovered the leases of the previous run"
            );
        }
        let lease_task = tokio::spawn(leases.clone().run(inbox_rx));
        let admin_path = admin::socket_path(data_dir);
        let info = admin::NodeInfo {
            peer_id: node.peer_id.to_string(),
            listen_addrs: node.listen_addrs.iter().map(|a| a.to_string()).collect(),
            accel: vmm_accel.to_string(),
        };
        let reachability = Arc::new(std::sync::Mutex::new(None));
        let reach_notify = Arc::new(tokio::sync::Notify::new());
        let port_check = spawn_port_check(&config, &node, reachability.clone(), reach_notify.clone());
        let (reload_tx, reload_rx) = mpsc::channel(4);
        let admin_task =
            admin::serve(&admin_path, leases.clone(), info, Some(audit), reachability.clone(), Some(reload_tx))?;
        let mut provider = Provider {
            config,
            key,
            accel,
            seq: SeqSource::new(),
            node,
            free_tx,
            leases,
            lease_task,
            admin_task,
            admin_path,
            port_check,
            reachability,
            reach_notify,
            hangup,
            reload_rx,
            chain: None,
        };
        provider.publish(false).await?;
        Ok(provider)
    }

    pub fn leases(&self) -> &ProviderLeases {
        &self.leases
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
        advert.reachability =
            self.reachability.lock().unwrap_or_else(|p| p.into_inner()).as_ref().map(PortReport::summary);
        // A new advert brings a new chain; a withdrawal ends the last one.
        self.chain = None;
        if let Some(terms) = self.config.refresh.filter(|_| !withdrawn) {
            let (chain, ours) = AdvertChain::new(terms, &advert.provider, seq, now)?;
            advert.refresh = Some(chain);
            self.chain = Some(ours);
        }
        Ok(Signed::sign(&self.key, &advert)?)
    }

    /// When the publish loop wakes next by itself: the next token's release time (or the
    /// spent chain's new advert), else the re-publish interval with ±10% jitter, so that
    /// providers started together do not publish in lockstep.
    fn next_wake(&self) -> Duration {
        match self.chain.as_ref().map(AdvertChain::next) {
            Some(Next::Token { at_ms, .. } | Next::Resign { at_ms }) => {
                Duration::from_millis(at_ms.saturating_sub(now_unix_ms()))
            }
            None => {
                let base = self.config.republish_secs as f64;
                Duration::from_secs_f64(base * rand::thread_rng().gen_range(0.9..1.1))
            }
        }
    }

    /// The publish loop woke by itself: releases the token due, or signs a new advert (a
    /// spent chain, refresh tokens off). A locked provider releases no token either, so
    /// its advert runs out as a locked provider's does; a token the node refuses (a
    /// bug) is replaced by a new advert.
    async fn on_wake(&mut self) -> Result<(), ProviderError> {
        // Locked: no token and no new advert (`publish` signs nothing), and no chain left
        // to wake for, so the loop waits the re-publish interval, not a spent release time.
        if self.leases.is_locked() && self.chain.take().is_some() {
            tracing::info!("locked: releasing no refresh token");
        }
        let Some(Next::Token { k, .. }) = self.chain.as_ref().map(AdvertChain::next) else {
            self.publish(false).await?;
            return Ok(());
        };
        let released = match self.chain.as_ref().and_then(|c| c.record(k)) {
            Some(record) => self.node.client.release_refresh(record).await,
            None => Err(crate::network::NetworkError::Refresh(format!("no token {k} in the chain"))),
        };
        match released {
            Ok(()) => {
                if let Some(chain) = self.chain.as_mut() {
                    chain.advance();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "refresh token refused; signing a new advert");
                self.publish(false).await?;
            }
        }
        Ok(())
    }

    /// Signs and gossips the advert, unless the operator locked the provider: a locked
    /// provider signs nothing new, and its last advert runs out at its expiry. Returns
    /// the seq of the advert sent.
    async fn publish(&mut self, withdrawn: bool) -> Result<Option<u64>, ProviderError> {
        if self.leases.is_locked() {
            tracing::info!("locked: not signing a new advert");
            return Ok(None);
        }
        let advert = self.signed_advert(withdrawn)?;
        let seq = advert.body().seq;
        self.node.client.publish(advert).await?;
        Ok(Some(seq))
    }

    /// Re-reads `config_path` and applies it if every changed field can change at run
    /// time (reload.rs decides); else nothing changes. The new terms hold for requests
    /// decided from now on; running leases keep theirs. A change re-advertises at once.
    pub async fn reload(&mut self, config_path: &Path) -> Result<admin::Reloaded, ReloadError> {
        let new = ProviderConfig::load(config_path)?;
        let changed = ConfigDiff::between(&self.config, &new).decide()?;
        if changed.is_empty() {
            return Ok(admin::Reloaded { changed: Vec::new(), advert_seq: None });
        }
        check_delegation(&new, &self.key).map_err(ReloadError::Delegation)?;
        let current = self.leases.terms();
        self.leases
            .set_terms(LeaseTerms {
                total: new.resources,
                pricing: new.pricing.clone(),
                max_leases: new.max_leases,
                min_lease_secs: new.min_lease_secs,
                max_lease_secs: new.max_lease_secs,
                ..(*current).clone()
            })
            .map_err(ReloadError::Capacity)?;
        self.leases.set_abuse_config(new.abuse.clone());
        if new.trusted_block_lists != self.config.trusted_block_lists {
            self.node
                .client
                .set_trusted_block_lists(new.trusted_block_lists.clone())
                .await
                .map_err(ReloadError::Network)?;
        }
        self.config = new;
        let advert_seq = self.publish(false).await.map_err(|e| ReloadError::Publish(Box::new(e)))?;
        Ok(admin::Reloaded { changed: changed.iter().map(|f| f.to_string()).collect(), advert_seq })
    }

    /// [`Provider::reload`], logged: the operator of a SIGHUP reads the outcome in the log.
    async fn reload_logged(&mut self, config_path: &Path) -> Result<admin::Reloaded, String> {
        crate::service_notify::reloading();
        let outcome = match self.reload(config_path).await {
            Ok(done) if done.changed.is_empty() => {
                tracing::info!(config = %config_path.display(), "config reloaded: nothing changed");
                Ok(done)
            }
            Ok(done) => {
                tracing::info!(
                    config = %config_path.display(),
                    changed = %done.changed.join(", "),
                    seq = ?done.advert_seq,
                    "config reloaded and re-advertised"
                );
                Ok(done)
            }
            Err(e) => {
                let report = e.report();
                tracing::warn!(config = %config_path.display(), "{report}");
                Err(report)
            }
        };
        // a refused reload ends too: the running config stays and serves
        crate::service_notify::ready(if outcome.is_ok() { "config reloaded" } else { "reload refused, see the log" });
        outcome
    }

    /// Runs until SIGINT or SIGTERM, then withdraws the advert and stops. SIGHUP and the
    /// admin socket's `reload` re-read `config_path` (the file the daemon started from).
    pub async fn run_until_signal(mut self, config_path: PathBuf) -> Result<(), ProviderError> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(ProviderError::Signal)?;
        let mut free_rx = self.free_tx.subscribe();
        let mut last_capacity_publish = tokio::time::Instant::now();
        loop {
            let wait = self.next_wake();
            tokio::select! {
                _ = tokio::time::sleep(wait) => { self.on_wake().await?; }
                changed = free_rx.changed() => {
                    if changed.is_err() { continue; }
                    let since = last_capacity_publish.elapsed();
                    if since < MIN_CAPACITY_REPUBLISH {
                        tokio::time::sleep(MIN_CAPACITY_REPUBLISH - since).await;
                    }
                    last_capacity_publish = tokio::time::Instant::now();
                    self.publish(false).await?;
                }
                _ = self.reach_notify.notified() => { self.publish(false).await?; }
                _ = self.hangup.recv() => { let _ = self.reload_logged(&config_path).await; }
                Some(call) = self.reload_rx.recv() => {
                    let outcome = self.reload_logged(&config_path).await;
                    let _ = call.send(outcome);
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
        crate::service_notify::stopping("withdrawing the advert");
        tracing::info!("withdrawing advert before exit");
        self.publish(true).await?;
        self.lease_task.abort();
        self.admin_task.abort();
        self.port_check.abort();
        let _ = std::fs::remove_file(&self.admin_path);
        self.node.stop().await;
        Ok(())
    }
}

/// Checks the owner's delegation, if the config has one, against this node's key and
/// the configured beneficiary (at start and at every reload).
fn check_delegation(config: &ProviderConfig, key: &SigningKey) -> Result<(), peervm_protocol::DelegationError> {
    if let Some(bytes) = &config.delegation {
        let d =
            peervm_protocol::Delegation::open_for(bytes, &key.peer_id(), config.beneficiary.as_deref(), now_unix_ms())?;
        tracing::info!(owner = %d.owner, until = d.not_after_unix_ms, "running for an owner");
    }
    Ok(())
}

/// Opens and verifies every configured image (by config name); a directory's manifest
/// must still be the one whose hash the config read (and that the advert names), a
/// stock image's file must have the sha256 the config gives.
pub(crate) fn open_images(config: &ProviderConfig) -> Result<Vec<(String, GuestImage)>, ProviderError> {
    let mut out = Vec::new();
    for img in &config.images {
        let opened = img.open().map_err(|source| ProviderError::Image { name: img.name.clone(), source })?;
        if opened.sha256() != img.sha256 {
            return Err(ProviderError::ImageChanged { name: img.name.clone() });
        }
        out.push((img.name.clone(), opened));
    }
    Ok(out)
}

/// The hypervisor layer's settings from the provider's config; its state goes to
/// `state_dir`.
pub(crate) fn vmm_config(config: &ProviderConfig, state_dir: PathBuf, accel: peervm_vmm::Accel) -> VmmConfig {
    let mut vmm = VmmConfig::new(state_dir, accel);
    vmm.backend = config.backend.clone();
    if matches!(vmm.backend, peervm_vmm::Backend::Libvirt { .. }) {
        vmm.lease_root = Some(config.libvirt_lease_dir.clone());
    }
    vmm.ssh_listen = config.ssh_listen;
    vmm.ssh_port_base = config.ssh.port_min;
    vmm.ssh_port_count = config.ssh.port_max - config.ssh.port_min + 1;
    vmm.address_pool = config.address_pool;
    vmm.guest_nameservers = config.guest_dns.clone();
    vmm.names = config.names.clone();
    vmm.tcg_tb_size_mib = config.tcg_tb_size_mib;
    vmm.limits = peervm_vmm::BandwidthLimits { egress_mbit: config.egress_mbit, ingress_mbit: config.ingress_mbit };
    if let Some(range) = &config.expose_ports {
        vmm.expose_port_base = *range.start();
        vmm.expose_port_count = range.end() - range.start() + 1;
        vmm.expose_ports_per_slot = config.max_exposed_ports;
    }
    vmm
}

/// KVM where a probe boot shows it works; TCG only when the config allows it.
pub(crate) async fn select_accel(
    config: &ProviderConfig,
    images: &[(String, GuestImage)],
) -> Result<peervm_vmm::Accel, ProviderError> {
    let policy = match (config.allow_tcg, config.probe_kvm) {
        (true, false) => AccelPolicy::TcgOnly,
        (true, true) => AccelPolicy::KvmOrTcg,
        (false, _) => AccelPolicy::KvmOnly,
    };
    let probe = if policy == AccelPolicy::TcgOnly {
        peervm_vmm::KvmProbe::Unusable { reason: "not probed (probe_kvm = false)".into() }
    } else {
        // the probe boots a kernel directly and watches for its userspace marker: a stock
        // image (booted by firmware) cannot serve
        match images.iter().find(|(_, i)| matches!(i.boot(), peervm_vmm::Boot::Direct { .. })) {
            Some((_, image)) => {
                let user = QemuUser::ensure(peervm_vmm::DEFAULT_QEMU_USER)?;
                let opts =
                    ProbeOptions { qemu_binary: "qemu-system-x86_64".into(), user, deadline: Duration::from_secs(20) };
                peervm_vmm::probe_kvm(image, &opts).await
            }
            None => peervm_vmm::KvmProbe::Unusable {
                reason: "not probed: no image with a kernel (stock images boot by firmware); offer one built by \
                         scripts/build-guest-image too"
                    .into(),
            },
        }
    };
    match peervm_vmm::select_accel(policy, &probe) {
        Ok(accel) => Ok(accel),
        Err(_) => Err(ProviderError::NoAccel {
            reason: match probe {
                peervm_vmm::KvmProbe::Unusable { reason } => reason,
                peervm_vmm::KvmProbe::Usable { .. } => "unknown".into(),
            },
        }),
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
