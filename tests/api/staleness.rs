//! Rotation health: the staleness counts and gauges, filtered listings (`--older-than`,
//! `--rotation-overdue`) and the jitter of rotation schedules.

use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

use credvault::proto::{
    self, rotation_policy::Generator, Capability, DeleteCredentialRequest, GetRotationPolicyRequest,
    ListCredentialsRequest, PasswordSpec, PutCredentialRequest, RotationPolicy, SetRotationPolicyRequest,
};
use credvault::store::{now_micros, Micros, Staleness, StalenessQuery};

use crate::both_backends;
use crate::helpers::spawn::Binary;
use crate::helpers::{
    assert_status, client_over, create_token, eventually, put, rule, Admin, Backend, Client, Raw, TestDaemon, TestEnv,
};

both_backends!(counts_see_overdue_expiring_expired_and_the_oldest, listings_filter_by_age_and_overdue_rotation);
both_backends!(filtered_rows_count_against_the_scan_budget, jitter_spreads_due_times_the_same_on_every_daemon);

const DAY: Micros = 86_400_000_000;

/// Moves `name`'s versions (and so its current one) back to `at`.
async fn backdate(raw: &Raw, name: &str, at: Micros) {
    let q = "UPDATE credential_versions SET created_at = $1 WHERE name = $2";
    let n = match raw {
        Raw::Pg(p) => sqlx::query(q).bind(at).bind(name).execute(p).await.unwrap().rows_affected(),
        Raw::Sqlite(p) => sqlx::query(q).bind(at).bind(name).execute(p).await.unwrap().rows_affected(),
    };
    assert!(n > 0, "{name} has versions");
}

async fn set_expiry(raw: &Raw, name: &str, at: Micros) {
    let q = "UPDATE credentials SET expires_at = $1 WHERE name = $2";
    let n = match raw {
        Raw::Pg(p) => sqlx::query(q).bind(at).bind(name).execute(p).await.unwrap().rows_affected(),
        Raw::Sqlite(p) => sqlx::query(q).bind(at).bind(name).execute(p).await.unwrap().rows_affected(),
    };
    assert_eq!(n, 1);
}

fn policy(name: &str, kind: proto::PolicyKind) -> RotationPolicy {
    RotationPolicy {
        name: name.into(),
        kind: kind as i32,
        generator: Some(Generator::Password(PasswordSpec { length: 16, ..Default::default() })),
        ..Default::default()
    }
}

/// A scheduled policy whose one slot is `ago` in the past (the scheduler of these
/// daemons sleeps for an hour, so it stays unrun).
async fn schedule_in_the_past(admin: &mut Admin, name: &str, ago: Duration) {
    let mut p = policy(name, proto::PolicyKind::Scheduled);
    p.at = Some(prost_types::Timestamp::from(SystemTime::now() - ago));
    admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(p) }).await.unwrap();
}

async fn periodic(admin: &mut Admin, name: &str, interval: Duration) -> RotationPolicy {
    let mut p = policy(name, proto::PolicyKind::Periodic);
    p.interval = Some(interval.try_into().unwrap());
    admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(p) }).await.unwrap().into_inner()
}

fn quiet_scheduler(env: &TestEnv) -> credvault::config::Settings {
    let mut s = env.settings();
    s.rotation.scheduler_interval_ms = 3_600_000;
    s.rotation.overdue_after_seconds = 60;
    s.rotation.expiry_horizon_seconds = 86_400;
    s
}

