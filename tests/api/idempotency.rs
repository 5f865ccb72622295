//! Idempotency keys on PutCredential, DeleteCredential, RotateCredential and
//! WriteCredentials: a retry with
//! the same key and request gets the first result; the same key with another request is
//! refused; keys are per token, shared by daemons over one database, and pruned once
//! their window has passed.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::{Code, Request, Status};

use credvault::proto::{
    credential_write, rotate_credential_request, Capability, CredentialWrite, DeleteCredentialRequest, PasswordSpec,
    PutCredentialRequest, RotateCredentialRequest, WriteCredentialsRequest,
};
use credvault::service::{IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER};

use crate::both_backends;
use crate::helpers::{
    assert_status, client_with, create_token, get, put, rule, scrape, series_value, Backend, Client, Raw, TestDaemon,
    TestEnv,
};

fn keyed<T>(message: T, key: &str) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, MetadataValue::try_from(key).expect("ascii key"));
    r
}

fn put_req(name: &str, value: &[u8], expected: Option<u64>) -> PutCredentialRequest {
    PutCredentialRequest { name: name.into(), value: value.to_vec(), expected_version: expected, metadata: None }
}

/// A keyed put: the version, and whether it was answered as a replay.
async fn put_keyed(
    c: &mut Client,
    key: &str,
    name: &str,
    value: &[u8],
    expected: Option<u64>,
) -> Result<(u64, bool), Status> {
    let r = c.put_credential(keyed(put_req(name, value, expected), key)).await?;
    let replayed = r.metadata().get(REPLAY_HEADER).is_some();
    Ok((r.into_inner().version, replayed))
}

async fn key_rows(raw: &Raw) -> i64 {
    let q = "SELECT COUNT(*) FROM idempotency_keys";
    match raw {
        Raw::Pg(p) => sqlx::query_scalar(q).fetch_one(p).await.unwrap(),
        Raw::Sqlite(p) => sqlx::query_scalar(q).fetch_one(p).await.unwrap(),
    }
}

both_backends!(
    a_lost_compare_and_set_retried_with_its_key_gets_its_version,
    a_key_reused_for_another_request_is_refused,
    deletes_and_rotations_replay_their_first_result,
    keys_belong_to_their_token,
    bad_keys_are_refused,
    expired_keys_are_pruned_in_small_batches,
    batches_replay_their_first_results,
);

/// The motivating case: the write landed, its answer was lost; without a key the retry
/// is a conflict, with one it is the original answer.
async fn a_lost_compare_and_set_retried_with_its_key_gets_its_version(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "idem/db", b"v1", None).await.unwrap();

    // Without a key: the retry of a compare-and-set that landed cannot tell it landed.
    put(&mut c, "idem/plain", b"v1", None).await.unwrap();
    put(&mut c, "idem/plain", b"v2", Some(1)).await.unwrap();
    assert_status(put(&mut c, "idem/plain", b"v2", Some(1)).await, Code::Aborted, "current version is 2");

    // With a key: the first attempt writes version 2 (its answer is "lost")...
    assert_eq!(put_keyed(&mut c, "k-1", "idem/db", b"v2", Some(1)).await.unwrap(), (2, false));
    // ...and every retry gets that same version 2, marked as a replay, not a conflict.
    for _ in 0..3 {
        assert_eq!(put_keyed(&mut c, "k-1", "idem/db", b"v2", Some(1)).await.unwrap(), (2, true));
    }
    // Nothing was written twice.
    assert_eq!(get(&mut c, "idem/db", None).await.unwrap(), (2, b"v2".to_vec()));
    // The same goes for an unconditional put and a create-only one.
    assert_eq!(put_keyed(&mut c, "k-2", "idem/db", b"v3", None).await.unwrap(), (3, false));
    assert_eq!(put_keyed(&mut c, "k-2", "idem/db", b"v3", None).await.unwrap(), (3, true));
    assert_eq!(put_keyed(&mut c, "k-3", "idem/new", b"n1", Some(0)).await.unwrap(), (1, false));
    assert_eq!(put_keyed(&mut c, "k-3", "idem/new", b"n1", Some(0)).await.unwrap(), (1, true));
    assert_eq!(get(&mut c, "idem/db", None).await.unwrap(), (3, b"v3".to_vec()));
    // A failed write stores no key: its retry is tried again (and fails again).
    assert_status(put_keyed(&mut c, "k-4", "idem/db", b"v9", Some(1)).await, Code::Aborted, "current version is 3");
    assert_status(put_keyed(&mut c, "k-4", "idem/db", b"v9", Some(1)).await, Code::Aborted, "current version is 3");
    // The stored keys hold no value.
    let raw = env.raw().await;
    assert_eq!(key_rows(&raw).await, 3);
    d.stop().await;
}

