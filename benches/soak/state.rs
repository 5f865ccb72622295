//! Shared state of the run: clients that follow restarts, statuses by situation, what counts as documented.

use super::*;

#[derive(Clone)]
pub(crate) struct Bearer(pub(crate) MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub(crate) type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;
pub(crate) type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// Where one daemon currently listens; a restart moves it and bumps `generation`.
pub(crate) struct Slot {
    pub(crate) index: usize,
    pub(crate) addr: RwLock<String>,
    pub(crate) generation: AtomicU32,
    pub(crate) pid: AtomicU32,
    pub(crate) life: AtomicU32,
    pub(crate) restarting: AtomicBool,
}

impl Slot {
    pub(crate) fn channel(&self) -> (u32, Channel) {
        let generation = self.generation.load(Ordering::SeqCst);
        let addr = self.addr.read().expect("slot").clone();
        let ch = Channel::from_shared(format!("http://{addr}")).expect("endpoint").connect_lazy();
        (generation, ch)
    }
}

/// A client that follows its slot to a restarted daemon; one HTTP/2 connection per task.
pub(crate) struct Follow {
    pub(crate) slot: Arc<Slot>,
    pub(crate) bearer: Bearer,
    pub(crate) generation: u32,
    pub(crate) channel: Channel,
}

impl Follow {
    pub(crate) fn new(slot: Arc<Slot>, bearer: Bearer) -> Follow {
        let (generation, channel) = slot.channel();
        Follow { slot, bearer, generation, channel }
    }
    pub(crate) fn refresh(&mut self) {
        if self.slot.generation.load(Ordering::SeqCst) != self.generation {
            (self.generation, self.channel) = self.slot.channel();
        }
    }
    pub(crate) fn client(&mut self) -> Client {
        self.refresh();
        CredentialServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
    pub(crate) fn admin(&mut self) -> Admin {
        self.refresh();
        AdminServiceClient::with_interceptor(self.channel.clone(), self.bearer.clone())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Situation {
    Normal,
    Outage,
    Restart,
}

impl Situation {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Situation::Normal => "normal",
            Situation::Outage => "outage",
            Situation::Restart => "restart",
        }
    }
}

pub(crate) type Key = (usize, &'static str, Situation, String);

#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) counts: Mutex<BTreeMap<Key, u64>>,
    /// Latency of whole calls (not batch items), in microseconds.
    pub(crate) latency: Mutex<HashMap<Key, hdrhistogram::Histogram<u64>>>,
    /// Up to three messages for each non-OK key.
    pub(crate) messages: Mutex<HashMap<Key, Vec<String>>>,
    /// Values that came back wrong (not the credential's, or unreadable).
    pub(crate) bad_values: Mutex<Vec<String>>,
}

pub(crate) struct Run {
    pub(crate) start: Instant,
    pub(crate) outage: AtomicBool,
    /// The current (or last) outage's number and when its proxies were cut.
    pub(crate) outage_cut: Mutex<(u32, Option<Instant>)>,
    /// Outages, the KEK rotation and the restart, as (start, end) in seconds of the run.
    pub(crate) disruptions: Mutex<Vec<(f64, f64)>>,
    /// Per outage and daemon: seconds from the cut to the first read answered stale or
    /// UNAVAILABLE, i.e. until the daemon showed that it knew.
    pub(crate) first_sign: Mutex<BTreeMap<(u32, usize), f64>>,
    pub(crate) stop: AtomicBool,
    pub(crate) stats: Stats,
    pub(crate) slots: [Arc<Slot>; 2],
}

impl Run {
    pub(crate) fn situation(&self, slot: &Slot) -> Situation {
        if slot.restarting.load(Ordering::SeqCst) {
            Situation::Restart
        } else if self.outage.load(Ordering::SeqCst) {
            Situation::Outage
        } else {
            Situation::Normal
        }
    }

    pub(crate) fn secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        daemon: usize,
        rpc: &'static str,
        situation: Situation,
        outcome: &str,
        message: Option<&str>,
        took: Option<Duration>,
    ) {
        if rpc.starts_with("GetCredential") || rpc.starts_with("BatchGet") {
            self.outage_sign(daemon, situation, outcome);
        }
        let key = (daemon, rpc, situation, outcome.to_owned());
        if let Some(m) = message {
            let mut messages = self.stats.messages.lock().expect("stats");
            let list = messages.entry(key.clone()).or_default();
            if list.len() < 3 && !list.iter().any(|x| x == m) {
                list.push(m.to_owned());
            }
        }
        if let Some(took) = took {
            let mut latency = self.stats.latency.lock().expect("stats");
            let h = latency
                .entry(key.clone())
                .or_insert_with(|| hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 2).expect("histogram"));
            h.saturating_record(took.as_micros() as u64);
        }
        *self.stats.counts.lock().expect("stats").entry(key).or_default() += 1;
    }

    /// Notes the first sign, during an outage, that `daemon` knows the store is gone.
    pub(crate) fn outage_sign(&self, daemon: usize, situation: Situation, outcome: &str) {
        if situation != Situation::Outage || !(outcome == "OK stale" || outcome == "UNAVAILABLE") {
            return;
        }
        let (n, cut) = *self.outage_cut.lock().expect("outage");
        if let Some(cut) = cut {
            self.first_sign.lock().expect("outage").entry((n, daemon)).or_insert(cut.elapsed().as_secs_f64());
        }
    }

    pub(crate) fn bad_value(&self, what: String) {
        let mut v = self.stats.bad_values.lock().expect("stats");
        if v.len() < 1000 {
            v.push(what);
        }
    }
}