/// Every fleet-wide count, on one daemon's vault and on the store with a cap.
async fn counts_see_overdue_expiring_expired_and_the_oldest(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(quiet_scheduler(&env), None).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    let raw = env.raw().await;
    let now = now_micros();
    let empty = d.vault.staleness_pass(now).await.unwrap();
    assert_eq!(empty, Staleness::default(), "nothing yet");

    for n in ["s/old", "s/fresh", "s/overdue", "s/due-now", "s/periodic", "s/expiring", "s/later", "s/expired"] {
        put(&mut c, n, b"v", None).await.unwrap();
    }
    backdate(&raw, "s/old", now - 100 * DAY).await;
    schedule_in_the_past(&mut admin, "s/overdue", Duration::from_secs(7200)).await;
    // Due, but the scheduler has had less than overdue_after_seconds to run it.
    schedule_in_the_past(&mut admin, "s/due-now", Duration::from_secs(10)).await;
    periodic(&mut admin, "s/periodic", Duration::from_secs(3600)).await;
    set_expiry(&raw, "s/expiring", now + 3600 * 1_000_000).await;
    set_expiry(&raw, "s/later", now + 2 * DAY).await;
    set_expiry(&raw, "s/expired", now - 3600 * 1_000_000).await;
    // A deleted credential is stale in every way and counted in none.
    put(&mut c, "s/gone", b"v", None).await.unwrap();
    schedule_in_the_past(&mut admin, "s/gone", Duration::from_secs(7200)).await;
    backdate(&raw, "s/gone", now - 200 * DAY).await;
    set_expiry(&raw, "s/gone", now - DAY).await;
    c.delete_credential(DeleteCredentialRequest { name: "s/gone".into(), expected_version: None }).await.unwrap();

    let counts = d.vault.staleness_pass(now).await.unwrap();
    assert_eq!(
        counts,
        Staleness { overdue: 1, expired: 1, expiring: 1, oldest_current_at: Some(now - 100 * DAY) },
        "one of each, the deleted one left out"
    );
    // Each count stops at the cap: the work of a pass is bounded.
    set_expiry(&raw, "s/later", now + 1_000_000).await;
    let store = env.store().await;
    let q = |cap| StalenessQuery { overdue_before: now - 60_000_000, now, expiring_before: now + DAY, cap };
    assert_eq!(store.staleness(&q(100)).await.unwrap().expiring, 2);
    assert_eq!(store.staleness(&q(1)).await.unwrap().expiring, 1, "capped");
    d.stop().await;
}

fn list_req(prefix: &str, older_than: Option<Duration>, overdue: bool) -> ListCredentialsRequest {
    ListCredentialsRequest {
        prefix: prefix.into(),
        older_than: older_than.map(|d| d.try_into().unwrap()),
        rotation_overdue: overdue,
        ..Default::default()
    }
}

async fn names(c: &mut Client, req: ListCredentialsRequest) -> Vec<String> {
    let page = c.list_credentials(req).await.unwrap().into_inner();
    assert!(page.next_page_token.is_empty(), "one page");
    page.credentials.into_iter().map(|m| m.name).collect()
}

