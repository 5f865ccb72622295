//! The load: readers, writers that own their names, and the memory sampler.

use super::*;

pub(crate) async fn reader(
    run: Arc<Run>,
    slot: Arc<Slot>,
    bearer: Bearer,
    names: usize,
    period: Duration,
    seed: u64,
) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut follow = Follow::new(slot.clone(), bearer);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let d = slot.index;
    let mut n = 0;
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let mut c = follow.client();
        let roll = rng.random_range(0..100);
        let before = run.situation(&slot);
        if roll < 10 {
            let mut wanted: Vec<String> = (0..8).map(|_| name_of(rng.random_range(0..names))).collect();
            if roll == 0 {
                wanted.push(format!("soak/absent/{}", rng.random_range(0..ABSENT_NAMES)));
            }
            let t = Instant::now();
            let r = c.batch_get_credentials(BatchGetCredentialsRequest { names: wanted.clone() }).await;
            let took = Some(t.elapsed());
            let situation = before.max(run.situation(&slot));
            match r {
                Ok(resp) => {
                    let stale = resp.metadata().get(credvault::service::STALE_HEADER).is_some();
                    run.record(d, "BatchGetCredentials", situation, if stale { "OK stale" } else { "OK" }, None, took);
                    let results = resp.into_inner().results;
                    if results.len() != wanted.len() {
                        run.bad_value(format!("batch of {} answered {} results", wanted.len(), results.len()));
                    }
                    for (name, item) in wanted.iter().zip(results) {
                        let rpc = if name.contains("absent") {
                            "BatchGetCredentials[absent item]"
                        } else {
                            "BatchGetCredentials[item]"
                        };
                        match item.result {
                            Some(batch_get_result::Result::Credential(v)) => {
                                check_value(&run, d, name, &v.value);
                                run.record(d, rpc, situation, if stale { "OK stale" } else { "OK" }, None, None);
                            }
                            Some(batch_get_result::Result::Error(e)) => {
                                let code = credvault::proto::code_name(Code::from(e.code));
                                run.record(d, rpc, situation, code, Some(&e.message), None);
                            }
                            None => run.record(d, rpc, situation, "empty result", None, None),
                        }
                    }
                }
                Err(s) => run.record(d, "BatchGetCredentials", situation, outcome(&s), Some(&detail(&s)), took),
            }
        } else {
            let (name, rpc) = if roll < 15 {
                (format!("soak/absent/{}", rng.random_range(0..ABSENT_NAMES)), "GetCredential(absent)")
            } else {
                (name_of(rng.random_range(0..names)), "GetCredential")
            };
            let t = Instant::now();
            let r = c.get_credential(GetCredentialRequest { name: name.clone(), version: None }).await;
            let took = Some(t.elapsed());
            let situation = before.max(run.situation(&slot));
            match r {
                Ok(resp) => {
                    let stale = resp.metadata().get(credvault::service::STALE_HEADER).is_some();
                    let v = resp.into_inner();
                    check_value(&run, d, &name, &v.value);
                    run.record(d, rpc, situation, if stale { "OK stale" } else { "OK" }, None, took);
                }
                Err(s) => run.record(d, rpc, situation, outcome(&s), Some(&detail(&s)), took),
            }
        }
    }
    n
}

/// A name a writer owns: its last acknowledged version and value, and the values of
/// writes made since whose outcome is unknown (they failed, but may have committed).
pub(crate) struct Owned {
    pub(crate) name: String,
    pub(crate) acked_version: u64,
    pub(crate) acked_value: Vec<u8>,
    pub(crate) pending: Vec<Vec<u8>>,
}

pub(crate) async fn seed_names(slot: Arc<Slot>, bearer: Bearer, names: Vec<String>) -> Vec<Owned> {
    let mut follow = Follow::new(slot, bearer);
    let mut owned = Vec::with_capacity(names.len());
    for name in names {
        let value = value_for(&name, 0);
        let r = follow
            .client()
            .put_credential(PutCredentialRequest {
                name: name.clone(),
                value: value.clone(),
                expected_version: Some(0),
                metadata: None,
            })
            .await
            .unwrap_or_else(|s| panic!("seeding {name}: {s:?}"))
            .into_inner();
        owned.push(Owned { name, acked_version: r.version, acked_value: value, pending: Vec::new() });
    }
    owned
}

pub(crate) async fn writer(
    run: Arc<Run>,
    slot: Arc<Slot>,
    bearer: Bearer,
    mut owned: Vec<Owned>,
    period: Duration,
    seed: u64,
) -> Vec<Owned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut follow = Follow::new(slot.clone(), bearer);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let d = slot.index;
    let mut seq = 1u64;
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        let i = rng.random_range(0..owned.len());
        let o = &mut owned[i];
        seq += 1;
        let value = value_for(&o.name, seq);
        // Compare-and-set on what this writer knows; after an unknown outcome it cannot
        // know the version, so the next write is unconditional.
        let expected = o.pending.is_empty().then_some(o.acked_version);
        let before = run.situation(&slot);
        let t = Instant::now();
        let (rpc, r) = if seq % ROTATE_EVERY == 0 {
            let r = follow
                .admin()
                .rotate_credential(RotateCredentialRequest {
                    name: o.name.clone(),
                    source: Some(rotate_credential_request::Source::Value(value.clone())),
                    grace_period: None,
                    expected_version: expected,
                })
                .await
                .map(|r| r.into_inner().version);
            ("RotateCredential", r)
        } else {
            let r = follow
                .client()
                .put_credential(PutCredentialRequest {
                    name: o.name.clone(),
                    value: value.clone(),
                    expected_version: expected,
                    metadata: None,
                })
                .await
                .map(|r| r.into_inner().version);
            ("PutCredential", r)
        };
        let took = Some(t.elapsed());
        let situation = before.max(run.situation(&slot));
        match r {
            Ok(version) => {
                if version <= o.acked_version {
                    run.bad_value(format!("{}: write acknowledged as v{version} after v{}", o.name, o.acked_version));
                }
                o.acked_version = version;
                o.acked_value = value;
                o.pending.clear();
                run.record(d, rpc, situation, "OK", None, took);
            }
            Err(s) => {
                o.pending.push(value);
                run.record(d, rpc, situation, outcome(&s), Some(&detail(&s)), took);
            }
        }
    }
    owned
}

#[derive(Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) t: f64,
    pub(crate) daemon: usize,
    pub(crate) life: u32,
    pub(crate) rss_kib: u64,
    pub(crate) threads: u64,
    pub(crate) fds: u64,
}

pub(crate) fn proc_status(pid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| -> Option<u64> {
        s.lines().find_map(|l| l.strip_prefix(k)).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("Threads:")?))
}

pub(crate) async fn sampler(run: Arc<Run>) -> Vec<Sample> {
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(RSS_EVERY);
    while !run.stop.load(Ordering::SeqCst) {
        tick.tick().await;
        for slot in &run.slots {
            if slot.restarting.load(Ordering::SeqCst) {
                continue;
            }
            let pid = slot.pid.load(Ordering::SeqCst);
            if let Some((rss_kib, threads)) = proc_status(pid) {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count() as u64).unwrap_or(0);
                let life = slot.life.load(Ordering::SeqCst);
                out.push(Sample { t: run.secs(), daemon: slot.index, life, rss_kib, threads, fds });
            }
        }
    }
    out
}
