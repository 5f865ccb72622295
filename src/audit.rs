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
use crate::store::{now_micros, AuditRow, Store, StoreError};

pub mod names {
    pub const QUEUE_DEPTH: &str = "credvault_audit_queue_depth";
    pub const WRITTEN: &str = "credvault_audit_events_written_total";
    pub const DROPPED: &str = "credvault_audit_events_dropped_total";
    pub const WRITE_FAILURES: &str = "credvault_audit_write_failures_total";
    /// Events a sink rejected on their own (found by splitting the batch); each was
    /// written again in its quarantined form (`reason="quarantined"`) or lost
    /// (`reason="dropped"`, only when even that form was refused at shutdown).
    pub const REJECTED: &str = "credvault_audit_events_rejected_total";
    pub const PRUNED: &str = "credvault_audit_rows_pruned_total";
}

/// Bytes of one recorded name or prefix at most (the truncation marker comes on top):
/// the largest `limits.max_name_bytes` allowed, so a valid name is always kept whole.
pub const FIELD_LIMIT: usize = 1024;
/// Bytes of a batch read's joined names at most (the "more" marker comes on top).
pub const NAMES_LIMIT: usize = 4096;

fn plain_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/')
}

/// A caller-supplied string as the audit trail records it: bounded and safe for every
/// sink (PostgreSQL text, SQLite, JSON lines, a terminal).
///
/// A string of at most [`FIELD_LIMIT`] bytes from the name charset
/// (`[A-Za-z0-9._-/]`) is kept as it is. Anything else is *flagged*: a leading `!`
/// (never part of a name), then the string with printable ASCII kept except `\` and `,`,
/// which become `\\` and `\x2c`; other ASCII bytes become `\xNN` (NUL is `\x00`) and
/// non-ASCII characters `\u{N}`, so the result is printable ASCII only. A flagged string
/// whose escaped form would pass [`FIELD_LIMIT`] bytes is cut there and ends with
/// `…[truncated N bytes]`, N counting the original bytes left out.
pub fn sink_safe(s: &str) -> String {
    if s.len() <= FIELD_LIMIT && s.bytes().all(plain_name_byte) {
        return s.to_owned();
    }
    use std::fmt::Write as _;
    let mut out = String::with_capacity(FIELD_LIMIT.min(s.len() * 4) + 32);
    out.push('!');
    let mut piece = String::with_capacity(12);
    let mut kept = 0;
    for (i, c) in s.char_indices() {
        piece.clear();
        match c {
            '\\' => piece.push_str("\\\\"),
            ',' => piece.push_str("\\x2c"),
            ' '..='~' => piece.push(c),
            c if c.is_ascii() => {
                let _ = write!(piece, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(piece, "\\u{{{:x}}}", c as u32);
            }
        }
        if out.len() - 1 + piece.len() > FIELD_LIMIT {
            break;
        }
        out.push_str(&piece);
        kept = i + c.len_utf8();
    }
    if kept < s.len() {
        let _ = write!(out, "…[truncated {} bytes]", s.len() - kept);
    }
    out
}

/// The names of a batch read as one field: each made [`sink_safe`], joined with `,`
/// (in no name and escaped in flagged ones), at most [`NAMES_LIMIT`] bytes; names that
/// do not fit are counted in a trailing `…[+N more]`.
pub fn sink_safe_names<S: AsRef<str>>(names: &[S]) -> String {
    let mut out = String::new();
    for (i, n) in names.iter().enumerate() {
        let n = sink_safe(n.as_ref());
        let sep = usize::from(i > 0);
        if out.len() + sep + n.len() > NAMES_LIMIT {
            out.push_str(&format!("…[+{} more]", names.len() - i));
            break;
        }
        if sep == 1 {
            out.push(',');
        }
        out.push_str(&n);
    }
    out
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
    /// Rows of `audit_log` older than this many days are deleted in the background;
    /// 0 keeps them forever.
    pub retention_days: u32,
    /// Identical successful reads (same token, RPC, credential, version) within this many
    /// seconds of the first become one event with a count and first/last time; writes,
    /// admin calls, denials and errors always stay events of their own. 0: one event per
    /// read.
    pub fold_reads_seconds: u64,
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
            retention_days: 400,
            fold_reads_seconds: 10,
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

    /// Records the credential (or, for List and Watch, the prefix) a request names,
    /// made [`sink_safe`]: whatever a caller sends, the event stays small and writable.
    pub fn set_credential(&self, name: &str) {
        let _ = self.credential.set(sink_safe(name));
    }

    /// Records every name a batch read touches, in request order ([`sink_safe_names`]).
    pub fn set_credentials<S: AsRef<str>>(&self, names: &[S]) {
        let _ = self.credential.set(sink_safe_names(names));
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
            token_name: self.caller.as_ref().map(|c| sink_safe(&c.display_name)).unwrap_or_default(),
            rpc: self.rpc.to_owned(),
            credential: self.credential,
            version: self.version,
            code: self.code.to_owned(),
            latency_us: self.latency_us,
            peer: self.peer.map(|p| p.to_string()).unwrap_or_default(),
            count: 1,
            last_at: None,
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

/// Why a write failed: decides between splitting the batch and retrying it.
#[derive(Debug)]
enum SinkError {
    /// The sink is unreachable (connection, pool, timeout, file I/O): retry it whole.
    Transient(String),
    /// The sink answered and refused the batch: some event in it, or the sink's schema,
    /// is at fault. Split the batch to find out.
    Rejected(String),
}

impl std::fmt::Display for SinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkError::Transient(e) | SinkError::Rejected(e) => f.write_str(e),
        }
    }
}

