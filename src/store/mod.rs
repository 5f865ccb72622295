//! Storage: one trait per aggregate (credentials, keys, jobs, policies, tokens, audit),
//! [`Store`] over all of them, and a PostgreSQL and an SQLite implementation.
//!
//! - `error.rs`: [`StoreError`] and how an error bears on the store's health ([`Outage`]).
//! - `rows.rs`: the rows the traits take and return. `feed.rs`: the change feed's types
//!   and the text of its notifications.
//! - `sql/`: the SQL both backends share, one file per aggregate, written once as
//!   generic implementations over any `sql::SqlBackend`. `postgres.rs` and
//!   `sqlite.rs` supply what differs.
//! - `instrumented.rs`: the wrapper every caller goes through (timing, timeout, the
//!   request query count, the [`Breaker`] of `breaker.rs`).
//!
//! **Invariant:** the store never sees plaintext or unwrapped keys; it moves sealed
//! bytes. Every write of a new version is one transaction whose first statement is the
//! compare-and-set on `credentials.current_version`, so concurrent writers serialize on
//! the row and a loser changes nothing.

mod breaker;
mod error;
mod feed;
mod instrumented;
mod pg_tls;
mod postgres;
mod rows;
mod sql;
mod sqlite;
mod writes;

use async_trait::async_trait;

pub use breaker::Breaker;
pub use error::{Outage, StoreError};
pub(crate) use feed::{decode_change, encode_change, encode_table_change, encode_token_change};
pub use feed::{Change, ChangeEvent, ChangeSink, KEYS_CHANGED, TOKENS_CHANGED};
pub use instrumented::Instrumented;
pub use postgres::PgStore;
pub use rows::{
    AuditRow, KekRow, KekState, KeyringRow, ListQuery, MasterKeySource, NewVersion, PolicyAdvance, RewrapBatch,
    RewrapRow, Rewrapped, VersionRow, WriteBase,
};
pub use sqlite::SqliteStore;
pub use writes::{BatchOp, BatchOutcome, BatchWrite, KeyClaim, KeyRecord, KeyedWrite};

pub use crate::model::{
    now_micros, ChangeKind, CredentialHead, IdentityRecord, JobState, Metadata, Micros, PolicyKind, RotationJob,
    RotationPolicy, TokenRecord, VersionInfo, VersionState,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub idle: usize,
}

/// Credentials and their versions: the read path, the compare-and-set write, listing,
/// soft delete, destroy, and the scheduler's sweep of ended grace periods.
#[async_trait]
pub trait CredentialStore: Send + Sync {
    async fn get_credential(&self, name: &str) -> Result<Option<CredentialHead>, StoreError>;

    /// The head of `name` and its version `version` (the current one if `None`), in one
    /// query; the version is `None` when it is not retained.
    async fn get_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<(CredentialHead, Option<VersionRow>)>, StoreError>;

    /// Heads and current versions of several names in one query; absent names are omitted.
    async fn get_current_many(&self, names: &[String]) -> Result<Vec<(CredentialHead, VersionRow)>, StoreError>;

