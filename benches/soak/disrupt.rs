//! Disruptions: store outages through the proxies, the KEK rotation, the restart, and the quiet windows between them.

use super::*;

/// The daemon's `credvault.store` health status (it follows the store breaker).
pub(crate) async fn store_status(addr: &str) -> Option<ServingStatus> {
    let ch = Channel::from_shared(format!("http://{addr}")).expect("endpoint").connect().await.ok()?;
    let r = HealthClient::new(ch).check(HealthCheckRequest { service: "credvault.store".into() }).await.ok()?;
    ServingStatus::try_from(r.into_inner().status).ok()
}

pub(crate) async fn store_serving(addr: &str) -> bool {
    store_status(addr).await == Some(ServingStatus::Serving)
}

/// Seconds until `credvault.store` is NOT_SERVING on the slot's daemon, if within `limit`.
pub(crate) async fn until_store_down(slot: &Slot, from: Instant, limit: Duration) -> Option<f64> {
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
pub(crate) async fn until_store_serving(slot: &Slot, from: Instant, limit: Duration) -> Option<f64> {
    while from.elapsed() < limit {
        let addr = slot.addr.read().expect("slot").clone();
        if store_serving(&addr).await {
            return Some(from.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub(crate) struct Timeline {
    pub(crate) events: Vec<(f64, String)>,
    pub(crate) failures: Vec<String>,
}

impl Timeline {
    pub(crate) fn note(&mut self, run: &Run, what: String) {
        println!("soak: {:>6.1} s  {what}", run.secs());
        self.events.push((run.secs(), what));
    }
}

pub(crate) async fn outage(run: &Run, proxies: &mut [PgProxy], n: u32, length: Duration, tl: &mut Timeline) {
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

pub(crate) async fn kek_rotation(run: &Run, bearer: Bearer, tl: &mut Timeline) -> Option<proto::RotationJob> {
    let began = run.secs();
    let job = kek_rotation_job(run, bearer, tl).await;
    run.disruptions.lock().expect("disruptions").push((began, run.secs()));
    job
}

pub(crate) async fn kek_rotation_job(run: &Run, bearer: Bearer, tl: &mut Timeline) -> Option<proto::RotationJob> {
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

pub(crate) struct Lives {
    pub(crate) starts: Vec<(usize, u32, f64)>,
}

pub(crate) async fn restart(
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
pub(crate) const SETTLE_SECONDS: f64 = 30.0;
/// Shorter quiet windows are too short for a slope.
pub(crate) const MIN_QUIET_SECONDS: f64 = 45.0;

/// The parts of [from, to) at least `SETTLE_SECONDS` away from every disruption.
pub(crate) fn quiet_windows(from: f64, to: f64, disruptions: &[(f64, f64)]) -> Vec<(f64, f64)> {
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
