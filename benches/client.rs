//! The caching client: a hit in the caller's process, push staleness (a put acknowledged
//! to another client until the new version is in this client's cache) against a daemon
//! on loopback (SQLite), and memory per cached entry. Criterion reports the mean hit; a
//! second pass records every hit in an HDR histogram for p50/p99/p99.9, and the staleness
//! pass prints its own. Staleness across two daemons over PostgreSQL and the fan-out to
//! 1,000 watchers run against real daemon processes: `credvault bench --watch ...`
//! (BENCHMARKS.md, "Client").
//!
//! Memory per entry: a counting global allocator tallies the bytes live on threads that
//! opt in. The caching client runs on a current-thread runtime on the bench's own thread
//! (counted); the daemon runs on its own runtime threads (not counted). The live-byte
//! delta across loading N entries, divided by N, is what one entry costs in the
//! service's heap (value, name, bookkeeping, allocator size classes not included).
//!
//! Run: `cargo bench --bench client`

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hdrhistogram::Histogram;
use secrecy::ExposeSecret as _;
use tokio::runtime::Runtime;

use credvault::client::{CacheConfig, CachingClient, Client, ClientConfig, TokenSource};
use credvault::config::{DatabaseUrl, Settings};
use credvault::server::Daemon;

/// Live bytes allocated by threads with `COUNTED` set (frees on them subtract).
static LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    static COUNTED: Cell<bool> = const { Cell::new(false) };
}

struct Counting;

fn counted() -> bool {
    COUNTED.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: every call is forwarded to the system allocator unchanged; the counter is only
// arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counted() {
            LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `alloc` is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if counted() {
            LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counted() {
            LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract for `realloc` is passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Fixture {
    cache: CachingClient,
    names: Vec<String>,
    writer: Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

/// A daemon over SQLite in a temporary directory, running on `rt` until the sender drops.
async fn daemon() -> (String, String, tokio::sync::oneshot::Sender<()>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        database_url: Some(DatabaseUrl::new(format!("sqlite://{}", dir.path().join("bench.db").display()))),
        ..Settings::default()
    };
    let mut daemon = Daemon::build(settings).await.expect("daemon");
    let token = daemon.take_root_token().expect("root token").expose_secret().to_owned();
    let addr = daemon.local_addr();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(daemon.run_until(async {
        let _ = rx.await;
    }));
    (format!("http://{addr}"), token, tx, dir)
}

/// Bytes one cached entry (256-byte value, 12-byte name) costs the caching client.
fn memory_per_entry() {
    const N: usize = 10_000;
    let server = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (addr, token, stop, dir) = server.block_on(daemon());
    let config = ClientConfig::new(addr, TokenSource::value(token));
    server.block_on(async {
        let writer = Client::connect(&config).await.expect("connect");
        for i in 0..N {
            writer.put(&format!("mem/n{i:05}"), &[b'v'; 256], None).await.expect("put");
        }
    });
    let client = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    COUNTED.with(|c| c.set(true));
    let (per_entry, weight) = client.block_on(async {
        let cache = CachingClient::new(
            Client::connect(&config).await.expect("connect"),
            CacheConfig { prefixes: vec!["mem/".into()], max_entries: 2 * N, ..CacheConfig::default() },
        );
        assert!(cache.wait_live(Duration::from_secs(10)).await);
        // Warm the connection's buffers with one batch first, so they are not counted.
        cache.prefetch(&(0..100).map(|i| format!("mem/n{i:05}")).collect::<Vec<_>>()).await.expect("warm");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let before = LIVE.load(Ordering::Relaxed);
        let entries_before = cache.stats().entries;
        cache.prefetch_prefix("mem/").await.expect("prefetch");
        tokio::time::sleep(Duration::from_millis(200)).await;
        let after = LIVE.load(Ordering::Relaxed);
        let stats = cache.stats();
        let loaded = stats.entries - entries_before;
        assert_eq!(stats.entries, N);
        ((after - before) as f64 / loaded as f64, stats.bytes as f64 / N as f64)
    });
    COUNTED.with(|c| c.set(false));
    println!(
        "memory per cached entry (256 B value, {N} entries): {per_entry:.0} B live heap measured, \
         {weight:.0} B by the cache's own byte count"
    );
    drop(client);
    drop(stop);
    drop(server);
    drop(dir);
}

fn fixture(rt: &Runtime) -> Fixture {
    rt.block_on(async {
        let (addr, token, tx, dir) = daemon().await;
        let config = ClientConfig::new(addr, TokenSource::value(token));
        let writer = Client::connect(&config).await.expect("connect");
        let names: Vec<String> = (0..100).map(|i| format!("bench/n{i:03}")).collect();
        for n in &names {
            writer.put(n, &[b'v'; 256], None).await.expect("put");
        }
        let cache = CachingClient::new(
            Client::connect(&config).await.expect("connect"),
            CacheConfig { prefixes: vec!["bench/".into()], ..CacheConfig::default() },
        );
        assert!(cache.wait_live(Duration::from_secs(10)).await);
        cache.prefetch_prefix("bench/").await.expect("prefetch");
        Fixture { cache, names, writer, _stop: tx, _dir: dir }
    })
}

fn hits(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let f = fixture(&rt);
    c.bench_function("caching_client_hit_256B", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let name = &f.names[(i % 100) as usize];
                    black_box(f.cache.get(name).await.expect("hit"));
                }
                start.elapsed()
            })
        })
    });

    // Every hit timed on its own, for the percentiles.
    let mut h = Histogram::<u64>::new(3).expect("histogram");
    rt.block_on(async {
        for i in 0..200_000usize {
            let name = &f.names[i % 100];
            let t = Instant::now();
            black_box(f.cache.get(name).await.expect("hit"));
            h.record(t.elapsed().as_nanos() as u64).ok();
        }
    });
    println!(
        "caching client hit: p50 {} ns, p99 {} ns, p99.9 {} ns (200,000 hits)",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999)
    );

    // Staleness: put acknowledged to `writer`, then poll this cache until it has it.
    let mut s = Histogram::<u64>::new(3).expect("histogram");
    rt.block_on(async {
        for i in 0..500u32 {
            let v = f.writer.put("bench/n000", format!("value {i}").as_bytes(), None).await.expect("put");
            let t = Instant::now();
            loop {
                if f.cache.get("bench/n000").await.expect("get").version >= v {
                    break;
                }
                tokio::task::yield_now().await;
            }
            s.record(t.elapsed().as_micros() as u64).ok();
        }
    });
    println!(
        "push staleness (one daemon, SQLite, loopback): p50 {} us, p99 {} us, max {} us (500 puts)",
        s.value_at_quantile(0.5),
        s.value_at_quantile(0.99),
        s.max()
    );
    drop(f);
    memory_per_entry();
}

criterion_group!(benches, hits);
criterion_main!(benches);
