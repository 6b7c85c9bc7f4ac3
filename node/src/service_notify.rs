//! systemd's service notification protocol (sd_notify(3)), written directly instead of
//! linking libsystemd: one datagram of newline-separated `KEY=VALUE` lines to the
//! AF_UNIX socket named by `$NOTIFY_SOCKET` (a path, or an abstract name written with a
//! leading `@`). Without `$NOTIFY_SOCKET` (not started by systemd as `Type=notify`)
//! every call does nothing.
//!
//! packaging/systemd/peervm-provider.service is `Type=notify`: systemd counts the
//! provider as started when it sends `READY=1`, after it listens and its images verified
//! (SECURITY.md, "Service units"). `peervm vmm-helper` sends the same once its socket
//! listens. A reload is bracketed by `RELOADING=1` (with `MONOTONIC_USEC`, which
//! `Type=notify-reload` of systemd 253 and later requires) and `READY=1`; `STOPPING=1`
//! starts the shutdown.

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// The environment variable systemd names its notification socket in.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "${NOTIFY_SOCKET_ENV} is `{0}`: neither an absolute path nor an abstract socket name (`@...`); vsock is not supported"
    )]
    Unsupported(String),
    #[error("cannot create a socket to notify systemd")]
    Socket(#[source] std::io::Error),
    #[error("cannot notify systemd through {socket}")]
    Send { socket: String, source: std::io::Error },
    #[error("cannot read CLOCK_MONOTONIC")]
    Clock(#[source] std::io::Error),
}

/// One line of a notification.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    /// Start-up (or a reload) is finished.
    Ready,
    /// A reload begins; `monotonic_usec` is CLOCK_MONOTONIC at that moment, so systemd
    /// can tell this reload from an older one ([`reloading_now`] fills it in).
    Reloading { monotonic_usec: u64 },
    /// Shutdown begins.
    Stopping,
    /// Free text `systemctl status` shows; newlines become spaces (one line per field).
    Status(String),
}

impl State {
    fn line(&self) -> String {
        match self {
            State::Ready => "READY=1".into(),
            State::Reloading { monotonic_usec } => format!("RELOADING=1\nMONOTONIC_USEC={monotonic_usec}"),
            State::Stopping => "STOPPING=1".into(),
            State::Status(text) => format!("STATUS={}", text.replace(['\n', '\r'], " ")),
        }
    }
}

/// `RELOADING=1` stamped with the current CLOCK_MONOTONIC.
pub fn reloading_now() -> Result<State, NotifyError> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we pass.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(NotifyError::Clock(std::io::Error::last_os_error()));
    }
    let monotonic_usec = (ts.tv_sec as u64).saturating_mul(1_000_000).saturating_add(ts.tv_nsec as u64 / 1_000);
    Ok(State::Reloading { monotonic_usec })
}

/// Where notifications go, read once from `$NOTIFY_SOCKET`.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
}

#[derive(Debug)]
enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; unset or empty means "not under systemd", and then
    /// [`Notifier::send`] does nothing.
    pub fn from_env() -> Result<Self, NotifyError> {
        Self::from_value(std::env::var_os(NOTIFY_SOCKET_ENV))
    }

    /// From a value of `$NOTIFY_SOCKET` (tests pass their own socket here).
    pub fn from_value(value: Option<OsString>) -> Result<Self, NotifyError> {
        let Some(value) = value.filter(|v| !v.is_empty()) else { return Ok(Notifier { target: None }) };
        let bytes = value.as_bytes();
        let target = match bytes.first() {
            Some(b'/') => Target::Path(PathBuf::from(value)),
            Some(b'@') => Target::Abstract(bytes[1..].to_vec()),
            _ => return Err(NotifyError::Unsupported(value.to_string_lossy().into_owned())),
        };
        Ok(Notifier { target: Some(target) })
    }

    /// Whether there is a socket to notify.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `states` as one datagram. Returns whether anything was sent (false without
    /// `$NOTIFY_SOCKET`).
    pub fn send(&self, states: &[State]) -> Result<bool, NotifyError> {
        let Some(target) = &self.target else { return Ok(false) };
        let message = states.iter().map(State::line).collect::<Vec<_>>().join("\n");
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        let sent = match target {
            Target::Path(path) => socket.send_to(message.as_bytes(), path),
            Target::Abstract(name) => {
                SocketAddr::from_abstract_name(name).and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
            }
        };
        sent.map_err(|source| NotifyError::Send { socket: self.describe(), source })?;
        Ok(true)
    }

    fn describe(&self) -> String {
        match &self.target {
            Some(Target::Path(p)) => p.display().to_string(),
            Some(Target::Abstract(name)) => format!("@{}", String::from_utf8_lossy(name)),
            None => "nothing".into(),
        }
    }
}

