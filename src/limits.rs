//! Limits: a per-token rate limit (token bucket), per-key and stream concurrency
//! limiters, and the `[transport]` settings. The gRPC edge applies them
//! (`service::layers::admission`): it reads a request's body under a time limit before
//! it takes a global and then a per-token concurrency permit (shedding, never queueing),
//! caps long-lived streams, and caps open connections.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A token bucket refilled at `rate` per second, bursting to one second's worth.
#[derive(Debug, Clone)]
pub struct TokenLimiter {
    limiter: Arc<DefaultDirectRateLimiter>,
}

impl TokenLimiter {
    /// `None` for 0 (no limit).
    pub fn per_second(rate: u32) -> Option<TokenLimiter> {
        let rate = NonZeroU32::new(rate)?;
        Some(TokenLimiter { limiter: Arc::new(RateLimiter::direct(Quota::per_second(rate))) })
    }

    /// `Err(wait)`: over the limit; a request may succeed after `wait`.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter.check().map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

/// Transport and admission settings (`[transport]`): what one connection, one token or
/// one unauthenticated caller may hold open. See README, "Transport and limits".
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransportSettings {
    /// Open client connections at most; beyond it new connections are closed at once.
    pub max_connections: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per connection.
    pub max_concurrent_streams: u32,
    /// Idle time before the server pings a connection.
    pub keepalive_interval_ms: u64,
    /// A ping not answered within this closes the connection.
    pub keepalive_timeout_ms: u64,
    /// Longest a request's body may take to arrive after its headers.
    pub request_body_timeout_ms: u64,
    /// Requests of one token in flight at most (within `limits.max_concurrent_requests`).
    pub max_concurrent_requests_per_token: usize,
    /// Open `WatchCredentials` and `WatchRotationJob` streams at most, all tokens together.
    pub max_watch_streams: usize,
    /// Open watch streams of one token at most.
    pub max_watch_streams_per_token: usize,
    /// Open health `Watch` and reflection streams at most (these need no token).
    pub max_unauthenticated_streams: usize,
}

impl Default for TransportSettings {
    fn default() -> Self {
        TransportSettings {
            max_connections: 1024,
            max_concurrent_streams: 100,
            keepalive_interval_ms: 30_000,
            keepalive_timeout_ms: 10_000,
            request_body_timeout_ms: 10_000,
            max_concurrent_requests_per_token: 256,
            max_watch_streams: 1024,
            max_watch_streams_per_token: 64,
            max_unauthenticated_streams: 64,
        }
    }
}

impl TransportSettings {
    pub fn validate(&self) -> Result<(), String> {
        let checks: [(&str, bool); 9] = [
            ("max_connections", self.max_connections == 0),
            ("max_concurrent_streams", self.max_concurrent_streams == 0),
            ("keepalive_interval_ms", self.keepalive_interval_ms == 0),
            ("keepalive_timeout_ms", self.keepalive_timeout_ms == 0),
            ("request_body_timeout_ms", self.request_body_timeout_ms == 0),
            ("max_concurrent_requests_per_token", self.max_concurrent_requests_per_token == 0),
            ("max_watch_streams", self.max_watch_streams == 0),
            ("max_watch_streams_per_token", self.max_watch_streams_per_token == 0),
            ("max_unauthenticated_streams", self.max_unauthenticated_streams == 0),
        ];
        if let Some((key, _)) = checks.iter().find(|(_, zero)| *zero) {
            return Err(format!("transport.{key} must be at least 1 (0 would refuse everything)"));
        }
        Ok(())
    }
}

pub mod names {
    pub const CONNECTIONS_OPEN: &str = "credvault_connections_open";
    pub const CONNECTIONS_REFUSED: &str = "credvault_connections_refused_total";
    pub const BODY_TIMEOUTS: &str = "credvault_request_body_timeouts_total";
    pub const STREAMS_REFUSED: &str = "credvault_streams_refused_total";
}

/// HELP text for the metrics above (called where the recorder is installed).
pub fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!(names::CONNECTIONS_OPEN, "Open client connections (transport.max_connections bounds them).");
    describe_counter!(names::CONNECTIONS_REFUSED, "Connections closed at accept: transport.max_connections reached.");
    describe_counter!(names::BODY_TIMEOUTS, "Requests whose body did not arrive within request_body_timeout_ms.");
    describe_counter!(names::STREAMS_REFUSED, "Streams refused by a stream cap, by kind.");
}

/// Counts per key (a token id), each bounded by `max`. Entries at zero are removed, so
/// the map holds only keys with something in flight.
#[derive(Debug)]
pub struct KeyedLimiter {
    max: usize,
    counts: Mutex<HashMap<String, usize>>,
}

/// One unit of a [`KeyedLimiter`]; released on drop.
#[derive(Debug)]
pub struct KeyedPermit {
    limiter: Arc<KeyedLimiter>,
    key: String,
}

