//! [`CachingClient`]: credentials cached in the service's own process and kept fresh by
//! the daemon's pushes, not by a TTL.
//!
//! Every cached name is served by one `WatchCredentials` stream (a prefix given in
//! [`CacheConfig::prefixes`], by [`CachingClient::prefetch_prefix`], or else the name's
//! parent, `a/b/` for `a/b/c`, started on its first miss). A put, rotate or delete event
//! for a cached name drops the entry and, when someone subscribed to it or
//! `refresh_ahead` is on, loads the new version at once. A RESYNC, or a stream that is
//! lost and re-established, revalidates everything held under the prefix with batch
//! reads. TTL is only the backstop.
//!
//! **Invariant:** an entry is served as fresh only while its stream is live and the
//! entry was loaded (or revalidated) after that stream's subscription was in place
//! (`Entry::gen == WatchState::gen`). Anything else is re-read from the daemon first; it
//! is served stale only if the daemon cannot be reached, and only within
//! [`CacheConfig::stale_if_error`] of the moment it was last known to be current.
//!
//! **Invariant:** a load never stores a value that an event or a resync newer than the
//! load's start may have superseded (the epoch ticket), so once the stream is back and the
//! revalidation is done, no superseded version is served.
//!
//! The state is one `std::sync::Mutex`: no `.await` while it is held, and a hit is a
//! lookup plus an `Arc` clone.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use lru::LruCache;
use tokio::sync::{broadcast, watch, Notify, OnceCell};

use super::{Backoff, Client, Credential, Error, EventKind, VersionInfo, VersionState};

/// Names per `BatchGetCredentials` (the daemon's default `max_batch_size`).
const BATCH: usize = 100;

/// How the cache is bounded and how long it trusts what it holds.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Prefixes watched from the start (each one stream).
    pub prefixes: Vec<String>,
    pub max_entries: usize,
    /// Values, names and bookkeeping, approximately.
    pub max_bytes: usize,
    /// Backstop: an entry older than this is re-read even if no event came.
    pub ttl: Duration,
    /// While the daemon cannot be reached, a value is served up to this long after it was
    /// last known to be current; after that, [`Error::Unavailable`].
    pub stale_if_error: Duration,
    /// After a failed call to the daemon, calls within this window serve stale values
    /// without trying the daemon again (one probe per window, not one per call).
    pub probe_interval: Duration,
    /// On an event, load the new version at once instead of on the next `get`.
    pub refresh_ahead: bool,
    /// Reconnect backoff of the watch streams (with jitter).
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            prefixes: Vec::new(),
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            ttl: Duration::from_secs(15 * 60),
            stale_if_error: Duration::from_secs(5 * 60),
            probe_interval: Duration::from_millis(250),
            refresh_ahead: true,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }
}

/// What a subscriber sees: the current version (`None` once deleted) and, after a
/// rotation, the version it replaced with the end of its grace period.
#[derive(Debug, Clone)]
pub struct Update {
    pub credential: Option<Arc<Credential>>,
    pub previous: Option<VersionInfo>,
}

/// Counters, for tests, metrics and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub stale_served: u64,
    pub entries: usize,
    pub bytes: usize,
    pub watches: usize,
    pub watches_live: usize,
}

/// The client with an in-process cache. Cheap to clone; the streams stop and the values
/// are zeroized when the last clone is dropped.
#[derive(Clone)]
pub struct CachingClient {
    handle: Arc<Handle>,
}

struct Handle {
    inner: Arc<Inner>,
    // Dropping it ends every background task.
    _shutdown: watch::Sender<()>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // Zeroize now rather than when the last background task lets go of `inner`.
        let mut st = self.inner.lock();
        st.entries.clear();
        st.bytes = 0;
    }
}

struct Inner {
    client: Client,
    /// Names whose entry an event just dropped; an empty name after a resync.
    changes: broadcast::Sender<Arc<str>>,
    config: CacheConfig,
    state: Mutex<State>,
    shutdown: watch::Receiver<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    stale_served: AtomicU64,
}

/// One stream's view: `gen` changes whenever the stream is (re)established or resyncs.
struct WatchState {
    prefix: String,
    gen: AtomicU64,
    live: AtomicBool,
    changed: Notify,
}

struct Entry {
    cred: Arc<Credential>,
    watch: Arc<WatchState>,
    gen: u64,
    /// When the value was last known to be current.
    verified_at: Instant,
    weight: usize,
}

