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
    use super::error_line;

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
