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

/// A clock a test sets and moves forward, shared by its clones: expiry and freshness are
/// checked at exact times, without sleeping.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub struct ManualClock(std::sync::Arc<std::sync::atomic::AtomicU64>);

#[cfg(test)]
impl ManualClock {
    pub fn at(now_unix_ms: u64) -> Self {
        ManualClock(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(now_unix_ms)))
    }

    pub fn set(&self, now_unix_ms: u64) {
        self.0.store(now_unix_ms, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}
