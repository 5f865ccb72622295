//! The audit trail. Every RPC produces one [`AuditRow`]: who (token id and name), what
//! (RPC, credential, version), how it ended (status code, latency), from where (peer),
//! and a request id. Never a value or a token.
//!
//! The gRPC edge (`service::layers::audit`) gives each request an [`AuditContext`]
//! (filled in by the interceptor and the handlers) and, when the request ends, hands
//! [`Audit::record`] an [`Event`] for a bounded queue. The writer task
//! ([`writer`]) drains the queue in batches to the store and/or a JSON-lines file, so
//! auditing adds no database round trip to a request.
//!
//! With `required = true`, a request is refused unless [`Audit::reserve`] holds a queue
//! slot for its event and the sink is healthy: nothing goes unaudited. Otherwise a full
//! queue drops events and counts them.

mod writer;

pub use writer::AuditWriter;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use tokio::sync::mpsc;

use crate::auth::Caller;
use crate::store::{AuditRow, Store};

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
    /// A request that writes several credentials: one event per name (and the version
    /// written, if it was), instead of one for the request.
    entries: std::sync::Mutex<Vec<(String, Option<u64>)>>,
}

impl AuditContext {
    pub fn new(request_id: RequestId) -> Self {
        AuditContext { request_id, ..AuditContext::default() }
    }

    /// Who made the request and what it named, once it has ended: taken out of the
    /// context when the handler has dropped its reference (the usual case), else copied.
    pub fn into_parts(ctx: Arc<Self>) -> (Option<Arc<Caller>>, Option<String>, Option<u64>) {
        match Arc::try_unwrap(ctx) {
            Ok(c) => (c.caller.into_inner(), c.credential.into_inner(), c.version.into_inner()),
            Err(c) => (c.caller.get().cloned(), c.credential.get().cloned(), c.version.get().copied()),
        }
    }

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

    /// Makes the request's audit one event per credential it names (replacing what was
    /// set before), each [`sink_safe`].
    pub fn set_entries<S: AsRef<str>>(&self, entries: &[(S, Option<u64>)]) {
        let safe = entries.iter().map(|(n, v)| (sink_safe(n.as_ref()), *v)).collect();
        *self.entries.lock().unwrap_or_else(|p| p.into_inner()) = safe;
    }

    /// The per-credential entries, taken out (empty: one event for the request).
    pub fn take_entries(&self) -> Vec<(String, Option<u64>)> {
        std::mem::take(&mut *self.entries.lock().unwrap_or_else(|p| p.into_inner()))
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

/// What a request leaves on the queue: the cheap parts only (ids, static labels, shared
/// caller, socket address). The writer task turns it into an [`AuditRow`], so the strings
/// are formatted off the request's path.
#[derive(Debug)]
pub struct Event {
    pub at: i64,
    pub request_id: RequestId,
    pub caller: Option<Arc<Caller>>,
    /// The RPC's name, from a fixed list.
    pub rpc: &'static str,
    /// Already [`sink_safe`] (set through [`AuditContext`]).
    pub credential: Option<String>,
    pub version: Option<u64>,
    /// The status code's name, from a fixed list.
    pub code: &'static str,
    pub latency_us: u64,
    pub peer: Option<std::net::SocketAddr>,
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

/// A request's place on the queue, held from its start in required mode (empty
/// otherwise: the event then takes a place if one is free when it is recorded).
#[derive(Debug)]
pub struct Slot(Option<mpsc::OwnedPermit<Event>>);

impl Slot {
    /// No reserved place: the event takes a free one if there is one (the extra events
    /// of a request audited per credential).
    pub fn unreserved() -> Slot {
        Slot(None)
    }
}

/// Why required mode refuses a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("audit sink is failing and audit is required; request refused")]
    SinkFailing,
    #[error("audit queue is full and audit is required; request refused")]
    QueueFull,
    #[error("audit is required but the audit sink is off")]
    SinkOff,
}

impl Refusal {
    /// The same text as `Display`, for answers built without allocating.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::SinkFailing => "audit sink is failing and audit is required; request refused",
            Refusal::QueueFull => "audit queue is full and audit is required; request refused",
            Refusal::SinkOff => "audit is required but the audit sink is off",
        }
    }
}

impl Audit {
    fn depth(&self) -> usize {
        self.tx.as_ref().map(|t| self.capacity - t.capacity()).unwrap_or(0)
    }

    /// Called when a request starts. Required mode: holds a queue slot for its event, or
    /// refuses the request while the sink fails or the queue is full.
    pub fn reserve(&self) -> Result<Slot, Refusal> {
        match (&self.tx, self.required) {
            (Some(tx), true) => {
                if !self.healthy.load(Ordering::Relaxed) {
                    return Err(Refusal::SinkFailing);
                }
                match tx.clone().try_reserve_owned() {
                    Ok(p) => Ok(Slot(Some(p))),
                    Err(_) => {
                        self.dropped.increment(1);
                        Err(Refusal::QueueFull)
                    }
                }
            }
            (None, true) => Err(Refusal::SinkOff),
            _ => Ok(Slot(None)),
        }
    }

    /// Queues a finished request's event: in its reserved slot, or in a free one (a full
    /// queue drops it and counts the drop).
    pub fn record(&self, slot: Slot, event: Event) {
        match (slot.0, &self.tx) {
            (Some(p), _) => {
                p.send(event);
            }
            (None, Some(tx)) => {
                if tx.try_send(event).is_err() {
                    self.dropped.increment(1);
                }
            }
            (None, None) => {}
        }
        self.depth_gauge.set(self.depth() as f64);
    }
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
}
