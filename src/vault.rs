//! The core: credentials over a [`Store`] and a [`KeyRing`]. It validates input, seals
//! and opens values, and turns store outcomes into [`VaultError`]s. It knows nothing of
//! gRPC; `service` converts at the edge.
//!
//! **Invariant:** plaintext leaves this module only inside [`CredentialValue`], whose
//! `Debug` is redacted and whose buffer is zeroized on drop.

use std::fmt;
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use crate::cache::{Cache, CacheSettings, Cached, CachedVersion, Hit};
use crate::crypto::{self, CryptoError, KeyRing, Sealed};
use crate::names::{check_prefix, CredentialName};
use crate::store::{
    now_micros, Backend, Change, ChangeEvent, ChangeKind, CredentialRow, CredentialStore, Instrumented, Metadata,
    Micros, NewVersion, PolicyAdvance, Store, StoreError, VersionInfo, VersionRow, VersionState, WriteBase,
};
use crate::telemetry::names::DECRYPT_DURATION;

mod feed;
mod keys;
mod listing;
mod rotation;
mod write_queue;

pub use keys::JobProgress;
pub use listing::{open_page_token, page_key, seal_page_token, PageBinding, PageTokenError, PAGE_TOKEN_TTL};
pub use rotation::{NewValue, PolicySpec, RotateOutcome, RotationSettings};

/// Request-size limits; every one is enforced before the store is touched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_value_bytes: usize,
    pub max_name_bytes: usize,
    pub max_batch_size: usize,
    pub max_page_size: u32,
    pub default_page_size: u32,
    /// Rows one `ListCredentials` request reads from the store at most, counting those
    /// the caller may not see; past it the page comes back short with a token to go on.
    pub max_list_scan_rows: usize,
    /// Versions kept per credential; older ones are pruned on write.
    pub max_versions: u64,
    pub max_labels: usize,
    /// Requests in flight at most; beyond it requests are refused at once.
    pub max_concurrent_requests: usize,
    /// Requests per second for tokens without their own limit (0: unlimited).
    pub default_token_rate_per_second: u32,
    /// Longest a single store call may take before the request fails with UNAVAILABLE.
    pub store_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_value_bytes: 64 * 1024,
            max_name_bytes: 256,
            max_batch_size: 100,
            max_page_size: 1000,
            default_page_size: 100,
            max_list_scan_rows: 10_000,
            max_versions: 10,
            max_labels: 64,
            max_concurrent_requests: 1024,
            default_token_rate_per_second: 0,
            store_timeout_ms: 5000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    /// The caller's capability covers the operation but not this use of it (e.g. a
    /// grace period cut short without `destroy`).
    #[error("{0}")]
    PermissionDenied(String),
    /// An `expected_version` did not match.
    #[error("version conflict on {name:?}: expected version {expected}, current version is {current}{}", if *.deleted { " (deleted)" } else { "" })]
    Conflict { name: String, expected: u64, current: u64, deleted: bool },
    /// `expected_version = 0` but the credential exists.
    #[error("credential {name:?} already exists at version {current}")]
    AlreadyExists { name: String, current: u64 },
    /// The version exists but is not readable (destroyed, deprecated, grace period over).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Stored bytes failed authentication: tampered, moved, or sealed under another key.
    #[error("version {version} of {name:?} cannot be decrypted: stored data failed authentication")]
    DataLoss { name: String, version: u64 },
    /// The operation lost a race it cannot retry by itself (e.g. two KEK rotations).
    #[error("{0}")]
    Aborted(String),
    #[error("storage is unavailable")]
    Unavailable(#[source] StoreError),
    #[error("internal error")]
    Internal(String),
    /// A value is sealed under a KEK this daemon has not loaded (another daemon rotated
    /// the KEK): callers reload the keys and retry once.
    #[error("unknown key-encryption key {0}")]
    UnknownKek(i64),
}

impl From<StoreError> for VaultError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) | StoreError::Timeout(..) | StoreError::Down => VaultError::Unavailable(e),
            StoreError::JobRunning(id) => VaultError::FailedPrecondition(format!(
                "KEK rotation job {id} is still running; follow it with GetRotationJob"
            )),
            other => VaultError::Internal(other.to_string()),
        }
    }
}

