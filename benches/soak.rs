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

#[path = "../tests/api/proxy.rs"]
mod proxy;

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

use proxy::PgProxy;

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

// ---------------------------------------------------------------------------------------
// Daemon processes

/// How to start one daemon; the same for each of its lives.
struct Spec {
    label: &'static str,
    config: PathBuf,
    data_dir: PathBuf,
    key_file: PathBuf,
    database_url: String,
    log_file: PathBuf,
    heaptrack: Option<PathBuf>,
}

/// Warnings and errors a daemon logged, by message, over all its lives.
#[derive(Default)]
struct LogTally {
    lines: AtomicU64,
    by_message: Mutex<BTreeMap<(String, String), u64>>,
}

struct Running {
    child: tokio::process::Child,
    /// The `credvault` process itself (under heaptrack, a child of the wrapper script).
    pid: u32,
    addr: String,
    metrics_addr: String,
    root_token: Option<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The child handle kills the wrapper on drop; a daemon under heaptrack is its
        // child and would outlive it.
        if Some(self.pid) != self.child.id() && Path::new(&format!("/proc/{}", self.pid)).exists() {
            signal(self.pid, "KILL");
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("soak: kill -{sig} {pid} failed");
    }
}

/// The parent pid and command name of `pid`, from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_owned();
    let ppid = s[close + 2..].split(' ').nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// `root` if it is the daemon, else its descendant named `credvault`.
fn daemon_pid(root: u32) -> Option<u32> {
    if stat(root).is_some_and(|(_, comm)| comm == "credvault") {
        return Some(root);
    }
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((ppid, comm)) = stat(pid) {
                if ppid == parent {
                    if comm == "credvault" {
                        return Some(pid);
                    }
                    frontier.push(pid);
                }
            }
        }
    }
    None
}

async fn spawn(spec: &Spec, tally: Arc<LogTally>, life: u32) -> Running {
    let bin = env!("CARGO_BIN_EXE_credvault");
    let mut cmd = match &spec.heaptrack {
        Some(out) => {
            let mut c = tokio::process::Command::new("heaptrack");
            c.arg("-o").arg(out).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--config")
        .arg(&spec.config)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--master-key-file")
        .arg(&spec.key_file)
        .arg("--database-url")
        .arg(&spec.database_url)
        .env("RUST_LOG", "info")
        .env_remove("CREDVAULT_PASSPHRASE")
        .env_remove("CREDVAULT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start daemon {}: {e}", spec.label));
    let root = child.id().expect("a started child has a pid");

    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<(String, String)>();
    let stderr = child.stderr.take().expect("piped stderr");
    let log_file = spec.log_file.clone();
    tokio::spawn(async move {
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .await
            .expect("open the daemon's log file");
        let _ = out.write_all(format!("---- life {life}\n").as_bytes()).await;
        let mut lines = BufReader::new(stderr).lines();
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = out.write_all(line.as_bytes()).await;
            let _ = out.write_all(b"\n").await;
            tally.lines.fetch_add(1, Ordering::Relaxed);
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let level = v["level"].as_str().unwrap_or_default();
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if level == "WARN" || level == "ERROR" {
                *tally.by_message.lock().expect("tally").entry((level.to_owned(), message.to_owned())).or_default() +=
                    1;
            }
            if message.contains("serving gRPC") {
                if let (Some(tx), Some(a), Some(m)) =
                    (addr_tx.take(), v["fields"]["addr"].as_str(), v["fields"]["metrics_addr"].as_str())
                {
                    let _ = tx.send((a.to_owned(), m.to_owned()));
                }
            }
        }
        let _ = out.flush().await;
    });
    let (token_tx, token_rx) = tokio::sync::oneshot::channel::<String>();
    let stdout = child.stdout.take().expect("piped stdout");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut token_tx = Some(token_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(t) = line.strip_prefix("export CREDVAULT_TOKEN=") {
                if let Some(tx) = token_tx.take() {
                    let _ = tx.send(t.trim().to_owned());
                }
            }
        }
    });

    let started = tokio::time::timeout(Duration::from_secs(60), addr_rx).await;
    let Ok(Ok((addr, metrics_addr))) = started else {
        panic!("daemon {} did not log \"serving gRPC\" within 60 s; see {}", spec.label, spec.log_file.display());
    };
    // Printed before the daemon serves, so it is there by now if there is one.
    let root_token = tokio::time::timeout(Duration::from_millis(500), token_rx).await.ok().and_then(Result::ok);
    let pid = daemon_pid(root).unwrap_or_else(|| panic!("no credvault process under pid {root}"));
    Running { child, pid, addr, metrics_addr, root_token }
}

/// SIGTERM, then the exit status and how long the drain took.
async fn terminate(mut r: Running) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    signal(r.pid, "TERM");
    // Under heaptrack the wrapper exits once the profile is written.
    let status = tokio::time::timeout(Duration::from_secs(300), r.child.wait())
        .await
        .expect("the daemon exits within 300 s of SIGTERM")
        .expect("wait for the daemon");
    (status, t.elapsed())
}

// ---------------------------------------------------------------------------------------
// Shared state of the run

#[derive(Clone)]
struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;
type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Where one daemon currently listens; a restart moves it and bumps `generation`.
struct Slot {
    index: usize,
    addr: RwLock<String>,
    generation: AtomicU32,
    pid: AtomicU32,
    life: AtomicU32,
    restarting: AtomicBool,
}

impl Slot {
    fn channel(&self) -> (u32, Channel) {
        let generation = self.generation.load(Ordering::SeqCst);
        let addr = self.addr.read().expect("slot").clone();
        let ch = Channel::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
        (generation, ch)
    }
}

/// A client that follows its slot to a restarted daemon; one HTTP/2 connection per task.
struct Follow {
    slot: Arc<Slot>,
    bearer: Bearer,
    generation: u32,
    channel: Channel,
}

