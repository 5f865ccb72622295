//! Version numbers at the edge of their range: `expected_version = u64::MAX` (or
//! anything above what the store can hold) is a clear INVALID_ARGUMENT on every RPC that
//! takes one, never an overflow; explicit versions out of range are simply absent.

use tonic::Code;

use credvault::proto::{
    rotate_credential_request, DeleteCredentialRequest, DestroyVersionRequest, RotateCredentialRequest,
};

use crate::both_backends;
use crate::helpers::{assert_status, get, put, Backend, TestDaemon, TestEnv};

both_backends!(versions_out_of_range_are_refused);

async fn versions_out_of_range_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let mut admin = d.admin().await;
    put(&mut c, "edge/one", b"v1", None).await.unwrap();
    let too_big = u64::MAX;
    let beyond_store = i64::MAX as u64 + 1;
    let no_successor = i64::MAX as u64;
    for expected in [too_big, beyond_store, no_successor] {
        let needle = format!("expected_version {expected} is out of range");
        // On a name that exists and on one that does not: the range check comes first.
        for name in ["edge/one", "edge/absent"] {
            assert_status(put(&mut c, name, b"v2", Some(expected)).await, Code::InvalidArgument, &needle);
            let del =
                c.delete_credential(DeleteCredentialRequest { name: name.into(), expected_version: Some(expected) });
            assert_status(del.await, Code::InvalidArgument, &needle);
            let rot = admin.rotate_credential(RotateCredentialRequest {
                name: name.into(),
                source: Some(rotate_credential_request::Source::Value(b"v3".to_vec())),
                grace_period: None,
                expected_version: Some(expected),
            });
            assert_status(rot.await, Code::InvalidArgument, &needle);
        }
    }
    // Just below: a valid expectation that simply does not match.
    let max = i64::MAX as u64 - 1;
    assert_status(put(&mut c, "edge/one", b"v2", Some(max)).await, Code::Aborted, "current version is 1");
    let del = c.delete_credential(DeleteCredentialRequest { name: "edge/one".into(), expected_version: Some(max) });
    assert_status(del.await, Code::Aborted, "current version is 1");
    // Explicit versions far out of range name nothing.
    assert_status(get(&mut c, "edge/one", Some(u64::MAX)).await, Code::NotFound, "edge/one");
    let destroy = admin.destroy_version(DestroyVersionRequest { name: "edge/one".into(), version: u64::MAX });
    assert_status(destroy.await, Code::NotFound, "has no version 18446744073709551615");
    // Nothing changed.
    assert_eq!(get(&mut c, "edge/one", None).await.unwrap(), (1, b"v1".to_vec()));
    assert_status(get(&mut c, "edge/absent", None).await, Code::NotFound, "edge/absent");
    d.stop().await;
}
