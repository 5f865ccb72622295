//! `credvault bench`: a load generator for a running daemon, and the gRPC baseline it is
//! measured against.
//!
//! The bench connects `--connections` HTTP/2 connections, seeds `--keys` credentials of
//! `--value-size` bytes (or reuses the ones there), and runs `--concurrency` callers that
//! share the connections round robin. A closed loop (the default) has each caller send
//! its next request when the previous one returns; `--rate R` is an open loop instead: a
//! pacer thread schedules requests at R per second, callers take them in order, and each
//! latency is measured from the request's *scheduled* start, so time spent waiting for a
//! free caller counts (coordinated omission corrected). Latencies go into HDR histograms.
//!
//! `--baseline` also starts, in this process, a bare tonic server that answers the same
//! messages with constants from memory (no auth, no cache, no audit), and measures it with
//! the same client settings, alternating with the daemon round by round. It is the gRPC
//! ceiling of the machine, so the report can state the daemon as a ratio of it.
//!
//! Every loop is bounded: by the request count, by the duration, and always by
//! `--max-time`; every request by `--request-timeout`.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::ValueEnum as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Mutex};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

use super::client::{bearer, endpoint, BearerToken as Bearer, ClientError};
use super::Connection;
use crate::proto::credential_service_client::CredentialServiceClient;
use crate::proto::credential_service_server::{CredentialService, CredentialServiceServer};
use crate::proto::{self, batch_get_result};

/// What each request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// `GetCredential` of a seeded name (a cache hit once warm).
    Get,
    /// `BatchGetCredentials` of `--batch-size` seeded names.
    BatchGet,
    /// `PutCredential` with `expected_version` (compare-and-set) on a seeded name.
    Put,
    /// Gets and puts, `--read-ratio` of them gets.
    Mixed,
    /// `GetCredential` of a name never asked before, which forces a store read (answered
    /// NOT_FOUND, the expected outcome).
    Miss,
}

/// How a request picks its credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KeyDistribution {
    Uniform,
    /// Key i with weight 1/(i+1)^s (`--zipf-exponent`): a few hot credentials.
    Zipf,
    /// Every key in turn (request n reads key n mod keys): warms every entry.
    Sequential,
}

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "bench")]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = Workload::Get)]
    pub workload: Workload,
    /// Credentials to use, named PREFIX000000, PREFIX000001, ...
    #[arg(long, default_value_t = 1000)]
    pub keys: u64,
    /// Bytes per value written when seeding or putting.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    #[arg(long, default_value = "bench/")]
    pub prefix: String,
    /// Use the credentials already there: create none.
    #[arg(long)]
    pub no_seed: bool,
    /// Seconds to measure (per round) [default: 10 unless --requests is given].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Requests to measure (per round).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Seconds of the same load before each measurement, not recorded.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// Concurrent callers.
    #[arg(short = 'c', long, default_value_t = 1)]
    pub concurrency: usize,
    /// HTTP/2 connections the callers share (caller i uses connection i mod K).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Open loop at this many requests per second, latency measured from each request's
    /// scheduled start.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    pub distribution: KeyDistribution,
    #[arg(long, default_value_t = 0.99)]
    pub zipf_exponent: f64,
    /// Names per BatchGetCredentials request.
    #[arg(long, default_value_t = 10)]
    pub batch_size: usize,
    /// Share of gets in the mixed workload (0 to 1).
    #[arg(long, default_value_t = 0.9)]
    pub read_ratio: f64,
    /// Also measure the in-process gRPC baseline, alternating with the daemon each round,
    /// and report the daemon as a ratio of it.
    #[arg(long)]
    pub baseline: bool,
    /// Measure only the baseline (needs no daemon).
    #[arg(long, conflicts_with = "baseline")]
    pub baseline_only: bool,
    /// Tokio worker threads of the baseline server.
    #[arg(long, default_value_t = 1)]
    pub baseline_workers: usize,
    /// Measurement rounds; with --baseline each round measures the baseline, then the daemon.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Seconds after which a single request counts as a TIMEOUT error.
    #[arg(long, default_value_t = 10.0)]
    pub request_timeout: f64,
    /// Seconds any one measurement may take, whatever --requests says.
    #[arg(long, default_value_t = 600.0)]
    pub max_time: f64,
    /// Process id of a local daemon: report its resident memory (from /proc) after the run.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// A label for this run, copied into the report.
    #[arg(long)]
    pub label: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Connection,
}

