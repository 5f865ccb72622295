//! Bounded soak (resilience): two real `credvault serve` processes over one PostgreSQL
//! database, each reaching it through its own TCP proxy, under mixed load for
//! `SOAK_SECONDS` (default 600). During the run: reads (cache hits and misses, present and
//! absent names, single and batched), compare-and-set writes and credential rotations by
//! writers that each own their names, one KEK rotation (waiting for its re-wrap job), two
//! store outages (both proxies cut: connections closed, new ones refused) and one daemon
//! restart (SIGTERM, exit code 0, a new process on a new port, clients reconnect).
//!
//! At the end the bench fails (exit code 1) if any gRPC status outside the ones README
//! documents for the situation appeared, if an acknowledged write is lost (the store's
//! current version of a name is below its last acknowledged version, or that version does
//! not read back as written), or if any credential fails to decrypt (every name is read
//! back through both daemons). It reports each daemon's resident memory at the end of
//! warm-up and at the end, and its least-squares slope after warm-up; it also fails if
//! memory grows between disruptions (windows at least 30 s clear of an outage, the KEK
//! rotation or the restart) faster than `SOAK_MAX_QUIET_SLOPE` MiB/min (0.25). That is
//! the check that catches unbounded growth: without the metrics upkeep task the daemons
//! grew 0.4 to 1.2 MiB/min there, with it 0.00 to 0.09.
//!
//! ```text
//! cargo bench --bench soak                          # 10 minutes
//! SOAK_SECONDS=60 cargo bench --bench soak          # a short run
//! SOAK_HEAPTRACK=/tmp/soak-a SOAK_SECONDS=240 cargo bench --bench soak
//!                                                   # daemon A under `heaptrack -o /tmp/soak-a`
//! ```
//! Other knobs: `SOAK_WARMUP_SECONDS` (default a sixth of the run, 10 to 120),
//! `SOAK_NAMES` (3000), `SOAK_READ_RATE` (1200 requests/s in all), `SOAK_WRITE_RATE`
//! (100/s in all), `SOAK_OUTAGE_SECONDS` (15, at most a twelfth of the run),
//! `SOAK_SEED`; `SOAK_KEEP=1` keeps the work directory with the daemons' logs (it is
//! kept anyway when the run fails). PostgreSQL comes from `DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the bench creates a `cv_soak_*`
//! database and drops it on every way out. Nothing scrapes `/metrics` during the run, so
//! the daemons' metrics memory is measured as it is when nobody scrapes; the bench
//! scrapes once at the end for the report.

#[path = "../../tests/api/proxy.rs"]
mod proxy;

mod daemon;
mod disrupt;
mod load;
mod report;
mod run;
mod state;
mod verify;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sqlx::Connection as _;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::time::MissedTickBehavior;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::Code;

use credvault::proto::admin_service_client::AdminServiceClient;
use credvault::proto::credential_service_client::CredentialServiceClient;
use credvault::proto::{
    self, batch_get_result, rotate_credential_request, BatchGetCredentialsRequest, GetCredentialRequest,
    GetRotationJobRequest, PutCredentialRequest, RotateCredentialRequest, RotateKekRequest,
};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use daemon::*;
use disrupt::*;
use load::*;
use proxy::PgProxy;
use report::*;
use run::*;
use state::*;
use verify::*;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// gRPC statuses seen within this long after a disruption ends still count as part of
/// it: the breaker's probe, the pool's reconnect and the cache resync take about a second.
const OUTAGE_TAIL: Duration = Duration::from_secs(5);
const RESTART_TAIL: Duration = Duration::from_secs(2);
const RSS_EVERY: Duration = Duration::from_secs(2);
const READERS_PER_DAEMON: usize = 3;
const WRITERS_PER_DAEMON: usize = 2;
/// One write in this many is a RotateCredential instead of a PutCredential.
const ROTATE_EVERY: u64 = 10;
const ABSENT_NAMES: u64 = 200;
const LABELS: [&str; 2] = ["A", "B"];

// ---------------------------------------------------------------------------------------
// Configuration

struct Config {
    seconds: u64,
    warmup: u64,
    names: usize,
    read_rate: f64,
    write_rate: f64,
    outage: u64,
    seed: u64,
    /// Fail when resident memory grows faster than this (MiB/min) between disruptions.
    max_quiet_slope: f64,
    heaptrack: Option<PathBuf>,
    admin_url: String,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> T {
    match std::env::var(key) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{key}={v} does not parse")),
        Err(_) => default,
    }
}

impl Config {
    fn from_env() -> Config {
        let seconds: u64 = env_or("SOAK_SECONDS", 600);
        assert!(seconds >= 30, "SOAK_SECONDS must be at least 30 (two outages, a restart, a KEK rotation)");
        Config {
            seconds,
            warmup: env_or("SOAK_WARMUP_SECONDS", (seconds / 6).clamp(10, 120)),
            names: env_or("SOAK_NAMES", 3000),
            read_rate: env_or("SOAK_READ_RATE", 1200.0),
            write_rate: env_or("SOAK_WRITE_RATE", 100.0),
            outage: env_or("SOAK_OUTAGE_SECONDS", 15).min(seconds / 12).max(1),
            seed: env_or("SOAK_SEED", rand::random::<u32>() as u64),
            max_quiet_slope: env_or("SOAK_MAX_QUIET_SLOPE", 0.25),
            heaptrack: std::env::var_os("SOAK_HEAPTRACK").map(PathBuf::from),
            admin_url: std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned()),
        }
    }
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let cfg = Config::from_env();
    let admin_url = cfg.admin_url.clone();
    let db = format!("cv_soak_{:016x}", rand::random::<u64>());
    let mut conn = sqlx::PgConnection::connect(&admin_url).await.unwrap_or_else(|e| {
        panic!("PostgreSQL is not reachable at DATABASE_URL={admin_url} ({e}); the soak needs a real PostgreSQL")
    });
    sqlx::query(&format!("CREATE DATABASE \"{db}\"")).execute(&mut conn).await.expect("create the soak database");
    conn.close().await.ok();

    let mut task = tokio::spawn(soak(cfg, db.clone()));
    let ok = tokio::select! {
        r = &mut task => match r {
            Ok(ok) => ok,
            Err(e) => {
                eprintln!("soak: the run panicked: {e}");
                false
            }
        },
        _ = tokio::signal::ctrl_c() => {
            eprintln!("soak: interrupted");
            task.abort();
            let _ = task.await;
            false
        }
    };

    // Always: the daemons are gone (killed on drop), the database goes too.
    match sqlx::PgConnection::connect(&admin_url).await {
        Ok(mut conn) => {
            if let Err(e) =
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&mut conn).await
            {
                eprintln!("soak: cannot drop database {db}: {e}");
            }
        }
        Err(e) => eprintln!("soak: cannot connect to drop database {db}: {e}"),
    }
    std::process::exit(if ok { 0 } else { 1 });
}
