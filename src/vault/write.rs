//! Writes: put (compare-and-set, with the per-name write queue and retries), delete,
//! destroy and undelete.

use super::*;
use crate::store::WriteStore as _;

/// Unconditional writes retry their internal compare-and-set this many times.
const MAX_WRITE_ATTEMPTS: usize = 64;

/// Before retrying a write that lost its compare-and-set to another daemon: a random
/// wait below 1, 2, 4, … 32 ms, so daemons that collided do not collide again in step.
pub(super) async fn conflict_backoff(attempt: usize) {
    let cap_ms = 1u64 << attempt.min(5);
    let wait = rand::random_range(0..cap_ms * 1000);
    tokio::time::sleep(std::time::Duration::from_micros(wait)).await;
}

impl Vault {
    /// Writes a new version. `expected`: `None` unconditional, `Some(0)` must not exist
    /// (or be deleted), `Some(n)` the current version must be `n`.
    pub async fn put(
        &self,
        name: &(impl NameArg + ?Sized),
        value: &[u8],
        expected: Option<u64>,
        metadata: Option<&Metadata>,
    ) -> Result<PutOutcome, VaultError> {
        self.put_keyed(name, value, expected, metadata, None).await
    }

    /// [`Vault::put`], storing `key` with the write (see `vault/idempotency.rs`).
    pub(super) async fn put_keyed(
        &self,
        name: &(impl NameArg + ?Sized),
        value: &[u8],
        expected: Option<u64>,
        metadata: Option<&Metadata>,
        key: Option<&crate::store::KeyClaim>,
    ) -> Result<PutOutcome, VaultError> {
        let opts = WriteOptions {
            expected,
            metadata,
            grace: None,
            kind: ChangeKind::Put,
            policy: None,
            live_only: false,
            key,
            seen_version: None,
        };
        self.write(name, value, opts).await
    }

    pub(super) async fn write(
        &self,
        name: &(impl NameArg + ?Sized),
        value: &[u8],
        opts: WriteOptions<'_>,
    ) -> Result<PutOutcome, VaultError> {
        let WriteOptions { expected, metadata, grace, kind, policy, live_only, key, seen_version } = opts;
        let name = self.name(name)?;
        check_expected(expected)?;
        self.check_value(value)?;
        if let Some(m) = metadata {
            self.check_metadata(m)?;
        }
        let store = &self.inner.store;
        // From here on this daemon's other writes to the name wait their turn, so the
        // compare-and-set below can only lose to another daemon.
        let _turn = self.inner.writes.turn(name.as_str()).await;
        let mut base = match expected {
            Some(0) => WriteBase::Create,
            Some(n) => WriteBase::Update(n),
            None => match seen_version {
                Some(v) => WriteBase::Update(v),
                None => head_base(store.get_credential(name.as_str()).await?.as_ref()),
            },
        };
        let live = |base: WriteBase| match base {
            WriteBase::Create if live_only => Err(not_found(&name)),
            WriteBase::Revive(_) if live_only => Err(deleted(&name)),
            _ => Ok(base),
        };
        base = live(base)?;
        for attempt in 0..MAX_WRITE_ATTEMPTS {
            if attempt > 0 {
                conflict_backoff(attempt).await;
            }
            let version = base.next_version();
            if version > MAX_VERSION {
                return Err(VaultError::FailedPrecondition(format!(
                    "credential {:?} is at version {MAX_VERSION}, the highest there is",
                    name.as_str()
                )));
            }
            let sealed = self
                .with_keys(|ring| crypto::seal_value(ring, name.as_str(), version, value))
                .map_err(|e| VaultError::Internal(format!("sealing failed: {e}")))?;
            let now = self.now();
            let new = NewVersion {
                name: name.as_str(),
                base,
                sealed: &sealed,
                metadata,
                now,
                max_versions: self.inner.limits.max_versions,
                previous_expires_at: grace.map(|g| now.saturating_add(micros(g))),
                kind,
                policy,
            };
            let ticket = self.inner.cache.ticket(name.as_str());
            let written = match key {
                Some(k) => store.put_version_keyed(&new, k).await,
                None => store.put_version(&new).await,
            };
            match written {
                Ok(_) => {
                    // Read-your-writes: the new version is cached before the call returns.
                    let info = VersionInfo {
                        version,
                        state: VersionState::Current,
                        kek_id: sealed.kek_id,
                        created_at: now,
                        expires_at: None,
                    };
                    let row = VersionRow { info, sealed: Some(sealed) };
                    self.inner.cache.install(name.as_str(), ticket, Arc::new(CachedVersion::new(row)));
                    self.publish_change(name.as_str(), kind, version, now);
                    return Ok(PutOutcome { name: name.as_str().to_owned(), version, created_at: now });
                }
                Err(StoreError::Conflict) => {
                    // Someone else wrote: whatever this daemon cached is behind.
                    self.inner.cache.invalidate(name.as_str());
                    // Or a retry of this very request committed first: the caller finds
                    // its key and answers with that write's result.
                    if let Some(k) = key {
                        if store.get_idempotency_key(&k.token_id, &k.key, self.now()).await?.is_some() {
                            return Err(idempotency::key_taken());
                        }
                    }
                }
                Err(StoreError::StaleKek(_)) => {
                    // Another daemon rotated the KEK: seal again under the new one.
                    self.reload_keys().await?;
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            let head = store.get_credential(name.as_str()).await?;
            base = match (expected, head.as_ref()) {
                // Unconditional: retry on whatever is there now.
                (None, h) => live(head_base(h))?,
                // Create-only may revive a deleted credential, once, at the version seen.
                (Some(0), Some(h)) if h.deleted_at.is_some() && base == WriteBase::Create => {
                    WriteBase::Revive(h.current_version)
                }
                (Some(0), Some(h)) => {
                    return Err(VaultError::AlreadyExists {
                        name: name.as_str().to_owned(),
                        current: h.current_version,
                    })
                }
                (Some(0), None) => WriteBase::Create,
                (Some(n), h) => {
                    return Err(match h {
                        None => not_found(&name),
                        Some(h) => VaultError::Conflict {
                            name: name.as_str().to_owned(),
                            expected: n,
                            current: h.current_version,
                            deleted: h.deleted_at.is_some(),
                        },
                    })
                }
            };
        }
        Err(VaultError::Aborted(format!(
            "gave up writing {:?} after {MAX_WRITE_ATTEMPTS} attempts lost to concurrent writers; retry",
            name.as_str()
        )))
    }

    pub(super) fn check_value(&self, value: &[u8]) -> Result<(), VaultError> {
        let max = self.inner.limits.max_value_bytes;
        if value.is_empty() {
            return Err(VaultError::InvalidArgument("value must not be empty".into()));
        }
        if value.len() > max {
            return Err(VaultError::InvalidArgument(format!("value is {} bytes; the limit is {max}", value.len())));
        }
        Ok(())
    }

    pub(super) fn check_metadata(&self, m: &Metadata) -> Result<(), VaultError> {
        let bad = |msg: String| Err(VaultError::InvalidArgument(msg));
        if m.labels.len() > self.inner.limits.max_labels {
            return bad(format!("{} labels; the limit is {}", m.labels.len(), self.inner.limits.max_labels));
        }
        for (k, v) in &m.labels {
            let key_ok = !k.is_empty()
                && k.len() <= 63
                && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'.'));
            if !key_ok {
                return bad(format!("label key {k:?} must be 1-63 characters of [a-z0-9._-]"));
            }
            if v.len() > 256 {
                return bad(format!("label {k:?} value is {} bytes; the limit is 256", v.len()));
            }
        }
        if m.description.len() > 1024 {
            return bad(format!("description is {} bytes; the limit is 1024", m.description.len()));
        }
        if m.owner.len() > 256 {
            return bad(format!("owner is {} bytes; the limit is 256", m.owner.len()));
        }
        Ok(())
    }

