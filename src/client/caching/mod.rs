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
//! Streams opened for names outside every served prefix are capped
//! ([`CacheConfig::max_parent_streams`]): past the cap such a name is cached without a
//! stream, trusted for [`CacheConfig::unwatched_ttl`] only (a TTL cache for those names,
//! not a push one), so a service reading names from many directories cannot exhaust the
//! daemon's per-token stream limit.
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
//! lookup plus an `Arc` clone. `state.rs` holds it, `fill.rs` is the read path,
//! `streams.rs` the watch streams.

mod fill;
mod state;
mod streams;

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use super::{Client, Credential, Error, VersionInfo};
use state::{State, StreamKind};

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
    /// Streams started for names outside every served prefix (one per parent prefix) at
    /// most. The daemon limits open watch streams per token (64 by default) and across
    /// all tokens; configured and prefetched prefixes do not count against this cap.
    pub max_parent_streams: usize,
    /// The fallback past `max_parent_streams`: a name no stream serves is trusted for
    /// this long after it was read, then re-read (no push reaches it). Zero: such names
    /// are not cached at all.
    pub unwatched_ttl: Duration,
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
            max_parent_streams: 16,
            unwatched_ttl: Duration::from_secs(1),
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
    /// Streams opened for the parents of names outside the served prefixes.
    pub parent_streams: usize,
    /// Entries no stream serves (past `max_parent_streams`): on `unwatched_ttl` only.
    pub unwatched_entries: usize,
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
    /// The parent stream cap was logged once.
    cap_logged: AtomicBool,
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
        let prefixes = config.prefixes.clone();
        let inner = Arc::new(Inner {
            client,
            changes: broadcast::channel(1024).0,
            config,
            state: Mutex::new(State::new()),
            shutdown: rx,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            stale_served: AtomicU64::new(0),
            cap_logged: AtomicBool::new(false),
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
        st.watches.iter().all(|w| w.is_live())
    }

    /// Waits until every stream is established, up to `timeout`; returns whether they are.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let watches = self.handle.inner.lock().watches.clone();
            let mut pending = None;
            for w in &watches {
                if !w.is_live() {
                    pending = Some(w.clone());
                    break;
                }
            }
            let Some(w) = pending else { return true };
            let notified = w.changed.notified();
            if w.is_live() {
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
            watches_live: st.watches.iter().filter(|w| w.is_live()).count(),
            parent_streams: st.watches.iter().filter(|w| w.kind == StreamKind::Parent).count(),
            unwatched_entries: st.entries.iter().filter(|(_, e)| e.watch.is_none()).count(),
        }
    }

    /// Names currently cached (for the agent and tests).
    pub fn cached_names(&self) -> Vec<String> {
        self.handle.inner.lock().entries.iter().map(|(k, _)| k.clone()).collect()
    }
}
