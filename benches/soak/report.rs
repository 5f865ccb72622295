//! The report: statuses, disruptions, memory slopes, and the failures that fail the bench.

use super::*;

/// Least-squares slope of (minutes, MiB).
pub(crate) fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return f64::NAN;
    }
    let (mx, my) = (points.iter().map(|p| p.0).sum::<f64>() / n, points.iter().map(|p| p.1).sum::<f64>() / n);
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
    sxy / sxx
}

pub(crate) fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn report(
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
