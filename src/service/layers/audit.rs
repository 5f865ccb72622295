//! Auditing at the edge: assigns request ids, carries the [`AuditContext`], and hands
//! the audit queue one event per request, also for requests that end without a response
//! (client cancel, reset, deadline).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{Audit, AuditContext, Event, RequestId, Slot};
use crate::model::now_micros;
use crate::service::layers::{Around, BoxFuture, GRPC_STATUS, GRPC_TIMEOUT, X_REQUEST_ID};

/// Assigns request ids, carries the [`AuditContext`], and emits the event.
#[derive(Debug, Clone)]
pub struct AuditLayer {
    /// Shared, so a request holds it with one reference count instead of cloning the
    /// handle's queue sender, health flag and metric handles.
    audit: Arc<Audit>,
    ids: Arc<RequestIds>,
}

#[derive(Debug)]
struct RequestIds {
    base: u64,
    next: AtomicU64,
}

impl AuditLayer {
    pub fn new(audit: Audit) -> Self {
        AuditLayer {
            audit: Arc::new(audit),
            ids: Arc::new(RequestIds { base: rand::random::<u64>(), next: AtomicU64::new(0) }),
        }
    }
}

impl<S, B> Around<S, B> for AuditLayer
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    fn around(&self, inner: &mut S, mut req: http::Request<B>) -> BoxFuture<Result<S::Response, S::Error>> {
        let audit = self.audit.clone();
        let n = self.ids.next.fetch_add(1, Ordering::Relaxed);
        let request_id = RequestId(self.ids.base.wrapping_add(n));
        let rpc = crate::service::layers::metrics::rpc_label(req.uri().path());
        let peer = req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr());

        // Required mode: hold a queue slot for this request's event before doing anything.
        let slot = match audit.reserve() {
            Ok(slot) => slot,
            Err(refusal) => return refuse(refusal.message()),
        };

        let deadline = req.headers().get(&GRPC_TIMEOUT).and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let ctx = Arc::new(AuditContext::new(request_id));
        req.extensions_mut().insert(ctx.clone());
        let span = tracing::info_span!("request", id = %request_id, rpc);
        let start = Instant::now();
        let mut pending = Pending {
            audit,
            slot: Some(slot),
            ctx: Some(ctx),
            request_id,
            rpc,
            peer,
            start,
            deadline: deadline.and_then(|d| start.checked_add(d.saturating_sub(deadline_slack(d)))),
            done: false,
        };
        let fut = inner.call(req);
        Box::pin(tracing::Instrument::instrument(
            async move {
                // If this future is dropped before the response (client cancel, reset,
                // deadline), `pending` emits the event from its Drop.
                let mut res = fut.await;
                let code = match &res {
                    Ok(r) => r.headers().get(&GRPC_STATUS).map(|v| v.as_bytes()).unwrap_or(b"0"),
                    Err(_) => b"13",
                };
                pending.emit(crate::service::layers::metrics::code_label(code));
                if let Ok(r) = &mut res {
                    r.headers_mut().insert(X_REQUEST_ID.clone(), header_value(request_id));
                }
                res
            },
            span,
        ))
    }
}

/// A request's event until it is emitted: by the layer when the response is ready, or by
/// `Drop` when the request ends without one.
struct Pending {
    audit: Arc<Audit>,
    slot: Option<Slot>,
    ctx: Option<Arc<AuditContext>>,
    request_id: RequestId,
    rpc: &'static str,
    peer: Option<std::net::SocketAddr>,
    start: Instant,
    /// When the caller's `grpc-timeout` has (all but) run out ([`deadline_slack`]).
    deadline: Option<Instant>,
    done: bool,
}

impl Pending {
    fn emit(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let latency_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        // The handler has normally dropped its request (and its reference) by now: take
        // the context's parts instead of copying them.
        let entries = self.ctx.as_ref().map(|c| c.take_entries()).unwrap_or_default();
        let (caller, credential, version) = self.ctx.take().map(AuditContext::into_parts).unwrap_or_default();
        if !entries.is_empty() {
            // A request that wrote several credentials: one event each.
            let at = now_micros();
            let mut slot = self.slot.take();
            for (credential, version) in entries {
                let event = Event {
                    at,
                    request_id: self.request_id,
                    caller: caller.clone(),
                    rpc: self.rpc,
                    credential: Some(credential),
                    version,
                    code,
                    latency_us,
                    peer: self.peer,
                };
                self.audit.record(slot.take().unwrap_or_else(Slot::unreserved), event);
            }
            return;
        }
        let event = Event {
            at: now_micros(),
            request_id: self.request_id,
            caller,
            rpc: self.rpc,
            credential,
            version,
            code,
            latency_us,
            peer: self.peer,
        };
        if let Some(slot) = self.slot.take() {
            self.audit.record(slot, event);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.done {
            let expired = self.deadline.is_some_and(|d| Instant::now() >= d);
            self.emit(if expired { "DEADLINE_EXCEEDED" } else { "CANCELLED" });
        }
    }
}

/// How close to its deadline an abandoned request counts as DEADLINE_EXCEEDED: the
/// caller's clock started before the request reached this layer, and a caller whose own
/// timer fires first resets the stream a little before ours would run out (measured up to
/// ~30 ms on a loaded machine). So: within a tenth of the timeout, at least 50 ms.
fn deadline_slack(timeout: Duration) -> Duration {
    (timeout / 10).max(Duration::from_millis(50))
}

/// The `grpc-timeout` header: up to 8 digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`).
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

fn refuse<E: Send + 'static>(
    message: &'static str,
) -> Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>> {
    let response = tonic::Status::unavailable(message).into_http();
    Box::pin(async move { Ok(response) })
}

/// A request id as the `x-request-id` header: 16 hex digits. Marked sensitive so that
/// HTTP/2 sends it as a literal never indexed: a value that differs on every response
/// would only churn both ends' HPACK tables (each insert evicting an entry, each lookup
/// comparing against them) for nothing.
fn header_value(id: RequestId) -> http::HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 16];
    for (i, b) in text.iter_mut().enumerate() {
        *b = HEX[((id.0 >> (60 - 4 * i)) & 0xf) as usize];
    }
    let mut value = http::HeaderValue::from_bytes(&text).unwrap_or_else(|_| http::HeaderValue::from_static("0"));
    value.set_sensitive(true);
    value
}

/// The audit context of a request, if the layer set one.
pub fn context<T>(req: &tonic::Request<T>) -> Option<&Arc<AuditContext>> {
    req.extensions().get::<Arc<AuditContext>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"5x"), None);
    }
}
