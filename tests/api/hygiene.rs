//! Secrets never reach logs, error messages or metrics: the real binary, trace-level
//! JSON logs, a full scenario, then a search of everything it printed.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tonic::metadata::MetadataValue;

use credvault::proto::{self, Capability, CreateTokenRequest, PolicyRule, RevokeTokenRequest};

use crate::helpers::{get, put, Backend, Bearer, TestEnv};

const MARKER: &str = "hygiene-marker-4be1-do-not-log";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_errors_or_metrics() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(env.data_dir())
        .env("RUST_LOG", "trace")
        .env_remove("CREDVAULT_DATABASE_URL")
        .env_remove("CREDVAULT_CONFIG")
        .env_remove("CREDVAULT_PASSPHRASE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    // Logs go to stderr; collect them all, and find the listening addresses on the way.
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<(String, String)>();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let logs = tokio::spawn(async move {
        let mut all = String::new();
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = stderr.next_line().await {
            if line.contains("serving gRPC") {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
                let f = &v["fields"];
                let addrs = (f["addr"].as_str().unwrap().to_owned(), f["metrics_addr"].as_str().unwrap().to_owned());
                if let Some(tx) = addr_tx.take() {
                    let _ = tx.send(addrs);
                }
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let (addr, metrics_addr) = tokio::time::timeout(Duration::from_secs(30), addr_rx).await.unwrap().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut banner = vec![0u8; 4096];
    let n = stdout.read(&mut banner).await.unwrap();
    let banner = String::from_utf8_lossy(&banner[..n]).into_owned();
    let root = banner.lines().find_map(|l| l.strip_prefix("export CREDVAULT_TOKEN=")).unwrap().trim().to_owned();

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let bearer = |t: &str| Bearer(format!("Bearer {t}").parse::<MetadataValue<_>>().unwrap());
    let mut c =
        proto::credential_service_client::CredentialServiceClient::with_interceptor(channel.clone(), bearer(&root));
    let mut admin = proto::admin_service_client::AdminServiceClient::with_interceptor(channel.clone(), bearer(&root));

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
    let mut as_scoped =
        proto::credential_service_client::CredentialServiceClient::with_interceptor(channel, bearer(&scoped.token));
    messages.push(get(&mut as_scoped, "hy/db", None).await.unwrap_err().message().to_owned());
    admin.revoke_token(RevokeTokenRequest { id: scoped.info.unwrap().id }).await.unwrap();
    messages.push(get(&mut as_scoped, "hy/db", None).await.unwrap_err().message().to_owned());

    let metrics = {
        use tokio::io::AsyncWriteExt as _;
        let mut s = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).await.unwrap();
        body
    };
    assert!(metrics.contains("credvault_requests_total"));

    // Graceful stop on SIGTERM, exit code 0.
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "daemon exited with {status}");
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).await.unwrap();
    let logs = logs.await.unwrap();
    assert!(logs.lines().count() > 50, "trace logging produced too little to be a meaningful check");
    assert!(logs.contains("shutdown requested"), "graceful shutdown was logged");

    for (what, text) in [("logs", &logs), ("metrics", &metrics), ("errors", &messages.join("\n"))] {
        assert!(!text.contains(MARKER), "the value leaked into {what}");
        assert!(!text.contains(&root), "the root token leaked into {what}");
        assert!(!text.contains(&scoped.token), "a scoped token leaked into {what}");
        assert!(!text.contains(&root["cvt_".len()..]), "part of the root token leaked into {what}");
    }
    let stdout_all = format!("{banner}{rest}");
    assert!(!stdout_all.contains(MARKER) && !stdout_all.contains(&scoped.token));
    assert_eq!(stdout_all.matches(&root).count(), 2, "the root token is shown once (banner and export line)");
}
