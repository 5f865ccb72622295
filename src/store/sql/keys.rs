//! The keyring and the KEKs ([`KeyStore`]).

use async_trait::async_trait;
use sqlx::{ColumnIndex, Executor};

use super::{get, Affected as _, Bind, Conn, Db, DbRow, Fields, Scalar, SqlBackend};
use crate::crypto::KdfParams;
use crate::store::{
    encode_table_change, KekRow, KekState, KeyStore, KeyringRow, MasterKeySource, StoreError, KEYS_CHANGED,
};

#[async_trait]
impl<B> KeyStore for B
where
    B: SqlBackend,
    for<'c> &'c mut Conn<B>: Executor<'c, Database = Db<B>>,
    usize: ColumnIndex<DbRow<B>>,
    for<'q> &'q str: Bind<'q, Db<B>>,
    for<'q> i64: Scalar<'q, Db<B>>,
    for<'q> Option<i64>: Bind<'q, Db<B>>,
    for<'q> Vec<u8>: Bind<'q, Db<B>>,
    for<'q> Option<Vec<u8>>: Bind<'q, Db<B>>,
    for<'q> &'q [u8]: Bind<'q, Db<B>>,
{
    async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError> {
        let row = sqlx::query("SELECT * FROM keyring WHERE id = 1").fetch_optional(self.pool()).await?;
        row.as_ref().map(keyring).transpose()
    }

    async fn init_keyring(&self, k: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
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
        let rows = sqlx::query("SELECT * FROM keks ORDER BY id").fetch_all(self.pool()).await?;
        rows.iter().map(kek).collect()
    }

    async fn rekey(&self, k: &KeyringRow, old_verifier: &[u8], keks: &[(i64, Vec<u8>)]) -> Result<bool, StoreError> {
        let mut tx = self.pool().begin().await?;
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
        self.notify(&mut tx, &encode_table_change(KEYS_CHANGED)).await?;
        tx.commit().await?;
        Ok(true)
    }
}

fn keyring(row: &impl Fields) -> Result<KeyringRow, StoreError> {
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

fn kek(row: &impl Fields) -> Result<KekRow, StoreError> {
    let state: String = get(row, "state")?;
    Ok(KekRow {
        id: get(row, "id")?,
        wrapped_key: get(row, "wrapped_key")?,
        state: KekState::parse(&state)?,
        created_at: get(row, "created_at")?,
    })
}