/// Sends `states` to `$NOTIFY_SOCKET`, if set, and logs a failure instead of returning
/// it: a daemon whose notification is lost is still serving, and systemd's start or
/// reload timeout reports the rest.
pub fn notify(states: &[State]) {
    if let Err(e) = Notifier::from_env().and_then(|n| n.send(states)) {
        let cause = std::error::Error::source(&e).map(|s| format!(": {s}")).unwrap_or_default();
        tracing::warn!("{e}{cause}");
    }
}

/// `READY=1` with a status line: the service is up (the provider after it listens and
/// its images verified, the VMM helper once its socket listens).
pub fn ready(status: &str) {
    notify(&[State::Ready, State::Status(status.to_string())]);
}

/// `RELOADING=1` (stamped) before a reload; [`ready`] ends it.
pub fn reloading() {
    match reloading_now() {
        Ok(state) => notify(&[state, State::Status("reloading the config".into())]),
        Err(e) => tracing::warn!("{e}"),
    }
}

/// `STOPPING=1` when shutdown begins.
pub fn stopping(status: &str) {
    notify(&[State::Stopping, State::Status(status.to_string())]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn receiver_at_path() -> (tempfile::TempDir, UnixDatagram, OsString) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        // a bound on a hang if nothing arrives; the tests wait for a datagram they sent
        rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        (dir, rx, path.into_os_string())
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).expect("a notification arrives");
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_and_status_arrive_as_one_datagram_at_a_path_socket() {
        let (_dir, rx, value) = receiver_at_path();
        let n = Notifier::from_value(Some(value)).unwrap();
        assert!(n.send(&[State::Ready, State::Status("serving\nas 12D3".into())]).unwrap());
        assert_eq!(recv(&rx), "READY=1\nSTATUS=serving as 12D3");
    }

    #[test]
    fn reloading_carries_the_monotonic_clock_and_stopping_is_sent_alone() {
        let (_dir, rx, value) = receiver_at_path();
        let n = Notifier::from_value(Some(value)).unwrap();
        let before = match reloading_now().unwrap() {
            State::Reloading { monotonic_usec } => monotonic_usec,
            other => panic!("{other:?}"),
        };
        n.send(&[reloading_now().unwrap()]).unwrap();
        let text = recv(&rx);
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"));
        let usec: u64 = lines.next().and_then(|l| l.strip_prefix("MONOTONIC_USEC=")).unwrap().parse().unwrap();
        assert!(usec >= before && before > 0, "{usec} < {before}");
        assert_eq!(lines.next(), None);

        n.send(&[State::Stopping]).unwrap();
        assert_eq!(recv(&rx), "STOPPING=1");
    }

    #[test]
    fn an_abstract_socket_written_with_at_is_reached() {
        let name = format!("peervm-notify-test-{}-{}", std::process::id(), rand::random::<u64>());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let n = Notifier::from_value(Some(format!("@{name}").into())).unwrap();
        assert!(n.send(&[State::Ready]).unwrap());
        assert_eq!(recv(&rx), "READY=1");
    }

    #[test]
    fn unset_or_empty_is_a_no_op_and_other_forms_are_refused() {
        for value in [None, Some(OsString::new())] {
            let n = Notifier::from_value(value).unwrap();
            assert!(!n.is_enabled());
            assert!(!n.send(&[State::Ready]).unwrap());
        }
        for bad in ["relative/notify", "vsock:2:1234"] {
            let e = Notifier::from_value(Some(bad.into())).unwrap_err();
            assert!(matches!(e, NotifyError::Unsupported(ref v) if v == bad), "{e:?}");
        }
    }

    #[test]
    fn a_socket_that_is_gone_is_an_error_naming_it() {
        let (dir, rx, value) = receiver_at_path();
        drop(rx);
        let n = Notifier::from_value(Some(value)).unwrap();
        let e = n.send(&[State::Ready]).unwrap_err();
        assert!(e.to_string().contains(&dir.path().display().to_string()), "{e}");
    }
}
