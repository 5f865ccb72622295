//! The audit log ([`AuditStore`]). A batch is inserted by the backend
//! (`SqlBackend::insert_audit_batch`): PostgreSQL binds it as one array per column,
//! SQLite as multi-row `INSERT`s of a few fixed sizes in one transaction.

use async_trait::async_trait;
use sqlx::Executor;

use super::{from_db, get, Affected as _, Bind, Conn, Db, Fields, SqlBackend};
use crate::store::{AuditRow, AuditStore, Micros, StoreError};

/// The columns an audit insert fills, in the order both backends' statements list them.
pub(crate) const AUDIT_COLS: &str =
    "at, request_id, token_id, token_name, rpc, credential, version, code, latency_us, peer, count, last_at";

#[async_trait]
impl<B> AuditStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> i64: Bind<'q, Db<B>>,
{
    async fn insert_audit(&self, events: &[AuditRow]) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // A few prepared statements of fixed shape for any batch size, one transaction
        // (see the backends' `insert_audit_batch`).
        self.insert_audit_batch(events).await
    }

    async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(audit).collect()
    }

    async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        let n = sqlx::query(
            "DELETE FROM audit_log WHERE id IN \
             (SELECT id FROM audit_log WHERE at < $1 ORDER BY id LIMIT $2)",
        )
        .bind(before)
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }
}

fn audit(row: &impl Fields) -> Result<AuditRow, StoreError> {
    let version: Option<i64> = get(row, "version")?;
    Ok(AuditRow {
        at: get(row, "at")?,
        request_id: get(row, "request_id")?,
        token_id: get(row, "token_id")?,
        token_name: get(row, "token_name")?,
        rpc: get(row, "rpc")?,
        credential: get(row, "credential")?,
        version: version.map(|v| from_db(v, "version")).transpose()?,
        code: get(row, "code")?,
        latency_us: from_db(get(row, "latency_us")?, "latency")?,
        peer: get(row, "peer")?,
        count: from_db(get(row, "count")?, "count")?,
        last_at: get(row, "last_at")?,
    })
}
