//! Credentials and their versions ([`CredentialStore`]): the read path, the
//! compare-and-set write, listing, soft delete, destroy, and the grace-period sweep.

use async_trait::async_trait;
use sqlx::{ColumnIndex, Executor};

use super::{
    from_db, get, labels_to_json, to_db, Affected as _, Bind, Conn, Db, DbRow, Fields, Scalar, SqlBackend, Tx,
};
use crate::crypto::Sealed;
use crate::store::{
    encode_change, now_micros, ChangeEvent, ChangeKind, CredentialHead, CredentialStore, ListQuery, Metadata, Micros,
    NewVersion, StoreError, VersionInfo, VersionRow, VersionState, WriteBase,
};

pub(crate) const CRED_COLS: &str =
    "c.name, c.current_version, c.labels, c.description, c.owner, c.expires_at, c.created_at, c.updated_at, c.deleted_at, \
     c.metadata_version";

/// The same columns, unqualified, for `RETURNING`.
pub(super) const CRED_COLS_BARE: &str =
    "name, current_version, labels, description, owner, expires_at, created_at, updated_at, deleted_at, \
     metadata_version";

pub(crate) const VERSION_COLS: &str = "v.version, v.state, v.kek_id, v.wrapped_dek, v.ciphertext, \
     v.created_at AS v_created_at, v.expires_at AS v_expires_at";

#[async_trait]
impl<B> CredentialStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> String: Scalar<'q, Db<B>>,
    for<'q> Vec<u8>: Bind<'q, Db<B>>,
    for<'q> bool: Bind<'q, Db<B>>,
{
    async fn get_credential(&self, name: &str) -> Result<Option<CredentialHead>, StoreError> {
        let q = format!("SELECT {} FROM credentials c WHERE c.name = $1", CRED_COLS);
        let row = sqlx::query(&q).bind(name).fetch_optional(self.pool()).await?;
        row.as_ref().map(credential).transpose()
    }

    async fn get_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<(CredentialHead, Option<VersionRow>)>, StoreError> {
        let q = format!(
            "SELECT {}, {} FROM credentials c LEFT JOIN credential_versions v \
             ON v.name = c.name AND v.version = COALESCE($2, c.current_version) WHERE c.name = $1",
            CRED_COLS, VERSION_COLS
        );
        let row = sqlx::query(&q).bind(name).bind(version.map(to_db)).fetch_optional(self.pool()).await?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some((credential(&row)?, joined_version(&row)?))),
        }
    }

    async fn get_current_many(&self, names: &[String]) -> Result<Vec<(CredentialHead, VersionRow)>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self.current_many(names).await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            if let Some(v) = joined_version(row)? {
                out.push((credential(row)?, v));
            }
        }
        Ok(out)
    }

    async fn list_versions(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT v.version, v.state, v.kek_id, v.created_at AS v_created_at, v.expires_at AS v_expires_at \
             FROM credential_versions v WHERE v.name = $1 ORDER BY v.version DESC",
        )
        .bind(name)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(version_info).collect()
    }

    async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialHead, StoreError> {
        let mut tx = self.pool().begin().await?;
        match write_version(self, &mut tx, new).await {
            Ok(head) => {
                tx.commit().await?;
                Ok(head)
            }
            Err(e) => {
                // Dropping the transaction would roll it back too; this says so.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    async fn delete_credential(&self, name: &str, expected: Option<u64>, now: Micros) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let at: Option<i64> = sqlx::query_scalar(
            "UPDATE credentials SET deleted_at = $2, updated_at = $2 WHERE name = $1 AND deleted_at IS NULL \
             AND (CAST($3 AS BIGINT) IS NULL OR current_version = $3) RETURNING current_version",
        )
        .bind(name)
        .bind(now)
        .bind(expected.map(to_db))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(v) = at {
            let kind = ChangeKind::Delete;
            notify_credential(self, &mut tx, name, kind, from_db(v, "version")?, now).await?;
        }
        tx.commit().await?;
        Ok(at.is_some())
    }

    async fn list_credentials(&self, q: &ListQuery<'_>) -> Result<Vec<CredentialHead>, StoreError> {
        // One lower and one upper bound on the name index, so either backend's
        // planner scans exactly the range.
        let stmt = format!(
            "SELECT {} FROM credentials c WHERE c.name >= $1 AND c.name < $2 \
             AND ($3 OR c.deleted_at IS NULL) ORDER BY c.name LIMIT $4",
            CRED_COLS
        );
        let rows = sqlx::query(&stmt)
            .bind(q.start)
            .bind(q.end)
            .bind(q.include_deleted)
            .bind(i64::from(q.limit))
            .fetch_all(self.pool())
            .await?;
        rows.iter().map(credential).collect()
    }

    async fn count_credentials(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE deleted_at IS NULL")
            .fetch_one(self.pool())
            .await?;
        from_db(n, "count")
    }

    async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError> {
        let mut tx = self.pool().begin().await?;
        let n = sqlx::query(
            "UPDATE credential_versions SET state = 'destroyed', ciphertext = NULL, wrapped_dek = $3 \
             WHERE name = $1 AND version = $2 AND state <> 'destroyed'",
        )
        .bind(name)
        .bind(to_db(version))
        .bind(Vec::<u8>::new())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            let kind = ChangeKind::DestroyVersion;
            notify_credential(self, &mut tx, name, kind, version, now_micros()).await?;
            tx.commit().await?;
            return Ok(Some(true));
        }
        let exists: Option<i64> =
            sqlx::query_scalar("SELECT version FROM credential_versions WHERE name = $1 AND version = $2")
                .bind(name)
                .bind(to_db(version))
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(exists.map(|_| false))
    }

    async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let at: Option<i64> = sqlx::query_scalar(
            "UPDATE credentials SET deleted_at = NULL, updated_at = $2 WHERE name = $1 \
             AND deleted_at IS NOT NULL RETURNING current_version",
        )
        .bind(name)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(v) = at {
            let kind = ChangeKind::Undelete;
            notify_credential(self, &mut tx, name, kind, from_db(v, "version")?, now).await?;
        }
        tx.commit().await?;
        Ok(at.is_some())
    }

    async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError> {
        let n = sqlx::query(
            "UPDATE credential_versions SET state = 'deprecated' \
             WHERE state = 'previous' AND expires_at IS NOT NULL AND expires_at <= $1",
        )
        .bind(now)
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }
}

