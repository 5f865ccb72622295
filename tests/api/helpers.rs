//! Test fixtures, and every helper more than one test module uses.
//!
//! - `env`: [`TestEnv`], one test's fresh PostgreSQL database or SQLite directory, dropped
//!   with it (also when the test panics); [`Raw`] SQL access to it.
//! - `daemon`: [`TestDaemon`], a daemon inside the test process on port 0, and the
//!   authenticated clients ([`Client`], [`Admin`], [`Bearer`]).
//! - [`spawn`]: [`spawn::Binary`], the one way to run the real `credvault` binary.
//! - here: [`both_backends!`](crate::both_backends), [`eventually`], the `put`/`get`
//!   shorthands, status assertions, tokens and the metrics scrape.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Status;

use credvault::proto::{Capability, CreateTokenRequest, GetCredentialRequest, PolicyRule, PutCredentialRequest};

mod daemon;
mod env;
pub mod spawn;

pub use daemon::{admin_over, client_over, passphrase_settings, Admin, Bearer, Client, TestDaemon};
pub use env::{Backend, Raw, TestEnv};

/// Runs an async test body once per backend: `both_backends!(name, body_fn)` defines
/// `name::postgres` and `name::sqlite`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
        }
    )*};
}

/// Retries `check` every 10 ms until it holds; fails the test naming `what` if it still
/// does not after `deadline`. The way to wait for anything asynchronous, never a sleep.
pub async fn eventually(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> bool) {
    let until = tokio::time::Instant::now() + deadline;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < until, "{what}: not within {deadline:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `PutCredential` without metadata; the new version.
pub async fn put(c: &mut Client, name: &str, value: &[u8], expected: Option<u64>) -> Result<u64, Status> {
    let r = c
        .put_credential(PutCredentialRequest {
            name: name.into(),
            value: value.to_vec(),
            expected_version: expected,
            metadata: None,
        })
        .await?;
    Ok(r.into_inner().version)
}

/// `GetCredential`; the version and the value.
pub async fn get(c: &mut Client, name: &str, version: Option<u64>) -> Result<(u64, Vec<u8>), Status> {
    let r = c.get_credential(GetCredentialRequest { name: name.into(), version }).await?.into_inner();
    Ok((r.version, r.value))
}

/// Asserts a gRPC error's code and that its message contains `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: tonic::Code, needle: &str) -> Status {
    let s = r.expect_err("expected an error status");
    assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
    assert!(s.message().contains(needle), "message {:?} lacks {needle:?}", s.message());
    s
}

/// One policy rule: `pattern` with `caps`, allowing or (`deny`) denying them.
pub fn rule(pattern: &str, caps: &[Capability], deny: bool) -> PolicyRule {
    PolicyRule { pattern: pattern.into(), capabilities: caps.iter().map(|c| *c as i32).collect(), deny }
}

/// Creates a token through `d`'s root token; returns its text and id.
pub async fn create_token(
    d: &TestDaemon,
    name: &str,
    rules: Vec<PolicyRule>,
    rate: u32,
    ttl: Option<u64>,
) -> (String, String) {
    let r = d
        .admin()
        .await
        .create_token(CreateTokenRequest {
            display_name: name.into(),
            rules,
            ttl: ttl.map(|s| prost_types::Duration { seconds: s as i64, nanos: 0 }),
            rate_limit_per_second: rate,
        })
        .await
        .unwrap()
        .into_inner();
    (r.token, r.info.unwrap().id)
}

/// A credential client of `d` that presents `token` instead of the root token.
pub async fn client_with(d: &TestDaemon, token: &str) -> Client {
    client_over(d.channel().await, token)
}

/// The body of `d`'s `/metrics`, after checking the answer is 200.
/// The value of one series (`name{labels}` as exported) in a scrape, 0 if absent.
pub fn series_value(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

pub async fn scrape(d: &TestDaemon) -> String {
    let mut s = tokio::net::TcpStream::connect(d.metrics_addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{}", out.lines().next().unwrap_or_default());
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}
