//! Credential rotation (grace periods, generators, policies and the scheduler),
//! destroy/undelete, and change streams.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_stream::StreamExt as _;
use tonic::Code;

use credvault::model::{Clock as _, ManualClock};
use credvault::proto::{
    self, rotate_credential_request::Source, rotation_policy::Generator, BytesSpec, DeleteRotationPolicyRequest,
    DestroyVersionRequest, GetCredentialMetadataRequest, GetRotationPolicyRequest, PasswordSpec,
    RotateCredentialRequest, RotationPolicy, SetRotationPolicyRequest, UndeleteCredentialRequest,
    WatchCredentialsRequest,
};
use credvault::store::{Change, ChangeEvent, ChangeKind};

use crate::both_backends;
use crate::helpers::{assert_status, eventually, get, put, Backend, TestDaemon, TestEnv};

both_backends!(rotation_keeps_the_previous_version_for_its_grace, rotation_under_load_never_serves_a_mix);
both_backends!(destroy_and_undelete, watchers_see_changes_under_their_prefix, periodic_and_scheduled_policies_fire);

fn rotate_req(name: &str, source: Option<Source>, grace: Option<Duration>) -> RotateCredentialRequest {
    RotateCredentialRequest {
        name: name.into(),
        source,
        grace_period: grace.map(|g| g.try_into().unwrap()),
        expected_version: None,
    }
}

fn value(v: &[u8]) -> Option<Source> {
    Some(Source::Value(v.to_vec()))
}

async fn version_state(d: &TestDaemon, name: &str, version: u64) -> i32 {
    let mut c = d.client().await;
    let m = c.get_credential_metadata(GetCredentialMetadataRequest { name: name.into() }).await.unwrap().into_inner();
    m.versions.iter().find(|v| v.version == version).map(|v| v.state).unwrap_or_default()
}

