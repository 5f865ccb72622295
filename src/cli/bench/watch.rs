//! `credvault bench --watch fanout|staleness`: how fast pushes reach clients, through the
//! library client (the same `Client`/`CachingClient` services use).
//!
//! - `fanout`: `--watchers` concurrent `WatchCredentials` streams on one daemon (over
//!   `--watch-connections` HTTP/2 connections, round robin), then `--puts` puts, one at a
//!   time. Per put: from the moment the put is sent until the last watcher has the event
//!   (and the median watcher). With `--server-pid`, the daemon's resident memory before
//!   the streams open and with all of them open: memory per watcher.
//! - `staleness`: a writer `Client` on `--writer-addr` (another daemon over the same
//!   PostgreSQL, or the same daemon when absent) and a `CachingClient` on `--addr`. Per
//!   put: from the put's acknowledgement until the caching client serves the new version.
//!
//! Every put waits for its deliveries (bounded by `--request-timeout`) before the next,
//! so each sample is one isolated push, not a queue.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::mpsc;

use super::{rss_bytes, BenchArgs};
use crate::cli::conn::{client_config, ClientError};
use crate::client::{CacheConfig, CachingClient, Client, EventKind};

/// Which push measurement to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum WatchMode {
    Fanout,
    Staleness,
}

/// The options of the push measurements (`--watch MODE` selects one).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Measure pushes instead of request load: `fanout` or `staleness`.
    #[arg(long, value_enum)]
    pub watch: Option<WatchMode>,
    /// fanout: concurrent watch streams.
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// fanout: HTTP/2 connections the streams share (each carries at most the daemon's
    /// `transport.max_concurrent_streams`).
    #[arg(long, default_value_t = 20)]
    pub watch_connections: usize,
    /// Puts measured (one at a time).
    #[arg(long, default_value_t = 200)]
    pub puts: usize,
    /// staleness: the daemon the writer uses [default: --addr].
    #[arg(long)]
    pub writer_addr: Option<String>,
}

#[derive(Debug, Serialize)]
struct Percentiles {
    samples: u64,
    p50_us: u64,
    p90_us: u64,
    p99_us: u64,
    max_us: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            samples: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            max_us: h.max(),
        }
    }
}

#[derive(Debug, Serialize)]
struct FanoutReport {
    watchers: usize,
    connections: usize,
    puts: usize,
    /// Put sent -> the last watcher has the event.
    last_watcher: Percentiles,
    /// Put sent -> the median watcher has it.
    median_watcher: Percentiles,
    /// Put sent -> acknowledged.
    put: Percentiles,
    /// Deliveries that did not arrive within --request-timeout.
    missed: u64,
    server_rss_before_bytes: Option<u64>,
    server_rss_with_watchers_bytes: Option<u64>,
    server_bytes_per_watcher: Option<f64>,
}

#[derive(Debug, Serialize)]
struct StalenessReport {
    puts: usize,
    two_daemons: bool,
    /// Put acknowledged -> the caching client serves the new version.
    staleness: Percentiles,
    timed_out: u64,
}

