//! The node's time: milliseconds since the Unix epoch. Every time rule of the protocol
//! takes "now" as a number (docs/architecture.md, "Protocol"); code that makes a
//! decision from the time takes a [`Clock`] so its tests can fix it.

pub use peervm_protocol::{Clock, FixedClock};

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        now_unix_ms()
    }
}
