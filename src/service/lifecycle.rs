//! Request lifecycle at the HTTP/2 edge: a caller's deadline, writes that finish once
//! begun, and the daemon's drain.
//!
//! - [`DeadlineLayer`] answers a request whose `grpc-timeout` expires with
//!   `DEADLINE_EXCEEDED`, the gRPC convention. tonic's own timeout (which runs outside
//!   every layer) would answer `CANCELLED "Timeout expired"`, and so would a tonic
//!   client's timer, which started before the request was sent: the layer answers a
//!   little early ([`ahead`]) so its answer reaches the caller first.
//! - A write is never cut off halfway: a write (any RPC that is not a read, see
//!   [`is_read`]) runs as its own task from the start, so neither the deadline nor a client
//!   that resets its stream can drop it between its commit and its cache update and audit
//!   event. A write is therefore either committed, audited with its real outcome and
//!   reflected in this daemon's cache, or not made at all. A read overtaken by its deadline
//!   has no effects to finish: it is dropped, audited as `DEADLINE_EXCEEDED`, and its
//!   in-flight state (a coalesced miss) released at once.
//! - [`DrainLayer`] ends server-streaming responses (watches, the rotation-job stream,
//!   health watches, reflection) with `UNAVAILABLE "shutting down"` once the daemon starts
//!   to drain, so their clients reconnect elsewhere and the connection can close. Unary
//!   responses are left alone: they finish within the shutdown grace period.
//!
//! **Invariant:** neither layer reads or changes a message body; they add trailers or
//! answer with a trailers-only status.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::Frame;
use hyper::body::Bytes;
use tokio::sync::watch;
use tonic::body::Body;

use crate::service::layers::audit::parse_grpc_timeout;
use crate::service::layers::{Around, BoxFuture, GRPC_STATUS, GRPC_TIMEOUT};

