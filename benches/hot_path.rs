//! Hot-path benchmarks: in-process cache hits (memoized and per-read decryption), a
//! miss against SQLite, and the sharded cache against one `Mutex<LruCache>` under
//! contention. Criterion reports means; a second pass per case records every call in
//! an HDR histogram and prints p50/p99/p99.9, which the targets are stated in.
//!
//! Run: `cargo bench --bench hot_path`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use hdrhistogram::Histogram;
use tokio::runtime::Runtime;

use credvault::cache::{Cache, CacheSettings, Cached, CachedVersion, PlaintextPolicy};
use credvault::config::{DatabaseUrl, Settings};
use credvault::crypto::Sealed;
use credvault::server::open_store;
use credvault::store::{VersionInfo, VersionRow, VersionState};
use credvault::vault::Vault;

const VALUE_BYTES: usize = 256;
const NAMES: usize = 1000;

struct Fixture {
    vault: Vault,
    names: Vec<String>,
    _dir: tempfile::TempDir,
}

fn fixture(rt: &Runtime, cache: CacheSettings) -> Fixture {
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            data_dir: dir.path().to_owned(),
            database_url: Some(DatabaseUrl::new(format!("sqlite://{}", dir.path().join("bench.db").display()))),
            ..Settings::default()
        };
        let store = open_store(&settings).await.expect("store");
        let keys = credvault::unlock::unlock(store.as_ref(), &settings.master_key_spec()).await.expect("keys");
        let vault = Vault::new(store, keys, settings.limits.vault(), cache);
        let names: Vec<String> = (0..NAMES).map(|i| format!("bench/service-{i:04}/api-key")).collect();
        let value = vec![b'v'; VALUE_BYTES];
        for n in &names {
            vault.put(n, &value, None, None).await.expect("put");
        }
        Fixture { vault, names, _dir: dir }
    })
}

/// Per-call latency over `n` calls, in nanoseconds.
fn percentiles(label: &str, n: usize, mut call: impl FnMut(usize)) {
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    for i in 0..n / 10 {
        call(i); // warm-up
    }
    for i in 0..n {
        let t = Instant::now();
        call(i);
        let _ = h.record(t.elapsed().as_nanos() as u64);
    }
    println!(
        "{label:<40} p50 {:>7.2} us  p99 {:>7.2} us  p99.9 {:>7.2} us  max {:>8.2} us  (n={n})",
        h.value_at_quantile(0.50) as f64 / 1e3,
        h.value_at_quantile(0.99) as f64 / 1e3,
        h.value_at_quantile(0.999) as f64 / 1e3,
        h.max() as f64 / 1e3,
    );
}

fn cache_hits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("cache_hit_256B");
    for (label, policy) in [("memoized", PlaintextPolicy::Memoize), ("per_read", PlaintextPolicy::PerRead)] {
        let f = fixture(&rt, CacheSettings { plaintext: policy, ..CacheSettings::default() });
        // Warm: every name cached (and memoized, for that policy).
        rt.block_on(async {
            for n in &f.names {
                f.vault.get(n, None).await.expect("get");
            }
        });
        let before = f.vault.store_queries();
        let mut i = 0usize;
        group.bench_function(BenchmarkId::from_parameter(label), |b| {
            b.iter(|| {
                i = (i + 1) % NAMES;
                let v = rt.block_on(f.vault.get(&f.names[i], None)).expect("hit");
                black_box(v.value.len())
            })
        });
        percentiles(&format!("cache_hit_256B/{label}"), 200_000, |i| {
            let v = rt.block_on(f.vault.get(&f.names[i % NAMES], None)).expect("hit");
            black_box(v.value.len());
        });
        assert_eq!(f.vault.store_queries(), before, "hits must not query the store");
    }
    group.finish();
}

fn cache_miss_sqlite(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let f = fixture(&rt, CacheSettings { enabled: false, ..CacheSettings::default() });
    let mut i = 0usize;
    c.bench_function("cache_miss_256B/sqlite", |b| {
        b.iter(|| {
            i = (i + 1) % NAMES;
            let v = rt.block_on(f.vault.get(&f.names[i], None)).expect("miss");
            black_box(v.value.len())
        })
    });
    percentiles("cache_miss_256B/sqlite", 20_000, |i| {
        let v = rt.block_on(f.vault.get(&f.names[i % NAMES], None)).expect("miss");
        black_box(v.value.len());
    });
}

fn entry() -> Arc<CachedVersion> {
    let row = VersionRow {
        info: VersionInfo { version: 1, state: VersionState::Current, kek_id: 1, created_at: 0, expires_at: None },
        sealed: Some(Sealed { kek_id: 1, wrapped_dek: vec![0; 61], ciphertext: vec![0; VALUE_BYTES + 29] }),
    };
    Arc::new(CachedVersion::new(row))
}

/// `threads` threads each doing `per_thread` lookups; returns the wall time.
fn contend(threads: usize, per_thread: usize, lookup: Arc<dyn Fn(usize) + Send + Sync>) -> Duration {
    let barrier = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (barrier, lookup) = (barrier.clone(), lookup.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..per_thread {
                    lookup(t * 7919 + i);
                }
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    for h in handles {
        h.join().expect("thread");
    }
    start.elapsed()
}

fn sharded_vs_single_lock(c: &mut Criterion) {
    let names: Arc<Vec<String>> = Arc::new((0..NAMES).map(|i| format!("bench/service-{i:04}/api-key")).collect());
    // The same cache type both ways, so only the number of locks differs.
    let shards = CacheSettings::default().shard_count();
    let mut group = c.benchmark_group("contended_lookup_4_threads");
    for (label, n) in [(format!("sharded_{shards}"), shards), ("single_lock".to_owned(), 1)] {
        let cache = Arc::new(Cache::new(CacheSettings { shards: n, ..CacheSettings::default() }));
        for name in names.iter() {
            cache.install(name, cache.ticket(name), entry());
        }
        let names = names.clone();
        let lookup: Arc<dyn Fn(usize) + Send + Sync> = Arc::new(move |i| {
            black_box(matches!(cache.get(&names[i % NAMES]), Some(Cached::Found(_))));
        });
        group.bench_function(label.as_str(), |b| {
            b.iter_custom(|iters| contend(4, iters as usize / 4 + 1, lookup.clone()))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = cache_hits, cache_miss_sqlite, sharded_vs_single_lock
}
criterion_main!(benches);
