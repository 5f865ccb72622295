//! A [`Store`] wrapper that times every call (`credvault_store_query_duration_seconds`)
//! and counts them, so tests can prove that cache hits make no query at all, bounds
//! each call with a timeout ([`StoreError::Timeout`]), and puts every call behind the
//! [`Breaker`], so a store known to be down costs a call nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use async_trait::async_trait;

use super::breaker::Permit;
use super::{
    AuditRow, AuditStore, Backend, Breaker, ChangeSink, CredentialHead, CredentialStore, IdentityRecord, IdentityStore,
    JobStore, KekRow, KeyStore, KeyringRow, ListFilter, ListQuery, Micros, NewVersion, PolicyStore, PoolStats,
    RewrapBatch, RewrapRow, RotationJob, RotationPolicy, Staleness, StalenessQuery, StalenessStore, Store, StoreError,
    TokenRecord, TokenStore, VersionInfo, VersionRow,
};
use super::{BatchOutcome, BatchWrite, KeyClaim, KeyRecord, Metadata, WriteStore};
use crate::telemetry::names::STORE_QUERY_DURATION;

/// Declares [`Op`] from one table, so an operation's label and whom it serves are written
/// once, beside each other, and the handle table is as long as the list.
macro_rules! ops {
    ($($op:ident => $label:literal, $caller:ident;)+) => {
        /// A timed store operation.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Op {
            $($op),+
        }

        impl Op {
            /// Every operation, in declaration order: `op as usize` indexes it.
            const ALL: &[Op] = &[$(Op::$op),+];
            const COUNT: usize = Op::ALL.len();

            /// The `op` label of `credvault_store_query_duration_seconds`.
            fn label(self) -> &'static str {
                match self {
                    $(Op::$op => $label),+
                }
            }

            fn caller(self) -> Caller {
                match self {
                    $(Op::$op => Caller::$caller),+
                }
            }
        }
    };
}

/// Whom a store call serves. Only request-path calls are counted ([`Instrumented::queries`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Request,
    /// Audit batches, the rotation scheduler, re-wrap jobs, key and token reloads,
    /// resyncs and probes.
    Background,
}

ops! {
    Ping => "ping", Request;
    LoadKeyring => "load_keyring", Request;
    InitKeyring => "init_keyring", Request;
    // Key reloads follow change notifications (another daemon rotated the KEK, or the
    // feed reconnected); a read that meets an unknown KEK also reloads, rarely.
    ListKeks => "list_keks", Background;
    Rekey => "rekey", Request;
    GetCredential => "get_credential", Request;
    GetVersion => "get_version", Request;
    GetCurrentMany => "get_current_many", Request;
    ListVersions => "list_versions", Request;
    PutVersion => "put_version", Request;
    DeleteCredential => "delete_credential", Request;
    ListCredentials => "list_credentials", Request;
    CountCredentials => "count_credentials", Request;
    DestroyVersion => "destroy_version", Request;
    UndeleteCredential => "undelete_credential", Request;
    DeprecateExpired => "deprecate_expired", Background;
    PutRotationPolicy => "put_rotation_policy", Request;
    GetRotationPolicy => "get_rotation_policy", Request;
    DeleteRotationPolicy => "delete_rotation_policy", Request;
    DueRotations => "due_rotations", Background;
    DeferRotation => "defer_rotation", Background;
    StartKekRotation => "start_kek_rotation", Request;
    GetJob => "get_job", Background;
    ClaimJob => "claim_job", Background;
    RewrapCandidates => "rewrap_candidates", Background;
    CommitRewrap => "commit_rewrap", Background;
    FinishJob => "finish_job", Background;
    InsertToken => "insert_token", Request;
    InsertFirstToken => "insert_first_token", Request;
    // The token table follows the change feed and a periodic backstop.
    ListTokens => "list_tokens", Background;
    GetToken => "get_token", Background;
    FindLiveTokens => "find_live_tokens", Request;
    RevokeToken => "revoke_token", Request;
    InsertAudit => "insert_audit", Background;
    RecentAudit => "recent_audit", Request;
    PruneAudit => "prune_audit", Background;
    Staleness => "staleness", Background;
    InsertIdentity => "insert_identity", Request;
    // Read with the token table, by the reload task.
    ListIdentities => "list_identities", Background;
    DeleteIdentity => "delete_identity", Request;
    ListFiltered => "list_filtered", Request;
    PutVersionKeyed => "put_version_keyed", Request;
    DeleteCredentialKeyed => "delete_credential_keyed", Request;
    GetIdempotencyKey => "get_idempotency_key", Request;
    PruneIdempotencyKeys => "prune_idempotency_keys", Background;
    WriteBatch => "write_batch", Request;
    SetMetadata => "set_metadata", Request;
    // A resync revalidates the whole cache after the change feed or the store returns.
    Resync => "resync", Background;
    Probe => "probe", Background;
}

