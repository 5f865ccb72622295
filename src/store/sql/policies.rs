//! Rotation policies ([`PolicyStore`]) and the scheduler's view of them.

use async_trait::async_trait;
use sqlx::Executor;

use super::{from_db, get, Affected as _, Bind, Conn, Db, Fields, SqlBackend};
use crate::store::{Micros, PolicyKind, PolicyStore, RotationPolicy, StoreError};

#[async_trait]
impl<B> PolicyStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Bind<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> String: Bind<'q, Db<B>>,
{
    async fn put_rotation_policy(&self, p: &RotationPolicy) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "INSERT INTO rotation_policies (name, kind, interval_us, validity_us, at_us, generator, grace_us, \
             next_run_at, rotations, updated_at) \
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, 0, $9 \
             WHERE EXISTS (SELECT 1 FROM credentials WHERE name = $1 AND deleted_at IS NULL) \
             ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, interval_us = excluded.interval_us, \
             validity_us = excluded.validity_us, at_us = excluded.at_us, generator = excluded.generator, \
             grace_us = excluded.grace_us, next_run_at = excluded.next_run_at, last_error = NULL, \
             updated_at = excluded.updated_at",
        )
        .bind(&p.name)
        .bind(p.kind.as_str())
        .bind(p.interval_us)
        .bind(p.validity_us)
        .bind(p.at)
        .bind(&p.generator)
        .bind(p.grace_us)
        .bind(p.next_run_at)
        .bind(p.updated_at)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn get_rotation_policy(&self, name: &str) -> Result<Option<RotationPolicy>, StoreError> {
        let row = sqlx::query("SELECT * FROM rotation_policies WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(policy).transpose()
    }

    async fn delete_rotation_policy(&self, name: &str) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM rotation_policies WHERE name = $1")
            .bind(name)
            .execute(self.pool())
            .await?
            .rows_affected();
        Ok(n > 0)
    }

    async fn due_rotations(&self, now: Micros, limit: u32) -> Result<Vec<RotationPolicy>, StoreError> {
        let rows = sqlx::query(
            "SELECT p.* FROM rotation_policies p JOIN credentials c ON c.name = p.name \
             WHERE p.next_run_at IS NOT NULL AND p.next_run_at <= $1 AND c.deleted_at IS NULL \
             ORDER BY p.next_run_at LIMIT $2",
        )
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(policy).collect()
    }

    async fn defer_rotation(
        &self,
        name: &str,
        claim: Micros,
        retry_at: Micros,
        error: &str,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE rotation_policies SET next_run_at = $3, last_error = $4 \
             WHERE name = $1 AND next_run_at = $2",
        )
        .bind(name)
        .bind(claim)
        .bind(retry_at)
        .bind(error)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n > 0)
    }
}

fn policy(row: &impl Fields) -> Result<RotationPolicy, StoreError> {
    let kind: String = get(row, "kind")?;
    Ok(RotationPolicy {
        name: get(row, "name")?,
        kind: PolicyKind::parse(&kind)?,
        interval_us: get(row, "interval_us")?,
        validity_us: get(row, "validity_us")?,
        at: get(row, "at_us")?,
        generator: get(row, "generator")?,
        grace_us: get(row, "grace_us")?,
        next_run_at: get(row, "next_run_at")?,
        rotations: from_db(get(row, "rotations")?, "rotations")?,
        last_rotated_at: get(row, "last_rotated_at")?,
        last_error: get(row, "last_error")?,
        updated_at: get(row, "updated_at")?,
    })
}
