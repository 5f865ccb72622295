//! The core: credentials over a [`Store`] and a [`KeyRing`]. It validates input, seals
//! and opens values, and turns store outcomes into [`VaultError`]s. It knows nothing of
//! gRPC; `service` converts at the edge.
//!
//! **Invariant:** plaintext leaves this module only inside [`CredentialValue`], whose
//! `Debug` is redacted and whose buffer is zeroized on drop.

use std::borrow::Cow;
use std::fmt;
use std::sync::{Arc, RwLock};

use zeroize::Zeroizing;

use crate::cache::{Cache, CacheSettings, Cached, CachedVersion, Hit};
use crate::crypto::{self, CryptoError, KeyRing, Sealed};
use crate::model::{Clock, SystemClock};
use crate::names::{check_prefix, CredentialName, NameArg};
use crate::store::{
    Backend, Change, ChangeEvent, ChangeKind, CredentialHead, CredentialStore, Instrumented, Metadata, Micros,
    NewVersion, PolicyAdvance, Store, StoreError, VersionInfo, VersionRow, VersionState, WriteBase,
};
use crate::telemetry::names::DECRYPT_DURATION;

mod feed;
mod idempotency;
pub mod identity;
mod keys;
mod listing;
mod metadata_update;
mod read;
mod rollback;
mod rotation;
mod staleness;
mod tokens;
mod write;
mod write_many;
mod write_queue;

pub use idempotency::{prune_idempotency_keys, DeleteOutcome, IdempotencyKey, Replayed, KEY_MAX_BYTES};
pub use keys::JobProgress;
pub use listing::{open_page_token, page_key, seal_page_token, PageBinding, PageTokenError, PAGE_TOKEN_TTL};
pub use metadata_update::MetadataPatch;
pub use rollback::RollbackOutcome;
pub use rotation::{schedule_jitter, NewValue, PolicySpec, RotateOutcome, RotationSettings};
pub use staleness::ListFilters;
pub use write_many::{BatchItem, BatchItemOutcome, WriteConflict};

/// Request-size limits; every one is enforced before the store is touched. (The edge's
/// own limits, concurrency and token rates, are in `config::LimitSettings`.)
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Longest a single store call may take before the request fails with UNAVAILABLE.
    pub store_timeout_ms: u64,
    /// Writes (puts and deletes) per `WriteCredentials` request at most.
    pub max_write_batch_size: usize,
    /// How long an idempotency key is remembered after its write.
    pub idempotency_window_seconds: u64,
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
            store_timeout_ms: 5000,
            max_write_batch_size: 64,
            idempotency_window_seconds: 24 * 3600,
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
    /// Some writes of an all-or-nothing batch did not match what they expected, so none
    /// was applied. Every conflicting write is listed.
    #[error("{}", write_many::describe_conflicts(.0))]
    WriteConflicts(Vec<WriteConflict>),
}

impl VaultError {
    /// A refusal by the store's open breaker: one of many while the store is down, whose
    /// cause the breaker logged once when it opened.
    pub fn is_breaker_refusal(&self) -> bool {
        matches!(self, VaultError::Unavailable(StoreError::Down))
    }
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
    pub head: CredentialHead,
    pub versions: Vec<VersionInfo>,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub credentials: Vec<CredentialHead>,
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
    /// The idempotency key stored with the write, in its transaction.
    key: Option<&'a crate::store::KeyClaim>,
    /// The current version the caller has just read (a rotation reads the head anyway):
    /// an unconditional write starts from it instead of reading the head again. If it is
    /// out of date, the compare-and-set fails and the write retries as usual.
    seen_version: Option<u64>,
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
    /// The time of day for grace periods, expiry and schedules (injectable for tests).
    clock: Arc<dyn Clock>,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault").field("backend", &self.inner.store.backend()).finish_non_exhaustive()
    }
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
        Self::with_clock(store, keys, limits, cache, rotation, Arc::new(SystemClock))
    }

    /// A vault that reads the time of day from `clock` (tests pass a
    /// [`ManualClock`](crate::model::ManualClock) and move it instead of sleeping).
    pub fn with_clock(
        store: Arc<dyn Store>,
        keys: KeyRing,
        limits: Limits,
        cache: CacheSettings,
        rotation: RotationSettings,
        clock: Arc<dyn Clock>,
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
                clock,
            }),
        }
    }

    /// The time of day, from the vault's clock.
    pub fn now(&self) -> Micros {
        self.inner.clock.now()
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
                match event.kind {
                    // A new version: an entry already holding it (or a later one) stays.
                    ChangeKind::Put | ChangeKind::Rotate => {
                        self.inner.cache.invalidate_older_than(&event.name, event.version)
                    }
                    ChangeKind::Delete | ChangeKind::Undelete | ChangeKind::DestroyVersion => {
                        self.inner.cache.invalidate(&event.name)
                    }
                }
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

    /// The store behind the vault, timed and guarded by the breaker: for the daemon's
    /// background tasks (change feed, audit writer). The gRPC edge goes through the
    /// vault's own methods.
    pub(crate) fn store(&self) -> Arc<dyn Store> {
        self.inner.store.clone()
    }

    /// The name an operation is about: text is validated here, a [`CredentialName`] the
    /// edge parsed already is borrowed as it is.
    fn name<'a, N: NameArg + ?Sized>(&self, s: &'a N) -> Result<Cow<'a, CredentialName>, VaultError> {
        s.to_name(self.inner.limits.max_name_bytes).map_err(|e| VaultError::InvalidArgument(e.0))
    }

    /// Parses a name taken out of a request, keeping its buffer: the edge does this once
    /// and hands the [`CredentialName`] to every step of the request.
    pub fn parse_name(&self, s: String) -> Result<CredentialName, VaultError> {
        CredentialName::parse_owned(s, self.inner.limits.max_name_bytes).map_err(|e| VaultError::InvalidArgument(e.0))
    }

    fn with_keys<T>(&self, f: impl FnOnce(&KeyRing) -> T) -> T {
        // A poisoned lock means a panic elsewhere mid-read; the ring itself is never left
        // half-updated (KEKs are inserted whole), so it is safe to keep using.
        let guard = self.inner.keys.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
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
fn readable<'a>(name: &CredentialName, row: &'a VersionRow, now: Micros) -> Result<&'a Sealed, VaultError> {
    check_state(name, &row.info, now)?;
    row.sealed.as_ref().ok_or_else(|| unreadable(name, &row.info))
}

/// A version can be read while it is current or within its grace period (and while its
/// bytes exist, which the callers check).
fn check_state(name: &CredentialName, info: &VersionInfo, now: Micros) -> Result<(), VaultError> {
    let ok = match info.state {
        VersionState::Current => true,
        VersionState::Previous => info.expires_at.is_none_or(|t| t > now),
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

fn credential_value(info: &VersionInfo, value: Zeroizing<Vec<u8>>) -> CredentialValue {
    CredentialValue {
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

fn head_base(head: Option<&CredentialHead>) -> WriteBase {
    match head {
        None => WriteBase::Create,
        Some(h) if h.deleted_at.is_some() => WriteBase::Revive(h.current_version),
        Some(h) => WriteBase::Update(h.current_version),
    }
}