pub struct Instrumented {
    inner: Arc<dyn Store>,
    queries: AtomicU64,
    timeout: std::time::Duration,
    breaker: Breaker,
    /// Each operation's latency histogram, looked up in the registry on its first call
    /// only (so a series appears once its operation has run, as with a lookup per call).
    durations: [OnceLock<metrics::Histogram>; Op::COUNT],
}

/// A call running this long makes the keeper probe the store (at most once a second):
/// with the database gone, a pool waits out its whole acquire timeout (5 s) retrying
/// refused connects, and the probe finds out in a fraction of that.
const SUSPECT_AFTER: std::time::Duration = std::time::Duration::from_millis(250);

/// The longest a probe waits: a store that takes longer to answer `SELECT 1` is treated
/// as down until a later probe gets through.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for Instrumented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instrumented").field("backend", &self.inner.backend()).finish_non_exhaustive()
    }
}

impl Instrumented {
    pub fn new(inner: Arc<dyn Store>, timeout: std::time::Duration) -> Self {
        Instrumented {
            inner,
            queries: AtomicU64::new(0),
            timeout,
            breaker: Breaker::new(),
            durations: [const { OnceLock::new() }; Op::COUNT],
        }
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Current versions of cached names, for a resync: [`CredentialStore::get_current_many`], timed
    /// and guarded like any call but not counted as a request query.
    pub async fn current_for_resync(&self, names: &[String]) -> Result<Vec<(CredentialHead, VersionRow)>, StoreError> {
        self.timed(Op::Resync, self.inner.get_current_many(names)).await
    }

    /// Tests the store with a ping, if the breaker admits a probe now (`None`: another
    /// probe runs, or the backoff has not passed). A failed probe opens the breaker; a
    /// successful one closes it. Probes are not counted as request queries.
    pub async fn probe(&self) -> Option<Result<(), StoreError>> {
        let permit = self.breaker.admit_probe()?;
        let limit = self.timeout.min(PROBE_TIMEOUT);
        let start = Instant::now();
        let out = tokio::time::timeout(limit, self.inner.reach())
            .await
            .unwrap_or(Err(StoreError::Timeout(Op::Probe.label(), limit)));
        self.duration(Op::Probe).record(start.elapsed().as_secs_f64());
        self.breaker.record_probe(&permit, &out);
        Some(out)
    }

    /// Store calls made so far on behalf of requests (each one round trip, or one
    /// transaction for writes); background audit batches are not counted.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    fn duration(&self, op: Op) -> &metrics::Histogram {
        self.durations[op as usize].get_or_init(|| metrics::histogram!(STORE_QUERY_DURATION, "op" => op.label()))
    }

    async fn timed<T>(
        &self,
        op: Op,
        f: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        // Refused at once while the store is known to be down; nothing reaches it.
        let permit: Permit<'_> = self.breaker.admit()?;
        if op.caller() == Caller::Request {
            self.queries.fetch_add(1, Ordering::Relaxed);
        }
        let start = Instant::now();
        // On timeout the call's future is dropped: an open transaction rolls back.
        let call = tokio::time::timeout(self.timeout, f);
        tokio::pin!(call);
        let mut reachable = self.breaker.subscribe();
        let suspect = tokio::time::sleep(SUSPECT_AFTER);
        tokio::pin!(suspect);
        let mut suspected = false;
        let out = loop {
            tokio::select! {
                out = &mut call => break out.unwrap_or(Err(StoreError::Timeout(op.label(), self.timeout))),
                // A call still waiting when the breaker opens (the store was found down
                // meanwhile) fails now rather than at its timeout. Whatever it had begun
                // rolls back with its dropped connection, as on a timeout.
                _ = reachable.wait_for(|up| !*up) => {
                    self.duration(op).record(start.elapsed().as_secs_f64());
                    return Err(StoreError::Down);
                }
                // Slow enough to wonder whether the store is there at all: ask the keeper
                // for a probe (on its own connection, so a busy pool does not fail it).
                () = &mut suspect, if !suspected => {
                    suspected = true;
                    self.breaker.suspect();
                }
            }
        };
        self.duration(op).record(start.elapsed().as_secs_f64());
        self.breaker.record(&permit, &out);
        out
    }
}

#[async_trait]
impl CredentialStore for Instrumented {
    async fn get_credential(&self, name: &str) -> Result<Option<CredentialHead>, StoreError> {
        self.timed(Op::GetCredential, self.inner.get_credential(name)).await
    }

    async fn get_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<(CredentialHead, Option<VersionRow>)>, StoreError> {
        self.timed(Op::GetVersion, self.inner.get_version(name, version)).await
    }

    async fn get_current_many(&self, names: &[String]) -> Result<Vec<(CredentialHead, VersionRow)>, StoreError> {
        self.timed(Op::GetCurrentMany, self.inner.get_current_many(names)).await
    }

