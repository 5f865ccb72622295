//! WriteCredentials: several puts and deletes in one transaction, all or nothing; every
//! conflict named with its current version; one change event and one audit event per name.

use std::time::Duration;

use prost::Message as _;
use tokio_stream::StreamExt as _;
use tonic::Code;

use credvault::proto::{
    credential_write::Op, Capability, CredentialWrite, DeleteCredentialRequest, EventKind, ListAuditEventsRequest,
    PutCredentialRequest, WatchCredentialsRequest, WriteConflicts, WriteCredentialsRequest,
};
use credvault::service::WRITE_CONFLICTS_TRAILER;

use crate::both_backends;
use crate::helpers::{
    assert_status, client_with, create_token, eventually, get, put, rule, Backend, TestDaemon, TestEnv,
};

fn put_op(name: &str, value: &[u8], expected: Option<u64>) -> CredentialWrite {
    CredentialWrite {
        op: Some(Op::Put(PutCredentialRequest {
            name: name.into(),
            value: value.to_vec(),
            expected_version: expected,
            metadata: None,
        })),
    }
}

fn delete_op(name: &str, expected: Option<u64>) -> CredentialWrite {
    CredentialWrite { op: Some(Op::Delete(DeleteCredentialRequest { name: name.into(), expected_version: expected })) }
}

fn request(writes: Vec<CredentialWrite>) -> WriteCredentialsRequest {
    WriteCredentialsRequest { writes }
}

both_backends!(
    puts_and_deletes_apply_together,
    a_conflict_writes_nothing_and_names_every_conflict,
    bad_batches_are_refused,
    concurrent_batches_lose_no_update,
);

async fn puts_and_deletes_apply_together(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "db/user", b"alice", None).await.unwrap();
    put(&mut c, "db/old", b"legacy", None).await.unwrap();
    let mut events = c.watch_credentials(WatchCredentialsRequest { prefix: "db/".into() }).await.unwrap().into_inner();

    let writes = vec![
        put_op("db/user", b"bob", Some(1)),
        put_op("db/password", b"s3cret", Some(0)),
        delete_op("db/old", Some(1)),
    ];
    let r = c.write_credentials(request(writes)).await.unwrap().into_inner();
    let got: Vec<(&str, u64, bool)> = r.results.iter().map(|r| (r.name.as_str(), r.version, r.deleted)).collect();
    assert_eq!(got, [("db/user", 2, false), ("db/password", 1, false), ("db/old", 1, true)]);
    assert_eq!(get(&mut c, "db/user", None).await.unwrap(), (2, b"bob".to_vec()));
    assert_eq!(get(&mut c, "db/password", None).await.unwrap(), (1, b"s3cret".to_vec()));
    assert_status(get(&mut c, "db/old", None).await, Code::NotFound, "deleted");

    // One change event per name.
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("event").unwrap().unwrap();
        seen.push((e.name, e.kind, e.version));
    }
    seen.sort();
    let put_kind = EventKind::Put as i32;
    let expected = [
        ("db/old".to_owned(), EventKind::Delete as i32, 1),
        ("db/password".to_owned(), put_kind, 1),
        ("db/user".to_owned(), put_kind, 2),
    ];
    assert_eq!(seen, expected);

    // One audit event per name, each with its version.
    let mut admin = d.admin().await;
    let mut audited = Vec::new();
    eventually("batch audited", Duration::from_secs(5), async || {
        let all = admin.list_audit_events(ListAuditEventsRequest { limit: 1000 }).await.unwrap().into_inner().events;
        audited = all
            .into_iter()
            .filter(|e| e.rpc == "WriteCredentials")
            .map(|e| (e.credential, e.version, e.code))
            .collect::<Vec<_>>();
        audited.len() >= 3
    })
    .await;
    audited.sort();
    let ok = |n: &str, v: u64| (n.to_owned(), v, "OK".to_owned());
    assert_eq!(audited, [ok("db/old", 1), ok("db/password", 1), ok("db/user", 2)]);
    d.stop().await;
}

