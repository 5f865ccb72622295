//! Reads: single and batch, through the cache (with serve-stale while the store is
//! down), and metadata.

use super::*;

impl Vault {
    /// Reads version `version` (the current one if `None` or 0) of `name`. The current
    /// version is served from the cache; a miss loads it once for all concurrent callers.
    pub async fn get(
        &self,
        name: &(impl NameArg + ?Sized),
        version: Option<u64>,
    ) -> Result<CredentialValue, VaultError> {
        let name = self.name(name)?;
        self.with_key_reload(
            |r: &Result<CredentialValue, VaultError>| matches!(r, Err(VaultError::UnknownKek(_))),
            || self.get_once(&*name, version),
        )
        .await
    }

    /// Runs a read; if `unknown_kek` says it met a value sealed under a KEK another daemon
    /// created, loads the keys and runs it once more.
    pub(super) async fn with_key_reload<T, F, Fut>(
        &self,
        unknown_kek: impl Fn(&Result<T, VaultError>) -> bool,
        read: F,
    ) -> Result<T, VaultError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, VaultError>>,
    {
        let first = read().await;
        if !unknown_kek(&first) {
            return first;
        }
        self.reload_keys().await?;
        read().await
    }

    pub(super) async fn get_once(
        &self,
        name: &(impl NameArg + ?Sized),
        version: Option<u64>,
    ) -> Result<CredentialValue, VaultError> {
        let name = self.name(name)?;
        let version = version.filter(|v| *v != 0);
        let hit = self.inner.cache.lookup(name.as_str());
        match (version, hit) {
            (None, Some(h)) if h.fresh => self.serve(&name, h.value),
            (None, None) => {
                let c = self.load_current(&name).await?;
                self.serve(&name, c)
            }
            // Unverified or expired: the store decides, unless it cannot be reached.
            (None, Some(h)) => match self.load_current(&name).await {
                Err(VaultError::Unavailable(e)) => self.serve_stale(&name, h, e),
                other => self.serve(&name, other?),
            },
            (Some(v), Some(h)) if h.fresh => match h.value {
                Cached::Found(c) if c.version() == v => self.serve(&name, Cached::Found(c)),
                Cached::Missing { deleted: true } => Err(deleted(&name)),
                _ => self.get_version_uncached(&name, v).await,
            },
            (Some(v), Some(h)) => match self.get_version_uncached(&name, v).await {
                Err(VaultError::Unavailable(e)) if matches!(&h.value, Cached::Found(c) if c.version() == v) => {
                    self.serve_stale(&name, h, e)
                }
                other => other,
            },
            (Some(v), None) => self.get_version_uncached(&name, v).await,
        }
    }

    /// Answers from a cache entry that is not fresh because the store is unreachable,
    /// if `cache.serve_stale_seconds` allows it; otherwise the store's error stands.
    pub(super) fn serve_stale(
        &self,
        name: &CredentialName,
        hit: Hit,
        error: StoreError,
    ) -> Result<CredentialValue, VaultError> {
        if !self.may_serve_stale() {
            return Err(VaultError::Unavailable(error));
        }
        self.inner.cache.count_stale_serve();
        let mut v = self.serve(name, hit.value)?;
        v.stale = Some(hit.age);
        Ok(v)
    }

    /// Explicit older versions are read from the store; only current versions are cached.
    pub(super) async fn get_version_uncached(
        &self,
        name: &CredentialName,
        wanted: u64,
    ) -> Result<CredentialValue, VaultError> {
        let found = self.inner.store.get_version(name.as_str(), Some(wanted)).await?;
        let (head, row) = found.ok_or_else(|| not_found(name))?;
        if head.deleted_at.is_some() {
            return Err(deleted(name));
        }
        let row = row.ok_or_else(|| {
            if wanted > head.current_version {
                VaultError::NotFound(format!(
                    "credential {:?} has no version {wanted}; the current version is {}",
                    name.as_str(),
                    head.current_version
                ))
            } else {
                VaultError::NotFound(format!(
                    "version {wanted} of {:?} is no longer retained (the last {} versions are kept)",
                    name.as_str(),
                    self.inner.limits.max_versions
                ))
            }
        })?;
        let sealed = readable(name, &row, self.now())?;
        let value = self.decrypt(name, row.info.version, sealed)?;
        Ok(credential_value(&row.info, value))
    }

