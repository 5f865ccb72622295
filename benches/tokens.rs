//! Token churn against the table size: `CreateToken` and `RevokeToken` latency on daemon
//! A, and how long until daemon B (same PostgreSQL, told by the change feed) accepts or
//! refuses the token, with 0 to 100,000 tokens in the table. The baseline, measured in
//! the same run at each size, is one full reload of the token table: what every create
//! and revoke cost each daemon before changes named their token.
//!
//! ```text
//! cargo bench --bench tokens                         # 0, 1000, 10000, 100000 tokens
//! TOKENS_LEVELS=0,100000 TOKENS_SAMPLES=500 cargo bench --bench tokens
//! ```
//! PostgreSQL comes from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! the bench creates and drops its own database. The table is filled with synthetic
//! rows in bulk (SQL), then both daemons reload it, as they would at start-up.

use std::time::{Duration, Instant};

use sqlx::Connection as _;

#[path = "support/mod.rs"]
mod support;
use tonic::metadata::MetadataValue;

use credvault::auth::Auth;
use credvault::config::{DatabaseUrl, Settings};
use credvault::proto::admin_service_client::AdminServiceClient;
use credvault::proto::{self, Capability, PolicyRule};
use credvault::server::{open_store, Daemon};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn summary(mut v: Vec<Duration>) -> String {
    v.sort_unstable();
    format!("{:>7.2} {:>7.2}", percentile(&v, 0.5), percentile(&v, 0.99))
}

/// Waits until `auth` gives `want` (accepted or not) for `token`; `None` after 10 s.
async fn until(auth: &Auth, token: &str, want: bool, from: Instant) -> Option<Duration> {
    let header = format!("Bearer {token}");
    while from.elapsed() < Duration::from_secs(10) {
        if auth.authenticate(Some(&header)).is_ok() == want {
            return Some(from.elapsed());
        }
        tokio::task::yield_now().await;
    }
    None
}

struct Running {
    auth: Auth,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(settings: Settings) -> (Running, Option<String>, std::net::SocketAddr) {
    let mut daemon = Daemon::build(settings).await.expect("daemon starts");
    let root = daemon.take_root_token().map(|t| secrecy::ExposeSecret::expose_secret(&t).to_owned());
    let addr = daemon.local_addr();
    let auth = daemon.auth().clone();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = daemon
            .run_until(async {
                let _ = rx.await;
            })
            .await;
    });
    (Running { auth, stop, task }, root, addr)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let levels: Vec<u64> = std::env::var("TOKENS_LEVELS")
        .unwrap_or_else(|_| "0,1000,10000,100000".into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect();
    let samples: usize = std::env::var("TOKENS_SAMPLES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);

    let Some(db) = support::db::scratch("cv_bench_tokens").await else { return };
    let url = db.url.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = Settings {
        listen: "127.0.0.1:0".parse().expect("addr"),
        metrics_listen: "127.0.0.1:0".parse().expect("addr"),
        data_dir: dir.path().to_owned(),
        database_url: Some(DatabaseUrl::new(url.clone())),
        db_max_connections: Some(4),
        ..Settings::default()
    };
    let (a, root, addr) = start(settings.clone()).await;
    let (b, _, _) = start(settings.clone()).await;
    let root = root.expect("a fresh database gives a root token");
    let store = open_store(&settings).await.expect("store");
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let bearer: MetadataValue<_> = format!("Bearer {root}").parse().expect("ascii");
    let mut client = AdminServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    let mut pool = sqlx::PgConnection::connect(&url).await.expect("bench connection");

    println!("{samples} creates and {} revokes per size, one caller; milliseconds", samples / 4);
    println!(
        "{:>8} | {:>15} | {:>15} | {:>15} | {:>15} | {:>12}",
        "tokens", "create p50 p99", "on B p50 p99", "revoke p50 p99", "off B p50 p99", "full reload"
    );
    let rule = credvault::auth::Rule {
        pattern: "bulk/*".into(),
        capabilities: vec![credvault::auth::Capability::Read],
        deny: false,
    };
    let policy = credvault::auth::Policy::new(vec![rule]).expect("policy");
    let doc = serde_json::to_string(&credvault::auth::PolicyDoc::new(&policy, None)).expect("policy json");
    let mut filled = 0u64;
    for level in levels {
        if level > filled {
            sqlx::query(
                "INSERT INTO tokens (token_hash, display_name, policies, created_at) \
                 SELECT encode(sha256(convert_to('bulk-' || g, 'UTF8')), 'hex'), 'bulk', $3, 1 \
                 FROM generate_series($1::bigint, $2::bigint) g",
            )
            .bind(filled as i64)
            .bind(level as i64 - 1)
            .bind(&doc)
            .execute(&mut pool)
            .await
            .expect("bulk insert");
            filled = level;
        }
        // What a create or revoke used to cost each daemon: the whole table again.
        let t = Instant::now();
        a.auth.reload(store.as_ref()).await.expect("reload A");
        let reload = t.elapsed();
        b.auth.reload(store.as_ref()).await.expect("reload B");

        let (mut create, mut seen, mut revoke, mut refused) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut made = Vec::new();
        for i in 0..samples {
            let t = Instant::now();
            let r = client
                .create_token(proto::CreateTokenRequest {
                    display_name: format!("bench-{level}-{i}"),
                    rules: vec![PolicyRule {
                        pattern: "bench/*".into(),
                        capabilities: vec![Capability::Read as i32],
                        deny: false,
                    }],
                    ttl: None,
                    rate_limit_per_second: 0,
                })
                .await
                .expect("create token")
                .into_inner();
            create.push(t.elapsed());
            let answered = Instant::now();
            match until(&b.auth, &r.token, true, answered).await {
                Some(d) => seen.push(d),
                None => println!("B never accepted a token created on A"),
            }
            made.push((r.token, r.info.expect("info").id));
        }
        for (token, id) in made.iter().take(samples / 4) {
            let t = Instant::now();
            client.revoke_token(proto::RevokeTokenRequest { id: id.clone() }).await.expect("revoke");
            revoke.push(t.elapsed());
            let answered = Instant::now();
            match until(&b.auth, token, false, answered).await {
                Some(d) => refused.push(d),
                None => println!("B never refused a token revoked on A"),
            }
        }
        filled += samples as u64;
        println!(
            "{level:>8} | {} | {} | {} | {} | {:>9.1} ms",
            summary(create),
            summary(seen),
            summary(revoke),
            summary(refused),
            reload.as_secs_f64() * 1000.0
        );
    }
    for d in [a, b] {
        let _ = d.stop.send(());
        let _ = d.task.await;
        drop(d.auth);
    }
    drop(store);
    db.drop_now().await;
}