async fn listings_filter_by_age_and_overdue_rotation(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(quiet_scheduler(&env), None).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    let raw = env.raw().await;
    let now = now_micros();
    for n in ["f/old-a", "f/old-b", "f/fresh", "f/overdue", "f/gone"] {
        put(&mut c, n, b"v", None).await.unwrap();
    }
    backdate(&raw, "f/old-a", now - 120 * DAY).await;
    backdate(&raw, "f/old-b", now - 91 * DAY).await;
    backdate(&raw, "f/gone", now - 365 * DAY).await;
    schedule_in_the_past(&mut admin, "f/overdue", Duration::from_secs(3600)).await;
    c.delete_credential(DeleteCredentialRequest { name: "f/gone".into(), expected_version: None }).await.unwrap();
    let days = |n: u64| Some(Duration::from_secs(n * 86_400));

    assert_eq!(names(&mut c, list_req("f/", days(90), false)).await, ["f/old-a", "f/old-b"]);
    assert_eq!(names(&mut c, list_req("f/", days(100), false)).await, ["f/old-a"]);
    assert_eq!(names(&mut c, list_req("f/", None, true)).await, ["f/overdue"]);
    assert!(names(&mut c, list_req("f/", days(90), true)).await.is_empty(), "both filters must hold");
    let mut deleted_too = list_req("f/", days(90), false);
    deleted_too.include_deleted = true;
    assert_eq!(names(&mut c, deleted_too).await, ["f/gone", "f/old-a", "f/old-b"]);
    assert_eq!(names(&mut c, list_req("f/", None, false)).await.len(), 4, "no filter: every live one");

    // The policy still decides what a caller sees.
    let (token, _) = create_token(&d, "fresh-only", vec![rule("f/fresh", &[Capability::List], false)], 0, None).await;
    let mut scoped = client_over(d.channel().await, &token);
    assert!(names(&mut scoped, list_req("f/", days(90), false)).await.is_empty());

    // A page token is bound to the filters it was issued under.
    let mut first = list_req("f/", days(90), false);
    first.page_size = 1;
    let page = c.list_credentials(first.clone()).await.unwrap().into_inner();
    assert_eq!(page.credentials.len(), 1);
    assert!(!page.next_page_token.is_empty());
    for other in [list_req("f/", None, false), list_req("f/", days(91), false), list_req("f/", days(90), true)] {
        let r = c.list_credentials(ListCredentialsRequest { page_token: page.next_page_token.clone(), ..other }).await;
        assert_status(r, Code::InvalidArgument, "page_token does not belong to this listing");
    }
    let next = ListCredentialsRequest { page_token: page.next_page_token, ..first };
    assert_eq!(c.list_credentials(next).await.unwrap().into_inner().credentials[0].name, "f/old-b");

    // Bad durations.
    let bad = |seconds, nanos| ListCredentialsRequest {
        prefix: "f/".into(),
        older_than: Some(prost_types::Duration { seconds, nanos }),
        ..Default::default()
    };
    assert_status(c.list_credentials(bad(-1, 0)).await, Code::InvalidArgument, "older_than must not be negative");
    assert_status(c.list_credentials(bad(0, -1)).await, Code::InvalidArgument, "older_than must not be negative");
    assert_status(
        c.list_credentials(bad(1, 1_000_000_000)).await,
        Code::InvalidArgument,
        "older_than: nanos must be below 1,000,000,000",
    );
    // Longer than the clock has run: nothing is that old, and nothing overflows.
    let ancient = bad(i64::MAX, 0);
    assert!(c.list_credentials(ancient).await.unwrap().into_inner().credentials.is_empty());

    if backend == Backend::Sqlite {
        // The CLI passes both flags through.
        let out = Binary::new(["list", "f/", "--older-than", "90d"]).client_of(&d).output().await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
        let text = String::from_utf8(out.stdout).unwrap();
        let listed: Vec<&str> = text.lines().filter_map(|l| l.split('\t').next()).collect();
        assert_eq!(listed, ["f/old-a", "f/old-b"], "{text}");
        let out = Binary::new(["list", "--rotation-overdue"]).client_of(&d).output().await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(text.lines().filter_map(|l| l.split('\t').next()).collect::<Vec<_>>(), ["f/overdue"], "{text}");
        let out = Binary::new(["list", "--older-than", "ninety days"]).client_of(&d).output().await;
        assert_ne!(out.code(), 0);
        assert!(out.stderr.contains("is not a duration"), "{}", out.stderr);
    }
    d.stop().await;
}

/// Rows the filters drop count against `limits.max_list_scan_rows`: a filtered listing
/// over many rows comes back in short pages rather than scanning everything at once.
async fn filtered_rows_count_against_the_scan_budget(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = quiet_scheduler(&env);
    settings.limits.max_list_scan_rows = 3;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    let raw = env.raw().await;
    for i in 0..8 {
        put(&mut c, &format!("b/{i}"), b"v", None).await.unwrap();
    }
    backdate(&raw, "b/7", now_micros() - 30 * DAY).await;
    let before = d.vault.store_queries();
    let mut req = list_req("b/", Some(Duration::from_secs(86_400)), false);
    let (mut found, mut pages) = (Vec::new(), 0);
    loop {
        let page = c.list_credentials(req.clone()).await.unwrap().into_inner();
        pages += 1;
        found.extend(page.credentials.into_iter().map(|m| m.name));
        if page.next_page_token.is_empty() {
            break;
        }
        req.page_token = page.next_page_token;
    }
    assert_eq!(found, ["b/7"]);
    assert_eq!(pages, 3, "8 rows at 3 a page");
    assert!(d.vault.store_queries() - before <= 3, "one query per page");
    d.stop().await;
}

