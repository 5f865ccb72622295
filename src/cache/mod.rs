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
//! - **Trust:** an entry is *fresh* while it is within its TTL and the cache is in sync
//!   with the store (the change feed is live and no outage happened since the last
//!   resync). Losing the feed or the store ([`Cache::suspend`]) makes every entry
//!   *unverified*: it is not served as a hit any more, but it is kept, so that while the
//!   store is down the vault can still answer from it (marked stale, within
//!   `serve_stale_seconds`). Expired entries are kept that long past their TTL for the
//!   same reason. A resync ([`Cache::begin_resync`], [`Cache::revalidate`],
//!   [`Cache::finish_resync`]) checks every unverified entry against the store and keeps
//!   it only if it is still the current version.
//!
//! **Invariant:** a hit touches no store and no await point: one hash, one short lock.
//!
//! **Invariant:** after [`Cache::finish_resync`] returns `true`, every entry was either
//! revalidated against the store after the feed was subscribed again, or filled from it
//! since: no version superseded while the daemon was deaf survives a resync.

mod coalesce;
mod entry;

use coalesce::Inflight;
use entry::entry_overhead;
pub use entry::CachedVersion;

use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use serde::Deserialize;
use tokio::time::{Duration, Instant};

use crate::store::VersionInfo;
use crate::telemetry::names;

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
    /// While the store is unreachable, cached versions (unverified or expired) are still
    /// served for up to this long after it was last reachable, marked stale. 0: fail
    /// closed (nothing unverified is ever served).
    pub serve_stale_seconds: u64,
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
            serve_stale_seconds: 300,
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
    /// The trust generation the entry was filled or revalidated in ([`UNVERIFIED`]: filled
    /// while the cache was out of sync).
    gen: u64,
    /// When the entry was filled or last revalidated.
    as_of: Instant,
}

/// The generation of entries filled while the cache is out of sync with the store.
const UNVERIFIED: u64 = u64::MAX;

/// What [`Cache::lookup`] found.
#[derive(Debug, Clone)]
pub struct Hit {
    pub value: Cached,
    /// Within its TTL and verified: serve it. Otherwise ask the store first, and serve
    /// this only if the store cannot answer.
    pub fresh: bool,
    /// For an entry that is not fresh: how long since it was last known to be current.
    pub age: Duration,
}

