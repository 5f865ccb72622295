//! The audit trail. Every RPC produces one [`AuditRow`]: who (token id and name), what
//! (RPC, credential, version), how it ended (status code, latency), from where (peer),
//! and a request id. Never a value or a token.
//!
//! [`AuditLayer`] wraps every request: it gives the request an [`AuditContext`] (filled
//! in by the interceptor and the handlers), and when the response is ready it puts the
//! event on a bounded queue. A writer task drains the queue in batches to the store
//! and/or a JSON-lines file, so auditing adds no database round trip to a request.
//!
//! With `required = true`, a request is refused with `UNAVAILABLE` unless a queue slot is
//! reserved for its event and the sink is healthy: nothing goes unaudited. Otherwise a
//! full queue drops events and counts them.

use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{mpsc, watch};

use crate::auth::Caller;
use crate::store::{now_micros, AuditRow, Store};

pub mod names {
    pub const QUEUE_DEPTH: &str = "credvault_audit_queue_depth";
    pub const WRITTEN: &str = "credvault_audit_events_written_total";
    pub const DROPPED: &str = "credvault_audit_events_dropped_total";
    pub const WRITE_FAILURES: &str = "credvault_audit_write_failures_total";
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuditSink {
    /// The `audit_log` table.
    Store,
    /// JSON lines appended to `audit.file`.
    File,
    Both,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditSettings {
    pub sink: AuditSink,
    pub file: Option<PathBuf>,
    /// Refuse requests (UNAVAILABLE) rather than let one go unaudited.
    pub required: bool,
    /// Events waiting to be written at most.
    pub queue_capacity: usize,
    pub batch_size: usize,
    /// How long the writer lets a batch fill once it holds an event. Longer: fewer, larger
    /// writes and fewer wake-ups competing with requests; events reach the sink later.
    pub flush_interval_ms: u64,
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            sink: AuditSink::Store,
            file: None,
            required: false,
            queue_capacity: 10_000,
            batch_size: 500,
            flush_interval_ms: 20,
        }
    }
}

/// Filled in while a request is handled; read when it ends.
#[derive(Debug, Default)]
pub struct AuditContext {
    pub request_id: RequestId,
    caller: OnceLock<Arc<Caller>>,
    credential: OnceLock<String>,
    version: OnceLock<u64>,
}

impl AuditContext {
    pub fn set_caller(&self, c: Arc<Caller>) {
        let _ = self.caller.set(c);
    }

    pub fn set_credential(&self, name: &str) {
        let _ = self.credential.set(name.to_owned());
    }

    pub fn set_version(&self, v: u64) {
        let _ = self.version.set(v);
    }
}

/// A request's id: 16 hex digits in logs, audit rows and the `x-request-id` header.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestId(pub u64);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl RequestId {
    fn header_value(self) -> http::HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 16];
        for (i, b) in text.iter_mut().enumerate() {
            *b = HEX[((self.0 >> (60 - 4 * i)) & 0xf) as usize];
        }
        http::HeaderValue::from_bytes(&text).unwrap_or_else(|_| http::HeaderValue::from_static("0"))
    }
}

/// What a request leaves on the queue: the cheap parts only (ids, static labels, shared
/// caller, socket address). The writer task turns it into an [`AuditRow`], so the strings
/// are formatted off the request's path.
#[derive(Debug)]
struct Event {
    at: i64,
    request_id: RequestId,
    caller: Option<Arc<Caller>>,
    rpc: &'static str,
    credential: Option<String>,
    version: Option<u64>,
    code: &'static str,
    latency_us: u64,
    peer: Option<std::net::SocketAddr>,
}

impl Event {
    fn into_row(self) -> AuditRow {
        AuditRow {
            at: self.at,
            request_id: self.request_id.to_string(),
            token_id: self.caller.as_ref().map(|c| c.token_id.clone()).unwrap_or_default(),
            token_name: self.caller.as_ref().map(|c| c.display_name.clone()).unwrap_or_default(),
            rpc: self.rpc.to_owned(),
            credential: self.credential,
            version: self.version,
            code: self.code.to_owned(),
            latency_us: self.latency_us,
            peer: self.peer.map(|p| p.to_string()).unwrap_or_default(),
        }
    }
}

