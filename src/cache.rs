//! The read cache: sharded TTL LRU of *sealed* credential versions, with lazy
//! decryption and coalesced misses.
//!
//! - **Sharded:** `N` independent `Mutex<LruCache>`s chosen by a hash of the name, so
//!   readers on different cores rarely meet on one lock. Locks are `std` mutexes held
//!   for a lookup or an insert, never across an `.await`.
//! - **Lazy:** an entry holds the wrapped DEK and ciphertext. Plaintext is made only when
//!   a caller asks for the value; with [`PlaintextPolicy::Memoize`] the first read
//!   replaces the entry by one holding the plaintext alone (in a `Zeroizing` buffer, wiped
//!   when the last reference to the entry drops: after eviction, invalidation, expiry or
//!   shutdown), with `PerRead` it never is.
//! - **Fill guard:** each shard has an epoch, bumped by every write, invalidation and
//!   clear. A store read takes a [`FillTicket`] before it starts; its result is cached only
//!   if the epoch has not moved, so a slow read can never put back something a
//!   concurrent write replaced. Writes install their own version, and an entry's version
//!   only ever increases.
//!
//! **Invariant:** a hit touches no store and no await point: one hash, one short lock.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio::time::{Duration, Instant};
use zeroize::Zeroizing;

use crate::crypto::Sealed;
use crate::metrics::names;
use crate::store::{VersionInfo, VersionRow};

/// What happens to plaintext after a cached value is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PlaintextPolicy {
    /// Keep the decrypted value in the entry: a hit is a copy (fastest).
    #[default]
    Memoize,
    /// Decrypt on every read: plaintext lives only for the request (least in memory).
    PerRead,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    pub enabled: bool,
    /// Number of shards, a power of two; 0 picks the next power of two >= 4 x cores.
    pub shards: usize,
    pub max_entries: usize,
    /// Estimated bytes of all entries (names, sealed bytes, metadata, memoized values).
    pub max_bytes: usize,
    /// How long a found credential stays cached (writes invalidate it sooner).
    pub ttl_ms: u64,
    /// How long a not-found answer stays cached.
    pub negative_ttl_ms: u64,
    pub plaintext: PlaintextPolicy,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            enabled: true,
            shards: 0,
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            ttl_ms: 5 * 60 * 1000,
            negative_ttl_ms: 5 * 1000,
            plaintext: PlaintextPolicy::Memoize,
        }
    }
}

impl CacheSettings {
    pub fn shard_count(&self) -> usize {
        let n = if self.shards == 0 {
            4 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            self.shards
        };
        n.clamp(1, 1024).next_power_of_two()
    }
}

/// A credential's current version as cached: its version metadata and either its sealed
/// bytes or, once read under [`PlaintextPolicy::Memoize`], its plaintext alone.
///
/// Entries are immutable. Memoizing replaces the entry with a plaintext-only one
/// ([`Cache::memoize`]), so a memoized credential does not also keep its ciphertext and
/// wrapped DEK, and readers holding the sealed entry are never disturbed.
pub struct CachedVersion {
    pub info: VersionInfo,
    body: Body,
}

enum Body {
    /// The sealed value (`None` if this version was destroyed).
    Sealed(Option<Sealed>),
    /// The decrypted value, wiped when the entry drops.
    Plain(Zeroizing<Box<[u8]>>),
}

impl CachedVersion {
    pub fn new(row: VersionRow) -> Self {
        CachedVersion { info: row.info, body: Body::Sealed(row.sealed) }
    }

    fn memoized(info: VersionInfo, plaintext: &[u8]) -> Self {
        // A fresh exact-size allocation: shrinking the caller's buffer in place could
        // leave a copy of the value behind in freed memory.
        CachedVersion { info, body: Body::Plain(Zeroizing::new(Box::from(plaintext))) }
    }

    pub fn version(&self) -> u64 {
        self.info.version
    }

    /// The sealed value, unless the entry holds plaintext only (or the version was
    /// destroyed).
    pub fn sealed(&self) -> Option<&Sealed> {
        match &self.body {
            Body::Sealed(s) => s.as_ref(),
            Body::Plain(_) => None,
        }
    }

    /// The memoized plaintext, if a previous read kept it.
    pub fn plaintext(&self) -> Option<&[u8]> {
        match &self.body {
            Body::Plain(p) => Some(p),
            Body::Sealed(_) => None,
        }
    }

