//! Every RPC is audited off the hot path; values and tokens never reach the trail.

use std::time::Duration;

use tonic::Code;

use credvault::audit::AuditSink;
use credvault::proto::{
    self, AuditEvent, BatchGetCredentialsRequest, ListAuditEventsRequest, ListCredentialsRequest,
    WatchCredentialsRequest,
};

use crate::helpers::{assert_status, eventually, get, put, Backend, Raw, TestDaemon, TestEnv};

const MARKER: &str = "audit-marker-51f0-secret-value";

async fn events(d: &TestDaemon) -> Vec<AuditEvent> {
    let r = d.admin().await.list_audit_events(ListAuditEventsRequest { limit: 1000 }).await.unwrap();
    r.into_inner().events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_and_failures_are_audited_without_values() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.audit.sink = AuditSink::Both;
    settings.audit.file = Some(env.data_dir().join("audit.jsonl"));
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "aud/x", MARKER.as_bytes(), None).await.unwrap();
    get(&mut c, "aud/x", None).await.unwrap();
    assert_status(get(&mut c, "aud/missing", None).await, Code::NotFound, "not found");
    let mut anonymous = proto::credential_service_client::CredentialServiceClient::new(d.channel().await);
    let r = anonymous.get_credential(proto::GetCredentialRequest { name: "aud/x".into(), version: None }).await;
    assert_status(r, Code::Unauthenticated, "missing bearer token");

    let mut seen = Vec::new();
    eventually("events are written", Duration::from_secs(3), async || {
        seen = events(&d).await;
        seen.iter().filter(|e| e.credential.starts_with("aud/") || e.token_name.is_empty()).count() >= 4
    })
    .await;
    let find = |rpc: &str, code: &str| {
        seen.iter()
            .find(|e| e.rpc == rpc && e.code == code)
            .unwrap_or_else(|| panic!("no {rpc} {code} event in {seen:?}"))
    };
    let putev = find("PutCredential", "OK");
    assert_eq!((putev.credential.as_str(), putev.version, putev.token_name.as_str()), ("aud/x", 1, "root"));
    assert_eq!(putev.token_id.len(), 12);
    assert!(putev.peer.starts_with("127.0.0.1:"), "{}", putev.peer);
    assert_eq!(putev.request_id.len(), 16);
    let getev = find("GetCredential", "OK");
    assert_eq!((getev.credential.as_str(), getev.version), ("aud/x", 1));
    assert_eq!(find("GetCredential", "NOT_FOUND").credential, "aud/missing");
    let unauth = find("GetCredential", "UNAUTHENTICATED");
    assert!(unauth.token_id.is_empty() && unauth.token_name.is_empty());
    let ids: std::collections::HashSet<&str> = seen.iter().map(|e| e.request_id.as_str()).collect();
    assert_eq!(ids.len(), seen.len(), "request ids are unique");

    // Neither the table nor the file holds the value or a token.
    let dump = format!("{seen:?}");
    assert!(!dump.contains(MARKER) && !dump.contains(&d.token));
    let file = std::fs::read_to_string(env.data_dir().join("audit.jsonl")).unwrap();
    assert!(file.lines().count() >= 4);
    for line in file.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["rpc"].is_string() && v["code"].is_string(), "{line}");
    }
    assert!(!file.contains(MARKER) && !file.contains(&d.token));
    d.stop().await;
}

