//! Transport and admission limits: stalled request bodies, per-token and stream caps,
//! connection cap, HTTP/2 settings, keepalive, reflection v1 and v1alpha.

use std::time::{Duration, Instant};

use tokio_stream::StreamExt as _;
use tonic::Code;

use credvault::proto::{self, Capability, CreateTokenRequest, PolicyRule, WatchCredentialsRequest};

use crate::helpers::{assert_status, client_with, eventually, get, put, Backend, Client, TestDaemon, TestEnv};

async fn token(d: &TestDaemon, name: &str, pattern: &str, caps: &[Capability]) -> String {
    let rule =
        PolicyRule { pattern: pattern.into(), capabilities: caps.iter().map(|c| *c as i32).collect(), deny: false };
    d.admin()
        .await
        .create_token(CreateTokenRequest {
            display_name: name.into(),
            rules: vec![rule],
            ttl: None,
            rate_limit_per_second: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .token
}

/// Opens `n` `PutCredential` streams on one HTTP/2 connection, each sending its headers
/// and one byte of the gRPC frame, then going silent.
async fn stalled_puts(
    d: &TestDaemon,
    token: &str,
    n: usize,
) -> (Vec<h2::client::ResponseFuture>, Vec<h2::SendStream<tonic::codegen::Bytes>>) {
    let tcp = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut responses = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..n {
        let mut client = client.clone().ready().await.unwrap();
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}/credvault.v1.CredentialService/PutCredential", d.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap();
        let (resp, mut body) = client.send_request(req, false).unwrap();
        body.send_data(tonic::codegen::Bytes::from_static(&[0]), false).unwrap();
        responses.push(resp);
        bodies.push(body);
    }
    drop(client);
    (responses, bodies)
}

fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|s| s.parse().ok())
}

/// The reported attack: hundreds of `PutCredential` streams from one read-only token,
/// headers and one byte each, then silence. Other callers must be served normally, and
/// the stalled streams must end with DEADLINE_EXCEEDED once the body time limit passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_bodies_from_one_token_do_not_starve_others() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.limits.max_concurrent_requests = 64;
    settings.transport.request_body_timeout_ms = 3000;
    let d = TestDaemon::start(settings, None).await;
    let mut root = d.client().await;
    put(&mut root, "team-b/x", b"v", None).await.unwrap();
    let attacker = token(&d, "attacker", "empty/*", &[Capability::Read]).await;
    let reader = token(&d, "reader", "team-b/*", &[Capability::Read]).await;

    let started = Instant::now();
    let mut responses = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let (r, b) = stalled_puts(&d, &attacker, 75).await;
        responses.extend(r);
        bodies.extend(b);
    }
    assert_eq!(responses.len(), 300);
    // Let the server take in every stalled stream before the others ask.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut reader = client_with(&d, &reader).await;
    for _ in 0..20 {
        assert_eq!(get(&mut reader, "team-b/x", None).await.expect("another token is served").1, b"v");
        assert_eq!(get(&mut root, "team-b/x", None).await.expect("root is served").1, b"v");
    }
    assert!(started.elapsed() < Duration::from_millis(2500), "the reads ran while the bodies were stalled");

    for resp in responses {
        let r = tokio::time::timeout(Duration::from_secs(10), resp).await.expect("stalled stream ended").unwrap();
        assert_eq!(grpc_status(r.headers()), Some(Code::DeadlineExceeded as i32), "{:?}", r.headers());
        let msg = r.headers().get("grpc-message").unwrap().to_str().unwrap();
        assert!(msg.contains("request_body_timeout_ms"), "{msg}");
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(2900) && waited < Duration::from_secs(10), "{waited:?}");
    drop(bodies);
    // Nothing is left held: the attacker's own token is served afterwards as well.
    let mut a = client_with(&d, &attacker).await;
    assert_status(get(&mut a, "empty/none", None).await, Code::NotFound, "");
    d.stop().await;
}