/// The audit handle: queue, health and settings. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Audit {
    tx: Option<mpsc::Sender<Event>>,
    healthy: Arc<AtomicBool>,
    required: bool,
    capacity: usize,
    depth_gauge: metrics::Gauge,
    dropped: metrics::Counter,
}

/// The writer half, run by the server until shutdown.
pub struct AuditWriter {
    rx: mpsc::Receiver<Event>,
    settings: AuditSettings,
    store: Arc<dyn Store>,
    healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter").field("settings", &self.settings).finish_non_exhaustive()
    }
}

pub fn channel(settings: &AuditSettings, store: Arc<dyn Store>) -> (Audit, Option<AuditWriter>) {
    let healthy = Arc::new(AtomicBool::new(true));
    let capacity = if settings.sink == AuditSink::Off { 0 } else { settings.queue_capacity.max(1) };
    let (tx, writer) = if capacity == 0 {
        (None, None)
    } else {
        let (tx, rx) = mpsc::channel(capacity);
        (Some(tx), Some(AuditWriter { rx, settings: settings.clone(), store, healthy: healthy.clone() }))
    };
    let audit = Audit {
        tx,
        healthy,
        required: settings.required,
        capacity,
        depth_gauge: metrics::gauge!(names::QUEUE_DEPTH),
        dropped: metrics::counter!(names::DROPPED),
    };
    (audit, writer)
}

impl Audit {
    fn depth(&self) -> usize {
        self.tx.as_ref().map(|t| self.capacity - t.capacity()).unwrap_or(0)
    }
}

impl AuditWriter {
    /// Writes batches until `shutdown`, then drains what is queued.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut file = None;
        let batch_size = self.settings.batch_size.max(1);
        let mut batch: Vec<AuditRow> = Vec::with_capacity(batch_size);
        loop {
            let first = tokio::select! {
                e = self.rx.recv() => e,
                _ = shutdown.changed() => {
                    self.rx.close();
                    self.rx.recv().await
                }
            };
            let Some(first) = first else { break };
            batch.push(first.into_row());
            if self.rx.len() + 1 < batch_size {
                // Let a batch build up: under load this makes one store write every few
                // milliseconds instead of one per handful of events (each a transaction,
                // and a wake-up of this task per request). No request waits for it.
                tokio::time::sleep(Duration::from_millis(self.settings.flush_interval_ms)).await;
            }
            while batch.len() < batch_size {
                match self.rx.try_recv() {
                    Ok(e) => batch.push(e.into_row()),
                    Err(_) => break,
                }
            }
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.write(&batch, &mut file).await {
                    Ok(()) => {
                        self.healthy.store(true, Ordering::Relaxed);
                        metrics::counter!(names::WRITTEN).increment(batch.len() as u64);
                        batch.clear();
                        break;
                    }
                    Err(e) => {
                        if self.healthy.swap(false, Ordering::Relaxed) {
                            tracing::error!(error = %e, "audit sink failed; retrying");
                        }
                        metrics::counter!(names::WRITE_FAILURES).increment(1);
                        if *shutdown.borrow() {
                            metrics::counter!(names::DROPPED).increment(batch.len() as u64);
                            tracing::error!(events = batch.len(), "audit events lost at shutdown: sink still failing");
                            batch.clear();
                            break;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = shutdown.changed() => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            metrics::gauge!(names::QUEUE_DEPTH).set(self.rx.len() as f64);
        }
    }

    async fn write(&self, batch: &[AuditRow], file: &mut Option<std::fs::File>) -> Result<(), String> {
        let s = &self.settings;
        if matches!(s.sink, AuditSink::Store | AuditSink::Both) {
            self.store.insert_audit(batch).await.map_err(|e| e.to_string())?;
        }
        if matches!(s.sink, AuditSink::File | AuditSink::Both) {
            let path = s.file.as_ref().ok_or("audit.sink includes a file but audit.file is not set")?;
            if file.is_none() {
                *file = Some(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("{}: {e}", path.display()))?,
                );
            }
            let mut text = Vec::with_capacity(batch.len() * 256);
            for e in batch {
                serde_json::to_writer(&mut text, e).map_err(|e| e.to_string())?;
                text.push(b'\n');
            }
            let f = file.as_mut().ok_or("audit file not open")?;
            if let Err(e) = f.write_all(&text).and_then(|_| f.flush()) {
                // Reopen next time: the file may have been rotated away.
                *file = None;
                return Err(format!("{}: {e}", path.display()));
            }
        }
        Ok(())
    }
}

/// Assigns request ids, carries the [`AuditContext`], and emits the event.
#[derive(Debug, Clone)]
pub struct AuditLayer {
    audit: Audit,
    ids: Arc<RequestIds>,
}

#[derive(Debug)]
struct RequestIds {
    base: u64,
    next: AtomicU64,
}

impl AuditLayer {
    pub fn new(audit: Audit) -> Self {
        AuditLayer { audit, ids: Arc::new(RequestIds { base: rand::random::<u64>(), next: AtomicU64::new(0) }) }
    }
}

impl<S> tower::Layer<S> for AuditLayer {
    type Service = AuditService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditService { inner, layer: self.clone() }
    }
}

