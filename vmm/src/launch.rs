//! Starting a QEMU process with its isolation in place before it runs a single
//! instruction: in the lease's network namespace (with the tap device attached), inside
//! the lease's cgroup, in a session of its own, as the unprivileged QEMU user, with only
//! the descriptors it is meant to have.
//!
//! All of that happens in the forked child before exec (`pre_exec`), using only
//! async-signal-safe system calls on data prepared in the parent.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
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
    /// /run/netns/<name>: its path (for errors) and the file, opened.
    pub netns: Option<(PathBuf, File)>,
    /// The lease cgroup's cgroup.procs files: their paths (for errors) and the files,
    /// opened for writing.
    pub cgroup_procs: Vec<(PathBuf, File)>,
    /// Descriptors QEMU inherits under their own numbers (the command line names them).
    pub inherit: Vec<OwnedFd>,
    pub tap: Option<TapAttach>,
    /// QEMU's stdout and stderr (the serial console and QEMU's messages).
    pub output: Option<File>,
}

/// The step of a launch that failed, naming what it acted on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchStep {
    /// In this process, or in the child before the steps below: descriptors, the fork,
    /// the child's standard descriptors and working directory.
    Prepare,
    NewSession,
    EnterNetns(PathBuf),
    OpenTun,
    /// `TUNSETIFF` on the tap of that name (EBUSY: another descriptor is attached to it,
    /// tap.rs).
    AttachTap(String),
    PlaceTap,
    /// Writing to that `cgroup.procs` file.
    JoinCgroup(PathBuf),
    KeepDescriptors,
    DropPrivileges,
    NoNewPrivs,
    Exec(PathBuf),
}

impl fmt::Display for LaunchStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchStep::Prepare => write!(f, "cannot prepare the child (descriptors, fork, stdio, working directory)"),
            LaunchStep::NewSession => write!(f, "cannot start a session (setsid)"),
            LaunchStep::EnterNetns(p) => write!(f, "cannot enter the network namespace {} (setns)", p.display()),
            LaunchStep::OpenTun => write!(f, "cannot open /dev/net/tun"),
            LaunchStep::AttachTap(name) => write!(f, "cannot attach to tap {name} (TUNSETIFF)"),
            LaunchStep::PlaceTap => write!(f, "cannot move the tap descriptor to its number (dup2)"),
            LaunchStep::JoinCgroup(p) => write!(f, "cannot join the cgroup: write to {}", p.display()),
            LaunchStep::KeepDescriptors => write!(f, "cannot clear close-on-exec on an inherited descriptor"),
            LaunchStep::DropPrivileges => write!(f, "cannot switch to the QEMU user (setgroups/setgid/setuid)"),
            LaunchStep::NoNewPrivs => write!(f, "cannot set PR_SET_NO_NEW_PRIVS"),
            LaunchStep::Exec(p) => write!(f, "cannot exec {}", p.display()),
        }
    }
}

/// A launch that failed: the step and the kernel's error.
#[derive(Debug, thiserror::Error)]
#[error("{step}: {source}")]
pub struct LaunchError {
    pub step: LaunchStep,
    #[source]
    pub source: io::Error,
}

/// What the child writes to the report pipe: `STARTED` when its own steps begin, then
/// the code of the step that failed. `JOIN_CGROUP + i` is the `i`th cgroup.procs file.
mod report {
    pub const STARTED: u8 = 1;
    pub const NEW_SESSION: u8 = 2;
    pub const ENTER_NETNS: u8 = 3;
    pub const OPEN_TUN: u8 = 4;
    pub const ATTACH_TAP: u8 = 5;
    pub const PLACE_TAP: u8 = 6;
    pub const KEEP_DESCRIPTORS: u8 = 7;
    pub const DROP_PRIVILEGES: u8 = 8;
    pub const NO_NEW_PRIVS: u8 = 9;
    pub const JOIN_CGROUP: u8 = 16;
}

