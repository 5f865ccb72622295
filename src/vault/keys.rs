//! Key management in a running daemon: loading KEKs other daemons created, KEK rotation
//! (a background re-wrap job), and changing the master passphrase.
//!
//! The re-wrap job's state machine lives in the `rotation_jobs` row:
//!
//! ```text
//! RotateKek ──> running ──(no version left after the cursor)──> completed | failed
//!                 │  ▲
//!                 │  └── each batch: re-wrap, advance cursor + counters, renew lease (one transaction)
//!                 └───── daemon stops or dies: lease lapses; any daemon claims it and resumes at the cursor
//! ```
//!
//! **Invariant:** a batch's re-wrapped DEKs and the cursor that says they are done
//! commit together, and each DEK is replaced only if the row still holds the bytes the
//! batch read. A crash therefore repeats at most one uncommitted batch, and a concurrent
//! put, prune or destroy is never overwritten.

use std::time::{Duration, Instant};

use rand::RngCore as _;
use secrecy::SecretString;

use super::{micros, Vault, VaultError};
use crate::crypto::{self, CryptoError, KdfParams, Kek, MasterKey};
use crate::store::{
    now_micros, JobState, JobStore, KekRow, KekState, KeyStore, KeyringRow, MasterKeySource, RewrapBatch, Rewrapped,
    RotationJob, StoreError,
};
use crate::telemetry::names;
use crate::unlock::UnlockError;

/// A job's progress as operators see it.
#[derive(Debug, Clone)]
pub struct JobProgress {
    pub job: RotationJob,
    /// Versions per second since the job started.
    pub rate_per_second: f64,
    pub eta: Option<Duration>,
}

impl JobProgress {
    fn of(job: RotationJob) -> JobProgress {
        let end = job.finished_at.unwrap_or_else(now_micros);
        let secs = (end.saturating_sub(job.started_at)).max(1) as f64 / 1e6;
        let rate = job.done as f64 / secs;
        let left = job.total.saturating_sub(job.done + job.failed);
        let eta = (job.state == JobState::Running && rate > 0.0).then(|| Duration::from_secs_f64(left as f64 / rate));
        JobProgress { job, rate_per_second: rate, eta }
    }
}

impl Vault {
    fn keys_write(&self) -> std::sync::RwLockWriteGuard<'_, crypto::KeyRing> {
        // See `with_keys`: the ring is only ever changed in whole steps.
        self.inner.keys.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Loads KEKs created by other daemons and follows the stored active KEK.
    pub async fn reload_keys(&self) -> Result<(), VaultError> {
        self.reload_keys_listing().await.map(drop)
    }

    /// [`Vault::reload_keys`], returning the KEK rows it read (so callers that need the
    /// list do not read it again).
    async fn reload_keys_listing(&self) -> Result<Vec<KekRow>, VaultError> {
        let _one_at_a_time = self.inner.reload.lock().await;
        let rows = self.inner.store.list_keks().await?;
        let mut fresh = Vec::new();
        for row in rows.iter().filter(|r| !self.with_keys(|k| k.contains(r.id))) {
            let kek = self.with_keys(|k| Kek::unwrap(row.id, &row.wrapped_key, k.master())).map_err(|e| {
                tracing::error!(kek_id = row.id, error = %e, "cannot unwrap a KEK with this daemon's master key; \
                    if the master passphrase was changed, restart this daemon with the new one");
                VaultError::Internal(format!("KEK {} cannot be unwrapped: {e}", row.id))
            })?;
            fresh.push(kek);
        }
        let active = rows.iter().find(|r| r.state == KekState::Active).map(|r| r.id);
        let mut ring = self.keys_write();
        for kek in fresh {
            tracing::info!(kek_id = kek.id(), "loaded a KEK created by another daemon");
            ring.add(kek, false);
        }
        if let Some(id) = active {
            ring.set_active(id).map_err(|e| VaultError::Internal(e.to_string()))?;
        }
        Ok(rows)
    }

