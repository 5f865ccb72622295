//! KEK rotation (background re-wrap, crash-resume, racing writers, several daemons) and
//! master rekey.

use std::sync::Arc;
use std::time::Duration;

use tonic::Code;

use credvault::config::Settings;
use credvault::proto::{self, GetRotationJobRequest, RekeyMasterRequest, RotateKekRequest};
use credvault::vault::Vault;

use crate::both_backends;
use crate::helpers::spawn::Binary;
use crate::helpers::{
    admin_over, assert_status, eventually, get, passphrase_settings, put, Admin, Backend, Raw, TestDaemon, TestEnv,
};

both_backends!(kek_rotation_survives_a_crash, puts_racing_a_rewrap_lose_nothing);

fn value_of(name: &str, round: u64) -> Vec<u8> {
    format!("{name}:{round}:{}", "v".repeat(64)).into_bytes()
}

/// Writes `n` credentials through the core, 16 at a time.
async fn seed(vault: &Vault, n: usize) -> Vec<String> {
    let names: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("seed/{i:05}")).collect());
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16 {
        let (vault, names) = (vault.clone(), names.clone());
        tasks.spawn(async move {
            for name in names.iter().skip(w).step_by(16) {
                vault.put(name, &value_of(name, 1), Some(0), None).await.expect("seed put");
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("seed task");
    }
    names.to_vec()
}

/// Every name reads back its expected value straight from the store.
async fn check_all(vault: &Vault, names: &[String], expected: impl Fn(&str) -> Vec<u8>) {
    vault.cache().clear();
    for chunk in names.chunks(100) {
        let results = vault.batch_get(chunk).await.expect("batch read");
        for (name, r) in chunk.iter().zip(results) {
            let v = r.unwrap_or_else(|e| panic!("{name} does not decrypt: {e}"));
            assert_eq!(*v.value, expected(name), "{name}");
        }
    }
}

async fn kek_states(raw: &Raw) -> Vec<(i64, String)> {
    let q = "SELECT id, state FROM keks ORDER BY id";
    match raw {
        Raw::Pg(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
        Raw::Sqlite(p) => sqlx::query_as(q).fetch_all(p).await.unwrap(),
    }
}

async fn versions_under(raw: &Raw, kek: i64) -> i64 {
    let q = "SELECT COUNT(*) FROM credential_versions WHERE kek_id = $1";
    match raw {
        Raw::Pg(p) => sqlx::query_scalar(q).bind(kek).fetch_one(p).await.unwrap(),
        Raw::Sqlite(p) => sqlx::query_scalar(q).bind(kek).fetch_one(p).await.unwrap(),
    }
}

async fn job(admin: &mut Admin, id: u64) -> proto::RotationJob {
    admin.get_rotation_job(GetRotationJobRequest { job_id: id }).await.unwrap().into_inner()
}

/// Waits for a job to end (completed or failed) and returns it.
async fn finished(admin: &mut Admin, id: u64) -> proto::RotationJob {
    eventually("the job to finish", Duration::from_secs(120), async || {
        job(admin, id).await.state != proto::JobState::Running as i32
    })
    .await;
    job(admin, id).await
}

fn slow_rewrap(mut s: Settings) -> Settings {
    s.rotation.rewrap_batch_size = 100;
    s.rotation.rewrap_pause_ms = 20;
    s.rotation.job_lease_ms = 1500;
    s.rotation.scheduler_interval_ms = 100;
    s
}

/// 5,000 credentials; the daemon re-wrapping them is killed mid-job; a restarted daemon
/// resumes from the cursor; every credential decrypts and the old KEK is retired.
async fn kek_rotation_survives_a_crash(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let settings = slow_rewrap(env.settings());
    let d = TestDaemon::start(settings.clone(), None).await;
    let token = d.token.clone();
    let names = seed(&d.vault, 5000).await;
    // History and a destroyed version are re-wrapped (or moved) too.
    d.vault.put(&names[0], &value_of(&names[0], 2), Some(1), None).await.unwrap();
    d.vault.destroy_version(&names[0], 1).await.unwrap();
    d.stop().await;

    let mut child = Binary::serve_env(&env, &settings).start().await;
    let mut admin = admin_over(child.channel().await, &token);
    let started = admin.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();
    assert_eq!((started.state, started.new_kek_id, started.total), (proto::JobState::Running as i32, 2, 5001));
    assert_status(admin.rotate_kek(RotateKekRequest {}).await, Code::FailedPrecondition, "still running");
    eventually("the job to make progress", Duration::from_secs(60), async || job(&mut admin, 0).await.done >= 500)
        .await;
    child.kill().await;
    let store = env.store().await;
    let at_crash = store.get_job(Some(started.job_id as i64)).await.unwrap().expect("the job row");
    assert_eq!(at_crash.state, credvault::store::JobState::Running);
    assert!(at_crash.cursor.is_some(), "the cursor was saved with each batch");
    assert!(at_crash.done < at_crash.total, "killed mid-job ({} of {})", at_crash.done, at_crash.total);

    // A new daemon resumes the job once the dead one's lease lapses.
    let d = TestDaemon::start(settings, Some(&token)).await;
    let mut admin = d.admin().await;
    let done = finished(&mut admin, started.job_id).await;
    assert_eq!(done.state, proto::JobState::Completed as i32, "{}", done.error);
    assert_eq!((done.done, done.failed), (5001, 0));
    assert!(done.finished_at.is_some() && done.rate_per_second > 0.0);

    check_all(&d.vault, &names, |n| value_of(n, if n == names[0] { 2 } else { 1 })).await;
    let mut c = d.client().await;
    assert_status(get(&mut c, &names[0], Some(1)).await, Code::FailedPrecondition, "destroyed");
    let raw = env.raw().await;
    assert_eq!(kek_states(&raw).await, vec![(1, "retired".to_owned()), (2, "active".to_owned())]);
    assert_eq!(versions_under(&raw, 1).await, 0);
    raw.close().await;
    d.stop().await;
}

/// Writers keep putting (with compare-and-set) while the re-wrap runs: no write is lost,
/// every retained version decrypts, and nothing is left under the old KEK.
async fn puts_racing_a_rewrap_lose_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = slow_rewrap(env.settings());
    settings.rotation.rewrap_batch_size = 25;
    settings.rotation.rewrap_pause_ms = 5;
    let d = TestDaemon::start(settings, None).await;
    let names = seed(&d.vault, 400).await;
    let mut admin = d.admin().await;
    let started = admin.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8usize {
        let (vault, names, stop) = (d.vault.clone(), names.clone(), stop.clone());
        writers.spawn(async move {
            let mut writes = std::collections::HashMap::<String, u64>::new();
            let mut i = w;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // Each writer owns the names i % 8 == w, so its count is the truth.
                let name = &names[i % names.len()];
                let round = writes.get(name).copied().unwrap_or(1) + 1;
                vault.put(name, &value_of(name, round), Some(round - 1), None).await.expect("CAS put");
                writes.insert(name.clone(), round);
                i += 8;
            }
            writes
        });
    }
    let done = finished(&mut admin, started.job_id).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rounds = std::collections::HashMap::new();
    while let Some(r) = writers.join_next().await {
        rounds.extend(r.expect("writer"));
    }
    assert!(!rounds.is_empty(), "writers wrote during the job");
    assert_eq!((done.state, done.failed), (proto::JobState::Completed as i32, 0), "{}", done.error);

    check_all(&d.vault, &names, |n| value_of(n, rounds.get(n).copied().unwrap_or(1))).await;
    // Every retained older version decrypts too.
    let mut c = d.client().await;
    for (name, round) in rounds.iter().take(20) {
        for v in 1..=*round {
            assert_eq!(get(&mut c, name, Some(v)).await.unwrap().1, value_of(name, v), "{name} v{v}");
        }
    }
    let raw = env.raw().await;
    assert_eq!(versions_under(&raw, 1).await, 0, "nothing left under the old KEK");
    assert_eq!(kek_states(&raw).await[0].1, "retired");
    raw.close().await;
    d.stop().await;
}

/// A KEK rotated through one daemon: the other reads the new data and seals its own
/// writes under the new KEK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kek_rotation_reaches_every_daemon() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    put(&mut ca, "multi/x", b"one", None).await.unwrap();
    assert_eq!(get(&mut cb, "multi/x", None).await.unwrap().1, b"one");
    let mut admin = a.admin().await;
    let started = admin.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();
    put(&mut ca, "multi/y", b"sealed under KEK 2", None).await.unwrap();
    // B has not necessarily heard of KEK 2 yet: its read loads it on demand.
    assert_eq!(get(&mut cb, "multi/y", None).await.unwrap().1, b"sealed under KEK 2");
    put(&mut cb, "multi/z", b"from b", None).await.unwrap();
    let raw = env.raw().await;
    let kek_of = |name: &'static str| {
        let raw = &raw;
        async move {
            match raw {
                Raw::Pg(p) => sqlx::query_scalar::<_, i64>("SELECT kek_id FROM credential_versions WHERE name = $1")
                    .bind(name)
                    .fetch_one(p)
                    .await
                    .unwrap(),
                Raw::Sqlite(_) => unreachable!(),
            }
        }
    };
    assert_eq!(kek_of("multi/z").await, 2, "B sealed under the new KEK");
    assert_eq!(finished(&mut admin, started.job_id).await.state, proto::JobState::Completed as i32);
    assert_eq!(kek_of("multi/x").await, 2);
    raw.close().await;
    b.vault.cache().clear();
    assert_eq!(get(&mut cb, "multi/x", None).await.unwrap().1, b"one");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_changes_the_passphrase_and_only_that() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let old = "correct horse battery";
    let new = "staple of a new passphrase";
    let d = TestDaemon::start(passphrase_settings(env.settings(), old), None).await;
    let token = d.token.clone();
    let (mut c, mut admin) = (d.client().await, d.admin().await);
    put(&mut c, "rk/a", b"alpha", None).await.unwrap();
    // A second KEK, so the rekey has more than one to re-wrap.
    let started = admin.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();
    assert_eq!(finished(&mut admin, started.job_id).await.state, proto::JobState::Completed as i32);
    put(&mut c, "rk/b", b"beta", None).await.unwrap();

    let req = |o: &str, n: &str| RekeyMasterRequest { old_passphrase: o.into(), new_passphrase: n.into() };
    assert_status(
        admin.rekey_master(req("wrong passphrase", new)).await,
        Code::InvalidArgument,
        "old passphrase is wrong",
    );
    assert_status(admin.rekey_master(req(old, "short")).await, Code::InvalidArgument, "at least 8");
    assert_status(admin.rekey_master(req("", new)).await, Code::InvalidArgument, "required");
    let r = admin.rekey_master(req(old, new)).await.unwrap().into_inner();
    assert_eq!(r.keks_rewrapped, 2);
    // This daemon keeps working, and can rotate again under the new master key.
    assert_eq!(get(&mut c, "rk/a", None).await.unwrap().1, b"alpha");
    let again = admin.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();
    assert_eq!(finished(&mut admin, again.job_id).await.state, proto::JobState::Completed as i32);
    d.stop().await;

    let refused = credvault::server::Daemon::build(passphrase_settings(env.settings(), old)).await;
    let err = refused.expect_err("the old passphrase no longer opens the database").to_string();
    assert!(err.contains("wrong master key"), "{err}");
    let d = TestDaemon::start(passphrase_settings(env.settings(), new), Some(&token)).await;
    let mut c = d.client().await;
    assert_eq!(get(&mut c, "rk/a", None).await.unwrap().1, b"alpha");
    assert_eq!(get(&mut c, "rk/b", None).await.unwrap().1, b"beta");
    d.stop().await;

    // A key-file database has no passphrase to change.
    let env2 = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env2.settings(), None).await;
    let mut admin = d.admin().await;
    assert_status(admin.rekey_master(req(old, new)).await, Code::FailedPrecondition, "key file");
    d.stop().await;
}

