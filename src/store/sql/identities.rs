//! Workload identities bound to policies ([`IdentityStore`]). Every change announces
//! itself as a token-table change (`#tokens`), so each daemon's token reload, which
//! reads the bindings too, picks it up within the feed's latency.

use async_trait::async_trait;
use sqlx::Executor;

use super::{get, Affected as _, Bind, Conn, Db, Fields, SqlBackend};
use crate::store::{encode_table_change, IdentityRecord, IdentityStore, StoreError, TOKENS_CHANGED};

#[async_trait]
impl<B> IdentityStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Bind<'q, Db<B>>,
{
    async fn insert_identity(&self, r: &IdentityRecord) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let n = sqlx::query(
            "INSERT INTO identities (identity, policies, created_at) VALUES ($1, $2, $3) \
             ON CONFLICT (identity) DO NOTHING",
        )
        .bind(r.identity.as_str())
        .bind(r.policies.as_str())
        .bind(r.created_at)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        self.notify(&mut tx, &encode_table_change(TOKENS_CHANGED)).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        let rows = sqlx::query("SELECT identity, policies, created_at FROM identities ORDER BY identity")
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(identity).collect()
    }

    async fn delete_identity(&self, name: &str) -> Result<Option<IdentityRecord>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let row = sqlx::query("DELETE FROM identities WHERE identity = $1 RETURNING identity, policies, created_at")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        self.notify(&mut tx, &encode_table_change(TOKENS_CHANGED)).await?;
        tx.commit().await?;
        identity(&row).map(Some)
    }
}

fn identity(row: &impl Fields) -> Result<IdentityRecord, StoreError> {
    Ok(IdentityRecord {
        identity: get(row, "identity")?,
        policies: get(row, "policies")?,
        created_at: get(row, "created_at")?,
    })
}