impl Follow {
    fn new(slot: Arc<Slot>, bearer: Bearer) -> Follow {
        let (generation, channel) = slot.channel();
        Follow { slot, bearer, generation, channel }
    }
    fn refresh(&mut self) {
        if self.slot.generation.load(Ordering::SeqCst) != self.generation {
            (self.generation, self.channel) = self.slot.channel();
        }
    }
    fn client(&mut self) -> Client {
        self.refresh();
        CredentialServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
    fn admin(&mut self) -> Admin {
        self.refresh();
        AdminServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Situation {
    Normal,
    Outage,
    Restart,
}

impl Situation {
    fn name(self) -> &'static str {
        match self {
            Situation::Normal => "normal",
            Situation::Outage => "outage",
            Situation::Restart => "restart",
        }
    }
}

type Key = (usize, &'static str, Situation, String);

#[derive(Default)]
struct Stats {
    counts: Mutex<BTreeMap<Key, u64>>,
    /// Latency of whole calls (not batch items), in microseconds.
    latency: Mutex<HashMap<Key, hdrhistogram::Histogram<u64>>>,
    /// Up to three messages for each non-OK key.
    messages: Mutex<HashMap<Key, Vec<String>>>,
    /// Values that came back wrong (not the credential's, or unreadable).
    bad_values: Mutex<Vec<String>>,
}

struct Run {
    start: Instant,
    outage: AtomicBool,
    /// The current (or last) outage's number and when its proxies were cut.
    outage_cut: Mutex<(u32, Option<Instant>)>,
    /// Outages, the KEK rotation and the restart, as (start, end) in seconds of the run.
    disruptions: Mutex<Vec<(f64, f64)>>,
    /// Per outage and daemon: seconds from the cut to the first read answered stale or
    /// UNAVAILABLE, i.e. until the daemon showed that it knew.
    first_sign: Mutex<BTreeMap<(u32, usize), f64>>,
    stop: AtomicBool,
    stats: Stats,
    slots: [Arc<Slot>; 2],
}

impl Run {
    fn situation(&self, slot: &Slot) -> Situation {
        if slot.restarting.load(Ordering::SeqCst) {
            Situation::Restart
        } else if self.outage.load(Ordering::SeqCst) {
            Situation::Outage
        } else {
            Situation::Normal
        }
    }

    fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        daemon: usize,
        rpc: &'static str,
        situation: Situation,
        outcome: &str,
        message: Option<&str>,
        took: Option<Duration>,
    ) {
        if rpc.starts_with("GetCredential") || rpc.starts_with("BatchGet") {
            self.outage_sign(daemon, situation, outcome);
        }
        let key = (daemon, rpc, situation, outcome.to_owned());
        if let Some(m) = message {
            let mut messages = self.stats.messages.lock().expect("stats");
            let list = messages.entry(key.clone()).or_default();
            if list.len() < 3 && !list.iter().any(|x| x == m) {
                list.push(m.to_owned());
            }
        }
        if let Some(took) = took {
            let mut latency = self.stats.latency.lock().expect("stats");
            let h = latency
                .entry(key.clone())
                .or_insert_with(|| hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("histogram"));
            h.saturating_record(took.as_micros() as u64);
        }
        *self.stats.counts.lock().expect("stats").entry(key).or_default() += 1;
    }

    /// Notes the first sign, during an outage, that `daemon` knows the store is gone.
    fn outage_sign(&self, daemon: usize, situation: Situation, outcome: &str) {
        if situation != Situation::Outage || !(outcome == "OK stale" || outcome == "UNAVAILABLE") {
            return;
        }
        let (n, cut) = *self.outage_cut.lock().expect("outage");
        if let Some(cut) = cut {
            self.first_sign.lock().expect("outage").entry((n, daemon)).or_insert(cut.elapsed().as_secs_f64());
        }
    }

    fn bad_value(&self, what: String) {
        let mut v = self.stats.bad_values.lock().expect("stats");
        if v.len() < 1000 {
            v.push(what);
        }
    }
}

/// The HTTP/2 error under a status the client made from a transport error, if any.
fn h2_cause(s: &tonic::Status) -> Option<&h2::Error> {
    let mut e = std::error::Error::source(s);
    while let Some(err) = e {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return Some(h);
        }
        e = err.source();
    }
    None
}

/// What the caller was told: the code, or one of two statuses the tonic client makes
/// itself for a request the daemon never handled: one its own connection task dropped
/// while the connection closed (see drain.rs), and one on a stream the daemon's
/// graceful GOAWAY (reason NO_ERROR) left out, which tonic maps to INTERNAL where gRPC
/// means UNAVAILABLE (retry).
fn outcome(s: &tonic::Status) -> &'static str {
    let refused = |h: &h2::Error| h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR);
    if s.code() == Code::Cancelled && s.message() == "operation was canceled" {
        "CANCELLED (client-side)"
    } else if s.code() == Code::Internal && h2_cause(s).is_some_and(refused) {
        "INTERNAL (client-side, GOAWAY)"
    } else {
        credvault::proto::code_name(s.code())
    }
}

/// A status's message, with the HTTP/2 error under it if there is one.
fn detail(s: &tonic::Status) -> String {
    match h2_cause(s) {
        Some(h) => format!("{} [h2: {h:?}]", s.message()),
        None => s.message().to_owned(),
    }
}

/// Whether README documents `outcome` for `rpc` in `situation`. Absent names are never
/// written; every other name is written before the load starts and never deleted.
fn allowed(rpc: &str, situation: Situation, outcome: &str) -> bool {
    let absent = rpc.contains("absent");
    match outcome {
        "OK" => !absent,
        // Cached versions served while the database is unreachable (README, "Serving
        // through a database outage").
        "OK stale" => situation == Situation::Outage && !absent,
        "NOT_FOUND" => absent,
        // Outage: misses and writes fail fast; restart: GOAWAY, then a refused
        // connection until the new process listens.
        "UNAVAILABLE" => situation != Situation::Normal,
        "CANCELLED (client-side)" | "INTERNAL (client-side, GOAWAY)" => situation == Situation::Restart,
        _ => false,
    }
}

fn name_of(i: usize) -> String {
    format!("soak/n{i:05}")
}

fn value_for(name: &str, seq: u64) -> Vec<u8> {
    let mut v = format!("{name}#{seq}#").into_bytes();
    let len = 48 + (seq.wrapping_mul(37) % 900) as usize;
    v.resize(len.max(v.len()), b'v');
    v
}

fn check_value(run: &Run, daemon: usize, name: &str, value: &[u8]) {
    if !value.starts_with(format!("{name}#").as_bytes()) {
        run.bad_value(format!("daemon {} read {name}: a value that is not its own", LABELS[daemon]));
    }
}

// ---------------------------------------------------------------------------------------
// Load