impl Launch<'_> {
    /// Spawns the program; a failure names the step (`LaunchStep`), which the child
    /// reports through a pipe of its own: std passes only the errno back.
    pub fn spawn(self) -> Result<Child, LaunchError> {
        let prepare = |source| LaunchError { step: LaunchStep::Prepare, source };
        let mut cmd = Command::new(self.program);
        cmd.args(&self.args).env_clear().current_dir("/").stdin(Stdio::null()).kill_on_drop(false);
        match &self.output {
            Some(f) => {
                cmd.stdout(f.try_clone().map_err(prepare)?).stderr(f.try_clone().map_err(prepare)?);
            }
            None => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            }
        }

        let netns_fd: Option<RawFd> = self.netns.as_ref().map(|(_, f)| f.as_raw_fd());
        let procs: Vec<RawFd> = self.cgroup_procs.iter().map(|(_, f)| f.as_raw_fd()).collect();
        let inherit: Vec<RawFd> = self.inherit.iter().map(|f| f.as_raw_fd()).collect();
        let tap: Option<(IfReq, RawFd)> = match &self.tap {
            Some(t) => Some((IfReq::tap(&t.name).map_err(prepare)?, t.placeholder.as_raw_fd())),
            None => None,
        };
        let tun_path = CString::new("/dev/net/tun").map_err(|e| prepare(io::Error::other(e)))?;
        let (uid, gid) = (self.user.uid, self.user.gid);
        let groups: Vec<libc::gid_t> = self.user.groups.clone();
        let (report_rx, report_tx) = report_pipe().map_err(prepare)?;
        let report_fd = report_tx.as_raw_fd();
        let names = StepNames {
            program: self.program.to_path_buf(),
            netns: self.netns.as_ref().map(|(p, _)| p.clone()),
            tap: self.tap.as_ref().map(|t| t.name.clone()),
            cgroup_procs: self.cgroup_procs.iter().map(|(p, _)| p.clone()).collect(),
        };

        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls on memory prepared above (no allocation, no
        // locks).
        unsafe {
            cmd.pre_exec(move || {
                // the errno first: the report's write may change it
                let failed = |code: u8| {
                    let e = io::Error::last_os_error();
                    libc::write(report_fd, (&code as *const u8).cast(), 1);
                    Err(e)
                };
                libc::write(report_fd, (&report::STARTED as *const u8).cast(), 1);
                // a session of its own: the provider's terminal and process-group signals
                // do not reach the guest, and the guest outlives a provider crash so that
                // reconcile can re-adopt it
                if libc::setsid() < 0 {
                    return failed(report::NEW_SESSION);
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return failed(report::ENTER_NETNS);
                }
                if let Some((req, placeholder)) = &tap {
                    // opened after setns: a tun descriptor belongs to the namespace it
                    // was opened in, and root may attach to the root-owned tap
                    let fd = libc::open(tun_path.as_ptr(), libc::O_RDWR);
                    if fd < 0 {
                        return failed(report::OPEN_TUN);
                    }
                    if libc::ioctl(fd, TUNSETIFF, req as *const IfReq) != 0 {
                        return failed(report::ATTACH_TAP);
                    }
                    if libc::dup2(fd, *placeholder) < 0 {
                        return failed(report::PLACE_TAP);
                    }
                    libc::close(fd);
                }
                // join the cgroup before exec: every QEMU thread, the guest's vCPUs
                // included, starts inside the limits
                for (i, fd) in procs.iter().enumerate() {
                    if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                        // at most four hierarchies (cgroup.rs): the code stays below 256
                        return failed(report::JOIN_CGROUP + i as u8);
                    }
                }
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                        return failed(report::KEEP_DESCRIPTORS);
                    }
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return failed(report::DROP_PRIVILEGES);
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return failed(report::NO_NEW_PRIVS);
                }
                libc::umask(0o077);
                Ok(())
            });
        }
        let child = cmd.spawn();
        // the parent's copies close here; the child holds its own
        drop(self.inherit);
        drop(self.tap);
        drop(report_tx);
        child.map_err(|source| {
            // std returns once the child has exec'd or failed, and the child reports
            // before it fails: what it wrote is in the pipe
            let mut codes = [0u8; 4];
            // SAFETY: read into a buffer of that length from the non-blocking pipe we own
            let n = unsafe { libc::read(report_rx.as_raw_fd(), codes.as_mut_ptr().cast(), codes.len()) };
            let codes = &codes[..usize::try_from(n).unwrap_or(0)];
            let step = match codes {
                [] => LaunchStep::Prepare,
                [report::STARTED] => LaunchStep::Exec(names.program),
                [_, code, ..] => names.step_of(*code),
                _ => LaunchStep::Prepare,
            };
            LaunchError { step, source }
        })
    }
}

/// What the steps act on, kept for the error after the launch's descriptors are gone.
struct StepNames {
    program: PathBuf,
    netns: Option<PathBuf>,
    tap: Option<String>,
    cgroup_procs: Vec<PathBuf>,
}

