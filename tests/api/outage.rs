//! Serving through a PostgreSQL outage: the daemon reaches PostgreSQL through a TCP proxy
//! that the test cuts (connections closed, new ones refused) and restores.

use std::time::{Duration, Instant};

use tokio_stream::StreamExt as _;
use tonic::Code;

use credvault::config::{DatabaseUrl, Settings};
use credvault::proto::{self, GetCredentialRequest};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{assert_status, eventually, get, put, scrape, Backend, Client, TestDaemon, TestEnv};
use crate::proxy::PgProxy;

/// Settings for a daemon whose database connections all go through `proxy`.
fn behind(env: &TestEnv, proxy: &PgProxy, serve_stale_seconds: u64) -> Settings {
    let mut s = env.settings();
    s.database_url = Some(DatabaseUrl::new(proxy.url(&env.database_url())));
    s.cache.serve_stale_seconds = serve_stale_seconds;
    s
}

/// A read with its `credvault-stale` marker (whole seconds), if any.
async fn read(c: &mut Client, name: &str) -> Result<(u64, Vec<u8>, Option<u64>), tonic::Status> {
    let r = c.get_credential(GetCredentialRequest { name: name.into(), version: None }).await?;
    let stale = r.metadata().get(credvault::service::STALE_HEADER).map(|v| v.to_str().unwrap().parse().unwrap());
    let r = r.into_inner();
    Ok((r.version, r.value, stale))
}

async fn health(d: &TestDaemon, service: &str) -> ServingStatus {
    let mut h = HealthClient::new(d.channel().await);
    let r = h.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
    ServingStatus::try_from(r.status).unwrap()
}

/// Waits until the daemon knows the store is down (its breaker is open).
async fn until_store_down(d: &TestDaemon) {
    eventually("credvault.store NOT_SERVING", Duration::from_secs(15), async || {
        health(d, "credvault.store").await == ServingStatus::NotServing
    })
    .await;
}

/// Retries a put of `value` until it succeeds; until then every refusal must be
/// UNAVAILABLE.
async fn until_writes_work(c: &mut Client, name: &str, value: &[u8], deadline: Duration) {
    eventually("writes work again", deadline, async || match put(c, name, value, None).await {
        Ok(_) => true,
        Err(s) => {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            false
        }
    })
    .await;
}