/// A decrypted credential version. The value is zeroized on drop and never printed.
pub struct CredentialValue {
    pub name: String,
    pub version: u64,
    pub state: VersionState,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub value: Zeroizing<Vec<u8>>,
    /// Served from an unverified or expired cache entry because the store could not be
    /// reached: how long since the daemon last knew this version to be current.
    pub stale: Option<std::time::Duration>,
}

impl fmt::Debug for CredentialValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialValue")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("state", &self.state)
            .field("stale", &self.stale)
            .field("value", &"REDACTED")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct PutOutcome {
    pub name: String,
    pub version: u64,
    pub created_at: Micros,
}

#[derive(Debug, Clone)]
pub struct CredentialDetails {
    pub head: CredentialRow,
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub credentials: Vec<CredentialRow>,
    pub next_page_token: String,
}

#[derive(Debug, Clone)]
pub struct VaultStatus {
    pub backend: Backend,
    pub storage_healthy: bool,
    pub active_kek_id: i64,
    pub credentials: u64,
}

/// What `WatchCredentials` streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Change(ChangeEvent),
    /// Changes may have been missed (the change feed reconnected): re-read everything.
    Resync,
}

/// A write's options beyond name and value.
#[derive(Debug, Clone, Copy)]
struct WriteOptions<'a> {
    expected: Option<u64>,
    metadata: Option<&'a Metadata>,
    /// How long the replaced version stays readable (`None`: until pruned).
    grace: Option<std::time::Duration>,
    kind: ChangeKind,
    policy: Option<PolicyAdvance>,
    /// Only a live credential may be written (rotations): never create or revive one.
    live_only: bool,
}

/// A cheap handle: clone it into every service.
#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Instrumented>,
    cache: Cache,
    decrypt_duration: metrics::Histogram,
    // std RwLock: held only for synchronous sealing/opening, never across an `.await`.
    keys: RwLock<KeyRing>,
    limits: Limits,
    rotation: RotationSettings,
    /// Local writes and changes reported by the change feed, for `WatchCredentials`.
    events: tokio::sync::broadcast::Sender<WatchEvent>,
    /// Names this daemon in job leases.
    instance: String,
    /// Wakes the job worker when a job is started here.
    job_wake: tokio::sync::Notify,
    /// Serializes key reloads, so two never interleave their reads and writes of the ring.
    reload: tokio::sync::Mutex<()>,
    /// The change feed's state and the keeper's wake-ups (see `vault/feed.rs`).
    feed: feed::FeedState,
    /// Writes to one name from this daemon take turns (see `vault/write_queue.rs`).
    writes: write_queue::WriteQueue,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault").field("backend", &self.inner.store.backend()).finish_non_exhaustive()
    }
}

/// Unconditional writes retry their internal compare-and-set this many times.
const MAX_WRITE_ATTEMPTS: usize = 64;

/// Before retrying a write that lost its compare-and-set to another daemon: a random
/// wait below 1, 2, 4, … 32 ms, so daemons that collided do not collide again in step.
async fn conflict_backoff(attempt: usize) {
    let cap_ms = 1u64 << attempt.min(5);
    let wait = rand::random_range(0..cap_ms * 1000);
    tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
}

/// The highest version a credential can reach: both backends store versions as signed
/// 64-bit integers.
pub const MAX_VERSION: u64 = i64::MAX as u64;

/// An `expected_version` after which no version can follow is refused before anything
/// is read, so the version arithmetic after it never overflows.
fn check_expected(expected: Option<u64>) -> Result<(), VaultError> {
    match expected {
        Some(v) if v >= MAX_VERSION => Err(VaultError::InvalidArgument(format!(
            "expected_version {v} is out of range: versions go up to {MAX_VERSION}, so it must be below that"
        ))),
        _ => Ok(()),
    }
}

impl Vault {
    pub fn new(store: Arc<dyn Store>, keys: KeyRing, limits: Limits, cache: CacheSettings) -> Self {
        Self::with_rotation(store, keys, limits, cache, RotationSettings::default())
    }