    /// Creates a new active KEK and starts the job that re-wraps every older DEK under it.
    pub async fn rotate_kek(&self) -> Result<JobProgress, VaultError> {
        let keks = self.reload_keys_listing().await?;
        let store = &self.inner.store;
        // A daemon started before a rekey still holds the old master key: a KEK wrapped
        // under it would be unreadable to every daemon started with the new passphrase.
        let keyring = store.load_keyring().await?.ok_or_else(|| VaultError::Internal("no keyring".into()))?;
        if self.with_keys(|k| k.master().check_verifier(&keyring.verifier)).is_err() {
            return Err(VaultError::FailedPrecondition(
                "this daemon's master key is out of date (the passphrase was changed): restart it with the new \
                 passphrase before rotating the KEK"
                    .into(),
            ));
        }
        let next_id = keks.iter().map(|k| k.id).max().unwrap_or(0) + 1;
        let (kek, wrapped) = self
            .with_keys(|k| Kek::generate(next_id, k.master()))
            .map_err(|e| VaultError::Internal(format!("KEK generation failed: {e}")))?;
        let now = self.now();
        let row = KekRow { id: next_id, wrapped_key: wrapped, state: KekState::Active, created_at: now };
        let job = match store.start_kek_rotation(&row, &keyring.verifier, now).await {
            Ok(job) => job,
            Err(StoreError::Conflict) => {
                return Err(VaultError::Aborted(
                    "another daemon rotated the KEK or changed the passphrase at the same moment; retry".into(),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        self.keys_write().add(kek, true);
        tracing::info!(job_id = job.id, kek_id = next_id, versions = job.total, "KEK rotation started");
        self.inner.job_wake.notify_one();
        Ok(JobProgress::of(job))
    }

    /// A job by id, or the newest.
    pub async fn rotation_job(&self, id: Option<i64>) -> Result<JobProgress, VaultError> {
        match self.inner.store.get_job(id).await? {
            Some(job) => Ok(JobProgress::of(job)),
            None => Err(VaultError::NotFound(match id {
                Some(id) => format!("no rotation job {id}"),
                None => "no rotation job has run yet".to_owned(),
            })),
        }
    }

    /// The job worker: runs (or resumes) the running re-wrap job whenever its lease is
    /// free, until `stop` turns true.
    pub async fn run_jobs(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let tick = Duration::from_millis(self.inner.rotation.scheduler_interval_ms.max(1));
        while !*stop.borrow() {
            if let Err(e) = self.run_job_once(&mut stop).await {
                tracing::warn!(error = %e, "KEK rotation job step failed; will retry");
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = self.inner.job_wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }

    fn lease_end(&self, now: i64) -> i64 {
        now.saturating_add(micros(Duration::from_millis(self.inner.rotation.job_lease_ms)))
    }

    /// Claims the running job, if any and if free, and works it until it ends, the lease
    /// is lost, or `stop` turns true (then the lease is handed back at once).
    async fn run_job_once(&self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<(), VaultError> {
        let store = &self.inner.store;
        let owner = self.inner.instance.as_str();
        let Some(job) = store.get_job(None).await?.filter(|j| j.state == JobState::Running) else {
            return Ok(());
        };
        let now = self.now();
        if !store.claim_job(job.id, owner, now, self.lease_end(now)).await? {
            return Ok(());
        }
        tracing::info!(job_id = job.id, done = job.done, total = job.total, "working on KEK rotation job");
        self.reload_keys().await?;
        let batch_size = self.inner.rotation.rewrap_batch_size;
        let pause = Duration::from_millis(self.inner.rotation.rewrap_pause_ms);
        let mut cursor = job.cursor.clone();
        let (mut done, mut failed) = (job.done, job.failed);
        metrics::gauge!(names::REWRAP_TOTAL).set(job.total as f64);
        loop {
            if *stop.borrow() {
                // Hand the job back so a restarted daemon resumes it without waiting.
                let now = self.now();
                store.claim_job(job.id, owner, now, now).await?;
                tracing::info!(job_id = job.id, done, "KEK rotation job paused for shutdown");
                return Ok(());
            }
            let after = cursor.as_ref().map(|(n, v)| (n.as_str(), *v));
            let rows = store.rewrap_candidates(job.new_kek_id, after, batch_size).await?;
            let Some(last) = rows.last() else { break };
            let last = (last.name.clone(), last.version);
            let started = Instant::now();
            let mut batch = Vec::with_capacity(rows.len());
            let mut batch_failed = 0;
            for row in rows {
                if row.wrapped_dek.is_empty() {
                    // A destroyed version: no key to re-wrap, only the reference to move.
                    batch.push(Rewrapped { old: row, wrapped_dek: Vec::new() });
                    continue;
                }
                let to = job.new_kek_id;
                let rewrapped =
                    self.with_keys(|k| crypto::rewrap_dek(k, &row.name, row.version, row.kek_id, &row.wrapped_dek, to));
                match rewrapped {
                    Ok(wrapped_dek) => batch.push(Rewrapped { old: row, wrapped_dek }),
                    Err(CryptoError::UnknownKek(id)) => {
                        return Err(VaultError::Internal(format!("KEK {id} is not loaded; cannot re-wrap")))
                    }
                    Err(e) => {
                        batch_failed += 1;
                        tracing::error!(credential = %row.name, version = row.version, error = %e,
                            "data key failed authentication during re-wrap; left under its old KEK");
                    }
                }
            }
            let now = self.now();
            let b = RewrapBatch {
                job_id: job.id,
                owner,
                new_kek_id: job.new_kek_id,
                rows: &batch,
                cursor: (&last.0, last.1),
                failed: batch_failed,
                now,
                lease_until: self.lease_end(now),
            };
            let Some(changed) = store.commit_rewrap(&b).await? else {
                tracing::warn!(job_id = job.id, "lost the KEK rotation job's lease; another daemon continues it");
                return Ok(());
            };
            done += changed;
            failed += batch_failed;
            cursor = Some(last);
            metrics::counter!(names::REWRAPPED).increment(changed);
            metrics::gauge!(names::REWRAP_DONE).set(done as f64);
            tracing::debug!(job_id = job.id, done, batch = batch.len(), elapsed = ?started.elapsed(), "re-wrap batch");
            if !pause.is_zero() {
                tokio::select! {
                    _ = stop.changed() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        let error = (failed > 0).then(|| {
            format!("{failed} versions failed authentication and stay under their old KEK, which is not retired")
        });
        if let Some(finished) = store.finish_job(job.id, owner, self.now(), error.as_deref()).await? {
            tracing::info!(job_id = job.id, done, failed, state = finished.state.as_str(), "KEK rotation job finished");
        }
        Ok(())
    }

    /// Re-wraps every KEK under a master key derived from `new` (a fresh salt), if `old`
    /// is the current passphrase. Returns how many KEKs were re-wrapped.
    pub async fn rekey_master(
        &self,
        old: SecretString,
        new: SecretString,
        params: KdfParams,
    ) -> Result<usize, VaultError> {
        use secrecy::ExposeSecret as _;
        if new.expose_secret().chars().count() < 8 {
            return Err(VaultError::InvalidArgument("the new passphrase must be at least 8 characters".into()));
        }
        let store = &self.inner.store;
        let keyring = store.load_keyring().await?.ok_or_else(|| VaultError::Internal("no keyring".into()))?;
        let Some((salt, old_params)) = keyring.kdf.clone().filter(|_| keyring.source == MasterKeySource::Passphrase)
        else {
            return Err(VaultError::FailedPrecondition(
                "this database's master key is a key file, not a passphrase; there is no passphrase to change".into(),
            ));
        };
        let old_master = derive(old, salt, old_params).await?;
        if old_master.check_verifier(&keyring.verifier).is_err() {
            return Err(VaultError::InvalidArgument("the old passphrase is wrong; nothing was changed".into()));
        }
        let keks = self.reload_keys_listing().await?;
        let mut new_salt = vec![0u8; 16];
        rand::rng().fill_bytes(&mut new_salt);
        let new_master = derive(new, new_salt.clone(), params).await?;
        let ids: Vec<i64> = keks.iter().map(|k| k.id).collect();
        let wrapped = self.with_keys(|ring| {
            ids.iter()
                .map(|id| {
                    let kek = ring.get(*id).ok_or(CryptoError::UnknownKek(*id))?;
                    Ok((*id, kek.wrap_under(&new_master)?))
                })
                .collect::<Result<Vec<_>, CryptoError>>()
        });
        let wrapped = wrapped.map_err(|e| VaultError::Internal(format!("re-wrapping KEKs: {e}")))?;
        let verifier = new_master.make_verifier().map_err(|e| VaultError::Internal(e.to_string()))?;
        let row = KeyringRow { verifier, kdf: Some((new_salt, params)), ..keyring.clone() };
        if !store.rekey(&row, &keyring.verifier, &wrapped).await? {
            return Err(VaultError::Aborted("the keys changed while rekeying (a KEK rotation?); retry".into()));
        }
        self.keys_write().replace_master(new_master);
        tracing::info!(keks = wrapped.len(), "master passphrase changed; every daemon must now start with the new one");
        Ok(wrapped.len())
    }
}

/// Argon2id off the async workers (shared with start-up unlocking).
async fn derive(passphrase: SecretString, salt: Vec<u8>, params: KdfParams) -> Result<MasterKey, VaultError> {
    crate::unlock::derive(passphrase, salt, params).await.map_err(|e| match e {
        UnlockError::Crypto(e) => VaultError::InvalidArgument(format!("key derivation: {e}")),
        other => VaultError::Internal(format!("key derivation task: {other}")),
    })
}
