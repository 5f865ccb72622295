//! SQL shared by both backends (PostgreSQL and SQLite accept the same `$N` statements
//! here), generic row decoding, and [`impl_sql_store!`], which expands the one
//! [`Store`](super::Store) implementation for each backend's pool type.

use sqlx::{ColumnIndex, Decode, Row, Type};

use super::{
    AuditRow, CredentialRow, KekRow, KekState, KeyringRow, MasterKeySource, Metadata, StoreError, TokenRow,
    VersionInfo, VersionRow, VersionState,
};
use crate::crypto::{KdfParams, Sealed};

pub(super) const CRED_COLS: &str =
    "c.name, c.current_version, c.labels, c.description, c.owner, c.expires_at, c.created_at, c.updated_at, c.deleted_at";

/// The same columns, unqualified, for `RETURNING`.
pub(super) const CRED_COLS_BARE: &str =
    "name, current_version, labels, description, owner, expires_at, created_at, updated_at, deleted_at";

pub(super) const VERSION_COLS: &str = "v.version, v.state, v.kek_id, v.wrapped_dek, v.ciphertext, \
     v.created_at AS v_created_at, v.expires_at AS v_expires_at";

/// A bound above every valid name (names use only `[A-Za-z0-9._/-]`, all below `~`).
pub(super) const NAME_CEILING: &str = "~";

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

/// Audit rows per INSERT statement: 10 bound values each, well under the bind limits of
/// SQLite (32,766) and PostgreSQL (65,535).
pub(crate) const AUDIT_ROWS_PER_INSERT: usize = 500;

/// A query builder for the pool's database (named by the pool, so callers need no type).
pub(crate) fn query_builder<'a, DB: sqlx::Database>(_pool: &sqlx::Pool<DB>, sql: &str) -> sqlx::QueryBuilder<'a, DB> {
    sqlx::QueryBuilder::new(sql)
}

/// Expands `#[async_trait] impl Store for $store` over a `pool: sqlx::Pool<_>` field.
/// The backend type supplies `BACKEND`; `current_many_query()` for the one statement
/// whose dialects differ (binding a list of names); `notify_change()`, called inside each
/// write transaction; and `watch()`, the cross-daemon change feed.
macro_rules! impl_sql_store {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            fn backend(&self) -> $crate::store::Backend {
                Self::BACKEND
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
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
                self.notify_change(&mut tx, new.name).await?;
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
                let n = sqlx::query(
                    "UPDATE credentials SET deleted_at = $2, updated_at = $2 WHERE name = $1 AND deleted_at IS NULL \
                     AND (CAST($3 AS BIGINT) IS NULL OR current_version = $3)",
                )
                .bind(name)
                .bind(now)
                .bind(expected.map(sql::to_db))
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    self.notify_change(&mut tx, name).await?;
                }
                tx.commit().await?;
                Ok(n > 0)
            }

            async fn list_credentials(&self, q: &ListQuery<'_>) -> Result<Vec<CredentialRow>, StoreError> {
                let upper = format!("{}{}", q.prefix, sql::NAME_CEILING);
                let stmt = format!(
                    "SELECT {} FROM credentials c WHERE c.name >= $1 AND c.name < $2 AND c.name > $3 \
                     AND ($4 OR c.deleted_at IS NULL) ORDER BY c.name LIMIT $5",
                    sql::CRED_COLS
                );
                let rows = sqlx::query(&stmt)
                    .bind(q.prefix)
                    .bind(upper)
                    .bind(q.after.unwrap_or(""))
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
                self.notify_change(&mut tx, $crate::store::TOKENS_CHANGED).await?;
                tx.commit().await?;
                Ok(())
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
                    self.notify_change(&mut tx, name).await?;
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
                let n = sqlx::query(
                    "UPDATE credentials SET deleted_at = NULL, updated_at = $2 WHERE name = $1 AND deleted_at IS NOT NULL",
                )
                .bind(name)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n > 0 {
                    self.notify_change(&mut tx, name).await?;
                }
                tx.commit().await?;
                Ok(n > 0)
            }

            async fn insert_audit(&self, events: &[$crate::store::AuditRow]) -> Result<(), StoreError> {
                // One multi-row INSERT per chunk rather than one statement per event: at
                // thousands of requests per second, per-event statements cost the daemon
                // more CPU than the requests they record.
                let mut tx = self.pool.begin().await?;
                for chunk in events.chunks(sql::AUDIT_ROWS_PER_INSERT) {
                    let mut q = sql::query_builder(
                        &self.pool,
                        "INSERT INTO audit_log (at, request_id, token_id, token_name, rpc, credential, version, code, \
                         latency_us, peer) ",
                    );
                    q.push_values(chunk, |mut row, e| {
                        row.push_bind(e.at)
                            .push_bind(&e.request_id)
                            .push_bind(&e.token_id)
                            .push_bind(&e.token_name)
                            .push_bind(&e.rpc)
                            .push_bind(&e.credential)
                            .push_bind(e.version.map(sql::to_db))
                            .push_bind(&e.code)
                            .push_bind(sql::to_db(e.latency_us))
                            .push_bind(&e.peer);
                    });
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn recent_audit(&self, limit: u32) -> Result<Vec<$crate::store::AuditRow>, StoreError> {
                let rows = sqlx::query("SELECT * FROM audit_log ORDER BY id DESC LIMIT $1")
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter().map(sql::audit).collect()
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
                    self.notify_change(&mut tx, $crate::store::TOKENS_CHANGED).await?;
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