/// After a rekey through one daemon, another daemon still holding the old master key
/// must not wrap a new KEK under it (daemons restarted with the new passphrase could not
/// read it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_with_an_old_master_key_cannot_rotate_the_kek() {
    let env = TestEnv::new(Backend::Postgres).await;
    let (old, new) = ("first passphrase", "second passphrase");
    let a = TestDaemon::start(passphrase_settings(env.settings(), old), None).await;
    let b = TestDaemon::start(passphrase_settings(env.settings(), old), Some(&a.token)).await;
    let mut admin_a = a.admin().await;
    let req = RekeyMasterRequest { old_passphrase: old.into(), new_passphrase: new.into() };
    admin_a.rekey_master(req).await.unwrap();
    let mut admin_b = b.admin().await;
    assert_status(admin_b.rotate_kek(RotateKekRequest {}).await, Code::FailedPrecondition, "out of date");
    // The daemon that rekeyed can.
    let job = admin_a.rotate_kek(RotateKekRequest {}).await.unwrap().into_inner();
    assert_eq!(finished(&mut admin_a, job.job_id).await.state, proto::JobState::Completed as i32);
    let token = a.token.clone();
    a.stop().await;
    b.stop().await;
    let d = TestDaemon::start(passphrase_settings(env.settings(), new), Some(&token)).await;
    assert_eq!(d.vault.status().await.active_kek_id, 2, "the new KEK opens with the new passphrase");
    d.stop().await;
}
