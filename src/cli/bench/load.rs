//! The load itself: callers in a closed or paced open loop, one HDR histogram each.

use super::*;

/// What one request came back with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    Conflict,
    Error(&'static str),
}

/// One measurement of one target.
pub(super) struct Measured {
    pub(super) histogram: Histogram<u64>,
    pub(super) outcomes: BTreeMap<&'static str, (Outcome, u64)>,
    pub(super) elapsed: Duration,
}

/// Runs the load for `duration` or `max_requests`, whichever ends first.
pub(super) async fn measure(
    args: &BenchArgs,
    target: &Target,
    value: &Arc<[u8]>,
    duration: Duration,
    max_requests: Option<u64>,
) -> Result<Measured, ClientError> {
    let start = Instant::now();
    let deadline = start + duration;
    let max_requests = max_requests.unwrap_or(u64::MAX);
    let mut pacer = None;
    let tickets = match args.rate {
        Some(rate) => {
            // Enough room for a second of backlog; when the callers fall further behind the
            // pacer waits, and the scheduled times still count the delay.
            let cap = (rate as usize).clamp(args.concurrency, 1 << 20);
            let (tx, rx) = mpsc::channel::<(u64, Instant)>(cap);
            pacer = Some(spawn_pacer(rate, start, deadline, max_requests, tx)?);
            Tickets::Paced(Arc::new(Mutex::new(rx)))
        }
        None => Tickets::Counted { next: Arc::new(AtomicU64::new(0)), max: max_requests, deadline },
    };
    let shared = Arc::new(Shared {
        workload: args.workload,
        keys: target.keys.clone(),
        value: value.clone(),
        reads: Picker::new(args.distribution, args.keys, args.zipf_exponent),
        // Writers own disjoint key sets (key i belongs to caller i mod C) when there are
        // enough keys, so the daemon sees compare-and-set writes that do not lose to each
        // other; with fewer keys than callers they share keys and conflicts are expected.
        writes: Picker::new(args.distribution, (args.keys / args.concurrency as u64).max(1), args.zipf_exponent),
        partitioned: args.keys >= args.concurrency as u64,
        batch_size: args.batch_size,
        read_ratio: args.read_ratio,
        timeout: Duration::from_secs_f64(args.request_timeout),
        hard_stop: start + Duration::from_secs_f64(args.max_time),
        concurrency: args.concurrency as u64,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..args.concurrency {
        let worker = Worker {
            id: id as u64,
            client: target.clients[id % target.clients.len()].clone(),
            rng: SplitMix64(rand::random::<u64>() ^ id as u64),
            shared: shared.clone(),
            tickets: tickets.clone(),
        };
        tasks.spawn(worker.run(new_histogram()?));
    }
    let mut histogram = new_histogram()?;
    let mut outcomes: BTreeMap<&'static str, (Outcome, u64)> = BTreeMap::new();
    while let Some(done) = tasks.join_next().await {
        let (h, o) = done.map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))?;
        histogram.add(&h).map_err(|e| usage(format!("histogram: {e}")))?;
        for (k, (outcome, n)) in o {
            outcomes.entry(k).or_insert((outcome, 0)).1 += n;
        }
    }
    let elapsed = start.elapsed();
    // Closes the schedule: a pacer still waiting to hand out a request stops now.
    drop(tickets);
    if let Some(p) = pacer {
        let _ = tokio::task::spawn_blocking(move || p.join()).await;
    }
    Ok(Measured { histogram, outcomes, elapsed })
}

pub(super) fn new_histogram() -> Result<Histogram<u64>, ClientError> {
    // Nanoseconds, 1 ns to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000_000, 3).map_err(|e| usage(format!("histogram: {e}")))
}

pub(super) fn spawn_pacer(
    rate: f64,
    start: Instant,
    deadline: Instant,
    max: u64,
    tx: mpsc::Sender<(u64, Instant)>,
) -> Result<std::thread::JoinHandle<()>, ClientError> {
    let pacer = move || {
        for i in 0..max {
            // From the start, not from the last send: a late wake-up does not slow the rate.
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            if at >= deadline {
                break;
            }
            let now = Instant::now();
            if at > now {
                std::thread::sleep(at - now);
            }
            if tx.blocking_send((i, at)).is_err() {
                break;
            }
        }
    };
    Ok(std::thread::Builder::new().name("bench-pacer".into()).spawn(pacer)?)
}

#[derive(Clone)]
pub(super) enum Tickets {
    /// Closed loop: take a number until `max` or the deadline.
    Counted { next: Arc<AtomicU64>, max: u64, deadline: Instant },
    /// Open loop: request numbers and their scheduled start times, from the pacer.
    Paced(Arc<Mutex<mpsc::Receiver<(u64, Instant)>>>),
}

pub(super) struct Shared {
    pub(super) workload: Workload,
    pub(super) keys: Arc<Keys>,
    pub(super) value: Arc<[u8]>,
    pub(super) reads: Picker,
    pub(super) writes: Picker,
    pub(super) partitioned: bool,
    pub(super) batch_size: usize,
    pub(super) read_ratio: f64,
    pub(super) timeout: Duration,
    pub(super) hard_stop: Instant,
    pub(super) concurrency: u64,
}

pub(super) struct Worker {
    pub(super) id: u64,
    pub(super) client: Client,
    pub(super) rng: SplitMix64,
    pub(super) shared: Arc<Shared>,
    pub(super) tickets: Tickets,
}

