//! The Rust client library and its caching client against the real daemon.

use std::sync::Arc;
use std::time::Duration;

use credvault::client::{CacheConfig, CachingClient, Client, ClientConfig, Error, RetryPolicy, TokenSource};
use credvault::proto::Capability;

use crate::helpers::{create_token, eventually, rule, Backend, TestDaemon, TestEnv};

pub fn config(d: &TestDaemon) -> ClientConfig {
    let mut c = ClientConfig::new(format!("http://{}", d.addr), TokenSource::value(d.token.clone()));
    c.timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_millis(500);
    c.retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(100),
        max_elapsed: Duration::from_secs(1),
    };
    c
}

pub async fn client(d: &TestDaemon) -> Client {
    Client::connect(&config(d)).await.expect("client connects")
}

/// A caching client for `prefixes` with a short stale bound, its streams established.
pub async fn caching(d: &TestDaemon, prefixes: &[&str], stale: Duration) -> CachingClient {
    let cfg = CacheConfig {
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        stale_if_error: stale,
        reconnect_initial: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(200),
        ..CacheConfig::default()
    };
    let c = CachingClient::new(Client::connect_lazy(&config(d)).expect("client"), cfg);
    assert!(c.wait_live(Duration::from_secs(5)).await, "watch streams established");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_errors_and_redacted_debug() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;

    assert_eq!(c.put("app/db/password", b"hunter2-secret", Some(0)).await.unwrap(), 1);
    let got = c.get("app/db/password").await.unwrap();
    assert_eq!((got.version, got.value.expose()), (1, &b"hunter2-secret"[..]));
    match c.put("app/db/password", b"x", Some(0)).await {
        Err(Error::AlreadyExists { current: Some(1), .. }) => {}
        other => panic!("expected already-exists naming version 1, got {other:?}"),
    }
    match c.put("app/db/password", b"x", Some(5)).await {
        Err(Error::Conflict { current: Some(1), .. }) => {}
        other => panic!("expected a conflict naming version 1, got {other:?}"),
    }
    assert!(matches!(c.get("app/missing").await, Err(Error::NotFound(_))));
    assert!(matches!(c.get("bad name!").await, Err(Error::InvalidArgument(_))));

    let bad =
        Client::connect(&ClientConfig { token: TokenSource::value("cv_not_a_token"), ..config(&d) }).await.unwrap();
    assert!(matches!(bad.get("app/db/password").await, Err(Error::Unauthenticated(_))));

    let (scoped, _) = create_token(&d, "other", vec![rule("other/**", &[Capability::Read], false)], 0, None).await;
    let scoped = Client::connect(&ClientConfig { token: TokenSource::value(scoped), ..config(&d) }).await.unwrap();
    assert!(matches!(scoped.get("app/db/password").await, Err(Error::PermissionDenied(_))));

    // Neither the token nor a value shows in Debug output.
    for text in [format!("{c:?}"), format!("{got:?}"), format!("{:?}", config(&d))] {
        assert!(!text.contains(&d.token), "token in {text}");
        assert!(!text.contains("hunter2"), "value in {text}");
    }
    let cache = caching(&d, &["app/"], Duration::from_secs(1)).await;
    cache.get("app/db/password").await.unwrap();
    let text = format!("{cache:?}");
    assert!(!text.contains(&d.token) && !text.contains("hunter2"), "{text}");
    drop(cache);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_from_a_file_and_unreachable_daemon() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let file = env.data_dir().join("token");
    std::fs::write(&file, format!("{}\n", d.token)).unwrap();
    let c = Client::connect(&ClientConfig { token: TokenSource::File(file.clone()), ..config(&d) }).await.unwrap();
    c.put("a/b", b"v", None).await.unwrap();
    let missing = ClientConfig { token: TokenSource::File(env.data_dir().join("nope")), ..config(&d) };
    assert!(matches!(Client::connect(&missing).await, Err(Error::Config(_))));

    let addr = d.addr;
    d.stop().await;
    let lazy = Client::connect_lazy(&ClientConfig { addr: format!("http://{addr}"), ..config_for(&file) }).unwrap();
    let started = std::time::Instant::now();
    assert!(matches!(lazy.get("a/b").await, Err(Error::Unavailable(_))));
    assert!(started.elapsed() < Duration::from_secs(3), "retries are bounded");
}