async fn reader(run: Arc<Run>, slot: Arc<Slot>, bearer: Bearer, names: usize, period: Duration, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut follow = Follow::new(slot.clone(), bearer);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let d = slot.index;
    let mut n = 0;
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let mut c = follow.client();
        let roll = rng.random_range(0..100);
        let before = run.situation(&slot);
        if roll < 10 {
            let mut wanted: Vec<String> = (0..8).map(|_| name_of(rng.random_range(0..names))).collect();
            if roll == 0 {
                wanted.push(format!("soak/absent/{}", rng.random_range(0..ABSENT_NAMES)));
            }
            let t = Instant::now();
            let r = c.batch_get_credentials(BatchGetCredentialsRequest { names: wanted.clone() }).await;
            let took = Some(t.elapsed());
            let situation = before.max(run.situation(&slot));
            match r {
                Ok(resp) => {
                    let stale = resp.metadata().get(credvault::service::STALE_HEADER).is_some();
                    run.record(d, "BatchGetCredentials", situation, if stale { "OK stale" } else { "OK" }, None, took);
                    let results = resp.into_inner().results;
                    if results.len() != wanted.len() {
                        run.bad_value(format!("batch of {} answered {} results", wanted.len(), results.len()));
                    }
                    for (name, item) in wanted.iter().zip(results) {
                        let rpc = if name.contains("absent") {
                            "BatchGetCredentials[absent item]"
                        } else {
                            "BatchGetCredentials[item]"
                        };
                        match item.result {
                            Some(batch_get_result::Result::Credential(v)) => {
                                check_value(&run, d, name, &v.value);
                                run.record(d, rpc, situation, if stale { "OK stale" } else { "OK" }, None, None);
                            }
                            Some(batch_get_result::Result::Error(e)) => {
                                let code = credvault::proto::code_name(Code::from(e.code));
                                run.record(d, rpc, situation, code, Some(&e.message), None);
                            }
                            None => run.record(d, rpc, situation, "empty result", None, None),
                        }
                    }
                }
                Err(s) => run.record(d, "BatchGetCredentials", situation, outcome(&s), Some(&detail(&s)), took),
            }
        } else {
            let (name, rpc) = if roll < 15 {
                (format!("soak/absent/{}", rng.random_range(0..ABSENT_NAMES)), "GetCredential(absent)")
            } else {
                (name_of(rng.random_range(0..names)), "GetCredential")
            };
            let t = Instant::now();
            let r = c.get_credential(GetCredentialRequest { name: name.clone(), version: None }).await;
            let took = Some(t.elapsed());
            let situation = before.max(run.situation(&slot));
            match r {
                Ok(resp) => {
                    let stale = resp.metadata().get(credvault::service::STALE_HEADER).is_some();
                    let v = resp.into_inner();
                    check_value(&run, d, &name, &v.value);
                    run.record(d, rpc, situation, if stale { "OK stale" } else { "OK" }, None, took);
                }
                Err(s) => run.record(d, rpc, situation, outcome(&s), Some(&detail(&s)), took),
            }
        }
    }
    n
}

/// A name a writer owns: its last acknowledged version and value, and the values of
/// writes made since whose outcome is unknown (they failed, but may have committed).
struct Owned {
    name: String,
    acked_version: u64,
    acked_value: Vec<u8>,
    pending: Vec<Vec<u8>>,
}

async fn seed_names(slot: Arc<Slot>, bearer: Bearer, names: Vec<String>) -> Vec<Owned> {
    let mut follow = Follow::new(slot, bearer);
    let mut owned = Vec::with_capacity(names.len());
    for name in names {
        let value = value_for(&name, 0);
        let r = follow
            .client()
            .put_credential(PutCredentialRequest {
                name: name.clone(),
                value: value.clone(),
                expected_version: Some(0),
                metadata: None,
            })
            .await
            .unwrap_or_else(|s| panic!("seeding {name}: {s:?}"))
            .into_inner();
        owned.push(Owned { name, acked_version: r.version, acked_value: value, pending: Vec::new() });
    }
    owned
}

async fn writer(
    run: Arc<Run>,
    slot: Arc<Slot>,
    bearer: Bearer,
    mut owned: Vec<Owned>,
    period: Duration,
    seed: u64,
) -> Vec<Owned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut follow = Follow::new(slot.clone(), bearer);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let d = slot.index;
    let mut seq = 1u64;
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let i = rng.random_range(0..owned.len());
        let o = &mut owned[i];
        seq += 1;
        let value = value_for(&o.name, seq);
        // Compare-and-set on what this writer knows; after an unknown outcome it cannot
        // know the version, so the next write is unconditional.
        let expected = o.pending.is_empty().then_some(o.acked_version);
        let before = run.situation(&slot);
        let t = Instant::now();
        let (rpc, r) = if seq % ROTATE_EVERY == 0 {
            let r = follow
                .admin()
                .rotate_credential(RotateCredentialRequest {
                    name: o.name.clone(),
                    source: Some(rotate_credential_request::Source::Value(value.clone())),
                    grace_period: None,
                    expected_version: expected,
                })
                .await
                .map(|r| r.into_inner().version);
            ("RotateCredential", r)
        } else {
            let r = follow
                .client()
                .put_credential(PutCredentialRequest {
                    name: o.name.clone(),
                    value: value.clone(),
                    expected_version: expected,
                    metadata: None,
                })
                .await
                .map(|r| r.into_inner().version);
            ("PutCredential", r)
        };
        let took = Some(t.elapsed());
        let situation = before.max(run.situation(&slot));
        match r {
            Ok(version) => {
                if version <= o.acked_version {
                    run.bad_value(format!("{}: write acknowledged as v{version} after v{}", o.name, o.acked_version));
                }
                o.acked_version = version;
                o.acked_value = value;
                o.pending.clear();
                run.record(d, rpc, situation, "OK", None, took);
            }
            Err(s) => {
                o.pending.push(value);
                run.record(d, rpc, situation, outcome(&s), Some(&detail(&s)), took);
            }
        }
    }
    owned
}

#[derive(Clone, Copy)]
struct Sample {
    t: f64,
    daemon: usize,
    life: u32,
    rss_kib: u64,
    threads: u64,
    fds: u64,
}

