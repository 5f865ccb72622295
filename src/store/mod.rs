//! Storage: one trait, [`Store`], with a PostgreSQL and an SQLite implementation.
//!
//! **Invariant:** the store never sees plaintext or unwrapped keys; it moves sealed
//! bytes. Every write of a new version is one transaction whose first statement is the
//! compare-and-set on `credentials.current_version`, so concurrent writers serialize on
//! the row and a loser changes nothing.

mod breaker;
mod instrumented;
mod pg_tls;
mod postgres;
mod sql;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crypto::{KdfParams, Sealed};

pub use breaker::Breaker;
pub use instrumented::Instrumented;
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

pub fn now_micros() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (connection refused, pool timeout, closed pool).
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("storage query failed: {0}")]
    Query(#[source] sqlx::Error),
    /// The compare-and-set lost: the row changed since it was read.
    #[error("write conflict")]
    Conflict,
    #[error("storage call {0} timed out after {1:?}")]
    Timeout(&'static str, std::time::Duration),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A write was sealed under a KEK that is no longer the active one (another daemon
    /// rotated the KEK): reload the keys and seal again.
    #[error("KEK {0} is no longer active")]
    StaleKek(i64),
    /// A KEK rotation job is already running.
    #[error("rotation job {0} is still running")]
    JobRunning(i64),
    /// Refused without trying: the store is known to be down (the breaker is open).
    #[error("storage is down; calls are refused until a probe reaches it")]
    Down,
}

/// How an error bears on the store's health (see [`Breaker`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The database cannot be reached or is shutting down: the store is down.
    Down,
    /// A timeout or one killed connection: down only if it keeps happening.
    Flaky,
}

impl StoreError {
    /// `None` when the database answered (even with an error) or was not asked.
    pub fn outage(&self) -> Option<Outage> {
        match self {
            StoreError::Timeout(..) => Some(Outage::Flaky),
            StoreError::Unavailable(sqlx::Error::Database(e)) => Some(match e.code().as_deref() {
                Some(code) if sqlstate_means_down(code) => Outage::Down,
                _ => Outage::Flaky,
            }),
            // A pool that timed out handing out a connection may be busy, not cut off:
            // only timeouts in a row say the store is gone (refused connects are `Io`).
            StoreError::Unavailable(sqlx::Error::PoolTimedOut) => Some(Outage::Flaky),
            StoreError::Unavailable(_) => Some(Outage::Down),
            _ => None,
        }
    }
}

/// SQLSTATE classes 08 (connection exception) and 57 (operator intervention: the server
/// shutting down, a backend terminated, a query cancelled) mean the database is going
/// away or dropping connections, not that the request was wrong. 25006 (read-only
/// transaction) is a write that reached a standby: a primary that was demoted, or a URL
/// that does not yet follow a failover; the write can succeed once it does.
pub(crate) fn sqlstate_is_unavailable(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57") || code == "25006"
}

/// The SQLSTATEs that say the whole server is unreachable, not just one connection:
/// connection exceptions, crash shutdown, and "cannot connect now" (starting up or
/// shutting down). A backend killed by `pg_terminate_backend` (57P01) or a cancelled
/// query (57014) is one connection's fate and counts as flaky.
fn sqlstate_means_down(code: &str) -> bool {
    code.starts_with("08") || code == "57P02" || code == "57P03"
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(ref d) if d.code().is_some_and(|c| sqlstate_is_unavailable(&c)) => {
                StoreError::Unavailable(e)
            }
            other => StoreError::Query(other),
        }
    }
}

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

/// Descriptive data a credential carries besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub owner: String,
    pub expires_at: Option<Micros>,
}

/// A row of `credentials`: the head of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub name: String,
    pub current_version: u64,
    pub metadata: Metadata,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub deleted_at: Option<Micros>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Current,
    Previous,
    Deprecated,
    Destroyed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Previous => "previous",
            VersionState::Deprecated => "deprecated",
            VersionState::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "current" => VersionState::Current,
            "previous" => VersionState::Previous,
            "deprecated" => VersionState::Deprecated,
            "destroyed" => VersionState::Destroyed,
            other => return Err(StoreError::Corrupt(format!("unknown version state {other:?}"))),
        })
    }
}

