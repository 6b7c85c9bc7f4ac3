//! How the commands show things to people: times, replies, shell words.

use peervm_protocol::ReplyOutcome;

/// `unix_ms` relative to now, for people: "in 59m58s", "3s ago".
pub fn format_time(unix_ms: u64) -> String {
    let now = peervm_node::clock::now_unix_ms();
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