    pub(super) async fn load_current(&self, name: &CredentialName) -> Result<Cached, VaultError> {
        let store = &self.inner.store;
        self.inner
            .cache
            .load_coalesced(name.as_str(), || async {
                match store.get_version(name.as_str(), None).await? {
                    None => Ok(cached_current(None)),
                    Some((head, Some(row))) => Ok(cached_current(Some((head, row)))),
                    Some((head, None)) if head.deleted_at.is_some() => Ok(Cached::Missing { deleted: true }),
                    Some((head, None)) => Err(VaultError::Internal(format!(
                        "current version {} of {:?} has no row",
                        head.current_version,
                        name.as_str()
                    ))),
                }
            })
            .await
    }

    /// Turns a cache entry into a value, decrypting lazily (and memoizing if configured).
    pub(super) fn serve(&self, name: &CredentialName, cached: Cached) -> Result<CredentialValue, VaultError> {
        let entry = match cached {
            Cached::Found(entry) => entry,
            Cached::Missing { deleted: true } => return Err(deleted(name)),
            Cached::Missing { deleted: false } => return Err(not_found(name)),
        };
        check_state(name, &entry.info, self.now())?;
        let value = match (entry.plaintext(), entry.sealed()) {
            (Some(p), _) => Zeroizing::new(p.to_vec()),
            (None, Some(sealed)) => {
                let value = self.decrypt(name, entry.version(), sealed)?;
                self.inner.cache.memoize(name.as_str(), &entry, &value);
                value
            }
            (None, None) => return Err(unreadable(name, &entry.info)),
        };
        Ok(credential_value(&entry.info, value))
    }