/// The longest of `n` calls of `f`, each of which must fail with UNAVAILABLE.
async fn slowest_unavailable<T: std::fmt::Debug>(
    n: usize,
    mut f: impl AsyncFnMut(usize) -> Result<T, tonic::Status>,
) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..n {
        let start = Instant::now();
        let r = f(i).await;
        worst = worst.max(start.elapsed());
        assert_status(r, Code::Unavailable, "storage is unavailable");
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_served_through_a_ten_second_outage() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let d = TestDaemon::start(behind(&env, &proxy, 60), None).await;
    let mut c = d.client().await;
    let names: Vec<String> = (0..20).map(|i| format!("outage/{i}")).collect();
    for n in &names {
        put(&mut c, n, n.as_bytes(), None).await.unwrap();
        assert_eq!(read(&mut c, n).await.unwrap(), (1, n.clone().into_bytes(), None));
    }

    proxy.cut().await;
    let cut = Instant::now();
    let mut reads = 0;
    let mut marked = 0;
    while cut.elapsed() < Duration::from_secs(10) {
        for n in &names {
            let (version, value, stale) = read(&mut c, n).await.unwrap_or_else(|s| {
                panic!("{n} not served {:?} into the outage: {s:?}", cut.elapsed());
            });
            assert_eq!((version, value), (1, n.clone().into_bytes()));
            reads += 1;
            if let Some(age) = stale {
                assert!(age <= cut.elapsed().as_secs() + 1, "stale for {age} s, {:?} into the outage", cut.elapsed());
                marked += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(marked > 0, "no read was marked stale although the change feed was lost");
    // Well into the outage the store is known down: misses and writes fail at once.
    until_store_down(&d).await;
    assert_eq!(health(&d, "").await, ServingStatus::Serving, "hits are served: the daemon stays SERVING");
    let miss = slowest_unavailable(10, async |i| get(&mut c, &format!("outage/absent-{i}"), None).await).await;
    let write = slowest_unavailable(10, async |i| put(&mut c, &names[i], b"v2", None).await).await;
    println!("outage: {reads} reads served ({marked} marked stale); slowest miss {miss:?}, slowest write {write:?}");
    assert!(miss < Duration::from_secs(1) && write < Duration::from_secs(1), "miss {miss:?}, write {write:?}");

    // A batch answers the cached names (marked stale) and fails the uncached one alone.
    let mut wanted = names[..3].to_vec();
    wanted.push("outage/never-cached".into());
    let batch = c.batch_get_credentials(proto::BatchGetCredentialsRequest { names: wanted }).await.unwrap();
    assert!(batch.metadata().get(credvault::service::STALE_HEADER).is_some(), "batch not marked stale");
    let results = batch.into_inner().results;
    for (r, n) in results.iter().zip(&names[..3]) {
        match &r.result {
            Some(proto::batch_get_result::Result::Credential(v)) => assert_eq!(v.value, n.as_bytes()),
            other => panic!("{n}: {other:?}"),
        }
    }
    match &results[3].result {
        Some(proto::batch_get_result::Result::Error(e)) => assert_eq!(e.code, Code::Unavailable as i32, "{e:?}"),
        other => panic!("uncached name: {other:?}"),
    }

    let body = scrape(&d).await;
    for series in ["credvault_store_reachable ", "credvault_store_breaker_open ", "credvault_cache_stale_serves_total "]
    {
        assert!(body.contains(series), "missing {series}");
    }

    proxy.restore().await;
    let restored = Instant::now();
    eventually("writes succeed again without a restart", Duration::from_secs(10), async || {
        put(&mut c, &names[0], b"after", None).await.is_ok()
    })
    .await;
    println!("outage: first write accepted {:?} after the store was restored", restored.elapsed());
    eventually("the cache is trusted again", Duration::from_secs(10), async || d.vault.cache_in_sync()).await;
    assert_eq!(health(&d, "credvault.store").await, ServingStatus::Serving);
    let before = d.vault.store_queries();
    for n in &names[1..] {
        assert_eq!(read(&mut c, n).await.unwrap(), (1, n.clone().into_bytes(), None), "unmarked after the resync");
    }
    assert_eq!(read(&mut c, &names[0]).await.unwrap(), (2, b"after".to_vec(), None));
    assert_eq!(d.vault.store_queries(), before, "revalidated entries are hits again");
    d.stop().await;
}

/// The change feed's connection closing is the first sign of an outage when no request
/// is using the database: the daemon probes at once and opens the breaker within a
/// probe's timeout (1 s), not after the pool has tried to reconnect for its whole
/// connect timeout (5 s), which is how long a lost feed went unnoticed while the driver
/// reconnected it eagerly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_change_feed_opens_the_breaker_within_a_probe_timeout() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let d = TestDaemon::start(behind(&env, &proxy, 60), None).await;
    let mut c = d.client().await;
    put(&mut c, "feed/x", b"x1", None).await.unwrap();
    assert_eq!(read(&mut c, "feed/x").await.unwrap(), (1, b"x1".to_vec(), None));
    // The audit batch of those calls reaches the store first: nothing in flight at the cut.
    let store = env.store().await;
    eventually("the calls' audit events are written", Duration::from_secs(10), async || {
        let rows = store.recent_audit(10).await.unwrap();
        rows.iter().any(|r| r.rpc == "GetCredential" && r.credential.as_deref() == Some("feed/x"))
    })
    .await;

    proxy.cut().await;
    let cut = Instant::now();
    until_store_down(&d).await;
    let known = cut.elapsed();
    println!("outage: breaker open {known:?} after the cut");
    assert!(known < Duration::from_secs(3), "the lost feed was noticed only {known:?} after the cut");
    let (version, value, stale) = read(&mut c, "feed/x").await.unwrap();
    assert_eq!((version, value.as_slice()), (1, b"x1".as_slice()));
    assert!(stale.is_some(), "a hit while the store is down is marked stale");

    proxy.restore().await;
    eventually("the cache is trusted again", Duration::from_secs(10), async || d.vault.cache_in_sync()).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_closed_answers_unavailable_fast_and_recovers_without_restart() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let d = TestDaemon::start(behind(&env, &proxy, 0), None).await;
    let mut c = d.client().await;
    put(&mut c, "closed/x", b"v1", None).await.unwrap();
    assert_eq!(read(&mut c, "closed/x").await.unwrap().1, b"v1");

    proxy.cut().await;
    until_store_down(&d).await;
    // With serve_stale_seconds = 0 nothing unverified is served, hits included.
    let hit = slowest_unavailable(5, async |_| read(&mut c, "closed/x").await).await;
    let miss = slowest_unavailable(10, async |i| get(&mut c, &format!("closed/absent-{i}"), None).await).await;
    let write = slowest_unavailable(10, async |_| put(&mut c, "closed/x", b"v2", None).await).await;
    println!("fail closed: slowest hit {hit:?}, miss {miss:?}, write {write:?} (store timeout 5 s)");
    assert!(miss.max(write).max(hit) < Duration::from_secs(1), "not failing fast: {hit:?} {miss:?} {write:?}");
    let batch = c.batch_get_credentials(proto::BatchGetCredentialsRequest { names: vec!["closed/x".into()] }).await;
    assert_status(batch, Code::Unavailable, "storage is unavailable");

    proxy.restore().await;
    eventually("reads succeed again", Duration::from_secs(10), async || {
        read(&mut c, "closed/x").await.is_ok_and(|r| r.1 == b"v1" && r.2.is_none())
    })
    .await;
    put(&mut c, "closed/x", b"v2", Some(1)).await.unwrap();
    assert_eq!(read(&mut c, "closed/x").await.unwrap(), (2, b"v2".to_vec(), None));
    eventually("credvault.store SERVING", Duration::from_secs(5), async || {
        health(&d, "credvault.store").await == ServingStatus::Serving
    })
    .await;
    d.stop().await;
}

/// The calls already on their way when the database vanishes do not wait out the pool's
/// 5 s acquire timeout: the probe (its own connection, refused at once) opens the
/// breaker, and every waiting call ends with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_in_flight_when_the_store_vanishes_fail_fast() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let d = TestDaemon::start(behind(&env, &proxy, 300), None).await;
    let mut c = d.client().await;
    put(&mut c, "gone/x", b"v1", None).await.unwrap();
    proxy.cut().await;
    let start = Instant::now();
    let mut calls = Vec::new();
    for i in 0..10 {
        let mut c = d.client().await;
        calls.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = if i % 2 == 0 {
                get(&mut c, &format!("gone/absent-{i}"), None).await.map(|_| ())
            } else {
                put(&mut c, "gone/x", b"v2", None).await.map(|_| ())
            };
            (t.elapsed(), r)
        }));
    }
    let mut slowest = Duration::ZERO;
    for call in calls {
        let (took, r) = call.await.unwrap();
        slowest = slowest.max(took);
        assert_status(r, Code::Unavailable, "storage is unavailable");
    }
    println!("first calls after the cut: slowest {slowest:?}, all within {:?}", start.elapsed());
    // Five seconds is what they waited before; allow a noisy machine most of the rest.
    assert!(slowest < Duration::from_secs(3), "waited {slowest:?}");
    proxy.restore().await;
    eventually("writes work again", Duration::from_secs(10), async || put(&mut c, "gone/x", b"v3", None).await.is_ok())
        .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_superseded_version_is_served_after_the_resync() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(behind(&env, &proxy, 60), Some(&a.token)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    put(&mut ca, "gap/x", b"x1", None).await.unwrap();
    put(&mut ca, "gap/y", b"y1", None).await.unwrap();
    // A's notifications of those puts may reach B after its first reads (they leave the
    // versions B loaded in place, and a fill in flight is voided): wait until B serves
    // all three from memory.
    eventually("B caches x, y and z", Duration::from_secs(2), async || {
        let before = b.vault.store_queries();
        let x = read(&mut cb, "gap/x").await.unwrap();
        let y = read(&mut cb, "gap/y").await.unwrap();
        let z = get(&mut cb, "gap/z", None).await;
        assert_eq!((x.1.as_slice(), y.1.as_slice()), (b"x1".as_slice(), b"y1".as_slice()));
        assert_eq!(z.unwrap_err().code(), Code::NotFound);
        b.vault.store_queries() == before
    })
    .await;
    let mut watch =
        cb.watch_credentials(proto::WatchCredentialsRequest { prefix: "gap/".into() }).await.unwrap().into_inner();

    // B's change feed (and the rest of its store) is cut; A writes meanwhile.
    proxy.cut().await;
    put(&mut ca, "gap/x", b"x2", None).await.unwrap();
    ca.delete_credential(proto::DeleteCredentialRequest { name: "gap/y".into(), expected_version: None })
        .await
        .unwrap();
    put(&mut ca, "gap/z", b"z1", None).await.unwrap();
    // Each new kind of answer is printed, so a failure shows what B said instead.
    let mut seen = Vec::new();
    eventually("B serves what it has, marked stale", Duration::from_secs(15), async || {
        let r = read(&mut cb, "gap/x").await;
        let answer = match &r {
            Ok((v, value, stale)) => format!("version {v} {:?} stale {stale:?}", String::from_utf8_lossy(value)),
            Err(s) => format!("{:?} {}", s.code(), s.message()),
        };
        if !seen.contains(&answer) {
            println!("B answers gap/x: {answer}");
            seen.push(answer);
        }
        r.is_ok_and(|r| r.1 == b"x1" && r.2.is_some())
    })
    .await;

    proxy.restore().await;
    let resync = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(e) = watch.next().await {
            if e.unwrap().kind == proto::EventKind::Resync as i32 {
                return;
            }
        }
        panic!("watch ended before a RESYNC");
    });
    resync.await.expect("B's watchers get RESYNC once it is back");
    // An open stream would hold up B's shutdown.
    drop(watch);
    assert!(b.vault.cache_in_sync());
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let x = read(&mut cb, "gap/x").await.unwrap();
        assert_eq!((x.0, x.1.as_slice(), x.2), (2, b"x2".as_slice(), None), "superseded x1 served after the resync");
        assert_status(get(&mut cb, "gap/y", None).await, Code::NotFound, "deleted");
        assert_eq!(read(&mut cb, "gap/z").await.unwrap().1, b"z1");
    }
    // And the feed works again: a later write on A reaches B's cache.
    put(&mut ca, "gap/x", b"x3", None).await.unwrap();
    eventually("B hears A again", Duration::from_secs(2), async || {
        read(&mut cb, "gap/x").await.is_ok_and(|r| r.1 == b"x3")
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_backend_is_unavailable_not_internal() {
    let env = TestEnv::new(Backend::Postgres).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "kill/x", b"v1", None).await.unwrap();
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    // Hold the row, so the daemon's write waits on its lock inside PostgreSQL.
    let mut tx = raw.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM credentials WHERE name = 'kill/x' FOR UPDATE").execute(&mut *tx).await.unwrap();
    let writer = {
        let mut c = d.client().await;
        tokio::spawn(async move { put(&mut c, "kill/x", b"v2", None).await })
    };
    let mut killed = 0;
    eventually("the daemon's write waits on the row lock", Duration::from_secs(5), async || {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'credvault' AND wait_event_type = 'Lock'",
        )
        .fetch_all(&raw)
        .await
        .unwrap();
        for pid in &pids {
            sqlx::query("SELECT pg_terminate_backend($1)").bind(pid).execute(&raw).await.unwrap();
        }
        killed += pids.len();
        !pids.is_empty()
    })
    .await;
    assert_eq!(killed, 1);
    // SQLSTATE 57P01 (admin shutdown) is the database going away, not a daemon fault.
    assert_status(writer.await.unwrap(), Code::Unavailable, "storage is unavailable");
    tx.rollback().await.unwrap();
    // Every connection of the daemon killed at once: the next calls reconnect.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() \
         AND application_name = 'credvault'",
    )
    .execute(&raw)
    .await
    .unwrap();
    until_writes_work(&mut c, "kill/x", b"v3", Duration::from_secs(5)).await;
    assert_eq!(read(&mut c, "kill/x").await.unwrap().1, b"v3");
    raw.close().await;
    d.stop().await;
}

