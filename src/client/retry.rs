//! Retries with capped exponential backoff and full jitter, shared by unary calls and the
//! caching client's watch reconnects.

use std::time::Duration;

use rand::Rng as _;

/// When and how often a failed call is tried again. Only errors for which
/// [`Error::is_retryable`](super::Error::is_retryable) holds are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1: no retries).
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// No retry starts after this long since the first attempt.
    pub max_elapsed: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            max_elapsed: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> RetryPolicy {
        RetryPolicy { max_attempts: 1, ..RetryPolicy::default() }
    }

    pub(crate) fn backoff(&self) -> Backoff {
        Backoff::new(self.initial_backoff, self.max_backoff)
    }
}

/// Successive delays: full jitter over `initial * 2^n`, capped at `max` ("Exponential
/// Backoff and Jitter", AWS architecture blog), so that many clients cut off by the same
/// event do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff { initial, max: max.max(initial), attempt: 0 }
    }

    /// The next delay: uniform in [ceiling/2, ceiling], ceiling = min(max, initial * 2^n).
    /// Half the ceiling is kept as a floor so a reconnect loop never spins.
    pub fn next_delay(&mut self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        let floor = ceiling / 2;
        let span = ceiling.saturating_sub(floor).as_micros() as u64;
        floor + Duration::from_micros(rand::rng().random_range(0..=span))
    }

    /// Starts over (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_within_bounds() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(5) && delays[0] <= Duration::from_millis(10));
        assert!(delays[2] >= Duration::from_millis(20) && delays[2] <= Duration::from_millis(40));
        for d in &delays[4..] {
            assert!(*d >= Duration::from_millis(50) && *d <= Duration::from_millis(100), "{d:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