fn config_for(token_file: &std::path::Path) -> ClientConfig {
    let mut c = ClientConfig::new("http://127.0.0.1:1", TokenSource::File(token_file.to_owned()));
    c.retry = RetryPolicy { max_attempts: 3, initial_backoff: Duration::from_millis(10), ..RetryPolicy::none() };
    c.connect_timeout = Duration::from_millis(300);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_elsewhere_invalidates_within_100ms() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let writer = client(&d).await;
    writer.put("svc/key", b"v1", None).await.unwrap();
    let cache = caching(&d, &["svc/"], Duration::from_secs(5)).await;
    assert_eq!(cache.get("svc/key").await.unwrap().value.expose(), b"v1");
    let before = cache.stats();
    for _ in 0..100 {
        assert_eq!(cache.get("svc/key").await.unwrap().version, 1);
    }
    assert_eq!(cache.stats().hits - before.hits, 100, "served from memory");
    assert_eq!(cache.stats().misses, before.misses);

    for round in 2..5u64 {
        writer.put("svc/key", format!("v{round}").as_bytes(), None).await.unwrap();
        eventually("the cache sees the put", Duration::from_millis(100), async || {
            cache.get("svc/key").await.unwrap().version == round
        })
        .await;
    }
    writer.delete("svc/key", None).await.unwrap();
    eventually("the cache sees the delete", Duration::from_millis(100), async || {
        matches!(cache.get("svc/key").await, Err(Error::NotFound(_)))
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_through_another_daemon_invalidates() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let writer = client(&b).await;
    writer.put("shared/x", b"v1", None).await.unwrap();
    let cache = caching(&a, &["shared/"], Duration::from_secs(5)).await;
    assert_eq!(cache.get("shared/x").await.unwrap().version, 1);
    for round in 2..5u64 {
        writer.put("shared/x", format!("v{round}").as_bytes(), None).await.unwrap();
        eventually("a put on B reaches a cache fed by A", Duration::from_millis(100), async || {
            cache.get("shared/x").await.unwrap().version == round
        })
        .await;
    }
    drop(cache);
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_are_one_load() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    client(&d).await.put("sf/x", b"v", None).await.unwrap();
    let cache = caching(&d, &["sf/"], Duration::from_secs(5)).await;
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let c = cache.clone();
            tokio::spawn(async move { c.get("sf/x").await.map(|c| c.version) })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 1);
    }
    // Misses are counted per caller; loads per name. A load for one name is one
    // GetCredential: the daemon's audit would show it, the client's counters bound it.
    let s = cache.stats();
    assert_eq!(s.hits + s.misses, 32);
    assert_eq!(s.entries, 1);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_is_one_batch_then_hits() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    for i in 0..150 {
        c.put(&format!("pf/n{i:03}"), format!("value {i}").as_bytes(), None).await.unwrap();
    }
    let cache = caching(&d, &[], Duration::from_secs(5)).await;
    let failures = cache.prefetch_prefix("pf/").await.unwrap();
    assert!(failures.is_empty());
    assert!(cache.wait_live(Duration::from_secs(5)).await);
    // The stream came up after (or while) the prefetch ran: its revalidation may have
    // re-read entries, never dropped them.
    eventually("all entries cached", Duration::from_secs(2), async || cache.stats().entries == 150).await;
    let before = cache.stats();
    assert_eq!(cache.get("pf/n149").await.unwrap().value.expose(), b"value 149");
    assert_eq!(cache.stats().hits, before.hits + 1);
    let named = caching(&d, &[], Duration::from_secs(5)).await;
    let failures = named.prefetch(&["pf/n001".to_owned(), "pf/none".to_owned()]).await.unwrap();
    assert_eq!(failures.len(), 1);
    assert!(matches!(failures[0].1, Error::NotFound(_)));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_see_rotations_and_grace_periods() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    c.put("db/password", b"one", None).await.unwrap();
    let cache = caching(&d, &["db/"], Duration::from_secs(5)).await;
    let mut rx = cache.subscribe("db/password").await.unwrap();
    assert_eq!(rx.borrow_and_update().credential.as_ref().unwrap().version, 1);
    let rotated = c.rotate("db/password", Some(b"two")).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed()).await.expect("notified").unwrap();
    let update = rx.borrow_and_update().clone();
    let cred = update.credential.expect("current");
    assert_eq!((cred.version, cred.value.expose()), (rotated.version, &b"two"[..]));
    let previous = update.previous.expect("the replaced version");
    assert_eq!(previous.version, 1);
    assert_eq!(previous.expires_at, rotated.previous_expires_at);
    c.delete("db/password", None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), rx.changed()).await.expect("notified").unwrap();
    assert!(rx.borrow().credential.is_none());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_within_the_bound_then_unavailable_then_resync() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let token = d.token.clone();
    let addr = d.addr;
    client(&d).await.put("out/a", b"v1", None).await.unwrap();
    let stale = Duration::from_millis(800);
    let cache = caching(&d, &["out/"], stale).await;
    assert_eq!(cache.get("out/a").await.unwrap().version, 1);

    d.stop().await;
    let stopped = std::time::Instant::now();
    // Served from memory while within the bound...
    eventually("the stream is seen lost", Duration::from_secs(2), async || !cache.is_live()).await;
    assert_eq!(cache.get("out/a").await.unwrap().version, 1);
    assert!(cache.stats().stale_served >= 1);
    // ... and refused after it.
    eventually("stale values expire", stale + Duration::from_secs(3), async || match cache.get("out/a").await {
        Ok(c) => {
            assert_eq!(c.version, 1);
            false
        }
        Err(e) => {
            assert!(e.is_unavailable(), "{e:?}");
            true
        }
    })
    .await;
    assert!(stopped.elapsed() >= stale, "served stale for its bound");

    // The daemon comes back on the same address; a write lands before the cache
    // reconnects. From the first fresh answer on, never the superseded version.
    let mut settings = env.settings();
    settings.listen = addr;
    let d = start_on(settings, &token).await;
    let writer = client(&d).await;
    writer.put("out/a", b"v2", None).await.unwrap();
    let mut seen_new = false;
    eventually("resync", Duration::from_secs(5), async || {
        match cache.get("out/a").await {
            Ok(c) if c.version == 2 => seen_new = true,
            Ok(c) => assert!(!seen_new, "superseded version {} after the new one", c.version),
            Err(_) => assert!(!seen_new),
        }
        seen_new && cache.is_live()
    })
    .await;
    for _ in 0..50 {
        assert_eq!(cache.get("out/a").await.unwrap().version, 2);
    }
    d.stop().await;
}

