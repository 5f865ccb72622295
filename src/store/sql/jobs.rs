//! The KEK rotation job ([`JobStore`]): its start, its lease and its batches. The
//! batch itself is the backend's (`SqlBackend::apply_rewrap`).

use async_trait::async_trait;
use sqlx::{ColumnIndex, Executor};

use super::{from_db, get, to_db, Affected as _, Bind, Conn, Db, DbRow, Fields, Scalar, SqlBackend};
use crate::store::{
    encode_table_change, JobState, JobStore, KekRow, Micros, RewrapBatch, RewrapRow, RotationJob, StoreError,
    KEYS_CHANGED,
};

#[async_trait]
impl<B> JobStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<String>: Bind<'q, Db<B>>,
    for<'q> Vec<u8>: Scalar<'q, Db<B>>,
{
    async fn start_kek_rotation(&self, kek: &KekRow, verifier: &[u8], now: Micros) -> Result<RotationJob, StoreError> {
        let mut tx = self.pool().begin().await?;
        // Taking the active KEK's row first serializes concurrent rotations (and, on
        // PostgreSQL, waits for writes that hold it FOR SHARE).
        let active: Option<i64> = sqlx::query_scalar(Self::LOCK_ACTIVE_KEK).fetch_optional(&mut *tx).await?;
        let running: Option<i64> =
            sqlx::query_scalar("SELECT id FROM rotation_jobs WHERE state = 'running'").fetch_optional(&mut *tx).await?;
        if let Some(id) = running {
            tx.rollback().await?;
            return Err(StoreError::JobRunning(id));
        }
        let taken: Option<i64> =
            sqlx::query_scalar("SELECT id FROM keks WHERE id >= $1").bind(kek.id).fetch_optional(&mut *tx).await?;
        // The new KEK is wrapped by the caller's master key: it must still be the
        // database's (a rekey re-wraps every KEK while holding their rows).
        let stored: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT verifier FROM keyring WHERE id = 1").fetch_optional(&mut *tx).await?;
        if taken.is_some() || active.is_none() || stored.as_deref() != Some(verifier) {
            tx.rollback().await?;
            return Err(StoreError::Conflict);
        }
        sqlx::query("UPDATE keks SET state = 'retiring' WHERE state = 'active'").execute(&mut *tx).await?;
        sqlx::query("INSERT INTO keks (id, wrapped_key, state, created_at) VALUES ($1, $2, 'active', $3)")
            .bind(kek.id)
            .bind(&kek.wrapped_key)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credential_versions WHERE kek_id <> $1")
            .bind(kek.id)
            .fetch_one(&mut *tx)
            .await?;
        let row = sqlx::query(
            "INSERT INTO rotation_jobs (kind, state, new_kek_id, total, started_at, updated_at) \
             VALUES ('kek', 'running', $1, $2, $3, $3) RETURNING *",
        )
        .bind(kek.id)
        .bind(total)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        let job = job(&row)?;
        self.notify(&mut tx, &encode_table_change(KEYS_CHANGED)).await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn get_job(&self, id: Option<i64>) -> Result<Option<RotationJob>, StoreError> {
        let row = match id {
            Some(id) => sqlx::query("SELECT * FROM rotation_jobs WHERE id = $1").bind(id),
            None => sqlx::query("SELECT * FROM rotation_jobs ORDER BY id DESC LIMIT 1"),
        }
        .fetch_optional(self.pool())
        .await?;
        row.as_ref().map(job).transpose()
    }

    async fn claim_job(&self, id: i64, owner: &str, now: Micros, lease_until: Micros) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE rotation_jobs SET lease_owner = $2, lease_until = $4 WHERE id = $1 AND state = 'running' \
             AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until IS NULL OR lease_until < $3)",
        )
        .bind(id)
        .bind(owner)
        .bind(now)
        .bind(lease_until)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    async fn rewrap_candidates(
        &self,
        active: i64,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<RewrapRow>, StoreError> {
        let (after_name, after_version) = after.unwrap_or(("", 0));
        let rows = sqlx::query(
            // A row-value comparison, so both databases walk the primary key from
            // the cursor instead of scanning from the start on every batch.
            "SELECT name, version, kek_id, wrapped_dek FROM credential_versions \
             WHERE (name, version) > ($2, $3) AND kek_id <> $1 \
             ORDER BY name, version LIMIT $4",
        )
        .bind(active)
        .bind(after_name)
        .bind(to_db(after_version))
        .bind(i64::from(limit))
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(rewrap).collect()
    }

    async fn commit_rewrap(&self, b: &RewrapBatch<'_>) -> Result<Option<u64>, StoreError> {
        let mut tx = self.pool().begin().await?;
        // The data first (on SQLite this takes the write lock), then the job row:
        // without the lease the whole transaction rolls back.
        let changed = self.apply_rewrap(&mut tx, b.new_kek_id, b.rows).await?;
        let held = sqlx::query(
            "UPDATE rotation_jobs SET done = done + $3, failed = failed + $4, cursor_name = $5, \
             cursor_version = $6, updated_at = $7, lease_until = $8 \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
        )
        .bind(b.job_id)
        .bind(b.owner)
        .bind(to_db(changed))
        .bind(to_db(b.failed))
        .bind(b.cursor.0)
        .bind(to_db(b.cursor.1))
        .bind(b.now)
        .bind(b.lease_until)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if held == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        tx.commit().await?;
        Ok(Some(changed))
    }

    async fn finish_job(
        &self,
        id: i64,
        owner: &str,
        now: Micros,
        error: Option<&str>,
    ) -> Result<Option<RotationJob>, StoreError> {
        let mut tx = self.pool().begin().await?;
        // Versions destroyed while the job ran have no key left to re-wrap; they
        // only refer to their old KEK, which must not keep it from retiring.
        sqlx::query(
            "UPDATE credential_versions SET kek_id = (SELECT new_kek_id FROM rotation_jobs WHERE id = $1) \
             WHERE state = 'destroyed' AND kek_id IN (SELECT id FROM keks WHERE state = 'retiring')",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE keks SET state = 'retired' WHERE state = 'retiring' \
             AND NOT EXISTS (SELECT 1 FROM credential_versions v WHERE v.kek_id = keks.id)",
        )
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query(
            "UPDATE rotation_jobs SET state = $3, finished_at = $4, updated_at = $4, error = $5, \
             lease_owner = NULL, lease_until = NULL \
             WHERE id = $1 AND lease_owner = $2 AND state = 'running' RETURNING *",
        )
        .bind(id)
        .bind(owner)
        .bind(if error.is_some() { "failed" } else { "completed" })
        .bind(now)
        .bind(error.map(str::to_owned))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let job = job(&row)?;
        self.notify(&mut tx, &encode_table_change(KEYS_CHANGED)).await?;
        tx.commit().await?;
        Ok(Some(job))
    }
}