    pub(super) fn decrypt(
        &self,
        name: &CredentialName,
        version: u64,
        sealed: &Sealed,
    ) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        let start = std::time::Instant::now();
        let opened = self.with_keys(|ring| crypto::open_value(ring, name.as_str(), version, sealed));
        self.inner.decrypt_duration.record(start.elapsed().as_secs_f64());
        opened.map_err(|e| match e {
            CryptoError::UnknownKek(id) => VaultError::UnknownKek(id),
            e => self.data_loss(name, version, e),
        })
    }

    pub(super) fn data_loss(&self, name: &CredentialName, version: u64, e: CryptoError) -> VaultError {
        tracing::error!(credential = %name, version, error = %e, "stored credential failed to decrypt");
        VaultError::DataLoss { name: name.as_str().to_owned(), version }
    }

    /// Reads the current version of each name with one store query. The outer error is
    /// for the request as a whole (bad names, too many, storage down); each name then
    /// has its own outcome, in request order.
    pub async fn batch_get<N: NameArg>(
        &self,
        names: &[N],
    ) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        let any_unknown = |r: &Result<Vec<Result<CredentialValue, VaultError>>, VaultError>| {
            r.as_ref().is_ok_and(|all| all.iter().any(|r| matches!(r, Err(VaultError::UnknownKek(_)))))
        };
        self.with_key_reload(any_unknown, || self.batch_get_once(names)).await
    }

    pub(super) async fn batch_get_once<N: NameArg>(
        &self,
        names: &[N],
    ) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        self.check_batch_size(names.len())?;
        let parsed = names.iter().map(|n| self.name(n)).collect::<Result<Vec<_>, _>>()?;
        let cache = &self.inner.cache;
        let mut known: std::collections::HashMap<&str, Cached> = std::collections::HashMap::new();
        let mut misses: Vec<(String, crate::cache::FillTicket)> = Vec::new();
        // Entries that are not fresh: the fallback if the store cannot be reached.
        let mut unfresh: std::collections::HashMap<&str, Hit> = std::collections::HashMap::new();
        for name in &parsed {
            if known.contains_key(name.as_str()) || misses.iter().any(|(m, _)| m == name.as_str()) {
                continue;
            }
            match cache.lookup(name.as_str()) {
                Some(h) if h.fresh => {
                    known.insert(name.as_str(), h.value);
                }
                other => {
                    if let Some(h) = other {
                        unfresh.insert(name.as_str(), h);
                    }
                    misses.push((name.as_str().to_owned(), cache.ticket(name.as_str())));
                }
            }
        }
        if !misses.is_empty() {
            // All misses in one query.
            let wanted: Vec<String> = misses.iter().map(|(n, _)| n.clone()).collect();
            let rows = match self.inner.store.get_current_many(&wanted).await {
                Ok(rows) => rows,
                Err(e) if e.outage().is_some() || matches!(e, StoreError::Down) => {
                    return self.batch_stale(&parsed, known, unfresh, e);
                }
                Err(e) => return Err(e.into()),
            };
            let mut rows: std::collections::HashMap<String, (CredentialHead, VersionRow)> =
                rows.into_iter().map(|(h, v)| (h.name.clone(), (h, v))).collect();
            for (name, ticket) in &misses {
                let c = cached_current(rows.remove(name));
                cache.fill(name, *ticket, c.clone());
                if let Some(parsed_name) = parsed.iter().find(|p| p.as_str() == name) {
                    known.insert(parsed_name.as_str(), c);
                }
            }
        }
        Ok(parsed
            .iter()
            .map(|name| match known.get(name.as_str()) {
                Some(c) => self.serve(name, c.clone()),
                None => Err(not_found(name)),
            })
            .collect())
    }

    /// Refuses a batch larger than `max_batch_size` (before its names are looked at).
    pub fn check_batch_size(&self, n: usize) -> Result<(), VaultError> {
        let max = self.inner.limits.max_batch_size;
        if n > max {
            return Err(VaultError::InvalidArgument(format!("batch asks for {n} credentials; the limit is {max}")));
        }
        Ok(())
    }

    /// A batch whose store read failed because the store is unreachable: names with a
    /// cache entry are answered from it (marked stale) if `cache.serve_stale_seconds`
    /// allows; the others fail with UNAVAILABLE in their own slot. With nothing to serve
    /// the whole batch fails.
    pub(super) fn batch_stale(
        &self,
        parsed: &[Cow<'_, CredentialName>],
        known: std::collections::HashMap<&str, Cached>,
        unfresh: std::collections::HashMap<&str, Hit>,
        error: StoreError,
    ) -> Result<Vec<Result<CredentialValue, VaultError>>, VaultError> {
        if unfresh.is_empty() || !self.may_serve_stale() {
            return Err(VaultError::Unavailable(error));
        }
        Ok(parsed
            .iter()
            .map(|name| {
                if let Some(c) = known.get(name.as_str()) {
                    return self.serve(name, c.clone());
                }
                match unfresh.get(name.as_str()) {
                    Some(h) => {
                        self.inner.cache.count_stale_serve();
                        let mut v = self.serve(name, h.value.clone())?;
                        v.stale = Some(h.age);
                        Ok(v)
                    }
                    None => Err(VaultError::Unavailable(StoreError::Down)),
                }
            })
            .collect())
    }

    /// Metadata and retained versions; never decrypts. Deleted credentials are shown
    /// (with `deleted_at` set) so operators can inspect them.
    pub async fn metadata(&self, name: &(impl NameArg + ?Sized)) -> Result<CredentialDetails, VaultError> {
        let name = self.name(name)?;
        let head = self.inner.store.get_credential(name.as_str()).await?.ok_or_else(|| not_found(&name))?;
        let versions = self.inner.store.list_versions(name.as_str()).await?;
        Ok(CredentialDetails { head, versions })
    }
}

/// What the cache holds for a name, from its head and current version as the store
/// returned them (`None`: no such credential).
fn cached_current(found: Option<(CredentialHead, VersionRow)>) -> Cached {
    match found {
        None => Cached::Missing { deleted: false },
        Some((head, _)) if head.deleted_at.is_some() => Cached::Missing { deleted: true },
        Some((_, row)) => Cached::Found(Arc::new(CachedVersion::new(row))),
    }
}