type Flight = Arc<OnceCell<Result<Arc<Credential>, Error>>>;

struct State {
    entries: LruCache<String, Entry>,
    bytes: usize,
    watches: Vec<Arc<WatchState>>,
    /// Loads in flight, one per name (single flight).
    inflight: HashMap<String, Flight>,
    /// Bumped by every event and resync; a load started at an older epoch must not store
    /// a name changed since (`changed_at`) or anything after a resync (`resync_epoch`).
    epoch: u64,
    changed_at: HashMap<String, u64>,
    resync_epoch: u64,
    /// Loads running; `changed_at` is only needed while there are some.
    loads: usize,
    /// Shared so a send happens outside the state lock: a subscriber holding a `borrow()`
    /// must never stall cache hits.
    subs: HashMap<String, Arc<watch::Sender<Update>>>,
    last_failure: Option<Instant>,
}

/// Taken before a load: what the cache looked like when it started.
#[derive(Clone, Copy)]
struct Ticket {
    epoch: u64,
    gen: u64,
}

impl fmt::Debug for CachingClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingClient")
            .field("client", &self.handle.inner.client)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl CachingClient {
    /// Starts one watch stream per configured prefix (needs a tokio runtime).
    pub fn new(client: Client, config: CacheConfig) -> CachingClient {
        let (tx, rx) = watch::channel(());
        // Unbounded by the crate: `store` evicts by entries and bytes itself, keeping the
        // byte count exact (a capacity-bound `put` would evict without telling).
        let entries = LruCache::unbounded();
        let prefixes = config.prefixes.clone();
        let inner = Arc::new(Inner {
            client,
            changes: broadcast::channel(1024).0,
            config,
            state: Mutex::new(State {
                entries,
                bytes: 0,
                watches: Vec::new(),
                inflight: HashMap::new(),
                epoch: 0,
                changed_at: HashMap::new(),
                resync_epoch: 0,
                loads: 0,
                subs: HashMap::new(),
                last_failure: None,
            }),
            shutdown: rx,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
        });
        for p in prefixes {
            inner.serve_prefix(&p);
        }
        CachingClient { handle: Arc::new(Handle { inner, _shutdown: tx }) }
    }

    /// The plain client underneath (writes go through it).
    pub fn client(&self) -> &Client {
        &self.handle.inner.client
    }

    /// The current version of `name`: from the cache when it is fresh, else from the
    /// daemon (one load per name however many callers miss at once), else, if the daemon
    /// cannot be reached, the last known value within the stale bound.
    pub async fn get(&self, name: &str) -> Result<Arc<Credential>, Error> {
        self.handle.inner.get(name).await
    }

    /// Loads `names` with batch reads (100 names each) and starts the streams that serve
    /// them. Per-name failures (not found, denied) are returned, not raised.
    pub async fn prefetch(&self, names: &[String]) -> Result<Vec<(String, Error)>, Error> {
        let inner = &self.handle.inner;
        for n in names {
            inner.watch_for(n);
        }
        inner.load_batch(names).await
    }

    /// Watches `prefix` (one stream) and loads everything under it the token may list.
    pub async fn prefetch_prefix(&self, prefix: &str) -> Result<Vec<(String, Error)>, Error> {
        let inner = &self.handle.inner;
        inner.serve_prefix(prefix);
        let names = inner.client.list_names(prefix).await?;
        inner.load_batch(&names).await
    }

    /// A receiver that sees every new version of `name` (and its deletion), e.g. to
    /// rebuild a connection pool when a password rotates. Subscribed names are refreshed
    /// as soon as their event arrives.
    pub async fn subscribe(&self, name: &str) -> Result<watch::Receiver<Update>, Error> {
        let cred = self.get(name).await?;
        let mut st = self.handle.inner.lock();
        let tx = st
            .subs
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(watch::channel(Update { credential: Some(cred), previous: None }).0));
        Ok(tx.subscribe())
    }

    /// Change notifications: the name of every credential an event touched (its entry is
    /// dropped by then, so a `get` reads the new version), and an empty name after a
    /// resync (anything may have changed). A receiver that lags sees `Lagged`: treat it
    /// as a resync.
    pub fn changes(&self) -> broadcast::Receiver<Arc<str>> {
        self.handle.inner.changes.subscribe()
    }

    /// Whether every stream is established (so cached entries can be trusted).
    pub fn is_live(&self) -> bool {
        let st = self.handle.inner.lock();
        st.watches.iter().all(|w| w.live.load(Ordering::Acquire))
    }

    /// Waits until every stream is established, up to `timeout`; returns whether they are.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let watches = self.handle.inner.lock().watches.clone();
            let mut pending = None;
            for w in &watches {
                if !w.live.load(Ordering::Acquire) {
                    pending = Some(w.clone());
                    break;
                }
            }
            let Some(w) = pending else { return true };
            let notified = w.changed.notified();
            if w.live.load(Ordering::Acquire) {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    pub fn stats(&self) -> CacheStats {
        let inner = &self.handle.inner;
        let st = inner.lock();
        CacheStats {
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            stale_served: inner.stale_served.load(Ordering::Relaxed),
            entries: st.entries.len(),
            bytes: st.bytes,
            watches: st.watches.len(),
            watches_live: st.watches.iter().filter(|w| w.live.load(Ordering::Acquire)).count(),
        }
    }

    /// Names currently cached (for the agent and tests).
    pub fn cached_names(&self) -> Vec<String> {
        self.handle.inner.lock().entries.iter().map(|(k, _)| k.clone()).collect()
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // serves a wrong value (every update is a single insert or remove), so go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let now = Instant::now();
        let mut fallback = None;
        {
            let mut st = self.lock();
            let probe_recent = st.last_failure.is_some_and(|t| now.duration_since(t) < self.config.probe_interval);
            if let Some(e) = st.entries.get(name) {
                if e.gen == e.watch.gen.load(Ordering::Acquire)
                    && e.watch.live.load(Ordering::Acquire)
                    && now.duration_since(e.verified_at) < self.config.ttl
                {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(e.cred.clone());
                }
                if now.duration_since(e.verified_at) <= self.config.stale_if_error {
                    fallback = Some(e.cred.clone());
                }
            }
            if probe_recent {
                if let Some(c) = fallback {
                    self.stale_served.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.watch_for(name);
        match self.fill(name).await {
            Err(e) if e.is_unavailable() => match fallback {
                Some(c) => {
                    self.stale_served.fetch_add(1, Ordering::Relaxed);
                    Ok(c)
                }
                None => Err(e),
            },
            r => r,
        }
    }

    /// One load per name: every concurrent caller waits for the same one.
    async fn fill(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let flight = self.lock().inflight.entry(name.to_owned()).or_default().clone();
        let result = flight.get_or_init(|| self.load(name)).await.clone();
        let mut st = self.lock();
        if st.inflight.get(name).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            st.inflight.remove(name);
        }
        result
    }

    async fn load(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let (watch, ticket, _guard) = {
            let mut st = self.lock();
            let w = st.serving(name);
            let gen = w.as_ref().map_or(0, |w| w.gen.load(Ordering::Acquire));
            st.loads += 1;
            (w, Ticket { epoch: st.epoch, gen }, LoadGuard(self))
        };
        let outcome = self.client.get(name).await.map(Arc::new);
        let publish = {
            let mut st = self.lock();
            match &outcome {
                Ok(c) => {
                    st.last_failure = None;
                    if let Some(w) = &watch {
                        self.store(&mut st, name, c.clone(), w, ticket);
                    }
                    Some(Some(c.clone()))
                }
                Err(Error::NotFound(_)) => {
                    st.last_failure = None;
                    if !st.superseded(name, ticket) {
                        st.remove(name);
                    }
                    Some(None)
                }
                Err(e) => {
                    if e.is_unavailable() {
                        st.last_failure = Some(Instant::now());
                    }
                    None
                }
            }
        };
        if let Some(c) = publish {
            self.publish(name, c).await;
        }
        outcome
    }

    /// Batch-loads `names` into the cache; returns the per-name failures.
    async fn load_batch(self: &Arc<Self>, names: &[String]) -> Result<Vec<(String, Error)>, Error> {
        let mut failures = Vec::new();
        for chunk in names.chunks(BATCH) {
            let _guard = LoadGuard(self);
            let tickets: Vec<(Option<Arc<WatchState>>, Ticket)> = {
                let mut st = self.lock();
                st.loads += 1;
                chunk
                    .iter()
                    .map(|n| {
                        let w = st.serving(n);
                        let gen = w.as_ref().map_or(0, |w| w.gen.load(Ordering::Acquire));
                        (w, Ticket { epoch: st.epoch, gen })
                    })
                    .collect()
            };
            let results = match self.client.batch_get(chunk).await {
                Ok(r) => r,
                Err(e) => {
                    if e.is_unavailable() {
                        self.lock().last_failure = Some(Instant::now());
                    }
                    return Err(e);
                }
            };
            let mut published = Vec::new();
            {
                let mut st = self.lock();
                st.last_failure = None;
                for ((name, outcome), (watch, ticket)) in results.into_iter().zip(tickets) {
                    match outcome {
                        Ok(c) => {
                            let c = Arc::new(c);
                            if let Some(w) = &watch {
                                self.store(&mut st, &name, c.clone(), w, ticket);
                            }
                            published.push((name, Some(c)));
                        }
                        Err(e) => {
                            if !st.superseded(&name, ticket) {
                                st.remove(&name);
                            }
                            if matches!(e, Error::NotFound(_)) {
                                published.push((name.clone(), None));
                            }
                            failures.push((name, e));
                        }
                    }
                }
            }
            for (name, c) in published {
                self.publish(&name, c).await;
            }
        }
        Ok(failures)
    }

    /// Stores a loaded value unless an event or resync since the load began may have
    /// superseded it, and unless the daemon itself served it stale.
    fn store(&self, st: &mut State, name: &str, cred: Arc<Credential>, watch: &Arc<WatchState>, ticket: Ticket) {
        if st.superseded(name, ticket) || cred.stale.is_some() {
            return;
        }
        if let Some(held) = st.entries.peek(name) {
            // Never replace a newer version with an older one.
            if held.cred.version > cred.version && held.gen == ticket.gen {
                return;
            }
        }
        let weight = cred.weight();
        if weight > self.config.max_bytes {
            return;
        }
        st.remove(name);
        st.bytes += weight;
        st.entries.put(
            name.to_owned(),
            Entry { cred, watch: watch.clone(), gen: ticket.gen, verified_at: Instant::now(), weight },
        );
        while st.bytes > self.config.max_bytes || st.entries.len() > self.config.max_entries {
            match st.entries.pop_lru() {
                Some((_, e)) => st.bytes -= e.weight,
                None => break,
            }
        }
    }

    /// Tells the subscribers of `name` about a version they have not seen yet.
    async fn publish(&self, name: &str, cred: Option<Arc<Credential>>) {
        let tx = {
            let mut st = self.lock();
            let Some(tx) = st.subs.get(name).cloned() else { return };
            if tx.receiver_count() == 0 {
                st.subs.remove(name);
                return;
            }
            tx
        };
        let newer = {
            let seen = tx.borrow().credential.as_ref().map(|c| c.version);
            match (&cred, seen) {
                (Some(c), Some(v)) => c.version > v,
                (Some(_), None) => true,
                (None, Some(_)) => true,
                (None, None) => false,
            }
        };
        if !newer {
            return;
        }
        // The version this one replaced, with the end of its grace period.
        let previous = match &cred {
            Some(c) => self
                .client
                .versions(name)
                .await
                .ok()
                .and_then(|vs| vs.into_iter().find(|v| v.version < c.version && v.state == VersionState::Previous)),
            None => None,
        };
        tx.send_if_modified(|u| {
            let replace = match (&cred, u.credential.as_ref().map(|c| c.version)) {
                (Some(c), Some(v)) => c.version > v,
                (Some(_), None) | (None, Some(_)) => true,
                (None, None) => false,
            };
            if replace {
                *u = Update { credential: cred.clone(), previous: previous.clone() };
            }
            replace
        });
    }

    /// The stream that serves `name`, started (for its parent) if none does.
    fn watch_for(self: &Arc<Self>, name: &str) {
        if self.lock().serving(name).is_some() {
            return;
        }
        let parent = match name.rfind('/') {
            Some(i) => &name[..=i],
            None => name,
        };
        self.serve_prefix(parent);
    }

    /// Starts a stream for `prefix` unless one with that exact prefix exists.
    fn serve_prefix(self: &Arc<Self>, prefix: &str) {
        let w = {
            let mut st = self.lock();
            if st.watches.iter().any(|w| w.prefix == prefix) {
                return;
            }
            let w = Arc::new(WatchState {
                prefix: prefix.to_owned(),
                gen: AtomicU64::new(1),
                live: AtomicBool::new(false),
                changed: Notify::new(),
            });
            st.watches.push(w.clone());
            // Longest prefix first, so `serving` finds the most specific stream.
            st.watches.sort_by_key(|w| std::cmp::Reverse(w.prefix.len()));
            w
        };
        let inner = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = inner.clone().run_watch(w.clone()) => {}
            }
            w.live.store(false, Ordering::Release);
        });
    }

    /// Keeps one stream open: on every (re)connect the entries it serves are revalidated;
    /// events drop (and refresh) entries; a lost stream marks them unverified.
    async fn run_watch(self: Arc<Self>, w: Arc<WatchState>) {
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max);
        loop {
            match self.client.watch(&w.prefix).await {
                Ok(mut stream) => {
                    backoff.reset();
                    tracing::debug!(prefix = %w.prefix, "watch stream established");
                    self.resync(&w, true).await;
                    loop {
                        match stream.next().await {
                            Some(Ok(ev)) if ev.kind == EventKind::Resync => self.resync(&w, false).await,
                            Some(Ok(ev)) => self.on_change(&w, &ev.name, ev.version, ev.kind),
                            Some(Err(e)) => {
                                tracing::info!(prefix = %w.prefix, error = %e, "watch stream lost; reconnecting");
                                break;
                            }
                            None => {
                                tracing::info!(prefix = %w.prefix, "watch stream ended; reconnecting");
                                break;
                            }
                        }
                    }
                    self.lost(&w);
                }
                Err(e) => {
                    tracing::debug!(prefix = %w.prefix, error = %e, "cannot open the watch stream");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The stream is (again) in place: everything held under it is re-read.
    async fn resync(self: &Arc<Self>, w: &Arc<WatchState>, connected: bool) {
        let held: Vec<String> = {
            let mut st = self.lock();
            st.epoch += 1;
            st.resync_epoch = st.epoch;
            w.gen.fetch_add(1, Ordering::AcqRel);
            if connected {
                w.live.store(true, Ordering::Release);
            }
            st.entries.iter().filter(|(_, e)| Arc::ptr_eq(&e.watch, w)).map(|(k, _)| k.clone()).collect()
        };
        w.changed.notify_waiters();
        if let Err(e) = self.load_batch(&held).await {
            tracing::info!(prefix = %w.prefix, error = %e, "revalidation failed; entries will be re-read on use");
        }
        let _ = self.changes.send(Arc::from(""));
    }

    fn on_change(self: &Arc<Self>, w: &Arc<WatchState>, name: &str, version: u64, kind: EventKind) {
        let refresh = {
            let mut st = self.lock();
            st.epoch += 1;
            let epoch = st.epoch;
            if st.loads > 0 {
                st.changed_at.insert(name.to_owned(), epoch);
            }
            let gen = w.gen.load(Ordering::Acquire);
            let held = st.entries.peek(name).map(|e| (e.cred.version, e.gen == gen));
            // A put or rotate we already hold (our own write, read back) changes nothing.
            if matches!(kind, EventKind::Put | EventKind::Rotate)
                && held.is_some_and(|(v, current)| current && v >= version)
            {
                return;
            }
            st.remove(name);
            st.subs.contains_key(name) || (held.is_some() && self.config.refresh_ahead)
        };
        let _ = self.changes.send(Arc::from(name));
        if refresh {
            let inner = self.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                let _ = inner.fill(&name).await;
            });
        }
    }

    /// The stream is gone: what it vouched for was current until now, and is unverified
    /// from now on.
    fn lost(&self, w: &Arc<WatchState>) {
        let mut st = self.lock();
        let gen = w.gen.load(Ordering::Acquire);
        let now = Instant::now();
        for (_, e) in st.entries.iter_mut() {
            if Arc::ptr_eq(&e.watch, w) && e.gen == gen {
                e.verified_at = now;
            }
        }
        w.live.store(false, Ordering::Release);
        w.gen.fetch_add(1, Ordering::AcqRel);
        drop(st);
        w.changed.notify_waiters();
    }
}

/// Ends a load's claim on `changed_at`, also when the load is cancelled.
struct LoadGuard<'a>(&'a Inner);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.loads = st.loads.saturating_sub(1);
        if st.loads == 0 {
            st.changed_at.clear();
        }
    }
}

impl State {
    fn serving(&self, name: &str) -> Option<Arc<WatchState>> {
        self.watches.iter().find(|w| name.starts_with(&w.prefix)).cloned()
    }

    fn superseded(&self, name: &str, ticket: Ticket) -> bool {
        self.resync_epoch > ticket.epoch || self.changed_at.get(name).is_some_and(|&e| e > ticket.epoch)
    }

    fn remove(&mut self, name: &str) {
        if let Some(e) = self.entries.pop(name) {
            self.bytes -= e.weight;
        }
    }
}
