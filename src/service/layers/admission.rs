//! Admission control at the edge: [`AdmissionLayer`] reads each request's body under a
//! time limit before it takes a global and then a per-token concurrency permit (shedding,
//! never queueing) and caps unauthenticated long-lived streams; [`limited_incoming`]
//! caps open connections.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limits::{names, refused_stream, KeyedLimiter, RequestSlot, TransportSettings};
use crate::service::layers::{take_ready, Around, BoxFuture};

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

type Body = tonic::body::Body;

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

impl<S> Around<S, Body> for AdmissionLayer
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    fn around(&self, inner: &mut S, req: http::Request<Body>) -> BoxFuture<Result<S::Response, S::Error>> {
        let path = req.uri().path();
        let stream_permit = if UNAUTHENTICATED_STREAM_PATHS.contains(&path) {
            match self.unauthenticated.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    refused_stream("unauthenticated");
                    return answer(tonic::Status::resource_exhausted(format!(
                        "{} health-watch and reflection streams are already open; retry later",
                        self.max_unauthenticated
                    )));
                }
            }
        } else {
            None
        };
        let buffer = !STREAMING_REQUEST_PATHS.contains(&path);
        let mut inner = take_ready(inner);
        let layer = self.clone();
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
            let slot = Arc::new(RequestSlot::new(layer.per_token.clone()));
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
        assert!(STREAMING_REQUEST_PATHS.iter().all(|p| !p.starts_with("/credvault.")), "only reflection streams in");
    }
}