async fn a_key_reused_for_another_request_is_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    assert_eq!(put_keyed(&mut c, "same", "idem/a", b"one", None).await.unwrap(), (1, false));
    let needle = "idempotency key \"same\" was already used by this token for a different request";
    // Another value, another expected version, another name, another RPC: all refused.
    assert_status(put_keyed(&mut c, "same", "idem/a", b"two", None).await, Code::FailedPrecondition, needle);
    assert_status(put_keyed(&mut c, "same", "idem/a", b"one", Some(1)).await, Code::FailedPrecondition, needle);
    assert_status(put_keyed(&mut c, "same", "idem/b", b"one", None).await, Code::FailedPrecondition, needle);
    let del = DeleteCredentialRequest { name: "idem/a".into(), expected_version: None };
    assert_status(c.delete_credential(keyed(del, "same")).await, Code::FailedPrecondition, needle);
    let mut admin = d.admin().await;
    let rot = RotateCredentialRequest {
        name: "idem/a".into(),
        source: Some(rotate_credential_request::Source::Value(b"one".to_vec())),
        grace_period: None,
        expected_version: None,
    };
    assert_status(admin.rotate_credential(keyed(rot, "same")).await, Code::FailedPrecondition, needle);
    // Metadata is part of the request too.
    let mut with_meta = put_req("idem/a", b"one", None);
    with_meta.metadata = Some(credvault::proto::Metadata { owner: "team".into(), ..Default::default() });
    assert_status(c.put_credential(keyed(with_meta, "same")).await, Code::FailedPrecondition, needle);
    // Nothing of it was written; the original request still replays.
    assert_eq!(get(&mut c, "idem/a", None).await.unwrap(), (1, b"one".to_vec()));
    assert_status(get(&mut c, "idem/b", None).await, Code::NotFound, "not found");
    assert_eq!(put_keyed(&mut c, "same", "idem/a", b"one", None).await.unwrap(), (1, true));
    d.stop().await;
}

async fn deletes_and_rotations_replay_their_first_result(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let mut admin = d.admin().await;
    put(&mut c, "idem/rot", b"v1", None).await.unwrap();
    let rotate = || RotateCredentialRequest {
        name: "idem/rot".into(),
        source: Some(rotate_credential_request::Source::Password(PasswordSpec {
            length: 24,
            lowercase: true,
            digits: true,
            ..Default::default()
        })),
        grace_period: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
        expected_version: Some(1),
    };
    let first = admin.rotate_credential(keyed(rotate(), "rot-1")).await.unwrap();
    assert!(first.metadata().get(REPLAY_HEADER).is_none());
    let first = first.into_inner();
    assert_eq!((first.version, first.previous_version), (2, 1));
    let (_, value) = get(&mut c, "idem/rot", None).await.unwrap();
    // A replay generates nothing: same version, same grace end, same value.
    let again = admin.rotate_credential(keyed(rotate(), "rot-1")).await.unwrap();
    assert_eq!(again.metadata().get(REPLAY_HEADER).map(|v| v.to_str().unwrap()), Some("1"));
    assert_eq!(again.into_inner(), first);
    assert_eq!(get(&mut c, "idem/rot", None).await.unwrap(), (2, value));

    let del = || DeleteCredentialRequest { name: "idem/rot".into(), expected_version: Some(2) };
    let gone = c.delete_credential(keyed(del(), "del-1")).await.unwrap().into_inner();
    assert_eq!(gone.version, 2);
    // Without a key a repeated delete is NOT_FOUND; with it, the first answer.
    let plain = c.delete_credential(DeleteCredentialRequest { name: "idem/rot".into(), expected_version: Some(2) });
    assert_status(plain.await, Code::NotFound, "already deleted");
    let replay = c.delete_credential(keyed(del(), "del-1")).await.unwrap();
    assert!(replay.metadata().get(REPLAY_HEADER).is_some());
    assert_eq!(replay.into_inner(), gone);
    d.stop().await;
}