/// A version's description, without its sealed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u64,
    pub state: VersionState,
    pub kek_id: i64,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
}

/// A version with its sealed bytes (`None` once destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub info: VersionInfo,
    pub sealed: Option<Sealed>,
}

/// What the compare-and-set of a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBase {
    /// No row by this name.
    Create,
    /// A live row at this current version.
    Update(u64),
    /// A soft-deleted row at this current version; the write revives it.
    Revive(u64),
}

impl WriteBase {
    /// The version the write creates (saturating: callers refuse versions beyond
    /// `vault::MAX_VERSION` before writing).
    pub fn next_version(self) -> u64 {
        match self {
            WriteBase::Create => 1,
            WriteBase::Update(v) | WriteBase::Revive(v) => v.saturating_add(1),
        }
    }
}

pub struct NewVersion<'a> {
    pub name: &'a str,
    pub base: WriteBase,
    pub sealed: &'a Sealed,
    /// `None` keeps the stored metadata.
    pub metadata: Option<&'a Metadata>,
    pub now: Micros,
    /// Versions older than the newest `max_versions` are pruned in the same transaction.
    pub max_versions: u64,
    /// When the version this write supersedes stops being readable (a rotation's grace
    /// period); `None` keeps it readable until pruned.
    pub previous_expires_at: Option<Micros>,
    /// What the change feed reports the write as.
    pub kind: ChangeKind,
    /// A rotation moves the credential's rotation policy on in the same transaction.
    pub policy: Option<PolicyAdvance>,
}

/// How a rotation updates the credential's rotation policy row (if it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyAdvance {
    /// A scheduled rotation claims its slot: the write commits only if the policy's
    /// `next_run_at` still equals this, so of several daemons exactly one rotates per slot.
    pub claim: Option<Micros>,
    /// The next slot (`None`: nothing more is due).
    pub next_run_at: Option<Micros>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterKeySource {
    Passphrase,
    KeyFile,
}

impl MasterKeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            MasterKeySource::Passphrase => "passphrase",
            MasterKeySource::KeyFile => "key-file",
        }
    }
}

/// How this database's master key is made and checked.
#[derive(Debug, Clone)]
pub struct KeyringRow {
    pub source: MasterKeySource,
    /// Salt and cost for a passphrase-derived key.
    pub kdf: Option<(Vec<u8>, KdfParams)>,
    pub verifier: Vec<u8>,
    pub created_at: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekState {
    Active,
    Retiring,
    Retired,
}

impl KekState {
    pub fn as_str(self) -> &'static str {
        match self {
            KekState::Active => "active",
            KekState::Retiring => "retiring",
            KekState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => KekState::Active,
            "retiring" => KekState::Retiring,
            "retired" => KekState::Retired,
            other => return Err(StoreError::Corrupt(format!("unknown KEK state {other:?}"))),
        })
    }
}

#[derive(Debug, Clone)]
pub struct KekRow {
    pub id: i64,
    pub wrapped_key: Vec<u8>,
    pub state: KekState,
    pub created_at: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    pub display_name: String,
    /// Policy rules as JSON.
    pub policies: String,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRow {
    pub at: Micros,
    pub request_id: String,
    pub token_id: String,
    pub token_name: String,
    pub rpc: String,
    pub credential: Option<String>,
    pub version: Option<u64>,
    pub code: String,
    pub latency_us: u64,
    pub peer: String,
    /// Identical successful reads this row stands for (1 unless folded).
    pub count: u64,
    /// The last of the folded reads (`None` for a single event).
    pub last_at: Option<Micros>,
}

/// When a credential's rotation policy makes the scheduler rotate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Never by itself: `RotateCredential` without a value uses the policy's generator.
    Manual,
    /// Every `interval`.
    Periodic,
    /// `interval` before the credential's `expires_at`; each rotation renews the expiry.
    BeforeExpiry,
    /// Once, at a time.
    Scheduled,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Manual => "manual",
            PolicyKind::Periodic => "periodic",
            PolicyKind::BeforeExpiry => "before_expiry",
            PolicyKind::Scheduled => "scheduled",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "manual" => PolicyKind::Manual,
            "periodic" => PolicyKind::Periodic,
            "before_expiry" => PolicyKind::BeforeExpiry,
            "scheduled" => PolicyKind::Scheduled,
            other => return Err(StoreError::Corrupt(format!("unknown rotation policy kind {other:?}"))),
        })
    }
}