/// The settings a report was made with.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSettings {
    pub label: Option<String>,
    pub workload: Workload,
    pub distribution: KeyDistribution,
    pub keys: u64,
    pub value_size: usize,
    pub batch_size: usize,
    pub read_ratio: f64,
    pub concurrency: usize,
    pub connections: usize,
    /// Requests per second in open-loop mode; `None`: closed loop.
    pub rate: Option<f64>,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub rounds: usize,
    pub baseline_workers: usize,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Latency {
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// One target's measurement, pooled over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `credvault` or `baseline`.
    pub target: String,
    /// Requests measured: `ok + conflicts + errors`.
    pub requests: u64,
    /// Requests with the expected outcome (OK; NOT_FOUND for the miss workload).
    pub ok: u64,
    /// Compare-and-set puts that lost to another writer (ABORTED / FAILED_PRECONDITION).
    pub conflicts: u64,
    pub errors: u64,
    /// Every outcome by status code name (`TIMEOUT` for requests that timed out).
    pub outcomes: BTreeMap<String, u64>,
    /// Measured seconds, summed over rounds.
    pub elapsed_s: f64,
    pub throughput_rps: f64,
    pub latency_us: Latency,
    /// `[percentile, microseconds]` from 0 to 99.999 and the maximum, for plots.
    pub distribution: Vec<[f64; 2]>,
    pub rounds: Vec<RoundStats>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundStats {
    pub requests: u64,
    pub throughput_rps: f64,
    pub p50_us: f64,
    pub p95_us: f64,
    pub p99_us: f64,
}

/// The daemon's numbers divided by the baseline's.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    pub throughput: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchOutput {
    pub settings: BenchSettings,
    pub baseline: Option<Report>,
    pub credvault: Option<Report>,
    /// Pooled over rounds.
    pub ratios: Option<Ratios>,
    /// Round by round: how much the ratio moves is the noise of the machine.
    pub ratios_by_round: Vec<Ratios>,
    /// Resident memory of `--server-pid` after the run.
    pub server_rss_bytes: Option<u64>,
}

/// Runs the bench and prints its report (text, or JSON with `--json`).
pub async fn run(args: BenchArgs, out: &mut impl Write) -> Result<(), ClientError> {
    let output = run_bench(&args).await?;
    if args.json {
        serde_json::to_writer_pretty(&mut *out, &output).map_err(std::io::Error::other)?;
        writeln!(out)?;
    } else {
        print_text(&output, out)?;
    }
    Ok(())
}

fn usage(msg: impl Into<String>) -> ClientError {
    ClientError::Usage(msg.into())
}

fn check(args: &BenchArgs) -> Result<(), ClientError> {
    let positive = |v: f64| v.is_finite() && v > 0.0;
    if args.concurrency == 0 || args.concurrency > 10_000 {
        return Err(usage("--concurrency must be between 1 and 10000"));
    }
    if args.connections == 0 || args.connections > args.concurrency {
        return Err(usage("--connections must be between 1 and --concurrency"));
    }
    if args.keys == 0 || args.keys > 10_000_000 {
        return Err(usage("--keys must be between 1 and 10000000"));
    }
    if args.value_size == 0 || args.value_size > 16 * 1024 * 1024 {
        return Err(usage("--value-size must be between 1 and 16 MiB"));
    }
    if args.batch_size == 0 || args.batch_size > 10_000 {
        return Err(usage("--batch-size must be between 1 and 10000"));
    }
    if !(0.0..=1.0).contains(&args.read_ratio) {
        return Err(usage("--read-ratio must be between 0 and 1"));
    }
    if args.rate.is_some_and(|r| !positive(r) || r > 10_000_000.0) {
        return Err(usage("--rate must be positive (and at most 10000000)"));
    }
    if args.duration.is_some_and(|d| !positive(d)) || !positive(args.max_time) || !positive(args.request_timeout) {
        return Err(usage("--duration, --max-time and --request-timeout must be positive"));
    }
    if !args.warmup.is_finite() || args.warmup < 0.0 {
        return Err(usage("--warmup must be zero or positive"));
    }
    if args.requests == Some(0) {
        return Err(usage("--requests must be at least 1"));
    }
    if args.rounds == 0 || args.rounds > 100 {
        return Err(usage("--rounds must be between 1 and 100"));
    }
    if args.baseline_workers == 0 || args.baseline_workers > 64 {
        return Err(usage("--baseline-workers must be between 1 and 64"));
    }
    if args.distribution == KeyDistribution::Zipf && !positive(args.zipf_exponent) {
        return Err(usage("--zipf-exponent must be positive"));
    }
    Ok(())
}

fn settings(args: &BenchArgs) -> BenchSettings {
    BenchSettings {
        label: args.label.clone(),
        workload: args.workload,
        distribution: args.distribution,
        keys: args.keys,
        value_size: args.value_size,
        batch_size: args.batch_size,
        read_ratio: args.read_ratio,
        concurrency: args.concurrency,
        connections: args.connections,
        rate: args.rate,
        duration_s: args.duration,
        requests: args.requests,
        warmup_s: args.warmup,
        rounds: args.rounds,
        baseline_workers: args.baseline_workers,
    }
}

