//! Many writers doing read-modify-write with `expected_version`: no update is lost.

use tonic::Code;

use crate::both_backends;
use crate::helpers::{get, put, Backend, TestDaemon, TestEnv};

both_backends!(concurrent_compare_and_set_loses_nothing, concurrent_unconditional_puts_all_land);

/// Two daemons over one database: writers on different daemons still collide on the
/// row, and the retry with backoff lands every put.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unconditional_puts_from_two_daemons_all_land() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = if w % 2 == 0 { a.client().await } else { b.client().await };
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..3 {
                versions.push(put(&mut c, "shared", format!("{w}-{i}").as_bytes(), None).await);
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        for v in t.await.unwrap() {
            all.push(v.unwrap_or_else(|s| panic!("put refused: {:?} {}", s.code(), s.message())));
        }
    }
    all.sort_unstable();
    let want: Vec<u64> = (1..=WRITERS * 3).collect();
    assert_eq!(all, want, "every unconditional put got its own version");
    a.stop().await;
    b.stop().await;
}

const WRITERS: u64 = 32;
const INCREMENTS: u64 = 5;

async fn concurrent_compare_and_set_loses_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "counter", b"0", Some(0)).await.unwrap();

    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let (mut done, mut conflicts) = (0u64, 0u64);
            while done < INCREMENTS {
                let (version, value) = get(&mut c, "counter", None).await.expect("read");
                let n: u64 = std::str::from_utf8(&value).unwrap().parse().unwrap();
                match put(&mut c, "counter", (n + 1).to_string().as_bytes(), Some(version)).await {
                    Ok(v) => {
                        assert_eq!(v, version + 1);
                        done += 1;
                    }
                    Err(s) if s.code() == Code::Aborted => {
                        assert!(s.message().contains("current version is"), "{}", s.message());
                        conflicts += 1;
                    }
                    Err(s) => panic!("unexpected error: {s}"),
                }
            }
            (done, conflicts)
        }));
    }
    let mut successes = 0;
    let mut conflicts = 0;
    for t in tasks {
        let (d, c) = t.await.unwrap();
        successes += d;
        conflicts += c;
    }
    assert_eq!(successes, WRITERS * INCREMENTS);
    let (version, value) = get(&mut c, "counter", None).await.unwrap();
    assert_eq!(version, 1 + successes, "one version per successful write");
    assert_eq!(value, successes.to_string().into_bytes(), "no increment lost");
    assert!(conflicts > 0, "32 writers on one row should have collided at least once");
    d.stop().await;
}

async fn concurrent_unconditional_puts_all_land(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for i in 0..3 {
                let v = put(&mut c, "shared", format!("{w}-{i}").as_bytes(), None).await;
                versions.push(v.unwrap_or_else(|s| panic!("put refused: {:?} {}", s.code(), s.message())));
            }
            versions
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort_unstable();
    let want: Vec<u64> = (1..=WRITERS * 3).collect();
    assert_eq!(all, want, "every unconditional put got its own version");
    d.stop().await;
}