/// A row of `rotation_policies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicyRow {
    pub name: String,
    pub kind: PolicyKind,
    pub interval_us: Option<i64>,
    pub validity_us: Option<i64>,
    pub at: Option<Micros>,
    /// The generator spec as JSON.
    pub generator: String,
    pub grace_us: i64,
    pub next_run_at: Option<Micros>,
    pub rotations: u64,
    pub last_rotated_at: Option<Micros>,
    pub last_error: Option<String>,
    pub updated_at: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            other => return Err(StoreError::Corrupt(format!("unknown job state {other:?}"))),
        })
    }
}

/// A row of `rotation_jobs`: a KEK re-wrap and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub id: i64,
    pub state: JobState,
    pub new_kek_id: i64,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    /// The last (name, version) handled.
    pub cursor: Option<(String, u64)>,
    pub started_at: Micros,
    pub updated_at: Micros,
    pub finished_at: Option<Micros>,
    pub error: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<Micros>,
}

/// A version whose DEK is wrapped by an older KEK (empty `wrapped_dek`: destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapRow {
    pub name: String,
    pub version: u64,
    pub kek_id: i64,
    pub wrapped_dek: Vec<u8>,
}

/// A re-wrapped DEK, applied only if the row still holds `old` (so it never races a
/// concurrent destroy, prune or another re-wrap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    pub old: RewrapRow,
    pub wrapped_dek: Vec<u8>,
}

/// One committed batch of a re-wrap job.
#[derive(Debug, Clone)]
pub struct RewrapBatch<'a> {
    pub job_id: i64,
    pub owner: &'a str,
    pub new_kek_id: i64,
    pub rows: &'a [Rewrapped],
    /// The last row the batch looked at (re-wrapped or not).
    pub cursor: (&'a str, u64),
    pub failed: u64,
    pub now: Micros,
    pub lease_until: Micros,
}

