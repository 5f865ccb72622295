//! Single-flight misses: concurrent readers of one uncached name share one store load.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::OnceCell;

use super::{lock, Cache, Cached};

impl Cache {
    /// Runs `load` for `name` once for all concurrent callers and caches its result.
    /// Callers arriving while a load is in flight wait for it instead of querying too.
    /// A failed load is not shared: the next waiter tries its own.
    pub async fn load_coalesced<F, Fut, E>(&self, name: &str, load: F) -> Result<Cached, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Cached, E>>,
    {
        let cell = {
            let mut inflight = lock(&self.inflight);
            match inflight.get_mut(name) {
                Some(entry) => {
                    self.counters.coalesced.increment(1);
                    entry.holders += 1;
                    entry.cell.clone()
                }
                None => {
                    let c = Arc::new(OnceCell::new());
                    inflight.insert(name.to_owned(), Inflight { cell: c.clone(), holders: 1 });
                    c
                }
            }
        };
        // The last caller holding the entry removes it when it is done, and also when its
        // future is dropped mid-load (a cancelled or timed-out request): no caller leaves an
        // entry behind, and a cancelled waiter does not end the load others wait for.
        let _entry = InflightEntry { cache: self, name, cell: &cell };
        cell.get_or_try_init(|| async {
            let ticket = self.ticket(name);
            let value = load().await?;
            self.fill(name, ticket, value.clone());
            Ok(value)
        })
        .await
        .cloned()
    }

    /// Loads in flight (entries of the coalescing map), for tests and diagnostics.
    pub fn inflight_len(&self) -> usize {
        lock(&self.inflight).len()
    }
}

/// One load in flight: the cell its callers share, and how many callers hold it.
#[derive(Debug)]
pub(super) struct Inflight {
    cell: Arc<OnceCell<Cached>>,
    holders: usize,
}

/// A caller's hold on a coalescing-map entry, released when the caller is done or its
/// future is dropped; the last holder removes the entry (unless another load has
/// replaced it since), and so does the caller whose load filled it.
struct InflightEntry<'a> {
    cache: &'a Cache,
    name: &'a str,
    cell: &'a Arc<OnceCell<Cached>>,
}

impl Drop for InflightEntry<'_> {
    fn drop(&mut self) {
        let mut inflight = lock(&self.cache.inflight);
        if let Some(entry) = inflight.get_mut(self.name) {
            if Arc::ptr_eq(&entry.cell, self.cell) {
                entry.holders = entry.holders.saturating_sub(1);
                // A loaded entry goes at once, as it did before holders were counted: a
                // caller arriving later must not take a value an invalidation may have
                // overtaken since.
                if entry.holders == 0 || entry.cell.initialized() {
                    inflight.remove(self.name);
                }
            }
        }
    }
}
