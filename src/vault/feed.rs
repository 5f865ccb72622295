//! Keeping the cache honest across change-feed losses and store outages.
//!
//! - The feed is lost ([`Change::Lost`](crate::store::Change::Lost)) or the store breaker
//!   opens: the cache is suspended (every entry unverified, kept to be served stale) and
//!   the store is probed at once, so a dead store is known within a probe's timeout.
//! - While the breaker is open the keeper probes the store, one probe at a time, with
//!   the breaker's backoff.
//! - The feed is subscribed again, or the breaker closes while the feed is live: the
//!   keeper resyncs. It reads the current versions of every unverified cached name (one
//!   query per [`RESYNC_CHUNK`] names), keeps the entries that are still current and
//!   drops the rest, then tells watchers to resync.
//!
//! **Invariant:** the cache is trusted again only after a resync that began after the
//! feed was subscribed and the store answered, and that no new loss interrupted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::{Vault, WatchEvent};
use crate::cache::Current;
use crate::telemetry::names;

/// Names per revalidation query.
pub const RESYNC_CHUNK: usize = 500;
/// Wait between attempts of a resync whose query failed while the breaker stayed closed.
const RESYNC_RETRY: Duration = Duration::from_millis(200);
/// How often the unreachable-seconds gauge is refreshed while the store is down.
const GAUGE_PERIOD: Duration = Duration::from_secs(1);

pub(super) struct FeedState {
    /// The change feed is subscribed (always, for backends without a feed).
    up: AtomicBool,
    resync: Notify,
    probe: Notify,
}

impl Default for FeedState {
    fn default() -> Self {
        FeedState { up: AtomicBool::new(true), resync: Notify::new(), probe: Notify::new() }
    }
}

impl Vault {
    pub(super) fn feed_lost(&self) {
        self.inner.feed.up.store(false, Ordering::SeqCst);
        self.inner.cache.suspend();
        // Is the store gone too? Find out now rather than at the next miss.
        self.inner.feed.probe.notify_one();
    }

    pub(super) fn feed_subscribed(&self) {
        self.inner.feed.up.store(true, Ordering::SeqCst);
        if self.inner.cache.in_sync() {
            // Nothing was lost (the feed's first subscription): nothing to revalidate.
            self.publish(WatchEvent::Resync);
            return;
        }
        self.inner.feed.resync.notify_one();
    }

    /// Whether an unverified entry may be served now: `cache.serve_stale_seconds` is on
    /// and the store was last reachable within it.
    pub(super) fn may_serve_stale(&self) -> bool {
        let window = self.inner.cache.stale_window();
        !window.is_zero() && self.store_unreachable_for().is_none_or(|d| d <= window)
    }

    /// How long the store has been unreachable (since the first failed call or probe
    /// after the last one it answered); `None` while it is reachable.
    pub fn store_unreachable_for(&self) -> Option<Duration> {
        self.inner.store.breaker().down_since().map(|t| tokio::time::Instant::now().saturating_duration_since(t))
    }

    /// Follows the store breaker: `true` while the store is taken to be reachable.
    pub fn store_reachable(&self) -> watch::Receiver<bool> {
        self.inner.store.breaker().subscribe()
    }

    /// Whether the cache is in sync with the store (no feed loss or outage since the
    /// last completed resync).
    pub fn cache_in_sync(&self) -> bool {
        self.inner.cache.in_sync()
    }

    /// Probes the store while it is down, suspends the cache when it goes, and resyncs
    /// the cache when the store and the feed are back. Runs until `shutdown` turns true.
    pub async fn run_keeper(self, mut shutdown: watch::Receiver<bool>) {
        let mut reachable = self.store_reachable();
        let gauge = metrics::gauge!(names::STORE_UNREACHABLE_SECONDS);
        gauge.set(0.0);
        let mut ticker = tokio::time::interval(GAUGE_PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !*shutdown.borrow() {
            let breaker = self.inner.store.breaker();
            let next_probe = breaker.next_probe();
            tokio::select! {
                _ = shutdown.changed() => return,
                changed = reachable.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if *reachable.borrow_and_update() {
                        if self.inner.feed.up.load(Ordering::SeqCst) {
                            self.resync(&mut shutdown).await;
                        }
                        // Otherwise the feed's own resubscription triggers the resync.
                    } else {
                        self.inner.cache.suspend();
                    }
                }
                _ = self.inner.feed.resync.notified() => self.resync(&mut shutdown).await,
                _ = self.inner.feed.probe.notified() => {
                    let _ = self.inner.store.probe().await;
                }
                () = breaker.suspicions() => {
                    let _ = self.inner.store.probe().await;
                }
                _ = sleep_until(next_probe) => {
                    let _ = self.inner.store.probe().await;
                }
                _ = ticker.tick() => {
                    gauge.set(self.store_unreachable_for().map_or(0.0, |d| d.as_secs_f64()));
                }
            }
        }
    }

    /// Revalidates the cache until it is in sync, the feed is lost again, or shutdown.
    async fn resync(&self, shutdown: &mut watch::Receiver<bool>) {
        if self.inner.cache.in_sync() {
            // Nothing was lost (the feed's first subscription): nothing to revalidate.
            self.publish(WatchEvent::Resync);
            return;
        }
        let mut reachable = self.store_reachable();
        loop {
            if *shutdown.borrow() || !self.inner.feed.up.load(Ordering::SeqCst) {
                return;
            }
            if !*reachable.borrow_and_update() {
                // The breaker closing brings the keeper back here.
                return;
            }
            match self.resync_once().await {
                Ok(true) => {
                    tracing::info!("cache resynced with the store");
                    self.publish(WatchEvent::Resync);
                    return;
                }
                // Fell out of sync again meanwhile: start over if the feed is still live.
                Ok(false) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "cache resync failed; retrying");
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        _ = tokio::time::sleep(RESYNC_RETRY) => {}
                    }
                }
            }
        }
    }

    async fn resync_once(&self) -> Result<bool, crate::store::StoreError> {
        let cache = &self.inner.cache;
        let gen = cache.begin_resync();
        let names = cache.unverified_names(gen);
        for chunk in names.chunks(RESYNC_CHUNK) {
            let rows = self.inner.store.current_for_resync(chunk).await?;
            let by_name: std::collections::HashMap<&str, _> =
                rows.iter().map(|(h, v)| (h.name.as_str(), (h, v))).collect();
            for name in chunk {
                let current = match by_name.get(name.as_str()) {
                    None => Current::Absent,
                    Some((h, _)) if h.deleted_at.is_some() => Current::Deleted,
                    Some((_, v)) => Current::Live(&v.info, v.sealed.is_some()),
                };
                cache.revalidate(gen, name, current);
            }
        }
        Ok(cache.finish_resync(gen))
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