/// Runs the bench and returns its report.
pub async fn run_bench(args: &BenchArgs) -> Result<BenchOutput, ClientError> {
    check(args)?;
    let value: Arc<[u8]> = make_value(args.value_size).into();
    let mut targets: Vec<Target> = Vec::new();
    let mut baseline_server = None;
    if args.baseline || args.baseline_only {
        let server = BaselineServer::start(args.baseline_workers, args.value_size, args.workload == Workload::Miss)?;
        // The same header as the daemon gets, so both see requests of the same size.
        let token = args.conn.token.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| "baseline".into());
        let endpoint = Endpoint::from_shared(format!("http://{}", server.addr))
            .map_err(|e| usage(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let clients = connect_all(&endpoint, args.connections, bearer(&token)?).await?;
        // The baseline's compare-and-set versions are its own: every name starts at 1.
        targets.push(Target::new("baseline", clients, Keys::new(args, 1)));
        baseline_server = Some(server);
    }
    if !args.baseline_only {
        let token = args.conn.token.as_deref().filter(|t| !t.is_empty()).ok_or_else(|| {
            usage("no token: set CREDVAULT_TOKEN or pass --token (or use --baseline-only to measure only the baseline)")
        })?;
        let endpoint = endpoint(&args.conn)?;
        let clients = connect_all(&endpoint, args.connections, bearer(token)?).await?;
        let target = Target::new("credvault", clients, Keys::new(args, 0));
        prepare(args, &target, &value).await?;
        targets.push(target);
    }

    let mut results: Vec<(&'static str, Vec<Measured>)> = targets.iter().map(|t| (t.name, Vec::new())).collect();
    for _round in 0..args.rounds {
        for (i, target) in targets.iter().enumerate() {
            if args.warmup > 0.0 {
                measure(args, target, &value, Duration::from_secs_f64(args.warmup), None).await?;
            }
            let m = measure(args, target, &value, measured_duration(args), args.requests).await?;
            results[i].1.push(m);
        }
    }
    drop(targets);
    if let Some(server) = baseline_server.take() {
        server.stop().await;
    }

    let mut output = BenchOutput {
        settings: settings(args),
        baseline: None,
        credvault: None,
        ratios: None,
        ratios_by_round: Vec::new(),
        server_rss_bytes: args.server_pid.and_then(rss_bytes),
    };
    for (name, rounds) in results {
        let report = pool(name, &rounds)?;
        if name == "baseline" {
            output.baseline = Some(report);
        } else {
            output.credvault = Some(report);
        }
    }
    if let (Some(b), Some(c)) = (&output.baseline, &output.credvault) {
        output.ratios = Some(ratio(
            (c.throughput_rps, c.latency_us.p50, c.latency_us.p95, c.latency_us.p99),
            (b.throughput_rps, b.latency_us.p50, b.latency_us.p95, b.latency_us.p99),
        ));
        output.ratios_by_round = c
            .rounds
            .iter()
            .zip(&b.rounds)
            .map(|(c, b)| {
                ratio(
                    (c.throughput_rps, c.p50_us, c.p95_us, c.p99_us),
                    (b.throughput_rps, b.p50_us, b.p95_us, b.p99_us),
                )
            })
            .collect();
    }
    Ok(output)
}

fn ratio(c: (f64, f64, f64, f64), b: (f64, f64, f64, f64)) -> Ratios {
    let div = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    Ratios { throughput: div(c.0, b.0), p50: div(c.1, b.1), p95: div(c.2, b.2), p99: div(c.3, b.3) }
}

fn measured_duration(args: &BenchArgs) -> Duration {
    match (args.duration, args.requests) {
        (Some(d), _) => Duration::from_secs_f64(d.min(args.max_time)),
        (None, Some(_)) => Duration::from_secs_f64(args.max_time),
        (None, None) => Duration::from_secs_f64(10f64.min(args.max_time)),
    }
}

/// Printable bytes that do not compress to nothing.
fn make_value(size: usize) -> Vec<u8> {
    let mut rng = SplitMix64(0x5eed);
    (0..size).map(|_| b'!' + (rng.next() % 94) as u8).collect()
}

/// Resident set size of a local process, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

/// `n` separate HTTP/2 connections (each `connect` opens its own).
async fn connect_all(endpoint: &Endpoint, n: usize, auth: Bearer) -> Result<Vec<Client>, ClientError> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let channel = endpoint.connect().await.map_err(|e| ClientError::Connect {
            addr: endpoint.uri().to_string(),
            reason: format!("{e} ({})", std::error::Error::source(&e).map(|s| s.to_string()).unwrap_or_default()),
        })?;
        clients.push(
            CredentialServiceClient::with_interceptor(channel, auth.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX),
        );
    }
    Ok(clients)
}

struct Target {
    name: &'static str,
    clients: Vec<Client>,
    keys: Arc<Keys>,
}

impl Target {
    fn new(name: &'static str, clients: Vec<Client>, keys: Keys) -> Self {
        Target { name, clients, keys: Arc::new(keys) }
    }
}

/// The credentials a run uses and, for writes, the version each is known to be at.
struct Keys {
    names: Vec<String>,
    versions: Vec<AtomicU64>,
    /// Unique suffixes for the miss workload.
    miss_base: String,
    miss_counter: AtomicU64,
}

impl Keys {
    fn new(args: &BenchArgs, version: u64) -> Keys {
        Keys {
            names: (0..args.keys).map(|i| format!("{}{i:06}", args.prefix)).collect(),
            versions: (0..args.keys).map(|_| AtomicU64::new(version)).collect(),
            miss_base: format!("{}miss/{:016x}/", args.prefix, rand::random::<u64>()),
            miss_counter: AtomicU64::new(0),
        }
    }
}