    /// What this entry costs: the heap blocks it owns with the allocator's rounding,
    /// plus the LRU node and key that hold it.
    fn estimated_bytes(&self, name: &str) -> usize {
        let owned = match &self.body {
            Body::Sealed(Some(s)) => heap_block(s.wrapped_dek.len()) + heap_block(s.ciphertext.len()),
            Body::Sealed(None) => 0,
            Body::Plain(p) => heap_block(p.len()),
        };
        heap_block(std::mem::size_of::<CachedVersion>() + 16) + owned + entry_overhead(name)
    }
}

/// A heap block of `n` bytes as glibc's allocator lays it out (a word of header,
/// 16-byte granules, 32 bytes at least).
fn heap_block(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        (n + 8).div_ceil(16).max(2) * 16
    }
}

/// The LRU node, its key and its hash-table slot.
fn entry_overhead(name: &str) -> usize {
    heap_block(std::mem::size_of::<Box<str>>() + std::mem::size_of::<Entry>() + 16) + heap_block(name.len()) + 16
}

impl fmt::Debug for CachedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachedVersion")
            .field("version", &self.version())
            .field("state", &self.info.state)
            .field("plaintext", &self.plaintext().map(|_| "REDACTED"))
            .finish_non_exhaustive()
    }
}

/// What the cache knows about a name.
#[derive(Debug, Clone)]
pub enum Cached {
    Found(Arc<CachedVersion>),
    /// Not found (or soft-deleted), remembered for the negative TTL.
    Missing {
        deleted: bool,
    },
}

struct Entry {
    value: Cached,
    expires: Instant,
    bytes: usize,
}

struct Shard {
    lru: LruCache<Box<str>, Entry>,
    bytes: usize,
    epoch: u64,
}

/// Taken before a store read; the read's result is cached only if still valid.
#[derive(Debug, Clone, Copy)]
pub struct FillTicket {
    shard: usize,
    epoch: u64,
}

struct Counters {
    hits: metrics::Counter,
    misses: metrics::Counter,
    coalesced: metrics::Counter,
    expired: metrics::Counter,
    capacity: metrics::Counter,
    size: metrics::Counter,
    invalidated: metrics::Counter,
    entries_gauge: metrics::Gauge,
    bytes_gauge: metrics::Gauge,
}

pub struct Cache {
    settings: CacheSettings,
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    hasher: std::collections::hash_map::RandomState,
    shard_bytes: usize,
    entries: AtomicI64,
    bytes: AtomicI64,
    counters: Counters,
    inflight: Mutex<HashMap<String, Inflight>>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("shards", &self.shards.len())
            .field("entries", &self.len())
            .field("bytes", &self.bytes())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Shards hold plain data updated in single steps; a panic elsewhere cannot leave one
    // half-written, so a poisoned lock is still safe to use.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cache {
    pub fn new(settings: CacheSettings) -> Self {
        let n = settings.shard_count();
        let per_shard = NonZeroUsize::new((settings.max_entries / n).max(1)).unwrap_or(NonZeroUsize::MIN);
        let shards = (0..n).map(|_| Mutex::new(Shard { lru: LruCache::new(per_shard), bytes: 0, epoch: 0 })).collect();
        let eviction = |reason: &'static str| metrics::counter!(names::CACHE_EVICTIONS, "reason" => reason);
        Cache {
            shard_bytes: (settings.max_bytes / n).max(1),
            settings,
            shards,
            mask: n - 1,
            hasher: Default::default(),
            entries: AtomicI64::new(0),
            bytes: AtomicI64::new(0),
            counters: Counters {
                hits: metrics::counter!(names::CACHE_HITS),
                misses: metrics::counter!(names::CACHE_MISSES),
                coalesced: metrics::counter!(names::CACHE_COALESCED),
                expired: eviction("expired"),
                capacity: eviction("capacity"),
                size: eviction("size"),
                invalidated: eviction("invalidated"),
                entries_gauge: metrics::gauge!(names::CACHE_ENTRIES),
                bytes_gauge: metrics::gauge!(names::CACHE_BYTES),
            },
            inflight: Mutex::new(HashMap::new()),
        }
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.settings
    }