async fn keys_belong_to_their_token(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let (token, _) =
        create_token(&d, "other", vec![rule("idem/**", &[Capability::Write, Capability::Read], false)], 0, None).await;
    let mut root = d.client().await;
    let mut other = client_with(&d, &token).await;
    assert_eq!(put_keyed(&mut root, "shared", "idem/t", b"r1", None).await.unwrap(), (1, false));
    // The same key from another token is another key: its write happens.
    assert_eq!(put_keyed(&mut other, "shared", "idem/t", b"r1", None).await.unwrap(), (2, false));
    assert_eq!(put_keyed(&mut other, "shared", "idem/t", b"r1", None).await.unwrap(), (2, true));
    assert_eq!(put_keyed(&mut root, "shared", "idem/t", b"r1", None).await.unwrap(), (1, true));
    // A key never lets a caller write what its policy forbids.
    let denied = put_keyed(&mut other, "shared-2", "elsewhere/x", b"x", None).await;
    assert_status(denied, Code::PermissionDenied, "may not write");
    d.stop().await;
}

async fn bad_keys_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let mut admin = d.admin().await;
    put(&mut c, "idem/bad", b"v1", None).await.unwrap();
    let too_long = "k".repeat(129);
    let needle = "idempotency key must be 1-128 visible ASCII characters";
    for key in ["", "with space", too_long.as_str(), "tab\tkey"] {
        assert_status(put_keyed(&mut c, key, "idem/bad", b"v2", None).await, Code::InvalidArgument, needle);
        let del = DeleteCredentialRequest { name: "idem/bad".into(), expected_version: None };
        assert_status(c.delete_credential(keyed(del, key)).await, Code::InvalidArgument, needle);
        let rot = RotateCredentialRequest {
            name: "idem/bad".into(),
            source: Some(rotate_credential_request::Source::Value(b"v3".to_vec())),
            grace_period: None,
            expected_version: None,
        };
        assert_status(admin.rotate_credential(keyed(rot, key)).await, Code::InvalidArgument, needle);
    }
    // Exactly 128 characters is fine.
    assert_eq!(put_keyed(&mut c, &"k".repeat(128), "idem/bad", b"v2", None).await.unwrap(), (2, false));
    // Bad requests stay bad with a key, and store no key.
    assert_status(put_keyed(&mut c, "b-1", "idem/bad", b"", None).await, Code::InvalidArgument, "must not be empty");
    assert_status(put_keyed(&mut c, "b-2", "../x", b"v", None).await, Code::InvalidArgument, "");
    let out_of_range = put_keyed(&mut c, "b-3", "idem/bad", b"v", Some(u64::MAX)).await;
    assert_status(out_of_range, Code::InvalidArgument, "out of range");
    let missing = DeleteCredentialRequest { name: "idem/none".into(), expected_version: None };
    assert_status(c.delete_credential(keyed(missing, "b-4")).await, Code::NotFound, "not found");
    assert_eq!(key_rows(&env.raw().await).await, 1);
    assert_eq!(get(&mut c, "idem/bad", None).await.unwrap(), (2, b"v2".to_vec()));
    d.stop().await;
}

/// Keys outlive their window only until the pruner's next batch; the pruner runs on the
/// clock it is given, here one that the test moves.
async fn expired_keys_are_pruned_in_small_batches(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut short = env.settings();
    short.limits.idempotency_window_seconds = 60;
    let d = TestDaemon::start(short, None).await;
    let mut c = d.client().await;
    for i in 0..5 {
        put_keyed(&mut c, &format!("short-{i}"), "idem/p", b"v", None).await.unwrap();
    }
    let token = d.token.clone();
    let raw = env.raw().await;
    d.stop().await;
    let mut long = env.settings();
    long.limits.idempotency_window_seconds = 7200;
    let d = TestDaemon::start(long, Some(&token)).await;
    let mut c = d.client().await;
    for i in 0..2 {
        put_keyed(&mut c, &format!("long-{i}"), "idem/p", b"v", None).await.unwrap();
    }
    assert_eq!(key_rows(&raw).await, 7);

    let now = credvault::store::now_micros();
    let clock = Arc::new(AtomicI64::new(now + 3600 * 1_000_000));
    let read = clock.clone();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let pruner = tokio::spawn(credvault::vault::prune_idempotency_keys(
        env.store().await,
        Arc::new(move || read.load(Ordering::SeqCst)),
        2,
        Duration::from_millis(10),
        stopped,
    ));
    // An hour on: the five short keys go (in batches of two), the long ones stay.
    crate::helpers::eventually("short keys pruned", Duration::from_secs(10), async || key_rows(&raw).await == 2).await;
    assert_eq!(put_keyed(&mut c, "long-0", "idem/p", b"v", None).await.unwrap(), (6, true));
    // An expired key is a new key: the same request writes again.
    let new_version = put_keyed(&mut c, "short-0", "idem/p", b"v", None).await.unwrap();
    assert_eq!(new_version, (8, false));
    // Three hours on: everything goes.
    clock.store(now + 3 * 3600 * 1_000_000, Ordering::SeqCst);
    crate::helpers::eventually("all keys pruned", Duration::from_secs(10), async || key_rows(&raw).await == 0).await;
    let _ = stop.send(true);
    tokio::time::timeout(Duration::from_secs(5), pruner).await.expect("pruner stops").unwrap();
    d.stop().await;
}