async fn rotation_keeps_the_previous_version_for_its_grace(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut s = env.settings();
    s.rotation.scheduler_interval_ms = 100;
    // A grace period of an hour, run on a clock the test moves: nothing waits for it.
    let clock = ManualClock::starting_now();
    let d = TestDaemon::start_with_clock(s, None, Arc::new(clock.clone())).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    put(&mut c, "rot/db", b"old-password", None).await.unwrap();

    let grace = Duration::from_secs(3600);
    let before = clock.now();
    let r = admin.rotate_credential(rotate_req("rot/db", value(b"new-password"), Some(grace))).await.unwrap();
    let r = r.into_inner();
    assert_eq!((r.name.as_str(), r.version, r.previous_version), ("rot/db", 2, 1));
    let until = r.previous_expires_at.unwrap();
    let until_us = until.seconds * 1_000_000 + i64::from(until.nanos / 1000);
    assert_eq!(until_us, before + 3_600_000_000, "grace runs from the rotation, on the daemon's clock");

    // Current readers get the new value at once; the old one by explicit version.
    assert_eq!(get(&mut c, "rot/db", None).await.unwrap(), (2, b"new-password".to_vec()));
    assert_eq!(get(&mut c, "rot/db", Some(1)).await.unwrap(), (1, b"old-password".to_vec()));
    assert_eq!(version_state(&d, "rot/db", 1).await, proto::VersionState::Previous as i32);

    // A second before the end it is still readable; the moment it ends, it is not, and
    // the scheduler marks it deprecated.
    clock.advance(grace - Duration::from_secs(1));
    assert_eq!(get(&mut c, "rot/db", Some(1)).await.unwrap(), (1, b"old-password".to_vec()));
    assert_eq!(version_state(&d, "rot/db", 1).await, proto::VersionState::Previous as i32);
    clock.advance(Duration::from_secs(1));
    let mut c2 = d.client().await;
    assert_status(get(&mut c2, "rot/db", Some(1)).await, Code::FailedPrecondition, "version 1");
    eventually("version 1 to be deprecated", Duration::from_secs(10), async || {
        version_state(&d, "rot/db", 1).await == proto::VersionState::Deprecated as i32
    })
    .await;
    assert_eq!(get(&mut c2, "rot/db", None).await.unwrap(), (2, b"new-password".to_vec()));

    // Zero grace: the replaced version is unreadable at once.
    admin.rotate_credential(rotate_req("rot/db", value(b"third"), Some(Duration::ZERO))).await.unwrap();
    assert_status(get(&mut c2, "rot/db", Some(2)).await, Code::FailedPrecondition, "past its grace period");

    // Generated values.
    let pw = PasswordSpec { length: 24, lowercase: true, digits: true, ..Default::default() };
    let r = admin.rotate_credential(rotate_req("rot/db", Some(Source::Password(pw)), None)).await.unwrap();
    let (v, got) = get(&mut c2, "rot/db", None).await.unwrap();
    assert_eq!(v, r.into_inner().version);
    assert!(got.len() == 24 && got.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
    let bytes = BytesSpec { length: 16, encoding: proto::ByteEncoding::Hex as i32 };
    admin.rotate_credential(rotate_req("rot/db", Some(Source::RandomBytes(bytes)), None)).await.unwrap();
    let (_, got) = get(&mut c2, "rot/db", None).await.unwrap();
    assert!(got.len() == 32 && got.iter().all(u8::is_ascii_hexdigit));

    // Bad input: precise codes, nothing changed.
    let current = get(&mut c2, "rot/db", None).await.unwrap();
    assert_status(admin.rotate_credential(rotate_req("rot/nope", value(b"x"), None)).await, Code::NotFound, "rot/nope");
    assert_status(
        admin.rotate_credential(rotate_req("rot/db", None, None)).await,
        Code::InvalidArgument,
        "no rotation policy",
    );
    let short = PasswordSpec { length: 4, ..Default::default() };
    assert_status(
        admin.rotate_credential(rotate_req("rot/db", Some(Source::Password(short)), None)).await,
        Code::InvalidArgument,
        "password length",
    );
    assert_status(
        admin.rotate_credential(rotate_req("rot/db", Some(Source::RandomBytes(BytesSpec::default())), None)).await,
        Code::InvalidArgument,
        "length",
    );
    let mut stale = rotate_req("rot/db", value(b"x"), None);
    stale.expected_version = Some(1);
    assert_status(admin.rotate_credential(stale).await, Code::Aborted, &format!("current version is {}", current.0));
    let mut zero = rotate_req("rot/db", value(b"x"), None);
    zero.expected_version = Some(0);
    assert_status(admin.rotate_credential(zero).await, Code::InvalidArgument, "existing credential");
    let mut negative = rotate_req("rot/db", value(b"x"), None);
    negative.grace_period = Some(prost_types::Duration { seconds: -5, nanos: 0 });
    assert_status(admin.rotate_credential(negative).await, Code::InvalidArgument, "grace_period");
    assert_status(admin.rotate_credential(rotate_req("Bad Name", value(b"x"), None)).await, Code::InvalidArgument, "");
    assert_eq!(get(&mut c2, "rot/db", None).await.unwrap(), current, "failed rotations changed nothing");

    // A deleted credential cannot be rotated.
    c2.delete_credential(proto::DeleteCredentialRequest { name: "rot/db".into(), expected_version: None })
        .await
        .unwrap();
    assert_status(admin.rotate_credential(rotate_req("rot/db", value(b"x"), None)).await, Code::NotFound, "deleted");
    d.stop().await;
}

/// Readers hammer one name while it is rotated 50 times: every read is a whole, valid
/// version (the value names its version), never an error or a mix.
async fn rotation_under_load_never_serves_a_mix(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let value_of = |v: u64| format!("value-of-version-{v:04}-{}", "x".repeat(200)).into_bytes();
    put(&mut c, "load/key", &value_of(1), None).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (mut c, stop) = (d.client().await, stop.clone());
        readers.push(tokio::spawn(async move {
            let (mut reads, mut last) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (v, got) = get(&mut c, "load/key", None).await.expect("every read succeeds");
                assert_eq!(got, value_of(v), "the value read belongs to the version read");
                assert!(v >= last, "a reader never goes back to an older version");
                last = v;
                reads += 1;
            }
            reads
        }));
    }
    let mut admin = d.admin().await;
    for v in 2..=51u64 {
        let r = admin.rotate_credential(rotate_req("load/key", value(&value_of(v)), None)).await.unwrap();
        assert_eq!(r.into_inner().version, v);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for r in readers {
        total += r.await.expect("reader saw only valid versions");
    }
    assert!(total > 0);
    assert_eq!(get(&mut c, "load/key", None).await.unwrap(), (51, value_of(51)));
    d.stop().await;
}