/// A failover that leaves the URL on a read-only server (a demoted primary, a standby):
/// writes answer UNAVAILABLE (SQLSTATE 25006, retry later), not INTERNAL; cached reads
/// keep working; once the server takes writes again, so does the daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_read_only_server_are_unavailable_until_it_takes_writes() {
    let env = TestEnv::new(Backend::Postgres).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "ro/x", b"v1", None).await.unwrap();
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let database: String = sqlx::query_scalar("SELECT current_database()").fetch_one(&raw).await.unwrap();
    // New sessions are read-only; the daemon's current ones are ended, as a failover would.
    let read_only = async |on: bool| {
        let set = if on { "SET default_transaction_read_only = on" } else { "RESET default_transaction_read_only" };
        sqlx::query(&format!("ALTER DATABASE \"{database}\" {set}")).execute(&raw).await.unwrap();
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name = 'credvault'",
        )
        .execute(&raw)
        .await
        .unwrap();
    };
    read_only(true).await;
    // The first of these reaches the read-only server (the breaker is closed then); later
    // ones may be refused by the breaker once three failed in a row. Never INTERNAL.
    for _ in 0..5 {
        assert_status(put(&mut c, "ro/x", b"v2", None).await, Code::Unavailable, "storage is unavailable");
    }
    assert_eq!(read(&mut c, "ro/x").await.unwrap().1, b"v1", "cached reads still served");
    read_only(false).await;
    until_writes_work(&mut c, "ro/x", b"v3", Duration::from_secs(10)).await;
    assert_eq!(read(&mut c, "ro/x").await.unwrap().1, b"v3");
    let head = env.store().await.get_credential("ro/x").await.unwrap().unwrap();
    assert_eq!(head.current_version, 2, "the refused writes left nothing behind");
    raw.close().await;
    d.stop().await;
}
