//! Every RPC is audited off the hot path; values and tokens never reach the trail.

use std::time::Duration;

use tonic::Code;

use credvault::audit::AuditSink;
use credvault::proto::{self, AuditEvent, ListAuditEventsRequest};

use crate::cache::eventually;
use crate::e2e::{get, put};
use crate::helpers::{assert_status, Backend, TestDaemon, TestEnv};

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
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_audit_refuses_requests_when_the_sink_fails() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.audit.required = true;
    let d = TestDaemon::start(settings, None).await;
    let mut c = d.client().await;
    put(&mut c, "req/x", b"v", None).await.unwrap();
    eventually("the put is audited", Duration::from_secs(3), async || {
        events(&d).await.iter().any(|e| e.rpc == "PutCredential")
    })
    .await;

    // Break the sink under the daemon.
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    sqlx::query("ALTER TABLE audit_log RENAME TO audit_log_away").execute(&raw).await.unwrap();
    let _ = get(&mut c, "req/x", None).await; // its event cannot be written
    eventually("requests are refused while auditing fails", Duration::from_secs(3), async || {
        get(&mut c, "req/x", None).await.is_err_and(|s| s.code() == Code::Unavailable && s.message().contains("audit"))
    })
    .await;

    // Repair it: the writer retries, catches up, and requests flow again.
    sqlx::query("ALTER TABLE audit_log_away RENAME TO audit_log").execute(&raw).await.unwrap();
    eventually("requests are served again", Duration::from_secs(5), async || get(&mut c, "req/x", None).await.is_ok())
        .await;
    raw.close().await;
    d.stop().await;
    env.cleanup().await;
}