pub(super) type WorkerResult = (Histogram<u64>, BTreeMap<&'static str, (Outcome, u64)>);

impl Worker {
    pub(super) async fn run(mut self, mut histogram: Histogram<u64>) -> WorkerResult {
        let mut outcomes: BTreeMap<&'static str, (Outcome, u64)> = BTreeMap::new();
        loop {
            let (n, scheduled) = match &self.tickets {
                Tickets::Counted { next, max, deadline } => {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if n >= *max || now >= *deadline {
                        break;
                    }
                    (n, now)
                }
                Tickets::Paced(rx) => {
                    let next = rx.lock().await.recv().await;
                    match next {
                        Some(ticket) => ticket,
                        None => break,
                    }
                }
            };
            if Instant::now() >= self.shared.hard_stop {
                break;
            }
            let (label, outcome) = self.request(n).await;
            let nanos = u64::try_from(scheduled.elapsed().as_nanos()).unwrap_or(u64::MAX);
            histogram.saturating_record(nanos.max(1));
            outcomes.entry(label).or_insert((outcome, 0)).1 += 1;
        }
        (histogram, outcomes)
    }

    pub(super) fn read_key(&mut self, n: u64) -> &str {
        let i = self.shared.reads.pick(&mut self.rng, n);
        &self.shared.keys.names[i as usize]
    }

    /// A key this caller owns when writers are partitioned.
    pub(super) fn write_key(&mut self, n: u64) -> usize {
        let s = &self.shared;
        let slot = s.writes.pick(&mut self.rng, n / s.concurrency);
        let i = if s.partitioned { slot * s.concurrency + self.id } else { slot };
        (i % s.keys.names.len() as u64) as usize
    }

    pub(super) async fn request(&mut self, n: u64) -> (&'static str, Outcome) {
        let timeout = self.shared.timeout;
        let read = match self.shared.workload {
            Workload::Get | Workload::BatchGet | Workload::Miss => true,
            Workload::Put => false,
            Workload::Mixed => self.rng.next_f64() < self.shared.read_ratio,
        };
        match self.shared.workload {
            Workload::Miss => {
                let k = self.shared.keys.miss_counter.fetch_add(1, Ordering::Relaxed);
                let name = format!("{}{k}", self.shared.keys.miss_base);
                let call = self.client.get_credential(proto::GetCredentialRequest { name, version: None });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) if s.code() == Code::NotFound => ("NOT_FOUND", Outcome::Ok),
                    Ok(Err(s)) => status_outcome(&s),
                    // A name nobody wrote exists: not what this workload measures.
                    Ok(Ok(_)) => ("FOUND", Outcome::Error("FOUND")),
                }
            }
            Workload::BatchGet => {
                let names = (0..self.shared.batch_size as u64)
                    .map(|j| self.read_key(n.wrapping_mul(self.shared.batch_size as u64).wrapping_add(j)).to_owned())
                    .collect();
                let call = self.client.batch_get_credentials(proto::BatchGetCredentialsRequest { names });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) => status_outcome(&s),
                    Ok(Ok(r)) => {
                        let failed = r.into_inner().results.iter().find_map(|r| match &r.result {
                            Some(batch_get_result::Result::Credential(_)) => None,
                            Some(batch_get_result::Result::Error(e)) => Some(e.code),
                            None => Some(Code::Unknown as i32),
                        });
                        match failed {
                            None => ("OK", Outcome::Ok),
                            Some(code) => {
                                let name = crate::proto::code_name(Code::from(code));
                                (name, Outcome::Error(name))
                            }
                        }
                    }
                }
            }
            Workload::Get | Workload::Mixed if read => {
                let name = self.read_key(n).to_owned();
                let call = self.client.get_credential(proto::GetCredentialRequest { name, version: None });
                match tokio::time::timeout(timeout, call).await {
                    Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
                    Ok(Err(s)) => status_outcome(&s),
                    Ok(Ok(_)) => ("OK", Outcome::Ok),
                }
            }
            Workload::Get | Workload::Mixed | Workload::Put => self.put(n).await,
        }
    }

    pub(super) async fn put(&mut self, n: u64) -> (&'static str, Outcome) {
        let i = self.write_key(n);
        let keys = self.shared.keys.clone();
        let expected = keys.versions[i].load(Ordering::Relaxed);
        let call = self.client.put_credential(proto::PutCredentialRequest {
            name: keys.names[i].clone(),
            value: self.shared.value.to_vec(),
            expected_version: Some(expected),
            metadata: None,
        });
        match tokio::time::timeout(self.shared.timeout, call).await {
            Err(_) => ("TIMEOUT", Outcome::Error("TIMEOUT")),
            Ok(Ok(r)) => {
                keys.versions[i].fetch_max(r.into_inner().version, Ordering::Relaxed);
                ("OK", Outcome::Ok)
            }
            Ok(Err(s)) if matches!(s.code(), Code::Aborted | Code::FailedPrecondition | Code::AlreadyExists) => {
                // Lost to another writer: learn the current version for the next attempt
                // (after the latency was taken, so this read is not counted).
                let meta = self
                    .client
                    .get_credential_metadata(proto::GetCredentialMetadataRequest { name: keys.names[i].clone() });
                if let Ok(Ok(m)) = tokio::time::timeout(self.shared.timeout, meta).await {
                    keys.versions[i].fetch_max(m.into_inner().current_version, Ordering::Relaxed);
                }
                ("CONFLICT", Outcome::Conflict)
            }
            Ok(Err(s)) => status_outcome(&s),
        }
    }
}

pub(super) fn status_outcome(s: &Status) -> (&'static str, Outcome) {
    let name = crate::proto::code_name(s.code());
    (name, Outcome::Error(name))
}
