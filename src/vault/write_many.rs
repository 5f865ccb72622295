//! `WriteCredentials`: puts and deletes of several credentials applied together in one
//! transaction, or not at all.
//!
//! Each write may carry its own expected version. When any of those does not match, the
//! store rolls everything back and the caller hears of every write that conflicted, with
//! the version it found ([`VaultError::WriteConflicts`]). Writes without an expected
//! version are based on the heads read just before; if only those lose a race with a
//! concurrent writer, the whole batch is read and tried again (like an unconditional put).
//!
//! **Invariant:** a batch commits whole or leaves nothing behind: no version, no change
//! event, no cache entry changed.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::store::WriteStore as _;
use crate::store::{BatchOp, BatchOutcome, BatchWrite};

/// A batch is read and tried again at most this many times when unconditional writes in
/// it lose to concurrent writers.
const MAX_BATCH_ATTEMPTS: usize = 16;

/// One write of a batch.
#[derive(Debug, Clone, Copy)]
pub enum BatchItem<'a> {
    /// `expected` as in [`Vault::put`]; `metadata` `None` keeps the stored metadata.
    Put { name: &'a str, value: &'a [u8], expected: Option<u64>, metadata: Option<&'a Metadata> },
    /// A soft delete; `expected` as in [`Vault::delete`].
    Delete { name: &'a str, expected: Option<u64> },
}

impl BatchItem<'_> {
    fn name(&self) -> &str {
        match self {
            BatchItem::Put { name, .. } | BatchItem::Delete { name, .. } => name,
        }
    }

    /// The expected version the caller gave, if any (a delete's 0 means none).
    fn expected(&self) -> Option<u64> {
        match *self {
            BatchItem::Put { expected, .. } => expected,
            BatchItem::Delete { expected, .. } => expected.filter(|v| *v != 0),
        }
    }
}

/// What one write of an applied batch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItemOutcome {
    pub name: String,
    /// The version written; for a delete, the version deleted at.
    pub version: u64,
    pub deleted: bool,
    pub at: Micros,
}

/// A write of a batch whose expected version did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteConflict {
    pub name: String,
    /// What the write expected (0: that the credential did not exist).
    pub expected: u64,
    /// The current version found; `None`: no credential by that name.
    pub current: Option<u64>,
    /// The credential found is soft-deleted.
    pub deleted: bool,
}

/// The message of [`VaultError::WriteConflicts`]: every conflict, in request order.
pub(super) fn describe_conflicts(conflicts: &[WriteConflict]) -> String {
    let each: Vec<String> = conflicts
        .iter()
        .map(|c| {
            let wanted = match c.expected {
                0 => "expected it not to exist".to_owned(),
                n => format!("expected version {n}"),
            };
            let found = match c.current {
                None => "it does not exist".to_owned(),
                Some(v) if c.deleted => format!("current version is {v} (deleted)"),
                Some(v) => format!("current version is {v}"),
            };
            format!("{:?}: {wanted}, {found}", c.name)
        })
        .collect();
    format!("version conflict on {} of the writes, so none was applied: {}", conflicts.len(), each.join("; "))
}

