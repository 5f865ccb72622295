//! Graceful drain of the real binary: SIGTERM under load with open streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::Code;

use credvault::proto::{self, WatchCredentialsRequest};

use crate::helpers::spawn::Binary;
use crate::helpers::{client_over, eventually, get, put, Backend, Bearer, Raw, TestDaemon, TestEnv};

/// Eight busy callers, three credential watches and a health watch; SIGTERM. The daemon
/// ends the streams with UNAVAILABLE "shutting down", lets requests finish, exits 0 within
/// the grace period; callers saw only OK or UNAVAILABLE; every acknowledged write and the
/// audit event of each of them are in the store afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_streams_and_requests_then_exits_zero() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.shutdown_grace_seconds = 5;
    let d = TestDaemon::start(settings.clone(), None).await;
    let token = d.token.clone();
    d.stop().await;

    let mut child = Binary::serve_env(&env, &settings).start().await;
    let channel = child.channel().await;
    let client = client_over(channel.clone(), &token);

    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut c = client.clone();
        let stream =
            c.watch_credentials(WatchCredentialsRequest { prefix: "drain/".into() }).await.unwrap().into_inner();
        watches.push(stream);
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .watch(tonic_health::pb::HealthCheckRequest { service: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.message().await.unwrap().unwrap().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    // Writers record each acknowledged version; everyone records every status code.
    let acked: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let codes: Arc<Mutex<Vec<(Code, String)>>> = Arc::default();
    let mut callers = tokio::task::JoinSet::new();
    for i in 0..8 {
        let (mut c, acked, codes) = (client.clone(), acked.clone(), codes.clone());
        callers.spawn(async move {
            let name = format!("drain/w{i}");
            for n in 0u64.. {
                let r = if i % 2 == 0 || n == 0 {
                    put(&mut c, &name, format!("v{n}").as_bytes(), None).await.map(|v| {
                        acked.lock().unwrap().insert(name.clone(), v);
                    })
                } else {
                    get(&mut c, &format!("drain/w{}", i - 1), None).await.map(|_| ()).or_else(|s| {
                        if s.code() == Code::NotFound {
                            Ok(())
                        } else {
                            Err(s)
                        }
                    })
                };
                if let Err(s) = r {
                    codes.lock().unwrap().push((s.code(), s.message().to_owned()));
                    break;
                }
            }
        });
    }
    eventually("every writer to be acknowledged", Duration::from_secs(30), async || acked.lock().unwrap().len() >= 4)
        .await;

    let signalled = Instant::now();
    child.sigterm();
    for w in &mut watches {
        let end = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match w.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the watch stream ends promptly");
        let status = end.expect_err("the stream ends with a status");
        assert_eq!((status.code(), status.message()), (Code::Unavailable, "shutting down"));
    }
    let health_end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match health.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the health watch ends promptly");
    assert_eq!(health_end.expect_err("a status").code(), Code::Unavailable);

    let exit = tokio::time::timeout(Duration::from_secs(8), child.wait()).await.expect("exits");
    let took = signalled.elapsed();
    assert!(exit.success(), "exit status {exit}");
    assert!(took < Duration::from_secs(5) + Duration::from_secs(2), "drained in {took:?}, grace 5 s");
    while callers.join_next().await.is_some() {}
    let codes = codes.lock().unwrap().clone();
    assert_eq!(codes.len(), 8, "every caller stopped on an error once the daemon went away");
    for (code, message) in &codes {
        // The daemon answers only OK or UNAVAILABLE (REFUSED_STREAM after GOAWAY, then a
        // refused connection). A tonic client reports a request its own connection task
        // dropped while the connection closed as CANCELLED "operation was canceled": that
        // request never reached the daemon.
        // Likewise a request the client's connection sent as the daemon's GOAWAY crossed it
        // comes back from the client's own h2 layer as INTERNAL "h2 protocol error": the
        // daemon never saw it (about once in 370,000 requests in the soak).
        let client_side = (*code == Code::Cancelled && message == "operation was canceled")
            || (*code == Code::Internal && message.starts_with("h2 protocol error"));
        assert!(*code == Code::Unavailable || client_side, "callers see only OK or UNAVAILABLE: {code:?} {message}");
    }

    let store = env.store().await;
    let acked = acked.lock().unwrap().clone();
    let Raw::Pg(pool) = env.raw().await else { unreachable!() };
    for (name, version) in &acked {
        let head = store.get_credential(name).await.unwrap().expect("an acknowledged write is stored");
        assert!(head.current_version >= *version, "{name}: stored {} < acknowledged {version}", head.current_version);
    }
    let audited: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log WHERE rpc = 'PutCredential' AND code = 'OK'")
        .fetch_one(&pool)
        .await
        .unwrap();
    let acked_puts: u64 = acked.values().sum();
    assert!(audited as u64 >= acked_puts, "{audited} audited puts, {acked_puts} acknowledged");
    pool.close().await;
}

/// A put whose deadline passes while its table is locked: the caller is told
/// DEADLINE_EXCEEDED; the write finishes in the background, so the store, the audit trail
/// (with the write's real outcome) and this daemon's cache all end up with version 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_overtaken_by_its_deadline_is_committed_whole() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.limits.store_timeout_ms = 30_000;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "dl/x", b"old", None).await.unwrap();
    assert_eq!(get(&mut c, "dl/x", None).await.unwrap().1, b"old", "cached now");

    let Raw::Pg(raw) = env.raw().await else { unreachable!() };
    let mut lock = raw.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut req = tonic::Request::new(proto::PutCredentialRequest {
        name: "dl/x".into(),
        value: b"new".to_vec(),
        expected_version: None,
        metadata: None,
    });
    req.set_timeout(Duration::from_millis(300));
    let status = c.put_credential(req).await.expect_err("the deadline passes while the table is locked");
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    lock.rollback().await.unwrap();

    let store = env.store().await;
    eventually("the write to complete and be audited", Duration::from_secs(10), async || {
        let audited: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM audit_log WHERE rpc = 'PutCredential' AND version = 2 AND code = 'OK'",
        )
        .fetch_one(&raw)
        .await
        .unwrap();
        let head = store.get_credential("dl/x").await.unwrap().map(|h| h.current_version);
        audited == 1 && head == Some(2)
    })
    .await;
    assert_eq!(get(&mut c, "dl/x", None).await.unwrap(), (2, b"new".to_vec()), "the cache agrees with the store");
    raw.close().await;
    d.stop().await;
}

