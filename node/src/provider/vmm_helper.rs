//! `peervm vmm-helper`: the privileged half of a provider (docs/architecture.md
//! "Privilege separation"; docs/vmm.md "The VMM helper"). Runs as root beside the
//! unprivileged daemon; verifies the images of the provider's config itself, picks the
//! accelerator, re-adopts every guest still alive from an earlier run, then serves the
//! daemon's user, and only it, on a Unix socket. Guests outlive the helper's stop, as they
//! outlive the daemon's: the next start re-adopts them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use peervm_vmm::account::Account;
use peervm_vmm::helper::{Amounts, HelperPolicy, HelperServer, bind};
use peervm_vmm::{Hypervisor, QemuHypervisor, QemuUser};

use crate::provider::config::ProviderConfig;
use crate::provider::daemon::{ProviderError, open_images, select_accel, vmm_config};

/// The socket's default path (packaging/systemd/peervm-vmm.service makes its directory).
pub const DEFAULT_SOCKET: &str = "/run/peervm-vmm/vmm.sock";
/// The helper's default state directory: lease directories, overlays, seed disks.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/peervm-vmm";
/// The daemon's default user.
pub const DEFAULT_DAEMON_USER: &str = "peervm";

/// How the helper was asked to run.
pub struct HelperOptions {
    pub config: ProviderConfig,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub daemon_user: String,
}

/// A helper ready to serve: what it found at start.
pub struct ReadyHelper {
    server: HelperServer<QemuHypervisor>,
    listener: tokio::net::UnixListener,
    pub socket: PathBuf,
    pub accel: peervm_vmm::Accel,
    pub adopted: usize,
    pub removed: usize,
    pub images: usize,
}

/// Everything up to listening: checks, images, accelerator, re-adoption, the socket.
pub async fn prepare(opts: HelperOptions) -> Result<ReadyHelper, ProviderError> {
    // SAFETY: geteuid(2) cannot fail
    if unsafe { libc::geteuid() } != 0 {
        return Err(ProviderError::HelperNotRoot);
    }
    let daemon = daemon_account(&opts.daemon_user)?;
    let config = &opts.config;
    let images = open_images(config)?;
    let accel = select_accel(config, &images).await?;
    let vmm = vmm_config(config, opts.state_dir.clone(), accel);
    QemuUser::ensure(&vmm.qemu_user)?;
    let slots = vmm.address_pool.slots().min(u32::from(vmm.ssh_port_count));
    let hv = QemuHypervisor::new(vmm)?;
    // every guest still alive is kept: the daemon, when it (re)connects, says which of
    // them are its live leases (Hypervisor::reconcile) and the others go then
    let report = hv.reconcile(&hv.recorded_leases()?).await?;
    for failure in &report.failed {
        tracing::error!(%failure, "could not clean up after an earlier run");
    }
    let totals = totals(config);
    let image_count = images.len();
    let mut policy =
        HelperPolicy::new(daemon.uid, images.into_iter().map(|(_, i)| Arc::new(i)), totals, config.egress, slots);
    policy.max_exposed_ports = config.max_exposed_ports;
    policy.privileged_ports = config.expose_privileged;
    policy.egress_mbit = config.egress_mbit;
    let server = HelperServer::new(hv, policy, &report.adopted);
    let listener = listen(&opts.socket, daemon.gid)?;
    Ok(ReadyHelper {
        server,
        listener,
        socket: opts.socket,
        accel,
        adopted: report.adopted.len(),
        removed: report.removed_leases.len(),
        images: image_count,
    })
}

impl ReadyHelper {
    /// Serves until SIGINT or SIGTERM; then removes the socket and returns, leaving the
    /// guests running. SIGHUP re-reads `config_path` for the `[resources]` totals and
    /// the egress ceiling; every other field needs a restart of the helper.
    pub async fn run_until_signal(self, config_path: &Path) -> Result<(), ProviderError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut sigterm = signal(SignalKind::terminate()).map_err(ProviderError::Signal)?;
        let mut hangup = signal(SignalKind::hangup()).map_err(ProviderError::Signal)?;
        let socket = self.socket.clone();
        let serving = self.server.clone().serve(self.listener);
        tokio::pin!(serving);
        let outcome = loop {
            tokio::select! {
                e = &mut serving => break Err(ProviderError::HelperSocket { path: socket.clone(), source: e }),
                _ = tokio::signal::ctrl_c() => break Ok(()),
                _ = sigterm.recv() => break Ok(()),
                _ = hangup.recv() => match ProviderConfig::load(config_path) {
                    Ok(new) => {
                        self.server.set_limits(totals(&new), new.egress);
                        tracing::info!(vcpus = new.resources.vcpus, memory_mib = new.resources.memory_mib,
                            disk_gib = new.resources.disk_gib, egress = new.egress.as_str(),
                            "VMM helper reloaded its resource totals and egress ceiling");
                    }
                    Err(e) => tracing::warn!(error = %e, "VMM helper reload refused: the running limits stay"),
                },
            }
        };
        let _ = std::fs::remove_file(&socket);
        tracing::info!("VMM helper stopped; guests keep running until it starts again");
        outcome
    }
}

/// provider.toml's `[resources]`: what every guest together may hold.
fn totals(config: &ProviderConfig) -> Amounts {
    Amounts {
        vcpus: config.resources.vcpus.into(),
        memory_mib: config.resources.memory_mib,
        disk_gib: config.resources.disk_gib,
    }
}

/// The daemon's user: must exist and must not be root.
fn daemon_account(name: &str) -> Result<Account, ProviderError> {
    let err = |reason: String| ProviderError::DaemonUser { user: name.to_string(), reason };
    let account =
        Account::lookup(name).map_err(|e| err(format!("cannot look the user up: {e}")))?.ok_or_else(|| {
            err(format!(
                "no such user; create it (useradd --system --no-create-home --shell /usr/sbin/nologin {name}) \
                 or name the daemon's user with --daemon-user"
            ))
        })?;
    if account.uid == 0 {
        return Err(err("is root: the daemon must run unprivileged beside the helper".into()));
    }
    Ok(account)
}

/// The socket's directory (created 0755 if missing: the socket's own mode and the peer
/// check keep others out), then the socket.
fn listen(socket: &Path, group: u32) -> Result<tokio::net::UnixListener, ProviderError> {
    let err = |source| ProviderError::HelperSocket { path: socket.to_path_buf(), source };
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
        && !dir.exists()
    {
        // explicitly: the helper's umask (077) would make it 0700, and the daemon's user
        // must traverse it
        std::fs::create_dir_all(dir).map_err(err)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(err)?;
    }
    bind(socket, group).map_err(err)
}
