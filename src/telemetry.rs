//! Telemetry: metric names in one place ([`names`]), the process-wide Prometheus
//! recorder, the `/metrics` listener and the upkeep task that keeps its buffers bounded.
//! The request series themselves are recorded by the gRPC edge
//! (`service::layers::metrics`).
//!
//! **Invariant:** label values come from fixed sets (RPC names, status codes, reasons,
//! operation names), never from request data, so no caller can grow the series count
//! and no secret can reach a label.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use http_body_util::Full;
use hyper::body::Bytes;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::store::Store;

pub mod names {
    pub const REQUESTS: &str = "credvault_requests_total";
    pub const REQUEST_DURATION: &str = "credvault_request_duration_seconds";
    pub const CACHE_HITS: &str = "credvault_cache_hits_total";
    pub const CACHE_MISSES: &str = "credvault_cache_misses_total";
    pub const CACHE_EVICTIONS: &str = "credvault_cache_evictions_total";
    pub const CACHE_ENTRIES: &str = "credvault_cache_entries";
    pub const CACHE_BYTES: &str = "credvault_cache_bytes";
    pub const CACHE_COALESCED: &str = "credvault_cache_coalesced_waits_total";
    pub const DECRYPT_DURATION: &str = "credvault_decrypt_duration_seconds";
    pub const STORE_QUERY_DURATION: &str = "credvault_store_query_duration_seconds";
    pub const DB_POOL_CONNECTIONS: &str = "credvault_db_pool_connections";
    pub const BUILD_INFO: &str = "credvault_build_info";
    pub const ROTATIONS: &str = "credvault_rotations_total";
    pub const ROTATION_FAILURES: &str = "credvault_rotation_failures_total";
    pub const REWRAPPED: &str = "credvault_kek_rewrapped_total";
    pub const REWRAP_DONE: &str = "credvault_kek_rewrap_job_done";
    pub const REWRAP_TOTAL: &str = "credvault_kek_rewrap_job_total";
    pub const WATCHERS: &str = "credvault_watchers";
    pub const WATCH_DROPPED: &str = "credvault_watchers_dropped_total";
    pub const LIST_ROWS_SCANNED: &str = "credvault_list_rows_scanned_total";
    pub const STORE_REACHABLE: &str = "credvault_store_reachable";
    pub const STORE_BREAKER_OPEN: &str = "credvault_store_breaker_open";
    pub const STORE_BREAKER_REJECTED: &str = "credvault_store_breaker_rejected_total";
    pub const STORE_UNREACHABLE_SECONDS: &str = "credvault_store_unreachable_seconds";
    pub const CACHE_STALE_SERVES: &str = "credvault_cache_stale_serves_total";
    pub const CACHE_RESYNCS: &str = "credvault_cache_resyncs_total";
    pub const TOKEN_UPDATES: &str = "credvault_token_updates_total";
    pub const TOKENS: &str = "credvault_tokens";
    pub const IDENTITIES: &str = "credvault_identities";
    pub const CREDENTIALS_ROTATION_OVERDUE: &str = "credvault_credentials_rotation_overdue";
    pub const CREDENTIALS_EXPIRED: &str = "credvault_credentials_expired";
    pub const CREDENTIALS_EXPIRING: &str = "credvault_credentials_expiring";
    pub const OLDEST_CURRENT_VERSION_AGE: &str = "credvault_oldest_current_version_age_seconds";
    pub const STALENESS_UPDATED: &str = "credvault_staleness_updated_timestamp_seconds";
    pub const IDEMPOTENT_WRITES: &str = "credvault_idempotent_writes_total";
    pub const IDEMPOTENCY_KEYS_PRUNED: &str = "credvault_idempotency_keys_pruned_total";
}

/// Buckets from 50 us to 1 s (a cache hit to a slow database write).
const LATENCY_BUCKETS: &[f64] =
    &[50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1.0];
/// Decryption takes microseconds.
const DECRYPT_BUCKETS: &[f64] = &[1e-6, 2e-6, 5e-6, 10e-6, 25e-6, 50e-6, 100e-6, 1e-3];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder (once; later calls return the same handle).
/// `None` if another recorder was installed first, in which case metrics go there.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(names::DECRYPT_DURATION.into()), DECRYPT_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), LATENCY_BUCKETS))
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            describe();
            Some(handle)
        })
        .clone()
}