/// SQLite has no change feed, so a second daemon over the same file hears of nothing:
/// only the periodic reload makes a token revoked on A stop working on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_stops_working_on_another_daemon_through_the_backstop() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let settings = credvault::config::Settings { token_resync_seconds: 1, ..env.settings() };
    let a = TestDaemon::start(settings.clone(), None).await;
    let b = TestDaemon::start(settings, Some(&a.token)).await;
    let created = a
        .admin()
        .await
        .create_token(proto::CreateTokenRequest {
            display_name: "worker".into(),
            rules: vec![proto::PolicyRule {
                pattern: "w/*".into(),
                capabilities: vec![credvault::proto::Capability::Read as i32],
                deny: false,
            }],
            ttl: None,
            rate_limit_per_second: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let bearer = Bearer(format!("Bearer {}", created.token).parse::<tonic::metadata::MetadataValue<_>>().unwrap());
    let mut on_a = credvault::proto::credential_service_client::CredentialServiceClient::with_interceptor(
        a.channel().await,
        bearer.clone(),
    );
    let mut on_b = credvault::proto::credential_service_client::CredentialServiceClient::with_interceptor(
        b.channel().await,
        bearer,
    );
    let get = || proto::GetCredentialRequest { name: "w/missing".into(), version: None };
    // Known on A at once (applied locally), on B after its next reload.
    assert_eq!(on_a.get_credential(get()).await.unwrap_err().code(), tonic::Code::NotFound);
    let code_on_b = |want: tonic::Code| {
        let mut on_b = on_b.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let code = on_b.get_credential(get()).await.unwrap_err().code();
                if code == want {
                    return Instant::now();
                }
                assert!(Instant::now() < deadline, "B still answers {code:?}, want {want:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    code_on_b(tonic::Code::NotFound).await;

    a.admin().await.revoke_token(proto::RevokeTokenRequest { id: created.info.unwrap().id }).await.unwrap();
    let revoked = Instant::now();
    assert_eq!(on_a.get_credential(get()).await.unwrap_err().code(), tonic::Code::Unauthenticated, "at once on A");
    let refused = code_on_b(tonic::Code::Unauthenticated).await;
    assert!(refused - revoked < Duration::from_millis(2500), "B refused after {:?}", refused - revoked);
    assert_eq!(on_b.get_credential(get()).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    a.stop().await;
    b.stop().await;
}

/// Two daemons starting together on an empty database create one root token between
/// them: the insert is atomic (a table lock on PostgreSQL, one write statement on SQLite).
async fn two_daemons_on_an_empty_database_create_one_root_token(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let (a, b) = (env.store().await, env.store().await);
    let raw = env.raw().await;
    for round in 0..10 {
        let (auth_a, auth_b) = (
            credvault::auth::Auth::load(a.as_ref(), 0).await.unwrap(),
            credvault::auth::Auth::load(b.as_ref(), 0).await.unwrap(),
        );
        let (ra, rb) = tokio::join!(auth_a.ensure_root_token(a.as_ref()), auth_b.ensure_root_token(b.as_ref()));
        let created = [ra.unwrap(), rb.unwrap()].into_iter().flatten().count();
        assert_eq!(created, 1, "round {round}: one root token");
        assert_eq!(a.list_tokens().await.unwrap().len(), 1, "round {round}");
        match &raw {
            Raw::Pg(p) => sqlx::query("DELETE FROM tokens").execute(p).await.map(|_| ()).unwrap(),
            Raw::Sqlite(p) => sqlx::query("DELETE FROM tokens").execute(p).await.map(|_| ()).unwrap(),
        }
    }
}

crate::both_backends!(two_daemons_on_an_empty_database_create_one_root_token);