    pub fn with_rotation(
        store: Arc<dyn Store>,
        keys: KeyRing,
        limits: Limits,
        cache: CacheSettings,
        rotation: RotationSettings,
    ) -> Self {
        Vault {
            inner: Arc::new(Inner {
                store: Arc::new(Instrumented::new(
                    store,
                    std::time::Duration::from_millis(limits.store_timeout_ms.max(1)),
                )),
                cache: Cache::new(cache),
                decrypt_duration: metrics::histogram!(DECRYPT_DURATION),
                keys: RwLock::new(keys),
                limits,
                events: tokio::sync::broadcast::channel(rotation.watch_buffer.max(1)).0,
                rotation,
                instance: format!("{:016x}", rand::random::<u64>()),
                job_wake: tokio::sync::Notify::new(),
                reload: tokio::sync::Mutex::new(()),
                feed: feed::FeedState::default(),
                writes: write_queue::WriteQueue::default(),
            }),
        }
    }

    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Store calls made through this vault so far.
    pub fn store_queries(&self) -> u64 {
        self.inner.store.queries()
    }

    /// Applies a change reported by the store's change feed (another daemon's write).
    /// Key changes need the store: the caller runs [`Vault::reload_keys`] for those.
    /// A lost feed makes the cache unverified; a resubscribed one has the keeper
    /// ([`Vault::run_keeper`]) revalidate it and then tell watchers to resync.
    pub fn apply_change(&self, change: Change) {
        match change {
            Change::Credential(event) => {
                self.inner.cache.invalidate(&event.name);
                self.publish(WatchEvent::Change(event));
            }
            Change::Lost => self.feed_lost(),
            Change::Resync => self.feed_subscribed(),
            Change::Tokens | Change::Token(_) | Change::Keys => {}
        }
    }