/// Answers `DEADLINE_EXCEEDED` when a request's `grpc-timeout` expires.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S, B> Around<S, B> for DeadlineLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    fn around(&self, inner: &mut S, req: http::Request<B>) -> BoxFuture<Result<S::Response, S::Error>> {
        let timeout = req.headers().get(&GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let read = is_read(req.uri().path());
        let fut = inner.call(req);
        if read && timeout.is_none() {
            return Box::pin(fut);
        }
        // A write runs as its own task, so neither the deadline nor a client reset can
        // drop it between its commit and its cache update and audit event.
        let mut fut: BoxFuture<Option<Result<S::Response, S::Error>>> = if read {
            Box::pin(async move { Some(fut.await) })
        } else {
            let task = tokio::spawn(fut);
            Box::pin(async move { task.await.ok() })
        };
        Box::pin(async move {
            let Some(timeout) = timeout else {
                return fut.await.unwrap_or_else(task_failed);
            };
            tokio::select! {
                biased;
                res = &mut fut => res.unwrap_or_else(task_failed),
                () = tokio::time::sleep(timeout.saturating_sub(ahead(timeout))) => {
                    // A read is dropped here (audited as DEADLINE_EXCEEDED, its in-flight
                    // state released); a write's task goes on to its end.
                    drop(fut);
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "deadline of {} ms expired before the request completed",
                        timeout.as_millis()
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// The answer for a write whose task panicked (its detail is in the panic's log line).
fn task_failed<E>() -> Result<http::Response<Body>, E> {
    Ok(tonic::Status::internal("internal error").into_http())
}

/// How much before the deadline the daemon answers: a twentieth of it, between 1 and
/// 20 ms, so the answer reaches the caller while the caller's own timer still runs.
fn ahead(timeout: Duration) -> Duration {
    (timeout / 20).clamp(Duration::from_millis(1), Duration::from_millis(20))
}

/// RPCs without side effects: a deadline or reset may simply drop them.
fn is_read(path: &str) -> bool {
    matches!(
        path.rsplit('/').next(),
        Some(
            "GetCredential"
                | "BatchGetCredentials"
                | "GetCredentialMetadata"
                | "ListCredentials"
                | "WatchCredentials"
                | "GetRotationJob"
                | "WatchRotationJob"
                | "GetRotationPolicy"
                | "ListTokens"
                | "ListIdentities"
                | "ListAuditEvents"
                | "GetStatus"
                | "Check"
                | "Watch"
                | "ServerReflectionInfo"
        )
    )
}

/// Paths whose responses are streams that only the server can end.
fn is_stream(path: &str) -> bool {
    matches!(
        path,
        "/credvault.v1.CredentialService/WatchCredentials"
            | "/credvault.v1.AdminService/WatchRotationJob"
            | "/grpc.health.v1.Health/Watch"
    ) || path.ends_with("/ServerReflectionInfo")
}

/// Ends streaming responses with `UNAVAILABLE "shutting down"` once `draining` is true.
#[derive(Debug, Clone)]
pub struct DrainLayer {
    draining: watch::Receiver<bool>,
}

impl DrainLayer {
    pub fn new(draining: watch::Receiver<bool>) -> Self {
        DrainLayer { draining }
    }
}

impl<S, B> Around<S, B> for DrainLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    fn around(&self, inner: &mut S, req: http::Request<B>) -> BoxFuture<Result<S::Response, S::Error>> {
        let stream = is_stream(req.uri().path());
        let fut = inner.call(req);
        if !stream {
            return Box::pin(fut);
        }
        let mut draining = self.draining.clone();
        Box::pin(async move {
            let res = fut.await?;
            // A trailers-only answer (an error status) has nothing left to end.
            if res.headers().contains_key(&GRPC_STATUS) {
                return Ok(res);
            }
            let drained: BoxFuture<()> = Box::pin(async move {
                // A dropped sender means the daemon is gone: end the stream as well.
                let _ = draining.wait_for(|d| *d).await;
            });
            Ok(res.map(|body| Body::new(DrainBody { inner: body, drained: Some(drained), done: false })))
        })
    }
}

/// A response body that gives way to a `shutting down` status when the daemon drains.
struct DrainBody {
    inner: Body,
    drained: Option<BoxFuture<()>>,
    done: bool,
}

fn shutting_down() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("14"));
    trailers.insert("grpc-message", http::HeaderValue::from_static("shutting down"));
    trailers
}

impl http_body::Body for DrainBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Some(drained) = this.drained.as_mut() {
            if drained.as_mut().poll(cx).is_ready() {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::trailers(shutting_down()))));
            }
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame {
            if f.is_trailers() {
                // The stream ended by itself: nothing to add.
                this.drained = None;
                this.done = true;
            }
        }
        if let Poll::Ready(None) = &frame {
            this.done = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_defines() {
        assert_eq!(parse_grpc_timeout(b"300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_grpc_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout(b"5M"), Some(Duration::from_secs(300)));
        assert_eq!(parse_grpc_timeout(b"99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_grpc_timeout(b"10n"), Some(Duration::from_nanos(10)));
        for bad in [&b""[..], b"m", b"123456789m", b"12x", b"-1S", b"1.5S", b" 1S", b"\x001S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_answer_comes_a_little_early() {
        assert_eq!(ahead(Duration::from_millis(300)), Duration::from_millis(15));
        assert_eq!(ahead(Duration::from_micros(5)), Duration::from_millis(1));
        assert_eq!(ahead(Duration::from_secs(60)), Duration::from_millis(20));
    }

    #[test]
    fn every_rpc_is_a_read_or_a_write_on_purpose() {
        assert!(is_read("/credvault.v1.CredentialService/GetCredential"));
        assert!(is_read("/grpc.health.v1.Health/Check"));
        for write in ["PutCredential", "DeleteCredential", "RotateCredential", "DestroyVersion", "CreateToken"] {
            assert!(!is_read(&format!("/credvault.v1.Service/{write}")), "{write}");
        }
    }

    #[test]
    fn only_server_streams_are_drained() {
        assert!(is_stream("/credvault.v1.CredentialService/WatchCredentials"));
        assert!(is_stream("/grpc.health.v1.Health/Watch"));
        assert!(is_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(!is_stream("/credvault.v1.CredentialService/GetCredential"));
        assert!(!is_stream("/grpc.health.v1.Health/Check"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_daemon_ends_an_open_stream_with_unavailable() {
        use http_body_util::BodyExt as _;
        let (tx, rx) = watch::channel(false);
        // A stream that never yields by itself.
        let never = http_body_util::StreamBody::new(futures_never());
        let mut body = DrainBody {
            inner: Body::new(never),
            drained: Some(Box::pin(async move {
                let mut rx = rx;
                let _ = rx.wait_for(|d| *d).await;
            })),
            done: false,
        };
        let pending = tokio::time::timeout(Duration::from_secs(5), body.frame()).await;
        assert!(pending.is_err(), "no frame before the drain");
        tx.send_replace(true);
        let frame = body.frame().await.expect("a frame").expect("no error");
        let trailers = frame.into_trailers().expect("trailers");
        assert_eq!(trailers.get("grpc-status").unwrap(), "14");
        assert_eq!(trailers.get("grpc-message").unwrap(), "shutting down");
        assert!(body.frame().await.is_none(), "then the stream ends");
    }

    fn futures_never(
    ) -> impl tokio_stream::Stream<Item = Result<Frame<Bytes>, std::convert::Infallible>> + Send + 'static {
        tokio_stream::pending()
    }
}
