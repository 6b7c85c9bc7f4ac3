//! A denial on its way to becoming a signed reply: a typed reason for programs, a detail
//! for humans (docs/protocol.md section 7, the `denied` outcome).

use peervm_protocol::DenyReason;

/// Denial details are for humans; they are capped so a reply always fits its size cap.
pub(super) const MAX_DETAIL: usize = 300;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Denial {
    pub reason: DenyReason,
    pub detail: String,
}

pub(super) fn deny(reason: DenyReason, detail: impl Into<String>) -> Denial {
    Denial { reason, detail: detail.into() }
}

/// A failure of the provider itself: logged in full here, answered without its details
/// (they may name files and databases).
pub(super) fn internal(e: impl std::fmt::Display) -> Denial {
    tracing::error!(error = %e, "lease manager error");
    deny(DenyReason::Internal, "internal error on the provider")
}

/// Cuts `s` to at most `max` bytes on a character boundary.
pub(super) fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_keeps_whole_characters() {
        let mut s = "aé".repeat(3); // 9 bytes, é is 2
        truncate(&mut s, 5);
        assert_eq!(s, "aéa");
        let mut short = "ok".to_string();
        truncate(&mut short, 5);
        assert_eq!(short, "ok");
    }
}