impl KeyedLimiter {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(KeyedLimiter { max, counts: Mutex::new(HashMap::new()) })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// `None` when `key` already holds `max`.
    pub fn try_acquire(self: &Arc<Self>, key: &str) -> Option<KeyedPermit> {
        // No await while locked; the critical section is one map operation.
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(key.to_owned()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(KeyedPermit { limiter: self.clone(), key: key.to_owned() })
    }

    /// Units held by `key` now.
    pub fn held(&self, key: &str) -> usize {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(key).copied().unwrap_or(0)
    }
}

impl Drop for KeyedPermit {
    fn drop(&mut self) {
        let mut counts = self.limiter.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Why a stream or request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdmissionError {
    #[error("{0} watch streams are already open on this server; retry later")]
    WatchGlobal(usize),
    #[error("this token already has {0} watch streams open; close one first")]
    WatchPerToken(usize),
    #[error("this token already has {0} requests in flight; retry with backoff")]
    RequestsPerToken(usize),
}

/// Long-lived streams: a global cap and a per-token cap.
#[derive(Debug, Clone)]
pub struct StreamLimiter {
    global: Arc<Semaphore>,
    max: usize,
    per_token: Arc<KeyedLimiter>,
}

/// Held for as long as a stream is open.
#[derive(Debug)]
pub struct StreamPermit {
    _global: OwnedSemaphorePermit,
    _token: KeyedPermit,
}

impl StreamLimiter {
    pub fn new(max: usize, per_token: usize) -> Self {
        StreamLimiter { global: Arc::new(Semaphore::new(max)), max, per_token: KeyedLimiter::new(per_token) }
    }

    pub fn from_settings(t: &TransportSettings) -> Self {
        Self::new(t.max_watch_streams, t.max_watch_streams_per_token)
    }

    pub fn try_acquire(&self, token_id: &str) -> Result<StreamPermit, AdmissionError> {
        let token = self.per_token.try_acquire(token_id).ok_or(AdmissionError::WatchPerToken(self.per_token.max()));
        let token = token.inspect_err(|_| refused_stream("watch_per_token"))?;
        let global = self.global.clone().try_acquire_owned().map_err(|_| {
            refused_stream("watch");
            AdmissionError::WatchGlobal(self.max)
        })?;
        Ok(StreamPermit { _global: global, _token: token })
    }
}

impl Default for StreamLimiter {
    fn default() -> Self {
        Self::from_settings(&TransportSettings::default())
    }
}

pub(crate) fn refused_stream(kind: &'static str) {
    metrics::counter!(names::STREAMS_REFUSED, "kind" => kind).increment(1);
}

/// Per-request admission state, put into the request's extensions by [`AdmissionLayer`]
/// once the body has arrived and a global permit is held. The interceptor, which knows
/// the token, calls [`RequestSlot::admit`]; the layer releases both permits when the
/// response is ready, however long the handler keeps its request.
#[derive(Debug)]
pub struct RequestSlot {
    per_token: Arc<KeyedLimiter>,
    held: Mutex<Option<KeyedPermit>>,
}

impl RequestSlot {
    pub(crate) fn new(per_token: Arc<KeyedLimiter>) -> Self {
        RequestSlot { per_token, held: Mutex::new(None) }
    }

    /// Counts this request against `token_id`'s in-flight limit.
    pub fn admit(&self, token_id: &str) -> Result<(), AdmissionError> {
        let permit =
            self.per_token.try_acquire(token_id).ok_or(AdmissionError::RequestsPerToken(self.per_token.max()))?;
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
        Ok(())
    }

    pub(crate) fn release(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_a_burst_then_refuses_with_a_wait() {
        let l = TokenLimiter::per_second(5).unwrap();
        for _ in 0..5 {
            assert!(l.check().is_ok());
        }
        let wait = l.check().unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(200), "{wait:?}");
        assert!(TokenLimiter::per_second(0).is_none());
    }

    #[test]
    fn keyed_limits_are_per_key_and_released_on_drop() {
        let l = KeyedLimiter::new(2);
        let a1 = l.try_acquire("a").unwrap();
        let _a2 = l.try_acquire("a").unwrap();
        assert!(l.try_acquire("a").is_none(), "a third for one key is refused");
        let _b = l.try_acquire("b").expect("another key is unaffected");
        drop(a1);
        assert_eq!(l.held("a"), 1);
        assert!(l.try_acquire("a").is_some());
        drop(_b);
        assert_eq!(l.counts.lock().unwrap().get("b"), None, "keys at zero are removed");
    }

    #[test]
    fn stream_limits_per_token_then_global() {
        let l = StreamLimiter::new(3, 2);
        let _a = [l.try_acquire("a").unwrap(), l.try_acquire("a").unwrap()];
        assert_eq!(l.try_acquire("a").unwrap_err(), AdmissionError::WatchPerToken(2));
        let _b = l.try_acquire("b").unwrap();
        assert_eq!(l.try_acquire("c").unwrap_err(), AdmissionError::WatchGlobal(3));
        assert_eq!(l.per_token.held("c"), 0, "a refused stream holds nothing");
    }

    #[test]
    fn zero_transport_limits_are_refused() {
        assert!(TransportSettings::default().validate().is_ok());
        let t = TransportSettings { request_body_timeout_ms: 0, ..TransportSettings::default() };
        assert!(t.validate().unwrap_err().contains("transport.request_body_timeout_ms"));
        let t = TransportSettings { max_watch_streams_per_token: 0, ..TransportSettings::default() };
        assert!(t.validate().unwrap_err().contains("max_watch_streams_per_token"));
    }
}