async fn destroy_and_undelete(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    put(&mut c, "dd/x", b"one", None).await.unwrap();
    put(&mut c, "dd/x", b"two", None).await.unwrap();

    admin.destroy_version(DestroyVersionRequest { name: "dd/x".into(), version: 1 }).await.unwrap();
    assert_status(get(&mut c, "dd/x", Some(1)).await, Code::FailedPrecondition, "destroyed");
    // Idempotent; the current version is untouched.
    admin.destroy_version(DestroyVersionRequest { name: "dd/x".into(), version: 1 }).await.unwrap();
    assert_eq!(get(&mut c, "dd/x", None).await.unwrap(), (2, b"two".to_vec()));
    let raw = env.raw().await;
    assert!(raw.blob("wrapped_dek", "dd/x", 1).await.is_empty(), "the wrapped key is wiped");
    raw.close().await;
    assert_status(
        admin.destroy_version(DestroyVersionRequest { name: "dd/x".into(), version: 7 }).await,
        Code::NotFound,
        "no version 7",
    );
    assert_status(
        admin.destroy_version(DestroyVersionRequest { name: "dd/x".into(), version: 0 }).await,
        Code::InvalidArgument,
        "version",
    );
    // Destroying the current version makes the credential unreadable, but not missing.
    admin.destroy_version(DestroyVersionRequest { name: "dd/x".into(), version: 2 }).await.unwrap();
    assert_status(get(&mut c, "dd/x", None).await, Code::FailedPrecondition, "destroyed");
    put(&mut c, "dd/x", b"three", Some(2)).await.unwrap();
    assert_eq!(get(&mut c, "dd/x", None).await.unwrap(), (3, b"three".to_vec()));

    assert_status(
        admin.undelete_credential(UndeleteCredentialRequest { name: "dd/x".into() }).await,
        Code::FailedPrecondition,
        "not deleted",
    );
    assert_status(
        admin.undelete_credential(UndeleteCredentialRequest { name: "dd/none".into() }).await,
        Code::NotFound,
        "not found",
    );
    c.delete_credential(proto::DeleteCredentialRequest { name: "dd/x".into(), expected_version: None }).await.unwrap();
    assert_status(get(&mut c, "dd/x", None).await, Code::NotFound, "deleted");
    let m = admin.undelete_credential(UndeleteCredentialRequest { name: "dd/x".into() }).await.unwrap().into_inner();
    assert_eq!((m.current_version, m.deleted_at), (3, None));
    assert_eq!(get(&mut c, "dd/x", None).await.unwrap(), (3, b"three".to_vec()));
    d.stop().await;
}

async fn next_event(s: &mut tonic::Streaming<proto::CredentialEvent>) -> proto::CredentialEvent {
    tokio::time::timeout(Duration::from_secs(10), s.next()).await.expect("an event in time").unwrap().unwrap()
}

