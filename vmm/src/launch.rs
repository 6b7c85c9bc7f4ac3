//! Starting a QEMU process with its isolation in place before it runs a single
//! instruction: in the lease's network namespace (with the tap device attached), inside
//! the lease's cgroup, in a session of its own, as the unprivileged QEMU user, with only
//! the descriptors it is meant to have.
//!
//! All of that happens in the forked child before exec (`pre_exec`), using only
//! async-signal-safe system calls on data prepared in the parent.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::qemu_user::QemuUser;
use crate::tap::{IfReq, TUNSETIFF};

/// A tap device to open inside the namespace and hand to QEMU as descriptor `fd`.
pub(crate) struct TapAttach {
    /// Name of the (persistent) tap inside the lease namespace.
    pub name: String,
    /// A placeholder descriptor whose number the command line names; the child
    /// replaces it with the tap.
    pub placeholder: OwnedFd,
}

/// What the child does before exec.
pub(crate) struct Launch<'a> {
    pub program: &'a Path,
    pub args: Vec<String>,
    pub user: &'a QemuUser,
    /// /run/netns/<name>, opened.
    pub netns: Option<File>,
    /// The lease cgroup's cgroup.procs files, opened for writing.
    pub cgroup_procs: Vec<File>,
    /// Descriptors QEMU inherits under their own numbers (the command line names them).
    pub inherit: Vec<OwnedFd>,
    pub tap: Option<TapAttach>,
    /// QEMU's stdout and stderr (the serial console and QEMU's messages).
    pub output: Option<File>,
}

impl Launch<'_> {
    pub fn spawn(self) -> io::Result<Child> {
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args).env_clear().current_dir("/").stdin(Stdio::null()).kill_on_drop(false);
        match &self.output {
            Some(f) => {
                cmd.stdout(f.try_clone()?).stderr(f.try_clone()?);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }

        let netns_fd: Option<RawFd> = self.netns.as_ref().map(|f| f.as_raw_fd());
        let procs: Vec<RawFd> = self.cgroup_procs.iter().map(|f| f.as_raw_fd()).collect();
        let inherit: Vec<RawFd> = self.inherit.iter().map(|f| f.as_raw_fd()).collect();
        let tap: Option<(IfReq, RawFd)> = match &self.tap {
            Some(t) => Some((IfReq::tap(&t.name)?, t.placeholder.as_raw_fd())),
            None => None,
        };
        let tun_path = CString::new("/dev/net/tun").map_err(io::Error::other)?;
        let (uid, gid) = (self.user.uid, self.user.gid);
        let groups: Vec<libc::gid_t> = self.user.groups.clone();

        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on memory prepared above (no allocation, no
        // locks).
        unsafe {
            cmd.pre_exec(move || {
                // a session of its own: the provider's terminal and process-group signals
                // do not reach the guest, and the guest outlives a provider crash so that
                // reconcile can re-adopt it
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if let Some((req, placeholder)) = &tap {
                    // opened after setns: a tun descriptor belongs to the namespace it
                    // was opened in, and root may attach to the root-owned tap
                    let fd = libc::open(tun_path.as_ptr(), libc::O_RDWR);
                    if fd < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::ioctl(fd, TUNSETIFF, req as *const IfReq) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::dup2(fd, *placeholder) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                // join the cgroup before exec: every QEMU thread, the guest's vCPUs
                // included, starts inside the limits
                for fd in &procs {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(io::Error::last_os_error());
                    }
                }
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::umask(0o077);
                Ok(())
            });
        }
        let child = cmd.spawn();
        // the parent's copies close here; the child holds its own
        drop(self.inherit);
        drop(self.tap);
        child
    }
}

/// A descriptor number reserved for the tap: a CLOEXEC /dev/null the child overwrites.
pub(crate) fn reserve_fd() -> io::Result<OwnedFd> {
    Ok(File::open("/dev/null")?.into())
}
