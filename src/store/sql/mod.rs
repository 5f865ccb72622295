//! The SQL both backends share. PostgreSQL and SQLite accept the same `$N` statements
//! here, so each store trait is implemented once, in its aggregate's file, for every
//! [`SqlBackend`]; `postgres.rs` and `sqlite.rs` implement [`SqlBackend`] with what
//! differs (a few statements, the batched forms, `NOTIFY`).
//!
//! The implementations are generic over the backend, so each names in its `where`
//! clause what it needs of the driver: an executor for a connection, the types it binds
//! ([`Bind`]) and those it reads back alone with `query_scalar` ([`Scalar`]). What all of
//! them need (reading rows by column name, turning binds into arguments) is a bound on
//! [`SqlBackend::DB`], so it is implied everywhere and written once. The per-type bounds
//! cannot be gathered the same way: Rust implies a trait's supertraits, not the bounds of
//! its `where` clause on other types (`for<'q> &'q str: Bind<'q, Db<B>>`), so a "bundle"
//! trait would still need them restated at every impl. Each aggregate's impl therefore
//! repeats the few it uses.

use async_trait::async_trait;
use sqlx::{ColumnIndex, Database, Decode, Encode, IntoArguments, Pool, Transaction, Type};

use super::{AuditRow, Metadata, Rewrapped, StoreError};

mod audit;
mod credentials;
mod identities;
mod jobs;
mod keys;
mod policies;
mod staleness;
mod tokens;
mod writes;

pub(super) use audit::AUDIT_COLS;
pub(super) use credentials::{CRED_COLS, VERSION_COLS};

/// What a backend brings to the shared SQL.
#[async_trait]
pub(crate) trait SqlBackend: Send + Sync + 'static {
    /// The driver. Its rows read every column type our rows are made of, and its
    /// arguments are what its queries take.
    type DB: for<'q> Database<Row: Fields, Arguments<'q>: IntoArguments<'q, Self::DB>, QueryResult: Affected>;

    /// Reads the state of the KEK a write sealed under (see `put_version`).
    const ACTIVE_KEK_CHECK: &'static str;
    /// Serializes first-token inserts, where the insert's own check is not enough.
    const FIRST_TOKEN_LOCK: Option<&'static str>;
    /// Takes the active KEK's row for a KEK rotation (and the write lock, on SQLite).
    const LOCK_ACTIVE_KEK: &'static str;
    /// Live tokens whose hash lies in `[$1, $2)` in byte order, at most `$3` of them.
    const LIVE_TOKEN_RANGE: &'static str;

    fn pool(&self) -> &Pool<Self::DB>;

    /// Announces a change on the feed. Runs inside the write's transaction, so other
    /// daemons hear of it on commit only.
    async fn notify(&self, tx: &mut Tx<'_, Self>, message: &str) -> Result<(), StoreError>;

    /// The heads of `names` (never empty) joined with their current versions
    /// ([`CRED_COLS`], [`VERSION_COLS`]), in one statement whatever the count.
    async fn current_many(&self, names: &[String]) -> Result<Vec<DbRow<Self>>, StoreError>;

    /// Applies a re-wrap batch in one statement; each row changes only if it still holds
    /// the DEK the batch read. Returns how many rows changed.
    async fn apply_rewrap(&self, tx: &mut Tx<'_, Self>, new_kek: i64, rows: &[Rewrapped]) -> Result<u64, StoreError>;

    /// Inserts a non-empty batch of audit events ([`AUDIT_COLS`]) in one statement.
    async fn insert_audit_batch(&self, events: &[AuditRow]) -> Result<(), StoreError>;
}

pub(crate) type Db<B> = <B as SqlBackend>::DB;
pub(crate) type Tx<'t, B> = Transaction<'t, Db<B>>;
pub(crate) type DbRow<B> = <Db<B> as Database>::Row;
/// A connection of the backend; `&mut` one is what a transaction executes on.
pub(crate) type Conn<B> = <Db<B> as Database>::Connection;

/// A value the shared SQL binds as a parameter of a query that lives for `'q`. Bounds
/// say `for<'q> T: Bind<'q, _>`; a borrowed `&'q str` binds for its own lifetime only.
pub(crate) trait Bind<'q, DB: Database>: Encode<'q, DB> + Type<DB> + Send {}

impl<'q, DB: Database, T: Encode<'q, DB> + Type<DB> + Send> Bind<'q, DB> for T {}

/// A value the shared SQL binds and also reads back alone (`query_scalar`).
pub(crate) trait Scalar<'q, DB: Database>: Bind<'q, DB> + for<'r> Decode<'r, DB> + Unpin {}

impl<'q, DB: Database, T: Bind<'q, DB> + for<'r> Decode<'r, DB> + Unpin> Scalar<'q, DB> for T {}

/// What a statement reports back: how many rows it changed. sqlx has this on each
/// driver's result type, not on a trait.
pub(crate) trait Affected {
    fn rows_affected(&self) -> u64;
}

impl Affected for sqlx::postgres::PgQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::postgres::PgQueryResult::rows_affected(self)
    }
}

impl Affected for sqlx::sqlite::SqliteQueryResult {
    fn rows_affected(&self) -> u64 {
        sqlx::sqlite::SqliteQueryResult::rows_affected(self)
    }
}

/// Reads a column by name as a `T`; a value that does not decode is a corrupt row.
pub(crate) trait Field<T> {
    fn field(&self, column: &str) -> Result<T, StoreError>;
}

impl<R, T> Field<T> for R
where
    R: sqlx::Row,
    for<'a> &'a str: ColumnIndex<R>,
    T: for<'r> Decode<'r, R::Database> + Type<R::Database>,
{
    fn field(&self, column: &str) -> Result<T, StoreError> {
        self.try_get::<T, _>(column).map_err(|e| StoreError::Corrupt(format!("column {column}: {e}")))
    }
}

/// A row that reads every column type the store's rows are made of.
pub(crate) trait Fields:
    Field<i64> + Field<Option<i64>> + Field<String> + Field<Option<String>> + Field<Vec<u8>> + Field<Option<Vec<u8>>>
{
}

impl<R> Fields for R where
    R: Field<i64>
        + Field<Option<i64>>
        + Field<String>
        + Field<Option<String>>
        + Field<Vec<u8>>
        + Field<Option<Vec<u8>>>
{
}

/// A column of `row`, typed by where it goes.
fn get<T>(row: &impl Field<T>, column: &str) -> Result<T, StoreError> {
    row.field(column)
}

/// Versions and counts are stored as BIGINT.
pub(super) fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn from_db(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

fn labels_to_json(m: &Metadata) -> String {
    serde_json::to_string(&m.labels).unwrap_or_else(|_| "{}".to_owned())
}

/// Builds a migrator from SQL files embedded at compile time.
pub(super) fn migrator(files: &[(i64, &'static str, &'static str)]) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    use std::borrow::Cow;
    let migrations = files
        .iter()
        .map(|(version, desc, sql)| {
            Migration::new(*version, Cow::Borrowed(*desc), MigrationType::Simple, Cow::Borrowed(*sql), false)
        })
        .collect::<Vec<_>>();
    Migrator { migrations: Cow::Owned(migrations), ..Migrator::DEFAULT }
}