/// Creates the missing credentials (or, with `--no-seed`, only learns versions), with up
/// to 32 requests in flight.
async fn prepare(args: &BenchArgs, target: &Target, value: &Arc<[u8]>) -> Result<(), ClientError> {
    let keys = &target.keys;
    let writes = matches!(args.workload, Workload::Put | Workload::Mixed);
    if args.no_seed && !writes || args.workload == Workload::Miss {
        return Ok(());
    }
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let created = Arc::new(AtomicU64::new(0));
    let workers = args.keys.min(32) as usize;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let mut client = target.clients[w % target.clients.len()].clone();
        let (keys, value, next, created) = (keys.clone(), value.clone(), next.clone(), created.clone());
        let seed = !args.no_seed;
        let timeout = Duration::from_secs_f64(args.request_timeout);
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(name) = keys.names.get(i as usize) else { return Ok::<(), Status>(()) };
                let version = if seed {
                    let put = client.put_credential(proto::PutCredentialRequest {
                        name: name.clone(),
                        value: value.to_vec(),
                        expected_version: Some(0),
                        metadata: None,
                    });
                    match tokio::time::timeout(timeout, put).await {
                        Ok(Ok(r)) => {
                            created.fetch_add(1, Ordering::Relaxed);
                            Some(r.into_inner().version)
                        }
                        Ok(Err(s)) if s.code() == Code::AlreadyExists => None,
                        Ok(Err(s)) => return Err(s),
                        Err(_) => return Err(Status::deadline_exceeded(format!("seeding {name} timed out"))),
                    }
                } else {
                    None
                };
                let version = match (version, writes) {
                    (Some(v), _) => v,
                    (None, false) => continue,
                    (None, true) => {
                        let meta =
                            client.get_credential_metadata(proto::GetCredentialMetadataRequest { name: name.clone() });
                        match tokio::time::timeout(timeout, meta).await {
                            Ok(Ok(m)) => m.into_inner().current_version,
                            Ok(Err(s)) => return Err(s),
                            Err(_) => return Err(Status::deadline_exceeded(format!("reading {name} timed out"))),
                        }
                    }
                };
                keys.versions[i as usize].store(version, Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(status)) => {
                tasks.abort_all();
                return Err(ClientError::Rpc(Status::new(
                    status.code(),
                    format!("preparing the bench credentials: {}", status.message()),
                )));
            }
            Err(e) => return Err(ClientError::Io(std::io::Error::other(e.to_string()))),
        }
    }
    if !args.json {
        eprintln!(
            "prepared {} credentials under {:?} ({} created) in {:.1} s",
            args.keys,
            args.prefix,
            created.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// What one request came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Conflict,
    Error(&'static str),
}

/// One measurement of one target.
struct Measured {
    histogram: Histogram<u64>,
    outcomes: BTreeMap<&'static str, (Outcome, u64)>,
    elapsed: Duration,
}

/// Runs the load for `duration` or `max_requests`, whichever ends first.
async fn measure(
    args: &BenchArgs,
    target: &Target,
    value: &Arc<[u8]>,
    duration: Duration,
    max_requests: Option<u64>,
) -> Result<Measured, ClientError> {
    let start = Instant::now();
    let deadline = start + duration;
    let max_requests = max_requests.unwrap_or(u64::MAX);
    let mut pacer = None;
    let tickets = match args.rate {
        Some(rate) => {
            // Enough room for a second of backlog; when the callers fall further behind the
            // pacer waits, and the scheduled times still count the delay.
            let cap = (rate as usize).clamp(args.concurrency, 1 << 20);
            let (tx, rx) = mpsc::channel::<(u64, Instant)>(cap);
            pacer = Some(spawn_pacer(rate, start, deadline, max_requests, tx)?);
            Tickets::Paced(Arc::new(Mutex::new(rx)))
        }
        None => Tickets::Counted { next: Arc::new(AtomicU64::new(0)), max: max_requests, deadline },
    };
    let shared = Arc::new(Shared {
        workload: args.workload,
        keys: target.keys.clone(),
        value: value.clone(),
        reads: Picker::new(args.distribution, args.keys, args.zipf_exponent),
        // Writers own disjoint key sets (key i belongs to caller i mod C) when there are
        // enough keys, so the daemon sees compare-and-set writes that do not lose to each
        // other; with fewer keys than callers they share keys and conflicts are expected.
        writes: Picker::new(args.distribution, (args.keys / args.concurrency as u64).max(1), args.zipf_exponent),
        partitioned: args.keys >= args.concurrency as u64,
        batch_size: args.batch_size,
        read_ratio: args.read_ratio,
        timeout: Duration::from_secs_f64(args.request_timeout),
        hard_stop: start + Duration::from_secs_f64(args.max_time),
        concurrency: args.concurrency as u64,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..args.concurrency {
        let worker = Worker {
            id: id as u64,
            client: target.clients[id % target.clients.len()].clone(),
            rng: SplitMix64(rand::random::<u64>() ^ id as u64),
            shared: shared.clone(),
            tickets: tickets.clone(),
        };
        tasks.spawn(worker.run(new_histogram()?));
    }
    let mut histogram = new_histogram()?;
    let mut outcomes: BTreeMap<&'static str, (Outcome, u64)> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (h, o) = done.map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))?;
        histogram.add(&h).map_err(|e| usage(format!("histogram: {e}")))?;
        for (k, (outcome, n)) in o {
            outcomes.entry(k).or_insert((outcome, 0)).1 += n;
        }
    }
    let elapsed = start.elapsed();
    // Closes the schedule: a pacer still waiting to hand out a request stops now.
    drop(tickets);
    if let Some(p) = pacer {
        let _ = tokio::task::spawn_blocking(move || p.join()).await;
    }
    Ok(Measured { histogram, outcomes, elapsed })
}

fn new_histogram() -> Result<Histogram<u64>, ClientError> {
    // Nanoseconds, 1 ns to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| usage(format!("histogram: {e}")))
}

fn spawn_pacer(
    rate: f64,
    start: Instant,
    deadline: Instant,
    max: u64,
    tx: mpsc::Sender<(u64, Instant)>,
) -> Result<std::thread::JoinHandle<()>, ClientError> {
    let pacer = move || {
        for i in 0..max {
            // From the start, not from the last send: a late wake-up does not slow the rate.
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if at >= deadline {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.blocking_send((i, at)).is_err() {
                break;
            }
        }
    };
    Ok(std::thread::Builder::new().name("bench-pacer".into()).spawn(pacer)?)
}

#[derive(Clone)]
enum Tickets {
    /// Closed loop: take a number until `max` or the deadline.
    Counted { next: Arc<AtomicU64>, max: u64, deadline: Instant },
    /// Open loop: request numbers and their scheduled start times, from the pacer.
    Paced(Arc<Mutex<mpsc::Receiver<(u64, Instant)>>>),
}

struct Shared {
    workload: Workload,
    keys: Arc<Keys>,
    value: Arc<[u8]>,
    reads: Picker,
    writes: Picker,
    partitioned: bool,
    batch_size: usize,
    read_ratio: f64,
    timeout: Duration,
    hard_stop: Instant,
    concurrency: u64,
}

struct Worker {
    id: u64,
    client: Client,
    rng: SplitMix64,
    shared: Arc<Shared>,
    tickets: Tickets,
}

type WorkerResult = (Histogram<u64>, BTreeMap<&'static str, (Outcome, u64)>);

impl Worker {
    async fn run(mut self, mut histogram: Histogram<u64>) -> WorkerResult {
        let mut outcomes: BTreeMap<&'static str, (Outcome, u64)> = BTreeMap::new();
        loop {
            let (n, scheduled) = match &self.tickets {
                Tickets::Counted { next, max, deadline } => {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if n >= *max || now >= *deadline {
                        break;
                    }
                    (n, now)
                }
                Tickets::Paced(rx) => {
                    let next = rx.lock().await.recv().await;
                    match next {
                        Some(ticket) => ticket,
                        None => break,
                    }
                }
            };
            if Instant::now() >= self.shared.hard_stop {
                break;
            }
            let (label, outcome) = self.request(n).await;
            let nanos = u64::try_from(scheduled.elapsed().as_nanos()).unwrap_or(u64::MAX);
            histogram.saturating_record(nanos.max(1));
            outcomes.entry(label).or_insert((outcome, 0)).1 += 1;
        }
        (histogram, outcomes)
    }

    fn read_key(&mut self, n: u64) -> &str {
        let i = self.shared.reads.pick(&mut self.rng, n);
        &self.shared.keys.names[i as usize]
    }

    /// A key this caller owns when writers are partitioned.
    fn write_key(&mut self, n: u64) -> usize {
        let s = &self.shared;
        let slot = s.writes.pick(&mut self.rng, n / s.concurrency);
        let i = if s.partitioned { slot * s.concurrency + self.id } else { slot };
        (i % s.keys.names.len() as u64) as usize
    }

    async fn request(&mut self, n: u64) -> (&'static str, Outcome) {
        let timeout = self.shared.timeout;
        let read = match self.shared.workload {
            Workload::Get | Workload::BatchGet | Workload::Miss => true,
            Workload::Put => false,
            Workload::Mixed => self.rng.next_f64() < self.shared.read_ratio,
        };
        match self.shared.workload {
            Workload::Miss => {
                let k = self.shared.keys.miss_counter.fetch_add(1, Ordering::Relaxed);
                let name = format!("{}{k}", self.shared.keys.miss_base);
                let call = self.client.get_credential(proto::GetCredentialRequest { name, version: None });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) if s.code() == Code::NotFound => ("NOT_FOUND", Outcome::Ok),
                    Ok(Err(s)) => status_outcome(&s),
                    // A name nobody wrote exists: not what this workload measures.
                    Ok(Ok(_)) => ("FOUND", Outcome::Error("FOUND")),
                }
            }
            Workload::BatchGet => {
                let names = (0..self.shared.batch_size as u64)
                    .map(|j| self.read_key(n.wrapping_mul(self.shared.batch_size as u64).wrapping_add(j)).to_owned())
                    .collect();
                let call = self.client.batch_get_credentials(proto::BatchGetCredentialsRequest { names });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) => status_outcome(&s),
                    Ok(Ok(r)) => {
                        let failed = r.into_inner().results.iter().find_map(|r| match &r.result {
                            Some(batch_get_result::Result::Credential(_)) => None,
                            Some(batch_get_result::Result::Error(e)) => Some(e.code),
                            None => Some(Code::Unknown as i32),
                        });
                        match failed {
                            None => ("OK", Outcome::Ok),
                            Some(code) => {
                                let name = code_name(Code::from(code));
                                (name, Outcome::Error(name))
                            }
                        }
                    }
                }
            }
            Workload::Get | Workload::Mixed if read => {
                let name = self.read_key(n).to_owned();
                let call = self.client.get_credential(proto::GetCredentialRequest { name, version: None });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) => status_outcome(&s),
                    Ok(Ok(_)) => ("OK", Outcome::Ok),
                }
            }
            Workload::Get | Workload::Mixed | Workload::Put => self.put(n).await,
        }
    }

    async fn put(&mut self, n: u64) -> (&'static str, Outcome) {
        let i = self.write_key(n);
        let keys = self.shared.keys.clone();
        let expected = keys.versions[i].load(Ordering::Relaxed);
        let call = self.client.put_credential(proto::PutCredentialRequest {
            name: keys.names[i].clone(),
            value: self.shared.value.to_vec(),
            expected_version: Some(expected),
            metadata: None,
        });
        match tokio::time::timeout(self.shared.timeout, call).await {
            Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
            Ok(Ok(r)) => {
                keys.versions[i].fetch_max(r.into_inner().version, Ordering::Relaxed);
                ("OK", Outcome::Ok)
            }
            Ok(Err(s)) if matches!(s.code(), Code::Aborted | Code::FailedPrecondition | Code::AlreadyExists) => {
                // Lost to another writer: learn the current version for the next attempt
                // (after the latency was taken, so this read is not counted).
                let meta = self
                    .client
                    .get_credential_metadata(proto::GetCredentialMetadataRequest { name: keys.names[i].clone() });
                if let Ok(Ok(m)) = tokio::time::timeout(self.shared.timeout, meta).await {
                    keys.versions[i].fetch_max(m.into_inner().current_version, Ordering::Relaxed);
                }
                ("CONFLICT", Outcome::Conflict)
            }
            Ok(Err(s)) => status_outcome(&s),
        }
    }
}

