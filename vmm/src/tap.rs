//! The lease's tap device, made as `ip tuntap add dev tap0 mode tap vnet_hdr` makes it: a
//! persistent, root-owned tap with virtio-net headers, which QEMU's launch attaches to
//! before it drops root (launch.rs; docs/vmm.md "Network").
//!
//! A tap without `IFF_MULTI_QUEUE` takes one attached descriptor at a time: a second
//! `TUNSETIFF` fails with `EBUSY` while any copy of the creating descriptor is open. A
//! process that forks while that descriptor is open copies it into the child, which
//! holds it until it execs (close-on-exec) or exits: a QEMU launch forked by a lease
//! starting beside this one keeps it through its whole `pre_exec` (docs/vmm.md
//! "Network", "The creating descriptor"). So the descriptor is opened only in a
//! descriptor table that no other thread or process shares.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;

pub(crate) const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: a name and the flags.
#[repr(C)]
pub(crate) struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// The request for the tap `name`: no packet information header, virtio-net headers.
    pub(crate) fn tap(name: &str) -> io::Result<Self> {
        let mut req = IfReq { name: [0; 16], flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, _pad: [0; 22] };
        let n = name.as_bytes();
        // the last byte stays NUL
        if n.is_empty() || n.len() >= req.name.len() || n.contains(&0) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tap name {name:?}: 1-15 bytes")));
        }
        req.name[..n.len()].copy_from_slice(n);
        Ok(req)
    }
}

/// Creates the persistent tap `name` in the calling thread's network namespace (a thread
/// inside the lease namespace, netns::enter's, or a host-namespace one for the libvirt
/// backend's host tap).
///
/// When this returns, no descriptor attached to the tap is left anywhere: the next
/// `TUNSETIFF` (QEMU's launch, or libvirt's QEMU) attaches.
pub(crate) fn create_persistent(name: &str) -> io::Result<()> {
    create_persistent_observed(name, || {})
}

/// `create_persistent`, calling `while_open` while the creating descriptor is open (the
/// tests fork there).
fn create_persistent_observed(name: &str, while_open: impl FnOnce() + Send) -> io::Result<()> {
    let req = IfReq::tap(name)?;
    // A thread of its own: a new thread is in its creator's network namespace, and
    // unsharing its descriptor table touches no other thread (unshare(2) on a Tokio
    // worker would cut that worker off the descriptors its other tasks open).
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new().name("tap".into()).spawn_scoped(scope, move || {
            // SAFETY: unshare with a flag only; it gives this thread, which ends below, a
            // private copy of the descriptor table, so the tun descriptor opened next is in
            // no table another thread forks from (module comment). The copy also holds
            // every other descriptor of the process until this thread ends, a few system
            // calls later: a concurrent spawn's exec-status pipe reaches EOF that much later
            if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
            // SAFETY: ioctls on a descriptor we own, with a request struct of the
            // kernel's layout that outlives the call
            unsafe {
                if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req as *const IfReq) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            while_open();
            // closing the only copy detaches it; the device stays: it is persistent
            drop(tun);
            Ok(())
        })?;
        worker.join().map_err(|_| io::Error::other("the tap thread panicked"))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_ifreq() {
        let req = IfReq::tap("tap0").unwrap();
        assert_eq!(&req.name[..5], b"tap0\0");
        assert_eq!(req.flags, 0x5002);
        assert!(IfReq::tap("fifteen-bytes-x").is_ok());
        assert!(IfReq::tap("sixteen-bytes-xx").is_err());
        assert!(IfReq::tap("").is_err());
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    /// A fork by another thread while the tap is being created (what a lease starting
    /// beside it does) leaves the tap free: QEMU's `TUNSETIFF` attaches. Without the
    /// private descriptor table the forked child holds a copy of the creating descriptor
    /// and the attach fails with EBUSY, as the network isolation test's second guest once
    /// did ("cannot start qemu-system-x86_64: Device or resource busy").
    #[ignore = "needs root: creates a network namespace and a tap in it"]
    #[tokio::test]
    async fn a_fork_during_creation_does_not_hold_the_tap() {
        peervm_testenv::Needs::netns().require();
        let ns = format!("pvtaptest-{}", std::process::id());
        let _ = crate::netns::delete(&ns).await;
        crate::netns::create(&ns).await.unwrap();
        let outcome = fork_during_creation_then_attach(&ns).await;
        crate::netns::delete(&ns).await.unwrap();
        outcome.unwrap();
    }

    /// Creates `tap0` in `ns` while a thread that shares the process's descriptor table
    /// forks a child that waits (as a launch's child does in `pre_exec`), then attaches to
    /// the tap before that child is released.
    async fn fork_during_creation_then_attach(ns: &str) -> Result<(), String> {
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::sync::{Arc, Mutex, mpsc};
        let (fork_now, fork_rx) = mpsc::channel::<()>();
        let (forked_tx, forked) = mpsc::channel::<(i32, OwnedFd)>();
        // started here, not on the tap thread: it forks from the process's shared table
        let forker = std::thread::spawn(move || {
            if fork_rx.recv().is_err() {
                return;
            }
            let mut fds = [0; 2];
            // SAFETY: pipe2 into an array of two; fork, after which the child makes only
            // async-signal-safe calls (read, _exit)
            unsafe {
                assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
                let pid = libc::fork();
                if pid == 0 {
                    // its copy of the write end would keep the read from ever ending
                    libc::close(fds[1]);
                    let mut b = 0u8;
                    libc::read(fds[0], (&mut b as *mut u8).cast(), 1);
                    libc::_exit(0);
                }
                assert!(pid > 0, "fork failed");
                libc::close(fds[0]);
                let _ = forked_tx.send((pid, OwnedFd::from_raw_fd(fds[1])));
            }
        });
        let child: Arc<Mutex<Option<(i32, OwnedFd)>>> = Arc::default();
        let held = child.clone();
        let created = crate::netns::enter(ns, move || {
            Ok(create_persistent_observed(crate::network::NS_TAP, move || {
                let _ = fork_now.send(());
                *held.lock().unwrap() = forked.recv().ok();
            }))
        })
        .await;
        forker.join().unwrap();
        let attached = crate::netns::enter(ns, || {
            let req = IfReq::tap(crate::network::NS_TAP).unwrap();
            let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
            // SAFETY: TUNSETIFF on a descriptor we own, as launch.rs does
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req as *const IfReq) };
            Ok(if r == 0 { Ok(()) } else { Err(io::Error::last_os_error()) })
        })
        .await;
        let child = child.lock().unwrap().take();
        let forked_during_creation = child.is_some();
        if let Some((pid, release)) = child {
            // the child's read returns at EOF: it exits
            drop(release);
            // SAFETY: waitpid on the child forked above
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
        }
        created.map_err(|e| format!("enter: {e}"))?.map_err(|e| format!("create: {e}"))?;
        if !forked_during_creation {
            return Err("no child was forked while the tap was being created".into());
        }
        attached
            .map_err(|e| format!("enter: {e}"))?
            .map_err(|e| format!("attach while a child forked during creation is alive: {e}"))
    }
}
