//! The bench's report: latency percentiles pooled over rounds, ratios to the baseline,
//! and the text form.

use super::*;

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

/// A baseline in another process (`--compare`) and the daemon as a ratio of it.
#[derive(Debug, Clone, Serialize)]
pub struct Compared {
    pub name: String,
    pub url: String,
    pub report: Report,
    /// `None` when no daemon was measured.
    pub ratios: Option<Ratios>,
    pub ratios_by_round: Vec<Ratios>,
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
    /// Baselines measured in their own processes (`--compare`).
    pub compared: Vec<Compared>,
    /// Resident memory of `--server-pid` after the run.
    pub server_rss_bytes: Option<u64>,
}

/// Percentiles plotted: 0, 90, 99, 99.9, ... spaced evenly on a log scale of 1/(1-q).
pub(super) fn plot_quantiles() -> impl Iterator<Item = f64> {
    (0..=50).map(|k| 1.0 - 10f64.powf(-f64::from(k) / 10.0))
}

pub(super) fn us(nanos: u64) -> f64 {
    nanos as f64 / 1000.0
}

pub(super) fn pool(target: &str, rounds: &[Measured]) -> Result<Report, ClientError> {
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

pub(super) fn print_text(o: &BenchOutput, out: &mut impl Write) -> std::io::Result<()> {
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
    let reports = o.compared.iter().map(|c| &c.report).chain([&o.baseline, &o.credvault].into_iter().flatten());
    for r in reports {
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
    let pairs = o
        .compared
        .iter()
        .filter_map(|c| c.ratios.as_ref().map(|r| (c.report.target.as_str(), r, &c.ratios_by_round)))
        .chain(o.ratios.as_ref().map(|r| ("baseline", r, &o.ratios_by_round)));
    for (name, r, by_round) in pairs {
        writeln!(
            out,
            "credvault / {name}: throughput {:.2}x, p50 {:.2}x, p95 {:.2}x, p99 {:.2}x",
            r.throughput, r.p50, r.p95, r.p99
        )?;
        if by_round.len() > 1 {
            let each =
                |f: fn(&Ratios) -> f64| by_round.iter().map(|r| format!("{:.2}", f(r))).collect::<Vec<_>>().join(" ");
            writeln!(out, "  by round: throughput {}; p95 {}", each(|r| r.throughput), each(|r| r.p95))?;
        }
    }
    if let Some(rss) = o.server_rss_bytes {
        writeln!(out, "server resident memory: {:.1} MiB", rss as f64 / (1024.0 * 1024.0))?;
    }
    Ok(())
}
