//! `credvault bench` against a daemon on port 0 and against its in-process baseline, for
//! short request counts: the reports are well formed (counts add up, percentiles are
//! ordered, no errors, the JSON parses). Nothing here asserts a speed: timings on a
//! shared machine are not a test outcome.

use clap::Parser as _;

use credvault::cli::bench::{run_bench, BenchArgs, BenchOutput, Report};
use credvault::cli::ClientError;
use credvault::proto;

use crate::both_backends;
use crate::helpers::spawn::Binary;
use crate::helpers::{Backend, TestDaemon, TestEnv};

fn args(d: Option<&TestDaemon>, extra: &[&str]) -> BenchArgs {
    let mut v: Vec<String> = ["bench", "--warmup", "0"].map(String::from).to_vec();
    if let Some(d) = d {
        v.extend(["--addr".into(), format!("http://{}", d.addr), "--token".into(), d.token.clone()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    BenchArgs::try_parse_from(v).expect("bench arguments parse")
}

#[track_caller]
fn check_report(r: &Report, target: &str, requests: u64, rounds: usize) {
    assert_eq!(r.target, target);
    assert_eq!(r.requests, requests, "{r:?}");
    assert_eq!(r.ok + r.conflicts + r.errors, r.requests, "{r:?}");
    assert_eq!(r.outcomes.values().sum::<u64>(), r.requests, "{r:?}");
    assert_eq!(r.errors, 0, "outcomes: {:?}", r.outcomes);
    let l = &r.latency_us;
    let ordered = [l.min, l.p50, l.p90, l.p95, l.p99, l.p999, l.max];
    assert!(l.min > 0.0 && ordered.windows(2).all(|w| w[0] <= w[1]), "{l:?}");
    assert!(l.min <= l.mean && l.mean <= l.max, "{l:?}");
    assert!(r.elapsed_s > 0.0 && r.throughput_rps > 0.0);
    assert!(r.distribution.windows(2).all(|w| w[0][0] < w[1][0] && w[0][1] <= w[1][1]), "{:?}", r.distribution);
    assert_eq!(r.distribution.first().map(|p| p[0]), Some(0.0));
    assert_eq!(r.distribution.last().copied(), Some([100.0, l.max]));
    assert_eq!(r.rounds.len(), rounds);
    assert_eq!(r.rounds.iter().map(|x| x.requests).sum::<u64>(), r.requests);
}

/// The JSON report parses and carries the fields scripts read.
fn check_json(out: &BenchOutput) -> serde_json::Value {
    let text = serde_json::to_string_pretty(out).expect("serializes");
    let v: serde_json::Value = serde_json::from_str(&text).expect("parses");
    for target in ["baseline", "credvault"] {
        if let Some(r) = v[target].as_object() {
            assert!(r["latency_us"]["p95"].as_f64().is_some(), "{text}");
            assert!(r["throughput_rps"].as_f64().is_some(), "{text}");
            assert!(r["distribution"].as_array().is_some_and(|d| !d.is_empty()), "{text}");
        }
    }
    assert!(v["settings"]["workload"].is_string(), "{text}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_against_the_baseline_in_rounds() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let a = args(
        Some(&d),
        &["--baseline", "--keys", "50", "--requests", "300", "-c", "8", "--connections", "2", "--rounds", "2"],
    );
    let out = run_bench(&a).await.expect("bench runs");
    check_report(out.baseline.as_ref().expect("baseline measured"), "baseline", 600, 2);
    check_report(out.credvault.as_ref().expect("daemon measured"), "credvault", 600, 2);
    let r = out.ratios.expect("ratios");
    assert!(r.throughput > 0.0 && r.p50 > 0.0 && r.p95 > 0.0 && r.p99 > 0.0, "{r:?}");
    assert_eq!(out.ratios_by_round.len(), 2);
    let v = check_json(&out);
    assert!(v["ratios"]["p95"].as_f64().is_some());

    // The seeded values are there, at the size asked for.
    let mut c = d.client().await;
    let got = c
        .get_credential(proto::GetCredentialRequest { name: "bench/000049".into(), version: None })
        .await
        .expect("seeded")
        .into_inner();
    assert_eq!(got.value.len(), 256);
    d.stop().await;
}

async fn workloads(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let common = ["--keys", "40", "--requests", "120", "-c", "4", "--connections", "2", "--prefix", "w/"];
    for (workload, distribution) in
        [("batch-get", "uniform"), ("put", "zipf"), ("mixed", "zipf"), ("miss", "uniform"), ("get", "sequential")]
    {
        let mut extra = vec!["--workload", workload, "--distribution", distribution];
        extra.extend(common);
        let out = run_bench(&args(Some(&d), &extra)).await.unwrap_or_else(|e| panic!("{workload}: {e}"));
        let r = out.credvault.as_ref().expect("daemon measured");
        check_report(r, "credvault", 120, 1);
        assert!(out.baseline.is_none() && out.ratios.is_none());
        match workload {
            // Enough keys for every caller to own its own: no compare-and-set loses.
            "put" => assert_eq!(r.outcomes.get("OK"), Some(&120), "{:?}", r.outcomes),
            "miss" => assert_eq!(r.outcomes.get("NOT_FOUND"), Some(&120), "{:?}", r.outcomes),
            _ => assert_eq!(r.ok, 120, "{workload}: {:?}", r.outcomes),
        }
        check_json(&out);
    }
    // Every version the put workload wrote went through: 120 puts over 40 keys, plus
    // the mixed workload's puts, each a successful compare-and-set on its key.
    let meta = d.client().await;
    let mut total = 0;
    for i in 0..40 {
        let m = meta
            .clone()
            .get_credential_metadata(proto::GetCredentialMetadataRequest { name: format!("w/{i:06}") })
            .await
            .expect("metadata")
            .into_inner();
        total += m.current_version - 1;
    }
    assert!(total >= 120, "{total} versions written");
    d.stop().await;
}
both_backends!(workloads);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn puts_with_fewer_keys_than_callers_count_conflicts_not_errors() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let out = run_bench(&args(Some(&d), &["--workload", "put", "--keys", "2", "--requests", "100", "-c", "6"]))
        .await
        .expect("bench runs");
    let r = out.credvault.expect("daemon measured");
    check_report(&r, "credvault", 100, 1);
    assert_eq!(r.ok + r.conflicts, 100);
    assert_eq!(r.outcomes.get("CONFLICT").copied().unwrap_or(0), r.conflicts);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_rate_measures_every_scheduled_request() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let a = args(Some(&d), &["--baseline", "--rate", "1000", "--requests", "200", "-c", "4", "--keys", "20"]);
    let out = run_bench(&a).await.expect("bench runs");
    assert_eq!(out.settings.rate, Some(1000.0));
    check_report(out.baseline.as_ref().expect("baseline"), "baseline", 200, 1);
    check_report(out.credvault.as_ref().expect("daemon"), "credvault", 200, 1);
    // 200 requests at 1000/s are scheduled over 0.2 s: the run cannot be shorter.
    assert!(out.credvault.expect("daemon").elapsed_s >= 0.19);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_usage_errors() {
    for extra in [
        &["--baseline-only", "-c", "0"][..],
        &["--baseline-only", "-c", "2", "--connections", "3"],
        &["--baseline-only", "--rate=-5"],
        &["--baseline-only", "--read-ratio", "1.5"],
        &["--token", "", "--addr", "http://127.0.0.1:1"],
    ] {
        match run_bench(&args(None, extra)).await {
            Err(ClientError::Usage(_)) => {}
            other => panic!("{extra:?}: expected a usage error, got {other:?}"),
        }
    }
}

async fn run_binary(args: &[&str]) -> (i32, String, String) {
    let out = Binary::new(args).output().await;
    (out.code(), String::from_utf8_lossy(&out.stdout).into_owned(), out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_prints_text_or_json_and_stops_by_itself() {
    let common = ["bench", "--baseline-only", "--requests", "100", "--warmup", "0.1", "-c", "2"];
    let (code, out, err) = run_binary(&[&common[..], &["--json", "--workload", "batch-get"]].concat()).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("stdout is one JSON document");
    assert_eq!(v["baseline"]["requests"], 100);
    assert_eq!(v["baseline"]["errors"], 0);
    assert!(v["credvault"].is_null());

    let (code, out, err) = run_binary(&common).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("p95 us") && out.contains("baseline"), "{out}");

    let (code, _, err) = run_binary(&["bench", "--addr", "http://127.0.0.1:1", "--requests", "1"]).await;
    assert_eq!(code, 7, "no token is a usage error: {err}");
}
