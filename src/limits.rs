//! Admission control: a per-token rate limit (token bucket); [`AdmissionLayer`], which
//! reads a request's body under a time limit before it takes a global and then a
//! per-token concurrency permit (shedding, never queueing); caps on long-lived streams;
//! and a cap on open connections.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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

fn refused_stream(kind: &'static str) {
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
    /// Counts this request against `token_id`'s in-flight limit.
    pub fn admit(&self, token_id: &str) -> Result<(), AdmissionError> {
        let permit =
            self.per_token.try_acquire(token_id).ok_or(AdmissionError::RequestsPerToken(self.per_token.max()))?;
        *self.held.lock().unwrap_or_else(|p| p.into_inner()) = Some(permit);
        Ok(())
    }

    fn release(&self) {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// gRPC paths whose request is a stream (their body stays open by design): never
/// buffered. Every credvault RPC takes a single request message (test:
/// `tests::no_credvault_rpc_streams_its_request`).
const STREAMING_REQUEST_PATHS: [&str; 2] = [
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];
/// Long-lived streams that need no token.
const UNAUTHENTICATED_STREAM_PATHS: [&str; 3] = [
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// Admission control for every request, in this order:
/// 1. the request body is read in full (at most `max_body` bytes) within the body time
///    limit, holding no permit: a caller that stalls its body holds only its own stream
///    (bounded per connection), never capacity that others need. A stalled body is
///    answered `DEADLINE_EXCEEDED`;
/// 2. a global permit (`limits.max_concurrent_requests`), else `RESOURCE_EXHAUSTED`;
/// 3. a [`RequestSlot`] through which the interceptor takes a per-token permit.
///
/// Health `Watch` and reflection streams also take an unauthenticated-stream permit,
/// held by the response body until the stream ends.
#[derive(Debug, Clone)]
pub struct AdmissionLayer {
    permits: Arc<Semaphore>,
    max: usize,
    per_token: Arc<KeyedLimiter>,
    unauthenticated: Arc<Semaphore>,
    max_unauthenticated: usize,
    body_timeout: Duration,
    max_body: usize,
}

impl AdmissionLayer {
    /// `max_body`: the largest request body accepted (the decoding limit plus the frame
    /// header).
    pub fn new(max_concurrent: usize, transport: &TransportSettings, max_body: usize) -> Self {
        AdmissionLayer {
            permits: Arc::new(Semaphore::new(max_concurrent)),
            max: max_concurrent,
            per_token: KeyedLimiter::new(transport.max_concurrent_requests_per_token),
            unauthenticated: Arc::new(Semaphore::new(transport.max_unauthenticated_streams)),
            max_unauthenticated: transport.max_unauthenticated_streams,
            body_timeout: Duration::from_millis(transport.request_body_timeout_ms),
            max_body,
        }
    }
}

impl<S> tower::Layer<S> for AdmissionLayer {
    type Service = Admission<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Admission { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct Admission<S> {
    inner: S,
    layer: AdmissionLayer,
}

type Body = tonic::body::Body;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

enum BodyError {
    TooLarge,
    Failed,
}

/// Reads `body` to its end within `limit` bytes. One chunk (the usual case: a small
/// message in one DATA frame) is passed on without a copy.
async fn read_body(mut body: Body, limit: usize) -> Result<tonic::codegen::Bytes, BodyError> {
    use http_body_util::BodyExt as _;
    let mut first: Option<tonic::codegen::Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| BodyError::Failed)?.into_data() else { continue };
        total = total.saturating_add(data.len());
        if total > limit {
            return Err(BodyError::TooLarge);
        }
        match &first {
            None => first = Some(data),
            Some(f) => {
                if rest.is_empty() {
                    rest.extend_from_slice(f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(if rest.is_empty() { first.unwrap_or_default() } else { rest.into() })
}

fn answer<E: Send + 'static>(status: tonic::Status) -> BoxFuture<Result<http::Response<Body>, E>> {
    let response = status.into_http();
    Box::pin(async move { Ok(response) })
}

impl<S> tower::Service<http::Request<Body>> for Admission<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let stream_permit = if UNAUTHENTICATED_STREAM_PATHS.contains(&path) {
            match self.layer.unauthenticated.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    refused_stream("unauthenticated");
                    return answer(tonic::Status::resource_exhausted(format!(
                        "{} health-watch and reflection streams are already open; retry later",
                        self.layer.max_unauthenticated
                    )));
                }
            }
        } else {
            None
        };
        let buffer = !STREAMING_REQUEST_PATHS.contains(&path);
        // The service that was polled ready goes into the future; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let mut req = req;
            if buffer {
                let (parts, body) = req.into_parts();
                let bytes = match tokio::time::timeout(layer.body_timeout, read_body(body, layer.max_body)).await {
                    Ok(Ok(b)) => b,
                    Ok(Err(BodyError::TooLarge)) => {
                        // The code tonic's decoder gives an oversized message.
                        return Ok(tonic::Status::out_of_range(format!(
                            "request body larger than {} bytes (the message limit plus its frame header)",
                            layer.max_body
                        ))
                        .into_http());
                    }
                    Ok(Err(BodyError::Failed)) => {
                        return Ok(tonic::Status::cancelled("the request body ended with an error").into_http());
                    }
                    Err(_) => {
                        metrics::counter!(names::BODY_TIMEOUTS).increment(1);
                        return Ok(tonic::Status::deadline_exceeded(format!(
                            "request body not received within {} ms (transport.request_body_timeout_ms)",
                            layer.body_timeout.as_millis()
                        ))
                        .into_http());
                    }
                };
                req = http::Request::from_parts(parts, Body::new(http_body_util::Full::new(bytes)));
            }
            let Ok(permit) = layer.permits.clone().try_acquire_owned() else {
                return Ok(tonic::Status::resource_exhausted(format!(
                    "server overloaded: {} requests already in flight; retry with backoff",
                    layer.max
                ))
                .into_http());
            };
            let slot = Arc::new(RequestSlot { per_token: layer.per_token.clone(), held: Mutex::new(None) });
            req.extensions_mut().insert(slot.clone());
            let res = inner.call(req).await;
            slot.release();
            drop(permit);
            Ok(match (res, stream_permit) {
                (Ok(r), Some(p)) => r.map(|b| Body::new(PermitBody { inner: b, _permit: p })),
                (Ok(r), None) => r,
                (Err(e), _) => return Err(e),
            })
        })
    }
}

/// A response body that holds a permit until the stream ends (or the client leaves).
struct PermitBody {
    inner: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for PermitBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The per-request slot, if the [`AdmissionLayer`] set one.
pub fn request_slot(extensions: &http::Extensions) -> Option<&Arc<RequestSlot>> {
    extensions.get::<Arc<RequestSlot>>()
}

/// Accepted connections, at most `max` open at once: one beyond it is closed as soon as
/// it is accepted (the client sees the connection close and may retry), and counted.
pub fn limited_incoming(
    incoming: tonic::transport::server::TcpIncoming,
    max: usize,
) -> impl tokio_stream::Stream<Item = std::io::Result<LimitedConn>> {
    use tokio_stream::StreamExt as _;
    let slots = Arc::new(Semaphore::new(max));
    let open = metrics::gauge!(names::CONNECTIONS_OPEN);
    let refused = metrics::counter!(names::CONNECTIONS_REFUSED);
    incoming.filter_map(move |conn| match conn {
        Err(e) => Some(Err(e)),
        Ok(stream) => match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                open.increment(1.0);
                Some(Ok(LimitedConn { inner: stream, _permit: permit, open: open.clone() }))
            }
            Err(_) => {
                refused.increment(1);
                tracing::warn!(peer = ?stream.peer_addr().ok(), max, "connection refused: transport.max_connections reached");
                drop(stream);
                None
            }
        },
    })
}

/// A TCP connection counted against `transport.max_connections` until it closes.
#[derive(Debug)]
pub struct LimitedConn {
    inner: tokio::net::TcpStream,
    _permit: OwnedSemaphorePermit,
    open: metrics::Gauge,
}

impl Drop for LimitedConn {
    fn drop(&mut self) {
        self.open.decrement(1.0);
    }
}

impl tonic::transport::server::Connected for LimitedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for LimitedConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LimitedConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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

    #[test]
    fn no_credvault_rpc_streams_its_request() {
        use prost::Message as _;
        let fds = prost_types::FileDescriptorSet::decode(crate::proto::FILE_DESCRIPTOR_SET).unwrap();
        for f in &fds.file {
            for s in &f.service {
                for m in &s.method {
                    assert!(
                        !m.client_streaming(),
                        "{}/{} streams its request: add it to STREAMING_REQUEST_PATHS",
                        s.name(),
                        m.name()
                    );
                }
            }
        }
    }
}
