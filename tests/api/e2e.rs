//! End to end: the real daemon on port 0, driven by a tonic client.

use std::collections::HashMap;

use tonic::Code;

use credvault::proto::{
    self, batch_get_result, BatchGetCredentialsRequest, DeleteCredentialRequest, GetCredentialMetadataRequest,
    GetStatusRequest, ListCredentialsRequest, PutCredentialRequest,
};

use crate::both_backends;
use crate::helpers::{assert_status, get, put, Backend, TestDaemon, TestEnv};

both_backends!(crud_over_grpc, restart_reads_everything_back, list_pages_over_grpc);

async fn crud_over_grpc(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;

    assert_eq!(put(&mut c, "svc/db/password", b"hunter2", Some(0)).await.unwrap(), 1);
    let meta = proto::Metadata {
        labels: HashMap::from([("team".to_owned(), "db".to_owned())]),
        description: "primary".into(),
        owner: "dba".into(),
        expires_at: None,
    };
    let r = c
        .put_credential(PutCredentialRequest {
            name: "svc/db/password".into(),
            value: b"hunter3".to_vec(),
            expected_version: Some(1),
            metadata: Some(meta.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.version, 2);
    assert_eq!(get(&mut c, "svc/db/password", None).await.unwrap(), (2, b"hunter3".to_vec()));
    assert_eq!(get(&mut c, "svc/db/password", Some(1)).await.unwrap(), (1, b"hunter2".to_vec()));
    assert_eq!(get(&mut c, "svc/db/password", Some(0)).await.unwrap().0, 2, "version 0 means current");

    let m = c
        .get_credential_metadata(GetCredentialMetadataRequest { name: "svc/db/password".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.current_version, 2);
    assert_eq!(m.metadata, Some(meta));
    let states: Vec<(u64, i32)> = m.versions.iter().map(|v| (v.version, v.state)).collect();
    assert_eq!(states, vec![(2, proto::VersionState::Current as i32), (1, proto::VersionState::Previous as i32)]);

    put(&mut c, "svc/api/key", b"k", None).await.unwrap();
    let b = c
        .batch_get_credentials(BatchGetCredentialsRequest {
            names: vec!["svc/api/key".into(), "svc/missing".into(), "svc/db/password".into(), "svc/api/key".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let outcomes: Vec<Result<Vec<u8>, i32>> = b
        .results
        .iter()
        .map(|r| match r.result.as_ref().unwrap() {
            batch_get_result::Result::Credential(v) => Ok(v.value.clone()),
            batch_get_result::Result::Error(e) => Err(e.code),
        })
        .collect();
    assert_eq!(
        outcomes,
        vec![Ok(b"k".to_vec()), Err(Code::NotFound as i32), Ok(b"hunter3".to_vec()), Ok(b"k".to_vec())]
    );
    assert_eq!(b.results[1].name, "svc/missing");

    let del = c
        .delete_credential(DeleteCredentialRequest { name: "svc/api/key".into(), expected_version: Some(1) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.version, 1);
    assert!(del.deleted_at.is_some());
    assert_status(get(&mut c, "svc/api/key", None).await, Code::NotFound, "deleted");
    // Create-only put revives a deleted credential; versions continue.
    assert_eq!(put(&mut c, "svc/api/key", b"k2", Some(0)).await.unwrap(), 2);

    let mut admin = d.admin().await;
    let s = admin.get_status(GetStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.storage_backend, if backend == Backend::Postgres { "postgres" } else { "sqlite" });
    assert!(s.storage_healthy);
    assert_eq!((s.credentials, s.active_kek_id, s.master_key_source.as_str()), (2, 1, "key-file"));

    // Health and reflection are served without a token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest { service: "credvault.v1.CredentialService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(h.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    d.stop().await;
}

async fn restart_reads_everything_back(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let token = d.token.clone();
    let mut c = d.client().await;
    let mut expected = Vec::new();
    for i in 0..20u32 {
        let name = format!("restart/{i:02}");
        let value = format!("value-{i}-{}", "x".repeat(i as usize * 10)).into_bytes();
        put(&mut c, &name, &value, None).await.unwrap();
        expected.push((name, value));
    }
    put(&mut c, "restart/00", b"second", Some(1)).await.unwrap();
    d.stop().await;

    let d = TestDaemon::start(env.settings(), Some(&token)).await;
    let mut c = d.client().await;
    for (name, value) in &expected[1..] {
        assert_eq!(&get(&mut c, name, None).await.unwrap().1, value, "{name}");
    }
    assert_eq!(get(&mut c, "restart/00", None).await.unwrap(), (2, b"second".to_vec()));
    assert_eq!(get(&mut c, "restart/00", Some(1)).await.unwrap().1, expected[0].1);
    d.stop().await;
}

async fn list_pages_over_grpc(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    for i in 0..25 {
        put(&mut c, &format!("list/{i:02}"), b"v", None).await.unwrap();
    }
    put(&mut c, "other/x", b"v", None).await.unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let r = c
            .list_credentials(ListCredentialsRequest {
                prefix: "list/".into(),
                page_size: 10,
                page_token: token,
                include_deleted: false,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(r.credentials.into_iter().map(|m| m.name));
        if pages == 1 {
            // A name inserted behind the cursor must not show up; one ahead must.
            put(&mut c, "list/00a", b"v", None).await.unwrap();
            put(&mut c, "list/99", b"v", None).await.unwrap();
        }
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    let mut want: Vec<String> = (0..25).map(|i| format!("list/{i:02}")).collect();
    want.push("list/99".into());
    assert_eq!(seen, want);
    assert_eq!(pages, 3);
    d.stop().await;
}