    /// Retained versions of `name`, newest first.
    async fn list_versions(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError>;

    /// Writes `new.base.next_version()` if the head still matches `new.base`, else
    /// [`StoreError::Conflict`] with nothing changed. Returns the new head.
    async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialHead, StoreError>;

    /// Soft-deletes a live credential (at `expected` version if given). `false`: nothing
    /// matched, so nothing changed.
    async fn delete_credential(&self, name: &str, expected: Option<u64>, now: Micros) -> Result<bool, StoreError>;

    async fn list_credentials(&self, query: &ListQuery<'_>) -> Result<Vec<CredentialHead>, StoreError>;

    /// Live (not deleted) credentials.
    async fn count_credentials(&self) -> Result<u64, StoreError>;

    /// Wipes one version's sealed bytes irreversibly. `None`: no such version; `Some(false)`:
    /// it was already destroyed.
    async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError>;

    /// Clears `deleted_at`. `false`: no deleted credential by that name.
    async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError>;

    /// Marks `previous` versions whose grace period has ended `deprecated`; returns how many.
    async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError>;
}

/// The keyring row (how the master key is made and checked) and the KEKs it wraps.
#[async_trait]
pub trait KeyStore: Send + Sync {
    async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError>;

    /// Stores the keyring and the first KEK in one transaction, unless a keyring exists.
    /// Returns `false` when one did (another daemon initialised the database first).
    async fn init_keyring(&self, keyring: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError>;

    async fn list_keks(&self) -> Result<Vec<KekRow>, StoreError>;

    /// Replaces the keyring's KDF salt, parameters and verifier and every KEK's wrapping,
    /// atomically, if the stored verifier is still `old_verifier` and the KEKs are exactly
    /// those given. `false`: something changed meanwhile; nothing was written.
    async fn rekey(
        &self,
        keyring: &KeyringRow,
        old_verifier: &[u8],
        keks: &[(i64, Vec<u8>)],
    ) -> Result<bool, StoreError>;
}

/// The KEK rotation job: its start (with the new KEK), its lease, and its batches.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// In one transaction: the active KEK becomes `retiring`, `kek` becomes active, and a
    /// re-wrap job is created. [`StoreError::JobRunning`] if one already runs;
    /// [`StoreError::Conflict`] if another daemon took the KEK id first, or the keyring's
    /// verifier is no longer `verifier` (the master key changed under the caller).
    async fn start_kek_rotation(&self, kek: &KekRow, verifier: &[u8], now: Micros) -> Result<RotationJob, StoreError>;

    /// A job by id, or the newest one.
    async fn get_job(&self, id: Option<i64>) -> Result<Option<RotationJob>, StoreError>;

    /// Takes (or renews) the lease on a running job. `false`: another daemon holds a
    /// live lease, or the job is not running.
    async fn claim_job(&self, id: i64, owner: &str, now: Micros, lease_until: Micros) -> Result<bool, StoreError>;

    /// Versions after `after` (in name, version order) whose KEK is not `active`.
    async fn rewrap_candidates(
        &self,
        active: i64,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError>;

    /// Applies a batch and advances the job's cursor and counters in one transaction,
    /// if `owner` still holds the lease. Returns how many versions were re-wrapped
    /// (rows changed since they were read are left alone); `None`: the lease was lost
    /// and nothing changed.
    async fn commit_rewrap(&self, batch: &RewrapBatch<'_>) -> Result<Option<u64>, StoreError>;

    /// Ends a job held by `owner`: KEKs that no version references any more are retired,
    /// in the same transaction. Returns the finished job (`None`: lease lost).
    async fn finish_job(
        &self,
        id: i64,
        owner: &str,
        now: Micros,
        error: Option<&str>,
    ) -> Result<Option<RotationJob>, StoreError>;
}

/// Rotation policies, one per credential, and the scheduler's view of them.
#[async_trait]
pub trait PolicyStore: Send + Sync {
    /// Creates or replaces the rotation policy of a live credential. `false`: no live
    /// credential by that name.
    async fn put_rotation_policy(&self, policy: &RotationPolicy) -> Result<bool, StoreError>;

    async fn get_rotation_policy(&self, name: &str) -> Result<Option<RotationPolicy>, StoreError>;

    /// `false`: there was none.
    async fn delete_rotation_policy(&self, name: &str) -> Result<bool, StoreError>;

    /// Policies of live credentials whose `next_run_at` is at or before `now`, oldest first.
    async fn due_rotations(&self, now: Micros, limit: u32) -> Result<Vec<RotationPolicy>, StoreError>;

    /// Records a failed scheduled rotation and when to try again, if the slot is still
    /// `claim` (another daemon may have rotated meanwhile).
    async fn defer_rotation(
        &self,
        name: &str,
        claim: Micros,
        retry_at: Micros,
        error: &str,
    ) -> Result<bool, StoreError>;
}

/// API tokens, stored by the SHA-256 of the token.
#[async_trait]
pub trait TokenStore: Send + Sync {
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;

    /// Inserts `token` only if the table holds no token at all, atomically (two daemons
    /// starting on an empty database create one root token). `false`: a token existed.
    async fn insert_first_token(&self, token: &TokenRecord) -> Result<bool, StoreError>;

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;

    /// The token with this hash, live or revoked.
    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError>;

    /// Up to `limit` live tokens whose hash starts with `prefix` (lowercase hex), by
    /// index: finding a token to revoke costs the same however many tokens exist.
    async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRecord>, StoreError>;

    /// Marks a live token revoked. `false`: no live token has this hash.
    async fn revoke_token(&self, token_hash: &str, now: Micros) -> Result<bool, StoreError>;
}

/// The audit log.
#[async_trait]
pub trait AuditStore: Send + Sync {
    /// Appends audit events in one transaction.
    async fn insert_audit(&self, events: &[AuditRow]) -> Result<(), StoreError>;

    /// The newest `limit` audit events, newest first.
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// Deletes at most `limit` audit events older than `before` (oldest first); returns
    /// how many went.
    async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError>;
}

/// What the staleness gauges count, as of `now`. Counts stop at `cap` (each query reads
/// at most that many index entries), so a pass costs the same however large the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StalenessQuery {
    /// Rotation policies due at or before this are overdue.
    pub overdue_before: Micros,
    pub now: Micros,
    /// Credentials expiring after `now` and at or before this are "expiring".
    pub expiring_before: Micros,
    pub cap: u32,
}

/// Live credentials only (not soft-deleted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Staleness {
    /// Whose rotation policy's next slot is at or before `overdue_before`.
    pub overdue: u64,
    /// Whose `expires_at` has passed.
    pub expired: u64,
    /// Whose `expires_at` lies in `(now, expiring_before]`.
    pub expiring: u64,
    /// When the oldest current version was written; `None`: no live credential.
    pub oldest_current_at: Option<Micros>,
}

/// Listing filters (`ListCredentials` with `older_than` or `rotation_overdue`). A row
/// matches when every filter set holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// The current version was written before this.
    pub current_before: Option<Micros>,
    /// The rotation policy's next slot is at or before this.
    pub overdue_before: Option<Micros>,
}

impl ListFilter {
    pub fn is_empty(&self) -> bool {
        self.current_before.is_none() && self.overdue_before.is_none()
    }
}

/// Rotation health: the counts behind the staleness gauges, and filtered listings.
#[async_trait]
pub trait StalenessStore: Send + Sync {
    async fn staleness(&self, query: &StalenessQuery) -> Result<Staleness, StoreError>;