fn job(row: &impl Fields) -> Result<RotationJob, StoreError> {
    let state: String = get(row, "state")?;
    let cursor_name: Option<String> = get(row, "cursor_name")?;
    let cursor_version: Option<i64> = get(row, "cursor_version")?;
    let cursor = match (cursor_name, cursor_version) {
        (Some(n), Some(v)) => Some((n, from_db(v, "cursor_version")?)),
        _ => None,
    };
    Ok(RotationJob {
        id: get(row, "id")?,
        state: JobState::parse(&state)?,
        new_kek_id: get(row, "new_kek_id")?,
        total: from_db(get(row, "total")?, "total")?,
        done: from_db(get(row, "done")?, "done")?,
        failed: from_db(get(row, "failed")?, "failed")?,
        cursor,
        started_at: get(row, "started_at")?,
        updated_at: get(row, "updated_at")?,
        finished_at: get(row, "finished_at")?,
        error: get(row, "error")?,
        lease_owner: get(row, "lease_owner")?,
        lease_until: get(row, "lease_until")?,
    })
}

fn rewrap(row: &impl Fields) -> Result<RewrapRow, StoreError> {
    Ok(RewrapRow {
        name: get(row, "name")?,
        version: from_db(get(row, "version")?, "version")?,
        kek_id: get(row, "kek_id")?,
        wrapped_dek: get(row, "wrapped_dek")?,
    })
}