#[derive(Debug, Clone)]
pub struct AuditService<S> {
    inner: S,
    layer: AuditLayer,
}

impl<S, B> tower::Service<http::Request<B>> for AuditService<S>
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

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let audit = self.layer.audit.clone();
        let n = self.layer.ids.next.fetch_add(1, Ordering::Relaxed);
        let request_id = RequestId(self.layer.ids.base.wrapping_add(n));
        let rpc = crate::metrics::rpc_label(req.uri().path());
        let peer = req.extensions().get::<tonic::transport::server::TcpConnectInfo>().and_then(|i| i.remote_addr());

        // Required mode: hold a queue slot for this request's event before doing anything.
        let permit = match (&audit.tx, audit.required) {
            (Some(tx), true) => {
                if !audit.healthy.load(Ordering::Relaxed) {
                    return refuse("audit sink is failing and audit is required; request refused");
                }
                match tx.clone().try_reserve_owned() {
                    Ok(p) => Some(p),
                    Err(_) => {
                        audit.dropped.increment(1);
                        return refuse("audit queue is full and audit is required; request refused");
                    }
                }
            }
            (None, true) => return refuse("audit is required but the audit sink is off"),
            _ => None,
        };

        let ctx = Arc::new(AuditContext { request_id, ..AuditContext::default() });
        req.extensions_mut().insert(ctx.clone());
        let span = tracing::info_span!("request", id = %request_id, rpc);
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(tracing::Instrument::instrument(
            async move {
                let mut res = fut.await;
                let code = match &res {
                    Ok(r) => r.headers().get("grpc-status").map(|v| v.as_bytes()).unwrap_or(b"0"),
                    Err(_) => b"13",
                };
                let code = crate::metrics::code_label(code);
                let latency_us = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
                // The handler has dropped its request (and its reference) by now: take the
                // context's parts instead of copying them.
                let (caller, credential, version) = match Arc::try_unwrap(ctx) {
                    Ok(c) => (c.caller.into_inner(), c.credential.into_inner(), c.version.into_inner()),
                    Err(c) => (c.caller.get().cloned(), c.credential.get().cloned(), c.version.get().copied()),
                };
                let event =
                    Event { at: now_micros(), request_id, caller, rpc, credential, version, code, latency_us, peer };
                match (permit, &audit.tx) {
                    (Some(p), _) => {
                        p.send(event);
                    }
                    (None, Some(tx)) => {
                        if tx.try_send(event).is_err() {
                            audit.dropped.increment(1);
                        }
                    }
                    (None, None) => {}
                }
                audit.depth_gauge.set(audit.depth() as f64);
                if let Ok(r) = &mut res {
                    r.headers_mut().insert("x-request-id", request_id.header_value());
                }
                res
            },
            span,
        ))
    }
}

fn refuse<E: Send + 'static>(
    message: &'static str,
) -> Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>> {
    let response = tonic::Status::unavailable(message).into_http();
    Box::pin(async move { Ok(response) })
}

/// The audit context of a request, if the layer set one.
pub fn context<T>(req: &tonic::Request<T>) -> Option<&Arc<AuditContext>> {
    req.extensions().get::<Arc<AuditContext>>()
}
