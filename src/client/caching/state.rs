//! What the caching client holds under its one lock: the entries, the streams, the loads
//! in flight and the epoch bookkeeping that keeps a slow load from storing a superseded
//! value.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use lru::LruCache;
use tokio::sync::{watch, Notify, OnceCell};

use super::Update;
use crate::client::{Credential, Error};

/// Why a stream exists: the caller asked for its prefix, or a name outside every served
/// prefix needed one on its parent (these are capped by `max_parent_streams`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StreamKind {
    Served,
    Parent,
}

/// One stream's view: `gen` changes whenever the stream is (re)established or resyncs.
pub(super) struct WatchState {
    pub(super) prefix: String,
    pub(super) kind: StreamKind,
    pub(super) gen: AtomicU64,
    pub(super) live: AtomicBool,
    pub(super) changed: Notify,
}

impl WatchState {
    pub(super) fn new(prefix: &str, kind: StreamKind) -> WatchState {
        WatchState {
            prefix: prefix.to_owned(),
            kind,
            gen: AtomicU64::new(1),
            live: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    pub(super) fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }

    pub(super) fn is_live(&self) -> bool {
        self.live.load(Ordering::Acquire)
    }
}

pub(super) struct Entry {
    pub(super) cred: Arc<Credential>,
    /// The stream that vouches for it; `None` when no stream serves the name (the parent
    /// stream cap was reached): then only `unwatched_ttl` bounds how long it is trusted.
    pub(super) watch: Option<Arc<WatchState>>,
    pub(super) gen: u64,
    /// When the value was last known to be current.
    pub(super) verified_at: Instant,
    pub(super) weight: usize,
}

impl Entry {
    pub(super) fn served_by(&self, w: &Arc<WatchState>) -> bool {
        self.watch.as_ref().is_some_and(|mine| Arc::ptr_eq(mine, w))
    }
}

pub(super) type Flight = Arc<OnceCell<Result<Arc<Credential>, Error>>>;

pub(super) struct State {
    pub(super) entries: LruCache<String, Entry>,
    pub(super) bytes: usize,
    /// Longest prefix first, so `serving` finds the most specific stream.
    pub(super) watches: Vec<Arc<WatchState>>,
    /// Loads in flight, one per name (single flight).
    pub(super) inflight: HashMap<String, Flight>,
    /// Bumped by every event and resync; a load started at an older epoch must not store
    /// a name changed since (`changed_at`) or anything after a resync (`resync_epoch`).
    pub(super) epoch: u64,
    pub(super) changed_at: HashMap<String, u64>,
    pub(super) resync_epoch: u64,
    /// Loads running; `changed_at` is only needed while there are some.
    pub(super) loads: usize,
    /// Shared so a send happens outside the state lock: a subscriber holding a `borrow()`
    /// must never stall cache hits.
    pub(super) subs: HashMap<String, Arc<watch::Sender<Update>>>,
    pub(super) last_failure: Option<Instant>,
}

/// Taken before a load: what the cache looked like when it started.
#[derive(Clone, Copy)]
pub(super) struct Ticket {
    pub(super) epoch: u64,
    pub(super) gen: u64,
}

impl State {
    pub(super) fn new() -> State {
        State {
            // Unbounded by the crate: `store` evicts by entries and bytes itself, keeping
            // the byte count exact (a capacity-bound `put` would evict without telling).
            entries: LruCache::unbounded(),
            bytes: 0,
            watches: Vec::new(),
            inflight: HashMap::new(),
            epoch: 0,
            changed_at: HashMap::new(),
            resync_epoch: 0,
            loads: 0,
            subs: HashMap::new(),
            last_failure: None,
        }
    }

    pub(super) fn serving(&self, name: &str) -> Option<Arc<WatchState>> {
        self.watches.iter().find(|w| name.starts_with(&w.prefix)).cloned()
    }

    /// The ticket for a load of `name` starting now, with the stream that serves it.
    pub(super) fn ticket(&self, name: &str) -> (Option<Arc<WatchState>>, Ticket) {
        let w = self.serving(name);
        let gen = w.as_ref().map_or(0, |w| w.gen());
        (w, Ticket { epoch: self.epoch, gen })
    }

    pub(super) fn parent_streams(&self) -> usize {
        self.watches.iter().filter(|w| w.kind == StreamKind::Parent).count()
    }

    pub(super) fn superseded(&self, name: &str, ticket: Ticket) -> bool {
        self.resync_epoch > ticket.epoch || self.changed_at.get(name).is_some_and(|&e| e > ticket.epoch)
    }

    pub(super) fn remove(&mut self, name: &str) {
        if let Some(e) = self.entries.pop(name) {
            self.bytes -= e.weight;
        }
    }

    /// Inserts `entry`, then evicts least recently used entries down to the bounds.
    pub(super) fn insert(&mut self, name: &str, entry: Entry, max_entries: usize, max_bytes: usize) {
        self.remove(name);
        self.bytes += entry.weight;
        self.entries.put(name.to_owned(), entry);
        while self.bytes > max_bytes || self.entries.len() > max_entries {
            match self.entries.pop_lru() {
                Some((_, e)) => self.bytes -= e.weight,
                None => break,
            }
        }
    }
}

/// Ends a load's claim on `changed_at`, also when the load is cancelled.
pub(super) struct LoadGuard<'a>(pub(super) &'a super::Inner);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.loads = st.loads.saturating_sub(1);
        if st.loads == 0 {
            st.changed_at.clear();
        }
    }
}