/// The form an event the sink refused on its own is recorded in: only what the daemon
/// itself produced, reduced to `[A-Za-z0-9._:/-]`, and the credential replaced by a
/// fixed marker, so nothing the caller sent is left to refuse.
fn quarantined(row: &AuditRow) -> AuditRow {
    let strict = |s: &str| -> String {
        s.chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-')).take(64).collect()
    };
    AuditRow {
        at: row.at,
        request_id: strict(&row.request_id),
        token_id: strict(&row.token_id),
        token_name: strict(&row.token_name),
        rpc: strict(&row.rpc),
        credential: Some("!rejected-by-sink".to_owned()),
        version: row.version,
        code: strict(&row.code),
        latency_us: row.latency_us,
        peer: strict(&row.peer),
        count: row.count,
        last_at: row.last_at,
    }
}

/// Successful reads that fold into one event each: same token, RPC, credential, version.
const FOLDABLE_RPCS: &[&str] = &["GetCredential", "GetCredentialMetadata", "BatchGetCredentials"];

/// The writer's folded reads, each held until its window since the first read ends.
struct Folds {
    window_us: i64,
    open: std::collections::HashMap<(String, String, Option<String>, Option<u64>), AuditRow>,
}

impl Folds {
    fn new(window_seconds: u64) -> Self {
        let window_us = i64::try_from(window_seconds.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        Folds { window_us, open: std::collections::HashMap::new() }
    }

    /// Folds `row` into an open event, opens one, or (not a foldable read) passes it on.
    fn add(&mut self, row: AuditRow, out: &mut Vec<AuditRow>) {
        if self.window_us == 0 || row.code != "OK" || !FOLDABLE_RPCS.contains(&row.rpc.as_str()) {
            out.push(row);
            return;
        }
        let key = (row.token_id.clone(), row.rpc.clone(), row.credential.clone(), row.version);
        match self.open.get_mut(&key) {
            Some(open) => {
                open.count = open.count.saturating_add(row.count);
                open.last_at = Some(row.last_at.unwrap_or(row.at).max(open.last_at.unwrap_or(open.at)));
                open.latency_us = open.latency_us.max(row.latency_us);
            }
            None => {
                self.open.insert(key, row);
            }
        }
    }

    /// When the oldest open event's window ends.
    fn next_due(&self) -> Option<i64> {
        self.open.values().map(|r| r.at.saturating_add(self.window_us)).min()
    }

    /// Moves the events whose window has ended by `now` to `out`.
    fn take_due(&mut self, now: i64, out: &mut Vec<AuditRow>) {
        let window = self.window_us;
        let due: Vec<_> =
            self.open.iter().filter(|(_, r)| r.at.saturating_add(window) <= now).map(|(k, _)| k.clone()).collect();
        for k in due {
            if let Some(r) = self.open.remove(&k) {
                out.push(r);
            }
        }
    }

    fn take_all(&mut self) -> Vec<AuditRow> {
        self.open.drain().map(|(_, r)| r).collect()
    }
}

/// Sleeps until the wall-clock time `at` (microseconds since the epoch).
async fn sleep_until_micros(at: i64) {
    let wait = u64::try_from(at.saturating_sub(now_micros())).unwrap_or(0);
    tokio::time::sleep(Duration::from_micros(wait)).await;
}

const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_CAP: Duration = Duration::from_secs(2);
/// Rows one prune statement deletes at most, so it never holds locks for long.
const PRUNE_BATCH: u32 = 1_000;
/// How often the pruner looks for expired rows when it found none (or a partial batch).
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl AuditWriter {
    /// Writes batches until `shutdown`, then drains what is queued. Also prunes rows past
    /// `retention_days` when the store is a sink.
    pub async fn run(self, shutdown: watch::Receiver<bool>) {
        let prune =
            matches!(self.settings.sink, AuditSink::Store | AuditSink::Both) && self.settings.retention_days > 0;
        let pruner = prune.then(|| prune_loop(self.store.clone(), self.settings.retention_days, shutdown.clone()));
        let writer = self.write_loop(shutdown);
        match pruner {
            Some(p) => {
                tokio::join!(writer, p);
            }
            None => writer.await,
        }
    }

    async fn write_loop(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut file = None;
        let batch_size = self.settings.batch_size.max(1);
        let mut folds = Folds::new(self.settings.fold_reads_seconds);
        loop {
            let due = folds.next_due();
            let first = tokio::select! {
                e = self.rx.recv() => e.map(Some),
                _ = shutdown.changed() => {
                    self.rx.close();
                    self.rx.recv().await.map(Some)
                }
                () = sleep_until_micros(due.unwrap_or(i64::MAX)), if due.is_some() => Some(None),
            };
            let Some(first) = first else { break };
            let mut batch: Vec<AuditRow> = Vec::with_capacity(batch_size);
            if let Some(first) = first {
                folds.add(first.into_row(), &mut batch);
                if self.rx.len() + 1 < batch_size {
                    // Let a batch build up: under load this makes one store write every few
                    // milliseconds instead of one per handful of events (each a transaction,
                    // and a wake-up of this task per request). No request waits for it.
                    tokio::time::sleep(Duration::from_millis(self.settings.flush_interval_ms)).await;
                }
                while batch.len() < batch_size {
                    match self.rx.try_recv() {
                        Ok(e) => folds.add(e.into_row(), &mut batch),
                        Err(_) => break,
                    }
                }
            }
            folds.take_due(now_micros(), &mut batch);
            if !batch.is_empty() {
                self.flush(batch, &mut file, &mut shutdown).await;
            }
            metrics::gauge!(names::QUEUE_DEPTH).set(self.rx.len() as f64);
        }
        // Shutting down: folded reads are written now, not lost.
        let rest = folds.take_all();
        if !rest.is_empty() {
            self.flush(rest, &mut file, &mut shutdown).await;
        }
    }

    /// Writes one batch, however long the sink takes to accept it.
    ///
    /// A batch the sink refuses is split in halves until the refused event stands alone;
    /// that event is written in its [`quarantined`] form and counted. If even the
    /// quarantined form is refused, the fault is the sink's (a missing table, say), not
    /// the event's: the remaining parts are retried with capped backoff, marked
    /// unhealthy meanwhile. Parts already written are never written again.
    async fn flush(
        &self,
        batch: Vec<AuditRow>,
        file: &mut Option<std::fs::File>,
        shutdown: &mut watch::Receiver<bool>,
    ) {
        let mut parts = std::collections::VecDeque::from([batch]);
        let mut backoff = BACKOFF_START;
        while let Some(part) = parts.front() {
            let error = match self.write(part, file).await {
                Ok(()) => {
                    self.healthy.store(true, Ordering::Relaxed);
                    metrics::counter!(names::WRITTEN).increment(part.len() as u64);
                    parts.pop_front();
                    backoff = BACKOFF_START;
                    continue;
                }
                Err(SinkError::Rejected(_)) if part.len() > 1 => {
                    if let Some(mut first) = parts.pop_front() {
                        let second = first.split_off(first.len() / 2);
                        parts.push_front(second);
                        parts.push_front(first);
                    }
                    continue;
                }
                Err(SinkError::Rejected(e)) => {
                    let safe: Vec<AuditRow> = part.iter().map(quarantined).collect();
                    match self.write(&safe, file).await {
                        Ok(()) => {
                            tracing::warn!(error = %e, request_id = %safe[0].request_id,
                                "audit sink refused an event; recorded it in quarantined form");
                            metrics::counter!(names::REJECTED, "reason" => "quarantined").increment(1);
                            metrics::counter!(names::WRITTEN).increment(1);
                            self.healthy.store(true, Ordering::Relaxed);
                            parts.pop_front();
                            continue;
                        }
                        Err(_) => SinkError::Rejected(e),
                    }
                }
                Err(e) => e,
            };
            if self.healthy.swap(false, Ordering::Relaxed) {
                tracing::error!(error = %error, "audit sink failed; retrying");
            }
            metrics::counter!(names::WRITE_FAILURES).increment(1);
            if *shutdown.borrow() {
                let lost: usize = parts.iter().map(Vec::len).sum();
                metrics::counter!(names::DROPPED).increment(lost as u64);
                tracing::error!(events = lost, "audit events lost at shutdown: sink still failing");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
        }
    }

    async fn write(&self, batch: &[AuditRow], file: &mut Option<std::fs::File>) -> Result<(), SinkError> {
        let s = &self.settings;
        if matches!(s.sink, AuditSink::Store | AuditSink::Both) {
            self.store.insert_audit(batch).await.map_err(|e| match e {
                StoreError::Unavailable(_) | StoreError::Timeout(..) => SinkError::Transient(e.to_string()),
                e => SinkError::Rejected(e.to_string()),
            })?;
        }
        if matches!(s.sink, AuditSink::File | AuditSink::Both) {
            let transient = SinkError::Transient;
            let path = s
                .file
                .as_ref()
                .ok_or_else(|| transient("audit.sink includes a file but audit.file is not set".into()))?;
            if file.is_none() {
                *file = Some(open_audit_file(path).map_err(|e| transient(format!("{}: {e}", path.display())))?);
            }
            let mut text = Vec::with_capacity(batch.len() * 256);
            for e in batch {
                serde_json::to_writer(&mut text, e).map_err(|e| SinkError::Rejected(e.to_string()))?;
                text.push(b'\n');
            }
            let f = file.as_mut().ok_or_else(|| transient("audit file not open".into()))?;
            if let Err(e) = f.write_all(&text).and_then(|_| f.flush()) {
                // Reopen next time: the file may have been rotated away.
                *file = None;
                return Err(transient(format!("{}: {e}", path.display())));
            }
        }
        Ok(())
    }
}

/// Opens (or creates) the JSON-lines file for appending. A new file is created 0600,
/// whatever the umask: the trail says who read what.
fn open_audit_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Deletes `audit_log` rows older than `days`, [`PRUNE_BATCH`] rows per statement,
/// until `shutdown`. A full batch is followed at once by the next; otherwise it waits
/// [`PRUNE_EVERY`].
async fn prune_loop(store: Arc<dyn Store>, days: u32, mut shutdown: watch::Receiver<bool>) {
    let pruned = metrics::counter!(names::PRUNED);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let before = now_micros().saturating_sub(i64::from(days) * 86_400 * 1_000_000);
        let wait = match store.prune_audit(before, PRUNE_BATCH).await {
            Ok(n) => {
                pruned.increment(n);
                if n >= u64::from(PRUNE_BATCH) {
                    Duration::ZERO
                } else {
                    PRUNE_EVERY
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pruning old audit rows failed; will retry");
                PRUNE_EVERY
            }
        };
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        } else {
            tokio::task::yield_now().await;
        }
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

        let deadline = req.headers().get("grpc-timeout").and_then(|v| parse_grpc_timeout(v.as_bytes()));
        let ctx = Arc::new(AuditContext { request_id, ..AuditContext::default() });
        req.extensions_mut().insert(ctx.clone());
        let span = tracing::info_span!("request", id = %request_id, rpc);
        let start = Instant::now();
        let mut pending = Pending {
            audit,
            permit,
            ctx: Some(ctx),
            request_id,
            rpc,
            peer,
            start,
            deadline: deadline.and_then(|d| start.checked_add(d.saturating_sub(deadline_slack(d)))),
            done: false,
        };
        let fut = self.inner.call(req);
        Box::pin(tracing::Instrument::instrument(
            async move {
                // If this future is dropped before the response (client cancel, reset,
                // deadline), `pending` emits the event from its Drop.
                let mut res = fut.await;
                let code = match &res {
                    Ok(r) => r.headers().get("grpc-status").map(|v| v.as_bytes()).unwrap_or(b"0"),
                    Err(_) => b"13",
                };
                pending.emit(crate::metrics::code_label(code));
                if let Ok(r) = &mut res {
                    r.headers_mut().insert("x-request-id", request_id.header_value());
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
    audit: Audit,
    permit: Option<mpsc::OwnedPermit<Event>>,
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
        let (caller, credential, version) = match self.ctx.take().map(Arc::try_unwrap) {
            Some(Ok(c)) => (c.caller.into_inner(), c.credential.into_inner(), c.version.into_inner()),
            Some(Err(c)) => (c.caller.get().cloned(), c.credential.get().cloned(), c.version.get().copied()),
            None => (None, None, None),
        };
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
        match (self.permit.take(), &self.audit.tx) {
            (Some(p), _) => {
                p.send(event);
            }
            (None, Some(tx)) => {
                if tx.try_send(event).is_err() {
                    self.audit.dropped.increment(1);
                }
            }
            (None, None) => {}
        }
        self.audit.depth_gauge.set(self.audit.depth() as f64);
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

/// The audit context of a request, if the layer set one.
pub fn context<T>(req: &tonic::Request<T>) -> Option<&Arc<AuditContext>> {
    req.extensions().get::<Arc<AuditContext>>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_names_are_kept_and_others_flagged_escaped_and_bounded() {
        assert_eq!(sink_safe("team-a/db.password_1"), "team-a/db.password_1");
        assert_eq!(sink_safe("a\0b"), "!a\\x00b");
        assert_eq!(sink_safe("x\n\x1b[31m\u{7f}"), "!x\\x0a\\x1b[31m\\x7f");
        assert_eq!(sink_safe("lit\\u{0},é"), "!lit\\\\u{0}\\x2c\\u{e9}");
        assert_eq!(sink_safe(""), "", "an empty list prefix stays empty");
        let at_limit = "a".repeat(FIELD_LIMIT);
        assert_eq!(sink_safe(&at_limit), at_limit);
        let over = "a".repeat(FIELD_LIMIT + 1000);
        assert_eq!(sink_safe(&over), format!("!{}…[truncated 1000 bytes]", "a".repeat(FIELD_LIMIT)));
        // Escapes count against the limit; a NUL-filled 128 KiB name stays small.
        let nuls = "\0".repeat(128 * 1024);
        let safe = sink_safe(&nuls);
        assert!(safe.len() <= FIELD_LIMIT + 40 && !safe.contains('\0'), "{} bytes", safe.len());
        assert!(safe.ends_with(&format!("…[truncated {} bytes]", 128 * 1024 - FIELD_LIMIT / 4)), "{safe}");
        for s in [&nuls, "\u{202e}evil", "a\u{0}\u{85}"] {
            let safe = sink_safe(s);
            assert!(safe.chars().all(|c| c.is_ascii_graphic() || c == ' ' || c == '…'), "{safe}");
        }
    }

    #[test]
    fn batch_names_are_joined_and_bounded() {
        assert_eq!(sink_safe_names(&["a/b", "c\0"]), "a/b,!c\\x00");
        let many: Vec<String> = (0..1000).map(|i| format!("n/{i:04}")).collect();
        let joined = sink_safe_names(&many);
        assert!(joined.len() <= NAMES_LIMIT + 20, "{}", joined.len());
        let kept = joined.split(',').count();
        assert!(joined.ends_with(&format!("…[+{} more]", 1000 - kept)), "{joined}");
        assert!(joined.starts_with("n/0000,n/0001,"));
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(parse_grpc_timeout(b"200m"), Some(Duration::from_millis(200)));
        assert_eq!(parse_grpc_timeout(b"3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout(b"123456789m"), None);
        assert_eq!(parse_grpc_timeout(b"m"), None);
        assert_eq!(parse_grpc_timeout(b"5x"), None);
    }
}