impl Vault {
    /// Applies every write of `items` in one transaction, or none. Names must be distinct;
    /// at most `limits.max_write_batch_size` writes.
    pub async fn write_many(&self, items: &[BatchItem<'_>]) -> Result<Vec<BatchItemOutcome>, VaultError> {
        let names = self.check_batch(items)?;
        self.write_checked_batch(items, &names, None).await
    }

    /// Refuses a bad batch (empty, too long, a name twice, a bad write); the checked
    /// names, in request order.
    pub(super) fn check_batch(&self, items: &[BatchItem<'_>]) -> Result<Vec<String>, VaultError> {
        let max = self.inner.limits.max_write_batch_size;
        if items.is_empty() {
            return Err(VaultError::InvalidArgument("no writes given".into()));
        }
        if items.len() > max {
            return Err(VaultError::InvalidArgument(format!("{} writes; the limit is {max}", items.len())));
        }
        let mut names: Vec<String> = Vec::with_capacity(items.len());
        let mut seen = HashSet::with_capacity(items.len());
        for item in items {
            let name = self.name(item.name())?;
            if !seen.insert(name.as_str().to_owned()) {
                return Err(VaultError::InvalidArgument(format!(
                    "{:?} is written more than once; a request writes each credential once",
                    name.as_str()
                )));
            }
            match *item {
                BatchItem::Put { value, expected, metadata, .. } => {
                    check_expected(expected)?;
                    self.check_value(value).map_err(|e| in_write(name.as_str(), e))?;
                    if let Some(m) = metadata {
                        self.check_metadata(m).map_err(|e| in_write(name.as_str(), e))?;
                    }
                }
                BatchItem::Delete { expected, .. } => check_expected(expected)?,
            }
            names.push(name.as_str().to_owned());
        }
        Ok(names)
    }

    /// Applies a batch [`Vault::check_batch`] passed, storing `key` with its results if
    /// given.
    pub(super) async fn write_checked_batch(
        &self,
        items: &[BatchItem<'_>],
        names: &[String],
        key: Option<&crate::store::KeyClaim>,
    ) -> Result<Vec<BatchItemOutcome>, VaultError> {
        let store = &self.inner.store;
        // This daemon's other writes to these names wait their turn (see `write_queue.rs`),
        // taken in name order so two batches never wait on each other in a cycle.
        let mut in_order: Vec<&str> = names.iter().map(String::as_str).collect();
        in_order.sort_unstable();
        let mut _turns = Vec::with_capacity(in_order.len());
        for name in in_order {
            _turns.push(self.inner.writes.turn(name).await);
        }
        for attempt in 0..MAX_BATCH_ATTEMPTS {
            if attempt > 0 {
                super::write::conflict_backoff(attempt).await;
            }
            let mut heads: HashMap<String, CredentialHead> =
                store.get_current_many(names).await?.into_iter().map(|(h, _)| (h.name.clone(), h)).collect();
            let mut bases = Vec::with_capacity(items.len());
            for (item, name) in items.iter().zip(names) {
                let head = heads.remove(name);
                bases.push(match *item {
                    BatchItem::Put { expected, .. } => {
                        let base = match (expected, head.as_ref()) {
                            (None, h) => head_base(h),
                            (Some(0), Some(h)) if h.deleted_at.is_some() => WriteBase::Revive(h.current_version),
                            (Some(0), _) => WriteBase::Create,
                            (Some(n), _) => WriteBase::Update(n),
                        };
                        if base.next_version() > MAX_VERSION {
                            return Err(VaultError::FailedPrecondition(format!(
                                "credential {name:?} is at version {MAX_VERSION}, the highest there is"
                            )));
                        }
                        Some(base)
                    }
                    BatchItem::Delete { expected, .. } => {
                        let live = head.as_ref().is_some_and(|h| h.deleted_at.is_none());
                        if expected.filter(|v| *v != 0).is_none() && !live {
                            return Err(VaultError::NotFound(match head {
                                None => format!("credential {name:?} not found"),
                                Some(_) => format!("credential {name:?} is already deleted"),
                            }));
                        }
                        None
                    }
                });
            }
            let mut sealed = Vec::with_capacity(items.len());
            for ((item, name), base) in items.iter().zip(names).zip(&bases) {
                sealed.push(match (item, base) {
                    (BatchItem::Put { value, .. }, Some(base)) => Some(
                        self.with_keys(|ring| crypto::seal_value(ring, name, base.next_version(), value))
                            .map_err(|e| VaultError::Internal(format!("sealing failed: {e}")))?,
                    ),
                    _ => None,
                });
            }
            let ops: Vec<BatchOp<'_>> = items
                .iter()
                .zip(names)
                .zip(bases.iter().zip(&sealed))
                .map(|((item, name), (base, sealed))| match (item, base, sealed) {
                    (BatchItem::Put { metadata, .. }, Some(base), Some(sealed)) => {
                        BatchOp::Put { name, base: *base, sealed, metadata: *metadata }
                    }
                    (item, _, _) => BatchOp::Delete { name, expected: item.expected() },
                })
                .collect();
            let now = self.now();
            let batch = BatchWrite { ops: &ops, now, max_versions: self.inner.limits.max_versions, key };
            match store.write_batch(&batch).await {
                Ok(BatchOutcome::Applied(after)) => {
                    let mut out = Vec::with_capacity(after.len());
                    for (item, head) in items.iter().zip(after) {
                        let deleted = matches!(item, BatchItem::Delete { .. });
                        self.inner.cache.invalidate(&head.name);
                        let kind = if deleted { ChangeKind::Delete } else { ChangeKind::Put };
                        self.publish_change(&head.name, kind, head.current_version, now);
                        out.push(BatchItemOutcome { name: head.name, version: head.current_version, deleted, at: now });
                    }
                    return Ok(out);
                }
                Ok(BatchOutcome::Conflicts(lost)) => {
                    let mut conflicts = Vec::new();
                    for (i, found) in &lost {
                        let (Some(item), Some(name)) = (items.get(*i), names.get(*i)) else {
                            return Err(VaultError::Internal("write_batch named a write it was not given".into()));
                        };
                        self.inner.cache.invalidate(name);
                        if let Some(expected) = item.expected() {
                            conflicts.push(WriteConflict {
                                name: name.clone(),
                                expected,
                                current: found.as_ref().map(|h| h.current_version),
                                deleted: found.as_ref().is_some_and(|h| h.deleted_at.is_some()),
                            });
                        }
                    }
                    if !conflicts.is_empty() {
                        // Request order, whatever order the store locked the rows in.
                        conflicts.sort_by_key(|c| names.iter().position(|n| *n == c.name));
                        return Err(VaultError::WriteConflicts(conflicts));
                    }
                    // Only writes based on what was read lost: read again and retry.
                }
                Err(StoreError::StaleKek(_)) => {
                    self.reload_keys().await?;
                }
                // The key is taken: a retry of this batch raced its original.
                Err(StoreError::Conflict) if key.is_some() => return Err(super::idempotency::key_taken()),
                Err(e) => return Err(e.into()),
            }
        }
        Err(VaultError::Aborted(format!(
            "gave up after {MAX_BATCH_ATTEMPTS} attempts lost to concurrent writers; retry"
        )))
    }
}

/// A bad value or metadata, naming the write it belongs to.
fn in_write(name: &str, e: VaultError) -> VaultError {
    match e {
        VaultError::InvalidArgument(m) => VaultError::InvalidArgument(format!("write of {name:?}: {m}")),
        other => other,
    }
}
