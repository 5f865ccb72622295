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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_streams_are_capped_with_a_short_ttl_beyond() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let writer = client(&d).await;
    for dir in ["a", "b", "c", "d"] {
        writer.put(&format!("{dir}/x"), b"v1", None).await.unwrap();
    }
    let unwatched_ttl = Duration::from_secs(2);
    let cfg = CacheConfig {
        max_parent_streams: 2,
        unwatched_ttl,
        reconnect_initial: Duration::from_millis(20),
        ..CacheConfig::default()
    };
    let cache = CachingClient::new(Client::connect_lazy(&config(&d)).unwrap(), cfg);
    for dir in ["a", "b", "c", "d"] {
        assert_eq!(cache.get(&format!("{dir}/x")).await.unwrap().version, 1);
    }
    let s = cache.stats();
    assert_eq!((s.watches, s.parent_streams), (2, 2), "two parent streams, no more: {s:?}");
    // A load that overlaps a stream's first revalidation is not stored (it may be
    // superseded); once every stream is live, one more read of each is.
    assert!(cache.wait_live(Duration::from_secs(5)).await);
    for dir in ["a", "b", "c", "d"] {
        cache.get(&format!("{dir}/x")).await.unwrap();
    }
    let s = cache.stats();
    assert_eq!((s.entries, s.unwatched_entries), (4, 2), "{s:?}");
    // A prefix the caller asks for is not capped.
    cache.prefetch_prefix("e/").await.unwrap();
    assert_eq!(cache.stats().watches, 3);

    // Within its TTL an unwatched name is a hit, like a watched one.
    let hits = cache.stats().hits;
    cache.get("c/x").await.unwrap();
    assert_eq!(cache.stats().hits, hits + 1);
    let read_at = std::time::Instant::now();
    writer.put("a/x", b"v2", None).await.unwrap();
    writer.put("c/x", b"v2", None).await.unwrap();
    // The watched name follows by push...
    eventually("a pushed change", Duration::from_millis(100), async || cache.get("a/x").await.unwrap().version == 2)
        .await;
    // ... the unwatched one only once its short TTL has run out.
    let mut seen_v1 = false;
    eventually("the unwatched entry is re-read after its TTL", unwatched_ttl + Duration::from_secs(3), async || {
        let v = cache.get("c/x").await.unwrap().version;
        if v == 1 {
            seen_v1 = true;
            assert!(read_at.elapsed() < unwatched_ttl + Duration::from_millis(500), "kept past its TTL");
        }
        v == 2
    })
    .await;
    assert!(read_at.elapsed() + Duration::from_millis(200) >= unwatched_ttl || !seen_v1);

    // unwatched_ttl = 0: such names are not cached at all.
    let cfg = CacheConfig { max_parent_streams: 1, unwatched_ttl: Duration::ZERO, ..CacheConfig::default() };
    let uncached = CachingClient::new(Client::connect_lazy(&config(&d)).unwrap(), cfg);
    for dir in ["a", "b", "c"] {
        uncached.get(&format!("{dir}/x")).await.unwrap();
    }
    assert!(uncached.wait_live(Duration::from_secs(5)).await);
    for dir in ["a", "b", "c"] {
        uncached.get(&format!("{dir}/x")).await.unwrap();
    }
    let s = uncached.stats();
    assert_eq!((s.watches, s.entries, s.unwatched_entries), (1, 1, 0), "{s:?}");
    drop(uncached);
    drop(cache);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_return_domain_types() {
    use credvault::client::{Capability, JobState, PolicyKind, PolicyRule, RotationPolicy, TokenSpec};
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    c.put("adm/key", b"one", None).await.unwrap();

    let status = c.status().await.unwrap();
    assert_eq!((status.storage_backend.as_str(), status.storage_healthy, status.credentials), ("sqlite", true, 1));
    let rule =
        PolicyRule { pattern: "adm/**".into(), capabilities: vec![Capability::Read, Capability::List], deny: false };
    let spec = TokenSpec { display_name: "reader".into(), rules: vec![rule.clone()], ..TokenSpec::default() };
    let created = c.create_token(&spec).await.unwrap();
    assert!(!format!("{created:?}").contains(created.token.as_str()), "the secret is redacted in Debug");
    let id = created.info.as_ref().unwrap().id.clone();
    let listed = c.list_tokens().await.unwrap();
    let mine = listed.iter().find(|t| t.id == id).expect("the new token is listed");
    assert_eq!((mine.display_name.as_str(), &mine.rules), ("reader", &vec![rule]));
    c.revoke_token(&id).await.unwrap();
    assert!(c.list_tokens().await.unwrap().iter().any(|t| t.id == id && t.revoked_at.is_some()));
    assert!(matches!(c.revoke_token("zz").await, Err(Error::InvalidArgument(_))));
    assert!(matches!(c.revoke_token("00000000").await, Err(Error::NotFound(_))));

    let info = c.describe("adm/key").await.unwrap();
    assert_eq!((info.current_version, info.versions.len()), (1, 1));
    let mut policy = RotationPolicy::new("adm/key", PolicyKind::Manual);
    assert!(matches!(c.set_rotation_policy(&policy).await, Err(Error::InvalidArgument(_))), "no generator");
    policy.generator = Some(credvault::client::Generator::Password(credvault::client::PasswordSpec {
        length: 24,
        digits: true,
        ..Default::default()
    }));
    let stored = c.set_rotation_policy(&policy).await.unwrap();
    assert_eq!((stored.kind, stored.generator), (PolicyKind::Manual, policy.generator));
    let rotated = c.rotate("adm/key", None).await.unwrap();
    assert_eq!(rotated.version, 2);
    let v2 = c.get("adm/key").await.unwrap();
    assert!(v2.value.len() == 24 && v2.value.expose().iter().all(u8::is_ascii_digit));
    assert_eq!(c.rotation_policy("adm/key").await.unwrap().rotations, 1);
    c.delete_rotation_policy("adm/key").await.unwrap();
    assert!(matches!(c.rotation_policy("adm/key").await, Err(Error::NotFound(_))));

    let job = c.rotate_kek().await.unwrap();
    let mut stream = c.watch_rotation_job(job.job_id).await.unwrap();
    let mut last = None;
    while let Some(j) = stream.next().await {
        last = Some(j.unwrap());
    }
    let last = last.expect("at least one progress report");
    assert_eq!((last.state, last.new_kek_id, last.failed), (JobState::Completed, job.new_kek_id, 0));
    assert_eq!(c.rotation_job(0).await.unwrap().job_id, job.job_id);
    eventually("the KEK rotation is audited", Duration::from_secs(5), async || {
        c.audit_events(50).await.unwrap().iter().any(|e| e.rpc == "RotateKek" && e.code == "OK")
    })
    .await;
    d.stop().await;
}
