//! libvirtd as the runner of a lease's QEMU (docs/vmm.md "The libvirt backend"): one
//! connection, re-opened when libvirtd restarted, and the few domain operations the
//! backend needs. Every call into libvirt blocks on its RPC, so each runs on a blocking
//! thread.
//!
//! Domains are transient (`virDomainCreateXML`): nothing of a lease is left in `virsh
//! list --all` once it is destroyed, and a host reboot forgets them, as it kills the
//! QEMU backend's guests.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virt::connect::Connect;
use virt::domain::{Domain, DomainState, MemoryParameters};
use virt::enumutil::Enum;
use virt::sys;

use super::domain_xml::is_ours;
use crate::error::VmmError;
use crate::hypervisor::GuestState;

/// A connection to libvirtd at one URI.
#[derive(Clone)]
pub(crate) struct Libvirt {
    uri: String,
    conn: Arc<Mutex<Option<Connect>>>,
}

/// A domain carrying the lease prefix, as reconcile sees it.
pub(crate) struct FoundDomain {
    pub name: String,
    /// Made by this provider: transient, with peervm's metadata for its lease.
    pub ours: bool,
}

impl Libvirt {
    /// Connects to libvirtd, then asks it for the domain capabilities of QEMU: the first
    /// such question after libvirtd started (or QEMU changed) makes libvirt probe QEMU,
    /// which a lease start would otherwise wait for (docs/vmm.md "The libvirt backend",
    /// "Why a domain took tens of seconds").
    /// Blocks: it runs once, when the backend is made.
    pub(crate) fn connect(uri: &str) -> Result<Self, VmmError> {
        // libvirt prints every error to stderr by default; ours are returned as values
        virt::error::clear_error_callback();
        let err = |action: &str, e: virt::error::Error| VmmError::Libvirt {
            uri: uri.to_string(),
            action: action.to_string(),
            reason: e.to_string(),
        };
        let t = Instant::now();
        let conn = Connect::open(Some(uri)).map_err(|e| err("connect", e))?;
        conn.domain_capabilities(None, Some("x86_64"), None, Some("qemu"), 0)
            .map_err(|e| err("read QEMU's domain capabilities", e))?;
        tracing::info!(uri, probe_ms = t.elapsed().as_millis() as u64, "libvirtd answers");
        Ok(Libvirt { uri: uri.to_string(), conn: Arc::new(Mutex::new(Some(conn))) })
    }

    fn error(&self, action: &str, e: impl std::fmt::Display) -> VmmError {
        VmmError::Libvirt { uri: self.uri.clone(), action: action.to_string(), reason: e.to_string() }
    }

