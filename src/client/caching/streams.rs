//! The watch streams: which stream serves a name (and the cap on streams opened for
//! names outside every served prefix), one task per stream that reconnects with backoff,
//! and what an event, a resync or a lost stream does to the entries.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::state::{StreamKind, WatchState};
use super::Inner;
use crate::client::{Backoff, EventKind};

/// The prefix of the stream started for a name no stream serves: its parent (`a/b/` for
/// `a/b/c`), or the name itself when it has no `/`.
pub(super) fn parent_of(name: &str) -> &str {
    match name.rfind('/') {
        Some(i) => &name[..=i],
        None => name,
    }
}

impl Inner {
    /// The stream that serves `name`, started (for its parent) if none does and the cap
    /// on such streams allows; past the cap the name stays unwatched (short TTL).
    pub(super) fn watch_for(self: &Arc<Self>, name: &str) {
        self.open_stream(parent_of(name), StreamKind::Parent, Some(name));
    }

    /// Starts a stream for `prefix` unless one with that exact prefix exists.
    pub(super) fn serve_prefix(self: &Arc<Self>, prefix: &str) {
        self.open_stream(prefix, StreamKind::Served, None);
    }

    /// One check-and-insert under the lock, so concurrent misses neither open the same
    /// stream twice nor overshoot `max_parent_streams`. `for_name`: skip if a stream
    /// already serves that name.
    fn open_stream(self: &Arc<Self>, prefix: &str, kind: StreamKind, for_name: Option<&str>) {
        let w = {
            let mut st = self.lock();
            if for_name.is_some_and(|n| st.serving(n).is_some()) || st.watches.iter().any(|w| w.prefix == prefix) {
                return;
            }
            if kind == StreamKind::Parent && st.parent_streams() >= self.config.max_parent_streams {
                if !self.cap_logged.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        prefix,
                        cap = self.config.max_parent_streams,
                        "parent stream cap reached; names outside the served prefixes are cached for \
                         unwatched_ttl only"
                    );
                }
                return;
            }
            let w = Arc::new(WatchState::new(prefix, kind));
            st.watches.push(w.clone());
            st.watches.sort_by_key(|w| std::cmp::Reverse(w.prefix.len()));
            w
        };
        let inner = self.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.changed() => {}
                _ = inner.clone().run_watch(w.clone()) => {}
            }
            w.live.store(false, Ordering::Release);
        });
    }

    /// Keeps one stream open: on every (re)connect the entries it serves are revalidated;
    /// events drop (and refresh) entries; a lost stream marks them unverified.
    async fn run_watch(self: Arc<Self>, w: Arc<WatchState>) {
        let mut backoff = Backoff::new(self.config.reconnect_initial, self.config.reconnect_max);
        loop {
            match self.client.watch(&w.prefix).await {
                Ok(mut stream) => {
                    backoff.reset();
                    tracing::debug!(prefix = %w.prefix, "watch stream established");
                    self.resync(&w, true).await;
                    loop {
                        match stream.next().await {
                            Some(Ok(ev)) if ev.kind == EventKind::Resync => self.resync(&w, false).await,
                            Some(Ok(ev)) => self.on_change(&w, &ev.name, ev.version, ev.kind),
                            Some(Err(e)) => {
                                tracing::info!(prefix = %w.prefix, error = %e, "watch stream lost; reconnecting");
                                break;
                            }
                            None => {
                                tracing::info!(prefix = %w.prefix, "watch stream ended; reconnecting");
                                break;
                            }
                        }
                    }
                    self.lost(&w);
                }
                Err(e) => {
                    tracing::debug!(prefix = %w.prefix, error = %e, "cannot open the watch stream");
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// The stream is (again) in place: everything held under it is re-read.
    async fn resync(self: &Arc<Self>, w: &Arc<WatchState>, connected: bool) {
        let held: Vec<String> = {
            let mut st = self.lock();
            st.epoch += 1;
            st.resync_epoch = st.epoch;
            w.gen.fetch_add(1, Ordering::AcqRel);
            if connected {
                w.live.store(true, Ordering::Release);
            }
            st.entries.iter().filter(|(_, e)| e.served_by(w)).map(|(k, _)| k.clone()).collect()
        };
        w.changed.notify_waiters();
        if let Err(e) = self.load_batch(&held).await {
            tracing::info!(prefix = %w.prefix, error = %e, "revalidation failed; entries will be re-read on use");
        }
        let _ = self.changes.send(Arc::from(""));
    }

    fn on_change(self: &Arc<Self>, w: &Arc<WatchState>, name: &str, version: u64, kind: EventKind) {
        let refresh = {
            let mut st = self.lock();
            st.epoch += 1;
            let epoch = st.epoch;
            if st.loads > 0 {
                st.changed_at.insert(name.to_owned(), epoch);
            }
            let gen = w.gen();
            let held = st.entries.peek(name).map(|e| (e.cred.version, e.gen == gen));
            // A put or rotate we already hold (our own write, read back) changes nothing.
            if matches!(kind, EventKind::Put | EventKind::Rotate)
                && held.is_some_and(|(v, current)| current && v >= version)
            {
                return;
            }
            st.remove(name);
            st.subs.contains_key(name) || (held.is_some() && self.config.refresh_ahead)
        };
        let _ = self.changes.send(Arc::from(name));
        if refresh {
            let inner = self.clone();
            let name = name.to_owned();
            tokio::spawn(async move {
                let _ = inner.fill(&name).await;
            });
        }
    }

    /// The stream is gone: what it vouched for was current until now, and is unverified
    /// from now on.
    fn lost(&self, w: &Arc<WatchState>) {
        let mut st = self.lock();
        let gen = w.gen();
        let now = Instant::now();
        for (_, e) in st.entries.iter_mut() {
            if e.served_by(w) && e.gen == gen {
                e.verified_at = now;
            }
        }
        w.live.store(false, Ordering::Release);
        w.gen.fetch_add(1, Ordering::AcqRel);
        drop(st);
        w.changed.notify_waiters();
    }
}
