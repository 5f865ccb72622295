//! Rotation health ([`StalenessStore`]): the counts behind the staleness gauges and the
//! filtered listing scan.
//!
//! Each count walks one index range (`rotation_policies_due`, `credentials_expiry`,
//! `credential_versions_current_age`) and stops after `cap` entries, so a pass's work is
//! bounded whatever the number of credentials.

use async_trait::async_trait;
use sqlx::{ColumnIndex, Executor};

use super::credentials::credential;
use super::{from_db, get, Bind, Conn, Db, DbRow, Scalar, SqlBackend, CRED_COLS};
use crate::store::{CredentialHead, ListFilter, ListQuery, Staleness, StalenessQuery, StalenessStore, StoreError};

const OVERDUE: &str = "SELECT COUNT(*) FROM (SELECT 1 AS one FROM rotation_policies p \
     JOIN credentials c ON c.name = p.name \
     WHERE p.next_run_at IS NOT NULL AND p.next_run_at <= $1 AND c.deleted_at IS NULL LIMIT $2) t";

const EXPIRED: &str = "SELECT COUNT(*) FROM (SELECT 1 AS one FROM credentials \
     WHERE expires_at IS NOT NULL AND expires_at <= $1 AND deleted_at IS NULL LIMIT $2) t";

const EXPIRING: &str = "SELECT COUNT(*) FROM (SELECT 1 AS one FROM credentials \
     WHERE expires_at IS NOT NULL AND expires_at > $1 AND expires_at <= $2 AND deleted_at IS NULL LIMIT $3) t";

/// Walks current versions oldest first; deleted credentials' versions are skipped.
const OLDEST: &str = "SELECT v.created_at FROM credential_versions v JOIN credentials c ON c.name = v.name \
     WHERE v.state = 'current' AND c.deleted_at IS NULL ORDER BY v.created_at LIMIT 1";

#[async_trait]
impl<B> StalenessStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> bool: Bind<'q, Db<B>>,
{
    async fn staleness(&self, q: &StalenessQuery) -> Result<Staleness, StoreError> {
        let cap = i64::from(q.cap);
        let pool = self.pool();
        let overdue: i64 = sqlx::query_scalar(OVERDUE).bind(q.overdue_before).bind(cap).fetch_one(pool).await?;
        let expired: i64 = sqlx::query_scalar(EXPIRED).bind(q.now).bind(cap).fetch_one(pool).await?;
        let expiring: i64 =
            sqlx::query_scalar(EXPIRING).bind(q.now).bind(q.expiring_before).bind(cap).fetch_one(pool).await?;
        let oldest_current_at: Option<i64> = sqlx::query_scalar(OLDEST).fetch_optional(pool).await?;
        Ok(Staleness {
            overdue: from_db(overdue, "count")?,
            expired: from_db(expired, "count")?,
            expiring: from_db(expiring, "count")?,
            oldest_current_at,
        })
    }

    async fn list_filtered(
        &self,
        q: &ListQuery<'_>,
        f: &ListFilter,
    ) -> Result<Vec<(CredentialHead, bool)>, StoreError> {
        // The same range scan as `list_credentials`; each filter is a primary-key probe
        // per row, and a row that fails it still comes back (unmatched), so the caller
        // counts it against its budget.
        let stmt = format!(
            "SELECT {}, CASE WHEN \
             (CAST($5 AS BIGINT) IS NULL OR EXISTS (SELECT 1 FROM credential_versions v \
               WHERE v.name = c.name AND v.version = c.current_version AND v.created_at < $5)) \
             AND (CAST($6 AS BIGINT) IS NULL OR EXISTS (SELECT 1 FROM rotation_policies p \
               WHERE p.name = c.name AND p.next_run_at IS NOT NULL AND p.next_run_at <= $6)) \
             THEN CAST(1 AS BIGINT) ELSE CAST(0 AS BIGINT) END AS matched \
             FROM credentials c WHERE c.name >= $1 AND c.name < $2 \
             AND ($3 OR c.deleted_at IS NULL) ORDER BY c.name LIMIT $4",
            CRED_COLS
        );
        let rows = sqlx::query(&stmt)
            .bind(q.start)
            .bind(q.end)
            .bind(q.include_deleted)
            .bind(i64::from(q.limit))
            .bind(f.current_before)
            .bind(f.overdue_before)
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|row| {
                let matched: i64 = get(row, "matched")?;
                Ok((credential(row)?, matched != 0))
            })
            .collect()
    }
}