    /// Change events from now on. A receiver that falls more than the watch buffer
    /// behind gets `Lagged` and should be dropped.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<WatchEvent> {
        self.inner.events.subscribe()
    }

    fn publish(&self, event: WatchEvent) {
        // No receivers is fine: nobody is watching.
        let _ = self.inner.events.send(event);
    }

    fn publish_change(&self, name: &str, kind: ChangeKind, version: u64, at: Micros) {
        self.publish(WatchEvent::Change(ChangeEvent { name: name.to_owned(), kind, version, at }));
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    fn name(&self, s: &str) -> Result<CredentialName, VaultError> {
        CredentialName::parse(s, self.inner.limits.max_name_bytes).map_err(|e| VaultError::InvalidArgument(e.0))
    }

    fn with_keys<T>(&self, f: impl FnOnce(&KeyRing) -> T) -> T {
        // A poisoned lock means a panic elsewhere mid-read; the ring itself is never left
        // half-updated (KEKs are inserted whole), so it is safe to keep using.
        let guard = self.inner.keys.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Reads version `version` (the current one if `None` or 0) of `name`. The current
    /// version is served from the cache; a miss loads it once for all concurrent callers.
    pub async fn get(&self, name: &str, version: Option<u64>) -> Result<CredentialValue, VaultError> {
        match self.get_once(name, version).await {
            // Sealed under a KEK another daemon created: load it, then read again.
            Err(VaultError::UnknownKek(_)) => {
                self.reload_keys().await?;
                self.get_once(name, version).await
            }
            other => other,
        }
    }

    async fn get_once(&self, name: &str, version: Option<u64>) -> Result<CredentialValue, VaultError> {
        let name = self.name(name)?;
        let version = version.filter(|v| *v != 0);
        let hit = self.inner.cache.lookup(name.as_str());
        match (version, hit) {
            (None, Some(h)) if h.fresh => self.serve(&name, h.value),
            (None, None) => {
                let c = self.load_current(&name).await?;
                self.serve(&name, c)
            }
            // Unverified or expired: the store decides, unless it cannot be reached.
            (None, Some(h)) => match self.load_current(&name).await {
                Err(VaultError::Unavailable(e)) => self.serve_stale(&name, h, e),
                other => self.serve(&name, other?),
            },
            (Some(v), Some(h)) if h.fresh => match h.value {
                Cached::Found(c) if c.version() == v => self.serve(&name, Cached::Found(c)),
                Cached::Missing { deleted: true } => Err(deleted(&name)),
                _ => self.get_version_uncached(&name, v).await,
            },
            (Some(v), Some(h)) => match self.get_version_uncached(&name, v).await {
                Err(VaultError::Unavailable(e)) if matches!(&h.value, Cached::Found(c) if c.version() == v) => {
                    self.serve_stale(&name, h, e)
                }
                other => other,
            },
            (Some(v), None) => self.get_version_uncached(&name, v).await,
        }
    }

    /// Answers from a cache entry that is not fresh because the store is unreachable,
    /// if `cache.serve_stale_seconds` allows it; otherwise the store's error stands.
    fn serve_stale(&self, name: &CredentialName, hit: Hit, error: StoreError) -> Result<CredentialValue, VaultError> {
        if !self.may_serve_stale() {
            return Err(VaultError::Unavailable(error));
        }
        self.inner.cache.count_stale_serve();
        let mut v = self.serve(name, hit.value)?;
        v.stale = Some(hit.age);
        Ok(v)
    }

    /// Explicit older versions are read from the store; only current versions are cached.
    async fn get_version_uncached(&self, name: &CredentialName, wanted: u64) -> Result<CredentialValue, VaultError> {
        let found = self.inner.store.get_version(name.as_str(), Some(wanted)).await?;
        let (head, row) = found.ok_or_else(|| not_found(name))?;
        if head.deleted_at.is_some() {
            return Err(deleted(name));
        }
        let row = row.ok_or_else(|| {
            if wanted > head.current_version {
                VaultError::NotFound(format!(
                    "credential {:?} has no version {wanted}; the current version is {}",
                    name.as_str(),
                    head.current_version
                ))
            } else {
                VaultError::NotFound(format!(
                    "version {wanted} of {:?} is no longer retained (the last {} versions are kept)",
                    name.as_str(),
                    self.inner.limits.max_versions
                ))
            }
        })?;
        let sealed = readable(name, &row)?;
        let value = self.decrypt(name, row.info.version, sealed)?;
        Ok(credential_value(name, &row.info, value))
    }

    async fn load_current(&self, name: &CredentialName) -> Result<Cached, VaultError> {
        let store = &self.inner.store;
        self.inner
            .cache
            .load_coalesced(name.as_str(), || async {
                match store.get_version(name.as_str(), None).await? {
                    None => Ok(Cached::Missing { deleted: false }),
                    Some((head, _)) if head.deleted_at.is_some() => Ok(Cached::Missing { deleted: true }),
                    Some((_, Some(row))) => Ok(Cached::Found(Arc::new(CachedVersion::new(row)))),
                    Some((head, None)) => Err(VaultError::Internal(format!(
                        "current version {} of {:?} has no row",
                        head.current_version,
                        name.as_str()
                    ))),
                }
            })
            .await
    }

    /// Turns a cache entry into a value, decrypting lazily (and memoizing if configured).
    fn serve(&self, name: &CredentialName, cached: Cached) -> Result<CredentialValue, VaultError> {
        let entry = match cached {
            Cached::Found(entry) => entry,
            Cached::Missing { deleted: true } => return Err(deleted(name)),
            Cached::Missing { deleted: false } => return Err(not_found(name)),
        };
        check_state(name, &entry.info)?;
        let value = match (entry.plaintext(), entry.sealed()) {
            (Some(p), _) => Zeroizing::new(p.to_vec()),
            (None, Some(sealed)) => {
                let value = self.decrypt(name, entry.version(), sealed)?;
                self.inner.cache.memoize(name.as_str(), &entry, &value);
                value
            }
            (None, None) => return Err(unreadable(name, &entry.info)),
        };
        Ok(credential_value(name, &entry.info, value))
    }

    fn decrypt(&self, name: &CredentialName, version: u64, sealed: &Sealed) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let start = std::time::Instant::now();
        let opened = self.with_keys(|ring| crypto::open_value(ring, name.as_str(), version, sealed));
        self.inner.decrypt_duration.record(start.elapsed().as_secs_f64());
        opened.map_err(|e| match e {
            CryptoError::UnknownKek(id) => VaultError::UnknownKek(id),
            e => self.data_loss(name, version, e),
        })
    }

    fn data_loss(&self, name: &CredentialName, version: u64, e: CryptoError) -> VaultError {
        tracing::error!(credential = %name, version, error = %e, "stored credential failed to decrypt");
        VaultError::DataLoss { name: name.as_str().to_owned(), version }
    }

    /// Reads the current version of each name with one store query. The outer error is
    /// for the request as a whole (bad names, too many, storage down); each name then
    /// has its own outcome, in request order.
    pub async fn batch_get(&self, names: &[String]) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        let results = self.batch_get_once(names).await?;
        if !results.iter().any(|r| matches!(r, Err(VaultError::UnknownKek(_)))) {
            return Ok(results);
        }
        self.reload_keys().await?;
        self.batch_get_once(names).await
    }

    async fn batch_get_once(&self, names: &[String]) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        let max = self.inner.limits.max_batch_size;
        if names.len() > max {
            return Err(VaultError::InvalidArgument(format!(
                "batch asks for {} credentials; the limit is {max}",
                names.len()
            )));
        }
        let parsed = names.iter().map(|n| self.name(n)).collect::<Result<Vec<_>, _>>()?;
        let cache = &self.inner.cache;
        let mut known: std::collections::HashMap<&str, Cached> = std::collections::HashMap::new();
        let mut misses: Vec<(String, crate::cache::FillTicket)> = Vec::new();
        // Entries that are not fresh: the fallback if the store cannot be reached.
        let mut unfresh: std::collections::HashMap<&str, Hit> = std::collections::HashMap::new();
        for name in &parsed {
            if known.contains_key(name.as_str()) || misses.iter().any(|(m, _)| m == name.as_str()) {
                continue;
            }
            match cache.lookup(name.as_str()) {
                Some(h) if h.fresh => {
                    known.insert(name.as_str(), h.value);
                }
                other => {
                    if let Some(h) = other {
                        unfresh.insert(name.as_str(), h);
                    }
                    misses.push((name.as_str().to_owned(), cache.ticket(name.as_str())));
                }
            }
        }
        if !misses.is_empty() {
            // All misses in one query.
            let wanted: Vec<String> = misses.iter().map(|(n, _)| n.clone()).collect();
            let rows = match self.inner.store.get_current_many(&wanted).await {
                Ok(rows) => rows,
                Err(e) if e.outage().is_some() || matches!(e, StoreError::Down) => {
                    return self.batch_stale(&parsed, known, unfresh, e);
                }
                Err(e) => return Err(e.into()),
            };
            let mut rows: std::collections::HashMap<String, (CredentialRow, VersionRow)> =
                rows.into_iter().map(|(h, v)| (h.name.clone(), (h, v))).collect();
            for (name, ticket) in &misses {
                let c = match rows.remove(name) {
                    None => Cached::Missing { deleted: false },
                    Some((head, _)) if head.deleted_at.is_some() => Cached::Missing { deleted: true },
                    Some((_, row)) => Cached::Found(Arc::new(CachedVersion::new(row))),
                };
                cache.fill(name, *ticket, c.clone());
                if let Some(parsed_name) = parsed.iter().find(|p| p.as_str() == name) {
                    known.insert(parsed_name.as_str(), c);
                }
            }
        }
        Ok(parsed
            .iter()
            .map(|name| match known.get(name.as_str()) {
                Some(c) => self.serve(name, c.clone()),
                None => Err(not_found(name)),
            })
            .collect())
    }

    /// A batch whose store read failed because the store is unreachable: names with a
    /// cache entry are answered from it (marked stale) if `cache.serve_stale_seconds`
    /// allows; the others fail with UNAVAILABLE in their own slot. With nothing to serve
    /// the whole batch fails.
    fn batch_stale(
        &self,
        parsed: &[CredentialName],
        known: std::collections::HashMap<&str, Cached>,
        unfresh: std::collections::HashMap<&str, Hit>,
        error: StoreError,
    ) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        if unfresh.is_empty() || !self.may_serve_stale() {
            return Err(VaultError::Unavailable(error));
        }
        Ok(parsed
            .iter()
            .map(|name| {
                if let Some(c) = known.get(name.as_str()) {
                    return self.serve(name, c.clone());
                }
                match unfresh.get(name.as_str()) {
                    Some(h) => {
                        self.inner.cache.count_stale_serve();
                        let mut v = self.serve(name, h.value.clone())?;
                        v.stale = Some(h.age);
                        Ok(v)
                    }
                    None => Err(VaultError::Unavailable(StoreError::Down)),
                }
            })
            .collect())
    }

    /// Metadata and retained versions; never decrypts. Deleted credentials are shown
    /// (with `deleted_at` set) so operators can inspect them.
    pub async fn metadata(&self, name: &str) -> Result<CredentialDetails, VaultError> {
        let name = self.name(name)?;
        let head = self.inner.store.get_credential(name.as_str()).await?.ok_or_else(|| not_found(&name))?;
        let versions = self.inner.store.list_versions(name.as_str()).await?;
        Ok(CredentialDetails { head, versions })
    }

    /// Writes a new version. `expected`: `None` unconditional, `Some(0)` must not exist
    /// (or be deleted), `Some(n)` the current version must be `n`.
    pub async fn put(
        &self,
        name: &str,
        value: &[u8],
        expected: Option<u64>,
        metadata: Option<&Metadata>,
    ) -> Result<PutOutcome, VaultError> {
        let opts =
            WriteOptions { expected, metadata, grace: None, kind: ChangeKind::Put, policy: None, live_only: false };
        self.write(name, value, opts).await
    }

    async fn write(&self, name: &str, value: &[u8], opts: WriteOptions<'_>) -> Result<PutOutcome, VaultError> {
        let WriteOptions { expected, metadata, grace, kind, policy, live_only } = opts;
        let name = self.name(name)?;
        check_expected(expected)?;
        self.check_value(value)?;
        if let Some(m) = metadata {
            self.check_metadata(m)?;
        }
        let store = &self.inner.store;
        // From here on this daemon's other writes to the name wait their turn, so the
        // compare-and-set below can only lose to another daemon.
        let _turn = self.inner.writes.turn(name.as_str()).await;
        let mut base = match expected {
            Some(0) => WriteBase::Create,
            Some(n) => WriteBase::Update(n),
            None => head_base(store.get_credential(name.as_str()).await?.as_ref()),
        };
        let live = |base: WriteBase| match base {
            WriteBase::Create if live_only => Err(not_found(&name)),
            WriteBase::Revive(_) if live_only => Err(deleted(&name)),
            _ => Ok(base),
        };
        base = live(base)?;
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            if attempt > 0 {
                conflict_backoff(attempt).await;
            }
            let version = base.next_version();
            if version > MAX_VERSION {
                return Err(VaultError::FailedPrecondition(format!(
                    "credential {:?} is at version {MAX_VERSION}, the highest there is",
                    name.as_str()
                )));
            }
            let sealed = self
                .with_keys(|ring| crypto::seal_value(ring, name.as_str(), version, value))
                .map_err(|e| VaultError::Internal(format!("sealing failed: {e}")))?;
            let now = now_micros();
            let new = NewVersion {
                name: name.as_str(),
                base,
                sealed: &sealed,
                metadata,
                now,
                max_versions: self.inner.limits.max_versions,
                previous_expires_at: grace.map(|g| now.saturating_add(micros(g))),
                kind,
                policy,
            };
            let ticket = self.inner.cache.ticket(name.as_str());
            match store.put_version(&new).await {
                Ok(_) => {
                    // Read-your-writes: the new version is cached before the call returns.
                    let info = VersionInfo {
                        version,
                        state: VersionState::Current,
                        kek_id: sealed.kek_id,
                        created_at: now,
                        expires_at: None,
                    };
                    let row = VersionRow { info, sealed: Some(sealed) };
                    self.inner.cache.install(name.as_str(), ticket, Arc::new(CachedVersion::new(row)));
                    self.publish_change(name.as_str(), kind, version, now);
                    return Ok(PutOutcome { name: name.as_str().to_owned(), version, created_at: now });
                }
                Err(StoreError::Conflict) => {
                    // Someone else wrote: whatever this daemon cached is behind.
                    self.inner.cache.invalidate(name.as_str());
                }
                Err(StoreError::StaleKek(_)) => {
                    // Another daemon rotated the KEK: seal again under the new one.
                    self.reload_keys().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let head = store.get_credential(name.as_str()).await?;
            base = match (expected, head.as_ref()) {
                // Unconditional: retry on whatever is there now.
                (None, h) => live(head_base(h))?,
                // Create-only may revive a deleted credential, once, at the version seen.
                (Some(0), Some(h)) if h.deleted_at.is_some() && base == WriteBase::Create => {
                    WriteBase::Revive(h.current_version)
                }
                (Some(0), Some(h)) => {
                    return Err(VaultError::AlreadyExists {
                        name: name.as_str().to_owned(),
                        current: h.current_version,
                    })
                }
                (Some(0), None) => WriteBase::Create,
                (Some(n), h) => {
                    return Err(match h {
                        None => not_found(&name),
                        Some(h) => VaultError::Conflict {
                            name: name.as_str().to_owned(),
                            expected: n,
                            current: h.current_version,
                            deleted: h.deleted_at.is_some(),
                        },
                    })
                }
            };
        }
        Err(VaultError::Aborted(format!(
            "gave up writing {:?} after {MAX_WRITE_ATTEMPTS} attempts lost to concurrent writers; retry",
            name.as_str()
        )))
    }

    fn check_value(&self, value: &[u8]) -> Result<(), VaultError> {
        let max = self.inner.limits.max_value_bytes;
        if value.is_empty() {
            return Err(VaultError::InvalidArgument("value must not be empty".into()));
        }
        if value.len() > max {
            return Err(VaultError::InvalidArgument(format!("value is {} bytes; the limit is {max}", value.len())));
        }
        Ok(())
    }

    fn check_metadata(&self, m: &Metadata) -> Result<(), VaultError> {
        let bad = |msg: String| Err(VaultError::InvalidArgument(msg));
        if m.labels.len() > self.inner.limits.max_labels {
            return bad(format!("{} labels; the limit is {}", m.labels.len(), self.inner.limits.max_labels));
        }
        for (k, v) in &m.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.'));
            if !key_ok {
                return bad(format!("label key {k:?} must be 1-63 characters of [a-z0-9._-]"));
            }
            if v.len() > 256 {
                return bad(format!("label {k:?} value is {} bytes; the limit is 256", v.len()));
            }
        }
        if m.description.len() > 1024 {
            return bad(format!("description is {} bytes; the limit is 1024", m.description.len()));
        }
        if m.owner.len() > 256 {
            return bad(format!("owner is {} bytes; the limit is 256", m.owner.len()));
        }
        Ok(())
    }

    /// Soft-deletes `name`; versions are kept. Returns the head after the delete.
    pub async fn delete(&self, name: &str, expected: Option<u64>) -> Result<CredentialRow, VaultError> {
        let name = self.name(name)?;
        check_expected(expected)?;
        let now = now_micros();
        let store = &self.inner.store;
        let deleted = store.delete_credential(name.as_str(), expected.filter(|v| *v != 0), now).await;
        // Deleted, or lost to a concurrent change: either way the cached entry is stale.
        self.inner.cache.invalidate(name.as_str());
        let deleted = deleted?;
        let head = store.get_credential(name.as_str()).await?.ok_or_else(|| not_found(&name))?;
        if deleted {
            self.publish_change(name.as_str(), ChangeKind::Delete, head.current_version, now);
            return Ok(head);
        }
        if head.deleted_at.is_some() {
            return Err(VaultError::NotFound(format!("credential {:?} is already deleted", name.as_str())));
        }
        Err(VaultError::Conflict {
            name: name.as_str().to_owned(),
            expected: expected.unwrap_or_default(),
            current: head.current_version,
            deleted: false,
        })
    }

    /// Irreversibly wipes version `version` of `name` (idempotent).
    pub async fn destroy_version(&self, name: &str, version: u64) -> Result<(), VaultError> {
        let name = self.name(name)?;
        let outcome = self.inner.store.destroy_version(name.as_str(), version).await;
        self.inner.cache.invalidate(name.as_str());
        match outcome? {
            Some(destroyed_now) => {
                if destroyed_now {
                    self.publish_change(name.as_str(), ChangeKind::DestroyVersion, version, now_micros());
                }
                Ok(())
            }
            None => Err(VaultError::NotFound(format!("credential {:?} has no version {version}", name.as_str()))),
        }
    }

    /// Makes a soft-deleted credential readable again, at the version it had.
    pub async fn undelete(&self, name: &str) -> Result<CredentialDetails, VaultError> {
        let name = self.name(name)?;
        let now = now_micros();
        let done = self.inner.store.undelete_credential(name.as_str(), now).await;
        self.inner.cache.invalidate(name.as_str());
        if !done? {
            let head = self.inner.store.get_credential(name.as_str()).await?;
            return Err(match head {
                None => not_found(&name),
                Some(_) => VaultError::FailedPrecondition(format!("credential {:?} is not deleted", name.as_str())),
            });
        }
        let details = self.metadata(name.as_str()).await?;
        self.publish_change(name.as_str(), ChangeKind::Undelete, details.head.current_version, now);
        Ok(details)
    }

    /// Checks a listing or watch prefix.
    pub fn check_prefix(&self, prefix: &str) -> Result<(), VaultError> {
        check_prefix(prefix, self.inner.limits.max_name_bytes).map_err(|e| VaultError::InvalidArgument(e.0))
    }

    pub async fn status(&self) -> VaultStatus {
        let store = &self.inner.store;
        let count = store.count_credentials().await;
        VaultStatus {
            backend: store.backend(),
            storage_healthy: count.is_ok(),
            active_kek_id: self.with_keys(|r| r.active_id()),
            credentials: count.unwrap_or_default(),
        }
    }
}

