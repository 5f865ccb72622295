//! Per-name write queue: writes to one credential from this daemon take turns, first
//! come first served, so they never race each other's compare-and-set.
//!
//! Without it, N concurrent unconditional puts on one name all block on the same row
//! lock, one wins, and the other N−1 see a conflict and go round again: a lottery in
//! which a writer can lose dozens of rounds in a row, each round holding a pooled
//! connection. With it, this daemon sends one write per name at a time; only writers on
//! other daemons can still collide, and the retry loop handles those.
//!
//! **Invariant:** the map holds an entry only while a write to that name holds or awaits
//! its turn, so it is bounded by the writes in flight (which admission bounds) and a
//! cancelled write leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// A name's lock and the number of writes holding or awaiting it.
#[derive(Default)]
struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    users: usize,
}

#[derive(Default)]
pub(crate) struct WriteQueue {
    slots: Mutex<HashMap<Box<str>, Slot>>,
}

/// A write's turn on its name; the next writer's turn starts when it drops.
pub(crate) struct Turn<'a> {
    queue: &'a WriteQueue,
    name: Box<str>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteQueue {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Slot>> {
        // Inserts and removals are single steps: a poisoned map is still consistent.
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for this name's turn (tokio's mutex is fair: waiters go in arrival order).
    pub(crate) async fn turn(&self, name: &str) -> Turn<'_> {
        let lock = {
            let mut slots = self.lock();
            let slot = slots.entry(name.into()).or_default();
            slot.users += 1;
            slot.lock.clone()
        };
        // Counted before the wait, so a cancelled wait is uncounted by `Drop` too.
        let mut turn = Turn { queue: self, name: name.into(), guard: None };
        turn.guard = Some(lock.lock_owned().await);
        turn
    }

    /// Names with a write holding or awaiting its turn.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut slots = self.queue.lock();
        if let Some(slot) = slots.get_mut(&self.name) {
            slot.users -= 1;
            if slot.users == 0 {
                slots.remove(&self.name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn writers_take_turns_in_order_and_leave_nothing_behind() {
        let q = Arc::new(WriteQueue::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = q.turn("a").await;
        let mut waiters = Vec::new();
        for i in 0..5 {
            let (q2, order) = (q.clone(), order.clone());
            waiters.push(tokio::spawn(async move {
                let _t = q2.turn("a").await;
                order.lock().unwrap().push(i);
            }));
            // Each waiter is queued before the next one starts.
            while q.lock().get("a").map(|s| s.users) != Some(i + 2) {
                tokio::task::yield_now().await;
            }
        }
        // Another name is not held up.
        drop(tokio::time::timeout(Duration::from_secs(5), q.turn("b")).await.unwrap());
        assert_eq!(q.len(), 1);
        drop(first);
        for w in waiters {
            w.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4], "first come, first served");
        assert_eq!(q.len(), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_releases_its_entry() {
        let q = WriteQueue::default();
        let held = q.turn("a").await;
        for _ in 0..1000 {
            let wait = q.turn("a");
            assert!(tokio::time::timeout(Duration::from_millis(0), wait).await.is_err());
        }
        assert_eq!(q.len(), 1, "only the holder's entry");
        drop(held);
        assert_eq!(q.len(), 0);
        for i in 0..1000 {
            drop(q.turn(&format!("n{i}")).await);
        }
        assert_eq!(q.len(), 0);
    }
}
