//! Idempotency keys for `PutCredential`, `DeleteCredential`, `RotateCredential` and
//! `WriteCredentials`.
//!
//! A caller that sends a key with a write and loses the answer can send the same request
//! with the same key again and gets the first attempt's result (the same version) instead
//! of a second write or, for a compare-and-set, a conflict. The same key with a different
//! request is refused ([`VaultError::FailedPrecondition`]).
//!
//! Keys belong to the token that made them and are stored in the transaction of their
//! write, so a key exists exactly when its write committed, on every daemon over the same
//! database. A stored key holds the request's fingerprint (HMAC-SHA256 under a key derived
//! from the master key, so a low-entropy value cannot be guessed from it) and the result;
//! never the value. Failed writes store nothing: retrying one runs it again.
//!
//! **Invariant:** a write with a key either commits together with its key or not at all;
//! a write that finds its key taken (a retry that raced its original) writes nothing and
//! answers from the key.

use std::sync::Arc;
use std::time::Duration;

use hkdf::HkdfExtract;
use sha2::Sha256;

use super::write_many::{BatchItem, BatchItemOutcome};
use super::*;
use crate::store::WriteStore as _;
use crate::store::{KeyClaim, KeyRecord};
use crate::telemetry::names;

/// The longest key accepted.
pub const KEY_MAX_BYTES: usize = 128;

const FINGERPRINT_INFO: &[u8] = b"credvault idempotency fingerprint v1";

/// An idempotency key, checked, with the token it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    token_id: String,
    key: String,
}

impl IdempotencyKey {
    /// 1 to [`KEY_MAX_BYTES`] visible ASCII characters (a UUID, a request id, ...).
    pub fn parse(token_id: &str, key: &str) -> Result<Self, VaultError> {
        if key.is_empty() || key.len() > KEY_MAX_BYTES || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(VaultError::InvalidArgument(format!(
                "idempotency key must be 1-{KEY_MAX_BYTES} visible ASCII characters (got {} bytes)",
                key.len()
            )));
        }
        Ok(IdempotencyKey { token_id: token_id.to_owned(), key: key.to_owned() })
    }

    pub fn as_str(&self) -> &str {
        &self.key
    }
}

/// A write's outcome, and whether it was answered from its idempotency key (the write
/// had happened before) rather than made now.
#[derive(Debug, Clone)]
pub struct Replayed<T> {
    pub outcome: T,
    pub replayed: bool,
}

/// What a delete reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub name: String,
    /// The version the credential was deleted at.
    pub version: u64,
    pub deleted_at: Micros,
}

/// A write that lost its key to a concurrent retry of itself; the caller answers from
/// the key ([`Vault::answer_from_key`]).
pub(super) fn key_taken() -> VaultError {
    VaultError::Aborted("a concurrent request with the same idempotency key wrote first; retry".into())
}

/// The request's fingerprint: every field, length-prefixed, under the fingerprint key.
struct Fingerprint(HkdfExtract<Sha256>);

impl Fingerprint {
    fn new(vault: &Vault, rpc: &str) -> Self {
        let key = vault.with_keys(|r| r.master().derive_subkey(FINGERPRINT_INFO));
        // HKDF-Extract is HMAC with the salt as its key; fed in pieces, so the value is
        // never copied into one buffer with the rest.
        let mut f = Fingerprint(HkdfExtract::new(Some(key.as_bytes())));
        f.bytes(rpc.as_bytes());
        f
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.input_ikm(&(b.len() as u64).to_be_bytes());
        self.0.input_ikm(b);
        self
    }

    fn opt_u64(&mut self, v: Option<u64>) -> &mut Self {
        match v {
            None => self.bytes(&[]),
            Some(v) => self.bytes(&v.to_be_bytes()),
        }
    }

    fn opt_i64(&mut self, v: Option<i64>) -> &mut Self {
        self.opt_u64(v.map(|v| v as u64))
    }

    fn metadata(&mut self, m: Option<&Metadata>) -> &mut Self {
        let Some(m) = m else { return self.bytes(b"-") };
        self.bytes(b"+").opt_u64(Some(m.labels.len() as u64));
        for (k, v) in &m.labels {
            self.bytes(k.as_bytes()).bytes(v.as_bytes());
        }
        self.bytes(m.description.as_bytes()).bytes(m.owner.as_bytes()).opt_i64(m.expires_at)
    }

    fn finish(self) -> Vec<u8> {
        self.0.finalize().0.to_vec()
    }
}