async fn watchers_see_changes_under_their_prefix(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.rotation.watch_buffer = 4;
    let d = TestDaemon::start(settings, None).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    let mut w = d.client().await;
    let mut stream =
        w.watch_credentials(WatchCredentialsRequest { prefix: "team/".into() }).await.unwrap().into_inner();

    put(&mut c, "other/x", b"v", None).await.unwrap();
    put(&mut c, "team/a", b"v", None).await.unwrap();
    admin.rotate_credential(rotate_req("team/a", value(b"w"), None)).await.unwrap();
    c.delete_credential(proto::DeleteCredentialRequest { name: "team/a".into(), expected_version: None })
        .await
        .unwrap();
    admin.undelete_credential(UndeleteCredentialRequest { name: "team/a".into() }).await.unwrap();
    admin.destroy_version(DestroyVersionRequest { name: "team/a".into(), version: 1 }).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let e = next_event(&mut stream).await;
        seen.push((e.kind, e.name, e.version));
    }
    use proto::EventKind as K;
    let team = |k: K, v: u64| (k as i32, "team/a".to_owned(), v);
    assert_eq!(
        seen,
        vec![team(K::Put, 1), team(K::Rotate, 2), team(K::Delete, 2), team(K::Undelete, 2), team(K::DestroyVersion, 1)],
        "only team/ events, in order"
    );

    // Bad prefix.
    let mut w2 = d.client().await;
    assert_status(
        w2.watch_credentials(WatchCredentialsRequest { prefix: "bad prefix".into() }).await,
        Code::InvalidArgument,
        "",
    );

    // A watcher that does not keep up is dropped with a clear status, not buffered forever.
    let mut slow = w2.watch_credentials(WatchCredentialsRequest { prefix: "".into() }).await.unwrap().into_inner();
    for i in 0..20_000u64 {
        d.vault.apply_change(Change::Credential(ChangeEvent {
            name: format!("flood/{}", i % 50),
            kind: ChangeKind::Put,
            version: i + 1,
            at: 0,
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        assert!(Instant::now() < deadline, "the slow watcher was never dropped");
        match tokio::time::timeout(Duration::from_secs(10), slow.next()).await.expect("stream moves") {
            Some(Ok(_)) => continue,
            Some(Err(s)) => break s,
            None => panic!("stream ended without a status"),
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{}", status.message());
    assert!(status.message().contains("fell") && status.message().contains("behind"));
    // The daemon keeps serving.
    assert_eq!(get(&mut c, "team/a", None).await.unwrap().0, 2);
    d.stop().await;
}

fn policy(name: &str, kind: proto::PolicyKind) -> RotationPolicy {
    RotationPolicy {
        name: name.into(),
        kind: kind as i32,
        generator: Some(Generator::Password(PasswordSpec { length: 16, ..Default::default() })),
        grace_period: Some(Duration::from_secs(60).try_into().unwrap()),
        ..Default::default()
    }
}

async fn periodic_and_scheduled_policies_fire(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.rotation.scheduler_interval_ms = 50;
    // Daily and hourly schedules on a clock the test moves.
    let clock = ManualClock::starting_now();
    let d = TestDaemon::start_with_clock(settings, None, Arc::new(clock.clone())).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    put(&mut c, "pol/periodic", b"initial", None).await.unwrap();
    put(&mut c, "pol/once", b"initial", None).await.unwrap();
    put(&mut c, "pol/manual", b"initial", None).await.unwrap();

    let mut p = policy("pol/periodic", proto::PolicyKind::Periodic);
    let day = Duration::from_secs(86_400);
    p.interval = Some(day.try_into().unwrap());
    let set = admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(p) }).await.unwrap().into_inner();
    let next = set.next_run_at.expect("a periodic policy is due");
    assert_eq!(next.seconds * 1_000_000 + i64::from(next.nanos / 1000), clock.now() + 86_400_000_000);
    let mut once = policy("pol/once", proto::PolicyKind::Scheduled);
    let at = clock.now() + 3_600_000_000;
    once.at = Some(prost_types::Timestamp { seconds: at / 1_000_000, nanos: 0 });
    admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(once) }).await.unwrap();
    admin
        .set_rotation_policy(SetRotationPolicyRequest { policy: Some(policy("pol/manual", proto::PolicyKind::Manual)) })
        .await
        .unwrap();

    // Nothing is due until the clock says so.
    assert_eq!(get(&mut c, "pol/periodic", None).await.unwrap().0, 1);
    clock.advance(day);
    eventually("the periodic policy to fire", Duration::from_secs(10), async || {
        get(&mut c, "pol/periodic", None).await.unwrap().0 == 2
    })
    .await;
    clock.advance(day);
    eventually("the periodic policy to fire again", Duration::from_secs(10), async || {
        get(&mut c, "pol/periodic", None).await.unwrap().0 == 3
    })
    .await;
    let (_, generated) = get(&mut c, "pol/periodic", None).await.unwrap();
    assert_eq!(generated.len(), 16);
    let got = admin.get_rotation_policy(GetRotationPolicyRequest { name: "pol/periodic".into() }).await.unwrap();
    let got = got.into_inner();
    assert!(got.rotations == 2 && got.last_rotated_at.is_some() && got.last_error.is_empty(), "{got:?}");
    // The replaced version keeps the policy's grace period (60 s): version 2, replaced
    // just now, is readable; version 1, replaced a day ago, is not.
    assert_eq!(get(&mut c, "pol/periodic", Some(2)).await.unwrap().1.len(), 16);
    assert_status(get(&mut c, "pol/periodic", Some(1)).await, Code::FailedPrecondition, "deprecated");

    // Its hour passed with the first day.
    eventually("the scheduled policy to fire", Duration::from_secs(10), async || {
        get(&mut c, "pol/once", None).await.unwrap().0 == 2
    })
    .await;
    let once = admin.get_rotation_policy(GetRotationPolicyRequest { name: "pol/once".into() }).await.unwrap();
    assert_eq!((once.get_ref().rotations, once.get_ref().next_run_at), (1, None), "a scheduled policy fires once");

    // Manual: never by itself; a rotation without a value uses its generator.
    assert_eq!(get(&mut c, "pol/manual", None).await.unwrap().0, 1);
    admin.rotate_credential(rotate_req("pol/manual", None, None)).await.unwrap();
    let (v, value) = get(&mut c, "pol/manual", None).await.unwrap();
    assert_eq!((v, value.len()), (2, 16));

    // Bad policies.
    let mut no_interval = policy("pol/manual", proto::PolicyKind::Periodic);
    no_interval.interval = None;
    assert_status(
        admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(no_interval) }).await,
        Code::InvalidArgument,
        "interval",
    );
    let mut no_gen = policy("pol/manual", proto::PolicyKind::Manual);
    no_gen.generator = None;
    assert_status(
        admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(no_gen) }).await,
        Code::InvalidArgument,
        "generator",
    );
    let mut short = policy("pol/manual", proto::PolicyKind::BeforeExpiry);
    short.interval = Some(Duration::from_secs(10).try_into().unwrap());
    short.validity = Some(Duration::from_secs(5).try_into().unwrap());
    assert_status(
        admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(short) }).await,
        Code::InvalidArgument,
        "validity",
    );
    let mut unknown = policy("pol/manual", proto::PolicyKind::Manual);
    unknown.kind = 42;
    assert_status(
        admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(unknown) }).await,
        Code::InvalidArgument,
        "policy kind",
    );
    assert_status(
        admin
            .set_rotation_policy(SetRotationPolicyRequest {
                policy: Some(policy("pol/none", proto::PolicyKind::Manual)),
            })
            .await,
        Code::NotFound,
        "pol/none",
    );
    assert_status(
        admin.set_rotation_policy(SetRotationPolicyRequest { policy: None }).await,
        Code::InvalidArgument,
        "policy",
    );
    assert_eq!(
        admin.get_rotation_policy(GetRotationPolicyRequest { name: "pol/manual".into() }).await.unwrap().get_ref().kind,
        proto::PolicyKind::Manual as i32,
        "rejected policies changed nothing"
    );

    // before_expiry renews the expiry with each rotation.
    let mut be = policy("pol/manual", proto::PolicyKind::BeforeExpiry);
    be.interval = Some(Duration::from_secs(7_200).try_into().unwrap());
    be.validity = Some(Duration::from_secs(10_800).try_into().unwrap());
    admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(be) }).await.unwrap();
    for _ in 0..2 {
        let before = get(&mut c, "pol/manual", None).await.unwrap().0;
        clock.advance(Duration::from_secs(10_800));
        eventually("the before_expiry policy to fire", Duration::from_secs(10), async || {
            get(&mut c, "pol/manual", None).await.unwrap().0 > before
        })
        .await;
    }
    let m = c
        .get_credential_metadata(GetCredentialMetadataRequest { name: "pol/manual".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(m.metadata.unwrap().expires_at.is_some(), "the rotation set a new expiry");

    admin.delete_rotation_policy(DeleteRotationPolicyRequest { name: "pol/periodic".into() }).await.unwrap();
    assert_status(
        admin.get_rotation_policy(GetRotationPolicyRequest { name: "pol/periodic".into() }).await,
        Code::NotFound,
        "no rotation policy",
    );
    assert_status(
        admin.delete_rotation_policy(DeleteRotationPolicyRequest { name: "pol/periodic".into() }).await,
        Code::NotFound,
        "no rotation policy",
    );
    d.stop().await;
}

/// Two daemons on one PostgreSQL database both run the scheduler; each slot is rotated
/// by exactly one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_never_rotate_the_same_slot() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.rotation.scheduler_interval_ms = 20;
    // Both daemons on one clock, moved an hour at a time: each hour is one slot.
    let clock = ManualClock::starting_now();
    let a = TestDaemon::start_with_clock(settings.clone(), None, Arc::new(clock.clone())).await;
    let b = TestDaemon::start_with_clock(settings, Some(&a.token), Arc::new(clock.clone())).await;
    let (mut c, mut admin) = (a.client().await, a.admin().await);
    put(&mut c, "slot/key", b"initial", None).await.unwrap();
    let mut p = policy("slot/key", proto::PolicyKind::Periodic);
    p.interval = Some(Duration::from_secs(3600).try_into().unwrap());
    admin.set_rotation_policy(SetRotationPolicyRequest { policy: Some(p) }).await.unwrap();
    for slot in 1..=4u64 {
        clock.advance(Duration::from_secs(3600));
        eventually("the slot's rotation", Duration::from_secs(10), async || {
            get(&mut c, "slot/key", None).await.unwrap().0 > slot
        })
        .await;
        // Both schedulers have seen the slot several times over before the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let token = a.token.clone();
    a.stop().await;
    b.stop().await;
    let d = TestDaemon::start(env.settings(), Some(&token)).await;
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    let rotations = admin
        .get_rotation_policy(GetRotationPolicyRequest { name: "slot/key".into() })
        .await
        .unwrap()
        .into_inner()
        .rotations;
    let version = get(&mut c, "slot/key", None).await.unwrap().0;
    assert_eq!(version, rotations + 1, "every version after the first came from one claimed slot");
    // Exactly one rotation per slot (both daemons rotating one would double it).
    assert_eq!(rotations, 4, "four slots, four rotations");
    d.stop().await;
}
