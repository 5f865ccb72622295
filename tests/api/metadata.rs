//! UpdateCredentialMetadata: label patches under a metadata version of their own, with
//! compare-and-set; the value's version never moves.

use tonic::Code;

use credvault::proto::{
    Capability, CredentialMetadata, DeleteCredentialRequest, GetCredentialMetadataRequest, Metadata,
    PutCredentialRequest, UpdateCredentialMetadataRequest,
};

use crate::both_backends;
use crate::helpers::{assert_status, client_with, create_token, get, put, rule, Backend, Client, TestDaemon, TestEnv};

fn patch(name: &str) -> UpdateCredentialMetadataRequest {
    UpdateCredentialMetadataRequest { name: name.into(), ..Default::default() }
}

fn labels(m: &CredentialMetadata) -> Vec<(String, String)> {
    let mut l: Vec<_> = m.metadata.as_ref().unwrap().labels.clone().into_iter().collect();
    l.sort();
    l
}

async fn describe(c: &mut Client, name: &str) -> CredentialMetadata {
    c.get_credential_metadata(GetCredentialMetadataRequest { name: name.into() }).await.unwrap().into_inner()
}

fn pair(k: &str, v: &str) -> (String, String) {
    (k.to_owned(), v.to_owned())
}

both_backends!(labels_are_patched_under_their_own_version, bad_metadata_updates_are_refused);

async fn labels_are_patched_under_their_own_version(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let meta = Metadata {
        labels: [pair("team", "payments"), pair("env", "prod")].into_iter().collect(),
        owner: "alice".into(),
        ..Default::default()
    };
    let first = PutCredentialRequest {
        name: "meta/db".into(),
        value: b"v1".to_vec(),
        expected_version: None,
        metadata: Some(meta),
    };
    c.put_credential(first).await.unwrap();
    put(&mut c, "meta/db", b"v2", None).await.unwrap();
    let m = describe(&mut c, "meta/db").await;
    assert_eq!((m.current_version, m.metadata_version), (2, 1), "a put without metadata leaves it alone");

    let mut p = patch("meta/db");
    p.expected_metadata_version = Some(1);
    p.set_labels = [pair("tier", "gold"), pair("env", "staging")].into_iter().collect();
    p.remove_labels = vec!["team".into(), "absent".into()];
    p.description = Some("primary database".into());
    let m = c.update_credential_metadata(p).await.unwrap().into_inner();
    assert_eq!(m.metadata_version, 2);
    assert_eq!(m.current_version, 2, "the value's version does not move");
    assert_eq!(labels(&m), [pair("env", "staging"), pair("tier", "gold")]);
    let inner = m.metadata.as_ref().unwrap();
    assert_eq!((inner.description.as_str(), inner.owner.as_str()), ("primary database", "alice"));
    let read = describe(&mut c, "meta/db").await;
    assert_eq!((read.metadata_version, labels(&read), read.metadata), (2, labels(&m), m.metadata));
    assert_eq!(get(&mut c, "meta/db", None).await.unwrap(), (2, b"v2".to_vec()));

    // A stale compare-and-set changes nothing and says what the version is.
    let mut stale = patch("meta/db");
    stale.expected_metadata_version = Some(1);
    stale.owner = Some("mallory".into());
    let s = c.update_credential_metadata(stale).await;
    assert_status(s, Code::Aborted, "expected metadata version 1, current metadata version is 2");
    assert_eq!(describe(&mut c, "meta/db").await.metadata.unwrap().owner, "alice");

    // Unconditional, and the expiry set then cleared.
    let mut exp = patch("meta/db");
    exp.expires_at = Some(prost_types::Timestamp { seconds: 4_000_000_000, nanos: 0 });
    let m = c.update_credential_metadata(exp).await.unwrap().into_inner();
    assert_eq!(m.metadata_version, 3);
    assert_eq!(m.metadata.unwrap().expires_at.map(|t| t.seconds), Some(4_000_000_000));
    let mut clear = patch("meta/db");
    clear.clear_expires_at = true;
    let m = c.update_credential_metadata(clear).await.unwrap().into_inner();
    assert_eq!((m.metadata_version, m.metadata.unwrap().expires_at), (4, None));

    // A put that carries metadata replaces it and counts as a change too.
    let replace = PutCredentialRequest {
        name: "meta/db".into(),
        value: b"v3".to_vec(),
        expected_version: Some(2),
        metadata: Some(Metadata::default()),
    };
    c.put_credential(replace).await.unwrap();
    let m = describe(&mut c, "meta/db").await;
    assert_eq!((m.current_version, m.metadata_version), (3, 5));
    assert!(labels(&m).is_empty());
    d.stop().await;
}

