//! Many daemons over one PostgreSQL: a put acknowledged by daemon 0 becomes visible on
//! every other daemon when its change feed delivers the notification (the cache entry
//! is dropped and watchers hear of it in the same step). Measures, for 1, 2, 4 and 8
//! real daemon processes with small pools, the time from sending the put to each other
//! daemon's `WatchCredentials` event (p50/p99/max: an upper bound of commit-to-visible,
//! since the notification often arrives before the writer's own answer), the put's own
//! latency, and the PostgreSQL connections the fleet holds.
//!
//! ```text
//! cargo bench --bench fleet                       # 1, 2, 4, 8 daemons, 200 puts each
//! FLEET_SIZES=8 FLEET_PUTS=1000 FLEET_POOL=2 cargo bench --bench fleet
//! ```
//! PostgreSQL comes from `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`);
//! the bench creates and drops its own database.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[path = "support/mod.rs"]
mod support;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_stream::StreamExt as _;
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;

use credvault::proto::credential_service_client::CredentialServiceClient;
use credvault::proto::{self, EventKind};

type Client = CredentialServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, Box<dyn FnMut(tonic::Request<()>) -> AuthResult + Send>>,
>;
type AuthResult = Result<tonic::Request<()>, tonic::Status>;

struct Daemon {
    child: tokio::process::Child,
    addr: String,
}

/// Starts `credvault serve` on port 0; returns it with the root token if it printed one.
async fn spawn(dir: &std::path::Path, url: &str, pool: u32) -> (Daemon, Option<String>) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"))
        .args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--data-dir")
        .arg(dir)
        .arg("--database-url")
        .arg(url)
        .arg("--db-max-connections")
        .arg(pool.to_string())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn credvault");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut err = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        while let Ok(Some(line)) = err.next_line().await {
            if line.contains("serving gRPC") {
                let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log line");
                if let (Some(tx), Some(addr)) = (tx.take(), v["fields"]["addr"].as_str()) {
                    let _ = tx.send(addr.to_owned());
                }
            }
        }
    });
    let addr = tokio::time::timeout(Duration::from_secs(60), rx).await.expect("daemon starts").expect("address");
    // The root token, if any, is printed before serving starts; stdout then stays quiet.
    let mut token = None;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_millis(200), out.next_line()).await {
        if let Some(t) = line.strip_prefix("export CREDVAULT_TOKEN=") {
            token = Some(t.trim().to_owned());
        }
    }
    (Daemon { child, addr }, token)
}

async fn client(addr: &str, token: &str) -> Client {
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    let bearer: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
    let auth: Box<dyn FnMut(tonic::Request<()>) -> AuthResult + Send> = Box::new(move |mut r| {
        r.metadata_mut().insert("authorization", bearer.clone());
        Ok(r)
    });
    CredentialServiceClient::with_interceptor(channel, auth)
}

fn ms(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
}

async fn connections(admin: &mut sqlx::PgConnection, db: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_one(admin)
        .await
        .expect("pg_stat_activity")
}

