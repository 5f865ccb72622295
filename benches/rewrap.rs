//! KEK re-wrap throughput: seeds N credentials, rotates the KEK, and times the
//! background job until every data key is re-wrapped, on SQLite and on PostgreSQL.
//!
//! ```text
//! cargo bench --bench rewrap                 # 20,000 credentials on each backend
//! REWRAP_N=50000 cargo bench --bench rewrap
//! REWRAP_BACKENDS=postgres cargo bench --bench rewrap   # one backend only
//! ```
//! PostgreSQL comes from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! the bench creates and drops its own database. A backend that cannot be reached is
//! reported and skipped (this is a measurement, not a test).

use std::sync::Arc;
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;

use credvault::cache::CacheSettings;
use credvault::crypto::{Kek, KeyRing, MasterKey};
use credvault::store::{now_micros, KekRow, KekState, KeyringRow, MasterKeySource, PgStore, SqliteStore, Store};
use credvault::vault::{Limits, RotationSettings, Vault};

async fn vault_over(store: Arc<dyn Store>) -> Vault {
    let master = MasterKey::from_bytes(&[0x42; 32]).expect("32 bytes");
    let (kek, wrapped) = Kek::generate(1, &master).expect("KEK");
    let keyring = KeyringRow {
        source: MasterKeySource::KeyFile,
        kdf: None,
        verifier: master.make_verifier().expect("verifier"),
        created_at: now_micros(),
    };
    let row = KekRow { id: 1, wrapped_key: wrapped, state: KekState::Active, created_at: now_micros() };
    store.init_keyring(&keyring, &row).await.expect("keyring");
    let ring = KeyRing::new(master, vec![kek], 1).expect("ring");
    let cache = CacheSettings { enabled: false, ..CacheSettings::default() };
    // Batches as configured by default; no pause between them.
    let rotation = RotationSettings { scheduler_interval_ms: 20, ..RotationSettings::default() };
    Vault::with_rotation(store, ring, Limits::default(), cache, rotation)
}

async fn seed(vault: &Vault, n: usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..32 {
        let vault = vault.clone();
        tasks.spawn(async move {
            let value = vec![b'x'; 256];
            for i in (w..n).step_by(32) {
                vault.put(&format!("bench/rewrap/{i:07}"), &value, Some(0), None).await.expect("seed put");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("seed task");
    }
}

async fn measure(label: &str, store: Arc<dyn Store>, n: usize) {
    let vault = vault_over(store).await;
    let t = Instant::now();
    seed(&vault, n).await;
    println!("{label}: seeded {n} credentials in {:.1} s", t.elapsed().as_secs_f64());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(vault.clone().run_jobs(stop_rx));
    let started = Instant::now();
    let job = vault.rotate_kek().await.expect("rotate KEK");
    loop {
        let p = vault.rotation_job(Some(job.job.id)).await.expect("job");
        if p.job.state != credvault::store::JobState::Running {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "{label}: re-wrapped {} DEKs ({} failed) in {secs:.2} s = {:.0} DEKs/s (job's own rate {:.0}/s)",
                p.job.done,
                p.job.failed,
                p.job.done as f64 / secs,
                p.rate_per_second
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = stop_tx.send(true);
    let _ = worker.await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let n: usize = std::env::var("REWRAP_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);

    let backends = std::env::var("REWRAP_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let dir = tempfile::tempdir().expect("temp dir");
    if !backends.contains("sqlite") {
        println!("sqlite: skipped (REWRAP_BACKENDS)");
    } else {
        match SqliteStore::open(&dir.path().join("rewrap.db"), 8).await {
            Ok(s) => measure("sqlite", Arc::new(s), n).await,
            Err(e) => println!("sqlite: skipped ({e})"),
        }
    }
    if !backends.contains("postgres") {
        println!("postgres: skipped (REWRAP_BACKENDS)");
        return;
    }

    let Some(db) = support::db::scratch("cv_bench_rewrap").await else { return };
    match PgStore::connect(&db.url, 16).await {
        Ok(s) => {
            measure("postgres", Arc::new(s.clone()), n).await;
            s.pool().close().await;
        }
        Err(e) => println!("postgres: skipped ({e})"),
    }
    db.drop_now().await;
}
