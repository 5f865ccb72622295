//! Rotation health: the staleness gauges and the listing filters behind
//! `credvault list --older-than` and `--rotation-overdue`.
//!
//! A background task recounts, every `rotation.staleness_interval_ms`, the live
//! credentials whose rotation is overdue, that have expired, that expire within
//! `rotation.expiry_horizon_seconds`, and the age of the oldest current version, and sets
//! one gauge for each. The gauges carry no label: a fleet-wide number, the same on every
//! daemon over one database (alert on `max`), never a credential name.
//!
//! **Invariant:** a pass is four index range queries, each stopping after
//! `rotation.staleness_max_count` entries; its cost does not grow with the fleet.

use std::time::Duration;

use super::{micros, Vault, VaultError};
use crate::store::{ListFilter, Micros, Staleness, StalenessQuery, StalenessStore as _, StoreError};
use crate::telemetry::names;

/// What a listing keeps, besides its prefix and policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilters {
    /// Only credentials whose current version is older than this.
    pub older_than: Option<Duration>,
    /// Only credentials whose rotation policy is overdue (as the gauge counts them).
    pub rotation_overdue: bool,
}

impl ListFilters {
    pub fn is_empty(&self) -> bool {
        self.older_than.is_none() && !self.rotation_overdue
    }

    /// The filters' part of a page token's binding: empty when there are none, so tokens
    /// of unfiltered listings are what they always were.
    pub(super) fn binding(&self) -> Vec<u8> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut out = vec![1];
        out.extend_from_slice(&self.older_than.map_or(u128::MAX, |d| d.as_micros()).to_be_bytes());
        out.push(u8::from(self.rotation_overdue));
        out
    }
}

impl Vault {
    /// The store's filter for `filters` as of `now`.
    pub(super) fn store_filter(&self, filters: &ListFilters, now: Micros) -> ListFilter {
        ListFilter {
            current_before: filters.older_than.map(|d| now.saturating_sub(micros(d))),
            overdue_before: filters.rotation_overdue.then(|| self.overdue_before(now)),
        }
    }

    fn overdue_before(&self, now: Micros) -> Micros {
        now.saturating_sub(micros(Duration::from_secs(self.inner.rotation.overdue_after_seconds)))
    }

    /// Counts as of `now` (one pass of the task), and sets the gauges.
    pub async fn staleness_pass(&self, now: Micros) -> Result<Staleness, VaultError> {
        let s = &self.inner.rotation;
        let query = StalenessQuery {
            overdue_before: self.overdue_before(now),
            now,
            expiring_before: now.saturating_add(micros(Duration::from_secs(s.expiry_horizon_seconds))),
            cap: s.staleness_max_count,
        };
        let counts = self.inner.store.staleness(&query).await?;
        metrics::gauge!(names::CREDENTIALS_ROTATION_OVERDUE).set(counts.overdue as f64);
        metrics::gauge!(names::CREDENTIALS_EXPIRED).set(counts.expired as f64);
        metrics::gauge!(names::CREDENTIALS_EXPIRING).set(counts.expiring as f64);
        let age = counts.oldest_current_at.map_or(0, |at| now.saturating_sub(at).max(0));
        metrics::gauge!(names::OLDEST_CURRENT_VERSION_AGE).set(age as f64 / 1e6);
        metrics::gauge!(names::STALENESS_UPDATED).set(now as f64 / 1e6);
        Ok(counts)
    }

    /// The staleness task: a pass at once, then one every interval, until `stop` turns true.
    pub async fn run_staleness(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut ticks = tokio::time::interval(Duration::from_millis(self.inner.rotation.staleness_interval_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = ticks.tick() => {}
            }
            match self.staleness_pass(self.now()).await {
                Ok(_) => {}
                // The store's outage has its own gauges; the counts just stay as they were.
                Err(VaultError::Unavailable(
                    StoreError::Unavailable(_) | StoreError::Timeout(..) | StoreError::Down,
                )) => {}
                Err(e) => tracing::warn!(error = %e, "staleness pass failed"),
            }
        }
    }
}
