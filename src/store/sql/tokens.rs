//! API tokens ([`TokenStore`]), by the SHA-256 of the token.

use async_trait::async_trait;
use sqlx::Executor;

use super::{get, Affected as _, Bind, Conn, Db, Fields, SqlBackend};
use crate::store::{encode_token_change, Micros, StoreError, TokenRecord, TokenStore};

#[async_trait]
impl<B> TokenStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Bind<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> String: Bind<'q, Db<B>>,
{
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let mut tx = self.pool().begin().await?;
        sqlx::query(
            "INSERT INTO tokens (token_hash, display_name, policies, created_at, expires_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.token_hash)
        .bind(&t.display_name)
        .bind(&t.policies)
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .execute(&mut *tx)
        .await?;
        self.notify(&mut tx, &encode_token_change(&t.token_hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn insert_first_token(&self, t: &TokenRecord) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        if let Some(lock) = Self::FIRST_TOKEN_LOCK {
            sqlx::query(lock).execute(&mut *tx).await?;
        }
        let inserted = sqlx::query(
            "INSERT INTO tokens (token_hash, display_name, policies, created_at, expires_at, revoked_at) \
             SELECT CAST($1 AS TEXT), CAST($2 AS TEXT), CAST($3 AS TEXT), CAST($4 AS BIGINT), \
             CAST($5 AS BIGINT), CAST($6 AS BIGINT) WHERE NOT EXISTS (SELECT 1 FROM tokens)",
        )
        .bind(&t.token_hash)
        .bind(&t.display_name)
        .bind(&t.policies)
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(t.revoked_at)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !inserted {
            tx.rollback().await?;
            return Ok(false);
        }
        self.notify(&mut tx, &encode_token_change(&t.token_hash)).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at").fetch_all(self.pool()).await?;
        rows.iter().map(token).collect()
    }

    async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(token).transpose()
    }

    async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRecord>, StoreError> {
        if prefix.is_empty() || !prefix.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(StoreError::Corrupt("a token hash prefix is lowercase hex".into()));
        }
        // Every hash starting with `prefix` sorts in [prefix, prefix + "g"): 'g'
        // follows every hex digit in byte order.
        let rows = sqlx::query(Self::LIVE_TOKEN_RANGE)
            .bind(prefix)
            .bind(format!("{prefix}g"))
            .bind(i64::from(limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(token).collect()
    }

    async fn revoke_token(&self, token_hash: &str, now: Micros) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let n = sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL")
            .bind(token_hash)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if n > 0 {
            self.notify(&mut tx, &encode_token_change(token_hash)).await?;
        }
        tx.commit().await?;
        Ok(n > 0)
    }
}

fn token(row: &impl Fields) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        token_hash: get(row, "token_hash")?,
        display_name: get(row, "display_name")?,
        policies: get(row, "policies")?,
        created_at: get(row, "created_at")?,
        expires_at: get(row, "expires_at")?,
        revoked_at: get(row, "revoked_at")?,
    })
}
