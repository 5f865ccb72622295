//! Every bad input gets a precise status code and a clear message, and leaves stored
//! data untouched.

use tonic::Code;

use credvault::proto::{
    BatchGetCredentialsRequest, DeleteCredentialRequest, GetCredentialMetadataRequest, ListCredentialsRequest,
    Metadata, PutCredentialRequest,
};

use crate::both_backends;
use crate::helpers::{assert_status, get, put, Backend, Client, TestDaemon, TestEnv};

both_backends!(bad_input_is_rejected_precisely);

fn list(prefix: &str, page_size: u32, page_token: &str) -> ListCredentialsRequest {
    ListCredentialsRequest { prefix: prefix.into(), page_size, page_token: page_token.into(), ..Default::default() }
}

async fn delete(c: &mut Client, name: &str, expected: Option<u64>) -> Result<u64, tonic::Status> {
    let r = c.delete_credential(DeleteCredentialRequest { name: name.into(), expected_version: expected }).await?;
    Ok(r.into_inner().version)
}

async fn bad_input_is_rejected_precisely(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.limits.max_versions = 3;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "good/one", b"v1", None).await.unwrap();
    put(&mut c, "good/one", b"v2", None).await.unwrap();
    const INVALID: Code = Code::InvalidArgument;

    // Names.
    for (name, needle) in [
        ("", "must not be empty"),
        ("/lead", "empty path segment"),
        ("trail/", "empty path segment"),
        ("a//b", "empty path segment"),
        ("a/../b", "'..' segment"),
        ("sp ace", "allowed are letters"),
        ("star*", "'*'"),
        ("ünï", "allowed are letters"),
    ] {
        assert_status(get(&mut c, name, None).await, INVALID, needle);
        assert_status(put(&mut c, name, b"x", None).await, INVALID, needle);
        assert_status(delete(&mut c, name, None).await, INVALID, needle);
        let meta = c.get_credential_metadata(GetCredentialMetadataRequest { name: name.into() }).await;
        assert_status(meta, INVALID, needle);
    }
    let long = "n".repeat(257);
    assert_status(put(&mut c, &long, b"x", None).await, INVALID, "257 bytes; the limit is 256");
    assert!(put(&mut c, &"n".repeat(256), b"x", None).await.is_ok(), "256 bytes is allowed");

    // Values.
    assert_status(put(&mut c, "good/one", b"", None).await, INVALID, "must not be empty");
    let big = vec![b'x'; 64 * 1024 + 1];
    assert_status(put(&mut c, "good/one", &big, None).await, INVALID, "65537 bytes; the limit is 65536");
    assert!(put(&mut c, "good/max", &vec![b'y'; 64 * 1024], None).await.is_ok(), "exactly the limit is allowed");
    // Far over the limit, the transport refuses to decode the message at all.
    let huge = vec![b'x'; 512 * 1024];
    let s = put(&mut c, "good/one", &huge, None).await.unwrap_err();
    assert_eq!(s.code(), Code::OutOfRange, "{}", s.message());

    // Metadata.
    let bad_label = Metadata { labels: [("Bad Key".to_owned(), "v".to_owned())].into(), ..Default::default() };
    let r = c
        .put_credential(PutCredentialRequest {
            name: "good/one".into(),
            value: b"x".to_vec(),
            expected_version: None,
            metadata: Some(bad_label),
        })
        .await;
    assert_status(r, INVALID, "label key \"Bad Key\"");
    let bad_time =
        Metadata { expires_at: Some(prost_types::Timestamp { seconds: 1, nanos: -5 }), ..Default::default() };
    let r = c
        .put_credential(PutCredentialRequest {
            name: "good/one".into(),
            value: b"x".to_vec(),
            expected_version: None,
            metadata: Some(bad_time),
        })
        .await;
    assert_status(r, INVALID, "nanos");

    // Versions and compare-and-set.
    assert_status(get(&mut c, "good/one", Some(9)).await, Code::NotFound, "has no version 9; the current version is 2");
    assert_status(get(&mut c, "missing/x", None).await, Code::NotFound, "\"missing/x\" not found");
    assert_status(
        put(&mut c, "good/one", b"x", Some(1)).await,
        Code::Aborted,
        "expected version 1, current version is 2",
    );
    assert_status(put(&mut c, "good/one", b"x", Some(0)).await, Code::AlreadyExists, "already exists at version 2");
    assert_status(put(&mut c, "missing/x", b"x", Some(4)).await, Code::NotFound, "not found");
    assert_status(delete(&mut c, "good/one", Some(1)).await, Code::Aborted, "current version is 2");
    assert_status(delete(&mut c, "missing/x", None).await, Code::NotFound, "not found");

    // Pruned history: max_versions = 3 keeps versions 2..4 once version 4 exists.
    put(&mut c, "pruned", b"1", None).await.unwrap();
    for v in 2..=4u8 {
        put(&mut c, "pruned", &[b'0' + v], None).await.unwrap();
    }
    assert_status(get(&mut c, "pruned", Some(1)).await, Code::NotFound, "no longer retained (the last 3 versions");
    assert_eq!(get(&mut c, "pruned", Some(2)).await.unwrap().1, b"2");

    // Deleted credentials.
    put(&mut c, "gone", b"x", None).await.unwrap();
    delete(&mut c, "gone", None).await.unwrap();
    assert_status(get(&mut c, "gone", None).await, Code::NotFound, "is deleted");
    assert_status(get(&mut c, "gone", Some(1)).await, Code::NotFound, "is deleted");
    assert_status(delete(&mut c, "gone", None).await, Code::NotFound, "already deleted");
    assert_status(put(&mut c, "gone", b"y", Some(1)).await, Code::Aborted, "(deleted)");

    // Batches.
    let too_many: Vec<String> = (0..101).map(|i| format!("b/{i}")).collect();
    let r = c.batch_get_credentials(BatchGetCredentialsRequest { names: too_many }).await;
    assert_status(r, INVALID, "batch asks for 101 credentials; the limit is 100");
    let r =
        c.batch_get_credentials(BatchGetCredentialsRequest { names: vec!["good/one".into(), "bad name".into()] }).await;
    assert_status(r, INVALID, "\"bad name\"");

    // Listing.
    assert_status(c.list_credentials(list("", 1001, "")).await, INVALID, "page_size 1001 is over the limit of 1000");
    assert_status(c.list_credentials(list("", 10, "!!!not-base64")).await, INVALID, "page_token is malformed");
    assert_status(c.list_credentials(list("", 10, "djE6")).await, INVALID, "page_token is malformed");
    assert_status(c.list_credentials(list("a b", 10, "")).await, INVALID, "prefix");
    let first = c.list_credentials(list("good/", 1, "")).await.unwrap().into_inner();
    assert!(!first.next_page_token.is_empty());
    let r = c.list_credentials(list("pruned", 1, &first.next_page_token)).await;
    assert_status(r, INVALID, "another prefix");

    // Authentication: no detail about tokens is given away.
    let channel = d.channel().await;
    let mut anonymous = credvault::proto::credential_service_client::CredentialServiceClient::new(channel.clone());
    let r = anonymous
        .get_credential(credvault::proto::GetCredentialRequest { name: "good/one".into(), version: None })
        .await;
    assert_status(r, Code::Unauthenticated, "missing bearer token");
    for header in ["Bearer cvt_wrong", "Basic abc", "Bearer"] {
        let mut req =
            tonic::Request::new(credvault::proto::GetCredentialRequest { name: "good/one".into(), version: None });
        req.metadata_mut().insert("authorization", header.parse().unwrap());
        let s = anonymous.get_credential(req).await.unwrap_err();
        assert_eq!(s.code(), Code::Unauthenticated);
        assert!(!s.message().contains("cvt_"), "{}", s.message());
    }

    // Nothing above changed the data.
    assert_eq!(get(&mut c, "good/one", None).await.unwrap(), (2, b"v2".to_vec()));
    assert_eq!(get(&mut c, "good/one", Some(1)).await.unwrap(), (1, b"v1".to_vec()));
    let all = c.list_credentials(list("", 100, "")).await.unwrap().into_inner();
    let names: Vec<String> = all.credentials.into_iter().map(|m| m.name).collect();
    assert_eq!(names, vec!["good/max".to_owned(), "good/one".into(), "n".repeat(256), "pruned".into()]);
    d.stop().await;
}
