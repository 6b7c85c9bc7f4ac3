//! When `peervm lease create` says again that the provider is still in a state. A
//! minimal guest answers in seconds, a debian-12 guest under software emulation takes
//! minutes (docs/guest-image.md, `boot_deadline_secs`): without an update the command
//! looks hung. The updates come at growing intervals, so a long boot stays visibly alive
//! without filling the terminal: after 10 s, after 30 s, then every 30 s.

use std::time::Duration;

/// The first update after this long in one state.
const FIRST: Duration = Duration::from_secs(10);
/// The second.
const SECOND: Duration = Duration::from_secs(30);
/// Then one every this long.
const EVERY: Duration = Duration::from_secs(30);

/// The time in the state at which the update after `in_state` is due: the first mark of
/// 10 s, 30 s, 60 s, 90 s, ... strictly later than `in_state`.
pub fn next_update(in_state: Duration) -> Duration {
    if in_state < FIRST {
        FIRST
    } else if in_state < SECOND {
        SECOND
    } else {
        let periods = (in_state - SECOND).as_secs() / EVERY.as_secs() + 1;
        SECOND.saturating_add(Duration::from_secs(EVERY.as_secs().saturating_mul(periods)))
    }
}

/// Whether an update is due now, `in_state` into the state, when the next was due at
/// `due`; if so, when the one after is due. A late check (a slow status poll) prints
/// one update and skips the marks it missed rather than printing them all at once.
pub fn update_due(in_state: Duration, due: Duration) -> Option<Duration> {
    (in_state >= due).then(|| next_update(in_state))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    /// The updates a 1-second poll prints over `total` seconds in one state.
    fn printed(total: u64) -> Vec<u64> {
        let mut due = next_update(Duration::ZERO);
        let mut out = Vec::new();
        for t in 0..=total {
            if let Some(next) = update_due(s(t), due) {
                out.push(t);
                due = next;
            }
        }
        out
    }

    #[test]
    fn updates_come_after_10_s_then_30_s_then_every_30_s() {
        assert_eq!(printed(5), Vec::<u64>::new(), "a quick boot prints nothing extra");
        assert_eq!(printed(150), [10, 30, 60, 90, 120, 150]);
    }

    #[test]
    fn the_next_mark_is_strictly_later() {
        assert_eq!(next_update(Duration::ZERO), s(10));
        assert_eq!(next_update(Duration::from_millis(9_999)), s(10));
        assert_eq!(next_update(s(10)), s(30));
        assert_eq!(next_update(s(29)), s(30));
        assert_eq!(next_update(s(30)), s(60));
        assert_eq!(next_update(Duration::from_millis(60_500)), s(90));
        assert_eq!(next_update(s(3600)), s(3630));
    }

    #[test]
    fn not_due_before_the_mark_and_a_late_check_prints_once() {
        assert_eq!(update_due(s(9), s(10)), None);
        assert_eq!(update_due(s(10), s(10)), Some(s(30)));
        // A poll that stalled from 9 s to 75 s: one update, the next at 90 s.
        assert_eq!(update_due(s(75), s(10)), Some(s(90)));
        assert_eq!(update_due(s(76), s(90)), None);
    }

    #[test]
    fn an_absurd_time_does_not_overflow() {
        let far = Duration::from_secs(u64::MAX / 4);
        assert!(next_update(far) > far);
    }
}