fn status_outcome(s: &Status) -> (&'static str, Outcome) {
    let name = code_name(s.code());
    (name, Outcome::Error(name))
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Chooses key indexes.
enum Picker {
    Uniform(u64),
    Sequential(u64),
    /// Cumulative weights of keys 0..n.
    Zipf(Arc<[f64]>),
}

impl Picker {
    fn new(distribution: KeyDistribution, n: u64, exponent: f64) -> Picker {
        let n = n.max(1);
        match distribution {
            KeyDistribution::Uniform => Picker::Uniform(n),
            KeyDistribution::Sequential => Picker::Sequential(n),
            KeyDistribution::Zipf => {
                let mut total = 0.0;
                let mut cdf: Vec<f64> = (0..n)
                    .map(|i| {
                        total += 1.0 / ((i + 1) as f64).powf(exponent);
                        total
                    })
                    .collect();
                for c in &mut cdf {
                    *c /= total;
                }
                Picker::Zipf(cdf.into())
            }
        }
    }

    /// A key index below n; `seq` drives the sequential distribution.
    fn pick(&self, rng: &mut SplitMix64, seq: u64) -> u64 {
        match self {
            Picker::Uniform(n) => rng.next() % n,
            Picker::Sequential(n) => seq % n,
            Picker::Zipf(cdf) => {
                let u = rng.next_f64();
                (cdf.partition_point(|c| *c < u) as u64).min(cdf.len() as u64 - 1)
            }
        }
    }
}

/// A small fast generator for key choice (not for anything secret).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Percentiles plotted: 0, 90, 99, 99.9, ... spaced evenly on a log scale of 1/(1-q).
fn plot_quantiles() -> impl Iterator<Item = f64> {
    (0..=50).map(|k| 1.0 - 10f64.powf(-f64::from(k) / 10.0))
}

fn us(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

fn pool(target: &str, rounds: &[Measured]) -> Result<Report, ClientError> {
    let mut h = new_histogram()?;
    let mut outcomes: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut conflicts, mut errors) = (0, 0, 0);
    let mut elapsed = 0.0;
    let mut round_stats = Vec::new();
    for m in rounds {
        h.add(&m.histogram).map_err(|e| usage(format!("histogram: {e}")))?;
        elapsed += m.elapsed.as_secs_f64();
        let mut requests = 0;
        for (name, (outcome, n)) in &m.outcomes {
            *outcomes.entry((*name).to_owned()).or_default() += n;
            requests += n;
            match outcome {
                Outcome::Ok => ok += n,
                Outcome::Conflict => conflicts += n,
                Outcome::Error(_) => errors += n,
            }
        }
        round_stats.push(RoundStats {
            requests,
            throughput_rps: requests as f64 / m.elapsed.as_secs_f64().max(1e-9),
            p50_us: us(m.histogram.value_at_quantile(0.50)),
            p95_us: us(m.histogram.value_at_quantile(0.95)),
            p99_us: us(m.histogram.value_at_quantile(0.99)),
        });
    }
    let requests = ok + conflicts + errors;
    let latency = if h.is_empty() {
        Latency { min: 0.0, mean: 0.0, p50: 0.0, p90: 0.0, p95: 0.0, p99: 0.0, p999: 0.0, max: 0.0 }
    } else {
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p95: us(h.value_at_quantile(0.95)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    };
    let mut distribution: Vec<[f64; 2]> = if h.is_empty() {
        Vec::new()
    } else {
        plot_quantiles().map(|q| [q * 100.0, us(h.value_at_quantile(q))]).collect()
    };
    if !h.is_empty() {
        distribution.push([100.0, us(h.max())]);
    }
    Ok(Report {
        target: target.to_owned(),
        requests,
        ok,
        conflicts,
        errors,
        outcomes,
        elapsed_s: elapsed,
        throughput_rps: requests as f64 / elapsed.max(1e-9),
        latency_us: latency,
        distribution,
        rounds: round_stats,
    })
}

fn print_text(o: &BenchOutput, out: &mut impl Write) -> std::io::Result<()> {
    let s = &o.settings;
    let name =
        |v: &dyn Fn() -> Option<clap::builder::PossibleValue>| v().map(|p| p.get_name().to_owned()).unwrap_or_default();
    let workload = name(&|| s.workload.to_possible_value());
    let keys = match s.workload {
        Workload::Miss => "names never written".to_owned(),
        _ => format!("{} over {} keys", name(&|| s.distribution.to_possible_value()), s.keys),
    };
    let mode = match s.rate {
        Some(r) => format!("open loop at {r} req/s"),
        None => "closed loop".to_owned(),
    };
    let length = match (s.duration_s, s.requests) {
        (Some(d), Some(n)) => format!("{n} requests or {d} s"),
        (Some(d), None) => format!("{d} s"),
        (None, Some(n)) => format!("{n} requests"),
        (None, None) => "10 s".to_owned(),
    };
    writeln!(
        out,
        "workload {workload} ({keys}, {}-byte values), {} callers over {} connections, {mode}, {length} per round after {} s warm-up, {} round(s){}",
        s.value_size,
        s.concurrency,
        s.connections,
        s.warmup_s,
        s.rounds,
        s.label.as_deref().map(|l| format!(" [{l}]")).unwrap_or_default()
    )?;
    writeln!(
        out,
        "{:<10} {:>9} {:>7} {:>7} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "target", "requests", "errors", "confl.", "req/s", "p50 us", "p90 us", "p95 us", "p99 us", "p99.9 us", "max us"
    )?;
    for r in [&o.baseline, &o.credvault].into_iter().flatten() {
        let l = &r.latency_us;
        writeln!(
            out,
            "{:<10} {:>9} {:>7} {:>7} {:>10.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            r.target, r.requests, r.errors, r.conflicts, r.throughput_rps, l.p50, l.p90, l.p95, l.p99, l.p999, l.max
        )?;
        let failures: Vec<String> = r
            .outcomes
            .iter()
            .filter(|(k, _)| {
                let expected =
                    matches!(k.as_str(), "OK" | "CONFLICT") || s.workload == Workload::Miss && *k == "NOT_FOUND";
                !expected
            })
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        if !failures.is_empty() {
            writeln!(out, "{:<10} errors: {}", "", failures.join(", "))?;
        }
    }
    if let Some(r) = &o.ratios {
        writeln!(
            out,
            "credvault / baseline: throughput {:.2}x, p50 {:.2}x, p95 {:.2}x, p99 {:.2}x",
            r.throughput, r.p50, r.p95, r.p99
        )?;
        if o.ratios_by_round.len() > 1 {
            let each = |f: fn(&Ratios) -> f64| {
                o.ratios_by_round.iter().map(|r| format!("{:.2}", f(r))).collect::<Vec<_>>().join(" ")
            };
            writeln!(out, "  by round: throughput {}; p95 {}", each(|r| r.throughput), each(|r| r.p95))?;
        }
    }
    if let Some(rss) = o.server_rss_bytes {
        writeln!(out, "server resident memory: {:.1} MiB", rss as f64 / (1024.0 * 1024.0))?;
    }
    Ok(())
}

/// The baseline: a bare tonic server on its own runtime in this process, answering with
/// constants from memory.
struct BaselineServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    done: Option<oneshot::Receiver<()>>,
}

impl BaselineServer {
    fn start(workers: usize, value_size: usize, miss: bool) -> Result<BaselineServer, ClientError> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("baseline-server")
            .enable_all()
            .build()?;
        let api = BaselineApi {
            value: make_value(value_size),
            miss,
            created_at: prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 },
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (done_tx, done_rx) = oneshot::channel::<()>();
        std::thread::Builder::new().name("baseline".into()).spawn(move || {
            let served = runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let incoming = crate::server::incoming(listener);
                let serve = crate::server::grpc_server()
                    .add_service(CredentialServiceServer::new(api).max_encoding_message_size(usize::MAX))
                    .serve_with_incoming(incoming);
                // Not graceful: the bench is over and its connections may still be open.
                tokio::select! {
                    r = serve => r.map_err(std::io::Error::other),
                    _ = stop_rx => Ok(()),
                }
            });
            if let Err(e) = served {
                eprintln!("baseline server failed: {e}");
            }
            runtime.shutdown_timeout(Duration::from_secs(1));
            let _ = done_tx.send(());
        })?;
        Ok(BaselineServer { addr, stop: Some(stop_tx), done: Some(done_rx) })
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

