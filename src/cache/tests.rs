//! Unit tests of the cache: TTL and the stale window, suspension and resync, fills racing writes, bounds, memoizing, single-flight and cancelled misses.

use std::future::Future;

use proptest::prelude::*;

use super::*;
use crate::crypto::Sealed;
use crate::model::ChangeKind;
use crate::store::{VersionRow, VersionState};

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
        s.serve_stale_seconds = 0;
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

#[tokio::test(start_paused = true)]
async fn expired_entries_are_kept_for_the_stale_window_but_not_served_as_hits() {
    let c = cache(|s| {
        s.ttl_ms = 1000;
        s.serve_stale_seconds = 10;
    });
    c.install("a", c.ticket("a"), version(1, 10));
    tokio::time::advance(Duration::from_millis(1001)).await;
    assert!(c.get("a").is_none(), "expired: not a hit");
    let hit = c.lookup("a").expect("kept for the stale window");
    assert!(!hit.fresh && matches!(hit.value, Cached::Found(ref v) if v.version() == 1));
    assert_eq!(hit.age, Duration::ZERO, "in sync: known current until now");
    // A fill of the same version renews it.
    let t = c.ticket("a");
    c.fill("a", t, Cached::Found(version(1, 10)));
    assert!(c.lookup("a").unwrap().fresh);
    tokio::time::advance(Duration::from_secs(11) + Duration::from_millis(1)).await;
    assert!(c.lookup("a").is_none(), "gone once past TTL plus the stale window");
    assert_eq!((c.len(), c.bytes()), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_suspended_cache_keeps_entries_unverified_until_a_resync_checks_them() {
    let c = cache(|s| s.negative_ttl_ms = 60_000);
    for (n, v) in [("same", 1), ("moved", 1), ("gone", 3), ("deleted", 2)] {
        c.install(n, c.ticket(n), version(v, 10));
    }
    c.fill("neg", c.ticket("neg"), Cached::Missing { deleted: false });
    assert!(c.in_sync());
    c.suspend();
    assert!(!c.in_sync());
    tokio::time::advance(Duration::from_secs(7)).await;
    let hit = c.lookup("same").unwrap();
    assert!(!hit.fresh && hit.age == Duration::from_secs(7), "{hit:?}");
    // Fills while out of sync are unverified too.
    c.install("late", c.ticket("late"), version(1, 10));
    assert!(!c.lookup("late").unwrap().fresh);

    let gen = c.begin_resync();
    // Written after the resync began: trusted, and left alone by the checks.
    c.install("new", c.ticket("new"), version(1, 10));
    assert!(c.lookup("new").unwrap().fresh);
    let mut names = c.unverified_names(gen);
    names.sort();
    assert_eq!(names, ["deleted", "gone", "late", "moved", "neg", "same"]);
    let v1 = version(1, 10).info.clone();
    let v2 = version(2, 10).info.clone();
    c.revalidate(gen, "same", Current::Live(&v1, true));
    c.revalidate(gen, "late", Current::Live(&v1, true));
    c.revalidate(gen, "moved", Current::Live(&v2, true));
    c.revalidate(gen, "gone", Current::Absent);
    c.revalidate(gen, "deleted", Current::Deleted);
    c.revalidate(gen, "neg", Current::Absent);
    assert!(c.finish_resync(gen));
    assert!(c.in_sync());
    assert_eq!(found_version(c.get("same")), Some(1));
    assert_eq!(found_version(c.get("late")), Some(1));
    assert_eq!(found_version(c.get("new")), Some(1));
    assert!(matches!(c.get("neg"), Some(Cached::Missing { deleted: false })));
    for superseded in ["moved", "gone", "deleted"] {
        assert!(c.lookup(superseded).is_none(), "{superseded} survived the resync");
    }
    assert_eq!(c.len(), 4);
}

#[test]
fn a_resync_interrupted_by_another_loss_does_not_finish() {
    let c = cache(|_| {});
    c.install("a", c.ticket("a"), version(1, 10));
    c.suspend();
    let gen = c.begin_resync();
    c.suspend();
    c.revalidate(gen, "a", Current::Live(&version(1, 10).info.clone(), true));
    assert!(!c.finish_resync(gen));
    assert!(!c.in_sync());
    assert!(!c.lookup("a").unwrap().fresh, "still unverified");
    // Not revalidated entries are dropped by the resync that does finish.
    let gen = c.begin_resync();
    assert!(c.finish_resync(gen));
    assert!(c.lookup("a").is_none());
}

#[test]
fn a_fill_in_flight_across_a_resync_is_dropped() {
    let c = cache(|_| {});
    c.suspend();
    let before = c.ticket("a");
    let gen = c.begin_resync();
    c.fill("a", before, Cached::Found(version(1, 10)));
    assert!(c.lookup("a").is_none(), "read before the feed was back: not cached");
    assert!(c.finish_resync(gen));
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
fn a_notified_version_already_held_is_kept() {
    let c = cache(|_| {});
    c.install("a", c.ticket("a"), version(3, 10));
    // A late notification of version 2 or 3: what is held is at least that new.
    c.invalidate_older_than("a", 2);
    c.invalidate_older_than("a", 3);
    assert_eq!(found_version(c.get("a")), Some(3));
    // A fill in flight across the notification is still voided.
    let slow = c.ticket("a");
    c.invalidate_older_than("a", 3);
    c.fill("a", slow, Cached::Found(version(3, 10)));
    assert_eq!(found_version(c.get("a")), Some(3));
    // Version 4 is news: the entry goes.
    c.invalidate_older_than("a", 4);
    assert!(c.get("a").is_none());
    assert_eq!((c.len(), c.bytes()), (0, 0));
    // A remembered miss is news too.
    let t = c.ticket("a");
    c.fill("a", t, Cached::Missing { deleted: true });
    c.invalidate_older_than("a", 5);
    assert!(c.get("a").is_none(), "a new version replaces a remembered miss");
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

/// One step of the model below: the store and its change feed on one side, this
/// daemon's reads on the other.
#[derive(Debug, Clone)]
enum Step {
    /// Another daemon commits a new version (its event is queued on the feed).
    Put,
    /// Another daemon deletes the credential.
    Delete,
    /// The feed delivers its oldest queued event.
    Deliver,
    /// A read takes its ticket and reads the store as it is now.
    Read,
    /// The read with this index (among those still in flight) fills the cache.
    Fill(prop::sample::Index),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => Just(Step::Put),
        1 => Just(Step::Delete),
        4 => Just(Step::Deliver),
        3 => Just(Step::Read),
        3 => any::<prop::sample::Index>().prop_map(Step::Fill),
    ]
}

/// What the store holds: the current version, and whether it is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stored {
    version: u64,
    deleted: bool,
}

fn as_cached(s: Stored) -> Cached {
    if s.deleted {
        Cached::Missing { deleted: true }
    } else {
        Cached::Found(version(s.version, 10))
    }
}

fn held(c: &Cache) -> Option<Stored> {
    match c.get("a") {
        Some(Cached::Found(v)) => Some(Stored { version: v.version(), deleted: false }),
        Some(Cached::Missing { deleted }) => Some(Stored { version: 0, deleted }),
        None => None,
    }
}

proptest! {
    /// Whatever the interleaving of other daemons' writes, feed deliveries and this
    /// daemon's reads: the cache never holds a version older than one the feed already
    /// announced, and once every event is delivered and every read has landed, it holds
    /// nothing or exactly what the store holds.
    #[test]
    fn the_cache_converges_on_the_store(steps in prop::collection::vec(step(), 0..60)) {
        let c = cache(|s| s.shards = 1);
        let mut store = Stored { version: 1, deleted: false };
        let mut feed: std::collections::VecDeque<ChangeKind> = Default::default();
        let mut feed_versions: std::collections::VecDeque<u64> = Default::default();
        let mut reads: Vec<(FillTicket, Stored)> = Vec::new();
        let mut announced = 0u64;
        let deliver = |kind: ChangeKind, v: u64, c: &Cache| match kind {
            ChangeKind::Put => c.invalidate_older_than("a", v),
            _ => c.invalidate("a"),
        };
        for s in steps {
            match s {
                Step::Put => {
                    store = Stored { version: store.version + 1, deleted: false };
                    feed.push_back(ChangeKind::Put);
                    feed_versions.push_back(store.version);
                }
                Step::Delete if !store.deleted => {
                    store.deleted = true;
                    feed.push_back(ChangeKind::Delete);
                    feed_versions.push_back(store.version);
                }
                Step::Delete => {}
                Step::Deliver => {
                    if let (Some(kind), Some(v)) = (feed.pop_front(), feed_versions.pop_front()) {
                        deliver(kind, v, &c);
                        if kind == ChangeKind::Put {
                            announced = v;
                        }
                    }
                }
                Step::Read => reads.push((c.ticket("a"), store)),
                Step::Fill(i) if !reads.is_empty() => {
                    let (ticket, seen) = reads.remove(i.index(reads.len()));
                    c.fill("a", ticket, as_cached(seen));
                }
                Step::Fill(_) => {}
            }
            if let Some(Stored { version, deleted: false }) = held(&c) {
                prop_assert!(version >= announced, "holds v{version} after v{announced} was announced");
                prop_assert!(version <= store.version);
            }
        }
        for (ticket, seen) in reads.drain(..) {
            c.fill("a", ticket, as_cached(seen));
        }
        while let (Some(kind), Some(v)) = (feed.pop_front(), feed_versions.pop_front()) {
            deliver(kind, v, &c);
        }
        match held(&c) {
            None => {}
            Some(Stored { deleted: true, .. }) => prop_assert!(store.deleted, "a remembered delete of a live credential"),
            Some(h) => prop_assert_eq!(h, store),
        }
    }
}
