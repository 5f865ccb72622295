//! Idempotency keys and all-or-nothing multi-credential writes ([`WriteStore`]).
//!
//! A key is inserted in the transaction of its write, after the write's own statements
//! (so the compare-and-set stays the first statement and takes the row lock first). The
//! insert replaces only an expired key; when a live one exists the whole transaction is
//! rolled back and the caller finds the key, which is how a retry racing its original
//! gets the original's result instead of a second write.

use async_trait::async_trait;
use sqlx::{ColumnIndex, Executor};

use super::credentials::{credential, notify_credential, write_version, CRED_COLS_BARE};
use super::{
    from_db, get, labels_to_json, to_db, Affected as _, Bind, Conn, Db, DbRow, Fields, Scalar, SqlBackend, Tx,
};
use crate::store::{
    BatchOp, BatchOutcome, BatchWrite, ChangeKind, CredentialHead, KeyClaim, KeyRecord, KeyedWrite, Metadata, Micros,
    NewVersion, StoreError, WriteStore,
};

const KEY_COLS: &str = "rpc, fingerprint, name, version, at, previous_expires_at, expires_at, outcomes";

#[async_trait]
impl<B> WriteStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> Option<String>: Bind<'q, Db<B>>,
    for<'q> String: Scalar<'q, Db<B>>,
    for<'q> Vec<u8>: Bind<'q, Db<B>>,
    for<'q> bool: Bind<'q, Db<B>>,
{
    async fn put_version_keyed(&self, new: &NewVersion<'_>, key: &KeyClaim) -> Result<CredentialHead, StoreError> {
        let mut tx = self.pool().begin().await?;
        let written = async {
            let head = write_version(self, &mut tx, new).await?;
            let result = KeyResult {
                name: new.name,
                version: new.base.next_version(),
                at: new.now,
                previous_expires_at: new.previous_expires_at,
                outcomes: None,
            };
            claim_key::<B>(&mut tx, key, &result).await?;
            Ok::<_, StoreError>(head)
        }
        .await;
        finish::<B, _>(tx, written).await
    }

    async fn delete_credential_keyed(
        &self,
        name: &str,
        expected: Option<u64>,
        now: Micros,
        key: &KeyClaim,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
        let done = async {
            let Some(head) = soft_delete::<B>(&mut tx, name, expected, now).await? else {
                return Ok(false);
            };
            let result =
                KeyResult { name, version: head.current_version, at: now, previous_expires_at: None, outcomes: None };
            claim_key::<B>(&mut tx, key, &result).await?;
            notify_credential(self, &mut tx, name, ChangeKind::Delete, head.current_version, now).await?;
            Ok::<_, StoreError>(true)
        }
        .await;
        finish::<B, _>(tx, done).await
    }

    async fn get_idempotency_key(
        &self,
        token_id: &str,
        key: &str,
        now: Micros,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let q = format!("SELECT {KEY_COLS} FROM idempotency_keys WHERE token_id = $1 AND key = $2 AND expires_at > $3");
        let row = sqlx::query(&q).bind(token_id).bind(key).bind(now).fetch_optional(self.pool()).await?;
        row.as_ref().map(key_record).transpose()
    }

    async fn prune_idempotency_keys(&self, now: Micros, limit: u32) -> Result<u64, StoreError> {
        // Bounded by `limit` rows through the expiry index, so no statement holds locks
        // for long however many keys have piled up.
        let n = sqlx::query(
            "DELETE FROM idempotency_keys WHERE (token_id, key) IN \
             (SELECT token_id, key FROM idempotency_keys WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2)",
        )
        .bind(now)
        .bind(i64::from(limit))
        .execute(self.pool())
        .await?
        .rows_affected();
        Ok(n)
    }

    async fn write_batch(&self, batch: &BatchWrite<'_>) -> Result<BatchOutcome, StoreError> {
        // Rows are locked in name order, so two batches over the same names never wait
        // on each other in a cycle.
        let mut order: Vec<usize> = (0..batch.ops.len()).collect();
        order.sort_by(|a, b| batch.ops[*a].name().cmp(batch.ops[*b].name()));
        let mut tx = self.pool().begin().await?;
        let outcome = async {
            let mut heads: Vec<Option<CredentialHead>> = vec![None; batch.ops.len()];
            let mut conflicts = Vec::new();
            for &i in &order {
                let head = match batch.ops[i] {
                    BatchOp::Put { name, base, sealed, metadata } => {
                        let new = NewVersion {
                            name,
                            base,
                            sealed,
                            metadata,
                            now: batch.now,
                            max_versions: batch.max_versions,
                            previous_expires_at: None,
                            kind: ChangeKind::Put,
                            policy: None,
                        };
                        match write_version(self, &mut tx, &new).await {
                            Ok(head) => Some(head),
                            Err(StoreError::Conflict) => None,
                            Err(e) => return Err(e),
                        }
                    }
                    BatchOp::Delete { name, expected } => {
                        let head = soft_delete::<B>(&mut tx, name, expected, batch.now).await?;
                        if let Some(h) = &head {
                            let (kind, v) = (ChangeKind::Delete, h.current_version);
                            notify_credential(self, &mut tx, name, kind, v, batch.now).await?;
                        }
                        head
                    }
                };
                match head {
                    Some(h) => heads[i] = Some(h),
                    None => conflicts.push(i),
                }
            }
            if conflicts.is_empty() {
                let heads: Vec<CredentialHead> = heads.into_iter().flatten().collect();
                if let (Some(key), Some(first)) = (batch.key, heads.first()) {
                    let writes: Vec<KeyedWrite> = heads
                        .iter()
                        .zip(batch.ops)
                        .map(|(h, op)| KeyedWrite {
                            name: h.name.clone(),
                            version: h.current_version,
                            deleted: matches!(op, BatchOp::Delete { .. }),
                        })
                        .collect();
                    let result = KeyResult {
                        name: first.name.as_str(),
                        version: first.current_version,
                        at: batch.now,
                        previous_expires_at: None,
                        outcomes: Some(encode_keyed_writes(&writes)),
                    };
                    claim_key::<B>(&mut tx, key, &result).await?;
                }
                return Ok(BatchOutcome::Applied(heads));
            }
            // Nothing will be written: say what each losing write found instead.
            let q = format!("SELECT {CRED_COLS_BARE} FROM credentials WHERE name = $1");
            let mut found = Vec::with_capacity(conflicts.len());
            for i in conflicts {
                let row = sqlx::query(&q).bind(batch.ops[i].name()).fetch_optional(&mut *tx).await?;
                found.push((i, row.as_ref().map(credential).transpose()?));
            }
            Ok(BatchOutcome::Conflicts(found))
        }
        .await;
        match outcome {
            Ok(BatchOutcome::Applied(heads)) => {
                tx.commit().await?;
                Ok(BatchOutcome::Applied(heads))
            }
            Ok(conflicts) => {
                tx.rollback().await?;
                Ok(conflicts)
            }
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    async fn set_metadata(
        &self,
        name: &str,
        m: &Metadata,
        expected: u64,
        now: Micros,
    ) -> Result<Option<CredentialHead>, StoreError> {
        let q = format!(
            "UPDATE credentials SET labels = $2, description = $3, owner = $4, expires_at = $5, \
             metadata_version = metadata_version + 1, updated_at = $6 \
             WHERE name = $1 AND metadata_version = $7 AND deleted_at IS NULL RETURNING {CRED_COLS_BARE}"
        );
        let row = sqlx::query(&q)
            .bind(name)
            .bind(labels_to_json(m))
            .bind(m.description.as_str())
            .bind(m.owner.as_str())
            .bind(m.expires_at)
            .bind(now)
            .bind(to_db(expected))
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(credential).transpose()
    }
}

/// What a key remembers of its write.
struct KeyResult<'a> {
    name: &'a str,
    version: u64,
    at: Micros,
    previous_expires_at: Option<Micros>,
    /// A batch: every write's result ([`encode_keyed_writes`]).
    outcomes: Option<String>,
}

/// Commits on success; rolls back otherwise.
async fn finish<B: SqlBackend, T>(tx: Tx<'_, B>, result: Result<T, StoreError>) -> Result<T, StoreError> {
    match result {
        Ok(v) => {
            tx.commit().await?;
            Ok(v)
        }
        Err(e) => {
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

/// Stores `key` with its write's result, replacing an expired key of the same name.
/// [`StoreError::Conflict`] if a live one exists.
async fn claim_key<B>(tx: &mut Tx<'_, B>, key: &KeyClaim, result: &KeyResult<'_>) -> Result<(), StoreError>
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> Option<String>: Bind<'q, Db<B>>,
    for<'q> Vec<u8>: Bind<'q, Db<B>>,
{
    let n = sqlx::query(
        "INSERT INTO idempotency_keys (token_id, key, rpc, fingerprint, name, version, at, \
         previous_expires_at, created_at, expires_at, outcomes) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $7, $9, $10) \
         ON CONFLICT (token_id, key) DO UPDATE SET rpc = excluded.rpc, fingerprint = excluded.fingerprint, \
         name = excluded.name, version = excluded.version, at = excluded.at, \
         previous_expires_at = excluded.previous_expires_at, created_at = excluded.created_at, \
         expires_at = excluded.expires_at, outcomes = excluded.outcomes WHERE idempotency_keys.expires_at <= $7",
    )
    .bind(key.token_id.as_str())
    .bind(key.key.as_str())
    .bind(key.rpc)
    .bind(key.fingerprint.clone())
    .bind(result.name)
    .bind(to_db(result.version))
    .bind(result.at)
    .bind(result.previous_expires_at)
    .bind(key.expires_at)
    .bind(result.outcomes.clone())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(StoreError::Conflict);
    }
    Ok(())
}

/// Soft-deletes a live credential (at `expected` if given); its head after, or `None`
/// when nothing matched.
async fn soft_delete<B>(
    tx: &mut Tx<'_, B>,
    name: &str,
    expected: Option<u64>,
    now: Micros,
) -> Result<Option<CredentialHead>, StoreError>
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
{
    let q = format!(
        "UPDATE credentials SET deleted_at = $2, updated_at = $2 WHERE name = $1 AND deleted_at IS NULL \
         AND (CAST($3 AS BIGINT) IS NULL OR current_version = $3) RETURNING {CRED_COLS_BARE}"
    );
    let row = sqlx::query(&q).bind(name).bind(now).bind(expected.map(to_db)).fetch_optional(&mut **tx).await?;
    row.as_ref().map(credential).transpose()
}

fn key_record(row: &impl Fields) -> Result<KeyRecord, StoreError> {
    Ok(KeyRecord {
        rpc: get(row, "rpc")?,
        fingerprint: get(row, "fingerprint")?,
        name: get(row, "name")?,
        version: from_db(get(row, "version")?, "version")?,
        at: get(row, "at")?,
        previous_expires_at: get(row, "previous_expires_at")?,
        expires_at: get(row, "expires_at")?,
        batch: match get::<Option<String>>(row, "outcomes")? {
            None => None,
            Some(text) => Some(decode_keyed_writes(&text).ok_or_else(|| {
                StoreError::Corrupt("idempotency key: batch results not in their stored form".into())
            })?),
        },
    })
}

/// The stored form of a keyed batch's results: one line per write,
/// `version TAB deleted (0 or 1) TAB name`. Names hold no control character.
fn encode_keyed_writes(writes: &[KeyedWrite]) -> String {
    let mut out = String::new();
    for w in writes {
        out.push_str(&format!("{}\t{}\t{}\n", w.version, u8::from(w.deleted), w.name));
    }
    out
}

/// Reads [`encode_keyed_writes`] back; `None` if the text is not in that form.
fn decode_keyed_writes(text: &str) -> Option<Vec<KeyedWrite>> {
    text.lines()
        .map(|line| {
            let mut parts = line.splitn(3, '\t');
            let version = parts.next()?.parse().ok()?;
            let deleted = match parts.next()? {
                "0" => false,
                "1" => true,
                _ => return None,
            };
            Some(KeyedWrite { name: parts.next()?.to_owned(), version, deleted })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn keyed_writes_round_trip(writes in prop::collection::vec(
            ("[a-zA-Z0-9/_.~@:+=-]{1,64}", any::<u64>(), any::<bool>())
                .prop_map(|(name, version, deleted)| KeyedWrite { name, version, deleted }),
            1..64,
        )) {
            prop_assert_eq!(decode_keyed_writes(&encode_keyed_writes(&writes)), Some(writes));
        }

        #[test]
        fn any_text_decodes_or_is_refused(text in "\\PC{0,200}") {
            let _ = decode_keyed_writes(&text);
        }
    }

    #[test]
    fn malformed_results_are_refused() {
        for bad in ["x\t0\ta\n", "1\t2\ta\n", "1\t0\n", "1\n", "-1\t0\ta\n"] {
            assert_eq!(decode_keyed_writes(bad), None, "{bad:?}");
        }
        let one = [KeyedWrite { name: "a/b c".into(), version: 3, deleted: true }];
        assert_eq!(encode_keyed_writes(&one), "3\t1\ta/b c\n");
    }
}