    /// Soft-deletes `name`; versions are kept. Returns the head after the delete.
    pub async fn delete(
        &self,
        name: &(impl NameArg + ?Sized),
        expected: Option<u64>,
    ) -> Result<CredentialHead, VaultError> {
        self.delete_keyed(name, expected, None).await
    }

    /// [`Vault::delete`], storing `key` with the delete (see `vault/idempotency.rs`).
    pub(super) async fn delete_keyed(
        &self,
        name: &(impl NameArg + ?Sized),
        expected: Option<u64>,
        key: Option<&crate::store::KeyClaim>,
    ) -> Result<CredentialHead, VaultError> {
        let name = self.name(name)?;
        check_expected(expected)?;
        let now = self.now();
        let store = &self.inner.store;
        let expected_live = expected.filter(|v| *v != 0);
        let deleted = match key {
            Some(k) => store.delete_credential_keyed(name.as_str(), expected_live, now, k).await,
            None => store.delete_credential(name.as_str(), expected_live, now).await,
        };
        // Deleted, or lost to a concurrent change: either way the cached entry is stale.
        self.inner.cache.invalidate(name.as_str());
        let deleted = match deleted {
            // A retry of this very request committed first (see `put_keyed`).
            Err(StoreError::Conflict) if key.is_some() => return Err(idempotency::key_taken()),
            other => other?,
        };
        let head = store.get_credential(name.as_str()).await?.ok_or_else(|| not_found(&name))?;
        if deleted {
            self.publish_change(name.as_str(), ChangeKind::Delete, head.current_version, now);
            return Ok(head);
        }
        if head.deleted_at.is_some() {
            return Err(VaultError::NotFound(format!("credential {:?} is already deleted", name.as_str())));
        }
        Err(VaultError::Conflict {
            name: name.as_str().to_owned(),
            expected: expected.unwrap_or_default(),
            current: head.current_version,
            deleted: false,
        })
    }

    /// Irreversibly wipes version `version` of `name` (idempotent).
    pub async fn destroy_version(&self, name: &(impl NameArg + ?Sized), version: u64) -> Result<(), VaultError> {
        let name = self.name(name)?;
        let outcome = self.inner.store.destroy_version(name.as_str(), version).await;
        self.inner.cache.invalidate(name.as_str());
        match outcome? {
            Some(destroyed_now) => {
                if destroyed_now {
                    self.publish_change(name.as_str(), ChangeKind::DestroyVersion, version, self.now());
                }
                Ok(())
            }
            None => Err(VaultError::NotFound(format!("credential {:?} has no version {version}", name.as_str()))),
        }
    }

    /// Makes a soft-deleted credential readable again, at the version it had.
    pub async fn undelete(&self, name: &(impl NameArg + ?Sized)) -> Result<CredentialDetails, VaultError> {
        let name = self.name(name)?;
        let now = self.now();
        let done = self.inner.store.undelete_credential(name.as_str(), now).await;
        self.inner.cache.invalidate(name.as_str());
        if !done? {
            let head = self.inner.store.get_credential(name.as_str()).await?;
            return Err(match head {
                None => not_found(&name),
                Some(_) => VaultError::FailedPrecondition(format!("credential {:?} is not deleted", name.as_str())),
            });
        }
        let details = self.metadata(name.as_str()).await?;
        self.publish_change(name.as_str(), ChangeKind::Undelete, details.head.current_version, now);
        Ok(details)
    }
}