    async fn list_versions(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError> {
        self.timed(Op::ListVersions, self.inner.list_versions(name)).await
    }

    async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialHead, StoreError> {
        self.timed(Op::PutVersion, self.inner.put_version(new)).await
    }

    async fn delete_credential(&self, name: &str, expected: Option<u64>, now: Micros) -> Result<bool, StoreError> {
        self.timed(Op::DeleteCredential, self.inner.delete_credential(name, expected, now)).await
    }

    async fn list_credentials(&self, query: &ListQuery<'_>) -> Result<Vec<CredentialHead>, StoreError> {
        self.timed(Op::ListCredentials, self.inner.list_credentials(query)).await
    }

    async fn count_credentials(&self) -> Result<u64, StoreError> {
        self.timed(Op::CountCredentials, self.inner.count_credentials()).await
    }

    async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError> {
        self.timed(Op::DestroyVersion, self.inner.destroy_version(name, version)).await
    }

    async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError> {
        self.timed(Op::UndeleteCredential, self.inner.undelete_credential(name, now)).await
    }

    async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError> {
        self.timed(Op::DeprecateExpired, self.inner.deprecate_expired(now)).await
    }
}

#[async_trait]
impl KeyStore for Instrumented {
    async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError> {
        self.timed(Op::LoadKeyring, self.inner.load_keyring()).await
    }

    async fn init_keyring(&self, keyring: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError> {
        self.timed(Op::InitKeyring, self.inner.init_keyring(keyring, kek)).await
    }

    async fn list_keks(&self) -> Result<Vec<KekRow>, StoreError> {
        self.timed(Op::ListKeks, self.inner.list_keks()).await
    }

    async fn rekey(
        &self,
        keyring: &KeyringRow,
        old_verifier: &[u8],
        keks: &[(i64, Vec<u8>)],
    ) -> Result<bool, StoreError> {
        self.timed(Op::Rekey, self.inner.rekey(keyring, old_verifier, keks)).await
    }
}

#[async_trait]
impl JobStore for Instrumented {
    async fn start_kek_rotation(&self, kek: &KekRow, verifier: &[u8], now: Micros) -> Result<RotationJob, StoreError> {
        self.timed(Op::StartKekRotation, self.inner.start_kek_rotation(kek, verifier, now)).await
    }

    async fn get_job(&self, id: Option<i64>) -> Result<Option<RotationJob>, StoreError> {
        self.timed(Op::GetJob, self.inner.get_job(id)).await
    }

    async fn claim_job(&self, id: i64, owner: &str, now: Micros, lease_until: Micros) -> Result<bool, StoreError> {
        self.timed(Op::ClaimJob, self.inner.claim_job(id, owner, now, lease_until)).await
    }

    async fn rewrap_candidates(
        &self,
        active: i64,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError> {
        self.timed(Op::RewrapCandidates, self.inner.rewrap_candidates(active, after, limit)).await
    }

    async fn commit_rewrap(&self, batch: &RewrapBatch<'_>) -> Result<Option<u64>, StoreError> {
        self.timed(Op::CommitRewrap, self.inner.commit_rewrap(batch)).await
    }

    async fn finish_job(
        &self,
        id: i64,
        owner: &str,
        now: Micros,
        error: Option<&str>,
    ) -> Result<Option<RotationJob>, StoreError> {
        self.timed(Op::FinishJob, self.inner.finish_job(id, owner, now, error)).await
    }
}

#[async_trait]
impl PolicyStore for Instrumented {
    async fn put_rotation_policy(&self, p: &RotationPolicy) -> Result<bool, StoreError> {
        self.timed(Op::PutRotationPolicy, self.inner.put_rotation_policy(p)).await
    }

    async fn get_rotation_policy(&self, name: &str) -> Result<Option<RotationPolicy>, StoreError> {
        self.timed(Op::GetRotationPolicy, self.inner.get_rotation_policy(name)).await
    }

    async fn delete_rotation_policy(&self, name: &str) -> Result<bool, StoreError> {
        self.timed(Op::DeleteRotationPolicy, self.inner.delete_rotation_policy(name)).await
    }

    async fn due_rotations(&self, now: Micros, limit: u32) -> Result<Vec<RotationPolicy>, StoreError> {
        self.timed(Op::DueRotations, self.inner.due_rotations(now, limit)).await
    }

    async fn defer_rotation(
        &self,
        name: &str,
        claim: Micros,
        retry_at: Micros,
        error: &str,
    ) -> Result<bool, StoreError> {
        self.timed(Op::DeferRotation, self.inner.defer_rotation(name, claim, retry_at, error)).await
    }
}

#[async_trait]
impl TokenStore for Instrumented {
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.timed(Op::InsertToken, self.inner.insert_token(token)).await
    }