    pub fn len(&self) -> usize {
        usize::try_from(self.entries.load(Ordering::Relaxed)).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> usize {
        usize::try_from(self.bytes.load(Ordering::Relaxed)).unwrap_or(0)
    }

    fn shard_of(&self, name: &str) -> usize {
        (self.hasher.hash_one(name) as usize) & self.mask
    }

    fn account(&self, entries: i64, bytes: i64) {
        let e = self.entries.fetch_add(entries, Ordering::Relaxed) + entries;
        let b = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.counters.entries_gauge.set(e as f64);
        self.counters.bytes_gauge.set(b as f64);
    }

    /// A fresh entry for `name`, counting a hit or a miss. Expired entries are removed.
    pub fn get(&self, name: &str) -> Option<Cached> {
        if !self.settings.enabled {
            self.counters.misses.increment(1);
            return None;
        }
        let now = Instant::now();
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        let found = shard.lru.get(name).map(|e| (e.expires > now, e.value.clone()));
        match found {
            Some((true, value)) => {
                drop(shard);
                self.counters.hits.increment(1);
                Some(value)
            }
            Some((false, _)) => {
                let removed = shard.lru.pop(name).map(|e| e.bytes).unwrap_or(0);
                shard.bytes -= removed;
                drop(shard);
                self.account(-1, -(removed as i64));
                self.counters.expired.increment(1);
                self.counters.misses.increment(1);
                None
            }
            None => {
                drop(shard);
                self.counters.misses.increment(1);
                None
            }
        }
    }

    /// Call before reading `name` from the store; pass the ticket to [`Cache::fill`].
    pub fn ticket(&self, name: &str) -> FillTicket {
        let shard = self.shard_of(name);
        FillTicket { shard, epoch: lock(&self.shards[shard]).epoch }
    }

    /// Caches a store read, unless a write or invalidation happened in the shard since the
    /// ticket was taken, or a newer version is already cached.
    pub fn fill(&self, name: &str, ticket: FillTicket, value: Cached) {
        if !self.settings.enabled {
            return;
        }
        let mut shard = lock(&self.shards[ticket.shard]);
        if shard.epoch != ticket.epoch {
            return;
        }
        if let (Cached::Found(new), Some(Entry { value: Cached::Found(old), .. })) = (&value, shard.lru.peek(name)) {
            if old.version() >= new.version() {
                return;
            }
        }
        self.insert(&mut shard, name, value);
    }

    /// Installs the version a local write just committed (read-your-writes), unless a
    /// newer one is already there. Also voids fills in flight for the shard.
    ///
    /// `ticket` is taken before the write went to the store. If anything invalidated the
    /// shard meanwhile (a delete, another daemon's newer write), the committed version
    /// may already be stale: the name is dropped instead, and the next read goes to the
    /// store, which holds this write or a newer one.
    pub fn install(&self, name: &str, ticket: FillTicket, value: Arc<CachedVersion>) {
        if !self.settings.enabled {
            return;
        }
        let mut shard = lock(&self.shards[ticket.shard]);
        let moved = shard.epoch != ticket.epoch;
        shard.epoch += 1;
        if moved {
            if let Some(e) = shard.lru.pop(name) {
                shard.bytes -= e.bytes;
                drop(shard);
                self.account(-1, -(e.bytes as i64));
                self.counters.invalidated.increment(1);
            }
            return;
        }
        if let Some(Entry { value: Cached::Found(old), .. }) = shard.lru.peek(name) {
            if old.version() > value.version() {
                return;
            }
        }
        self.insert(&mut shard, name, Cached::Found(value));
    }

    /// Drops `name` and voids fills in flight for its shard.
    pub fn invalidate(&self, name: &str) {
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        shard.epoch += 1;
        if let Some(e) = shard.lru.pop(name) {
            shard.bytes -= e.bytes;
            drop(shard);
            self.account(-1, -(e.bytes as i64));
            self.counters.invalidated.increment(1);
        }
    }

    /// Drops everything (the change feed was lost, or the daemon is stopping).
    pub fn clear(&self) {
        for s in self.shards.iter() {
            let mut shard = lock(s);
            shard.epoch += 1;
            let n = shard.lru.len();
            let bytes = shard.bytes;
            shard.lru.clear();
            shard.bytes = 0;
            drop(shard);
            if n > 0 {
                self.account(-(n as i64), -(bytes as i64));
                self.counters.invalidated.increment(n as u64);
            }
        }
    }

    /// Replaces the cached `entry` of `name` by one holding only `plaintext`, if `entry`
    /// is still the one cached and the policy memoizes. The sealed bytes are freed once
    /// the last reader of the old entry is done.
    pub fn memoize(&self, name: &str, entry: &Arc<CachedVersion>, plaintext: &[u8]) {
        if !self.settings.enabled || self.settings.plaintext != PlaintextPolicy::Memoize {
            return;
        }
        let memo = Arc::new(CachedVersion::memoized(entry.info.clone(), plaintext));
        let bytes = memo.estimated_bytes(name);
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        let Some(e) = shard.lru.peek_mut(name) else { return };
        if !matches!(&e.value, Cached::Found(current) if Arc::ptr_eq(current, entry)) {
            return;
        }
        let old_bytes = std::mem::replace(&mut e.bytes, bytes);
        let old = std::mem::replace(&mut e.value, Cached::Found(memo));
        shard.bytes = shard.bytes - old_bytes + bytes;
        drop(shard);
        drop(old);
        self.account(0, bytes as i64 - old_bytes as i64);
    }

    fn insert(&self, shard: &mut Shard, name: &str, value: Cached) {
        let (ttl, bytes) = match &value {
            Cached::Found(v) => (self.settings.ttl_ms, v.estimated_bytes(name)),
            Cached::Missing { .. } => (self.settings.negative_ttl_ms, entry_overhead(name)),
        };
        let entry = Entry { value, expires: Instant::now() + Duration::from_millis(ttl), bytes };
        let (mut d_entries, mut d_bytes) = (1i64, bytes as i64);
        shard.bytes += bytes;
        if let Some((old_name, old)) = shard.lru.push(Box::from(name), entry) {
            shard.bytes -= old.bytes;
            d_entries -= 1;
            d_bytes -= old.bytes as i64;
            if &*old_name != name {
                self.counters.capacity.increment(1);
            }
        }
        while shard.bytes > self.shard_bytes && shard.lru.len() > 1 {
            match shard.lru.pop_lru() {
                Some((_, old)) => {
                    shard.bytes -= old.bytes;
                    d_entries -= 1;
                    d_bytes -= old.bytes as i64;
                    self.counters.size.increment(1);
                }
                None => break,
            }
        }
        self.account(d_entries, d_bytes);
    }

    /// Runs `load` for `name` once for all concurrent callers and caches its result.
    /// Callers arriving while a load is in flight wait for it instead of querying too.
    /// A failed load is not shared: the next waiter tries its own.
    pub async fn load_coalesced<F, Fut, E>(&self, name: &str, load: F) -> Result<Cached, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Cached, E>>,
    {
        let cell = {
            let mut inflight = lock(&self.inflight);
            match inflight.get_mut(name) {
                Some(entry) => {
                    self.counters.coalesced.increment(1);
                    entry.holders += 1;
                    entry.cell.clone()
                }
                None => {
                    let c = Arc::new(OnceCell::new());
                    inflight.insert(name.to_owned(), Inflight { cell: c.clone(), holders: 1 });
                    c
                }
            }
        };
        // The last caller holding the entry removes it when it is done, and also when its
        // future is dropped mid-load (a cancelled or timed-out request): no caller leaves an
        // entry behind, and a cancelled waiter does not end the load others wait for.
        let _entry = InflightEntry { cache: self, name, cell: &cell };
        cell.get_or_try_init(|| async {
            let ticket = self.ticket(name);
            let value = load().await?;
            self.fill(name, ticket, value.clone());
            Ok(value)
        })
        .await
        .cloned()
    }

    /// Loads in flight (entries of the coalescing map), for tests and diagnostics.
    pub fn inflight_len(&self) -> usize {
        lock(&self.inflight).len()
    }
}

/// One load in flight: the cell its callers share, and how many callers hold it.
#[derive(Debug)]
struct Inflight {
    cell: Arc<OnceCell<Cached>>,
    holders: usize,
}

/// A caller's hold on a coalescing-map entry, released when the caller is done or its
/// future is dropped; the last holder removes the entry (unless another load has
/// replaced it since), and so does the caller whose load filled it.
struct InflightEntry<'a> {
    cache: &'a Cache,
    name: &'a str,
    cell: &'a Arc<OnceCell<Cached>>,
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.cache.inflight);
        if let Some(entry) = inflight.get_mut(self.name) {
            if Arc::ptr_eq(&entry.cell, self.cell) {
                entry.holders = entry.holders.saturating_sub(1);
                // A loaded entry goes at once, as it did before holders were counted: a
                // caller arriving later must not take a value an invalidation may have
                // overtaken since.
                if entry.holders == 0 || entry.cell.initialized() {
                    inflight.remove(self.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::VersionState;

    fn version(v: u64, value_len: usize) -> Arc<CachedVersion> {
        let row = VersionRow {
            info: VersionInfo { version: v, state: VersionState::Current, kek_id: 1, created_at: 0, expires_at: None },
            sealed: Some(Sealed { kek_id: 1, wrapped_dek: vec![0; 61], ciphertext: vec![0; value_len] }),
        };
        Arc::new(CachedVersion::new(row))
    }

    fn cache(f: impl FnOnce(&mut CacheSettings)) -> Cache {
        let mut s = CacheSettings { shards: 4, ..CacheSettings::default() };
        f(&mut s);
        Cache::new(s)
    }

    fn found_version(c: Option<Cached>) -> Option<u64> {
        match c {
            Some(Cached::Found(v)) => Some(v.version()),
            _ => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_after_their_ttl() {
        let c = cache(|s| {
            s.ttl_ms = 1000;
            s.negative_ttl_ms = 100;
        });
        let t = c.ticket("a");
        c.fill("a", t, Cached::Found(version(1, 10)));
        let t = c.ticket("gone");
        c.fill("gone", t, Cached::Missing { deleted: false });
        assert_eq!(found_version(c.get("a")), Some(1));
        assert!(matches!(c.get("gone"), Some(Cached::Missing { deleted: false })));
        tokio::time::advance(Duration::from_millis(101)).await;
        assert!(c.get("gone").is_none(), "negative entries use the shorter TTL");
        assert_eq!(found_version(c.get("a")), Some(1));
        tokio::time::advance(Duration::from_millis(900)).await;
        assert!(c.get("a").is_none());
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn fills_started_before_a_write_are_dropped() {
        let c = cache(|_| {});
        let slow = c.ticket("a");
        c.install("a", c.ticket("a"), version(2, 10));
        c.fill("a", slow, Cached::Found(version(1, 10)));
        assert_eq!(found_version(c.get("a")), Some(2));
        let slow = c.ticket("a");
        c.invalidate("a");
        c.fill("a", slow, Cached::Found(version(2, 10)));
        assert!(c.get("a").is_none(), "a fill that raced an invalidation is not cached");
    }

    #[test]
    fn a_write_that_raced_an_invalidation_is_not_installed() {
        let c = cache(|_| {});
        c.install("a", c.ticket("a"), version(1, 10));
        // A write of version 2 starts; a delete (or another daemon's version 3) lands
        // before it is installed.
        let writing = c.ticket("a");
        c.invalidate("a");
        c.install("a", writing, version(2, 10));
        assert!(c.get("a").is_none(), "the possibly stale version is not served");
        assert_eq!((c.len(), c.bytes()), (0, 0));
    }

    #[test]
    fn versions_never_go_backwards() {
        let c = cache(|_| {});
        c.install("a", c.ticket("a"), version(5, 10));
        c.install("a", c.ticket("a"), version(4, 10));
        assert_eq!(found_version(c.get("a")), Some(5));
        let t = c.ticket("a");
        c.fill("a", t, Cached::Found(version(3, 10)));
        assert_eq!(found_version(c.get("a")), Some(5));
        let t = c.ticket("a");
        c.fill("a", t, Cached::Found(version(6, 10)));
        assert_eq!(found_version(c.get("a")), Some(6));
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let c = cache(|s| {
            s.shards = 1;
            s.max_entries = 3;
        });
        for i in 0..5 {
            c.install(&format!("n{i}"), c.ticket(&format!("n{i}")), version(1, 10));
        }
        assert_eq!(c.len(), 3);
        assert!(c.get("n0").is_none() && c.get("n4").is_some(), "least recently used go first");

        let c = cache(|s| {
            s.shards = 1;
            s.max_bytes = 4000;
            s.plaintext = PlaintextPolicy::PerRead;
        });
        for i in 0..10 {
            c.install(&format!("n{i}"), c.ticket(&format!("n{i}")), version(1, 1000));
        }
        assert!(c.bytes() <= 4000, "{} bytes", c.bytes());
        assert!(c.len() < 10 && c.len() >= 2, "{} entries", c.len());
    }

    #[test]
    fn clear_and_disable() {
        let c = cache(|_| {});
        for i in 0..20 {
            c.install(&format!("n{i}"), c.ticket(&format!("n{i}")), version(1, 10));
        }
        c.clear();
        assert_eq!((c.len(), c.bytes()), (0, 0));
        let off = cache(|s| s.enabled = false);
        off.install("a", off.ticket("a"), version(1, 1));
        assert!(off.get("a").is_none());
    }

    #[test]
    fn debug_hides_memoized_plaintext() {
        let v = CachedVersion::memoized(version(1, 4).info.clone(), b"hunter2");
        let text = format!("{v:?}");
        assert!(!text.contains("hunter2") && text.contains("REDACTED"), "{text}");
    }

    #[test]
    fn memoizing_replaces_the_sealed_entry_by_a_smaller_plaintext_one() {
        let c = cache(|_| {});
        let sealed = version(3, 272);
        c.install("a", c.ticket("a"), sealed.clone());
        let before = c.bytes();
        c.memoize("a", &sealed, &[7u8; 256]);
        let Some(Cached::Found(memo)) = c.get("a") else { panic!("entry gone") };
        assert_eq!((memo.version(), memo.plaintext(), memo.sealed()), (3, Some(&[7u8; 256][..]), None));
        assert!(c.bytes() < before, "{} bytes after, {before} before", c.bytes());
        assert_eq!(c.len(), 1);

        // A stale entry (already replaced, or invalidated and refilled) is left alone.
        c.memoize("a", &sealed, &[9u8; 256]);
        let Some(Cached::Found(now)) = c.get("a") else { panic!("entry gone") };
        assert!(Arc::ptr_eq(&now, &memo));
        let newer = version(4, 272);
        c.install("a", c.ticket("a"), newer.clone());
        c.memoize("a", &sealed, &[9u8; 256]);
        let Some(Cached::Found(now)) = c.get("a") else { panic!("entry gone") };
        assert!(Arc::ptr_eq(&now, &newer), "a memo of version 3 never replaces version 4");

        // Per-read decryption keeps the sealed entry.
        let per_read = cache(|s| s.plaintext = PlaintextPolicy::PerRead);
        per_read.install("a", per_read.ticket("a"), sealed.clone());
        per_read.memoize("a", &sealed, &[7u8; 256]);
        let Some(Cached::Found(kept)) = per_read.get("a") else { panic!("entry gone") };
        assert!(kept.plaintext().is_none() && kept.sealed().is_some());
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let c = Arc::new(cache(|_| {}));
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, loads, gate) = (c.clone(), loads.clone(), gate.clone());
            tasks.push(tokio::spawn(async move {
                c.load_coalesced("a", || async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok::<_, ()>(Cached::Found(version(7, 10)))
                })
                .await
            }));
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        for t in tasks {
            assert_eq!(found_version(t.await.unwrap().ok()), Some(7));
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(found_version(c.get("a")), Some(7));
    }

    /// Polls a future once and drops it: a request cancelled while its load is pending.
    fn poll_once_and_drop<F: Future>(f: F) {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(f.as_mut().poll(&mut cx).is_pending(), "the load never finishes");
    }

    #[tokio::test]
    async fn cancelled_misses_leave_no_coalescing_entry() {
        let c = cache(|_| {});
        for i in 0..10_000 {
            let name = format!("cancel/{i}");
            poll_once_and_drop(c.load_coalesced(&name, std::future::pending::<Result<Cached, ()>>));
        }
        assert_eq!(c.inflight_len(), 0, "every cancelled miss released its entry");
        assert_eq!(c.len(), 0);

        // A cancelled waiter does not end the load another caller still waits for.
        let gate = Arc::new(tokio::sync::Notify::new());
        let loads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = Arc::new(c);
        let first = {
            let (c, gate, loads) = (c.clone(), gate.clone(), loads.clone());
            tokio::spawn(async move {
                c.load_coalesced("shared", || async move {
                    loads.fetch_add(1, Ordering::SeqCst);
                    gate.notified().await;
                    Ok::<_, ()>(Cached::Found(version(2, 10)))
                })
                .await
            })
        };
        while c.inflight_len() == 0 {
            tokio::task::yield_now().await;
        }
        poll_once_and_drop(c.load_coalesced("shared", || async { Err::<Cached, ()>(()) }));
        assert_eq!(c.inflight_len(), 1, "the loader still holds the entry");
        gate.notify_one();
        assert_eq!(found_version(first.await.unwrap().ok()), Some(2));
        assert_eq!((c.inflight_len(), loads.load(Ordering::SeqCst)), (0, 1));
    }
}