fn describe() {
    use names::*;
    describe_counter!(REQUESTS, "gRPC requests handled, by RPC and status code.");
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "gRPC request latency inside the daemon, by RPC.");
    describe_counter!(CACHE_HITS, "Reads served from the cache (including cached not-found).");
    describe_counter!(CACHE_MISSES, "Reads that had to query the store.");
    describe_counter!(CACHE_EVICTIONS, "Cache entries removed, by reason.");
    describe_gauge!(CACHE_ENTRIES, "Entries in the cache.");
    describe_gauge!(CACHE_BYTES, Unit::Bytes, "Estimated bytes held by the cache.");
    describe_counter!(CACHE_COALESCED, "Cache misses that waited for another caller's store read of the same name.");
    describe_histogram!(DECRYPT_DURATION, Unit::Seconds, "Time to unwrap a data key and decrypt one value.");
    describe_histogram!(STORE_QUERY_DURATION, Unit::Seconds, "Store call latency, by operation.");
    describe_gauge!(DB_POOL_CONNECTIONS, "Database pool connections, by state (idle, in_use).");
    describe_gauge!(BUILD_INFO, "Always 1; the version label names the build.");
    describe_counter!(ROTATIONS, "Credential rotations, by trigger (request, schedule).");
    describe_counter!(ROTATION_FAILURES, "Scheduled rotations that failed and were deferred.");
    describe_counter!(REWRAPPED, "Data keys re-wrapped under a new KEK by this daemon.");
    describe_gauge!(REWRAP_DONE, "Versions handled so far by the KEK rotation job this daemon works on.");
    describe_gauge!(REWRAP_TOTAL, "Versions the KEK rotation job this daemon works on started with.");
    describe_gauge!(WATCHERS, "Open WatchCredentials streams.");
    describe_counter!(WATCH_DROPPED, "WatchCredentials streams ended because the client fell behind.");
    describe_counter!(LIST_ROWS_SCANNED, "Rows ListCredentials read from the store, shown or skipped by policy.");
    describe_gauge!(STORE_REACHABLE, "1 while the store answers, 0 after a failed call or probe until one succeeds.");
    describe_gauge!(
        STORE_BREAKER_OPEN,
        "1 while the store breaker is open (calls fail fast and a probe tests the store)."
    );
    describe_counter!(STORE_BREAKER_REJECTED, "Store calls refused at once because the breaker was open.");
    describe_gauge!(
        STORE_UNREACHABLE_SECONDS,
        Unit::Seconds,
        "Seconds since the store was last known reachable (0 while it is)."
    );
    describe_counter!(
        CACHE_STALE_SERVES,
        "Reads answered from unverified or expired cache entries while the store was down."
    );
    describe_counter!(CACHE_RESYNCS, "Cache resyncs completed (every cached entry revalidated against the store).");
    describe_counter!(
        TOKEN_UPDATES,
        "Updates of the in-memory token table from the store, by kind (one: a named token; full: the whole table)."
    );
    describe_gauge!(TOKENS, "Live tokens this daemon accepts.");
    describe_gauge!(IDENTITIES, "Workload identities (mTLS client certificate identities) bound to policies.");
    describe_gauge!(
        CREDENTIALS_ROTATION_OVERDUE,
        "Live credentials whose rotation policy's slot passed more than rotation.overdue_after_seconds ago \
         (capped at rotation.staleness_max_count)."
    );
    describe_gauge!(CREDENTIALS_EXPIRED, "Live credentials whose expires_at has passed (capped).");
    describe_gauge!(
        CREDENTIALS_EXPIRING,
        "Live credentials expiring within rotation.expiry_horizon_seconds from now (capped)."
    );
    describe_gauge!(
        OLDEST_CURRENT_VERSION_AGE,
        Unit::Seconds,
        "Age of the oldest current version of a live credential (0: none)."
    );
    describe_gauge!(
        STALENESS_UPDATED,
        Unit::Seconds,
        "Unix time of the last successful staleness count; the staleness gauges are as of then."
    );
    describe_counter!(
        IDEMPOTENT_WRITES,
        "Writes under an idempotency key, by RPC and outcome (written, replayed, refused, failed)."
    );
    describe_counter!(IDEMPOTENCY_KEYS_PRUNED, "Expired idempotency keys deleted by this daemon's pruner.");
    crate::limits::describe_metrics();
    describe_gauge!(crate::audit::names::QUEUE_DEPTH, "Audit events waiting to be written.");
    describe_counter!(crate::audit::names::WRITTEN, "Audit events written to the sink.");
    describe_counter!(
        crate::audit::names::DROPPED,
        "Audit events dropped (queue full), or requests refused for lack of a slot in required mode."
    );
    describe_counter!(crate::audit::names::WRITE_FAILURES, "Failed attempts to write an audit batch.");
    describe_counter!(
        crate::audit::names::REJECTED,
        "Audit events a sink refused on their own (found by splitting the batch), by what became of them."
    );
    describe_counter!(crate::audit::names::PRUNED, "audit_log rows deleted by audit.retention_days.");
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Renders the exposition text, sampling the pool gauges first.
pub fn render(handle: &PrometheusHandle, store: &dyn Store) -> String {
    let pool = store.pool_stats();
    let idle = pool.idle as f64;
    metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "idle").set(idle);
    metrics::gauge!(names::DB_POOL_CONNECTIONS, "state" => "in_use").set((f64::from(pool.size) - idle).max(0.0));
    handle.run_upkeep();
    handle.render()
}

