//! PostgreSQL backend: production, many daemons sharing one database.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::watch;

use super::sql::{self, impl_sql_store};
use super::{
    Backend, Change, ChangeSink, CredentialRow, KekRow, KeyringRow, ListQuery, Micros, NewVersion, StoreError,
    TokenRow, VersionInfo, VersionRow, WriteBase,
};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
    (2, "audit", include_str!("../../migrations/postgres/0002_audit.sql")),
];

/// The NOTIFY channel every write announces itself on.
const CHANNEL: &str = "credvault_changes";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Tags this daemon's notifications so it can ignore its own.
    instance: String,
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
        Ok(PgStore { pool, instance: format!("{:016x}", rand::random::<u64>()) })
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

impl PgStore {
    /// Runs inside each write transaction; PostgreSQL delivers it on commit only.
    async fn notify_change(&self, tx: &mut Transaction<'_, Postgres>, name: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(format!("{}\t{name}", self.instance))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// LISTENs for other daemons' writes. On any loss of the listening connection it
    /// re-subscribes and then reports [`Change::Resync`]: notifications sent while it was
    /// away are gone, so whatever was cached before may be stale.
    async fn watch(&self, sink: ChangeSink, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(100);
        while !*shutdown.borrow() {
            let subscribed = async {
                let mut l = PgListener::connect_with(&self.pool).await?;
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                l = subscribed => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot subscribe to change notifications; retrying");
                        sink(Change::Resync);
                        tokio::select! {
                            _ = shutdown.changed() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            sink(Change::Resync);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            if let Some((from, name)) = n.payload().split_once('\t') {
                                if from != self.instance {
                                    sink(if name == super::TOKENS_CHANGED {
                                        Change::Tokens
                                    } else {
                                        Change::Credential(name.to_owned())
                                    });
                                }
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!("change notification connection lost; resubscribing and clearing the cache");
                            sink(Change::Resync);
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl_sql_store!(PgStore);
