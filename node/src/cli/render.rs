//! How the commands show things to people: times, replies, shell words.

use peervm_node::requestor::db::StoredLease;
use peervm_protocol::ReplyOutcome;

/// `unix_ms` relative to now, for people: "in 59m58s", "3s ago".
pub fn format_time(unix_ms: u64) -> String {
    format_time_at(unix_ms, peervm_node::clock::now_unix_ms())
}

/// `unix_ms` relative to `now`, for people: "in 59m58s", "3s ago".
pub fn format_time_at(unix_ms: u64, now: u64) -> String {
    let delta = unix_ms as i64 - now as i64;
    let abs = delta.unsigned_abs() / 1000;
    let human = if abs >= 3600 {
        format!("{}h{:02}m", abs / 3600, (abs % 3600) / 60)
    } else if abs >= 60 {
        format!("{}m{:02}s", abs / 60, abs % 60)
    } else {
        format!("{abs}s")
    };
    if delta >= 0 { format!("in {human}") } else { format!("{human} ago") }
}

/// A lease's END column in `lease list`: when a running lease ends ("in 59m58s"), when
/// a finished one ended ("5m02s ago"), or "-" when that is not known.
pub fn end_column(l: &StoredLease, now: u64) -> String {
    let at = if l.state.is_finished() { l.ended_at_unix_ms } else { l.access.as_ref().map(|a| a.ends_at_unix_ms) };
    at.map_or_else(|| "-".into(), |at| format_time_at(at, now))
}

/// When and why a finished lease ended, for people ("5m02s ago: terminated by you");
/// `None` while it has not. A finished lease never shows when it "ends" (issue 20).
pub fn ended_line(l: &StoredLease, now: u64) -> Option<String> {
    if !l.state.is_finished() {
        return None;
    }
    let why = if l.detail.is_empty() { l.state.as_str() } else { l.detail.as_str() };
    Some(match l.ended_at_unix_ms {
        Some(at) => format!("{}: {why}", format_time_at(at, now)),
        None => why.to_string(),
    })
}

pub fn describe_outcome(o: &ReplyOutcome) -> String {
    match o {
        ReplyOutcome::Denied { reason, detail } => format!("the provider refused: {reason}: {detail}"),
        other => format!("unexpected reply from the provider: {other:?}"),
    }
}

/// `s` quoted for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:@,%+".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// An error and its causes on one line, each said once. Many errors of this crate name
/// their cause in their own message (`cannot read config X: No such file...`) and also
/// keep it as `source()` for callers that walk the chain; printing the chain as is
/// (`{:#}`) would then say the cause twice. A cause whose text the line already holds is
/// left out.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use peervm_node::requestor::db::{Access, StoredLease};
    use peervm_node::requestor::lease_end::{EXPIRED, TERMINATED};
    use peervm_protocol::{GuestSpec, LeaseId, LeaseState};

    use super::{end_column, ended_line, error_line};

    const NOW: u64 = 10_000_000;

    fn lease(state: LeaseState, detail: &str, ended_at: Option<u64>, granted: bool) -> StoredLease {
        StoredLease {
            id: LeaseId([7; 16]),
            provider: libp2p::PeerId::random(),
            provider_addrs: Vec::new(),
            spec: GuestSpec {
                expose: Vec::new(),
                vcpus: 1,
                memory_mib: 256,
                disk_gib: 1,
                image_name: "minimal".into(),
                image_sha256: [0; 32],
            },
            key_path: "/k".into(),
            created_at_unix_ms: 1,
            state,
            access: granted.then(|| Access {
                ssh_host: "127.0.0.1".into(),
                ssh_port: 27400,
                ssh_user: "peervm".into(),
                host_key: [3; 32],
                // the lease's end is still 5m51s away
                ends_at_unix_ms: NOW + 351_000,
                price_per_hour_micros: 1,
                currency: "USD".into(),
                grant: Vec::new(),
                exposed: Vec::new(),
            }),
            detail: detail.into(),
            ended_at_unix_ms: ended_at,
            denial: None,
        }
    }

    #[test]
    fn a_running_lease_shows_when_it_ends() {
        let l = lease(LeaseState::Running, "", None, true);
        assert_eq!(end_column(&l, NOW), "in 5m51s");
        assert_eq!(ended_line(&l, NOW), None);
    }

    #[test]
    fn an_ended_lease_shows_when_it_ended_and_why_never_when_it_ends() {
        let terminated = lease(LeaseState::Ended, TERMINATED, Some(NOW - 62_000), true);
        assert_eq!(end_column(&terminated, NOW), "1m02s ago");
        assert_eq!(ended_line(&terminated, NOW).unwrap(), "1m02s ago: terminated by you");
        let expired = lease(LeaseState::Ended, EXPIRED, Some(NOW - 5_000), true);
        assert_eq!(ended_line(&expired, NOW).unwrap(), "5s ago: expired");
        let failed = lease(LeaseState::Failed, "denied: no_capacity: 2 vCPUs free", Some(NOW - 3_000), false);
        assert_eq!(
            (end_column(&failed, NOW), ended_line(&failed, NOW).unwrap()),
            ("3s ago".into(), "3s ago: denied: no_capacity: 2 vCPUs free".into())
        );
        // ended when the requestor cannot know: the reason alone, no time made up
        let early = lease(LeaseState::Ended, "ended by the provider before its end", None, true);
        assert_eq!(end_column(&early, NOW), "-");
        assert_eq!(ended_line(&early, NOW).unwrap(), "ended by the provider before its end");
        for l in [&terminated, &expired, &failed, &early] {
            assert!(!end_column(l, NOW).starts_with("in "), "{l:?}");
            assert!(!ended_line(l, NOW).unwrap().contains("in 5m51s"), "{l:?}");
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read config /nonexistent.toml: {source}")]
    struct SaysItsCause {
        #[source]
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the provider")]
    struct KeepsItsCause {
        #[source]
        source: SaysItsCause,
    }

    fn not_found() -> std::io::Error {
        std::io::Error::from(std::io::ErrorKind::NotFound)
    }

    #[test]
    fn a_cause_already_in_the_message_is_said_once() {
        let e = anyhow::Error::new(SaysItsCause { source: not_found() });
        let line = error_line(&e);
        assert_eq!(line, format!("cannot read config /nonexistent.toml: {}", not_found()));
        assert_eq!(line.matches(&not_found().to_string()).count(), 1, "{line}");
        // what `{:#}` printed before
        assert_eq!(format!("{e:#}").matches(&not_found().to_string()).count(), 2);
    }

    #[test]
    fn causes_not_in_the_message_are_appended_in_order() {
        let e = anyhow::Error::new(KeepsItsCause { source: SaysItsCause { source: not_found() } });
        assert_eq!(
            error_line(&e),
            format!("cannot start the provider: cannot read config /nonexistent.toml: {}", not_found())
        );
        let e = anyhow::Error::new(not_found()).context("cannot open the admin socket /run/x.sock");
        assert_eq!(error_line(&e), format!("cannot open the admin socket /run/x.sock: {}", not_found()));
    }
}
