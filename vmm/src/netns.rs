//! Named network namespaces, kept the way iproute2 keeps them: the namespace bind-mounted
//! on /run/netns/<name>, with /run/netns a shared mount point. `ip netns list` and
//! `ip netns exec` therefore work on a lease's namespace, for operators and tests alike
//! (docs/vmm.md "Network").
//!
//! A namespace belongs to a thread, not to the process: each step that has to be inside
//! one (making it, working in it) runs on a fresh thread of its own that ends with the
//! step, never on a Tokio worker, whose other tasks would run in the wrong namespace.
//! Nothing here forks (rtnetlink's own `NetworkNamespace::add` does: a fork in a
//! multi-threaded runtime copies locks other threads may hold).

use std::ffi::CString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::VmmError;

/// Where iproute2 (and so `ip netns`) keeps named namespaces.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// The mount point of namespace `name`.
pub(crate) fn path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Creates the namespace `name`; fails if one of that name exists.
pub(crate) async fn create(name: &str) -> Result<(), VmmError> {
    let owned = name.to_string();
    on_own_thread(move || create_on_this_thread(&owned)).await.map_err(|source| VmmError::Namespace {
        name: name.into(),
        action: "create",
        source,
    })
}

/// Removes the namespace `name` (`ip netns delete`): its mount, then its mount point.
/// The kernel frees the namespace, and the links inside it, once nothing holds it (a
/// running QEMU inside does). A namespace that is not there is no error.
pub(crate) async fn delete(name: &str) -> Result<(), VmmError> {
    let p = path(name);
    let removed = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let c = c_path(&p)?;
        // SAFETY: umount2 on a NUL-terminated path; MNT_DETACH so that a namespace file
        // some process still has open does not make this fail. Its result does not
        // matter: a mount point that is not mounted (a half-made namespace) is removed all
        // the same below, as iproute2 does.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    })
    .await
    .map_err(io::Error::other)
    .and_then(|r| r);
    removed.map_err(|source| VmmError::Namespace { name: name.into(), action: "delete", source })
}

/// The names of the named namespaces (`ip netns list`).
pub(crate) fn list() -> Result<Vec<String>, VmmError> {
    let entries = match fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(VmmError::io("cannot list", NETNS_DIR, e)),
    };
    Ok(entries.flatten().filter_map(|e| e.file_name().to_str().map(str::to_string)).collect())
}

/// The namespace `name`, opened: what `setns` and a link's `IFLA_NET_NS_FD` take.
pub(crate) fn open(name: &str) -> Result<File, VmmError> {
    File::open(path(name)).map_err(|source| VmmError::Namespace { name: name.into(), action: "open", source })
}

/// Runs `work` on a thread of its own inside the namespace `name`. What `work` opens
/// there (a netlink socket, a tun descriptor) stays bound to that namespace after the
/// thread has ended.
pub(crate) async fn enter<R, F>(name: &str, work: F) -> Result<R, VmmError>
where
    R: Send + 'static,
    F: FnOnce() -> Result<R, VmmError> + Send + 'static,
{
    let ns = open(name)?;
    let entered = on_own_thread(move || {
        // SAFETY: setns on a descriptor we own; it moves this thread, which ends after
        // `work`, and no other
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(work())
    })
    .await;
    match entered {
        Ok(result) => result,
        Err(source) => Err(VmmError::Namespace { name: name.into(), action: "enter", source }),
    }
}

/// What `ip netns add` does, on this (dedicated) thread, which it leaves inside the new
/// namespace.
fn create_on_this_thread(name: &str) -> io::Result<()> {
    share_netns_dir()?;
    let target = path(name);
    // the mount point, made exclusively: an existing namespace of that name is never
    // replaced
    OpenOptions::new().read(true).write(true).create_new(true).mode(0o000).open(&target)?;
    let bound = unshare_and_bind(&target);
    if bound.is_err() {
        let _ = fs::remove_file(&target);
    }
    bound
}

fn unshare_and_bind(target: &Path) -> io::Result<()> {
    // SAFETY: unshare with flags only; CLONE_NEWNET moves this thread alone into a new
    // network namespace
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: gettid has no arguments and cannot fail
    let tid = unsafe { libc::gettid() };
    // this thread's namespace: /proc/self/ns/net would be the main thread's
    let source = c_path(Path::new(&format!("/proc/self/task/{tid}/ns/net")))?;
    mount(&source, &c_path(target)?, libc::MS_BIND)
}

/// Makes /run/netns a shared mount point, as iproute2 does: a namespace unmounted in one
/// mount namespace is then unmounted in every mount namespace that sees it (such as a
/// provider's under systemd), so it is freed, not kept alive by a forgotten copy.
fn share_netns_dir() -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(0o755).create(NETNS_DIR)?;
    let dir = c_path(Path::new(NETNS_DIR))?;
    match mount(c"none", &dir, libc::MS_SHARED | libc::MS_REC) {
        // not a mount point yet: make it one (a bind mount onto itself), then share it
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            mount(&dir, &dir, libc::MS_BIND | libc::MS_REC)?;
            mount(c"none", &dir, libc::MS_SHARED | libc::MS_REC)
        }
        other => other,
    }
}

fn mount(source: &std::ffi::CStr, target: &std::ffi::CStr, flags: libc::c_ulong) -> io::Result<()> {
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call and no data
    if unsafe { libc::mount(source.as_ptr(), target.as_ptr(), c"none".as_ptr(), flags, std::ptr::null()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// Runs `work` on a new thread and waits for it without holding a runtime worker.
async fn on_own_thread<R, F>(work: F) -> io::Result<R>
where
    R: Send + 'static,
    F: FnOnce() -> io::Result<R> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("netns".into()).spawn(move || {
        let _ = tx.send(work());
    })?;
    rx.await.map_err(|_| io::Error::other("the namespace thread panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_iproute2_s() {
        assert_eq!(path("peervm-01"), Path::new("/run/netns/peervm-01"));
        assert!(c_path(Path::new("/run/netns/a\0b")).is_err());
    }
}
