//! Admission control: a per-token rate limit (token bucket) and a global concurrency
//! limit that sheds excess requests at once instead of queueing them without bound.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::Semaphore;

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

/// Sheds requests beyond `max` in flight with `RESOURCE_EXHAUSTED`.
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConcurrencyLimitLayer {
    pub fn new(max: usize) -> Self {
        ConcurrencyLimitLayer { permits: Arc::new(Semaphore::new(max)), max }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit { inner, permits: self.permits.clone(), max: self.max }
    }
}

#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

impl<S, B> tower::Service<http::Request<B>> for ConcurrencyLimit<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        match self.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let res = fut.await;
                    drop(permit);
                    res
                })
            }
            Err(_) => {
                let status = tonic::Status::resource_exhausted(format!(
                    "server overloaded: {} requests already in flight; retry with backoff",
                    self.max
                ));
                let response = status.into_http();
                Box::pin(async move { Ok(response) })
            }
        }
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
}
