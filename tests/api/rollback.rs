//! RollbackCredential: an older version's value becomes the new current version without
//! the caller reading it; the replaced version gets the usual grace period.

use tonic::Code;

use credvault::proto::{
    Capability, DeleteCredentialRequest, DestroyVersionRequest, GetCredentialMetadataRequest,
    RollbackCredentialRequest, VersionState,
};

use crate::both_backends;
use crate::helpers::{assert_status, client_with, create_token, get, put, rule, Backend, Client, TestDaemon, TestEnv};

async fn rollback(c: &mut Client, name: &str, to: u64, expected: Option<u64>) -> Result<(u64, u64), tonic::Status> {
    let req = RollbackCredentialRequest { name: name.into(), to_version: to, expected_version: expected };
    let r = c.rollback_credential(req).await?.into_inner();
    assert_eq!(r.to_version, to);
    Ok((r.version, r.previous_version))
}

both_backends!(an_old_value_comes_back_as_a_new_version, bad_rollbacks_are_refused);

async fn an_old_value_comes_back_as_a_new_version(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    for v in [b"good".as_slice(), b"better", b"broken"] {
        put(&mut c, "app/key", v, None).await.unwrap();
    }
    // A writer that may not read can still roll back: it never sees the value.
    let rules = vec![rule("app/**", &[Capability::Write], false)];
    let (token, _) = create_token(&d, "deployer", rules, 0, None).await;
    let mut writer = client_with(&d, &token).await;
    assert_status(get(&mut writer, "app/key", None).await, Code::PermissionDenied, "may not read");
    let before = credvault::store::now_micros();
    let req = RollbackCredentialRequest { name: "app/key".into(), to_version: 2, expected_version: Some(3) };
    let r = writer.rollback_credential(req).await.unwrap().into_inner();
    assert_eq!((r.version, r.to_version, r.previous_version), (4, 2, 3));
    assert_eq!(get(&mut c, "app/key", None).await.unwrap(), (4, b"better".to_vec()));
    // The replaced version keeps the usual grace period (the server default, an hour).
    let grace_end = r.previous_expires_at.unwrap();
    let grace_us = grace_end.seconds * 1_000_000 + i64::from(grace_end.nanos / 1000) - before;
    assert!((3_599_000_000..3_700_000_000).contains(&grace_us), "grace of {grace_us} us");
    assert_eq!(get(&mut c, "app/key", Some(3)).await.unwrap(), (3, b"broken".to_vec()));
    let m =
        c.get_credential_metadata(GetCredentialMetadataRequest { name: "app/key".into() }).await.unwrap().into_inner();
    let v3 = m.versions.iter().find(|v| v.version == 3).unwrap();
    assert_eq!(v3.state, VersionState::Previous as i32);
    assert_eq!(v3.expires_at, Some(grace_end));
    // Version 1 is older still and can come back too; unconditionally this time.
    assert_eq!(rollback(&mut c, "app/key", 1, None).await.unwrap(), (5, 4));
    assert_eq!(get(&mut c, "app/key", None).await.unwrap(), (5, b"good".to_vec()));
    d.stop().await;
}

async fn bad_rollbacks_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.limits.max_versions = 3;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    for i in 1..=4 {
        put(&mut c, "rb/x", format!("v{i}").as_bytes(), None).await.unwrap();
    }
    assert_status(rollback(&mut c, "rb/x", 0, None).await, Code::InvalidArgument, "to_version must be given");
    assert_status(rollback(&mut c, "rb/../x", 2, None).await, Code::InvalidArgument, "");
    assert_status(rollback(&mut c, "rb/x", 2, Some(0)).await, Code::InvalidArgument, "a rollback needs an existing");
    assert_status(rollback(&mut c, "rb/x", 2, Some(u64::MAX)).await, Code::InvalidArgument, "out of range");
    assert_status(rollback(&mut c, "rb/x", 4, None).await, Code::FailedPrecondition, "already the current version");
    // Pruned (only 3 kept) or never written.
    assert_status(rollback(&mut c, "rb/x", 1, None).await, Code::NotFound, "has no version 1");
    assert_status(rollback(&mut c, "rb/x", 9, None).await, Code::NotFound, "has no version 9");
    assert_status(rollback(&mut c, "rb/none", 1, None).await, Code::NotFound, "not found");
    assert_status(rollback(&mut c, "rb/x", 3, Some(2)).await, Code::Aborted, "current version is 4");
    let mut admin = d.admin().await;
    admin.destroy_version(DestroyVersionRequest { name: "rb/x".into(), version: 2 }).await.unwrap();
    assert_status(rollback(&mut c, "rb/x", 2, None).await, Code::FailedPrecondition, "destroyed");
    let rules = vec![rule("rb/**", &[Capability::Read, Capability::Rotate], false)];
    let (token, _) = create_token(&d, "reader", rules, 0, None).await;
    let mut reader = client_with(&d, &token).await;
    assert_status(rollback(&mut reader, "rb/x", 3, None).await, Code::PermissionDenied, "may not write");
    // Nothing above wrote anything.
    assert_eq!(get(&mut c, "rb/x", None).await.unwrap(), (4, b"v4".to_vec()));
    c.delete_credential(DeleteCredentialRequest { name: "rb/x".into(), expected_version: None }).await.unwrap();
    assert_status(rollback(&mut c, "rb/x", 3, None).await, Code::NotFound, "deleted");
    d.stop().await;
}