/// What the store says about a cached name, for [`Cache::revalidate`].
#[derive(Debug, Clone, Copy)]
pub enum Current<'a> {
    Absent,
    Deleted,
    /// The current version and whether its bytes still exist.
    Live(&'a VersionInfo, bool),
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
    resync: metrics::Counter,
    stale_serves: metrics::Counter,
    resyncs: metrics::Counter,
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
    /// In sync with the store: the change feed is live and no outage since the last resync.
    live: AtomicBool,
    /// The current trust generation; entries of another one are unverified.
    gen: AtomicU64,
    /// When the cache fell out of sync (`None` while in sync).
    lost_at: Mutex<Option<Instant>>,
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
                resync: eviction("resync"),
                stale_serves: metrics::counter!(names::CACHE_STALE_SERVES),
                resyncs: metrics::counter!(names::CACHE_RESYNCS),
                entries_gauge: metrics::gauge!(names::CACHE_ENTRIES),
                bytes_gauge: metrics::gauge!(names::CACHE_BYTES),
            },
            inflight: Mutex::new(HashMap::new()),
            live: AtomicBool::new(true),
            gen: AtomicU64::new(0),
            lost_at: Mutex::new(None),
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

    /// A fresh entry for `name`, counting a hit or a miss (see [`Cache::lookup`]).
    pub fn get(&self, name: &str) -> Option<Cached> {
        self.lookup(name).filter(|h| h.fresh).map(|h| h.value)
    }

    /// What the cache holds for `name`, fresh or not, counting a hit (fresh) or a miss.
    /// Entries past their TTL by more than `serve_stale_seconds` are removed.
    pub fn lookup(&self, name: &str) -> Option<Hit> {
        if !self.settings.enabled {
            self.counters.misses.increment(1);
            return None;
        }
        let now = Instant::now();
        // `live` before `gen`: the order `begin_resync` publishes them in reverse.
        let live = self.live.load(Ordering::SeqCst);
        let gen = self.gen.load(Ordering::SeqCst);
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        let found = shard.lru.get(name).map(|e| (e.expires, e.gen, e.as_of, e.value.clone()));
        let Some((expires, entry_gen, as_of, value)) = found else {
            drop(shard);
            self.counters.misses.increment(1);
            return None;
        };
        if expires > now && live && entry_gen == gen {
            drop(shard);
            self.counters.hits.increment(1);
            return Some(Hit { value, fresh: true, age: Duration::ZERO });
        }
        if expires <= now && expires + self.stale_window() <= now {
            let removed = shard.lru.pop(name).map(|e| e.bytes).unwrap_or(0);
            shard.bytes -= removed;
            drop(shard);
            self.account(-1, -(removed as i64));
            self.counters.expired.increment(1);
            self.counters.misses.increment(1);
            return None;
        }
        drop(shard);
        self.counters.misses.increment(1);
        // Known current until the later of its fill and the loss of sync.
        // In sync (only expired): notifications kept it current until now.
        let known = lock(&self.lost_at).map_or(now, |lost| lost.max(as_of));
        Some(Hit { value, fresh: false, age: now.saturating_duration_since(known) })
    }

    /// How long unverified or expired entries may still be served while the store is down.
    pub fn stale_window(&self) -> Duration {
        Duration::from_secs(self.settings.serve_stale_seconds)
    }

    /// Counts a read answered from an entry that was not fresh.
    pub fn count_stale_serve(&self) {
        self.counters.stale_serves.increment(1);
    }

    /// The cache falls out of sync with the store (the change feed was lost, or the
    /// store is down): every entry becomes unverified, and so is every fill until the
    /// next [`Cache::begin_resync`]. Entries are kept, to be served stale if need be.
    pub fn suspend(&self) {
        self.live.store(false, Ordering::SeqCst);
        self.gen.fetch_add(1, Ordering::SeqCst);
        lock(&self.lost_at).get_or_insert_with(Instant::now);
    }

    /// Whether the cache is in sync (no suspension since the last completed resync).
    pub fn in_sync(&self) -> bool {
        self.live.load(Ordering::SeqCst) && lock(&self.lost_at).is_none()
    }

    /// Starts a resync, once the change feed is subscribed and the store reachable:
    /// fills in flight are voided (they may predate the subscription), and fills from
    /// now on are trusted. Returns the generation to pass to [`Cache::revalidate`] and
    /// [`Cache::finish_resync`]; entries from before stay unverified until revalidated.
    pub fn begin_resync(&self) -> u64 {
        for s in self.shards.iter() {
            lock(s).epoch += 1;
        }
        let gen = self.gen.fetch_add(1, Ordering::SeqCst) + 1;
        self.live.store(true, Ordering::SeqCst);
        gen
    }

    /// Names whose entries are not of generation `gen` (those a resync must check).
    pub fn unverified_names(&self, gen: u64) -> Vec<String> {
        let mut out = Vec::new();
        for s in self.shards.iter() {
            let shard = lock(s);
            out.extend(shard.lru.iter().filter(|(_, e)| e.gen != gen).map(|(k, _)| k.to_string()));
        }
        out
    }

    /// Keeps `name`'s entry, now trusted, if it matches what the store reports as
    /// current (read after [`Cache::begin_resync`]); drops it otherwise. Entries filled
    /// or written since the resync began are left alone: they are newer than the check.
    pub fn revalidate(&self, gen: u64, name: &str, current: Current<'_>) {
        if self.gen.load(Ordering::SeqCst) != gen {
            return;
        }
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        let Some(e) = shard.lru.peek_mut(name) else { return };
        if e.gen == gen {
            return;
        }
        let same = match (&e.value, current) {
            (Cached::Missing { deleted: false }, Current::Absent) => true,
            (Cached::Missing { deleted: true }, Current::Deleted) => true,
            (Cached::Found(v), Current::Live(info, has_bytes)) => {
                // The KEK id may differ after a re-wrap; the value is the same.
                v.info.version == info.version
                    && v.info.state == info.state
                    && v.info.expires_at == info.expires_at
                    && (v.plaintext().is_some() || v.sealed().is_some()) == has_bytes
            }
            _ => false,
        };
        if same {
            e.gen = gen;
            e.as_of = Instant::now();
            return;
        }
        let removed = shard.lru.pop(name).map(|e| e.bytes).unwrap_or(0);
        shard.bytes -= removed;
        drop(shard);
        self.account(-1, -(removed as i64));
        self.counters.resync.increment(1);
    }

    /// Ends the resync of generation `gen`: drops whatever was not revalidated and puts
    /// the cache back in sync. `false` if the cache fell out of sync again meanwhile
    /// (then a later resync must run).
    pub fn finish_resync(&self, gen: u64) -> bool {
        if self.gen.load(Ordering::SeqCst) != gen {
            return false;
        }
        for s in self.shards.iter() {
            let mut shard = lock(s);
            let stale: Vec<Box<str>> = shard.lru.iter().filter(|(_, e)| e.gen != gen).map(|(k, _)| k.clone()).collect();
            let mut bytes = 0;
            for k in &stale {
                bytes += shard.lru.pop(k).map(|e| e.bytes).unwrap_or(0);
            }
            shard.bytes -= bytes;
            drop(shard);
            if !stale.is_empty() {
                self.account(-(stale.len() as i64), -(bytes as i64));
                self.counters.resync.increment(stale.len() as u64);
            }
        }
        let mut lost = lock(&self.lost_at);
        if self.gen.load(Ordering::SeqCst) != gen || !self.live.load(Ordering::SeqCst) {
            return false;
        }
        *lost = None;
        drop(lost);
        self.counters.resyncs.increment(1);
        true
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
        // An equal version replaces the entry: that renews an expired or unverified one.
        if let (Cached::Found(new), Some(Entry { value: Cached::Found(old), .. })) = (&value, shard.lru.peek(name)) {
            if old.version() > new.version() {
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
            self.drop_invalidated(shard, name);
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
        self.drop_invalidated(shard, name);
    }

    /// Another daemon wrote `version` of `name`: drops the entry unless it already holds
    /// that version or a later one (a read here that followed the write loaded it before
    /// the notification arrived, and dropping it would only cost a second miss).
    /// Fills in flight are voided either way. Sound because the feed delivers changes in
    /// commit order and versions of a name only grow: any later change to the entry
    /// comes as a later event.
    pub fn invalidate_older_than(&self, name: &str, version: u64) {
        let mut shard = lock(&self.shards[self.shard_of(name)]);
        shard.epoch += 1;
        if let Some(Entry { value: Cached::Found(held), .. }) = shard.lru.peek(name) {
            if held.version() >= version {
                return;
            }
        }
        self.drop_invalidated(shard, name);
    }

    /// Removes `name` from its locked shard, counted as invalidated; the gauges are
    /// updated after the lock is released.
    fn drop_invalidated(&self, mut shard: MutexGuard<'_, Shard>, name: &str) {
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
        let now = Instant::now();
        // `live` before `gen`, as in `lookup`.
        let gen = if self.live.load(Ordering::SeqCst) { self.gen.load(Ordering::SeqCst) } else { UNVERIFIED };
        let entry = Entry { value, expires: now + Duration::from_millis(ttl), bytes, gen, as_of: now };
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
}

#[cfg(test)]
mod tests;