    /// The rows [`CredentialStore::list_credentials`] returns for `query`, each with
    /// whether it matches `filter`: a listing counts the rows that do not against its
    /// scan budget like those its policy hides, so its work stays bounded.
    async fn list_filtered(
        &self,
        query: &ListQuery<'_>,
        filter: &ListFilter,
    ) -> Result<Vec<(CredentialHead, bool)>, StoreError>;
}

/// Identity bindings. Each change notifies the token table's listeners, in its own
/// transaction.
#[async_trait]
pub trait IdentityStore: Send + Sync {
    /// `false`: the identity is bound already; nothing changed.
    async fn insert_identity(&self, record: &IdentityRecord) -> Result<bool, StoreError>;

    async fn list_identities(&self) -> Result<Vec<IdentityRecord>, StoreError>;

    /// Removes a binding and returns it; `None`: there was none.
    async fn delete_identity(&self, identity: &str) -> Result<Option<IdentityRecord>, StoreError>;
}

/// Idempotency keys, stored in the transaction of the write they belong to, and
/// all-or-nothing writes of several credentials.
#[async_trait]
pub trait WriteStore: Send + Sync {
    /// [`CredentialStore::put_version`] that also stores `key`, in the same transaction.
    /// [`StoreError::Conflict`] with nothing written if the compare-and-set fails or a live
    /// key by that token and name exists already (a concurrent retry won).
    async fn put_version_keyed(&self, new: &NewVersion<'_>, key: &KeyClaim) -> Result<CredentialHead, StoreError>;

    /// [`CredentialStore::delete_credential`] that also stores `key` when it deletes.
    /// [`StoreError::Conflict`] with nothing changed if a live key exists already.
    async fn delete_credential_keyed(
        &self,
        name: &str,
        expected: Option<u64>,
        now: Micros,
        key: &KeyClaim,
    ) -> Result<bool, StoreError>;

    /// The live (unexpired at `now`) key `key` of token `token_id`.
    async fn get_idempotency_key(
        &self,
        token_id: &str,
        key: &str,
        now: Micros,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Deletes at most `limit` keys expired at `now`; returns how many went.
    async fn prune_idempotency_keys(&self, now: Micros, limit: u32) -> Result<u64, StoreError>;

    /// Applies every write of `batch` in one transaction, or none of them.
    async fn write_batch(&self, batch: &BatchWrite<'_>) -> Result<BatchOutcome, StoreError>;

    /// Replaces the metadata of a live credential if its metadata version is still
    /// `expected`, moving that version on by one (the value's version is untouched).
    /// `None`: nothing matched, nothing changed.
    async fn set_metadata(
        &self,
        name: &str,
        metadata: &Metadata,
        expected: u64,
        now: Micros,
    ) -> Result<Option<CredentialHead>, StoreError>;
}

/// A whole store: every aggregate, plus the connection itself and the change feed.
/// Callers hold an `Arc<dyn Store>` and call any aggregate's methods on it.
#[async_trait]
pub trait Store:
    CredentialStore
    + KeyStore
    + JobStore
    + PolicyStore
    + TokenStore
    + AuditStore
    + StalenessStore
    + IdentityStore
    + WriteStore
    + Send
    + Sync
    + 'static
{
    fn backend(&self) -> Backend;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the database can be reached at all, apart from the pool: a busy pool
    /// must not look like a dead database. PostgreSQL opens a fresh connection; the
    /// default pings through the pool (SQLite's file is always "reachable").
    async fn reach(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    /// Connections in the pool, for metrics.
    fn pool_stats(&self) -> PoolStats;

    /// Reports writes made through other daemons sharing this database to `sink` until
    /// `shutdown` turns true. Backends used by one process only return at once.
    async fn watch_changes(
        &self,
        sink: ChangeSink,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_messages_round_trip() {
        let e = ChangeEvent { name: "a/b\tc".into(), kind: ChangeKind::Rotate, version: 7, at: 42 };
        assert_eq!(decode_change(&encode_change(&e)), Some(Change::Credential(e)));
        assert_eq!(decode_change(&encode_table_change(TOKENS_CHANGED)), Some(Change::Tokens));
        let hash = "0123456789abcdef".repeat(4);
        assert_eq!(decode_change(&encode_token_change(&hash)), Some(Change::Token(hash.clone())));
        assert_eq!(decode_change(&encode_token_change("abc")), None, "not a hash");
        assert_eq!(decode_change(&encode_token_change(&hash.to_uppercase())), None, "not lowercase");
        assert_eq!(decode_change(&encode_table_change(KEYS_CHANGED)), Some(Change::Keys));
        assert_eq!(decode_change("bogus\t1\t2\tname"), None);
        assert_eq!(decode_change("put\tx\t2\tname"), None);
        assert_eq!(decode_change("put"), None);
    }
}