/// A new version inside the caller's transaction (see `put_version`): the
/// compare-and-set, the KEK check, the version rows, pruning, the rotation policy and the
/// change notification. On an error the caller rolls the transaction back.
pub(super) async fn write_version<B>(
    store: &B,
    tx: &mut Tx<'_, B>,
    new: &NewVersion<'_>,
) -> Result<CredentialHead, StoreError>
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> String: Scalar<'q, Db<B>>,
    for<'q> Vec<u8>: Bind<'q, Db<B>>,
    for<'q> bool: Bind<'q, Db<B>>,
{
    let version = new.base.next_version();
    // The compare-and-set comes first: it takes the row lock (PostgreSQL) or the
    // write lock (SQLite) before anything is read, so the check and the write are
    // one atomic step.
    let matched = match new.base {
        WriteBase::Create => {
            let m = new.metadata.cloned().unwrap_or_default();
            let q = format!(
                "INSERT INTO credentials (name, current_version, labels, description, owner, \
                 expires_at, created_at, updated_at) VALUES ($1, 1, $2, $3, $4, $5, $6, $6) \
                 ON CONFLICT (name) DO NOTHING RETURNING {}",
                CRED_COLS_BARE
            );
            sqlx::query(&q)
                .bind(new.name)
                .bind(labels_to_json(&m))
                .bind(&m.description)
                .bind(&m.owner)
                .bind(m.expires_at)
                .bind(new.now)
                .fetch_optional(&mut **tx)
                .await?
        }
        WriteBase::Update(current) | WriteBase::Revive(current) => {
            let live = matches!(new.base, WriteBase::Update(_));
            let m = new.metadata;
            let q = format!(
                "UPDATE credentials SET current_version = $2, updated_at = $3, deleted_at = NULL, \
                 labels = CASE WHEN $4 THEN $5 ELSE labels END, \
                 description = CASE WHEN $4 THEN $6 ELSE description END, \
                 owner = CASE WHEN $4 THEN $7 ELSE owner END, \
                 expires_at = CASE WHEN $4 THEN $8 ELSE expires_at END, \
                 metadata_version = CASE WHEN $4 THEN metadata_version + 1 ELSE metadata_version END \
                 WHERE name = $1 AND current_version = $9 AND (deleted_at IS NULL) = $10 RETURNING {}",
                CRED_COLS_BARE
            );
            sqlx::query(&q)
                .bind(new.name)
                .bind(to_db(version))
                .bind(new.now)
                .bind(m.is_some())
                .bind(m.map(labels_to_json).unwrap_or_default())
                .bind(m.map(|m| m.description.clone()).unwrap_or_default())
                .bind(m.map(|m| m.owner.clone()).unwrap_or_default())
                .bind(m.and_then(|m| m.expires_at))
                .bind(to_db(current))
                .bind(live)
                .fetch_optional(&mut **tx)
                .await?
        }
    };
    let Some(head) = matched else {
        return Err(StoreError::Conflict);
    };
    let head = credential(&head)?;
    // The DEK must be wrapped by the active KEK. On PostgreSQL the KEK's row is
    // read FOR SHARE, so a KEK rotation waits for this write and every write after
    // it sees the new KEK: no DEK is ever left behind under a retiring KEK.
    let kek_state: Option<String> =
        sqlx::query_scalar(B::ACTIVE_KEK_CHECK).bind(new.sealed.kek_id).fetch_optional(&mut **tx).await?;
    if kek_state.as_deref() != Some("active") {
        return Err(StoreError::StaleKek(new.sealed.kek_id));
    }
    sqlx::query(
        "UPDATE credential_versions SET state = 'previous', expires_at = $2 \
         WHERE name = $1 AND state = 'current'",
    )
    .bind(new.name)
    .bind(new.previous_expires_at)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO credential_versions (name, version, state, kek_id, wrapped_dek, ciphertext, created_at) \
         VALUES ($1, $2, 'current', $3, $4, $5, $6)",
    )
    .bind(new.name)
    .bind(to_db(version))
    .bind(new.sealed.kek_id)
    .bind(&new.sealed.wrapped_dek)
    .bind(&new.sealed.ciphertext)
    .bind(new.now)
    .execute(&mut **tx)
    .await?;
    if let Some(oldest_kept) = version.checked_sub(new.max_versions) {
        sqlx::query("DELETE FROM credential_versions WHERE name = $1 AND version <= $2")
            .bind(new.name)
            .bind(to_db(oldest_kept))
            .execute(&mut **tx)
            .await?;
    }
    if let Some(p) = new.policy {
        let n = sqlx::query(
            "UPDATE rotation_policies SET next_run_at = $2, rotations = rotations + 1, \
             last_rotated_at = $3, last_error = NULL, updated_at = $3 \
             WHERE name = $1 AND (CAST($4 AS BIGINT) IS NULL OR next_run_at = $4)",
        )
        .bind(new.name)
        .bind(p.next_run_at)
        .bind(new.now)
        .bind(p.claim)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if n == 0 && p.claim.is_some() {
            // Another daemon rotated in this slot first.
            return Err(StoreError::Conflict);
        }
    }
    let event = ChangeEvent { name: new.name.to_owned(), kind: new.kind, version, at: new.now };
    store.notify(tx, &encode_change(&event)).await?;
    Ok(head)
}