impl Vault {
    fn claim(&self, key: &IdempotencyKey, rpc: &'static str, fingerprint: Vec<u8>) -> KeyClaim {
        let window = micros(Duration::from_secs(self.inner.limits.idempotency_window_seconds));
        KeyClaim {
            token_id: key.token_id.clone(),
            key: key.key.clone(),
            rpc,
            fingerprint,
            expires_at: self.now().saturating_add(window),
        }
    }

    /// The stored result of `claim`'s key if it was made by this same request; a
    /// refusal if by another.
    async fn prior(&self, claim: &KeyClaim) -> Result<Option<KeyRecord>, VaultError> {
        let found = self.inner.store.get_idempotency_key(&claim.token_id, &claim.key, self.now()).await?;
        match found {
            None => Ok(None),
            Some(r) if r.rpc == claim.rpc && r.fingerprint == claim.fingerprint => Ok(Some(r)),
            Some(r) => Err(VaultError::FailedPrecondition(format!(
                "idempotency key {:?} was already used by this token for a different request ({} on {:?}); \
                 a new request needs a new key",
                claim.key, r.rpc, r.name
            ))),
        }
    }

    /// Runs `write` unless `claim`'s key answers it; if `write` fails, the key may still
    /// answer (a retry that raced its original, or the original committed and this
    /// attempt lost its compare-and-set to it).
    async fn answer_from_key<T>(
        &self,
        claim: &KeyClaim,
        replay: impl Fn(KeyRecord) -> T,
        write: impl std::future::Future<Output = Result<T, VaultError>>,
    ) -> Result<Replayed<T>, VaultError> {
        let (result, outcome) = match self.prior(claim).await {
            Ok(Some(r)) => (Ok(Replayed { outcome: replay(r), replayed: true }), KeyOutcome::Replayed),
            Ok(None) => match write.await {
                Ok(outcome) => (Ok(Replayed { outcome, replayed: false }), KeyOutcome::Written),
                Err(e) => match self.prior(claim).await {
                    Ok(Some(r)) => (Ok(Replayed { outcome: replay(r), replayed: true }), KeyOutcome::Replayed),
                    Ok(None) => (Err(e), KeyOutcome::Failed),
                    Err(mismatch @ VaultError::FailedPrecondition(_)) => (Err(mismatch), KeyOutcome::Refused),
                    // The store failing now says nothing about the write: report the write's error.
                    Err(_) => (Err(e), KeyOutcome::Failed),
                },
            },
            Err(mismatch @ VaultError::FailedPrecondition(_)) => (Err(mismatch), KeyOutcome::Refused),
            Err(e) => (Err(e), KeyOutcome::Failed),
        };
        metrics::counter!(names::IDEMPOTENT_WRITES, "rpc" => claim.rpc, "outcome" => outcome.as_str()).increment(1);
        result
    }

    /// [`Vault::put`] under an idempotency key.
    pub async fn put_idempotent(
        &self,
        key: &IdempotencyKey,
        name: &(impl NameArg + ?Sized),
        value: &[u8],
        expected: Option<u64>,
        metadata: Option<&Metadata>,
    ) -> Result<Replayed<PutOutcome>, VaultError> {
        // Bad input is refused as such, before any key is consulted.
        let name = self.name(name)?;
        let name = &*name;
        check_expected(expected)?;
        self.check_value(value)?;
        let mut f = Fingerprint::new(self, "PutCredential");
        f.bytes(name.as_str().as_bytes()).opt_u64(expected).metadata(metadata).bytes(value);
        let claim = self.claim(key, "PutCredential", f.finish());
        let replay = |r: KeyRecord| PutOutcome { name: r.name, version: r.version, created_at: r.at };
        self.answer_from_key(&claim, replay, self.put_keyed(name, value, expected, metadata, Some(&claim))).await
    }

    /// [`Vault::delete`] under an idempotency key.
    pub async fn delete_idempotent(
        &self,
        key: &IdempotencyKey,
        name: &(impl NameArg + ?Sized),
        expected: Option<u64>,
    ) -> Result<Replayed<DeleteOutcome>, VaultError> {
        let name = self.name(name)?;
        let name = &*name;
        check_expected(expected)?;
        let mut f = Fingerprint::new(self, "DeleteCredential");
        f.bytes(name.as_str().as_bytes()).opt_u64(expected);
        let claim = self.claim(key, "DeleteCredential", f.finish());
        let replay = |r: KeyRecord| DeleteOutcome { name: r.name, version: r.version, deleted_at: r.at };
        let write = async {
            let head = self.delete_keyed(name, expected, Some(&claim)).await?;
            Ok(DeleteOutcome {
                name: head.name,
                version: head.current_version,
                deleted_at: head.deleted_at.unwrap_or(head.updated_at),
            })
        };
        self.answer_from_key(&claim, replay, write).await
    }

