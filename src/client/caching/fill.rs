//! The read path: a hit, a single-flight miss, batch loads, storing what a load brought
//! back (unless something newer may have superseded it) and telling subscribers.

use std::sync::atomic::Ordering;
use std::sync::{Arc, MutexGuard};
use std::time::Instant;

use super::state::{Entry, LoadGuard, State, Ticket, WatchState};
use super::{Inner, Update, BATCH};
use crate::client::{Credential, Error, VersionState};

impl Inner {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the map half-updated in a way that
        // serves a wrong value (every update is a single insert or remove), so go on.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) async fn get(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let now = Instant::now();
        let mut fallback = None;
        {
            let mut st = self.lock();
            let probe_recent = st.last_failure.is_some_and(|t| now.duration_since(t) < self.config.probe_interval);
            if let Some(e) = st.entries.get(name) {
                let age = now.duration_since(e.verified_at);
                let fresh = match &e.watch {
                    Some(w) => e.gen == w.gen() && w.is_live() && age < self.config.ttl,
                    // No stream vouches for it: only the short TTL.
                    None => age < self.config.unwatched_ttl,
                };
                if fresh {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(e.cred.clone());
                }
                if age <= self.config.stale_if_error {
                    fallback = Some(e.cred.clone());
                }
            }
            if probe_recent {
                if let Some(c) = fallback {
                    self.stale_served.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        self.watch_for(name);
        match self.fill(name).await {
            Err(e) if e.is_unavailable() => match fallback {
                Some(c) => {
                    self.stale_served.fetch_add(1, Ordering::Relaxed);
                    Ok(c)
                }
                None => Err(e),
            },
            r => r,
        }
    }

    /// One load per name: every concurrent caller waits for the same one.
    pub(super) async fn fill(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let flight = self.lock().inflight.entry(name.to_owned()).or_default().clone();
        let result = flight.get_or_init(|| self.load(name)).await.clone();
        let mut st = self.lock();
        if st.inflight.get(name).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
            st.inflight.remove(name);
        }
        result
    }

    async fn load(self: &Arc<Self>, name: &str) -> Result<Arc<Credential>, Error> {
        let (watch, ticket, _guard) = {
            let mut st = self.lock();
            let (w, ticket) = st.ticket(name);
            st.loads += 1;
            (w, ticket, LoadGuard(self))
        };
        let outcome = self.client.get(name).await.map(Arc::new);
        let publish = {
            let mut st = self.lock();
            match &outcome {
                Ok(c) => {
                    st.last_failure = None;
                    self.store(&mut st, name, c.clone(), watch.as_ref(), ticket);
                    Some(Some(c.clone()))
                }
                Err(Error::NotFound(_)) => {
                    st.last_failure = None;
                    if !st.superseded(name, ticket) {
                        st.remove(name);
                    }
                    Some(None)
                }
                Err(e) => {
                    if e.is_unavailable() {
                        st.last_failure = Some(Instant::now());
                    }
                    None
                }
            }
        };
        if let Some(c) = publish {
            self.publish(name, c).await;
        }
        outcome
    }

    /// Batch-loads `names` into the cache; returns the per-name failures.
    pub(super) async fn load_batch(self: &Arc<Self>, names: &[String]) -> Result<Vec<(String, Error)>, Error> {
        let mut failures = Vec::new();
        for chunk in names.chunks(BATCH) {
            let _guard = LoadGuard(self);
            let tickets: Vec<(Option<Arc<WatchState>>, Ticket)> = {
                let mut st = self.lock();
                st.loads += 1;
                chunk.iter().map(|n| st.ticket(n)).collect()
            };
            let results = match self.client.batch_get(chunk).await {
                Ok(r) => r,
                Err(e) => {
                    if e.is_unavailable() {
                        self.lock().last_failure = Some(Instant::now());
                    }
                    return Err(e);
                }
            };
            let mut published = Vec::new();
            {
                let mut st = self.lock();
                st.last_failure = None;
                for ((name, outcome), (watch, ticket)) in results.into_iter().zip(tickets) {
                    match outcome {
                        Ok(c) => {
                            let c = Arc::new(c);
                            self.store(&mut st, &name, c.clone(), watch.as_ref(), ticket);
                            published.push((name, Some(c)));
                        }
                        Err(e) => {
                            if !st.superseded(&name, ticket) {
                                st.remove(&name);
                            }
                            if matches!(e, Error::NotFound(_)) {
                                published.push((name.clone(), None));
                            }
                            failures.push((name, e));
                        }
                    }
                }
            }
            for (name, c) in published {
                self.publish(&name, c).await;
            }
        }
        Ok(failures)
    }

    /// Stores a loaded value unless an event or resync since the load began may have
    /// superseded it, and unless the daemon itself served it stale. A value no stream
    /// serves is stored only if `unwatched_ttl` lets it be trusted at all.
    fn store(
        &self,
        st: &mut State,
        name: &str,
        cred: Arc<Credential>,
        watch: Option<&Arc<WatchState>>,
        ticket: Ticket,
    ) {
        if st.superseded(name, ticket) || cred.stale.is_some() {
            return;
        }
        if watch.is_none() && self.config.unwatched_ttl.is_zero() {
            return;
        }
        if let Some(held) = st.entries.peek(name) {
            // Never replace a newer version with an older one.
            if held.cred.version > cred.version && held.gen == ticket.gen {
                return;
            }
        }
        let weight = cred.weight();
        if weight > self.config.max_bytes {
            return;
        }
        let entry = Entry { cred, watch: watch.cloned(), gen: ticket.gen, verified_at: Instant::now(), weight };
        st.insert(name, entry, self.config.max_entries, self.config.max_bytes);
    }

    /// Tells the subscribers of `name` about a version they have not seen yet.
    pub(super) async fn publish(&self, name: &str, cred: Option<Arc<Credential>>) {
        let tx = {
            let mut st = self.lock();
            let Some(tx) = st.subs.get(name).cloned() else { return };
            if tx.receiver_count() == 0 {
                st.subs.remove(name);
                return;
            }
            tx
        };
        let seen = tx.borrow().credential.as_ref().map(|c| c.version);
        if !newer(cred.as_deref(), seen) {
            return;
        }
        // The version this one replaced, with the end of its grace period.
        let previous = match &cred {
            Some(c) => self
                .client
                .versions(name)
                .await
                .ok()
                .and_then(|vs| vs.into_iter().find(|v| v.version < c.version && v.state == VersionState::Previous)),
            None => None,
        };
        tx.send_if_modified(|u| {
            let replace = newer(cred.as_deref(), u.credential.as_ref().map(|c| c.version));
            if replace {
                *u = Update { credential: cred.clone(), previous: previous.clone() };
            }
            replace
        });
    }
}

/// Whether `cred` (`None`: deleted) is news to a subscriber that has seen `seen`.
fn newer(cred: Option<&Credential>, seen: Option<u64>) -> bool {
    match (cred, seen) {
        (Some(c), Some(v)) => c.version > v,
        (Some(_), None) | (None, Some(_)) => true,
        (None, None) => false,
    }
}