/// A duration as microseconds, saturating.
fn micros(d: std::time::Duration) -> Micros {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

fn deleted(name: &CredentialName) -> VaultError {
    VaultError::NotFound(format!("credential {:?} is deleted", name.as_str()))
}

/// The sealed bytes of a version, if its state allows reading it.
fn readable<'a>(name: &CredentialName, row: &'a VersionRow) -> Result<&'a Sealed, VaultError> {
    check_state(name, &row.info)?;
    row.sealed.as_ref().ok_or_else(|| unreadable(name, &row.info))
}

/// A version can be read while it is current or within its grace period (and while its
/// bytes exist, which the callers check).
fn check_state(name: &CredentialName, info: &VersionInfo) -> Result<(), VaultError> {
    let ok = match info.state {
        VersionState::Current => true,
        VersionState::Previous => info.expires_at.is_none_or(|t| t > now_micros()),
        VersionState::Deprecated | VersionState::Destroyed => false,
    };
    if ok {
        Ok(())
    } else {
        Err(unreadable(name, info))
    }
}

fn unreadable(name: &CredentialName, info: &VersionInfo) -> VaultError {
    VaultError::FailedPrecondition(format!(
        "version {} of {:?} is {} and cannot be read",
        info.version,
        name.as_str(),
        if info.state == VersionState::Previous { "past its grace period" } else { info.state.as_str() }
    ))
}

fn credential_value(name: &CredentialName, info: &VersionInfo, value: Zeroizing<Vec<u8>>) -> CredentialValue {
    CredentialValue {
        name: name.as_str().to_owned(),
        version: info.version,
        state: info.state,
        created_at: info.created_at,
        expires_at: info.expires_at,
        value,
        stale: None,
    }
}

fn not_found(name: &CredentialName) -> VaultError {
    VaultError::NotFound(format!("credential {:?} not found", name.as_str()))
}

fn head_base(head: Option<&CredentialRow>) -> WriteBase {
    match head {
        None => WriteBase::Create,
        Some(h) if h.deleted_at.is_some() => WriteBase::Revive(h.current_version),
        Some(h) => WriteBase::Update(h.current_version),
    }
}
