//! Secrets never reach logs, error messages or metrics: the real binary, trace-level
//! JSON logs, a full scenario, then a search of everything it printed.

use std::time::Duration;

use tokio::io::AsyncReadExt as _;

use credvault::proto::{Capability, CreateTokenRequest, PolicyRule, RevokeTokenRequest};

use crate::helpers::spawn::Binary;
use crate::helpers::{admin_over, client_over, get, put, Backend, TestEnv};

const MARKER: &str = "hygiene-marker-4be1-do-not-log";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_errors_or_metrics() {
    let env = TestEnv::new(Backend::Sqlite).await;
    // Logs go to stderr, collected whole; the listening addresses are found on the way.
    let mut child = Binary::serve(env.data_dir()).env("RUST_LOG", "trace").start().await;
    let root = child.root_token().await;

    let channel = child.channel().await;
    let mut c = client_over(channel.clone(), &root);
    let mut admin = admin_over(channel.clone(), &root);

    let mut messages = Vec::new();
    put(&mut c, "hy/db", MARKER.as_bytes(), None).await.unwrap();
    assert_eq!(get(&mut c, "hy/db", None).await.unwrap().1, MARKER.as_bytes());
    put(&mut c, "hy/db", format!("{MARKER}-2").as_bytes(), Some(1)).await.unwrap();
    for r in [
        put(&mut c, "hy/db", MARKER.as_bytes(), Some(1)).await.map(|_| ()),
        put(&mut c, "bad name", MARKER.as_bytes(), None).await.map(|_| ()),
        put(&mut c, "hy/big", &[b'x'; 70_000], None).await.map(|_| ()),
        get(&mut c, "hy/missing", None).await.map(|_| ()),
    ] {
        messages.push(r.unwrap_err().message().to_owned());
    }
    let scoped = admin
        .create_token(CreateTokenRequest {
            display_name: "svc".into(),
            rules: vec![PolicyRule {
                pattern: "other/*".into(),
                capabilities: vec![Capability::Read as i32],
                deny: false,
            }],
            ttl: None,
            rate_limit_per_second: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut as_scoped = client_over(channel, &scoped.token);
    messages.push(get(&mut as_scoped, "hy/db", None).await.unwrap_err().message().to_owned());
    admin.revoke_token(RevokeTokenRequest { id: scoped.info.unwrap().id }).await.unwrap();
    messages.push(get(&mut as_scoped, "hy/db", None).await.unwrap_err().message().to_owned());

    let metrics = {
        use tokio::io::AsyncWriteExt as _;
        let mut s = tokio::net::TcpStream::connect(child.metrics_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(metrics.contains("credvault_requests_total"));

    // Graceful stop on SIGTERM, exit code 0.
    child.sigterm();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap();
    assert!(status.success(), "daemon exited with {status}");
    let stdout_all = child.stdout().await;
    let logs = child.log().await;
    assert!(logs.lines().count() > 50, "trace logging produced too little to be a meaningful check");
    assert!(logs.contains("shutdown requested"), "graceful shutdown was logged");

    for (what, text) in [("logs", &logs), ("metrics", &metrics), ("errors", &messages.join("\n"))] {
        assert!(!text.contains(MARKER), "the value leaked into {what}");
        assert!(!text.contains(&root), "the root token leaked into {what}");
        assert!(!text.contains(&scoped.token), "a scoped token leaked into {what}");
        assert!(!text.contains(&root["cvt_".len()..]), "part of the root token leaked into {what}");
    }
    assert!(!stdout_all.contains(MARKER) && !stdout_all.contains(&scoped.token));
    assert_eq!(stdout_all.matches(&root).count(), 2, "the root token is shown once (banner and export line)");
}