/// Two daemons over one PostgreSQL: a retry sent to the other daemon is answered from
/// the key, and the same keyed request sent to both at once is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_work_across_daemons() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    put(&mut ca, "idem/x", b"v1", None).await.unwrap();
    assert_eq!(put_keyed(&mut ca, "cross", "idem/x", b"v2", Some(1)).await.unwrap(), (2, false));
    assert_eq!(put_keyed(&mut cb, "cross", "idem/x", b"v2", Some(1)).await.unwrap(), (2, true));
    // Races: each key sent to both daemons at the same time, unconditionally.
    for round in 0..10u64 {
        let key = format!("race-{round}");
        let value = format!("r{round}");
        let (ra, rb) = tokio::join!(
            put_keyed(&mut ca, &key, "idem/x", value.as_bytes(), None),
            put_keyed(&mut cb, &key, "idem/x", value.as_bytes(), None)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.0, rb.0, "round {round}: both answers name the one version written");
        assert_eq!(ra.0, 3 + round, "round {round}: exactly one version per key");
        assert_eq!([ra.1, rb.1].iter().filter(|replayed| !**replayed).count(), 1, "round {round}: one wrote");
    }
    assert_eq!(get(&mut ca, "idem/x", None).await.unwrap(), (12, b"r9".to_vec()));
    // The same for keyed batches: each sent to both daemons at once is applied once.
    for round in 0..5u64 {
        let key = format!("batch-race-{round}");
        let value = format!("b{round}");
        let writes: [Write<'_>; 2] =
            [("idem/x", Some(value.as_bytes()), None), ("idem/y", Some(value.as_bytes()), None)];
        let (ra, rb) =
            tokio::join!(write_keyed(&mut ca, &key, batch(&writes)), write_keyed(&mut cb, &key, batch(&writes)));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.0, rb.0, "round {round}: both answers name the versions written");
        assert_eq!(ra.0[0].1, 13 + round, "round {round}: exactly one version per key");
        assert_eq!(ra.0[1].1, 1 + round);
        assert_eq!([ra.1, rb.1].iter().filter(|replayed| !**replayed).count(), 1, "round {round}: one wrote");
    }
    assert_eq!(get(&mut ca, "idem/y", None).await.unwrap(), (5, b"b4".to_vec()));
    a.stop().await;
    b.stop().await;
}

/// Keyed writes are counted by outcome: written, replayed, refused (the key of another
/// request) and failed (the write itself failed; nothing stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_writes_are_counted_by_outcome() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let before = scrape(&d).await;
    put_keyed(&mut c, "count-1", "count/x", b"v1", None).await.unwrap();
    put_keyed(&mut c, "count-1", "count/x", b"v1", None).await.unwrap();
    put_keyed(&mut c, "count-1", "count/x", b"v2", None).await.unwrap_err();
    put_keyed(&mut c, "count-2", "count/x", b"v2", Some(7)).await.unwrap_err();
    let after = scrape(&d).await;
    // Metrics are process-wide and other tests run in parallel: compare growth.
    for outcome in ["written", "replayed", "refused", "failed"] {
        let series = format!(r#"credvault_idempotent_writes_total{{rpc="PutCredential",outcome="{outcome}"}}"#);
        let grew = series_value(&after, &series) - series_value(&before, &series);
        assert!(grew >= 1.0, "{series}: +{grew}");
    }
    assert!(
        after.contains("# TYPE credvault_idempotency_keys_pruned_total counter"),
        "the pruner's counter is exported"
    );
    d.stop().await;
}

/// One write of a batch: a name, the value to put (`None`: a delete), the expected version.
type Write<'a> = (&'a str, Option<&'a [u8]>, Option<u64>);