/// A token over its in-flight limit is refused; others are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_in_flight_limit() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.transport.max_concurrent_requests_per_token = 2;
    let d = TestDaemon::start(settings, None).await;
    let mut root = d.client().await;
    put(&mut root, "slow/hot", b"v", None).await.unwrap();
    get(&mut root, "slow/hot", None).await.unwrap();
    let t = token(&d, "busy", "slow/*", &[Capability::Read]).await;

    // Hold the table so store reads wait.
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut lock = raw.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let mut stuck = Vec::new();
    for i in 0..2 {
        let mut c = client_with(&d, &t).await;
        stuck.push(tokio::spawn(async move { get(&mut c, &format!("slow/miss-{i}"), None).await }));
    }
    let mut c = client_with(&d, &t).await;
    eventually("the token's third request is refused", Duration::from_secs(3), async || {
        matches!(get(&mut c, "slow/hot", None).await, Err(s) if s.code() == Code::ResourceExhausted
            && s.message().contains("2 requests in flight"))
    })
    .await;
    // Another token (root) still reads.
    assert_eq!(get(&mut root, "slow/hot", None).await.unwrap().1, b"v");
    lock.rollback().await.unwrap();
    for s in stuck {
        assert_status(s.await.unwrap(), Code::NotFound, "");
    }
    assert_eq!(get(&mut c, "slow/hot", None).await.unwrap().1, b"v", "permits are released");
    raw.close().await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_are_capped_globally_and_per_token() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.transport.max_watch_streams = 3;
    settings.transport.max_watch_streams_per_token = 2;
    let d = TestDaemon::start(settings, None).await;
    let a = token(&d, "a", "w/*", &[Capability::Read]).await;
    let b = token(&d, "b", "w/*", &[Capability::Read]).await;
    let watch = |c: Client| async move {
        let mut c = c;
        c.watch_credentials(WatchCredentialsRequest { prefix: "w/".into() }).await.map(|r| r.into_inner())
    };
    let a1 = watch(client_with(&d, &a).await).await.unwrap();
    let _a2 = watch(client_with(&d, &a).await).await.unwrap();
    assert_status(watch(client_with(&d, &a).await).await, Code::ResourceExhausted, "2 watch streams open");
    let _root = watch(d.client().await).await.unwrap();
    assert_status(watch(client_with(&d, &b).await).await, Code::ResourceExhausted, "3 watch streams are already open");
    // Job watches count against the same cap.
    let mut admin = d.admin().await;
    assert_status(
        admin.watch_rotation_job(proto::GetRotationJobRequest { job_id: 0 }).await,
        Code::ResourceExhausted,
        "watch streams",
    );
    drop(a1);
    let mut stream = None;
    eventually("a closed stream frees its place", Duration::from_secs(3), async || {
        stream = watch(client_with(&d, &b).await).await.ok();
        stream.is_some()
    })
    .await;
    // Open streams would hold the graceful shutdown.
    drop((stream, _a2, _root, admin));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_streams_are_capped() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request, ServerReflectionRequest,
    };
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.transport.max_unauthenticated_streams = 2;
    let d = TestDaemon::start(settings, None).await;
    let mut health = HealthClient::new(d.channel().await);
    let req = || HealthCheckRequest { service: String::new() };
    let mut w1 = health.watch(req()).await.unwrap().into_inner();
    w1.next().await.unwrap().unwrap();
    let mut w2 = health.watch(req()).await.unwrap().into_inner();
    w2.next().await.unwrap().unwrap();
    assert_status(health.watch(req()).await, Code::ResourceExhausted, "2 health-watch and reflection streams");
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut refl = ServerReflectionClient::new(d.channel().await);
    assert_status(
        refl.server_reflection_info(tokio_stream::iter([list()])).await,
        Code::ResourceExhausted,
        "reflection streams",
    );
    // Unary health checks are not streams.
    health.check(req()).await.unwrap();
    drop(w1);
    eventually("a closed health watch frees its place", Duration::from_secs(3), async || {
        refl.server_reflection_info(tokio_stream::iter([list()])).await.is_ok()
    })
    .await;
    drop((w2, health, refl));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_serves_v1_and_v1alpha() {
    use tonic_reflection::pb::{v1, v1alpha};
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;

    let mut c1 = v1::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let req = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut s = c1.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(l)) =
        s.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1: not a service list")
    };
    let names: Vec<_> = l.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"credvault.v1.CredentialService".to_owned()), "{names:?}");

    let mut c0 = v1alpha::server_reflection_client::ServerReflectionClient::new(d.channel().await);
    let req = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "credvault.v1.AdminService".into(),
        )),
    };
    let mut s = c0.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(f)) =
        s.next().await.unwrap().unwrap().message_response
    else {
        panic!("v1alpha: not a file descriptor")
    };
    assert!(!f.file_descriptor_proto.is_empty());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_keepalive_and_connection_cap() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.transport.max_concurrent_streams = 7;
    settings.transport.keepalive_interval_ms = 200;
    settings.transport.keepalive_timeout_ms = 200;
    settings.transport.max_connections = 3;
    let d = TestDaemon::start(settings, None).await;

    // The stream limit is advertised in the server's SETTINGS.
    let tcp = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let (client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    // Drive the connection until the server's settings are in.
    let _ = tokio::time::timeout(Duration::from_millis(200), &mut conn).await;
    assert_eq!(conn.max_concurrent_send_streams(), 7);
    drop(client);

    // A connection that stops mid-header-block (HEADERS without END_HEADERS) and never
    // answers pings is closed after the keepalive interval plus timeout.
    let mut raw = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend_from_slice(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]); // empty SETTINGS
    out.extend_from_slice(&[0, 0, 1, 0x1, 0, 0, 0, 0, 1, 0x83]); // HEADERS (flags 0: no END_HEADERS), stream 1
    raw.write_all(&out).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection must be closed");
    assert!(started.elapsed() >= Duration::from_millis(150), "{:?}", started.elapsed());
    drop(raw);

    // Connection cap: three are served, a fourth is closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = d.client().await;
        assert_status(get(&mut c, "none/x", None).await, Code::NotFound, "");
        held.push(c);
    }
    let mut extra = tokio::net::TcpStream::connect(d.addr).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(2), extra.read(&mut buf)).await.expect("closed at once");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    held.pop();
    eventually("a closed connection frees its place", Duration::from_secs(3), async || {
        match tonic::transport::Channel::from_shared(format!("http://{}", d.addr)).unwrap().connect().await {
            Ok(ch) => {
                let mut c = proto::credential_service_client::CredentialServiceClient::with_interceptor(ch, d.bearer());
                matches!(get(&mut c, "none/x", None).await, Err(s) if s.code() == Code::NotFound)
            }
            Err(_) => false,
        }
    })
    .await;
    d.stop().await;
}
