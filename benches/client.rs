//! The caching client: a hit in the caller's process, and push staleness (a put
//! acknowledged to another client until the new version is in this client's cache) against
//! a daemon on loopback (SQLite). Criterion reports the mean hit; a second pass records
//! every hit in an HDR histogram for p50/p99/p99.9, and the staleness pass prints its own.
//!
//! Run: `cargo bench --bench client`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use hdrhistogram::Histogram;
use secrecy::ExposeSecret as _;
use tokio::runtime::Runtime;

use credvault::client::{CacheConfig, CachingClient, Client, ClientConfig, TokenSource};
use credvault::config::{DatabaseUrl, Settings};
use credvault::server::Daemon;

struct Fixture {
    cache: CachingClient,
    names: Vec<String>,
    writer: Client,
    _stop: tokio::sync::oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

fn fixture(rt: &Runtime) -> Fixture {
    rt.block_on(async {
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
        let config = ClientConfig::new(format!("http://{addr}"), TokenSource::value(token));
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
}

criterion_group!(benches, hits);
criterion_main!(benches);
