//! SQL shared by both backends (PostgreSQL and SQLite accept the same `$N` statements
//! here), generic row decoding, and [`impl_sql_store!`], which expands the one
//! [`Store`](super::Store) implementation for each backend's pool type.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    AuditRow, CredentialRow, JobRow, JobState, KekRow, KekState, KeyringRow, MasterKeySource, Metadata, PolicyKind,
    RewrapRow, RotationPolicyRow, StoreError, TokenRow, VersionInfo, VersionRow, VersionState,
};
use crate::crypto::{KdfParams, Sealed};

pub(super) const CRED_COLS: &str =
    "c.name, c.current_version, c.labels, c.description, c.owner, c.expires_at, c.created_at, c.updated_at, c.deleted_at";

/// The same columns, unqualified, for `RETURNING`.
pub(super) const CRED_COLS_BARE: &str =
    "name, current_version, labels, description, owner, expires_at, created_at, updated_at, deleted_at";

pub(super) const VERSION_COLS: &str = "v.version, v.state, v.kek_id, v.wrapped_dek, v.ciphertext, \
     v.created_at AS v_created_at, v.expires_at AS v_expires_at";

/// Versions and counts are stored as BIGINT.
pub(super) fn to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn from_db(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative {what}: {v}")))
}

pub(super) fn labels_to_json(m: &Metadata) -> String {
    serde_json::to_string(&m.labels).unwrap_or_else(|_| "{}".to_owned())
}

fn get<'r, R, T>(row: &'r R, col: &str) -> Result<T, StoreError>
where
    R: Row,
    for<'a> &'a str: ColumnIndex<R>,
    T: Decode<'r, R::Database> + Type<R::Database>,
{
    row.try_get::<T, _>(col).map_err(|e| StoreError::Corrupt(format!("column {col}: {e}")))
}