    /// [`Vault::write_many`] under an idempotency key: a replay answers every write's
    /// first result and writes nothing.
    pub async fn write_many_idempotent(
        &self,
        key: &IdempotencyKey,
        items: &[BatchItem<'_>],
    ) -> Result<Replayed<Vec<BatchItemOutcome>>, VaultError> {
        let names = self.check_batch(items)?;
        let mut f = Fingerprint::new(self, "WriteCredentials");
        f.opt_u64(Some(items.len() as u64));
        for item in items {
            match *item {
                BatchItem::Put { name, value, expected, metadata } => {
                    f.bytes(b"put").bytes(name.as_bytes()).opt_u64(expected).metadata(metadata).bytes(value)
                }
                BatchItem::Delete { name, expected } => f.bytes(b"delete").bytes(name.as_bytes()).opt_u64(expected),
            };
        }
        let claim = self.claim(key, "WriteCredentials", f.finish());
        let replay = |r: KeyRecord| match r.batch {
            Some(writes) => writes
                .into_iter()
                .map(|w| BatchItemOutcome { name: w.name, version: w.version, deleted: w.deleted, at: r.at })
                .collect(),
            None => vec![BatchItemOutcome { name: r.name, version: r.version, deleted: false, at: r.at }],
        };
        self.answer_from_key(&claim, replay, self.write_checked_batch(items, &names, Some(&claim))).await
    }

    /// [`Vault::rotate`] under an idempotency key. A replay generates nothing.
    pub async fn rotate_idempotent(
        &self,
        key: &IdempotencyKey,
        name: &(impl NameArg + ?Sized),
        source: NewValue<'_>,
        grace: Option<std::time::Duration>,
        expected: Option<u64>,
        may_cut_grace: bool,
    ) -> Result<Replayed<RotateOutcome>, VaultError> {
        let name = self.name(name)?;
        let name = &*name;
        check_expected(expected)?;
        let mut f = Fingerprint::new(self, "RotateCredential");
        f.bytes(name.as_str().as_bytes())
            .opt_u64(expected)
            .opt_u64(grace.map(|g| u64::try_from(g.as_micros()).unwrap_or(u64::MAX)));
        match &source {
            NewValue::Given(v) => f.bytes(b"value").bytes(v),
            NewValue::Generate(spec) => {
                f.bytes(b"generate").bytes(serde_json::to_string(spec).unwrap_or_default().as_bytes())
            }
            NewValue::FromPolicy => f.bytes(b"policy"),
        };
        let claim = self.claim(key, "RotateCredential", f.finish());
        let replay = |r: KeyRecord| RotateOutcome {
            name: r.name,
            version: r.version,
            previous_version: r.version.saturating_sub(1),
            previous_expires_at: r.previous_expires_at,
        };
        let write = self.rotate_keyed(name, source, grace, expected, may_cut_grace, Some(&claim));
        self.answer_from_key(&claim, replay, write).await
    }
}

/// How a write under an idempotency key ended, as counted in
/// `credvault_idempotent_writes_total`.
#[derive(Debug, Clone, Copy)]
enum KeyOutcome {
    /// Written now; the key is stored with it.
    Written,
    /// Answered from the key: an earlier attempt wrote it.
    Replayed,
    /// The key belongs to a different request.
    Refused,
    /// The write failed (a conflict, a bad request, the store): nothing stored.
    Failed,
}

impl KeyOutcome {
    fn as_str(self) -> &'static str {
        match self {
            KeyOutcome::Written => "written",
            KeyOutcome::Replayed => "replayed",
            KeyOutcome::Refused => "refused",
            KeyOutcome::Failed => "failed",
        }
    }
}

/// Deletes expired idempotency keys, `batch` per statement, until `shutdown`: a full
/// batch is followed at once by the next, otherwise the pruner waits `every`. `clock`
/// says what time it is (the daemon passes `now_micros`; tests pass their own).
pub async fn prune_idempotency_keys(
    store: Arc<dyn Store>,
    clock: Arc<dyn Fn() -> Micros + Send + Sync>,
    batch: u32,
    every: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let batch = batch.max(1);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let pruned = store.prune_idempotency_keys(clock(), batch).await;
        if let Ok(n) = pruned {
            metrics::counter!(names::IDEMPOTENCY_KEYS_PRUNED).increment(n);
        }
        let wait = match pruned {
            Ok(n) if n >= u64::from(batch) => Duration::ZERO,
            Ok(_) => every,
            Err(e) => {
                tracing::warn!(error = %e, "pruning expired idempotency keys failed; will retry");
                every
            }
        };
        if wait.is_zero() {
            // Let requests in between batches.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
    }
}
