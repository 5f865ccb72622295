//! The run: warm-up, load, the disruptions on their schedule, then the verdict.

use super::*;

pub(crate) async fn soak(cfg: Config, db: String) -> bool {
    let db_url = with_database(&cfg.admin_url, &db);
    let work = std::env::temp_dir().join(&db);
    std::fs::create_dir_all(&work).expect("work dir");
    let key_file = work.join("master.key");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let key: [u8; 32] = rand::random();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key_file)
            .expect("create the key file");
        f.write_all(hex::encode(key).as_bytes()).expect("write the key file");
    }
    let config = work.join("credvault.toml");
    let cache_entries = (cfg.names * 2 / 3).max(16);
    std::fs::write(
        &config,
        format!(
            "shutdown_grace_seconds = 5\n\n[cache]\n# Fewer entries than names: capacity misses are part of the mix.\nmax_entries = {cache_entries}\n\n\
             [rotation]\n# A job that lasts seconds, under load.\nrewrap_batch_size = 500\nrewrap_pause_ms = 100\n"
        ),
    )
    .expect("write the daemon config");

    let mut proxies = vec![PgProxy::start().await, PgProxy::start().await];
    let tallies = [Arc::new(LogTally::default()), Arc::new(LogTally::default())];
    let specs: Vec<Spec> = (0..2)
        .map(|i| {
            let data_dir = work.join(format!("data-{}", LABELS[i]));
            std::fs::create_dir_all(&data_dir).expect("data dir");
            Spec {
                label: LABELS[i],
                config: config.clone(),
                data_dir,
                key_file: key_file.clone(),
                database_url: proxies[i].url(&db_url),
                log_file: work.join(format!("daemon-{}.log", LABELS[i])),
                heaptrack: if i == 0 { cfg.heaptrack.clone() } else { None },
            }
        })
        .collect();

    println!(
        "soak: database {db}, work dir {}, {} s ({} s warm-up), {} names, {} reads/s, {} writes/s, outages of {} s, seed {}",
        work.display(),
        cfg.seconds,
        cfg.warmup,
        cfg.names,
        cfg.read_rate,
        cfg.write_rate,
        cfg.outage,
        cfg.seed
    );
    if let Some(h) = &cfg.heaptrack {
        println!("soak: daemon A runs under heaptrack -o {}", h.display());
    }
    let a = spawn(&specs[0], tallies[0].clone(), 0).await;
    let token = a.root_token.clone().expect("the first daemon prints a root token");
    let b = spawn(&specs[1], tallies[1].clone(), 0).await;
    let bearer = Bearer(format!("Bearer {token}").parse().expect("ascii token"));
    let slot = |i: usize, r: &Running| {
        Arc::new(Slot {
            index: i,
            addr: RwLock::new(r.addr.clone()),
            generation: AtomicU32::new(0),
            pid: AtomicU32::new(r.pid),
            life: AtomicU32::new(0),
            restarting: AtomicBool::new(false),
        })
    };
    let slots = [slot(0, &a), slot(1, &b)];
    println!("soak: daemon A on {} (pid {}), daemon B on {} (pid {})", a.addr, a.pid, b.addr, b.pid);
    let mut daemons = [Some(a), Some(b)];

    // Seed every name (version 1) through the daemon of the writer that owns it.
    let writers = 2 * WRITERS_PER_DAEMON;
    let t = Instant::now();
    let mut seeding = tokio::task::JoinSet::new();
    for w in 0..writers {
        let names: Vec<String> = (w..cfg.names).step_by(writers).map(name_of).collect();
        seeding.spawn(seed_names(slots[w % 2].clone(), bearer.clone(), names).then_with(w));
    }
    let mut owned_by: BTreeMap<usize, Vec<Owned>> = BTreeMap::new();
    while let Some(r) = seeding.join_next().await {
        let (w, owned) = r.expect("seeding task");
        owned_by.insert(w, owned);
    }
    println!("soak: seeded {} names in {:.1} s", cfg.names, t.elapsed().as_secs_f64());

    let run = Arc::new(Run {
        start: Instant::now(),
        outage: AtomicBool::new(false),
        outage_cut: Mutex::new((0, None)),
        disruptions: Mutex::default(),
        first_sign: Mutex::default(),
        stop: AtomicBool::new(false),
        stats: Stats::default(),
        slots: slots.clone(),
    });
    let mut lives = Lives { starts: vec![(0, 0, 0.0), (1, 0, 0.0)] };
    let readers = 2 * READERS_PER_DAEMON;
    let read_period = Duration::from_secs_f64(readers as f64 / cfg.read_rate);
    let write_period = Duration::from_secs_f64(writers as f64 / cfg.write_rate);
    let mut read_tasks = Vec::new();
    for r in 0..readers {
        let s = slots[r % 2].clone();
        read_tasks.push(tokio::spawn(reader(
            run.clone(),
            s,
            bearer.clone(),
            cfg.names,
            read_period,
            cfg.seed + r as u64,
        )));
    }
    let mut write_tasks = Vec::new();
    for (w, owned) in owned_by {
        let s = slots[w % 2].clone();
        let seed = cfg.seed + 1000 + w as u64;
        write_tasks.push(tokio::spawn(writer(run.clone(), s, bearer.clone(), owned, write_period, seed)));
    }
    let sampler_task = tokio::spawn(sampler(run.clone()));

    // The schedule: outage, KEK rotation, restart, outage, each at a fixed share of the run.
    let d = cfg.seconds as f64;
    let at = |share: f64| run.start + Duration::from_secs_f64(d * share);
    let outage_len = Duration::from_secs(cfg.outage);
    let mut tl = Timeline { events: Vec::new(), failures: Vec::new() };
    tl.note(&run, "load started".into());
    tokio::time::sleep_until(at(0.25).into()).await;
    outage(&run, &mut proxies, 1, outage_len, &mut tl).await;
    tokio::time::sleep_until(at(0.40).into()).await;
    let job = kek_rotation(&run, bearer.clone(), &mut tl).await;
    tokio::time::sleep_until(at(0.55).into()).await;
    let [_, b_daemon] = &mut daemons;
    restart(&run, b_daemon, &specs[1], tallies[1].clone(), &mut lives, &mut tl).await;
    tokio::time::sleep_until(at(0.75).into()).await;
    outage(&run, &mut proxies, 2, outage_len, &mut tl).await;
    tokio::time::sleep_until(at(1.0).into()).await;
    run.stop.store(true, Ordering::SeqCst);
    let elapsed = run.secs();
    tl.note(&run, "load stopped".into());

    let mut reads = 0;
    for t in read_tasks {
        reads += t.await.expect("reader task");
    }
    let mut owned: Vec<Owned> = Vec::new();
    for t in write_tasks {
        owned.extend(t.await.expect("writer task"));
    }
    let samples = sampler_task.await.expect("sampler task");
    let _ = reads;

    // Final state, then a clean stop of both daemons.
    for slot in &run.slots {
        if until_store_serving(slot, Instant::now(), Duration::from_secs(30)).await.is_none() {
            tl.failures.push(format!("daemon {}: store not SERVING at the end", LABELS[slot.index]));
        }
    }
    let verdict = verify(&db_url, &run, &bearer, &owned).await;
    let mut metrics = Vec::new();
    for d in daemons.iter() {
        let d = d.as_ref().expect("both daemons run");
        metrics.push(scrape(&d.metrics_addr).await);
    }
    let mut exits = Vec::new();
    for (i, d) in daemons.iter_mut().enumerate() {
        let (status, took) = terminate(d.take().expect("both daemons run")).await;
        if !status.success() {
            tl.failures.push(format!("daemon {} exited with {status} on the final SIGTERM (want 0)", LABELS[i]));
        }
        exits.push((status, took));
    }

    let csv: String = std::iter::once("t_seconds,daemon,life,rss_kib,threads,fds\n".to_owned())
        .chain(
            samples
                .iter()
                .map(|s| format!("{:.1},{},{},{},{},{}\n", s.t, LABELS[s.daemon], s.life, s.rss_kib, s.threads, s.fds)),
        )
        .collect();
    let _ = std::fs::write(work.join("rss.csv"), csv);
    let ok = report(&cfg, &run, elapsed, &tl, job.as_ref(), &verdict, &samples, &lives, &metrics, &exits, &tallies);
    if ok && std::env::var_os("SOAK_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("soak: logs kept in {}", work.display());
    }
    ok
}

/// Tags a future's output with `tag`.
pub(crate) trait ThenWith: std::future::Future + Sized {
    fn then_with<T>(self, tag: T) -> impl std::future::Future<Output = (T, Self::Output)> {
        async move { (tag, self.await) }
    }
}
impl<F: std::future::Future> ThenWith for F {}
