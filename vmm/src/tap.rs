//! The lease's tap device, made as `ip tuntap add dev tap0 mode tap vnet_hdr` makes it: a
//! persistent, root-owned tap with virtio-net headers, which QEMU's launch attaches to
//! before it drops root (launch.rs; docs/vmm.md "Network").

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

/// Creates the persistent tap `name` in this thread's network namespace (the caller's
/// thread is inside the lease namespace: netns::enter).
pub(crate) fn create_persistent(name: &str) -> io::Result<()> {
    let req = IfReq::tap(name)?;
    let tun = OpenOptions::new().read(true).write(true).open("/dev/net/tun")?;
    // SAFETY: ioctls on a descriptor we own, with a request struct of the kernel's
    // layout that outlives the call
    unsafe {
        if libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req as *const IfReq) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // closing the descriptor leaves the device: it is persistent
    Ok(())
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
}