struct BaselineApi {
    value: Vec<u8>,
    /// Answer every read NOT_FOUND, like a store holding nothing.
    miss: bool,
    created_at: prost_types::Timestamp,
}

impl BaselineApi {
    fn credential(&self, name: String) -> proto::GetCredentialResponse {
        proto::GetCredentialResponse {
            name,
            version: 1,
            value: self.value.clone(),
            state: proto::VersionState::Current as i32,
            created_at: Some(self.created_at),
            expires_at: None,
        }
    }
}

#[tonic::async_trait]
impl CredentialService for BaselineApi {
    async fn get_credential(
        &self,
        req: Request<proto::GetCredentialRequest>,
    ) -> Result<Response<proto::GetCredentialResponse>, Status> {
        if self.miss {
            return Err(Status::not_found("not found"));
        }
        Ok(Response::new(self.credential(req.into_inner().name)))
    }

    async fn batch_get_credentials(
        &self,
        req: Request<proto::BatchGetCredentialsRequest>,
    ) -> Result<Response<proto::BatchGetCredentialsResponse>, Status> {
        let results = req
            .into_inner()
            .names
            .into_iter()
            .map(|name| proto::BatchGetResult {
                result: Some(batch_get_result::Result::Credential(self.credential(name.clone()))),
                name,
            })
            .collect();
        Ok(Response::new(proto::BatchGetCredentialsResponse { results }))
    }