fn proc_status(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<u64> {
        s.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

async fn sampler(run: Arc<Run>) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(RSS_EVERY);
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        for slot in &run.slots {
            if slot.restarting.load(Ordering::SeqCst) {
                continue;
            }
            let pid = slot.pid.load(Ordering::SeqCst);
            if let Some((rss_kib, threads)) = proc_status(pid) {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
                let life = slot.life.load(Ordering::SeqCst);
                out.push(Sample { t: run.secs(), daemon: slot.index, life, rss_kib, threads, fds });
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Disruptions

/// The daemon's `credvault.store` health status (it follows the store breaker).
async fn store_status(addr: &str) -> Option<ServingStatus> {
    let ch = Channel::from_shared(format!("http://{addr}")).expect("endpoint").connect().await.ok()?;
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: "credvault.store".into() }).await.ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

async fn store_serving(addr: &str) -> bool {
    store_status(addr).await == Some(ServingStatus::Serving)
}

/// Seconds until `credvault.store` is NOT_SERVING on the slot's daemon, if within `limit`.
async fn until_store_down(slot: &Slot, from: Instant, limit: Duration) -> Option<f64> {
    while from.elapsed() < limit {
        let addr = slot.addr.read().expect("slot").clone();
        if store_status(&addr).await == Some(ServingStatus::NotServing) {
            return Some(from.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Seconds until `credvault.store` is SERVING on the slot's daemon, if within `limit`.
async fn until_store_serving(slot: &Slot, from: Instant, limit: Duration) -> Option<f64> {
    while from.elapsed() < limit {
        let addr = slot.addr.read().expect("slot").clone();
        if store_serving(&addr).await {
            return Some(from.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

struct Timeline {
    events: Vec<(f64, String)>,
    failures: Vec<String>,
}

impl Timeline {
    fn note(&mut self, run: &Run, what: String) {
        println!("soak: {:>6.1} s  {what}", run.secs());
        self.events.push((run.secs(), what));
    }
}

async fn outage(run: &Run, proxies: &mut [PgProxy], n: u32, length: Duration, tl: &mut Timeline) {
    let began = run.secs();
    run.outage.store(true, Ordering::SeqCst);
    *run.outage_cut.lock().expect("outage") = (n, Some(Instant::now()));
    for p in proxies.iter_mut() {
        p.cut().await;
    }
    let cut = Instant::now();
    tl.note(run, format!("outage {n}: both proxies cut for {} s", length.as_secs()));
    let (_, down_a, down_b) = tokio::join!(
        tokio::time::sleep(length),
        until_store_down(&run.slots[0], cut, length),
        until_store_down(&run.slots[1], cut, length)
    );
    for (i, down) in [down_a, down_b].into_iter().enumerate() {
        tl.note(
            run,
            match down {
                Some(s) => {
                    format!("outage {n}: daemon {} store NOT_SERVING (breaker open) {s:.2} s after the cut", LABELS[i])
                }
                None => format!("outage {n}: daemon {} store never NOT_SERVING during the outage", LABELS[i]),
            },
        );
    }
    for p in proxies.iter_mut() {
        p.restore().await;
    }
    let restored = Instant::now();
    tl.note(run, format!("outage {n}: proxies restored"));
    for slot in &run.slots {
        match until_store_serving(slot, restored, Duration::from_secs(30)).await {
            Some(s) => tl.note(
                run,
                format!("outage {n}: daemon {} store SERVING {s:.2} s after the restore", LABELS[slot.index]),
            ),
            None => tl
                .failures
                .push(format!("outage {n}: daemon {} store not SERVING 30 s after the restore", LABELS[slot.index])),
        }
    }
    tokio::time::sleep(OUTAGE_TAIL.saturating_sub(restored.elapsed())).await;
    run.outage.store(false, Ordering::SeqCst);
    run.disruptions.lock().expect("disruptions").push((began, run.secs()));
    for slot in &run.slots {
        let sign = run.first_sign.lock().expect("outage").get(&(n, slot.index)).copied();
        tl.note(
            run,
            match sign {
                Some(s) => format!(
                    "outage {n}: daemon {} first answered a read stale or UNAVAILABLE {s:.2} s after the cut",
                    LABELS[slot.index]
                ),
                None => format!("outage {n}: daemon {} answered no read stale or UNAVAILABLE", LABELS[slot.index]),
            },
        );
    }
}

async fn kek_rotation(run: &Run, bearer: Bearer, tl: &mut Timeline) -> Option<proto::RotationJob> {
    let began = run.secs();
    let job = kek_rotation_job(run, bearer, tl).await;
    run.disruptions.lock().expect("disruptions").push((began, run.secs()));
    job
}

async fn kek_rotation_job(run: &Run, bearer: Bearer, tl: &mut Timeline) -> Option<proto::RotationJob> {
    let slot = &run.slots[0];
    let mut admin = Follow::new(slot.clone(), bearer);
    let started = Instant::now();
    let job = match admin.admin().rotate_kek(RotateKekRequest {}).await {
        Ok(r) => {
            run.record(0, "RotateKek", run.situation(slot), "OK", None, None);
            r.into_inner()
        }
        Err(s) => {
            run.record(0, "RotateKek", run.situation(slot), outcome(&s), Some(&detail(&s)), None);
            tl.failures.push(format!("RotateKek failed: {s:?}"));
            return None;
        }
    };
    tl.note(
        run,
        format!("KEK rotation: job {} to KEK {}, {} versions to re-wrap", job.job_id, job.new_kek_id, job.total),
    );
    while started.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match admin.admin().get_rotation_job(GetRotationJobRequest { job_id: job.job_id }).await {
            Ok(r) => {
                run.record(0, "GetRotationJob", run.situation(slot), "OK", None, None);
                let j = r.into_inner();
                if j.state != proto::JobState::Running as i32 {
                    let state = proto::JobState::try_from(j.state).map(|s| s.as_str_name()).unwrap_or("?");
                    tl.note(
                        run,
                        format!(
                            "KEK rotation: job {} {state} after {:.1} s: {}/{} re-wrapped, {} failed, {:.0}/s",
                            j.job_id,
                            started.elapsed().as_secs_f64(),
                            j.done,
                            j.total,
                            j.failed,
                            j.rate_per_second
                        ),
                    );
                    if j.state != proto::JobState::Completed as i32 || j.failed > 0 {
                        tl.failures
                            .push(format!("KEK re-wrap job ended {state} with {} failed: {}", j.failed, j.error));
                    }
                    return Some(j);
                }
            }
            Err(s) => run.record(0, "GetRotationJob", run.situation(slot), outcome(&s), Some(&detail(&s)), None),
        }
    }
    tl.failures.push("KEK re-wrap job still running after 300 s".into());
    None
}

struct Lives {
    starts: Vec<(usize, u32, f64)>,
}

async fn restart(
    run: &Run,
    daemon: &mut Option<Running>,
    spec: &Spec,
    tally: Arc<LogTally>,
    lives: &mut Lives,
    tl: &mut Timeline,
) {
    let slot = &run.slots[1];
    let began = run.secs();
    slot.restarting.store(true, Ordering::SeqCst);
    let old = daemon.take().expect("daemon B runs");
    tl.note(run, format!("restart: SIGTERM to daemon B (pid {})", old.pid));
    let (status, took) = terminate(old).await;
    tl.note(run, format!("restart: daemon B exited with {status} after {:.2} s", took.as_secs_f64()));
    if !status.success() {
        tl.failures.push(format!("daemon B exited with {status} on SIGTERM (want 0)"));
    }
    let life = slot.life.load(Ordering::SeqCst) + 1;
    let t0 = Instant::now();
    let new = spawn(spec, tally, life).await;
    *slot.addr.write().expect("slot") = new.addr.clone();
    slot.pid.store(new.pid, Ordering::SeqCst);
    slot.life.store(life, Ordering::SeqCst);
    slot.generation.fetch_add(1, Ordering::SeqCst);
    lives.starts.push((1, life, run.secs()));
    tl.note(
        run,
        format!(
            "restart: daemon B serving again on {} (pid {}) {:.2} s after its start",
            new.addr,
            new.pid,
            t0.elapsed().as_secs_f64()
        ),
    );
    *daemon = Some(new);
    tokio::time::sleep(RESTART_TAIL).await;
    slot.restarting.store(false, Ordering::SeqCst);
    run.disruptions.lock().expect("disruptions").push((began, run.secs()));
}

/// Memory is judged between disruptions only, from this long after each one ends: an
/// outage leaves bounded high-water marks (the audit backlog, its batches) that the
/// allocator keeps.
const SETTLE_SECONDS: f64 = 30.0;
/// Shorter quiet windows are too short for a slope.
const MIN_QUIET_SECONDS: f64 = 45.0;

/// The parts of [from, to) at least `SETTLE_SECONDS` away from every disruption.
fn quiet_windows(from: f64, to: f64, disruptions: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let mut windows = vec![(from, to)];
    for &(a, b) in disruptions {
        let b = b + SETTLE_SECONDS;
        windows = windows
            .into_iter()
            .flat_map(|(x, y)| {
                if b <= x || a >= y {
                    return vec![(x, y)];
                }
                let mut parts = Vec::new();
                if a > x {
                    parts.push((x, a));
                }
                if b < y {
                    parts.push((b, y));
                }
                parts
            })
            .collect();
    }
    windows.retain(|(x, y)| y - x >= MIN_QUIET_SECONDS);
    windows
}

// ---------------------------------------------------------------------------------------
// Verification at the end

async fn scrape(metrics_addr: &str) -> String {
    use tokio::io::AsyncReadExt as _;
    let Ok(mut s) = tokio::net::TcpStream::connect(metrics_addr).await else { return String::new() };
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.is_err() {
        return String::new();
    }
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default()
}

/// The sum of every sample of `metric` whose labels contain `filter`.
fn metric_sum(body: &str, metric: &str, filter: &str) -> f64 {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[derive(Default)]
struct Verdict {
    names: usize,
    lost: Vec<String>,
    unreadable: Vec<String>,
    wrong: Vec<String>,
    ahead: usize,
    old_kek_versions: i64,
    kek_states: Vec<(i64, String)>,
}

async fn verify(db_url: &str, run: &Run, bearer: &Bearer, owned: &[Owned]) -> Verdict {
    let mut v = Verdict { names: owned.len(), ..Verdict::default() };
    let pool = sqlx::PgPool::connect(db_url).await.expect("connect to the soak database");
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT name, current_version FROM credentials WHERE deleted_at IS NULL AND name LIKE 'soak/%'")
            .fetch_all(&pool)
            .await
            .expect("read current versions");
    let current: HashMap<String, u64> = rows.into_iter().map(|(n, c)| (n, c as u64)).collect();
    v.kek_states = sqlx::query_as("SELECT id, state FROM keks ORDER BY id").fetch_all(&pool).await.expect("keks");
    let active = v.kek_states.iter().find(|(_, s)| s == "active").map(|(id, _)| *id).unwrap_or(0);
    v.old_kek_versions = sqlx::query_scalar("SELECT count(*) FROM credential_versions WHERE kek_id <> $1")
        .bind(active)
        .fetch_one(&pool)
        .await
        .expect("count versions under old KEKs");
    pool.close().await;

    let mut expected: HashMap<&str, (u64, Vec<&[u8]>)> = HashMap::new();
    for o in owned {
        let Some(&cur) = current.get(&o.name) else {
            v.lost.push(format!("{}: acknowledged v{}, not in the store", o.name, o.acked_version));
            continue;
        };
        if cur < o.acked_version {
            v.lost.push(format!("{}: acknowledged v{}, store has v{cur}", o.name, o.acked_version));
            continue;
        }
        let values = if cur == o.acked_version {
            vec![o.acked_value.as_slice()]
        } else {
            // A write that failed (outage, restart) but committed before the failure.
            v.ahead += 1;
            o.pending.iter().map(Vec::as_slice).collect()
        };
        if values.is_empty() {
            v.wrong.push(format!(
                "{}: store at v{cur} beyond acknowledged v{} with no write pending",
                o.name, o.acked_version
            ));
        }
        expected.insert(&o.name, (cur, values));
    }

    // Every name's current version through both daemons, and its acknowledged version by
    // number through one of them.
    for slot in &run.slots {
        let mut c = Follow::new(slot.clone(), bearer.clone()).client();
        for chunk in owned.chunks(100) {
            let names: Vec<String> = chunk.iter().map(|o| o.name.clone()).collect();
            let r = c.batch_get_credentials(BatchGetCredentialsRequest { names: names.clone() }).await;
            let results = match r {
                Ok(r) => r.into_inner().results,
                Err(s) => {
                    v.unreadable.push(format!("daemon {}: batch read failed: {s:?}", LABELS[slot.index]));
                    continue;
                }
            };
            for (name, item) in names.iter().zip(results) {
                match item.result {
                    Some(batch_get_result::Result::Credential(got)) => {
                        if let Some((cur, values)) = expected.get(name.as_str()) {
                            if got.version != *cur || !values.contains(&got.value.as_slice()) {
                                v.wrong.push(format!(
                                    "daemon {}: {name} read v{} ({} bytes), store has v{cur}",
                                    LABELS[slot.index],
                                    got.version,
                                    got.value.len()
                                ));
                            }
                        }
                    }
                    Some(batch_get_result::Result::Error(e)) => v.unreadable.push(format!(
                        "daemon {}: {name}: {} {}",
                        LABELS[slot.index],
                        credvault::proto::code_name(Code::from(e.code)),
                        e.message
                    )),
                    None => v.unreadable.push(format!("daemon {}: {name}: empty result", LABELS[slot.index])),
                }
            }
        }
    }
    let mut clients = [
        Follow::new(run.slots[0].clone(), bearer.clone()).client(),
        Follow::new(run.slots[1].clone(), bearer.clone()).client(),
    ];
    for (i, o) in owned.iter().enumerate() {
        let c = &mut clients[i % 2];
        match c.get_credential(GetCredentialRequest { name: o.name.clone(), version: Some(o.acked_version) }).await {
            Ok(r) => {
                let r = r.into_inner();
                if r.value != o.acked_value {
                    v.lost.push(format!("{} v{}: reads back a different value", o.name, o.acked_version));
                }
            }
            Err(s) => v.lost.push(format!(
                "{} v{}: {} {}",
                o.name,
                o.acked_version,
                credvault::proto::code_name(s.code()),
                s.message()
            )),
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Report

/// Least-squares slope of (minutes, MiB).
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    sxy / sxx
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------
// The run

async fn soak(cfg: Config, db: String) -> bool {
    let db_url = with_database(&cfg.admin_url, &db);
    let work = std::env::temp_dir().join(&db);
    std::fs::create_dir_all(&work).expect("work dir");
    let key_file = work.join("master.key");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .expect("create the key file");
        f.write_all(hex::encode(key).as_bytes()).expect("write the key file");
    }
    let config = work.join("credvault.toml");
    let cache_entries = (cfg.names * 2 / 3).max(16);
    std::fs::write(
        &config,
        format!(
            "shutdown_grace_seconds = 5\n\n[cache]\n# Fewer entries than names: capacity misses are part of the mix.\nmax_entries = {cache_entries}\n\n\
             [rotation]\n# A job that lasts seconds, under load.\nrewrap_batch_size = 500\nrewrap_pause_ms = 100\n"
        ),
    )
    .expect("write the daemon config");

    let mut proxies = vec![PgProxy::start().await, PgProxy::start().await];
    let tallies = [Arc::new(LogTally::default()), Arc::new(LogTally::default())];
    let specs: Vec<Spec> = (0..2)
        .map(|i| {
            let data_dir = work.join(format!("data-{}", LABELS[i]));
            std::fs::create_dir_all(&data_dir).expect("data dir");
            Spec {
                label: LABELS[i],
                config: config.clone(),
                data_dir,
                key_file: key_file.clone(),
                database_url: proxies[i].url(&db_url),
                log_file: work.join(format!("daemon-{}.log", LABELS[i])),
                heaptrack: if i == 0 { cfg.heaptrack.clone() } else { None },
            }
        })
        .collect();

    println!(
        "soak: database {db}, work dir {}, {} s ({} s warm-up), {} names, {} reads/s, {} writes/s, outages of {} s, seed {}",
        work.display(),
        cfg.seconds,
        cfg.warmup,
        cfg.names,
        cfg.read_rate,
        cfg.write_rate,
        cfg.outage,
        cfg.seed
    );
    if let Some(h) = &cfg.heaptrack {
        println!("soak: daemon A runs under heaptrack -o {}", h.display());
    }
    let a = spawn(&specs[0], tallies[0].clone(), 0).await;
    let token = a.root_token.clone().expect("the first daemon prints a root token");
    let b = spawn(&specs[1], tallies[1].clone(), 0).await;
    let bearer = Bearer(format!("Bearer {token}").parse().expect("ascii token"));
    let slot = |i: usize, r: &Running| {
        Arc::new(Slot {
            index: i,
            addr: RwLock::new(r.addr.clone()),
            generation: AtomicU32::new(0),
            pid: AtomicU32::new(r.pid),
            life: AtomicU32::new(0),
            restarting: AtomicBool::new(false),
        })
    };
    let slots = [slot(0, &a), slot(1, &b)];
    println!("soak: daemon A on {} (pid {}), daemon B on {} (pid {})", a.addr, a.pid, b.addr, b.pid);
    let mut daemons = [Some(a), Some(b)];

    // Seed every name (version 1) through the daemon of the writer that owns it.
    let writers = 2 * WRITERS_PER_DAEMON;
    let t = Instant::now();
    let mut seeding = tokio::task::JoinSet::new();
    for w in 0..writers {
        let names: Vec<String> = (w..cfg.names).step_by(writers).map(name_of).collect();
        seeding.spawn(seed_names(slots[w % 2].clone(), bearer.clone(), names).then_with(w));
    }
    let mut owned_by: BTreeMap<usize, Vec<Owned>> = BTreeMap::new();
    while let Some(r) = seeding.join_next().await {
        let (w, owned) = r.expect("seeding task");
        owned_by.insert(w, owned);
    }
    println!("soak: seeded {} names in {:.1} s", cfg.names, t.elapsed().as_secs_f64());

    let run = Arc::new(Run {
        start: Instant::now(),
        outage: AtomicBool::new(false),
        outage_cut: Mutex::new((0, None)),
        disruptions: Mutex::default(),
        first_sign: Mutex::default(),
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        slots: slots.clone(),
    });
    let mut lives = Lives { starts: vec![(0, 0, 0.0), (1, 0, 0.0)] };
    let readers = 2 * READERS_PER_DAEMON;
    let read_period = Duration::from_secs_f64(readers as f64 / cfg.read_rate);
    let write_period = Duration::from_secs_f64(writers as f64 / cfg.write_rate);
    let mut read_tasks = Vec::new();
    for r in 0..readers {
        let s = slots[r % 2].clone();
        read_tasks.push(tokio::spawn(reader(
            run.clone(),
            s,
            bearer.clone(),
            cfg.names,
            read_period,
            cfg.seed + r as u64,
        )));
    }
    let mut write_tasks = Vec::new();
    for (w, owned) in owned_by {
        let s = slots[w % 2].clone();
        let seed = cfg.seed + 1000 + w as u64;
        write_tasks.push(tokio::spawn(writer(run.clone(), s, bearer.clone(), owned, write_period, seed)));
    }
    let sampler_task = tokio::spawn(sampler(run.clone()));

    // The schedule: outage, KEK rotation, restart, outage, each at a fixed share of the run.
    let d = cfg.seconds as f64;
    let at = |share: f64| run.start + Duration::from_secs_f64(d * share);
    let outage_len = Duration::from_secs(cfg.outage);
    let mut tl = Timeline { events: Vec::new(), failures: Vec::new() };
    tl.note(&run, "load started".into());
    tokio::time::sleep_until(at(0.25).into()).await;
    outage(&run, &mut proxies, 1, outage_len, &mut tl).await;
    tokio::time::sleep_until(at(0.40).into()).await;
    let job = kek_rotation(&run, bearer.clone(), &mut tl).await;
    tokio::time::sleep_until(at(0.55).into()).await;
    let [_, b_daemon] = &mut daemons;
    restart(&run, b_daemon, &specs[1], tallies[1].clone(), &mut lives, &mut tl).await;
    tokio::time::sleep_until(at(0.75).into()).await;
    outage(&run, &mut proxies, 2, outage_len, &mut tl).await;
    tokio::time::sleep_until(at(1.0).into()).await;
    run.stop.store(true, Ordering::SeqCst);
    let elapsed = run.secs();
    tl.note(&run, "load stopped".into());

    let mut reads = 0;
    for t in read_tasks {
        reads += t.await.expect("reader task");
    }
    let mut owned: Vec<Owned> = Vec::new();
    for t in write_tasks {
        owned.extend(t.await.expect("writer task"));
    }
    let samples = sampler_task.await.expect("sampler task");
    let _ = reads;

    // Final state, then a clean stop of both daemons.
    for slot in &run.slots {
        if until_store_serving(slot, Instant::now(), Duration::from_secs(30)).await.is_none() {
            tl.failures.push(format!("daemon {}: store not SERVING at the end", LABELS[slot.index]));
        }
    }
    let verdict = verify(&db_url, &run, &bearer, &owned).await;
    let mut metrics = Vec::new();
    for d in daemons.iter() {
        let d = d.as_ref().expect("both daemons run");
        metrics.push(scrape(&d.metrics_addr).await);
    }
    let mut exits = Vec::new();
    for (i, d) in daemons.iter_mut().enumerate() {
        let (status, took) = terminate(d.take().expect("both daemons run")).await;
        if !status.success() {
            tl.failures.push(format!("daemon {} exited with {status} on the final SIGTERM (want 0)", LABELS[i]));
        }
        exits.push((status, took));
    }

    let csv: String = std::iter::once("t_seconds,daemon,life,rss_kib,threads,fds\n".to_owned())
        .chain(
            samples
                .iter()
                .map(|s| format!("{:.1},{},{},{},{},{}\n", s.t, LABELS[s.daemon], s.life, s.rss_kib, s.threads, s.fds)),
        )
        .collect();
    let _ = std::fs::write(work.join("rss.csv"), csv);
    let ok = report(&cfg, &run, elapsed, &tl, job.as_ref(), &verdict, &samples, &lives, &metrics, &exits, &tallies);
    if ok && std::env::var_os("SOAK_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("soak: logs kept in {}", work.display());
    }
    ok
}

/// Tags a future's output with `tag`.
trait ThenWith: std::future::Future + Sized {
    fn then_with<T>(self, tag: T) -> impl std::future::Future<Output = (T, Self::Output)> {
        async move { (tag, self.await) }
    }
}
impl<F: std::future::Future> ThenWith for F {}

#[allow(clippy::too_many_arguments)]
fn report(
    cfg: &Config,
    run: &Run,
    elapsed: f64,
    tl: &Timeline,
    job: Option<&proto::RotationJob>,
    v: &Verdict,
    samples: &[Sample],
    lives: &Lives,
    metrics: &[String],
    exits: &[(std::process::ExitStatus, Duration)],
    tallies: &[Arc<LogTally>; 2],
) -> bool {
    let mut out = String::new();
    let mut failures: Vec<String> = tl.failures.clone();
    let _ = writeln!(out, "\n==================== soak report ====================");
    let _ = writeln!(
        out,
        "{elapsed:.0} s of load, {} names, warm-up {} s, seed {}{}",
        cfg.names,
        cfg.warmup,
        cfg.seed,
        if cfg.heaptrack.is_some() { ", daemon A under heaptrack" } else { "" }
    );

    let _ = writeln!(out, "\n-- timeline");
    for (t, e) in &tl.events {
        let _ = writeln!(out, "{t:>7.1} s  {e}");
    }

    let counts = run.stats.counts.lock().expect("stats").clone();
    let messages = run.stats.messages.lock().expect("stats").clone();
    let latency = run.stats.latency.lock().expect("stats").clone();
    let _ = writeln!(out, "\n-- gRPC outcomes (daemon, RPC, situation, outcome: count; latency p50 / p99 / max in ms)");
    let mut per_rpc: BTreeMap<&str, u64> = BTreeMap::new();
    let mut bad = 0u64;
    for ((d, rpc, sit, outcome), n) in &counts {
        let ok = allowed(rpc, *sit, outcome);
        if !rpc.contains('[') {
            *per_rpc.entry(rpc).or_default() += n;
        }
        let lat = latency
            .get(&(*d, *rpc, *sit, outcome.clone()))
            .map(|h| {
                let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
                format!("{:>8.2} {:>8.2} {:>8.1}", ms(0.5), ms(0.99), h.max() as f64 / 1000.0)
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}  {rpc:<34} {:<8} {outcome:<24} {n:>9} {lat}{}",
            LABELS[*d],
            sit.name(),
            if ok { "" } else { "   <-- not documented for this situation" }
        );
        if !ok {
            bad += n;
            let key = (*d, *rpc, *sit, outcome.clone());
            let m = messages.get(&key).map(|m| m.join(" | ")).unwrap_or_default();
            failures.push(format!("{n} x {outcome} on {rpc} ({}, daemon {}): {m}", sit.name(), LABELS[*d]));
        } else if let Some(m) = messages.get(&(*d, *rpc, *sit, outcome.clone())) {
            if outcome != "NOT_FOUND" {
                let _ = writeln!(out, "      e.g. {}", m.join(" | "));
            }
        }
    }
    let total: u64 = per_rpc.values().sum();
    let _ = writeln!(out, "\n-- requests ({total} in all, {:.0}/s)", total as f64 / elapsed);
    for (rpc, n) in &per_rpc {
        let _ = writeln!(out, "{rpc:<34} {n:>9}  {:>8.1}/s", *n as f64 / elapsed);
    }
    let _ = writeln!(out, "outcomes outside the documented set: {bad}");

    let bad_values = run.stats.bad_values.lock().expect("stats").clone();
    if !bad_values.is_empty() {
        failures.push(format!("{} wrong values read during the run, e.g. {}", bad_values.len(), bad_values[0]));
    }

    let _ = writeln!(out, "\n-- final state");
    let _ = writeln!(
        out,
        "names: {}; lost acknowledged writes: {}; unreadable: {}; wrong version or value: {}; \
         store ahead of the last ack (a failed write that committed): {}",
        v.names,
        v.lost.len(),
        v.unreadable.len(),
        v.wrong.len(),
        v.ahead
    );
    let _ = writeln!(
        out,
        "KEKs: {:?}; versions under a KEK other than the active one: {}",
        v.kek_states, v.old_kek_versions
    );
    for (what, list) in [("lost", &v.lost), ("unreadable", &v.unreadable), ("wrong", &v.wrong)] {
        if !list.is_empty() {
            failures.push(format!("{} {what}, e.g. {}", list.len(), list[..list.len().min(3)].join("; ")));
        }
    }
    if job.is_none() {
        failures.push("no completed KEK rotation".into());
    }
    if v.old_kek_versions != 0 && job.is_some() {
        failures.push(format!("{} versions still under an old KEK after the job completed", v.old_kek_versions));
    }
    for (i, (status, took)) in exits.iter().enumerate() {
        let _ = writeln!(out, "daemon {}: final SIGTERM: {status} after {:.2} s", LABELS[i], took.as_secs_f64());
    }

    let _ = writeln!(
        out,
        "\n-- resident memory (VmRSS every {} s; slope by least squares after warm-up)",
        RSS_EVERY.as_secs()
    );
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>8} {:>8} {:>8} {:>13} {:>9} {:>12} {:>8} {:>8} {:>8}",
        "process",
        "from s",
        "warm MiB",
        "end MiB",
        "max MiB",
        "MiB/min",
        "2nd half /min",
        "quiet min",
        "quiet /min",
        "samples",
        "threads",
        "fds"
    );
    let disruptions = run.disruptions.lock().expect("disruptions").clone();
    for &(d, life, start) in &lives.starts {
        let all: Vec<&Sample> = samples.iter().filter(|s| s.daemon == d && s.life == life).collect();
        let after: Vec<&Sample> = all.iter().copied().filter(|s| s.t >= start + cfg.warmup as f64).collect();
        let label = format!("{} life {life}", LABELS[d]);
        let (Some(first), Some(last)) = (after.first(), after.last()) else {
            let _ = writeln!(out, "{label:<10} (no samples after warm-up)");
            continue;
        };
        let points: Vec<(f64, f64)> = after.iter().map(|s| (s.t / 60.0, mib(s.rss_kib))).collect();
        let max = after.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        // Between disruptions: the slope of each quiet window, weighted by its length.
        let (mut weighted, mut quiet) = (0.0, 0.0);
        for (x, y) in quiet_windows(first.t, last.t + 0.1, &disruptions) {
            let w: Vec<(f64, f64)> = points.iter().copied().filter(|p| p.0 * 60.0 >= x && p.0 * 60.0 < y).collect();
            if w.len() >= 10 {
                weighted += slope(&w) * (y - x);
                quiet += y - x;
            }
        }
        let quiet_slope = if quiet > 0.0 { weighted / quiet } else { f64::NAN };
        if quiet >= 2.0 * MIN_QUIET_SECONDS && quiet_slope > cfg.max_quiet_slope {
            failures.push(format!(
                "{label}: resident memory grew {quiet_slope:.3} MiB/min between disruptions                  (over {:.1} min; limit {} MiB/min, SOAK_MAX_QUIET_SLOPE)",
                quiet / 60.0,
                cfg.max_quiet_slope
            ));
        }
        let _ = writeln!(
            out,
            "{label:<10} {:>7.0} {:>9.1} {:>8.1} {:>8.1} {:>+8.3} {:>+13.3} {:>9.1} {:>+12.3} {:>8} {:>3}->{:<4} {:>3}->{:<4}",
            first.t,
            mib(first.rss_kib),
            mib(last.rss_kib),
            mib(max),
            slope(&points),
            slope(&points[points.len() / 2..]),
            quiet / 60.0,
            quiet_slope,
            after.len(),
            first.threads,
            last.threads,
            first.fds,
            last.fds
        );
    }

    let _ = writeln!(out, "\nresident MiB by minute of the run (mean of the samples in it):");
    let minutes = (elapsed / 60.0).ceil() as usize;
    let _ = writeln!(out, "{:>6} {:>8} {:>8}", "minute", "A", "B");
    for m in 0..minutes {
        let mean = |d: usize| {
            let v: Vec<u64> = samples
                .iter()
                .filter(|s| s.daemon == d && s.t >= m as f64 * 60.0 && s.t < (m + 1) as f64 * 60.0)
                .map(|s| s.rss_kib)
                .collect();
            if v.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}", mib(v.iter().sum::<u64>()) / v.len() as f64)
            }
        };
        let _ = writeln!(out, "{m:>6} {:>8} {:>8}", mean(0), mean(1));
    }

    let _ = writeln!(out, "\n-- daemon metrics at the end (one scrape, none during the run)");
    for (i, body) in metrics.iter().enumerate() {
        let hits = metric_sum(body, "credvault_cache_hits_total", "");
        let misses = metric_sum(body, "credvault_cache_misses_total", "");
        let _ = writeln!(
            out,
            "daemon {} (since its last start): cache hits {hits:.0}, misses {misses:.0} ({:.1}% hits), stale serves {:.0}, \
             resyncs {:.0}, evictions {:.0}, entries {:.0}, cache bytes {:.0}, audit dropped {:.0}, audit write failures {:.0}",
            LABELS[i],
            100.0 * hits / (hits + misses).max(1.0),
            metric_sum(body, "credvault_cache_stale_serves_total", ""),
            metric_sum(body, "credvault_cache_resyncs_total", ""),
            metric_sum(body, "credvault_cache_evictions_total", ""),
            metric_sum(body, "credvault_cache_entries", ""),
            metric_sum(body, "credvault_cache_bytes", ""),
            metric_sum(body, "credvault_audit_events_dropped_total", ""),
            metric_sum(body, "credvault_audit_write_failures_total", ""),
        );
    }

    let _ = writeln!(out, "\n-- warnings and errors the daemons logged");
    for (i, t) in tallies.iter().enumerate() {
        let by = t.by_message.lock().expect("tally");
        let _ = writeln!(out, "daemon {}: {} log lines", LABELS[i], t.lines.load(Ordering::Relaxed));
        for ((level, message), n) in by.iter() {
            let _ = writeln!(out, "  {level:<5} {n:>6} x {message}");
        }
    }

    let _ = writeln!(out, "\n-- verdict");
    if failures.is_empty() {
        let _ = writeln!(out, "PASS");
    } else {
        for f in &failures {
            let _ = writeln!(out, "FAIL: {f}");
        }
    }
    println!("{out}");
    failures.is_empty()
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