/// The HTTP/2 error under a status the client made from a transport error, if any.
pub(crate) fn h2_cause(s: &tonic::Status) -> Option<&h2::Error> {
    let mut e = std::error::Error::source(s);
    while let Some(err) = e {
        if let Some(h) = err.downcast_ref::<h2::Error>() {
            return Some(h);
        }
        e = err.source();
    }
    None
}

/// What the caller was told: the code, or one of two statuses the tonic client makes
/// itself for a request the daemon never handled: one its own connection task dropped
/// while the connection closed (see drain.rs), and one on a stream the daemon's
/// graceful GOAWAY (reason NO_ERROR) left out, which tonic maps to INTERNAL where gRPC
/// means UNAVAILABLE (retry).
pub(crate) fn outcome(s: &tonic::Status) -> &'static str {
    let refused = |h: &h2::Error| h.is_go_away() && h.is_remote() && h.reason() == Some(h2::Reason::NO_ERROR);
    if s.code() == Code::Cancelled && s.message() == "operation was canceled" {
        "CANCELLED (client-side)"
    } else if s.code() == Code::Internal && h2_cause(s).is_some_and(refused) {
        "INTERNAL (client-side, GOAWAY)"
    } else {
        credvault::proto::code_name(s.code())
    }
}

/// A status's message, with the HTTP/2 error under it if there is one.
pub(crate) fn detail(s: &tonic::Status) -> String {
    match h2_cause(s) {
        Some(h) => format!("{} [h2: {h:?}]", s.message()),
        None => s.message().to_owned(),
    }
}

/// Whether README documents `outcome` for `rpc` in `situation`. Absent names are never
/// written; every other name is written before the load starts and never deleted.
pub(crate) fn allowed(rpc: &str, situation: Situation, outcome: &str) -> bool {
    let absent = rpc.contains("absent");
    match outcome {
        "OK" => !absent,
        // Cached versions served while the database is unreachable (README, "Serving
        // through a database outage").
        "OK stale" => situation == Situation::Outage && !absent,
        "NOT_FOUND" => absent,
        // Outage: misses and writes fail fast; restart: GOAWAY, then a refused
        // connection until the new process listens.
        "UNAVAILABLE" => situation != Situation::Normal,
        "CANCELLED (client-side)" | "INTERNAL (client-side, GOAWAY)" => situation == Situation::Restart,
        _ => false,
    }
}

pub(crate) fn name_of(i: usize) -> String {
    format!("soak/n{i:05}")
}

pub(crate) fn value_for(name: &str, seq: u64) -> Vec<u8> {
    let mut v = format!("{name}#{seq}#").into_bytes();
    let len = 48 + (seq.wrapping_mul(37) % 900) as usize;
    v.resize(len.max(v.len()), b'v');
    v
}

pub(crate) fn check_value(run: &Run, daemon: usize, name: &str, value: &[u8]) {
    if !value.starts_with(format!("{name}#").as_bytes()) {
        run.bad_value(format!("daemon {} read {name}: a value that is not its own", LABELS[daemon]));
    }
}