impl StepNames {
    /// The step the child reported as `code`.
    fn step_of(self, code: u8) -> LaunchStep {
        match code {
            report::NEW_SESSION => LaunchStep::NewSession,
            report::ENTER_NETNS => LaunchStep::EnterNetns(self.netns.unwrap_or_default()),
            report::OPEN_TUN => LaunchStep::OpenTun,
            report::ATTACH_TAP => LaunchStep::AttachTap(self.tap.unwrap_or_default()),
            report::PLACE_TAP => LaunchStep::PlaceTap,
            report::KEEP_DESCRIPTORS => LaunchStep::KeepDescriptors,
            report::DROP_PRIVILEGES => LaunchStep::DropPrivileges,
            report::NO_NEW_PRIVS => LaunchStep::NoNewPrivs,
            c => match c.checked_sub(report::JOIN_CGROUP).and_then(|i| self.cgroup_procs.get(usize::from(i))) {
                Some(p) => LaunchStep::JoinCgroup(p.clone()),
                None => LaunchStep::Prepare,
            },
        }
    }
}

/// The report pipe: (read end, write end), both close-on-exec (an exec'd QEMU has
/// neither) and non-blocking (the parent reads what is there and does not wait).
fn report_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into an array of two descriptors, which we then own
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by nothing else
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A descriptor number reserved for the tap: a CLOEXEC /dev/null the child overwrites.
pub(crate) fn reserve_fd() -> io::Result<OwnedFd> {
    Ok(File::open("/dev/null")?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn this_user() -> QemuUser {
        // SAFETY: getuid/getgid cannot fail
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        QemuUser { name: "test".into(), uid, gid, groups: Vec::new() }
    }

    fn launch<'a>(program: &'a Path, user: &'a QemuUser) -> Launch<'a> {
        Launch {
            program,
            args: Vec::new(),
            user,
            netns: None,
            cgroup_procs: Vec::new(),
            inherit: Vec::new(),
            tap: None,
            output: None,
        }
    }

    /// The child's step reaches the error with the file it wrote to: a cgroup.procs
    /// stand-in opened read-only, so the write fails (EBADF).
    #[tokio::test]
    async fn a_failed_cgroup_join_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let procs = dir.path().join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let user = this_user();
        let mut l = launch(Path::new("/bin/true"), &user);
        l.cgroup_procs = vec![(procs.clone(), File::open(&procs).unwrap())];
        let err = l.spawn().unwrap_err();
        assert_eq!(err.step, LaunchStep::JoinCgroup(procs.clone()));
        assert_eq!(err.source.raw_os_error(), Some(libc::EBADF));
        assert!(err.to_string().contains(&procs.display().to_string()), "{err}");
    }

    /// The error of the flaky CI start, now with its step: a tap another descriptor is
    /// attached to refuses QEMU's launch with EBUSY at `TUNSETIFF` (tap.rs). And a
    /// program that is not there fails at exec, after every step of ours.
    #[ignore = "needs root: creates a network namespace and a tap in it"]
    #[tokio::test]
    async fn a_busy_tap_and_a_missing_program_name_their_steps() {
        peervm_testenv::Needs::netns().require();
        let ns = format!("pvlaunchtest-{}", std::process::id());
        let _ = crate::netns::delete(&ns).await;
        crate::netns::create(&ns).await.unwrap();
        let holder = crate::netns::enter(&ns, || {
            crate::tap::create_persistent(crate::network::NS_TAP).unwrap();
            let req = IfReq::tap(crate::network::NS_TAP).unwrap();
            let tun = std::fs::OpenOptions::new().read(true).write(true).open("/dev/net/tun").unwrap();
            // SAFETY: TUNSETIFF on a descriptor we own: it holds the tap from now on
            assert_eq!(unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &req as *const IfReq) }, 0);
            Ok(tun)
        })
        .await
        .unwrap();
        let user = this_user();
        let netns = || (crate::netns::path(&ns), crate::netns::open(&ns).unwrap());
        let mut l = launch(Path::new("/bin/true"), &user);
        l.netns = Some(netns());
        l.tap = Some(TapAttach { name: crate::network::NS_TAP.into(), placeholder: reserve_fd().unwrap() });
        let busy = l.spawn().unwrap_err();
        drop(holder);
        let mut l = launch(Path::new("/nonexistent/qemu"), &user);
        l.netns = Some(netns());
        l.tap = Some(TapAttach { name: crate::network::NS_TAP.into(), placeholder: reserve_fd().unwrap() });
        let missing = l.spawn().unwrap_err();
        crate::netns::delete(&ns).await.unwrap();

        assert_eq!(busy.step, LaunchStep::AttachTap("tap0".into()), "{busy}");
        assert_eq!(busy.source.raw_os_error(), Some(libc::EBUSY), "{busy}");
        assert_eq!(busy.to_string(), "cannot attach to tap tap0 (TUNSETIFF): Device or resource busy (os error 16)");
        assert_eq!(missing.step, LaunchStep::Exec("/nonexistent/qemu".into()), "{missing}");
        assert_eq!(missing.source.raw_os_error(), Some(libc::ENOENT), "{missing}");
    }
}