/// Serves `GET /metrics` over HTTP/1.1 until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    store: Arc<dyn Store>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            },
        };
        let handle = handle.clone();
        let store = store.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let response = if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                    http::Response::builder()
                        .header(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(render(&handle, store.as_ref()))))
                } else {
                    http::Response::builder()
                        .status(http::StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"not found\n")))
                };
                async move { response.map_err(|e| std::io::Error::other(e.to_string())) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

/// Binds the metrics listener.
/// How often the daemon folds buffered histogram samples into their buckets.
pub const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds buffered histogram samples every `every` until `shutdown` turns true; returns
/// how many times it ran. Without it, samples pile up (8 bytes each) until `/metrics` is
/// scraped, which may be never: the zero-configuration daemon grew by megabytes a minute.
pub async fn run_upkeep(
    handle: PrometheusHandle,
    every: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> u64 {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut runs = 0;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return runs,
            _ = ticks.tick() => {
                handle.run_upkeep();
                runs += 1;
            }
        }
    }
}

pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resident memory of this process in bytes.
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Records `n` samples into a histogram of `recorder` from a plain thread.
    fn record_samples(recorder: &metrics_exporter_prometheus::PrometheusRecorder, n: usize) {
        let h = metrics::with_local_recorder(recorder, || metrics::histogram!("upkeep_test_seconds"));
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..n {
                    h.record((i % 1000) as f64 * 1e-6);
                }
            });
        });
    }

    /// Runs [`upkeep_bounds_buffered_samples_alone`] in a process of its own: resident
    /// memory is per process, and the other unit tests allocate beside it.
    #[test]
    fn upkeep_bounds_buffered_samples_without_a_scrape() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "telemetry::tests::upkeep_bounds_buffered_samples_alone", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(text.contains("1 passed"), "the measurement ran: {text}");
    }

    /// Nobody scrapes: with the upkeep task, 8 million samples leave memory flat; without
    /// it (the control, same run), they stay buffered, 8 bytes each. Ignored by itself:
    /// the test above runs it alone in a fresh process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "run alone by upkeep_bounds_buffered_samples_without_a_scrape"]
    async fn upkeep_bounds_buffered_samples_alone() {
        const SAMPLES: usize = 8_000_000;
        let recorder = PrometheusBuilder::new().build_recorder();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let upkeep = tokio::spawn(run_upkeep(recorder.handle(), std::time::Duration::from_millis(5), stop_rx));
        let before = rss_bytes();
        tokio::task::block_in_place(|| record_samples(&recorder, SAMPLES));
        let with_upkeep = rss_bytes().saturating_sub(before);
        stop_tx.send_replace(true);
        let runs = upkeep.await.unwrap();
        assert!(runs >= 1, "the upkeep task ran");

        let unkept = PrometheusBuilder::new().build_recorder();
        let before = rss_bytes();
        tokio::task::block_in_place(|| record_samples(&unkept, SAMPLES));
        let without_upkeep = rss_bytes().saturating_sub(before);
        assert!(
            without_upkeep > 40 << 20,
            "control: unscraped samples without upkeep should stay buffered ({without_upkeep} bytes)"
        );
        assert!(
            with_upkeep < 16 << 20,
            "with upkeep, memory grew by {with_upkeep} bytes for {SAMPLES} samples (control: {without_upkeep})"
        );
        assert!(unkept.handle().render().contains("upkeep_test_seconds_count 8000000"));
    }
}