    async fn get_credential_metadata(
        &self,
        req: Request<proto::GetCredentialMetadataRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        Ok(Response::new(proto::CredentialMetadata {
            name: req.into_inner().name,
            current_version: 1,
            ..Default::default()
        }))
    }

    async fn put_credential(
        &self,
        req: Request<proto::PutCredentialRequest>,
    ) -> Result<Response<proto::PutCredentialResponse>, Status> {
        let r = req.into_inner();
        Ok(Response::new(proto::PutCredentialResponse {
            name: r.name,
            version: r.expected_version.unwrap_or(0) + 1,
            created_at: Some(self.created_at),
        }))
    }

    async fn delete_credential(
        &self,
        _req: Request<proto::DeleteCredentialRequest>,
    ) -> Result<Response<proto::DeleteCredentialResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    async fn list_credentials(
        &self,
        _req: Request<proto::ListCredentialsRequest>,
    ) -> Result<Response<proto::ListCredentialsResponse>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }

    type WatchCredentialsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::CredentialEvent, Status>> + Send + 'static>>;

    async fn watch_credentials(
        &self,
        _req: Request<proto::WatchCredentialsRequest>,
    ) -> Result<Response<Self::WatchCredentialsStream>, Status> {
        Err(Status::unimplemented("the baseline only reads and writes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_keys_and_stays_in_range() {
        let p = Picker::new(KeyDistribution::Zipf, 100, 0.99);
        let mut rng = SplitMix64(7);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[p.pick(&mut rng, 0) as usize] += 1;
        }
        assert!(counts[0] > counts[1] && counts[1] > counts[10] && counts[10] > counts[99], "{counts:?}");
        // Key 0 of 100 at s = 0.99 has about 19% of the weight.
        assert!((15_000..24_000).contains(&counts[0]), "{}", counts[0]);
    }

    #[test]
    fn uniform_and_sequential_cover_every_key() {
        let mut rng = SplitMix64(1);
        let u = Picker::new(KeyDistribution::Uniform, 10, 1.0);
        let mut seen = [false; 10];
        for _ in 0..1000 {
            seen[u.pick(&mut rng, 0) as usize] = true;
        }
        assert!(seen.iter().all(|s| *s));
        let s = Picker::new(KeyDistribution::Sequential, 10, 1.0);
        assert_eq!((0..12).map(|n| s.pick(&mut rng, n)).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]);
    }

    #[test]
    fn plot_quantiles_rise_to_99_999() {
        let q: Vec<f64> = plot_quantiles().collect();
        assert_eq!(q[0], 0.0);
        assert!(q.windows(2).all(|w| w[0] < w[1]));
        assert!((q[50] - 0.99999).abs() < 1e-9);
    }
}