/// One scan of `ListCredentials`: names `start <= name < end` in name order (byte
/// order), at most `limit` of them. See [`NameRange`](crate::names::NameRange) for bounds.
#[derive(Debug, Clone)]
pub struct ListQuery<'a> {
    pub start: &'a str,
    pub end: &'a str,
    pub limit: u32,
    pub include_deleted: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;

    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the database can be reached at all, apart from the pool: a busy pool
    /// must not look like a dead database. PostgreSQL opens a fresh connection; the
    /// default pings through the pool (SQLite's file is always "reachable").
    async fn reach(&self) -> Result<(), StoreError> {
        self.ping().await
    }

    async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError>;

    /// Stores the keyring and the first KEK in one transaction, unless a keyring exists.
    /// Returns `false` when one did (another daemon initialised the database first).
    async fn init_keyring(&self, keyring: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError>;

    async fn list_keks(&self) -> Result<Vec<KekRow>, StoreError>;

    async fn get_credential(&self, name: &str) -> Result<Option<CredentialRow>, StoreError>;

    /// The head of `name` and its version `version` (the current one if `None`), in one
    /// query; the version is `None` when it is not retained.
    async fn get_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<(CredentialRow, Option<VersionRow>)>, StoreError>;

    /// Heads and current versions of several names in one query; absent names are omitted.
    async fn get_current_many(&self, names: &[String]) -> Result<Vec<(CredentialRow, VersionRow)>, StoreError>;

    /// Retained versions of `name`, newest first.
    async fn list_versions(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError>;

    /// Writes `new.base.next_version()` if the head still matches `new.base`, else
    /// [`StoreError::Conflict`] with nothing changed. Returns the new head.
    async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialRow, StoreError>;

    /// Soft-deletes a live credential (at `expected` version if given). `false`: nothing
    /// matched, so nothing changed.
    async fn delete_credential(&self, name: &str, expected: Option<u64>, now: Micros) -> Result<bool, StoreError>;

    async fn list_credentials(&self, query: &ListQuery<'_>) -> Result<Vec<CredentialRow>, StoreError>;

    /// Live (not deleted) credentials.
    async fn count_credentials(&self) -> Result<u64, StoreError>;

    async fn insert_token(&self, token: &TokenRow) -> Result<(), StoreError>;

    /// Inserts `token` only if the table holds no token at all, atomically (two daemons
    /// starting on an empty database create one root token). `false`: a token existed.
    async fn insert_first_token(&self, token: &TokenRow) -> Result<bool, StoreError>;

    async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// The token with this hash, live or revoked.
    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRow>, StoreError>;

    /// Up to `limit` live tokens whose hash starts with `prefix` (lowercase hex), by
    /// index: finding a token to revoke costs the same however many tokens exist.
    async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRow>, StoreError>;

    /// Wipes one version's sealed bytes irreversibly. `None`: no such version; `Some(false)`:
    /// it was already destroyed.
    async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError>;

    /// Clears `deleted_at`. `false`: no deleted credential by that name.
    async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError>;

    /// Creates or replaces the rotation policy of a live credential. `false`: no live
    /// credential by that name.
    async fn put_rotation_policy(&self, policy: &RotationPolicyRow) -> Result<bool, StoreError>;

    async fn get_rotation_policy(&self, name: &str) -> Result<Option<RotationPolicyRow>, StoreError>;

    /// `false`: there was none.
    async fn delete_rotation_policy(&self, name: &str) -> Result<bool, StoreError>;

    /// Policies of live credentials whose `next_run_at` is at or before `now`, oldest first.
    async fn due_rotations(&self, now: Micros, limit: u32) -> Result<Vec<RotationPolicyRow>, StoreError>;

    /// Records a failed scheduled rotation and when to try again, if the slot is still
    /// `claim` (another daemon may have rotated meanwhile).
    async fn defer_rotation(
        &self,
        name: &str,
        claim: Micros,
        retry_at: Micros,
        error: &str,
    ) -> Result<bool, StoreError>;

    /// Marks `previous` versions whose grace period has ended `deprecated`; returns how many.
    async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError>;

    /// In one transaction: the active KEK becomes `retiring`, `kek` becomes active, and a
    /// re-wrap job is created. [`StoreError::JobRunning`] if one already runs;
    /// [`StoreError::Conflict`] if another daemon took the KEK id first, or the keyring's
    /// verifier is no longer `verifier` (the master key changed under the caller).
    async fn start_kek_rotation(&self, kek: &KekRow, verifier: &[u8], now: Micros) -> Result<JobRow, StoreError>;

    /// A job by id, or the newest one.
    async fn get_job(&self, id: Option<i64>) -> Result<Option<JobRow>, StoreError>;

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
    ) -> Result<Option<JobRow>, StoreError>;

    /// Replaces the keyring's KDF salt, parameters and verifier and every KEK's wrapping,
    /// atomically, if the stored verifier is still `old_verifier` and the KEKs are exactly
    /// those given. `false`: something changed meanwhile; nothing was written.
    async fn rekey(
        &self,
        keyring: &KeyringRow,
        old_verifier: &[u8],
        keks: &[(i64, Vec<u8>)],
    ) -> Result<bool, StoreError>;

    /// Appends audit events in one transaction.
    async fn insert_audit(&self, events: &[AuditRow]) -> Result<(), StoreError>;

    /// The newest `limit` audit events, newest first.
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

    /// Deletes at most `limit` audit events older than `before` (oldest first); returns
    /// how many went.
    async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError>;

    /// Marks a live token revoked. `false`: no live token has this hash.
    async fn revoke_token(&self, token_hash: &str, now: Micros) -> Result<bool, StoreError>;

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
    fn shutdown_and_connection_sqlstates_are_unavailable() {
        for code in ["08006", "08001", "57P01", "57P02", "57P03", "57014", "25006"] {
            assert!(sqlstate_is_unavailable(code), "{code}");
        }
        for code in ["23505", "40001", "42P01", "53300", "XX000"] {
            assert!(!sqlstate_is_unavailable(code), "{code}");
        }
        assert!(sqlstate_means_down("08006") && sqlstate_means_down("57P03"));
        assert!(!sqlstate_means_down("57P01"), "one terminated backend is not an outage by itself");
        assert_eq!(StoreError::Unavailable(sqlx::Error::PoolTimedOut).outage(), Some(Outage::Flaky), "a busy pool");
        assert_eq!(StoreError::Unavailable(sqlx::Error::PoolClosed).outage(), Some(Outage::Down));
        assert_eq!(StoreError::Timeout("x", std::time::Duration::ZERO).outage(), Some(Outage::Flaky));
        assert_eq!(StoreError::Conflict.outage(), None);
        assert_eq!(StoreError::Down.outage(), None, "a refused call tells nothing new");
    }

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub idle: usize,
}

/// What happened to a credential, as the change feed and `WatchCredentials` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Rotate,
    Delete,
    Undelete,
    DestroyVersion,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Rotate => "rotate",
            ChangeKind::Delete => "delete",
            ChangeKind::Undelete => "undelete",
            ChangeKind::DestroyVersion => "destroy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "put" => ChangeKind::Put,
            "rotate" => ChangeKind::Rotate,
            "delete" => ChangeKind::Delete,
            "undelete" => ChangeKind::Undelete,
            "destroy" => ChangeKind::DestroyVersion,
            _ => return None,
        })
    }
}