    /// Runs `f` with a live connection on a blocking thread; a connection that died
    /// (libvirtd restarted) is opened again once.
    async fn call<T: Send + 'static>(
        &self,
        action: &str,
        f: impl FnOnce(&Connect) -> Result<T, virt::error::Error> + Send + 'static,
    ) -> Result<T, VmmError> {
        let this = self.clone();
        let action_owned = action.to_string();
        tokio::task::spawn_blocking(move || {
            let mut guard = this.conn.lock().unwrap_or_else(|p| p.into_inner());
            let alive = guard.as_ref().is_some_and(|c| c.is_alive().unwrap_or(false));
            if !alive {
                // a dead connection is closed when dropped
                drop(guard.take());
                let c = Connect::open(Some(&this.uri)).map_err(|e| this.error("connect", e))?;
                *guard = Some(c);
            }
            let conn = guard.as_ref().ok_or_else(|| this.error("connect", "no connection"))?;
            f(conn).map_err(|e| this.error(&action_owned, e))
        })
        .await
        .map_err(|e| self.error(action, format!("the libvirt call did not finish: {e}")))?
    }

    /// Creates the transient domain of `xml`, paused: its QEMU runs (with its tap, cgroups
    /// and user) but the guest has not run an instruction.
    pub(crate) async fn create_paused(&self, name: &str, xml: String) -> Result<(), VmmError> {
        self.call(&format!("create domain {name}"), move |c| {
            c.create_domain_xml(&xml, sys::VIR_DOMAIN_START_PAUSED).map(drop)
        })
        .await
    }

    /// The domain `name` and whether it is ours, if it exists.
    pub(crate) async fn find(&self, name: &str, lease_hex: &str) -> Result<Option<FoundDomain>, VmmError> {
        let (name, hex) = (name.to_string(), lease_hex.to_string());
        self.call(&format!("look up domain {name}"), move |c| {
            let found = c.lookup_domain_by_name(&name).and_then(|d| domain_is_ours(&d, &hex));
            match found {
                Ok(ours) => Ok(Some(FoundDomain { ours, name })),
                // gone, also between the lookup and the question
                Err(e) if is_no_domain(&e) => Ok(None),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// Every domain whose name starts with `<prefix>-`, with whether it is ours (for the
    /// lease its name gives: `lease_of`).
    pub(crate) async fn list_prefixed(
        &self,
        prefix: &str,
        lease_of: impl Fn(&str) -> Option<String> + Send + 'static,
    ) -> Result<Vec<FoundDomain>, VmmError> {
        let prefix = format!("{prefix}-");
        self.call("list domains", move |c| {
            let mut found = Vec::new();
            for d in c.list_all_domains(0)? {
                let name = d.name()?;
                if !name.starts_with(&prefix) {
                    continue;
                }
                let ours = match lease_of(&name) {
                    Some(hex) => match domain_is_ours(&d, &hex) {
                        Ok(ours) => ours,
                        // went away since the listing
                        Err(e) if is_no_domain(&e) => continue,
                        Err(e) => return Err(e),
                    },
                    None => false,
                };
                found.push(FoundDomain { name, ours });
            }
            Ok(found)
        })
        .await
    }

    pub(crate) async fn resume(&self, name: &str) -> Result<(), VmmError> {
        let n = name.to_string();
        self.call(&format!("resume domain {name}"), move |c| c.lookup_domain_by_name(&n)?.resume().map(drop)).await
    }

    /// The memory limit of the live domain, KiB (`<memtune>` hard limit, swap included).
    /// Set on the live domain rather than in its XML: libvirt 9.0 raises QEMU's
    /// RLIMIT_MEMLOCK to a hard limit given in the XML, which needs CAP_SYS_RESOURCE, and
    /// a libvirtd in a container without it (these machines) then refuses the domain.
    pub(crate) async fn set_memory_limit(&self, name: &str, bytes: u64) -> Result<(), VmmError> {
        let n = name.to_string();
        let kib = bytes / 1024;
        self.call(&format!("set the memory limit of domain {name}"), move |c| {
            let d = c.lookup_domain_by_name(&n)?;
            let params = MemoryParameters { hard_limit: Some(kib), swap_hard_limit: Some(kib), ..Default::default() };
            d.set_memory_parameters(params, sys::VIR_DOMAIN_AFFECT_LIVE)
        })
        .await
    }

    /// Presses the ACPI power button.
    pub(crate) async fn power_button(&self, name: &str) -> Result<(), VmmError> {
        let n = name.to_string();
        self.call(&format!("shut down domain {name}"), move |c| {
            c.lookup_domain_by_name(&n)?.shutdown_flags(sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN).map(drop)
        })
        .await
    }

    /// Destroys the domain if it exists and is ours; a domain of that name that is not
    /// ours is refused. Returns whether one was destroyed. Waits (bounded) until libvirt
    /// has forgotten it.
    pub(crate) async fn destroy_ours(&self, name: &str, lease_hex: &str) -> Result<bool, VmmError> {
        let (n, hex) = (name.to_string(), lease_hex.to_string());
        let destroyed = self
            .call(&format!("destroy domain {name}"), move |c| {
                let attempt = || {
                    let d = c.lookup_domain_by_name(&n)?;
                    if !domain_is_ours(&d, &hex)? {
                        return Ok(Err(true));
                    }
                    d.destroy().map(|()| Ok(true))
                };
                match attempt() {
                    // gone, or going away by itself (a guest that powered off)
                    Err(e) if is_no_domain(&e) || is_not_running(&e) => Ok(Err(false)),
                    other => other,
                }
            })
            .await?;
        match destroyed {
            Err(true) => Err(VmmError::ForeignDomain { name: name.to_string() }),
            Err(false) => Ok(false),
            Ok(d) => {
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.find(name, lease_hex).await?.is_some() && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(d)
            }
        }
    }

    /// The domain's run state, as `status` reports it.
    pub(crate) async fn state(&self, name: &str) -> Result<GuestState, VmmError> {
        let n = name.to_string();
        self.call(&format!("read the state of domain {name}"), move |c| match c.lookup_domain_by_name(&n) {
            Ok(d) => Ok(match d.state()?.0 {
                Enum::Known(DomainState::Running) => GuestState::Running,
                Enum::Known(DomainState::Paused) => GuestState::Paused,
                Enum::Known(DomainState::Shutoff) => GuestState::Exited,
                other => GuestState::Other(format!("libvirt state {other:?}")),
            }),
            Err(e) if is_no_domain(&e) => Ok(GuestState::Exited),
            Err(e) => Err(e),
        })
        .await
    }
}

fn is_no_domain(e: &virt::error::Error) -> bool {
    e.code() == Enum::Known(virt::error::ErrorNumber::NoDomain)
}

/// "domain is not running": destroying one that is shutting off by itself.
fn is_not_running(e: &virt::error::Error) -> bool {
    e.code() == Enum::Known(virt::error::ErrorNumber::OperationInvalid)
}

/// Transient and carrying peervm's metadata for `lease_hex`.
fn domain_is_ours(d: &Domain, lease_hex: &str) -> Result<bool, virt::error::Error> {
    if d.is_persistent()? {
        return Ok(false);
    }
    Ok(is_ours(&d.xml_desc(0)?, lease_hex))
}