pub(super) async fn notify_credential<B: SqlBackend>(
    store: &B,
    tx: &mut Tx<'_, B>,
    name: &str,
    kind: ChangeKind,
    version: u64,
    at: Micros,
) -> Result<(), StoreError> {
    let event = ChangeEvent { name: name.to_owned(), kind, version, at };
    store.notify(tx, &encode_change(&event)).await
}

pub(super) fn credential(row: &impl Fields) -> Result<CredentialHead, StoreError> {
    let labels: String = get(row, "labels")?;
    Ok(CredentialHead {
        name: get(row, "name")?,
        current_version: from_db(get(row, "current_version")?, "current_version")?,
        metadata_version: from_db(get(row, "metadata_version")?, "metadata_version")?,
        metadata: Metadata {
            labels: serde_json::from_str(&labels).map_err(|e| StoreError::Corrupt(format!("labels: {e}")))?,
            description: get(row, "description")?,
            owner: get(row, "owner")?,
            expires_at: get(row, "expires_at")?,
        },
        created_at: get(row, "created_at")?,
        updated_at: get(row, "updated_at")?,
        deleted_at: get(row, "deleted_at")?,
    })
}

fn version_info(row: &impl Fields) -> Result<VersionInfo, StoreError> {
    let state: String = get(row, "state")?;
    Ok(VersionInfo {
        version: from_db(get(row, "version")?, "version")?,
        state: VersionState::parse(&state)?,
        kek_id: get(row, "kek_id")?,
        created_at: get(row, "v_created_at")?,
        expires_at: get(row, "v_expires_at")?,
    })
}

/// A joined row's version, `None` when the LEFT JOIN found none.
fn joined_version(row: &impl Fields) -> Result<Option<VersionRow>, StoreError> {
    let version: Option<i64> = get(row, "version")?;
    if version.is_none() {
        return Ok(None);
    }
    let info = version_info(row)?;
    let ciphertext: Option<Vec<u8>> = get(row, "ciphertext")?;
    let sealed = match ciphertext {
        Some(ciphertext) if info.state != VersionState::Destroyed => {
            Some(Sealed { kek_id: info.kek_id, wrapped_dek: get(row, "wrapped_dek")?, ciphertext })
        }
        _ => None,
    };
    Ok(Some(VersionRow { info, sealed }))
}
