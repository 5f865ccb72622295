//! Scoped tokens, revocation, expiry, rate limits, load shedding and store timeouts.

use std::time::Duration;

use tokio_stream::StreamExt as _;
use tonic::Code;

use credvault::proto::{
    self, BatchGetCredentialsRequest, Capability, CreateTokenRequest, GetStatusRequest, ListCredentialsRequest,
    ListTokensRequest, PolicyRule, RevokeTokenRequest,
};

use crate::helpers::{
    assert_status, client_with, create_token, eventually, get, put, rule, Backend, Bearer, TestDaemon, TestEnv,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_see_only_their_names() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut root = d.client().await;
    for n in ["team-a/x", "team-a/secret/k", "team-b/x", "team-ab/y"] {
        put(&mut root, n, n.as_bytes(), None).await.unwrap();
    }
    let (token, _) = create_token(
        &d,
        "team-a-reader",
        vec![
            rule("team-a/**", &[Capability::Read, Capability::List], false),
            rule("team-a/secret/**", &[Capability::Read], true),
        ],
        0,
        None,
    )
    .await;
    assert!(token.starts_with("cvt_") && token.len() == 47);
    let mut a = client_with(&d, &token).await;

    assert_eq!(get(&mut a, "team-a/x", None).await.unwrap().1, b"team-a/x");
    assert_status(get(&mut a, "team-b/x", None).await, Code::PermissionDenied, "may not read \"team-b/x\"");
    assert_status(get(&mut a, "team-ab/y", None).await, Code::PermissionDenied, "may not read");
    assert_status(get(&mut a, "team-a/secret/k", None).await, Code::PermissionDenied, "may not read");
    // Denied names do not reveal whether they exist.
    let missing = get(&mut a, "team-b/does-not-exist", None).await.unwrap_err();
    assert_eq!(missing.code(), Code::PermissionDenied);
    assert_status(put(&mut a, "team-a/x", b"nope", None).await, Code::PermissionDenied, "may not write");
    // Invalid names still get INVALID_ARGUMENT.
    assert_status(get(&mut a, "bad name", None).await, Code::InvalidArgument, "allowed are");

    let list = a
        .list_credentials(ListCredentialsRequest {
            prefix: "".into(),
            page_size: 100,
            page_token: "".into(),
            include_deleted: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<String> = list.credentials.into_iter().map(|m| m.name).collect();
    assert_eq!(names, vec!["team-a/secret/k", "team-a/x"], "listing shows only names the token may list");

    let batch = a
        .batch_get_credentials(BatchGetCredentialsRequest { names: vec!["team-a/x".into(), "team-b/x".into()] })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(batch.results[0].result, Some(proto::batch_get_result::Result::Credential(_))));
    match &batch.results[1].result {
        Some(proto::batch_get_result::Result::Error(e)) => assert_eq!(e.code, Code::PermissionDenied as i32),
        other => panic!("expected a denial, got {other:?}"),
    }

    let mut admin_as_a = proto::admin_service_client::AdminServiceClient::with_interceptor(
        d.channel().await,
        Bearer(format!("Bearer {token}").parse().unwrap()),
    );
    assert_status(
        admin_as_a.get_status(GetStatusRequest {}).await,
        Code::PermissionDenied,
        "lacks the admin capability",
    );
    assert_status(admin_as_a.list_tokens(ListTokensRequest {}).await, Code::PermissionDenied, "admin");
    let r = admin_as_a
        .create_token(CreateTokenRequest {
            display_name: "escalate".into(),
            rules: vec![rule("*", &[Capability::Admin], false)],
            ttl: None,
            rate_limit_per_second: 0,
        })
        .await;
    assert_status(r, Code::PermissionDenied, "admin");

    // Token listings never show secrets.
    let tokens = d.admin().await.list_tokens(ListTokensRequest {}).await.unwrap().into_inner();
    assert_eq!(tokens.tokens.len(), 2);
    assert!(!format!("{tokens:?}").contains(&token) && !format!("{tokens:?}").contains(&d.token));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_token_requests_are_invalid_arguments() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut admin = d.admin().await;
    let mk = |name: &str, rules: Vec<PolicyRule>| CreateTokenRequest {
        display_name: name.into(),
        rules,
        ttl: None,
        rate_limit_per_second: 0,
    };
    assert_status(admin.create_token(mk("x", vec![])).await, Code::InvalidArgument, "at least one policy rule");
    assert_status(
        admin.create_token(mk("", vec![rule("*", &[Capability::Read], false)])).await,
        Code::InvalidArgument,
        "display_name",
    );
    assert_status(
        admin.create_token(mk("x", vec![rule("a b", &[Capability::Read], false)])).await,
        Code::InvalidArgument,
        "pattern",
    );
    assert_status(
        admin.create_token(mk("x", vec![rule("a/*", &[], false)])).await,
        Code::InvalidArgument,
        "grants no capability",
    );
    let bad_cap = PolicyRule { pattern: "a/*".into(), capabilities: vec![99], deny: false };
    assert_status(admin.create_token(mk("x", vec![bad_cap])).await, Code::InvalidArgument, "unknown capability 99");
    assert_status(admin.revoke_token(RevokeTokenRequest { id: "zz".into() }).await, Code::InvalidArgument, "8-64 hex");
    assert_status(
        admin.revoke_token(RevokeTokenRequest { id: "00000000".into() }).await,
        Code::NotFound,
        "no live token",
    );
    assert_eq!(
        admin.list_tokens(ListTokensRequest {}).await.unwrap().into_inner().tokens.len(),
        1,
        "nothing was created"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_reaches_every_daemon() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    put(&mut a.client().await, "r/x", b"v", None).await.unwrap();
    let (token, id) = create_token(&a, "ci", vec![rule("r/*", &[Capability::Read], false)], 0, None).await;
    let mut on_a = client_with(&a, &token).await;
    let mut on_b = client_with(&b, &token).await;
    assert!(get(&mut on_a, "r/x", None).await.is_ok());
    eventually("B learns of the new token", Duration::from_secs(1), async || get(&mut on_b, "r/x", None).await.is_ok())
        .await;

    // Watch streams on both daemons: they carry only names the token may read.
    let watch = credvault::proto::WatchCredentialsRequest { prefix: String::new() };
    let mut wa = on_a.watch_credentials(watch.clone()).await.unwrap().into_inner();
    let mut wb = on_b.watch_credentials(watch).await.unwrap().into_inner();
    put(&mut a.client().await, "s/secret", b"v", None).await.unwrap();
    put(&mut a.client().await, "r/y", b"v", None).await.unwrap();
    for w in [&mut wa, &mut wb] {
        let e = tokio::time::timeout(Duration::from_secs(5), w.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(e.name, "r/y", "s/secret is not readable by this token");
    }

    a.admin().await.revoke_token(RevokeTokenRequest { id: id.clone() }).await.unwrap();
    for w in [&mut wa, &mut wb] {
        let ended = tokio::time::timeout(Duration::from_secs(10), w.next()).await.expect("the stream ends");
        let status = ended.expect("with a status").expect_err("an error status");
        assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    }
    assert_status(get(&mut on_a, "r/x", None).await, Code::Unauthenticated, "invalid or expired token");
    eventually("B refuses the revoked token", Duration::from_secs(1), async || {
        get(&mut on_b, "r/x", None).await.is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    let listed = a.admin().await.list_tokens(ListTokensRequest {}).await.unwrap().into_inner();
    assert!(listed.tokens.iter().any(|t| t.id == id && t.revoked_at.is_some()));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_are_refused() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    put(&mut d.client().await, "e/x", b"v", None).await.unwrap();
    let (token, _) = create_token(&d, "short", vec![rule("*", &[Capability::Read], false)], 0, Some(1)).await;
    let mut c = client_with(&d, &token).await;
    assert!(get(&mut c, "e/x", None).await.is_ok());
    eventually("the token expires", Duration::from_secs(3), async || {
        get(&mut c, "e/x", None).await.is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_apply_per_token() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    put(&mut d.client().await, "rl/x", b"v", None).await.unwrap();
    let (token, _) = create_token(&d, "slow", vec![rule("*", &[Capability::Read], false)], 3, None).await;
    let mut limited = client_with(&d, &token).await;
    let mut outcomes = Vec::new();
    for _ in 0..10 {
        outcomes.push(get(&mut limited, "rl/x", None).await);
    }
    let refused: Vec<&tonic::Status> = outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
    assert!(outcomes.iter().filter(|o| o.is_ok()).count() >= 3, "the burst is served");
    assert!(!refused.is_empty(), "a burst of 10 at 3/s must be limited");
    for s in &refused {
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(s.message().contains("rate limit"), "{}", s.message());
        let wait: u64 = s.metadata().get("retry-after-ms").unwrap().to_str().unwrap().parse().unwrap();
        assert!((1..=1000).contains(&wait), "{wait}");
    }
    // Other tokens are unaffected.
    let mut root = d.client().await;
    for _ in 0..20 {
        get(&mut root, "rl/x", None).await.unwrap();
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_and_slow_storage_is_unavailable() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.limits.max_concurrent_requests = 1;
    settings.limits.store_timeout_ms = 1500;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "slow/x", b"v", None).await.unwrap();
    d.vault.cache().clear();

    // Hold the table so the next store read waits.
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut lock = raw.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let before = d.vault.store_queries();
    let stuck = {
        let mut c = d.client().await;
        tokio::spawn(async move { get(&mut c, "slow/x", None).await })
    };
    eventually("the first request reaches the store", Duration::from_secs(2), async || {
        d.vault.store_queries() > before
    })
    .await;
    // One request in flight is the limit: the next is refused at once, not queued.
    let started = std::time::Instant::now();
    let shed = get(&mut c, "other", None).await;
    assert_status(shed, Code::ResourceExhausted, "server overloaded");
    assert!(started.elapsed() < Duration::from_millis(1000), "shedding must not wait for the stuck request");

    // The stuck read gives up at the store timeout with UNAVAILABLE.
    assert_status(stuck.await.unwrap(), Code::Unavailable, "storage is unavailable");
    lock.rollback().await.unwrap();
    raw.close().await;
    assert_eq!(get(&mut c, "slow/x", None).await.unwrap().1, b"v", "serving again once storage answers");
    d.stop().await;
}

/// A caller's deadline (`grpc-timeout`) ends the request even while storage is stuck;
/// the store timeout is much longer here, so only the deadline can have ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_deadlines_are_honoured() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.limits.store_timeout_ms = 30_000;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "deadline/x", b"v", None).await.unwrap();
    d.vault.cache().clear();
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut lock = raw.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let mut req =
        tonic::Request::new(credvault::proto::GetCredentialRequest { name: "deadline/x".into(), version: None });
    req.set_timeout(Duration::from_millis(300));
    let waited = tokio::time::timeout(Duration::from_secs(20), c.get_credential(req)).await;
    let status = waited.expect("the deadline ended the call, not the store timeout").expect_err("an error");
    // The daemon answers DEADLINE_EXCEEDED a little before the deadline, so it reaches a
    // tonic client before that client's own timer would end the call with CANCELLED.
    assert_eq!(
        (status.code(), status.message()),
        (Code::DeadlineExceeded, "deadline of 300 ms expired before the request completed")
    );

    lock.rollback().await.unwrap();
    raw.close().await;
    assert_eq!(get(&mut c, "deadline/x", None).await.unwrap().1, b"v", "serving again once storage answers");
    d.stop().await;
}

/// The server's own answer to an expired `grpc-timeout`, seen through a raw HTTP/2
/// client that does not enforce the deadline itself: DEADLINE_EXCEEDED, the gRPC
/// convention (not CANCELLED).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_deadlines_are_answered_deadline_exceeded() {
    use prost::Message as _;
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.limits.store_timeout_ms = 30_000;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "deadline/raw", b"v", None).await.unwrap();
    d.vault.cache().clear();
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut lock = raw.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    let tcp = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let (h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut h2 = h2.ready().await.unwrap();
    let message = credvault::proto::GetCredentialRequest { name: "deadline/raw".into(), version: None }.encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(&message);
    let request = http::Request::post(format!("http://{}/credvault.v1.CredentialService/GetCredential", d.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", d.token))
        .header("grpc-timeout", "300m")
        .body(())
        .unwrap();
    let (response, mut body) = h2.send_request(request, false).unwrap();
    body.send_data(frame.into(), true).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), response).await.expect("answered").unwrap();
    let headers = response.headers().clone();
    let mut body = response.into_body();
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    let field = |k: &str| headers.get(k).or_else(|| trailers.get(k)).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(field("grpc-status").as_deref(), Some("4"), "DEADLINE_EXCEEDED");
    assert_eq!(
        field("grpc-message").as_deref(),
        Some("deadline%20of%20300%20ms%20expired%20before%20the%20request%20completed")
    );

    lock.rollback().await.unwrap();
    raw.close().await;
    assert_eq!(get(&mut c, "deadline/raw", None).await.unwrap().1, b"v");
    d.stop().await;
}
