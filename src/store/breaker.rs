//! The store breaker: once the store is known to be down, calls fail at once with
//! [`StoreError::Down`] instead of each waiting for a connection or a timeout, while one
//! probe at a time (the vault's keeper task, with backoff) tests the store until it
//! answers.
//!
//! - **Opens** on an error that says the database cannot be reached (connection refused
//!   or reset, the pool cannot connect, the server shutting down: [`Outage::Down`]), or
//!   after [`FLAKY_IN_A_ROW`] timeouts or killed connections in a row ([`Outage::Flaky`]).
//! - **While open** every call is refused without touching the store, except the probe.
//!   A probe is admitted only when its backoff has passed and no other probe is running.
//! - **Closes** on the first call that the database answers (a success, or an error the
//!   database itself returned, such as a conflict).
//!
//! Times come from `tokio::time`, so tests drive them with a paused clock.
//!
//! **Invariant:** an open breaker never lets a request reach the store; at most one probe
//! is in flight.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::watch;
use tokio::time::{Duration, Instant};

use super::{Outage, StoreError};
use crate::telemetry::names;

/// Timeouts or killed connections in a row that open the breaker.
pub const FLAKY_IN_A_ROW: u32 = 3;
/// The first probe's delay after the breaker opens; it doubles per failed probe.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Slow calls ask for a probe at most this often.
pub const SUSPICION_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between probes: also the longest the daemon keeps refusing calls
/// after the store is back.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What the breaker lets a call do.
#[derive(Debug)]
pub enum Permit<'a> {
    /// The breaker is closed: an ordinary call.
    Call,
    /// The one probe of an open breaker; dropping it frees the probe slot.
    Probe(ProbeSlot<'a>),
}

/// Holds the probe slot; released on drop, so a cancelled probe frees it too.
#[derive(Debug)]
pub struct ProbeSlot<'a>(&'a Breaker);

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.lock().probing = false;
    }
}

#[derive(Debug)]
struct State {
    open: bool,
    probing: bool,
    next_probe: Instant,
    backoff: Duration,
    /// The first failure after the last call the store answered: when the store was
    /// last known reachable. `None` while it is.
    down_since: Option<Instant>,
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    /// Mirrors `state.open` so the closed path takes no lock.
    open: AtomicBool,
    flaky: AtomicU32,
    /// Set while `state.down_since` is, so a success with nothing to clear takes no lock.
    troubled: AtomicBool,
    /// `true` while the store is taken to be reachable (the breaker is closed).
    reachable: watch::Sender<bool>,
    /// Wakes the keeper for a probe while the breaker is closed ([`Breaker::suspect`]).
    suspicion: tokio::sync::Notify,
    /// When the last suspicion was passed on, to pass on at most one a second.
    last_suspicion: Mutex<Option<Instant>>,
    gauges: Gauges,
}

#[derive(Debug)]
struct Gauges {
    reachable: metrics::Gauge,
    open: metrics::Gauge,
    rejected: metrics::Counter,
}

impl Default for Breaker {
    fn default() -> Self {
        Self::new()
    }
}

impl Breaker {
    pub fn new() -> Self {
        let gauges = Gauges {
            reachable: metrics::gauge!(names::STORE_REACHABLE),
            open: metrics::gauge!(names::STORE_BREAKER_OPEN),
            rejected: metrics::counter!(names::STORE_BREAKER_REJECTED),
        };
        gauges.reachable.set(1.0);
        gauges.open.set(0.0);
        Breaker {
            state: Mutex::new(State {
                open: false,
                probing: false,
                next_probe: Instant::now(),
                backoff: FIRST_BACKOFF,
                down_since: None,
            }),
            open: AtomicBool::new(false),
            flaky: AtomicU32::new(0),
            troubled: AtomicBool::new(false),
            reachable: watch::channel(true).0,
            suspicion: tokio::sync::Notify::new(),
            last_suspicion: Mutex::new(None),
            gauges,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain fields updated in single steps: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Follows reachability: `true` while closed, `false` while open.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.reachable.subscribe()
    }

    /// When the store was last known reachable: `None` while no call has failed since
    /// the last one it answered.
    pub fn down_since(&self) -> Option<Instant> {
        self.lock().down_since
    }

    /// When the next probe may run (`None` while closed).
    pub fn next_probe(&self) -> Option<Instant> {
        let s = self.lock();
        s.open.then_some(s.next_probe)
    }

    /// A call is taking long: asks whoever waits in [`Breaker::suspicions`] (the keeper)
    /// to probe, at most once per [`SUSPICION_INTERVAL`] and only while closed.
    pub fn suspect(&self) {
        if self.is_open() {
            return;
        }
        let now = Instant::now();
        let mut last = self.last_suspicion.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.saturating_duration_since(t) < SUSPICION_INTERVAL) {
            return;
        }
        *last = Some(now);
        self.suspicion.notify_one();
    }

    /// Completes when a call has asked for a probe ([`Breaker::suspect`]).
    pub async fn suspicions(&self) {
        self.suspicion.notified().await
    }