    async fn insert_first_token(&self, token: &TokenRecord) -> Result<bool, StoreError> {
        self.timed(Op::InsertFirstToken, self.inner.insert_first_token(token)).await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.timed(Op::ListTokens, self.inner.list_tokens()).await
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.timed(Op::GetToken, self.inner.get_token(token_hash)).await
    }

    async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRecord>, StoreError> {
        self.timed(Op::FindLiveTokens, self.inner.find_live_tokens(prefix, limit)).await
    }

    async fn revoke_token(&self, token_hash: &str, now: Micros) -> Result<bool, StoreError> {
        self.timed(Op::RevokeToken, self.inner.revoke_token(token_hash, now)).await
    }
}

#[async_trait]
impl AuditStore for Instrumented {
    async fn insert_audit(&self, events: &[AuditRow]) -> Result<(), StoreError> {
        self.timed(Op::InsertAudit, self.inner.insert_audit(events)).await
    }

    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        self.timed(Op::RecentAudit, self.inner.recent_audit(limit)).await
    }

    async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        self.timed(Op::PruneAudit, self.inner.prune_audit(before, limit)).await
    }
}

#[async_trait]
impl IdentityStore for Instrumented {
    async fn insert_identity(&self, r: &IdentityRecord) -> Result<bool, StoreError> {
        self.timed(Op::InsertIdentity, self.inner.insert_identity(r)).await
    }

    async fn list_identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.timed(Op::ListIdentities, self.inner.list_identities()).await
    }

    async fn delete_identity(&self, identity: &str) -> Result<Option<IdentityRecord>, StoreError> {
        self.timed(Op::DeleteIdentity, self.inner.delete_identity(identity)).await
    }
}

#[async_trait]
impl StalenessStore for Instrumented {
    async fn staleness(&self, q: &StalenessQuery) -> Result<Staleness, StoreError> {
        self.timed(Op::Staleness, self.inner.staleness(q)).await
    }

    async fn list_filtered(
        &self,
        q: &ListQuery<'_>,
        f: &ListFilter,
    ) -> Result<Vec<(CredentialHead, bool)>, StoreError> {
        self.timed(Op::ListFiltered, self.inner.list_filtered(q, f)).await
    }
}

#[async_trait]
impl WriteStore for Instrumented {
    async fn put_version_keyed(&self, new: &NewVersion<'_>, key: &KeyClaim) -> Result<CredentialHead, StoreError> {
        self.timed(Op::PutVersionKeyed, self.inner.put_version_keyed(new, key)).await
    }

    async fn delete_credential_keyed(
        &self,
        name: &str,
        expected: Option<u64>,
        now: Micros,
        key: &KeyClaim,
    ) -> Result<bool, StoreError> {
        self.timed(Op::DeleteCredentialKeyed, self.inner.delete_credential_keyed(name, expected, now, key)).await
    }

    async fn get_idempotency_key(
        &self,
        token_id: &str,
        key: &str,
        now: Micros,
    ) -> Result<Option<KeyRecord>, StoreError> {
        self.timed(Op::GetIdempotencyKey, self.inner.get_idempotency_key(token_id, key, now)).await
    }

    async fn prune_idempotency_keys(&self, now: Micros, limit: u32) -> Result<u64, StoreError> {
        self.timed(Op::PruneIdempotencyKeys, self.inner.prune_idempotency_keys(now, limit)).await
    }

    async fn write_batch(&self, batch: &BatchWrite<'_>) -> Result<BatchOutcome, StoreError> {
        self.timed(Op::WriteBatch, self.inner.write_batch(batch)).await
    }

    async fn set_metadata(
        &self,
        name: &str,
        metadata: &Metadata,
        expected: u64,
        now: Micros,
    ) -> Result<Option<CredentialHead>, StoreError> {
        self.timed(Op::SetMetadata, self.inner.set_metadata(name, metadata, expected, now)).await
    }
}

#[async_trait]
impl Store for Instrumented {
    fn backend(&self) -> Backend {
        self.inner.backend()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.timed(Op::Ping, self.inner.ping()).await
    }

    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }

    async fn watch_changes(
        &self,
        sink: ChangeSink,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        // A long-lived subscription, not a query: not timed or counted.
        self.inner.watch_changes(sink, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_its_own_label() {
        let ops = [Op::Ping, Op::GetVersion, Op::PutVersion, Op::InsertAudit, Op::Resync, Op::Probe];
        assert_eq!(ops.map(Op::label), ["ping", "get_version", "put_version", "insert_audit", "resync", "probe"]);
        assert!(Op::ALL.iter().enumerate().all(|(i, op)| *op as usize == i));
        let mut labels: Vec<&str> = Op::ALL.iter().map(|op| op.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Op::COUNT, "two operations share a label: their latencies would mix");
    }
}
