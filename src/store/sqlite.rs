//! SQLite backend: the zero-setup default, one file beside the daemon.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

use super::sql::{self, SqlBackend};
use super::{AuditRow, Backend, ChangeSink, PoolStats, Rewrapped, Store, StoreError};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/sqlite/0001_init.sql")),
    (2, "audit", include_str!("../../migrations/sqlite/0002_audit.sql")),
    (3, "rotation", include_str!("../../migrations/sqlite/0003_rotation.sql")),
    (4, "audit fold", include_str!("../../migrations/sqlite/0004_audit_fold.sql")),
    (5, "token prefix", include_str!("../../migrations/sqlite/0005_token_prefix.sql")),
    (6, "idempotency", include_str!("../../migrations/sqlite/0006_idempotency.sql")),
    (7, "metadata version", include_str!("../../migrations/sqlite/0007_metadata.sql")),
    (8, "identities", include_str!("../../migrations/sqlite/0008_identities.sql")),
    (9, "staleness", include_str!("../../migrations/sqlite/0009_staleness.sql")),
    (10, "batch_idempotency", include_str!("../../migrations/sqlite/0010_batch_idempotency.sql")),
];

#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Pool size unless configured. SQLite runs one writer at a time and a read past the
    /// daemon's cache takes tens of microseconds, while every connection is a thread with
    /// its own page cache and allocator arena: a few connections serve two cores.
    pub const DEFAULT_POOL: u32 = 4;
    /// SQLite's page cache, shared out among the pool's connections. The daemon's own
    /// cache sits in front of it and the file's pages stay in the OS page cache, so a
    /// larger one buys little and costs resident memory on every connection.
    const PAGE_CACHE_KIB: u32 = 4 * 1024;

    /// Opens (creating if needed) the database file and applies migrations.
    pub async fn open(path: &Path, max_connections: u32) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(StoreError::Unavailable)?
            .filename(path)
            .create_if_missing(true)
            .foreign_keys(true)
            // WAL lets readers run beside the single writer; NORMAL is durable in WAL mode
            // except for the last transactions before a power loss.
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // Negative: a size in KiB.
            .pragma("cache_size", format!("-{}", (Self::PAGE_CACHE_KIB / max_connections.max(1)).max(256)));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        sql::migrator(MIGRATIONS).run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }
}

#[async_trait]
impl SqlBackend for SqliteStore {
    type DB = Sqlite;

    const ACTIVE_KEK_CHECK: &'static str = "SELECT state FROM keks WHERE id = $1";
    /// SQLite runs one write statement at a time: the insert's own check is enough.
    const FIRST_TOKEN_LOCK: Option<&'static str> = None;
    /// A no-op update: it takes the write lock.
    const LOCK_ACTIVE_KEK: &'static str = "UPDATE keks SET state = state WHERE state = 'active' RETURNING id";
    /// SQLite compares text bytewise.
    const LIVE_TOKEN_RANGE: &'static str = "SELECT * FROM tokens WHERE token_hash >= $1 AND token_hash < $2 \
         AND revoked_at IS NULL ORDER BY token_hash LIMIT $3";

    fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// One process owns an SQLite file, so there is nobody to notify.
    async fn notify(&self, _tx: &mut Tx<'_>, _message: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// SQLite has no array type: the names travel as one JSON array parameter.
    async fn current_many(&self, names: &[String]) -> Result<Vec<SqliteRow>, StoreError> {
        let list = serde_json::to_string(names).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let q = format!(
            "SELECT {}, {} FROM credentials c JOIN credential_versions v \
             ON v.name = c.name AND v.version = c.current_version \
             WHERE c.name IN (SELECT value FROM json_each($1))",
            sql::CRED_COLS,
            sql::VERSION_COLS
        );
        Ok(sqlx::query(&q).bind(list).fetch_all(&self.pool).await?)
    }

    /// The rows travel as one JSON parameter, keys hex-encoded.
    async fn apply_rewrap(&self, tx: &mut Tx<'_>, new_kek: i64, rows: &[Rewrapped]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "n": r.old.name,
                    "v": sql::to_db(r.old.version),
                    "k": r.old.kek_id,
                    "o": hex::encode(&r.old.wrapped_dek),
                    "w": hex::encode(&r.wrapped_dek),
                })
            })
            .collect();
        let json = serde_json::to_string(&list).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let n = sqlx::query(
            "UPDATE credential_versions SET kek_id = $1, wrapped_dek = unhex(j.value ->> '$.w') \
             FROM json_each($2) AS j \
             WHERE credential_versions.name = j.value ->> '$.n' \
             AND credential_versions.version = j.value ->> '$.v' \
             AND credential_versions.kek_id = j.value ->> '$.k' \
             AND credential_versions.wrapped_dek = unhex(j.value ->> '$.o')",
        )
        .bind(new_kek)
        .bind(json)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// The batch as multi-row `INSERT`s of fixed sizes ([`AUDIT_CHUNKS`] rows), the
    /// fields bound as parameters (borrowed, not copied or encoded): a few statement
    /// shapes, each prepared once per connection, and one transaction for the batch.
    async fn insert_audit_batch(&self, events: &[AuditRow]) -> Result<(), StoreError> {
        let statements = audit_statements();
        let plan = audit_plan(events.len());
        if let [(shape, _)] = plan.as_slice() {
            // One statement: its own implicit transaction is the batch's.
            return insert_audit_rows(&self.pool, &statements[*shape], events).await;
        }
        let mut tx = self.pool.begin().await?;
        let mut rest = events;
        for (shape, rows) in plan {
            let (chunk, tail) = rest.split_at(rows);
            insert_audit_rows(&mut *tx, &statements[shape], chunk).await?;
            rest = tail;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Rows per audit `INSERT` statement, largest first: 12 parameters a row, so the largest
/// binds 1,536 (SQLite allows 32,766). A batch of n rows takes at most
/// n / 128 + 3 + 3 + 7 statements.
const AUDIT_CHUNKS: [usize; 4] = [128, 32, 8, 1];

/// `INSERT INTO audit_log (...) VALUES (...), (...)` for each of [`AUDIT_CHUNKS`].
fn audit_statements() -> &'static [String; AUDIT_CHUNKS.len()] {
    static STATEMENTS: std::sync::OnceLock<[String; AUDIT_CHUNKS.len()]> = std::sync::OnceLock::new();
    STATEMENTS.get_or_init(|| {
        AUDIT_CHUNKS.map(|rows| {
            let values: Vec<String> = (0..rows)
                .map(|r| {
                    let params: Vec<String> = (1..=12).map(|c| format!("${}", r * 12 + c)).collect();
                    format!("({})", params.join(", "))
                })
                .collect();
            format!("INSERT INTO audit_log ({}) VALUES {}", sql::AUDIT_COLS, values.join(", "))
        })
    })
}

/// How a batch of `n` rows is cut: (index into [`AUDIT_CHUNKS`], rows) per statement.
fn audit_plan(mut n: usize) -> Vec<(usize, usize)> {
    let mut plan = Vec::new();
    for (shape, &rows) in AUDIT_CHUNKS.iter().enumerate() {
        while n >= rows {
            plan.push((shape, rows));
            n -= rows;
        }
    }
    plan
}

/// One multi-row insert; `statement` has exactly `rows.len()` rows of placeholders.
async fn insert_audit_rows<'e, E>(executor: E, statement: &str, rows: &[AuditRow]) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let mut q = sqlx::query(statement);
    for e in rows {
        q = q
            .bind(e.at)
            .bind(e.request_id.as_str())
            .bind(e.token_id.as_str())
            .bind(e.token_name.as_str())
            .bind(e.rpc.as_str())
            .bind(e.credential.as_deref())
            .bind(e.version.map(sql::to_db))
            .bind(e.code.as_str())
            .bind(sql::to_db(e.latency_us))
            .bind(e.peer.as_str())
            .bind(sql::to_db(e.count))
            .bind(e.last_at);
    }
    q.execute(executor).await?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // `reach` keeps the default, a ping: the file is local, so reaching it is a query
    // through the pool.

    fn pool_stats(&self) -> PoolStats {
        PoolStats { size: self.pool.size(), idle: self.pool.num_idle() }
    }

    /// Nobody else writes this file: there is nothing to watch.
    async fn watch_changes(
        &self,
        _sink: ChangeSink,
        _shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

type Tx<'a> = Transaction<'a, Sqlite>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_batches_are_cut_into_fixed_shapes_that_add_up() {
        assert!(audit_plan(0).is_empty());
        assert_eq!(audit_plan(1), [(3, 1)]);
        assert_eq!(audit_plan(128), [(0, 128)]);
        assert_eq!(audit_plan(171), [(0, 128), (1, 32), (2, 8), (3, 1), (3, 1), (3, 1)]);
        for n in 0..700 {
            let plan = audit_plan(n);
            assert_eq!(plan.iter().map(|p| p.1).sum::<usize>(), n);
            assert!(plan.iter().all(|&(shape, rows)| AUDIT_CHUNKS[shape] == rows));
            assert!(plan.len() <= n / 128 + 13, "{n}: {plan:?}");
        }
        let statements = audit_statements();
        for (sql, rows) in statements.iter().zip(AUDIT_CHUNKS) {
            assert_eq!(sql.matches('(').count(), rows + 1, "{sql}");
            assert!(sql.contains(&format!("${})", rows * 12)) && !sql.contains(&format!("${}", rows * 12 + 1)));
        }
    }
}