    /// Admits an ordinary call, or refuses it at once while the breaker is open.
    pub fn admit(&self) -> Result<Permit<'_>, StoreError> {
        if !self.is_open() {
            return Ok(Permit::Call);
        }
        self.gauges.rejected.increment(1);
        Err(StoreError::Down)
    }

    /// The probe slot, if the breaker is open, its backoff has passed and no other probe
    /// runs. While closed, any caller may probe (a check on demand).
    pub fn admit_probe(&self) -> Option<Permit<'_>> {
        let mut s = self.lock();
        if !s.open {
            return Some(Permit::Call);
        }
        if s.probing || Instant::now() < s.next_probe {
            return None;
        }
        s.probing = true;
        Some(Permit::Probe(ProbeSlot(self)))
    }

    /// Records how a call ended.
    pub fn record<T>(&self, permit: &Permit<'_>, outcome: &Result<T, StoreError>) {
        let probe = matches!(permit, Permit::Probe(_));
        match outcome.as_ref().err().and_then(StoreError::outage) {
            None => self.answered(),
            Some(Outage::Down) => self.failed(true, probe),
            Some(Outage::Flaky) => {
                let n = self.flaky.fetch_add(1, Ordering::AcqRel) + 1;
                self.failed(n >= FLAKY_IN_A_ROW, probe);
            }
        }
    }

    /// A probe that failed opens the breaker whatever the error (it is the test).
    pub fn record_probe<T>(&self, permit: &Permit<'_>, outcome: &Result<T, StoreError>) {
        match outcome {
            Ok(_) => self.answered(),
            Err(e) if e.outage().is_none() => self.answered(),
            Err(_) => self.failed(true, matches!(permit, Permit::Probe(_))),
        }
    }

    fn answered(&self) {
        self.flaky.store(0, Ordering::Release);
        // The common case (closed, nothing failed) takes no lock.
        if !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        s.down_since = None;
        self.troubled.store(false, Ordering::Release);
        s.backoff = FIRST_BACKOFF;
        if s.open {
            s.open = false;
            self.open.store(false, Ordering::Release);
            drop(s);
            tracing::info!("storage answers again; closing the breaker");
            self.gauges.open.set(0.0);
            self.gauges.reachable.set(1.0);
            self.reachable.send_replace(true);
        } else {
            drop(s);
            self.gauges.reachable.set(1.0);
        }
    }

    fn failed(&self, open: bool, probe: bool) {
        let now = Instant::now();
        let mut s = self.lock();
        s.down_since.get_or_insert(now);
        self.troubled.store(true, Ordering::Release);
        self.gauges.reachable.set(0.0);
        if s.open {
            if probe {
                s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                s.next_probe = now + s.backoff;
            }
            return;
        }
        if !open {
            return;
        }
        s.open = true;
        s.backoff = FIRST_BACKOFF;
        s.next_probe = now + s.backoff;
        self.open.store(true, Ordering::Release);
        drop(s);
        tracing::warn!("storage is unreachable; opening the breaker (calls fail fast until a probe succeeds)");
        self.gauges.open.set(1.0);
        self.reachable.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Result<(), StoreError> {
        Err(StoreError::Unavailable(sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))))
    }

    fn timeout() -> Result<(), StoreError> {
        Err(StoreError::Timeout("get_version", Duration::from_secs(5)))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_an_unreachable_store_and_refuses_calls_at_once() {
        let b = Breaker::new();
        let mut rx = b.subscribe();
        let p = b.admit().unwrap();
        b.record(&p, &down());
        assert!(b.is_open());
        assert!(rx.has_changed().unwrap() && !*rx.borrow_and_update());
        assert!(matches!(b.admit(), Err(StoreError::Down)));
        assert!(b.down_since().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_open_it_only_in_a_row() {
        let b = Breaker::new();
        for _ in 0..FLAKY_IN_A_ROW - 1 {
            let p = b.admit().unwrap();
            b.record(&p, &timeout());
        }
        let p = b.admit().unwrap();
        b.record(&p, &Ok(()));
        assert!(b.down_since().is_none(), "a success clears the failures");
        for _ in 0..FLAKY_IN_A_ROW - 1 {
            let p = b.admit().unwrap();
            b.record(&p, &timeout());
        }
        assert!(!b.is_open());
        // An error the database itself answered (a conflict) is not an outage.
        let p = b.admit().unwrap();
        b.record(&p, &Err::<(), _>(StoreError::Conflict));
        let p = b.admit().unwrap();
        b.record(&p, &timeout());
        assert!(!b.is_open(), "the conflict broke the run of timeouts");
        for _ in 0..FLAKY_IN_A_ROW - 1 {
            let p = b.admit().unwrap();
            b.record(&p, &timeout());
        }
        assert!(b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_at_a_time_with_backoff_until_the_store_answers() {
        let b = Breaker::new();
        let p = b.admit().unwrap();
        b.record(&p, &down());
        assert!(b.admit_probe().is_none(), "not before the first backoff");
        tokio::time::advance(FIRST_BACKOFF).await;
        let probe = b.admit_probe().expect("probe admitted");
        assert!(b.admit_probe().is_none(), "a second probe waits for the first");
        b.record_probe(&probe, &down());
        drop(probe);
        // Backoff doubles per failed probe, up to the cap.
        let mut expected = FIRST_BACKOFF;
        for _ in 0..8 {
            expected = (expected * 2).min(MAX_BACKOFF);
            let next = b.next_probe().unwrap();
            assert_eq!(next - Instant::now(), expected);
            tokio::time::advance(expected).await;
            let probe = b.admit_probe().expect("probe admitted");
            b.record_probe(&probe, &timeout());
        }
        assert_eq!(expected, MAX_BACKOFF);
        tokio::time::advance(MAX_BACKOFF).await;
        // A cancelled probe frees the slot.
        drop(b.admit_probe().expect("probe admitted"));
        let probe = b.admit_probe().expect("slot freed by the drop");
        let mut rx = b.subscribe();
        b.record_probe(&probe, &Ok(()));
        assert!(!b.is_open() && *rx.borrow_and_update());
        assert!(matches!(b.admit(), Ok(Permit::Call)));
        assert!(b.down_since().is_none());
    }
}