async fn bad_metadata_updates_are_refused(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.limits.max_labels = 2;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "meta/x", b"v1", None).await.unwrap();
    let mut run = async |p: UpdateCredentialMetadataRequest| c.update_credential_metadata(p).await;
    assert_status(run(patch("meta/x")).await, Code::InvalidArgument, "nothing to change");
    let mut p = patch("meta/../x");
    p.owner = Some("o".into());
    assert_status(run(p).await, Code::InvalidArgument, "");
    let mut p = patch("meta/x");
    p.owner = Some("o".into());
    p.expected_metadata_version = Some(0);
    assert_status(run(p).await, Code::InvalidArgument, "metadata versions start at 1");
    let mut p = patch("meta/x");
    p.owner = Some("o".into());
    p.expected_metadata_version = Some(u64::MAX);
    assert_status(run(p).await, Code::InvalidArgument, "out of range");
    let mut p = patch("meta/x");
    p.set_labels = [pair("a", "1")].into_iter().collect();
    p.remove_labels = vec!["a".into()];
    assert_status(run(p).await, Code::InvalidArgument, "label \"a\" is both set and removed");
    let mut p = patch("meta/x");
    p.set_labels = [pair("Bad Key", "1")].into_iter().collect();
    assert_status(run(p).await, Code::InvalidArgument, "label key");
    let mut p = patch("meta/x");
    p.set_labels = [pair("a", "1"), pair("b", "2"), pair("c", "3")].into_iter().collect();
    assert_status(run(p).await, Code::InvalidArgument, "3 labels; the limit is 2");
    let mut p = patch("meta/x");
    p.remove_labels = vec!["a".into(), "b".into(), "c".into()];
    assert_status(run(p).await, Code::InvalidArgument, "3 labels to remove; the limit is 2");
    let mut p = patch("meta/x");
    p.description = Some("d".repeat(1025));
    assert_status(run(p).await, Code::InvalidArgument, "description is 1025 bytes");
    let mut p = patch("meta/x");
    p.expires_at = Some(prost_types::Timestamp { seconds: 1, nanos: 0 });
    p.clear_expires_at = true;
    assert_status(run(p).await, Code::InvalidArgument, "exclude each other");
    let mut p = patch("meta/x");
    p.expires_at = Some(prost_types::Timestamp { seconds: 1, nanos: -1 });
    assert_status(run(p).await, Code::InvalidArgument, "nanos");
    let mut p = patch("meta/none");
    p.owner = Some("o".into());
    assert_status(run(p).await, Code::NotFound, "not found");
    let mut p = patch("meta/x");
    p.owner = Some("o".into());
    p.expected_metadata_version = Some(7);
    assert_status(run(p).await, Code::Aborted, "current metadata version is 1");

    let (token, _) = create_token(&d, "reader", vec![rule("meta/**", &[Capability::Read], false)], 0, None).await;
    let mut reader = client_with(&d, &token).await;
    let mut p = patch("meta/x");
    p.owner = Some("o".into());
    assert_status(reader.update_credential_metadata(p).await, Code::PermissionDenied, "may not write");
    // Nothing above changed anything.
    let m = describe(&mut c, "meta/x").await;
    assert_eq!((m.current_version, m.metadata_version, m.metadata.unwrap().owner.as_str()), (1, 1, ""));
    c.delete_credential(DeleteCredentialRequest { name: "meta/x".into(), expected_version: None }).await.unwrap();
    let mut p = patch("meta/x");
    p.owner = Some("o".into());
    assert_status(c.update_credential_metadata(p).await, Code::NotFound, "deleted");
    d.stop().await;
}
