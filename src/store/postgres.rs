//! PostgreSQL backend: production, many daemons sharing one database.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::PgPool;

use super::sql::{self, impl_sql_store};
use super::{
    Backend, CredentialRow, KekRow, KeyringRow, ListQuery, Micros, NewVersion, StoreError, TokenRow, VersionInfo,
    VersionRow, WriteBase,
};

const MIGRATIONS: &[(i64, &str, &str)] = &[(1, "init", include_str!("../../migrations/postgres/0001_init.sql"))];

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl fmt::Debug for PgStore {
    // The URL may carry a password: show only where the pool points.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = self.pool.connect_options();
        f.debug_struct("PgStore")
            .field("host", &o.get_host())
            .field("port", &o.get_port())
            .field("database", &o.get_database())
            .finish()
    }
}

impl PgStore {
    const BACKEND: Backend = Backend::Postgres;

    /// Connects and applies migrations (under sqlx's advisory lock, so daemons starting
    /// together migrate once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.parse().map_err(StoreError::Unavailable)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.application_name("credvault"))
            .await?;
        sql::migrator(MIGRATIONS).run(&pool).await?;
        Ok(PgStore { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn current_many_query(&self, names: &[String]) -> Result<Vec<PgRow>, StoreError> {
        let q = format!(
            "SELECT {}, {} FROM credentials c JOIN credential_versions v \
             ON v.name = c.name AND v.version = c.current_version WHERE c.name = ANY($1)",
            sql::CRED_COLS,
            sql::VERSION_COLS
        );
        Ok(sqlx::query(&q).bind(names).fetch_all(&self.pool).await?)
    }
}

impl_sql_store!(PgStore);