/// One change to one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub name: String,
    pub kind: ChangeKind,
    /// The version written, deleted at, or destroyed.
    pub version: u64,
    pub at: Micros,
}

/// What the change feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Another daemon changed this credential.
    Credential(ChangeEvent),
    /// The token table changed in ways not named one by one: reload all of it.
    Tokens,
    /// A token was created or revoked (its hash): refresh that one entry.
    Token(String),
    /// Another daemon changed the KEKs or the master key's wrapping of them.
    Keys,
    /// The feed's connection dropped: from now on notifications may be missed, so what
    /// is cached can no longer be trusted (but may still be served within
    /// `cache.serve_stale_seconds` while the store is down).
    Lost,
    /// The feed is subscribed (again): notifications sent while it was away are gone, so
    /// everything cached must be revalidated before it is trusted.
    Resync,
}

/// Stands for "the token table changed" on the change feed; no credential name can
/// contain `#`.
pub const TOKENS_CHANGED: &str = "#tokens";
/// Stands for "the KEK table changed".
pub const KEYS_CHANGED: &str = "#keys";

/// The change feed's message for a credential change: `kind TAB version TAB at TAB name`.
pub(crate) fn encode_change(e: &ChangeEvent) -> String {
    format!("{}\t{}\t{}\t{}", e.kind.as_str(), e.version, e.at, e.name)
}

/// The change feed's message for a change to a whole table ([`TOKENS_CHANGED`], [`KEYS_CHANGED`]).
pub(crate) fn encode_table_change(table: &str) -> String {
    format!("table\t0\t0\t{table}")
}

/// The change feed's message for one token created or revoked: names it by hash, so
/// other daemons refresh one entry instead of reloading every token.
pub(crate) fn encode_token_change(token_hash: &str) -> String {
    format!("token\t0\t0\t{token_hash}")
}

/// Reads a message made by [`encode_change`], [`encode_table_change`] or
/// [`encode_token_change`].
pub(crate) fn decode_change(payload: &str) -> Option<Change> {
    let mut parts = payload.splitn(4, '\t');
    let (kind, version, at, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind == "token" {
        let hex = name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        return hex.then(|| Change::Token(name.to_owned()));
    }
    if kind == "table" {
        return match name {
            TOKENS_CHANGED => Some(Change::Tokens),
            KEYS_CHANGED => Some(Change::Keys),
            _ => None,
        };
    }
    Some(Change::Credential(ChangeEvent {
        name: name.to_owned(),
        kind: ChangeKind::parse(kind)?,
        version: version.parse().ok()?,
        at: at.parse().ok()?,
    }))
}

pub type ChangeSink = std::sync::Arc<dyn Fn(Change) + Send + Sync>;