/// Runs one statement on the test database beside the daemon.
async fn exec(raw: &Raw, sql: &str) {
    match raw {
        Raw::Pg(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
        Raw::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|_| ()),
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// One integer from the test database beside the daemon.
async fn scalar(raw: &Raw, sql: &str) -> i64 {
    match raw {
        Raw::Pg(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        Raw::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
    }
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Polls the daemon's audit events until `check` holds; a failure lists what was there.
async fn audited(d: &TestDaemon, what: &str, check: impl Fn(&[AuditEvent]) -> bool) -> Vec<AuditEvent> {
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let seen = events(d).await;
        if check(&seen) {
            return seen;
        }
        if tokio::time::Instant::now() >= until {
            let listed: Vec<String> = seen
                .iter()
                .filter(|e| e.rpc != "ListAuditEvents")
                .map(|e| format!("{} {} {} {}", e.request_id, e.rpc, e.credential, e.code))
                .collect();
            panic!("{what}: not within 10s; the events besides listings:\n{}", listed.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The reported bug: a NUL in a name made PostgreSQL refuse the batch, the writer retried
/// it forever, and `required` mode refused everything after it.
async fn hostile_names_cannot_wedge_the_sink(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.audit.required = true;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "ok/x", b"v", None).await.unwrap();
    let at_limit = format!("ok/{}", "a".repeat(253));
    let huge_nul = format!("ok/{}", "\0".repeat(100 * 1024));
    let long = "b".repeat(100 * 1024);
    let hostile: Vec<(&str, Code, String)> = vec![
        ("ok/a\0b", Code::InvalidArgument, "!ok/a\\x00b".into()),
        ("ok/\u{1}\u{1b}[2J\r\n", Code::InvalidArgument, "!ok/\\x01\\x1b[2J\\x0d\\x0a".into()),
        ("ok/\\u{0}\\xff", Code::InvalidArgument, "!ok/\\\\u{0}\\\\xff".into()),
        ("ok/\u{202e}é", Code::InvalidArgument, "!ok/\\u{202e}\\u{e9}".into()),
        (&at_limit, Code::NotFound, at_limit.clone()),
        (
            &huge_nul,
            Code::InvalidArgument,
            format!("!ok/{}…[truncated {} bytes]", "\\x00".repeat(255), 100 * 1024 - 255),
        ),
        (&long, Code::InvalidArgument, format!("!{}…[truncated {} bytes]", "b".repeat(1024), 100 * 1024 - 1024)),
    ];
    for (name, code, _) in &hostile {
        let r = get(&mut c, name, None).await;
        assert_eq!(r.as_ref().map_err(|s| s.code()).err(), Some(*code), "{r:?}");
    }
    for _ in 0..10 {
        assert_eq!(get(&mut c, "ok/x", None).await.unwrap().1, b"v", "required mode keeps serving");
    }
    let seen = audited(&d, "the good reads are audited", |e| {
        e.iter().filter(|e| e.rpc == "GetCredential" && e.credential == "ok/x" && e.code == "OK").count() == 10
    })
    .await;
    for (_, code, recorded) in &hostile {
        let code = format!("{code:?}");
        let found = seen.iter().find(|e| &e.credential == recorded);
        let found = found.unwrap_or_else(|| panic!("no event recording {recorded:?}"));
        assert_eq!(found.code.replace('_', "").to_lowercase(), code.to_lowercase());
        assert!(found.credential.len() <= 1024 + 40);
    }
    d.stop().await;
}

/// A batch with one event the sink refuses is split: the others are written, the offender
/// is recorded in its quarantined form, and nothing is retried forever.
async fn a_refused_event_is_isolated_and_the_rest_written(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.audit.required = true;
    settings.audit.flush_interval_ms = 300; // one batch for all of them
    let d = TestDaemon::start(settings, None).await;
    let raw = env.raw().await;
    // A sink that refuses one particular event, as a constraint or trigger would.
    exec(
        &raw,
        match backend {
            Backend::Postgres => {
                "ALTER TABLE audit_log ADD CONSTRAINT no_poison CHECK (credential IS NULL OR credential NOT LIKE '%poison%')"
            }
            Backend::Sqlite => {
                "CREATE TRIGGER no_poison BEFORE INSERT ON audit_log WHEN NEW.credential LIKE '%poison%' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END"
            }
        },
    )
    .await;
    let c = d.client().await;
    let mut calls = Vec::new();
    for i in 0..20 {
        let mut c = c.clone();
        let name = if i == 7 { "x/poison".to_owned() } else { format!("x/n{i}") };
        calls.push(tokio::spawn(async move { get(&mut c, &name, None).await }));
    }
    for call in calls {
        assert_status(call.await.unwrap(), Code::NotFound, "");
    }
    let seen = audited(&d, "the other 19 and the quarantined one are written", |e| {
        e.iter().filter(|e| e.credential.starts_with("x/n")).count() == 19
            && e.iter().any(|e| e.credential == "!rejected-by-sink")
    })
    .await;
    let q = seen.iter().find(|e| e.credential == "!rejected-by-sink").unwrap();
    assert_eq!((q.rpc.as_str(), q.code.as_str(), q.token_name.as_str()), ("GetCredential", "NOT_FOUND", "root"));
    assert!(!seen.iter().any(|e| e.credential.contains("poison")));
    // The writer moved on: later requests are served and audited.
    assert_status(get(&mut c.clone(), "x/after", None).await, Code::NotFound, "");
    audited(&d, "later events are written", |e| e.iter().any(|e| e.credential == "x/after")).await;
    raw.close().await;
    d.stop().await;
}

/// `required` refuses only while the sink fails, and serves again once it recovers.
async fn required_mode_recovers_with_the_sink(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.audit.required = true;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "req/x", b"v", None).await.unwrap();
    let raw = env.raw().await;
    // Waited for in the table itself: a listing through the daemon would leave an event
    // of its own in the queue, and that one, not the read below, would meet the
    // missing table first.
    eventually("the put is audited", Duration::from_secs(10), async || {
        scalar(&raw, "SELECT count(*) FROM audit_log WHERE rpc = 'PutCredential'").await == 1
    })
    .await;

    exec(&raw, "ALTER TABLE audit_log RENAME TO audit_log_away").await;
    // Nothing is queued, so the sink is still taken to be healthy: this read is served
    // and its event held until the table is back.
    get(&mut c, "req/x", None).await.unwrap();
    let mut served = 1;
    eventually("requests are refused while auditing fails", Duration::from_secs(5), async || {
        match get(&mut c, "req/x", None).await {
            Ok(_) => {
                served += 1;
                false
            }
            Err(s) => s.code() == Code::Unavailable && s.message().contains("audit"),
        }
    })
    .await;
    exec(&raw, "ALTER TABLE audit_log_away RENAME TO audit_log").await;
    eventually("requests are served again", Duration::from_secs(5), async || get(&mut c, "req/x", None).await.is_ok())
        .await;
    served += 1;
    // Every read served was audited, the ones held while the sink was down included.
    audited(&d, "every served read is audited", |e| {
        e.iter().filter(|e| e.rpc == "GetCredential" && e.code == "OK").count() == served
    })
    .await;
    raw.close().await;
    d.stop().await;
}

/// A batch read names every credential it touches; List and Watch record their prefix.
async fn batch_list_and_watch_are_attributable(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "att/a", b"v", None).await.unwrap();
    let names = vec!["att/a".to_owned(), "att/missing".to_owned()];
    c.batch_get_credentials(BatchGetCredentialsRequest { names }).await.unwrap();
    let names = vec!["att/a".to_owned(), "att/\0".to_owned()];
    let r = c.batch_get_credentials(BatchGetCredentialsRequest { names }).await;
    assert_status(r, Code::InvalidArgument, "contains byte 0x00");
    c.list_credentials(ListCredentialsRequest {
        prefix: "att/".into(),
        page_size: 10,
        page_token: String::new(),
        include_deleted: false,
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = c.watch_credentials(WatchCredentialsRequest { prefix: "att/w".into() }).await.unwrap();
    let seen = audited(&d, "batch, list and watch are audited", |e| {
        e.iter().filter(|e| e.rpc == "BatchGetCredentials").count() == 2
            && ["ListCredentials", "WatchCredentials"].iter().all(|rpc| e.iter().any(|e| e.rpc == *rpc))
    })
    .await;
    let by = |rpc: &str| seen.iter().find(|e| e.rpc == rpc).unwrap().credential.clone();
    let batches: Vec<(&str, &str)> = seen
        .iter()
        .filter(|e| e.rpc == "BatchGetCredentials")
        .map(|e| (e.credential.as_str(), e.code.as_str()))
        .collect();
    assert!(batches.contains(&("att/a,att/missing", "OK")), "{batches:?}");
    assert!(batches.contains(&("att/a,!att/\\x00", "INVALID_ARGUMENT")), "{batches:?}");
    assert_eq!(by("ListCredentials"), "att/");
    assert_eq!(by("WatchCredentials"), "att/w");
    drop(stream);
    d.stop().await;
}

crate::both_backends!(
    hostile_names_cannot_wedge_the_sink,
    a_refused_event_is_isolated_and_the_rest_written,
    required_mode_recovers_with_the_sink,
    batch_list_and_watch_are_attributable,
);

/// Requests that end without a response are audited (CANCELLED, DEADLINE_EXCEEDED) and
/// leave nothing in the coalescing map, even while the store still hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_timed_out_requests_are_audited_and_released() {
    let env = TestEnv::new(Backend::Postgres).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = d.client().await;
    // A store that hangs: every credential read waits for this lock.
    let pool = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE credentials IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();

    const N: usize = 20;
    // Callers that give up and reset their streams. A caller's own timer could fire
    // before a loaded machine even sent its request, and the daemon cannot audit what
    // never reached it: so each gives up only once the daemon holds all N of them
    // (each name is one load waiting on the store).
    let mut resetting = Vec::new();
    for i in 0..N {
        let mut c = c.clone();
        resetting.push(tokio::spawn(async move { get(&mut c, &format!("slow/c{i}"), None).await.map(|_| ()) }));
    }
    eventually("the daemon holds every request that will be reset", Duration::from_secs(15), async || {
        d.vault.cache().inflight_len() == N
    })
    .await;
    // Callers whose deadline runs out. The daemon's clock starts when a request reaches
    // it, the caller's before; tonic's client runs its own timer too and resets the
    // stream (reporting CANCELLED) when it fires first. A reset within the daemon's slack
    // of the deadline (a tenth of it) is audited DEADLINE_EXCEEDED: two seconds leave
    // 200 ms for a loaded machine to deliver twenty requests.
    let mut timing_out = Vec::new();
    for i in 0..N {
        let mut c = c.clone();
        timing_out.push(tokio::spawn(async move {
            let mut req =
                tonic::Request::new(proto::GetCredentialRequest { name: format!("slow/d{i}"), version: None });
            req.set_timeout(Duration::from_secs(2));
            c.get_credential(req).await.map(|_| ()).map_err(|s| s.code())
        }));
    }
    for call in timing_out {
        let code = call.await.unwrap().unwrap_err();
        assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
    }
    for call in &resetting {
        assert!(!call.is_finished(), "a read answered while the store hangs");
        call.abort();
    }
    for call in resetting {
        assert!(call.await.unwrap_err().is_cancelled());
    }
    eventually("the coalescing map is empty while the store still hangs", Duration::from_secs(5), async || {
        d.vault.cache().inflight_len() == 0
    })
    .await;
    // The store is back (its pool was held by the hung reads until now).
    lock.rollback().await.unwrap();
    pool.close().await;
    let seen = audited(&d, "every abandoned request is audited", |e| {
        let n = |p: &str, code: &str| e.iter().filter(|e| e.credential.starts_with(p) && e.code == code).count();
        n("slow/d", "DEADLINE_EXCEEDED") == N && n("slow/c", "CANCELLED") == N
    })
    .await;
    let slow = seen.iter().filter(|e| e.credential.starts_with("slow/"));
    assert_eq!(slow.count(), 2 * N, "one event per abandoned request");
    let one = seen.iter().find(|e| e.credential == "slow/d0").unwrap();
    assert!((1_500_000..10_000_000).contains(&one.latency_us), "{}", one.latency_us);
    assert_eq!(one.token_name, "root");
    // The store is back: reads work again.
    let mut c = c.clone();
    assert_status(get(&mut c, "slow/after", None).await, Code::NotFound, "");
    d.stop().await;
}

/// The JSON-lines file is created 0600; old `audit_log` rows are pruned, newer kept.
async fn file_mode_and_retention(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await; // runs the migrations
    let token = d.token.clone();
    d.stop().await;
    let raw = env.raw().await;
    let day = 86_400_000_000i64;
    let now = credvault::store::now_micros();
    for (i, at) in [now - 10 * day, now - 3 * day, now - 2 * day, now - day / 2].iter().enumerate() {
        let q = format!(
            "INSERT INTO audit_log (at, request_id, token_id, token_name, rpc, credential, version, code, latency_us, peer) \
             VALUES ({at}, 'old{i}', 't', 'n', 'GetCredential', 'ret/{i}', NULL, 'OK', 1, '')"
        );
        exec(&raw, &q).await;
    }
    let mut settings = env.settings();
    settings.audit.sink = AuditSink::Both;
    settings.audit.file = Some(env.data_dir().join("audit.jsonl"));
    settings.audit.retention_days = 1;
    let d = TestDaemon::start(settings, Some(&token)).await;
    let mut c = d.client().await;
    assert_status(get(&mut c, "ret/new", None).await, Code::NotFound, "");
    let seen = audited(&d, "rows older than a day are pruned", |e| {
        !e.iter().any(|e| e.request_id.starts_with("old") && e.request_id != "old3")
            && e.iter().any(|e| e.credential == "ret/new")
    })
    .await;
    assert!(seen.iter().any(|e| e.request_id == "old3"), "a row inside the window is kept");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(env.data_dir().join("audit.jsonl")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    raw.close().await;
    d.stop().await;
}

crate::both_backends!(file_mode_and_retention);

/// Repeated identical successful reads fold into one event whose count adds up exactly to
/// the reads made; other versions, other names, denials and writes stay events of their
/// own. The window is long, so only the flush at shutdown writes the folded events.
async fn reads_fold_into_counted_events(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.audit.fold_reads_seconds = 3600;
    let d = TestDaemon::start(settings.clone(), None).await;
    let token = d.token.clone();
    let mut c = d.client().await;
    put(&mut c, "fold/a", b"v1", None).await.unwrap();
    put(&mut c, "fold/a", b"v2", None).await.unwrap();
    put(&mut c, "fold/b", b"v1", None).await.unwrap();
    for _ in 0..57 {
        get(&mut c, "fold/a", None).await.unwrap();
    }
    for _ in 0..5 {
        get(&mut c, "fold/a", Some(1)).await.unwrap();
    }
    for _ in 0..3 {
        get(&mut c, "fold/b", None).await.unwrap();
        assert_status(get(&mut c, "fold/missing", None).await, Code::NotFound, "");
    }
    d.stop().await;

    let raw = env.raw().await;
    let rows: Vec<(String, Option<i64>, String, i64, bool)> = {
        let q = "SELECT credential, version, code, count, last_at IS NOT NULL FROM audit_log \
                 WHERE rpc = 'GetCredential' ORDER BY credential, version, code";
        match &raw {
            Raw::Pg(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
            Raw::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
        }
    };
    let sum = |name: &str, version: Option<i64>, code: &str| -> (usize, i64) {
        let r: Vec<_> = rows.iter().filter(|r| r.0 == name && r.1 == version && r.2 == code).collect();
        (r.len(), r.iter().map(|r| r.3).sum())
    };
    assert_eq!(sum("fold/a", Some(2), "OK"), (1, 57), "57 reads of the current version are one event of 57");
    assert_eq!(sum("fold/a", Some(1), "OK"), (1, 5), "another version folds on its own");
    assert_eq!(sum("fold/b", Some(1), "OK"), (1, 3));
    assert_eq!(sum("fold/missing", None, "NOT_FOUND"), (3, 3), "errors are never folded");
    assert!(rows.iter().filter(|r| r.3 > 1).all(|r| r.4), "a folded event has its last time");
    let puts: i64 = {
        let q = "SELECT COUNT(*) FROM audit_log WHERE rpc = 'PutCredential'";
        match &raw {
            Raw::Pg(p) => sqlx::query_scalar(q).fetch_one(p).await.unwrap(),
            Raw::Sqlite(p) => sqlx::query_scalar(q).fetch_one(p).await.unwrap(),
        }
    };
    assert_eq!(puts, 3, "writes are events of their own");

    // The API shows the count and the last time.
    let d = TestDaemon::start(settings, Some(&token)).await;
    let folded = audited(&d, "the folded event is listed", |e| {
        e.iter().any(|e| e.credential == "fold/a" && e.version == 2 && e.count == 57 && e.last_at.is_some())
    })
    .await;
    assert!(folded.iter().filter(|e| e.rpc == "PutCredential").all(|e| e.count == 1 && e.last_at.is_none()));
    d.stop().await;
}

crate::both_backends!(reads_fold_into_counted_events);

/// Every response carries its request's id in `x-request-id` (16 hex digits, sent as a
/// never-indexed HTTP/2 literal), and the audit event of that request has the same id;
/// several responses on one connection each carry their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_carry_the_request_id_of_their_audit_event() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let req = proto::PutCredentialRequest { name: format!("rid/{i}"), value: b"v".to_vec(), ..Default::default() };
        let r = c.put_credential(req).await.unwrap();
        let id = r.metadata().get("x-request-id").expect("x-request-id").to_str().unwrap().to_owned();
        assert!(id.len() == 16 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        ids.push(id);
    }
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 3, "each response has its own id: {ids:?}");

    let mut seen = Vec::new();
    eventually("the puts' events are written", Duration::from_secs(3), async || {
        seen = events(&d).await;
        seen.iter().filter(|e| e.rpc == "PutCredential").count() >= 3
    })
    .await;
    for (i, id) in ids.iter().enumerate() {
        let e = seen.iter().find(|e| &e.request_id == id).unwrap_or_else(|| panic!("no event with id {id}: {seen:?}"));
        assert_eq!((e.rpc.as_str(), e.credential.as_str()), ("PutCredential", format!("rid/{i}").as_str()));
    }
    d.stop().await;
}