macro_rules! decoders {
    ($($(#[$m:meta])* $vis:vis fn $fn:ident($row:ident) -> $ret:ty $body:block)*) => {$(
        $(#[$m])* $vis fn $fn<R>($row: &R) -> Result<$ret, StoreError>
        where
            R: Row,
            for<'a> &'a str: ColumnIndex<R>,
            for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
            for<'r> Option<i64>: Decode<'r, R::Database> + Type<R::Database>,
            for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
            for<'r> Option<String>: Decode<'r, R::Database> + Type<R::Database>,
            for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
            for<'r> Option<Vec<u8>>: Decode<'r, R::Database> + Type<R::Database>,
        $body
    )*};
}

decoders! {
    pub(super) fn credential(row) -> CredentialRow {
        let labels: String = get(row, "labels")?;
        Ok(CredentialRow {
            name: get(row, "name")?,
            current_version: from_db(get(row, "current_version")?, "current_version")?,
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

    pub(super) fn version_info(row) -> VersionInfo {
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
    pub(super) fn joined_version(row) -> Option<VersionRow> {
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

    pub(super) fn keyring(row) -> KeyringRow {
        let source: String = get(row, "source")?;
        let source = match source.as_str() {
            "passphrase" => MasterKeySource::Passphrase,
            "key-file" => MasterKeySource::KeyFile,
            other => return Err(StoreError::Corrupt(format!("unknown key source {other:?}"))),
        };
        let salt: Option<Vec<u8>> = get(row, "kdf_salt")?;
        let costs: [Option<i64>; 3] = [get(row, "kdf_m_cost")?, get(row, "kdf_t_cost")?, get(row, "kdf_p_cost")?];
        let kdf = match (salt, costs) {
            (Some(salt), [Some(m), Some(t), Some(p)]) => {
                let c = |v: i64| u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("kdf cost {v}")));
                Some((salt, KdfParams { m_cost: c(m)?, t_cost: c(t)?, p_cost: c(p)? }))
            }
            _ => None,
        };
        Ok(KeyringRow { source, kdf, verifier: get(row, "verifier")?, created_at: get(row, "created_at")? })
    }

    pub(super) fn kek(row) -> KekRow {
        let state: String = get(row, "state")?;
        Ok(KekRow {
            id: get(row, "id")?,
            wrapped_key: get(row, "wrapped_key")?,
            state: KekState::parse(&state)?,
            created_at: get(row, "created_at")?,
        })
    }

    pub(super) fn audit(row) -> AuditRow {
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

    pub(super) fn policy(row) -> RotationPolicyRow {
        let kind: String = get(row, "kind")?;
        Ok(RotationPolicyRow {
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

    pub(super) fn job(row) -> JobRow {
        let state: String = get(row, "state")?;
        let cursor_name: Option<String> = get(row, "cursor_name")?;
        let cursor_version: Option<i64> = get(row, "cursor_version")?;
        let cursor = match (cursor_name, cursor_version) {
            (Some(n), Some(v)) => Some((n, from_db(v, "cursor_version")?)),
            _ => None,
        };
        Ok(JobRow {
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

    pub(super) fn rewrap(row) -> RewrapRow {
        Ok(RewrapRow {
            name: get(row, "name")?,
            version: from_db(get(row, "version")?, "version")?,
            kek_id: get(row, "kek_id")?,
            wrapped_dek: get(row, "wrapped_dek")?,
        })
    }

    pub(super) fn token(row) -> TokenRow {
        Ok(TokenRow {
            token_hash: get(row, "token_hash")?,
            display_name: get(row, "display_name")?,
            policies: get(row, "policies")?,
            created_at: get(row, "created_at")?,
            expires_at: get(row, "expires_at")?,
            revoked_at: get(row, "revoked_at")?,
        })
    }
}

/// The columns an audit insert fills, in the order both backends' statements list them.
pub(crate) const AUDIT_COLS: &str =
    "at, request_id, token_id, token_name, rpc, credential, version, code, latency_us, peer, count, last_at";

/// Expands `#[async_trait] impl Store for $store` over a `pool: sqlx::Pool<_>` field.
/// The backend type supplies `BACKEND`; `reach_db()` (is the database there at all); `current_many_query()` for the one statement
/// whose dialects differ (binding a list of names); `insert_audit_batch()` (binding a
/// batch of audit rows as one parameter set); `notify_change()`, called inside each
/// write transaction; and `watch()`, the cross-daemon change feed.
macro_rules! impl_sql_store {
    ($store:ty) => {
        impl $store {
            async fn notify_credential(
                &self,
                tx: &mut Tx<'_>,
                name: &str,
                kind: $crate::store::ChangeKind,
                version: u64,
                at: Micros,
            ) -> Result<(), StoreError> {
                let event = $crate::store::ChangeEvent { name: name.to_owned(), kind, version, at };
                self.notify_change(tx, &$crate::store::encode_change(&event)).await
            }
        }

        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> $crate::store::Backend {
                Self::BACKEND
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn reach(&self) -> Result<(), StoreError> {
                self.reach_db().await
            }

            async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError> {
                let row = sqlx::query("SELECT * FROM keyring WHERE id = 1").fetch_optional(&self.pool).await?;
                row.as_ref().map(sql::keyring).transpose()
            }

            async fn init_keyring(&self, k: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let (salt, params) = match &k.kdf {
                    Some((salt, p)) => (Some(salt.clone()), Some(*p)),
                    None => (None, None),
                };
                let inserted = sqlx::query(
                    "INSERT INTO keyring (id, source, kdf_salt, kdf_m_cost, kdf_t_cost, kdf_p_cost, verifier, created_at) \
                     VALUES (1, $1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                )
                .bind(k.source.as_str())
                .bind(salt)
                .bind(params.map(|p| i64::from(p.m_cost)))
                .bind(params.map(|p| i64::from(p.t_cost)))
                .bind(params.map(|p| i64::from(p.p_cost)))
                .bind(&k.verifier)
                .bind(k.created_at)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if inserted == 0 {
                    tx.rollback().await?;
                    return Ok(false);
                }
                sqlx::query("INSERT INTO keks (id, wrapped_key, state, created_at) VALUES ($1, $2, $3, $4)")
                    .bind(kek.id)
                    .bind(&kek.wrapped_key)
                    .bind(kek.state.as_str())
                    .bind(kek.created_at)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn list_keks(&self) -> Result<Vec<KekRow>, StoreError> {
                let rows = sqlx::query("SELECT * FROM keks ORDER BY id").fetch_all(&self.pool).await?;
                rows.iter().map(sql::kek).collect()
            }

            async fn get_credential(&self, name: &str) -> Result<Option<CredentialRow>, StoreError> {
                let q = format!("SELECT {} FROM credentials c WHERE c.name = $1", sql::CRED_COLS);
                let row = sqlx::query(&q).bind(name).fetch_optional(&self.pool).await?;
                row.as_ref().map(sql::credential).transpose()
            }

            async fn get_version(
                &self,
                name: &str,
                version: Option<u64>,
            ) -> Result<Option<(CredentialRow, Option<VersionRow>)>, StoreError> {
                let q = format!(
                    "SELECT {}, {} FROM credentials c LEFT JOIN credential_versions v \
                     ON v.name = c.name AND v.version = COALESCE($2, c.current_version) WHERE c.name = $1",
                    sql::CRED_COLS,
                    sql::VERSION_COLS
                );
                let row = sqlx::query(&q)
                    .bind(name)
                    .bind(version.map(sql::to_db))
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    None => Ok(None),
                    Some(row) => Ok(Some((sql::credential(&row)?, sql::joined_version(&row)?))),
                }
            }

            async fn get_current_many(
                &self,
                names: &[String],
            ) -> Result<Vec<(CredentialRow, VersionRow)>, StoreError> {
                if names.is_empty() {
                    return Ok(Vec::new());
                }
                let rows = self.current_many_query(names).await?;
                let mut out = Vec::with_capacity(rows.len());
                for row in &rows {
                    if let Some(v) = sql::joined_version(row)? {
                        out.push((sql::credential(row)?, v));
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
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(sql::version_info).collect()
            }

            async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialRow, StoreError> {
                let version = new.base.next_version();
                let mut tx = self.pool.begin().await?;
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
                            sql::CRED_COLS_BARE
                        );
                        sqlx::query(&q)
                        .bind(new.name)
                        .bind(sql::labels_to_json(&m))
                        .bind(&m.description)
                        .bind(&m.owner)
                        .bind(m.expires_at)
                        .bind(new.now)
                        .fetch_optional(&mut *tx)
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
                             expires_at = CASE WHEN $4 THEN $8 ELSE expires_at END \
                             WHERE name = $1 AND current_version = $9 AND (deleted_at IS NULL) = $10 RETURNING {}",
                            sql::CRED_COLS_BARE
                        );
                        sqlx::query(&q)
                        .bind(new.name)
                        .bind(sql::to_db(version))
                        .bind(new.now)
                        .bind(m.is_some())
                        .bind(m.map(sql::labels_to_json).unwrap_or_default())
                        .bind(m.map(|m| m.description.clone()).unwrap_or_default())
                        .bind(m.map(|m| m.owner.clone()).unwrap_or_default())
                        .bind(m.and_then(|m| m.expires_at))
                        .bind(sql::to_db(current))
                        .bind(live)
                        .fetch_optional(&mut *tx)
                        .await?
                    }
                };
                let Some(head) = matched else {
                    tx.rollback().await?;
                    return Err(StoreError::Conflict);
                };
                let head = sql::credential(&head)?;
                // The DEK must be wrapped by the active KEK. On PostgreSQL the KEK's row is
                // read FOR SHARE, so a KEK rotation waits for this write and every write after
                // it sees the new KEK: no DEK is ever left behind under a retiring KEK.
                let kek_state: Option<String> = sqlx::query_scalar(Self::ACTIVE_KEK_CHECK)
                    .bind(new.sealed.kek_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                if kek_state.as_deref() != Some("active") {
                    tx.rollback().await?;
                    return Err(StoreError::StaleKek(new.sealed.kek_id));
                }
                sqlx::query(
                    "UPDATE credential_versions SET state = 'previous', expires_at = $2 \
                     WHERE name = $1 AND state = 'current'",
                )
                .bind(new.name)
                .bind(new.previous_expires_at)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO credential_versions (name, version, state, kek_id, wrapped_dek, ciphertext, created_at) \
                     VALUES ($1, $2, 'current', $3, $4, $5, $6)",
                )
                .bind(new.name)
                .bind(sql::to_db(version))
                .bind(new.sealed.kek_id)
                .bind(&new.sealed.wrapped_dek)
                .bind(&new.sealed.ciphertext)
                .bind(new.now)
                .execute(&mut *tx)
                .await?;
                if let Some(oldest_kept) = version.checked_sub(new.max_versions) {
                    sqlx::query("DELETE FROM credential_versions WHERE name = $1 AND version <= $2")
                        .bind(new.name)
                        .bind(sql::to_db(oldest_kept))
                        .execute(&mut *tx)
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
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if n == 0 && p.claim.is_some() {
                        // Another daemon rotated in this slot first.
                        tx.rollback().await?;
                        return Err(StoreError::Conflict);
                    }
                }
                let event = $crate::store::ChangeEvent {
                    name: new.name.to_owned(),
                    kind: new.kind,
                    version,
                    at: new.now,
                };
                self.notify_change(&mut tx, &$crate::store::encode_change(&event)).await?;
                tx.commit().await?;
                Ok(head)
            }

            async fn delete_credential(
                &self,
                name: &str,
                expected: Option<u64>,
                now: Micros,
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let at: Option<i64> = sqlx::query_scalar(
                    "UPDATE credentials SET deleted_at = $2, updated_at = $2 WHERE name = $1 AND deleted_at IS NULL \
                     AND (CAST($3 AS BIGINT) IS NULL OR current_version = $3) RETURNING current_version",
                )
                .bind(name)
                .bind(now)
                .bind(expected.map(sql::to_db))
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(v) = at {
                    let kind = $crate::store::ChangeKind::Delete;
                    self.notify_credential(&mut tx, name, kind, sql::from_db(v, "version")?, now).await?;
                }
                tx.commit().await?;
                Ok(at.is_some())
            }

            async fn list_credentials(&self, q: &ListQuery<'_>) -> Result<Vec<CredentialRow>, StoreError> {
                // One lower and one upper bound on the name index, so either backend's
                // planner scans exactly the range.
                let stmt = format!(
                    "SELECT {} FROM credentials c WHERE c.name >= $1 AND c.name < $2 \
                     AND ($3 OR c.deleted_at IS NULL) ORDER BY c.name LIMIT $4",
                    sql::CRED_COLS
                );
                let rows = sqlx::query(&stmt)
                    .bind(q.start)
                    .bind(q.end)
                    .bind(q.include_deleted)
                    .bind(i64::from(q.limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(sql::credential).collect()
            }

            async fn count_credentials(&self) -> Result<u64, StoreError> {
                let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM credentials WHERE deleted_at IS NULL")
                    .fetch_one(&self.pool)
                    .await?;
                sql::from_db(n, "count")
            }

            async fn insert_token(&self, t: &TokenRow) -> Result<(), StoreError> {
                let mut tx = self.pool.begin().await?;
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
                self.notify_change(&mut tx, &$crate::store::encode_token_change(&t.token_hash)).await?;
                tx.commit().await?;
                Ok(())
            }

            async fn insert_first_token(&self, t: &TokenRow) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
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
                self.notify_change(&mut tx, &$crate::store::encode_token_change(&t.token_hash)).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn destroy_version(&self, name: &str, version: u64) -> Result<Option<bool>, StoreError> {
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query(
                    "UPDATE credential_versions SET state = 'destroyed', ciphertext = NULL, wrapped_dek = $3 \
                     WHERE name = $1 AND version = $2 AND state <> 'destroyed'",
                )
                .bind(name)
                .bind(sql::to_db(version))
                .bind(Vec::<u8>::new())
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    let kind = $crate::store::ChangeKind::DestroyVersion;
                    self.notify_credential(&mut tx, name, kind, version, $crate::store::now_micros()).await?;
                    tx.commit().await?;
                    return Ok(Some(true));
                }
                let exists: Option<i64> =
                    sqlx::query_scalar("SELECT version FROM credential_versions WHERE name = $1 AND version = $2")
                        .bind(name)
                        .bind(sql::to_db(version))
                        .fetch_optional(&mut *tx)
                        .await?;
                tx.commit().await?;
                Ok(exists.map(|_| false))
            }

            async fn undelete_credential(&self, name: &str, now: Micros) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let at: Option<i64> = sqlx::query_scalar(
                    "UPDATE credentials SET deleted_at = NULL, updated_at = $2 WHERE name = $1 \
                     AND deleted_at IS NOT NULL RETURNING current_version",
                )
                .bind(name)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
                if let Some(v) = at {
                    let kind = $crate::store::ChangeKind::Undelete;
                    self.notify_credential(&mut tx, name, kind, sql::from_db(v, "version")?, now).await?;
                }
                tx.commit().await?;
                Ok(at.is_some())
            }

            async fn put_rotation_policy(&self, p: &$crate::store::RotationPolicyRow) -> Result<bool, StoreError> {
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
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n > 0)
            }

            async fn get_rotation_policy(
                &self,
                name: &str,
            ) -> Result<Option<$crate::store::RotationPolicyRow>, StoreError> {
                let row = sqlx::query("SELECT * FROM rotation_policies WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(sql::policy).transpose()
            }

            async fn delete_rotation_policy(&self, name: &str) -> Result<bool, StoreError> {
                let n = sqlx::query("DELETE FROM rotation_policies WHERE name = $1")
                    .bind(name)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
                Ok(n > 0)
            }

            async fn due_rotations(
                &self,
                now: Micros,
                limit: u32,
            ) -> Result<Vec<$crate::store::RotationPolicyRow>, StoreError> {
                let rows = sqlx::query(
                    "SELECT p.* FROM rotation_policies p JOIN credentials c ON c.name = p.name \
                     WHERE p.next_run_at IS NOT NULL AND p.next_run_at <= $1 AND c.deleted_at IS NULL \
                     ORDER BY p.next_run_at LIMIT $2",
                )
                .bind(now)
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(sql::policy).collect()
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
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n > 0)
            }

            async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError> {
                let n = sqlx::query(
                    "UPDATE credential_versions SET state = 'deprecated' \
                     WHERE state = 'previous' AND expires_at IS NOT NULL AND expires_at <= $1",
                )
                .bind(now)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n)
            }

            async fn start_kek_rotation(
                &self,
                kek: &KekRow,
                verifier: &[u8],
                now: Micros,
            ) -> Result<$crate::store::JobRow, StoreError> {
                let mut tx = self.pool.begin().await?;
                // Taking the active KEK's row first serializes concurrent rotations (and, on
                // PostgreSQL, waits for writes that hold it FOR SHARE).
                let active: Option<i64> =
                    sqlx::query_scalar(Self::LOCK_ACTIVE_KEK).fetch_optional(&mut *tx).await?;
                let running: Option<i64> =
                    sqlx::query_scalar("SELECT id FROM rotation_jobs WHERE state = 'running'")
                        .fetch_optional(&mut *tx)
                        .await?;
                if let Some(id) = running {
                    tx.rollback().await?;
                    return Err(StoreError::JobRunning(id));
                }
                let taken: Option<i64> = sqlx::query_scalar("SELECT id FROM keks WHERE id >= $1")
                    .bind(kek.id)
                    .fetch_optional(&mut *tx)
                    .await?;
                // The new KEK is wrapped by the caller's master key: it must still be the
                // database's (a rekey re-wraps every KEK while holding their rows).
                let stored: Option<Vec<u8>> = sqlx::query_scalar("SELECT verifier FROM keyring WHERE id = 1")
                    .fetch_optional(&mut *tx)
                    .await?;
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
                let job = sql::job(&row)?;
                self.notify_change(&mut tx, &$crate::store::encode_table_change($crate::store::KEYS_CHANGED)).await?;
                tx.commit().await?;
                Ok(job)
            }

            async fn get_job(&self, id: Option<i64>) -> Result<Option<$crate::store::JobRow>, StoreError> {
                let row = match id {
                    Some(id) => sqlx::query("SELECT * FROM rotation_jobs WHERE id = $1").bind(id),
                    None => sqlx::query("SELECT * FROM rotation_jobs ORDER BY id DESC LIMIT 1"),
                }
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(sql::job).transpose()
            }

            async fn claim_job(
                &self,
                id: i64,
                owner: &str,
                now: Micros,
                lease_until: Micros,
            ) -> Result<bool, StoreError> {
                let n = sqlx::query(
                    "UPDATE rotation_jobs SET lease_owner = $2, lease_until = $4 WHERE id = $1 AND state = 'running' \
                     AND (lease_owner IS NULL OR lease_owner = $2 OR lease_until IS NULL OR lease_until < $3)",
                )
                .bind(id)
                .bind(owner)
                .bind(now)
                .bind(lease_until)
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n > 0)
            }

            async fn rewrap_candidates(
                &self,
                active: i64,
                after: Option<(&str, u64)>,
                limit: u32,
            ) -> Result<Vec<$crate::store::RewrapRow>, StoreError> {
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
                .bind(sql::to_db(after_version))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(sql::rewrap).collect()
            }

            async fn commit_rewrap(&self, b: &$crate::store::RewrapBatch<'_>) -> Result<Option<u64>, StoreError> {
                let mut tx = self.pool.begin().await?;
                // The data first (on SQLite this takes the write lock), then the job row:
                // without the lease the whole transaction rolls back.
                let changed = Self::apply_rewrap(&mut tx, b.new_kek_id, b.rows).await?;
                let held = sqlx::query(
                    "UPDATE rotation_jobs SET done = done + $3, failed = failed + $4, cursor_name = $5, \
                     cursor_version = $6, updated_at = $7, lease_until = $8 \
                     WHERE id = $1 AND lease_owner = $2 AND state = 'running'",
                )
                .bind(b.job_id)
                .bind(b.owner)
                .bind(sql::to_db(changed))
                .bind(sql::to_db(b.failed))
                .bind(b.cursor.0)
                .bind(sql::to_db(b.cursor.1))
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
            ) -> Result<Option<$crate::store::JobRow>, StoreError> {
                let mut tx = self.pool.begin().await?;
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
                .bind(error)
                .fetch_optional(&mut *tx)
                .await?;
                let Some(row) = row else {
                    tx.rollback().await?;
                    return Ok(None);
                };
                let job = sql::job(&row)?;
                self.notify_change(&mut tx, &$crate::store::encode_table_change($crate::store::KEYS_CHANGED)).await?;
                tx.commit().await?;
                Ok(Some(job))
            }

            async fn rekey(
                &self,
                k: &KeyringRow,
                old_verifier: &[u8],
                keks: &[(i64, Vec<u8>)],
            ) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let (salt, params) = match &k.kdf {
                    Some((salt, p)) => (Some(salt.clone()), Some(*p)),
                    None => (None, None),
                };
                let n = sqlx::query(
                    "UPDATE keyring SET kdf_salt = $1, kdf_m_cost = $2, kdf_t_cost = $3, kdf_p_cost = $4, \
                     verifier = $5 WHERE id = 1 AND verifier = $6",
                )
                .bind(salt)
                .bind(params.map(|p| i64::from(p.m_cost)))
                .bind(params.map(|p| i64::from(p.t_cost)))
                .bind(params.map(|p| i64::from(p.p_cost)))
                .bind(&k.verifier)
                .bind(old_verifier)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM keks").fetch_one(&mut *tx).await?;
                if n == 0 || usize::try_from(count).ok() != Some(keks.len()) {
                    tx.rollback().await?;
                    return Ok(false);
                }
                for (id, wrapped) in keks {
                    let n = sqlx::query("UPDATE keks SET wrapped_key = $2 WHERE id = $1")
                        .bind(id)
                        .bind(wrapped)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if n == 0 {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                }
                self.notify_change(&mut tx, &$crate::store::encode_table_change($crate::store::KEYS_CHANGED)).await?;
                tx.commit().await?;
                Ok(true)
            }

            async fn insert_audit(&self, events: &[$crate::store::AuditRow]) -> Result<(), StoreError> {
                if events.is_empty() {
                    return Ok(());
                }
                // One statement for the whole batch, whatever its size (see the backends'
                // `insert_audit_batch`): one prepared statement, one round trip.
                self.insert_audit_batch(events).await
            }

            async fn recent_audit(&self, limit: u32) -> Result<Vec<$crate::store::AuditRow>, StoreError> {
                let rows = sqlx::query("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(sql::audit).collect()
            }

            async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
                let n = sqlx::query(
                    "DELETE FROM audit_log WHERE id IN \
                     (SELECT id FROM audit_log WHERE at < $1 ORDER BY id LIMIT $2)",
                )
                .bind(before)
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await?
                .rows_affected();
                Ok(n)
            }

            async fn revoke_token(&self, token_hash: &str, now: Micros) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                let n = sqlx::query("UPDATE tokens SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL")
                    .bind(token_hash)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if n > 0 {
                    self.notify_change(&mut tx, &$crate::store::encode_token_change(token_hash)).await?;
                }
                tx.commit().await?;
                Ok(n > 0)
            }

            fn pool_stats(&self) -> $crate::store::PoolStats {
                $crate::store::PoolStats { size: self.pool.size(), idle: self.pool.num_idle() }
            }

            async fn watch_changes(
                &self,
                sink: $crate::store::ChangeSink,
                shutdown: tokio::sync::watch::Receiver<bool>,
            ) -> Result<(), StoreError> {
                self.watch(sink, shutdown).await
            }

            async fn list_tokens(&self) -> Result<Vec<TokenRow>, StoreError> {
                let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at").fetch_all(&self.pool).await?;
                rows.iter().map(sql::token).collect()
            }

            async fn get_token(&self, token_hash: &str) -> Result<Option<TokenRow>, StoreError> {
                let row = sqlx::query("SELECT * FROM tokens WHERE token_hash = $1")
                    .bind(token_hash)
                    .fetch_optional(&self.pool)
                    .await?;
                row.as_ref().map(sql::token).transpose()
            }

            async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRow>, StoreError> {
                if prefix.is_empty() || !prefix.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                    return Err(StoreError::Corrupt("a token hash prefix is lowercase hex".into()));
                }
                // Every hash starting with `prefix` sorts in [prefix, prefix + "g"): 'g'
                // follows every hex digit in byte order.
                let rows = sqlx::query(Self::LIVE_TOKEN_RANGE)
                    .bind(prefix)
                    .bind(format!("{prefix}g"))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(sql::token).collect()
            }
        }
    };
}

pub(super) use impl_sql_store;

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