async fn a_conflict_writes_nothing_and_names_every_conflict(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "tls/key", b"k1", None).await.unwrap();
    put(&mut c, "tls/key", b"k2", None).await.unwrap();
    put(&mut c, "tls/cert", b"c1", None).await.unwrap();
    put(&mut c, "tls/chain", b"ch1", None).await.unwrap();
    put(&mut c, "tls/gone", b"g1", None).await.unwrap();
    c.delete_credential(DeleteCredentialRequest { name: "tls/gone".into(), expected_version: None }).await.unwrap();
    let writes = vec![
        put_op("tls/key", b"k3", Some(1)),    // stale: current is 2
        put_op("tls/cert", b"c2", Some(1)),   // matches, but must not be written alone
        put_op("tls/ca", b"ca", Some(3)),     // does not exist
        put_op("tls/chain", b"ch2", Some(0)), // exists
        delete_op("tls/gone", Some(1)),       // deleted already
        put_op("tls/free", b"f", None),       // unconditional
    ];
    let s = c.write_credentials(request(writes)).await.expect_err("conflict");
    assert_eq!(s.code(), Code::Aborted, "{}", s.message());
    for needle in [
        "version conflict on 4 of the writes, so none was applied",
        "\"tls/key\": expected version 1, current version is 2",
        "\"tls/ca\": expected version 3, it does not exist",
        "\"tls/chain\": expected it not to exist, current version is 1",
        "\"tls/gone\": expected version 1, current version is 1 (deleted)",
    ] {
        assert!(s.message().contains(needle), "{:?} lacks {needle:?}", s.message());
    }
    assert!(!s.message().contains("tls/cert") && !s.message().contains("tls/free"), "{}", s.message());
    // The same, machine-readable, in request order.
    let bytes = s.metadata().get_bin(WRITE_CONFLICTS_TRAILER).expect("conflicts trailer").to_bytes().unwrap();
    let detail = WriteConflicts::decode(bytes).unwrap();
    let found: Vec<(&str, u64, Option<u64>, bool)> =
        detail.conflicts.iter().map(|c| (c.name.as_str(), c.expected_version, c.current_version, c.deleted)).collect();
    assert_eq!(
        found,
        [
            ("tls/key", 1, Some(2), false),
            ("tls/ca", 3, None, false),
            ("tls/chain", 0, Some(1), false),
            ("tls/gone", 1, Some(1), true)
        ]
    );
    // Nothing was written.
    assert_eq!(get(&mut c, "tls/key", None).await.unwrap(), (2, b"k2".to_vec()));
    assert_eq!(get(&mut c, "tls/cert", None).await.unwrap(), (1, b"c1".to_vec()));
    assert_eq!(get(&mut c, "tls/chain", None).await.unwrap(), (1, b"ch1".to_vec()));
    assert_status(get(&mut c, "tls/ca", None).await, Code::NotFound, "not found");
    assert_status(get(&mut c, "tls/free", None).await, Code::NotFound, "not found");
    // Fixed up, the same set goes through.
    let writes = vec![put_op("tls/key", b"k3", Some(2)), put_op("tls/cert", b"c2", Some(1))];
    let r = c.write_credentials(request(writes)).await.unwrap().into_inner();
    assert_eq!(r.results.iter().map(|r| r.version).collect::<Vec<_>>(), [3, 2]);
    d.stop().await;
}

