//! Storage: one trait, [`Store`], with a PostgreSQL and an SQLite implementation.
//!
//! **Invariant:** the store never sees plaintext or unwrapped keys; it moves sealed
//! bytes. Every write of a new version is one transaction whose first statement is the
//! compare-and-set on `credentials.current_version`, so concurrent writers serialize on
//! the row and a loser changes nothing.

mod instrumented;
mod postgres;
mod sql;
mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;

use crate::crypto::{KdfParams, Sealed};

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
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
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
    /// The version the write creates.
    pub fn next_version(self) -> u64 {
        match self {
            WriteBase::Create => 1,
            WriteBase::Update(v) | WriteBase::Revive(v) => v + 1,
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
}

/// A page of `ListCredentials`.
#[derive(Debug, Clone)]
pub struct ListQuery<'a> {
    pub prefix: &'a str,
    /// Names strictly after this one (the cursor).
    pub after: Option<&'a str>,
    pub limit: u32,
    pub include_deleted: bool,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    fn backend(&self) -> Backend;

    async fn ping(&self) -> Result<(), StoreError>;

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

    async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError>;

    /// Wipes one version's sealed bytes irreversibly. `None`: no such version; `Some(false)`:
    /// it was already destroyed.
    async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError>;

    /// Clears `deleted_at`. `false`: no deleted credential by that name.
    async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError>;

    /// Appends audit events in one transaction.
    async fn insert_audit(&self, events: &[AuditRow]) -> Result<(), StoreError>;

    /// The newest `limit` audit events, newest first.
    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError>;

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub size: u32,
    pub idle: usize,
}

/// What the change feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Another daemon wrote or deleted this credential.
    Credential(String),
    /// Another daemon created or revoked a token.
    Tokens,
    /// Notifications may have been missed (the feed's connection dropped and was
    /// re-established): everything cached may be stale.
    Resync,
}

/// Stands for "the token table changed" on the change feed; no credential name can
/// contain `#`.
pub const TOKENS_CHANGED: &str = "#tokens";

pub type ChangeSink = std::sync::Arc<dyn Fn(Change) + Send + Sync>;