fn batch(writes: &[Write<'_>]) -> WriteCredentialsRequest {
    WriteCredentialsRequest {
        writes: writes
            .iter()
            .map(|(name, value, expected)| CredentialWrite {
                op: Some(match value {
                    Some(v) => credential_write::Op::Put(put_req(name, v, *expected)),
                    None => credential_write::Op::Delete(DeleteCredentialRequest {
                        name: (*name).into(),
                        expected_version: *expected,
                    }),
                }),
            })
            .collect(),
    }
}

/// A keyed batch: each write's (name, version, deleted), and whether it was a replay.
async fn write_keyed(
    c: &mut Client,
    key: &str,
    req: WriteCredentialsRequest,
) -> Result<(Vec<(String, u64, bool)>, bool), Status> {
    let r = c.write_credentials(keyed(req, key)).await?;
    let replayed = r.metadata().get(REPLAY_HEADER).is_some();
    Ok((r.into_inner().results.into_iter().map(|w| (w.name, w.version, w.deleted)).collect(), replayed))
}

/// `WriteCredentials` under a key: a retry gets every write's first result and writes
/// nothing; without the key the same retry fails; the key with another batch is
/// refused; a batch that failed stores no key.
async fn batches_replay_their_first_results(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "wb/a", b"a1", None).await.unwrap();
    put(&mut c, "wb/c", b"c1", None).await.unwrap();
    let raw = env.raw().await;
    let keys_before = key_rows(&raw).await;
    let writes: [Write<'_>; 3] = [("wb/a", Some(b"a2"), Some(1)), ("wb/b", Some(b"b1"), None), ("wb/c", None, None)];
    let want = vec![("wb/a".to_owned(), 2, false), ("wb/b".to_owned(), 1, false), ("wb/c".to_owned(), 1, true)];
    assert_eq!(write_keyed(&mut c, "batch-1", batch(&writes)).await.unwrap(), (want.clone(), false));
    // The answer was lost; the retry with its key gets it, and nothing is written again.
    assert_eq!(write_keyed(&mut c, "batch-1", batch(&writes)).await.unwrap(), (want, true));
    assert_eq!(get(&mut c, "wb/a", None).await.unwrap(), (2, b"a2".to_vec()));
    assert_eq!(get(&mut c, "wb/b", None).await.unwrap(), (1, b"b1".to_vec()));
    assert_eq!(key_rows(&raw).await, keys_before + 1);
    // Without a key the same retry fails: wb/c is deleted already (and wb/a has moved on).
    assert_status(c.write_credentials(batch(&writes)).await, Code::NotFound, "already deleted");
    // The key with another batch: refused, nothing written.
    let other: [Write<'_>; 1] = [("wb/b", Some(b"b2"), None)];
    assert_status(write_keyed(&mut c, "batch-1", batch(&other)).await, Code::FailedPrecondition, "different request");
    assert_eq!(get(&mut c, "wb/b", None).await.unwrap().0, 1);
    // A batch that conflicts stores no key: the corrected batch runs under it.
    let stale: [Write<'_>; 1] = [("wb/a", Some(b"a3"), Some(1))];
    assert_status(write_keyed(&mut c, "batch-2", batch(&stale)).await, Code::Aborted, "expected version 1");
    assert_eq!(key_rows(&raw).await, keys_before + 1);
    let fixed: [Write<'_>; 1] = [("wb/a", Some(b"a3"), Some(2))];
    let (results, replayed) = write_keyed(&mut c, "batch-2", batch(&fixed)).await.unwrap();
    assert_eq!((results, replayed), (vec![("wb/a".to_owned(), 3, false)], false));
    // Bad batches are refused as such, before any key is consulted.
    assert_status(
        write_keyed(&mut c, "batch-1", WriteCredentialsRequest { writes: vec![] }).await,
        Code::InvalidArgument,
        "no writes",
    );
    // The library's keyed batch retries safely and reports the replay.
    let lib = crate::client::client(&d).await;
    let writes = vec![credvault::client::BatchWrite::Put {
        name: "wb/lib".into(),
        value: b"l1".to_vec(),
        expected_version: Some(0),
    }];
    let (first, replayed) = lib.write_many_idempotent("batch-lib", &writes).await.unwrap();
    assert!(!replayed);
    let (again, replayed) = lib.write_many_idempotent("batch-lib", &writes).await.unwrap();
    assert!(replayed);
    assert_eq!(first, again);
    raw.close().await;
    d.stop().await;
}