async fn bad_batches_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.limits.max_write_batch_size = 3;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "bad/a", b"a1", None).await.unwrap();
    let mut run = async |writes: Vec<CredentialWrite>| c.write_credentials(request(writes)).await;
    assert_status(run(vec![]).await, Code::InvalidArgument, "no writes given");
    let four = (0..4).map(|i| put_op(&format!("bad/n{i}"), b"v", None)).collect();
    assert_status(run(four).await, Code::InvalidArgument, "4 writes; the limit is 3");
    let twice = vec![put_op("bad/a", b"x", None), delete_op("bad/a", None)];
    assert_status(run(twice).await, Code::InvalidArgument, "\"bad/a\" is written more than once");
    assert_status(run(vec![put_op("bad/../a", b"x", None)]).await, Code::InvalidArgument, "");
    let empty = vec![put_op("bad/b", b"x", None), put_op("bad/c", b"", None)];
    assert_status(run(empty).await, Code::InvalidArgument, "write of \"bad/c\": value must not be empty");
    let huge = vec![put_op("bad/b", &vec![7u8; 64 * 1024 + 1], None)];
    assert_status(run(huge).await, Code::InvalidArgument, "the limit is 65536");
    let neither = vec![put_op("bad/b", b"x", None), CredentialWrite { op: None }];
    assert_status(run(neither).await, Code::InvalidArgument, "write 1 is neither a put nor a delete");
    let range = vec![put_op("bad/a", b"x", Some(u64::MAX))];
    assert_status(run(range).await, Code::InvalidArgument, "out of range");
    let missing = vec![put_op("bad/b", b"x", None), delete_op("bad/none", None)];
    assert_status(run(missing).await, Code::NotFound, "credential \"bad/none\" not found");
    let mut bad_label = PutCredentialRequest { name: "bad/b".into(), value: b"x".to_vec(), ..Default::default() };
    bad_label.metadata = Some(credvault::proto::Metadata {
        labels: [("Upper".to_owned(), "x".to_owned())].into_iter().collect(),
        ..Default::default()
    });
    let labelled = vec![CredentialWrite { op: Some(Op::Put(bad_label)) }];
    assert_status(run(labelled).await, Code::InvalidArgument, "label key");

    // Capabilities per write: write for a put, delete for a delete; one refusal refuses all.
    let rules = vec![rule("bad/**", &[Capability::Write, Capability::Read], false)];
    let (token, _) = create_token(&d, "writer", rules, 0, None).await;
    let mut w = client_with(&d, &token).await;
    let outside = vec![put_op("bad/b", b"x", None), put_op("other/x", b"x", None)];
    assert_status(w.write_credentials(request(outside)).await, Code::PermissionDenied, "may not write \"other/x\"");
    let del = vec![put_op("bad/b", b"x", None), delete_op("bad/a", None)];
    assert_status(w.write_credentials(request(del)).await, Code::PermissionDenied, "may not delete \"bad/a\"");
    let mut anonymous = credvault::proto::credential_service_client::CredentialServiceClient::new(d.channel().await);
    let unauth = anonymous.write_credentials(request(vec![put_op("bad/b", b"x", None)])).await;
    assert_status(unauth, Code::Unauthenticated, "");
    // None of it was written.
    assert_eq!(get(&mut c, "bad/a", None).await.unwrap(), (1, b"a1".to_vec()));
    assert_status(get(&mut c, "bad/b", None).await, Code::NotFound, "not found");
    d.stop().await;
}

/// Unconditional batches from many callers over the same names: every batch lands whole
/// (the versions of the two names move together), none is lost.
async fn concurrent_batches_lose_no_update(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut tasks = Vec::new();
    for t in 0..6 {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..5 {
                let v = format!("{t}-{i}");
                let writes = vec![put_op("pair/user", v.as_bytes(), None), put_op("pair/pass", v.as_bytes(), None)];
                c.write_credentials(request(writes)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut c = d.client().await;
    let (vu, user) = get(&mut c, "pair/user", None).await.unwrap();
    let (vp, pass) = get(&mut c, "pair/pass", None).await.unwrap();
    assert_eq!((vu, vp), (30, 30));
    assert_eq!(user, pass, "the last batch wrote both");
    d.stop().await;
}
