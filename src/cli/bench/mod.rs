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
//! Baselines, the ceilings the daemon is stated as a ratio of, answer the same messages
//! with constants from memory (no auth, no cache, no audit):
//! - `--serve-baseline raw|tonic --listen ADDR` makes this process a baseline server for
//!   another bench process: `raw` is hyper with a pre-encoded reply and a pass-through
//!   codec (HTTP/2 alone), `tonic` is tonic's own `Server` and `Router` with a constant
//!   reply. `--compare NAME=URL` measures such servers with the same client as the daemon,
//!   each in its own process, the order rotating round by round.
//! - `--baseline` starts a tonic baseline inside the bench process instead (quicker, but
//!   it shares the load generator's process and runtime).
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

use super::conn::{bearer, endpoint, BearerToken as Bearer, ClientError};
use super::Connection;
use crate::proto::credential_service_client::CredentialServiceClient;
use crate::proto::credential_service_server::{CredentialService, CredentialServiceServer};
use crate::proto::{self, batch_get_result};

mod baseline;
mod keys;
mod load;
mod raw;
mod report;
mod seed;
mod watch;

use baseline::{BaselineKind, BaselineServer};
use keys::{Keys, Picker, SplitMix64};
use load::{measure, new_histogram, Measured, Outcome};
use report::{pool, print_text};
pub use report::{BenchOutput, Compared, Latency, Ratios, Report, RoundStats};
use seed::prepare;

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
    /// Measure nothing: serve a baseline on --listen until killed, for another bench
    /// process to measure with --compare (`raw`: hyper with a pre-encoded reply; `tonic`:
    /// tonic's Server and Router with a constant reply).
    #[arg(long, value_enum, conflicts_with_all = ["baseline", "baseline_only", "compare"])]
    pub serve_baseline: Option<BaselineKind>,
    /// Where --serve-baseline listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Also measure the baseline server at NAME=URL (another process, started with
    /// --serve-baseline) with the same client, alternating with the daemon round by round,
    /// and report the daemon as a ratio of it. Repeat for more.
    #[arg(long, value_parser = parse_compare)]
    pub compare: Vec<(String, String)>,
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
    pub watch: watch::WatchArgs,
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

fn parse_compare(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, url)) if !name.is_empty() && url.starts_with("http://") => Ok((name.to_owned(), url.to_owned())),
        _ => Err(format!("expected NAME=http://HOST:PORT, got {s:?}")),
    }
}

/// Runs the bench and prints its report (text, or JSON with `--json`).
pub async fn run(args: BenchArgs, out: &mut impl Write) -> Result<(), ClientError> {
    if let Some(mode) = args.watch.watch {
        return watch::run(&args, mode, out).await;
    }
    if let Some(kind) = args.serve_baseline {
        check(&args)?;
        let server = BaselineServer::start(kind, args.listen, args.baseline_workers, args.value_size, false)?;
        // The line a script waits for.
        writeln!(out, "baseline {} listening on {}", kind.name(), server.addr)?;
        out.flush()?;
        server.wait().await;
        return Err(usage("the baseline server stopped"));
    }
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
        let any: SocketAddr = ([127, 0, 0, 1], 0).into();
        let server = BaselineServer::start(
            BaselineKind::Tonic,
            any,
            args.baseline_workers,
            args.value_size,
            args.workload == Workload::Miss,
        )?;
        // The same header as the daemon gets, so both see requests of the same size.
        let token = args.conn.token.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| "baseline".into());
        let endpoint = Endpoint::from_shared(format!("http://{}", server.addr))
            .map_err(|e| usage(e.to_string()))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let clients = connect_all(&endpoint, args.connections, bearer(&token)?).await?;
        // The baseline's compare-and-set versions are its own: every name starts at 1.
        targets.push(Target::new("baseline".into(), clients, Keys::new(args, 1)));
        baseline_server = Some(server);
    }
    for (name, url) in &args.compare {
        let token = args.conn.token.clone().filter(|t| !t.is_empty()).unwrap_or_else(|| "baseline".into());
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| usage(format!("--compare {name}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5));
        let clients = connect_all(&endpoint, args.connections, bearer(&token)?).await?;
        targets.push(Target::new(format!("compare:{name}"), clients, Keys::new(args, 1)));
    }
    if !args.baseline_only {
        let token = args.conn.token.as_deref().filter(|t| !t.is_empty()).ok_or_else(|| {
            usage("no token: set CREDVAULT_TOKEN or pass --token (or use --baseline-only to measure only the baseline)")
        })?;
        let endpoint = endpoint(&args.conn)?;
        let clients = connect_all(&endpoint, args.connections, bearer(token)?).await?;
        let target = Target::new("credvault".into(), clients, Keys::new(args, 0));
        prepare(args, &target, &value).await?;
        targets.push(target);
    }

    let mut results: Vec<(String, Vec<Measured>)> = targets.iter().map(|t| (t.name.clone(), Vec::new())).collect();
    for round in 0..args.rounds {
        // The order rotates round by round, so no target always runs first (or right after
        // another one's load) on a machine whose speed drifts.
        for k in 0..targets.len() {
            let i = (round + k) % targets.len();
            let target = &targets[i];
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
        compared: Vec::new(),
        server_rss_bytes: args.server_pid.and_then(rss_bytes),
    };
    let mut compared = Vec::new();
    for (name, rounds) in results {
        let report = pool(name.strip_prefix("compare:").unwrap_or(&name), &rounds)?;
        if name == "baseline" {
            output.baseline = Some(report);
        } else if let Some(short) = name.strip_prefix("compare:") {
            let url = args.compare.iter().find(|(n, _)| n == short).map(|(_, u)| u.clone()).unwrap_or_default();
            compared.push((short.to_owned(), url, report));
        } else {
            output.credvault = Some(report);
        }
    }
    for (name, url, b) in compared {
        let (ratios, ratios_by_round) = match &output.credvault {
            Some(c) => (Some(ratios_of(c, &b)), rounds_ratios(c, &b)),
            None => (None, Vec::new()),
        };
        output.compared.push(Compared { name, url, report: b, ratios, ratios_by_round });
    }
    if let (Some(b), Some(c)) = (&output.baseline, &output.credvault) {
        output.ratios = Some(ratios_of(c, b));
        output.ratios_by_round = rounds_ratios(c, b);
    }
    Ok(output)
}

/// The daemon's pooled numbers over a baseline's.
fn ratios_of(c: &Report, b: &Report) -> Ratios {
    ratio(
        (c.throughput_rps, c.latency_us.p50, c.latency_us.p95, c.latency_us.p99),
        (b.throughput_rps, b.latency_us.p50, b.latency_us.p95, b.latency_us.p99),
    )
}

/// The same, round by round.
fn rounds_ratios(c: &Report, b: &Report) -> Vec<Ratios> {
    c.rounds
        .iter()
        .zip(&b.rounds)
        .map(|(c, b)| {
            ratio((c.throughput_rps, c.p50_us, c.p95_us, c.p99_us), (b.throughput_rps, b.p50_us, b.p95_us, b.p99_us))
        })
        .collect()
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
    name: String,
    clients: Vec<Client>,
    keys: Arc<Keys>,
}

impl Target {
    fn new(name: String, clients: Vec<Client>, keys: Keys) -> Self {
        Target { name, clients, keys: Arc::new(keys) }
    }
}

#[cfg(test)]
mod tests {
    use super::report::plot_quantiles;
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
