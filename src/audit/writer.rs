//! The audit writer: batches from the queue to the sinks, with bisection of batches a
//! sink rejects, retry with backoff, read folding, and retention pruning.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::{names, AuditSettings, AuditSink, Event};
use crate::auth::Caller;
use crate::store::{now_micros, AuditRow, Store, StoreError};

/// The writer half, run by the server until shutdown.
pub struct AuditWriter {
    pub(super) rx: mpsc::Receiver<Event>,
    pub(super) settings: AuditSettings,
    pub(super) store: Arc<dyn Store>,
    pub(super) healthy: Arc<AtomicBool>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter").field("settings", &self.settings).finish_non_exhaustive()
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

/// What identifies a fold: the token (by id), RPC, credential and version. Built by
/// moving the event's parts, so folding a read into an open event allocates nothing.
struct FoldKey {
    caller: Option<Arc<Caller>>,
    rpc: &'static str,
    credential: Option<String>,
    version: Option<u64>,
}

impl FoldKey {
    fn token_id(&self) -> &str {
        self.caller.as_ref().map(|c| c.token_id.as_str()).unwrap_or_default()
    }
}

impl PartialEq for FoldKey {
    fn eq(&self, other: &Self) -> bool {
        self.rpc == other.rpc
            && self.version == other.version
            && self.credential == other.credential
            && self.token_id() == other.token_id()
    }
}

impl Eq for FoldKey {}

impl std::hash::Hash for FoldKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.token_id().hash(h);
        self.rpc.hash(h);
        self.credential.hash(h);
        self.version.hash(h);
    }
}

/// The writer's folded reads, each held until its window since the first read ends.
struct Folds {
    window_us: i64,
    open: std::collections::HashMap<FoldKey, AuditRow>,
}

impl Folds {
    fn new(window_seconds: u64) -> Self {
        let window_us = i64::try_from(window_seconds.saturating_mul(1_000_000)).unwrap_or(i64::MAX);
        Folds { window_us, open: std::collections::HashMap::new() }
    }

    /// Folds `event` into an open event, opens one (the only case that formats a row),
    /// or (not a foldable read) passes it on as a row.
    fn add(&mut self, event: Event, out: &mut Vec<AuditRow>) {
        if self.window_us == 0 || event.code != "OK" || !FOLDABLE_RPCS.contains(&event.rpc) {
            out.push(event.into_row());
            return;
        }
        let Event { at, request_id, caller, rpc, credential, version, code, latency_us, peer } = event;
        let key = FoldKey { caller, rpc, credential, version };
        match self.open.get_mut(&key) {
            Some(open) => {
                open.count = open.count.saturating_add(1);
                open.last_at = Some(at.max(open.last_at.unwrap_or(open.at)));
                open.latency_us = open.latency_us.max(latency_us);
            }
            None => {
                let first = Event {
                    at,
                    request_id,
                    caller: key.caller.clone(),
                    rpc,
                    credential: key.credential.clone(),
                    version,
                    code,
                    latency_us,
                    peer,
                };
                self.open.insert(key, first.into_row());
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
        self.open.retain(|_, r| {
            if r.at.saturating_add(window) <= now {
                out.push(std::mem::replace(r, empty_row()));
                false
            } else {
                true
            }
        });
    }

    fn take_all(&mut self) -> Vec<AuditRow> {
        self.open.drain().map(|(_, r)| r).collect()
    }
}

/// A placeholder (no allocation) for a row moved out of [`Folds`].
fn empty_row() -> AuditRow {
    AuditRow {
        at: 0,
        request_id: String::new(),
        token_id: String::new(),
        token_name: String::new(),
        rpc: String::new(),
        credential: None,
        version: None,
        code: String::new(),
        latency_us: 0,
        peer: String::new(),
        count: 0,
        last_at: None,
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
                folds.add(first, &mut batch);
                if self.rx.len() + 1 < batch_size {
                    // Let a batch build up: under load this makes one store write every few
                    // milliseconds instead of one per handful of events (each a transaction,
                    // and a wake-up of this task per request). No request waits for it.
                    tokio::time::sleep(Duration::from_millis(self.settings.flush_interval_ms)).await;
                }
                while batch.len() < batch_size {
                    match self.rx.try_recv() {
                        Ok(e) => folds.add(e, &mut batch),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::RequestId;

    fn caller(token_id: &str) -> Arc<Caller> {
        Arc::new(Caller {
            token_id: token_id.to_owned(),
            display_name: format!("name-of-{token_id}"),
            policy: crate::policy::Policy::default(),
            limiter: None,
        })
    }

    fn read(at: i64, who: &Arc<Caller>, name: &str, code: &'static str) -> Event {
        Event {
            at,
            request_id: RequestId(at as u64),
            caller: Some(who.clone()),
            rpc: "GetCredential",
            credential: Some(name.to_owned()),
            version: Some(1),
            code,
            latency_us: at as u64,
            peer: None,
        }
    }

    #[test]
    fn reads_fold_by_token_id_and_name_and_leave_when_due() {
        let mut folds = Folds::new(10);
        let mut out = Vec::new();
        let a = caller("aaaaaaaaaaaa");
        // The same token through another `Arc` (a reloaded token table) folds together.
        let a_again = caller("aaaaaaaaaaaa");
        let b = caller("bbbbbbbbbbbb");
        folds.add(read(100, &a, "x", "OK"), &mut out);
        folds.add(read(200, &a_again, "x", "OK"), &mut out);
        folds.add(read(300, &a, "x", "OK"), &mut out);
        folds.add(read(150, &b, "x", "OK"), &mut out);
        folds.add(read(160, &a, "y", "OK"), &mut out);
        folds.add(read(170, &a, "x", "NOT_FOUND"), &mut out);
        assert_eq!(out.len(), 1, "a failed read is its own event at once");
        assert_eq!((out[0].code.as_str(), out[0].count, out[0].last_at), ("NOT_FOUND", 1, None));
        assert_eq!(folds.open.len(), 3);

        out.clear();
        folds.take_due(100 + 10_000_000 - 1, &mut out);
        assert!(out.is_empty(), "nothing is due before its window ends");
        folds.take_due(150 + 10_000_000, &mut out);
        out.sort_by_key(|r| r.at);
        let summary: Vec<_> =
            out.iter().map(|r| (r.at, r.token_id.as_str(), r.count, r.last_at, r.latency_us)).collect();
        assert_eq!(summary, [(100, "aaaaaaaaaaaa", 3, Some(300), 300), (150, "bbbbbbbbbbbb", 1, None, 150)]);
        assert_eq!(out[0].request_id, RequestId(100).to_string(), "the first read's id is kept");
        assert_eq!(out[0].token_name, "name-of-aaaaaaaaaaaa");
        let rest = folds.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].credential.as_deref(), rest[0].count), (Some("y"), 1));
    }

    #[test]
    fn no_window_means_no_folding() {
        let mut folds = Folds::new(0);
        let mut out = Vec::new();
        let a = caller("aaaaaaaaaaaa");
        folds.add(read(1, &a, "x", "OK"), &mut out);
        folds.add(read(2, &a, "x", "OK"), &mut out);
        assert_eq!(out.len(), 2);
        assert!(folds.open.is_empty());
    }
}
