//! Wall-clock time for what the vault decides by the calendar: grace periods, version
//! expiry, rotation schedules, token expiry. The daemon runs on [`SystemClock`]; tests
//! inject a [`ManualClock`] and move it forward instead of sleeping.
//!
//! Durations measured inside the process (timeouts, TTLs of cache entries, latencies)
//! use `tokio::time::Instant`/`std::time::Instant` and are tested under
//! `tokio::time::pause()`; this clock is only for timestamps that are stored.

use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// The system's time, in [`Micros`].
pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Where the vault reads the time of day.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> Micros;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        now_micros()
    }
}

/// A clock that moves only when told to: shared by clones, so a test keeps one and
/// hands the other to the daemon.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    /// Starts at `at`.
    pub fn at(at: Micros) -> Self {
        ManualClock(Arc::new(AtomicI64::new(at)))
    }

    /// Starts at the system's time now.
    pub fn starting_now() -> Self {
        Self::at(now_micros())
    }

    /// Moves the clock forward by `by` (never backwards).
    pub fn advance(&self, by: std::time::Duration) {
        let us = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.0.fetch_add(us, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_told_and_clones_share_it() {
        let c = ManualClock::at(1_000);
        let d = c.clone();
        assert_eq!(c.now(), 1_000);
        d.advance(std::time::Duration::from_millis(3));
        assert_eq!(c.now(), 4_000);
    }

    #[test]
    fn the_system_clock_is_after_2020() {
        assert!(SystemClock.now() > 1_577_836_800_000_000);
    }
}