/// Microseconds, 1 us to 10 minutes, 3 significant digits.
fn histogram() -> Result<Histogram<u64>, ClientError> {
    Histogram::new_with_bounds(1, 600_000_000, 3).map_err(|e| ClientError::Usage(format!("histogram: {e}")))
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Runs the selected measurement and prints its report (JSON with `--json`).
pub async fn run(args: &BenchArgs, mode: WatchMode, out: &mut impl Write) -> Result<(), ClientError> {
    let w = &args.watch;
    if w.puts == 0 || w.puts > 1_000_000 {
        return Err(ClientError::Usage("--puts must be between 1 and 1000000".into()));
    }
    let timeout = Duration::from_secs_f64(args.request_timeout.clamp(0.001, 3600.0));
    let text = match mode {
        WatchMode::Fanout => {
            let r = fanout(args, timeout).await?;
            if args.json {
                serde_json::to_string_pretty(&r).map_err(std::io::Error::other)?
            } else {
                let per = r
                    .server_bytes_per_watcher
                    .map(|b| format!(", daemon memory {b:.0} B per watcher"))
                    .unwrap_or_default();
                format!(
                    "fan-out: {} watchers on {} connections, {} puts\n  last watcher: p50 {} us, p99 {} us, max {} us\n  median watcher: p50 {} us, p99 {} us\n  put ack: p50 {} us, p99 {} us\n  missed deliveries: {}{per}",
                    r.watchers, r.connections, r.puts,
                    r.last_watcher.p50_us, r.last_watcher.p99_us, r.last_watcher.max_us,
                    r.median_watcher.p50_us, r.median_watcher.p99_us,
                    r.put.p50_us, r.put.p99_us, r.missed
                )
            }
        }
        WatchMode::Staleness => {
            let r = staleness(args, timeout).await?;
            if args.json {
                serde_json::to_string_pretty(&r).map_err(std::io::Error::other)?
            } else {
                format!(
                    "staleness ({}): {} puts\n  put ack -> in the cache: p50 {} us, p90 {} us, p99 {} us, max {} us; timed out {}",
                    if r.two_daemons { "writer on another daemon" } else { "one daemon" },
                    r.puts, r.staleness.p50_us, r.staleness.p90_us, r.staleness.p99_us, r.staleness.max_us, r.timed_out
                )
            }
        }
    };
    writeln!(out, "{text}")?;
    Ok(())
}

fn config_for(args: &BenchArgs, addr: Option<&str>) -> Result<crate::client::ClientConfig, ClientError> {
    let mut conn = args.conn.clone();
    if let Some(a) = addr {
        conn.addr = a.to_owned();
    }
    let mut c = client_config(&conn)?;
    c.timeout = Duration::from_secs_f64(args.request_timeout.clamp(0.001, 3600.0));
    Ok(c)
}

async fn fanout(args: &BenchArgs, timeout: Duration) -> Result<FanoutReport, ClientError> {
    let w = &args.watch;
    if w.watchers == 0 || w.watchers > 100_000 || w.watch_connections == 0 || w.watch_connections > w.watchers {
        return Err(ClientError::Usage("--watchers must be 1..=100000 and --watch-connections 1..=--watchers".into()));
    }
    let config = config_for(args, None)?;
    let name = format!("{}fanout", args.prefix);
    let writer = Client::connect(&config).await?;
    writer.put(&name, b"0", None).await?;
    let rss_before = args.server_pid.and_then(rss_bytes);

    // Every watcher reports (its index, the version it saw, when) on one channel.
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let mut clients = Vec::with_capacity(w.watch_connections);
    for _ in 0..w.watch_connections {
        clients.push(Client::connect(&config).await?);
    }
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(w.watchers);
    for i in 0..w.watchers {
        let mut stream = clients[i % clients.len()].watch(&name).await?;
        opened.fetch_add(1, Ordering::Relaxed);
        let tx = tx.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(Ok(ev)) = stream.next().await {
                if matches!(ev.kind, EventKind::Put) && tx.send((ev.version, Instant::now())).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);
    // Every stream has its subscription in place once `watch` returned; let the daemon's
    // allocations settle before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_with = args.server_pid.and_then(rss_bytes);

    let (mut last, mut median, mut put) = (histogram()?, histogram()?, histogram()?);
    let mut missed = 0u64;
    for i in 0..w.puts {
        let sent = Instant::now();
        let version = writer.put(&name, format!("{}", i + 1).as_bytes(), None).await?;
        put.record(micros(sent.elapsed())).ok();
        let mut arrivals = Vec::with_capacity(w.watchers);
        let deadline = tokio::time::Instant::now() + timeout;
        while arrivals.len() < w.watchers {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((v, at))) if v == version => arrivals.push(at.saturating_duration_since(sent)),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missed += (w.watchers - arrivals.len()) as u64;
        arrivals.sort();
        if let Some(l) = arrivals.last() {
            last.record(micros(*l)).ok();
            median.record(micros(arrivals[arrivals.len() / 2])).ok();
        }
    }
    for t in tasks {
        t.abort();
    }
    let per = match (rss_before, rss_with) {
        (Some(b), Some(a)) => Some((a as f64 - b as f64) / w.watchers as f64),
        _ => None,
    };
    Ok(FanoutReport {
        watchers: w.watchers,
        connections: w.watch_connections,
        puts: w.puts,
        last_watcher: Percentiles::of(&last),
        median_watcher: Percentiles::of(&median),
        put: Percentiles::of(&put),
        missed,
        server_rss_before_bytes: rss_before,
        server_rss_with_watchers_bytes: rss_with,
        server_bytes_per_watcher: per,
    })
}

async fn staleness(args: &BenchArgs, timeout: Duration) -> Result<StalenessReport, ClientError> {
    let w = &args.watch;
    let writer = Client::connect(&config_for(args, w.writer_addr.as_deref())?).await?;
    let name = format!("{}staleness", args.prefix);
    writer.put(&name, b"0", None).await?;
    let cache_cfg = CacheConfig { prefixes: vec![args.prefix.clone()], ..CacheConfig::default() };
    let cache = CachingClient::new(Client::connect(&config_for(args, None)?).await?, cache_cfg);
    if !cache.wait_live(timeout).await {
        return Err(ClientError::Client(crate::client::Error::Unavailable("the watch stream did not open".into())));
    }
    cache.get(&name).await?;
    let mut h = histogram()?;
    let mut timed_out = 0u64;
    for i in 0..w.puts {
        let version = writer.put(&name, format!("{}", i + 1).as_bytes(), None).await?;
        let acked = Instant::now();
        loop {
            if cache.get(&name).await?.version >= version {
                h.record(micros(acked.elapsed())).ok();
                break;
            }
            if acked.elapsed() > timeout {
                timed_out += 1;
                break;
            }
            tokio::task::yield_now().await;
        }
    }
    Ok(StalenessReport {
        puts: w.puts,
        two_daemons: w.writer_addr.as_deref().is_some_and(|a| a != args.conn.addr),
        staleness: Percentiles::of(&h),
        timed_out,
    })
}