/// Policies set together get due times spread over the window, each moved by the offset
/// its name fixes (so any daemon computes the same slot).
async fn jitter_spreads_due_times_the_same_on_every_daemon(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = quiet_scheduler(&env);
    settings.rotation.schedule_jitter_seconds = 600;
    let d = TestDaemon::start(settings, None).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    let hour = Duration::from_secs(3600);
    let mut offsets = std::collections::HashSet::new();
    for i in 0..20 {
        let name = format!("j/{i}");
        put(&mut c, &name, b"v", None).await.unwrap();
        let before = now_micros();
        let set = periodic(&mut admin, &name, hour).await;
        let after = now_micros();
        let next = micros(set.next_run_at.unwrap());
        let jitter = credvault::vault::schedule_jitter(&name, Duration::from_secs(600), 3_600_000_000);
        assert!(
            (before + 3_600_000_000 + jitter..=after + 3_600_000_000 + jitter).contains(&next),
            "{name}: due {next}, offset {jitter}, set between {before} and {after}"
        );
        offsets.insert(jitter / 1_000_000);
        let read = admin.get_rotation_policy(GetRotationPolicyRequest { name: name.clone() }).await.unwrap();
        assert_eq!(read.into_inner().next_run_at, set.next_run_at);
    }
    assert!(offsets.len() >= 15, "20 names over a 600 s window: {offsets:?}");
    d.stop().await;
}

fn micros(t: prost_types::Timestamp) -> Micros {
    t.seconds * 1_000_000 + Micros::from(t.nanos / 1000)
}

/// The gauges as the running binary exports them (a process of its own, so no other
/// test's daemon sets the same process-wide gauges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_exports_the_staleness_gauges() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let toml = "[rotation]\nstaleness_interval_ms = 50\nexpiry_horizon_seconds = 86400\n";
    let mut daemon = Binary::serve(env.data_dir()).config(&env.data_dir().join("staleness.toml"), toml).start().await;
    let token = daemon.root_token().await;
    let mut c = client_over(daemon.channel().await, &token);
    let soon = prost_types::Timestamp::from(SystemTime::now() + Duration::from_secs(3600));
    let metadata = proto::Metadata { expires_at: Some(soon), ..Default::default() };
    let put = PutCredentialRequest {
        name: "g/soon".into(),
        value: b"v".to_vec(),
        metadata: Some(metadata),
        ..Default::default()
    };
    c.put_credential(put).await.unwrap();
    let addr = daemon.metrics_addr;
    let mut body = String::new();
    eventually("the expiring credential is counted", Duration::from_secs(10), async || {
        body = scrape(addr).await;
        gauge(&body, "credvault_credentials_expiring") == Some(1.0)
    })
    .await;
    assert_eq!(gauge(&body, "credvault_credentials_expired"), Some(0.0));
    assert_eq!(gauge(&body, "credvault_credentials_rotation_overdue"), Some(0.0));
    let age = gauge(&body, "credvault_oldest_current_version_age_seconds").unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    let updated = gauge(&body, "credvault_staleness_updated_timestamp_seconds").unwrap();
    assert!((now_micros() as f64 / 1e6 - updated).abs() < 60.0, "{updated}");
    for name in [
        "credvault_credentials_rotation_overdue",
        "credvault_credentials_expired",
        "credvault_credentials_expiring",
        "credvault_oldest_current_version_age_seconds",
        "credvault_staleness_updated_timestamp_seconds",
    ] {
        assert!(body.contains(&format!("# HELP {name} ")), "HELP for {name}");
    }
    assert!(!body.contains("g/soon"), "no credential name in any label");
    daemon.sigterm();
    assert!(daemon.wait().await.success());
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The value of an unlabelled series.
fn gauge(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}