/// Per version, when each watching daemon reported it.
type Seen = Arc<Mutex<Vec<Vec<Option<Instant>>>>>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.into());
    let sizes: Vec<usize> = env("FLEET_SIZES", "1,2,4,8").split(',').filter_map(|v| v.trim().parse().ok()).collect();
    let puts: usize = env("FLEET_PUTS", "200").parse().expect("FLEET_PUTS");
    let pool: u32 = env("FLEET_POOL", "4").parse().expect("FLEET_POOL");
    let Some(mut scratch) = support::db::scratch("cv_bench_fleet").await else { return };
    let (db, url) = (scratch.name.clone(), scratch.url.clone());
    let dir = tempfile::tempdir().expect("temp dir");

    println!("{puts} puts on daemon 0, one every 10 ms; pools of {pool}; visible = the other daemons' watch events, from the put's sending");
    println!(
        "{:>7} | {:>11} | {:>9} | {:>9} | {:>9} | {:>9}",
        "daemons", "pg conns", "vis p50", "vis p99", "vis max", "put p50"
    );
    let mut fleet: Vec<Daemon> = Vec::new();
    let mut token = None;
    let mut version = 0u64;
    for &n in &sizes {
        while fleet.len() < n {
            let (d, t) = spawn(dir.path(), &url, pool).await;
            token = token.or(t);
            fleet.push(d);
        }
        let token = token.clone().expect("the first daemon prints the root token");
        let mut writer = client(&fleet[0].addr, &token).await;
        let seen: Seen = Arc::new(Mutex::new(Vec::new()));
        let mut watches = Vec::new();
        for (i, d) in fleet.iter().enumerate().skip(1) {
            let mut c = client(&d.addr, &token).await;
            let mut events = c
                .watch_credentials(proto::WatchCredentialsRequest { prefix: "fleet/".into() })
                .await
                .expect("watch")
                .into_inner();
            let seen = seen.clone();
            watches.push(tokio::spawn(async move {
                while let Some(Ok(e)) = events.next().await {
                    if e.kind == EventKind::Put as i32 {
                        let at = Instant::now();
                        let mut s = seen.lock().expect("seen");
                        let v = e.version as usize;
                        if s.len() <= v {
                            s.resize(v + 1, Vec::new());
                        }
                        if s[v].len() < i {
                            s[v].resize(i, None);
                        }
                        s[v][i - 1] = Some(at);
                    }
                }
            }));
        }
        // Every watch is subscribed once a put reaches all of them.
        let others = fleet.len() - 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while others > 0 && !subscribed(&seen, version, others) {
            assert!(Instant::now() < deadline, "watches not all subscribed");
            version = put(&mut writer).await.0;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut acked = Vec::new();
        let mut put_latency = Vec::new();
        let mut peak = connections(scratch.admin(), &db).await;
        for i in 0..puts {
            let (v, took, at) = put(&mut writer).await;
            version = v;
            acked.push((v, at));
            put_latency.push(took);
            if i % 50 == 0 {
                peak = peak.max(connections(scratch.admin(), &db).await);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut visible = Vec::new();
        let mut missing = 0;
        {
            let s = seen.lock().expect("seen");
            for (v, at) in &acked {
                for d in 0..others {
                    match s.get(*v as usize).and_then(|row| row.get(d)).copied().flatten() {
                        Some(t) => visible.push(t.saturating_duration_since(*at)),
                        None => missing += 1,
                    }
                }
            }
        }
        for w in watches {
            w.abort();
        }
        // Every daemon now serves the last version.
        for d in &fleet {
            let mut c = client(&d.addr, &token).await;
            let r = c
                .get_credential(proto::GetCredentialRequest { name: "fleet/x".into(), version: None })
                .await
                .expect("get")
                .into_inner();
            assert_eq!(r.version, version, "daemon {} serves the last version", d.addr);
        }
        visible.sort_unstable();
        put_latency.sort_unstable();
        let conns = connections(scratch.admin(), &db).await;
        let vis = |p| if others == 0 { "-".to_owned() } else { format!("{:.2}", ms(&visible, p)) };
        println!(
            "{n:>7} | {:>4} ({:>4}) | {:>9} | {:>9} | {:>9} | {:>9.2}",
            conns,
            peak.max(conns),
            vis(0.5),
            vis(0.99),
            vis(1.0),
            ms(&put_latency, 0.5)
        );
        if missing > 0 {
            println!("        {missing} of {} events never arrived", acked.len() * others);
        }
    }
    for mut d in fleet {
        let _ = d.child.start_kill();
        let _ = d.child.wait().await;
    }
    scratch.drop_now().await;
}

/// Whether every watching daemon reported `version` (0: nothing written yet).
fn subscribed(seen: &Seen, version: u64, others: usize) -> bool {
    let s = seen.lock().expect("seen");
    version > 0 && s.get(version as usize).is_some_and(|v| v.iter().filter(|x| x.is_some()).count() == others)
}

/// One unconditional put of `fleet/x`: its version, how long it took, when it was sent.
async fn put(c: &mut Client) -> (u64, Duration, Instant) {
    let t = Instant::now();
    let r = c
        .put_credential(proto::PutCredentialRequest {
            name: "fleet/x".into(),
            value: b"fleet-value".to_vec(),
            expected_version: None,
            metadata: None,
        })
        .await
        .expect("put")
        .into_inner();
    (r.version, t.elapsed(), t)
}