/// Starts a daemon on an address just given up by another, once the port is free.
async fn start_on(settings: credvault::config::Settings, token: &str) -> TestDaemon {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(settings.listen).is_err() {
        assert!(std::time::Instant::now() < until, "the port was not released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    TestDaemon::start(settings, Some(token)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_by_entries_and_bytes() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    for i in 0..20 {
        c.put(&format!("b/n{i}"), &[b'x'; 1000], None).await.unwrap();
    }
    let cfg = CacheConfig { prefixes: vec!["b/".into()], max_entries: 5, ..CacheConfig::default() };
    let cache = CachingClient::new(Client::connect_lazy(&config(&d)).unwrap(), cfg);
    for i in 0..20 {
        cache.get(&format!("b/n{i}")).await.unwrap();
    }
    let s = cache.stats();
    assert_eq!(s.entries, 5);
    assert!(s.bytes >= 5 * 1000 && s.bytes <= 5 * 1300, "bytes counted for the entries held: {s:?}");
    let cfg = CacheConfig { prefixes: vec!["b/".into()], max_bytes: 3500, ..CacheConfig::default() };
    let cache = CachingClient::new(Client::connect_lazy(&config(&d)).unwrap(), cfg);
    for i in 0..20 {
        cache.get(&format!("b/n{i}")).await.unwrap();
    }
    let s = cache.stats();
    assert!(s.bytes <= 3500 && s.entries >= 2 && s.entries <= 3, "{s:?}");
    let _: Arc<_> = cache.get("b/n0").await.unwrap();
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_are_retried_after_the_daemons_hint() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    client(&d).await.put("rl/x", b"v", None).await.unwrap();
    let (token, _) = create_token(&d, "limited", vec![rule("rl/**", &[Capability::Read], false)], 2, None).await;

    // Without retries the limit shows, with the daemon's hint.
    let once = Client::connect(&ClientConfig {
        token: TokenSource::value(token.clone()),
        retry: RetryPolicy::none(),
        ..config(&d)
    })
    .await
    .unwrap();
    let mut limited = None;
    for _ in 0..20 {
        if let Err(e) = once.get("rl/x").await {
            limited = Some(e);
            break;
        }
    }
    match limited {
        Some(Error::ResourceExhausted { retry_after: Some(hint), .. }) => assert!(hint <= Duration::from_secs(1)),
        other => panic!("expected RESOURCE_EXHAUSTED with a hint, got {other:?}"),
    }

    // With retries every call succeeds, paced by the hints.
    let patient = Client::connect(&ClientConfig {
        token: TokenSource::value(token),
        retry: RetryPolicy { max_attempts: 10, max_elapsed: Duration::from_secs(5), ..RetryPolicy::default() },
        ..config(&d)
    })
    .await
    .unwrap();
    let started = std::time::Instant::now();
    for _ in 0..6 {
        assert_eq!(patient.get("rl/x").await.unwrap().version, 1);
    }
    assert!(started.elapsed() >= Duration::from_millis(500), "paced by the limit: {:?}", started.elapsed());
    d.stop().await;
}
