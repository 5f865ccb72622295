//! PostgreSQL backend: production, many daemons sharing one database.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions, PgRow, PgSslMode};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::watch;

use super::pg_tls;
use super::sql::{self, SqlBackend};
use super::{AuditRow, Backend, Change, ChangeSink, PoolStats, Rewrapped, Store, StoreError};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/postgres/0001_init.sql")),
    (2, "audit", include_str!("../../migrations/postgres/0002_audit.sql")),
    (3, "rotation", include_str!("../../migrations/postgres/0003_rotation.sql")),
    (4, "audit fold", include_str!("../../migrations/postgres/0004_audit_fold.sql")),
    (5, "token prefix", include_str!("../../migrations/postgres/0005_token_prefix.sql")),
    (6, "idempotency", include_str!("../../migrations/postgres/0006_idempotency.sql")),
    (7, "metadata version", include_str!("../../migrations/postgres/0007_metadata.sql")),
    (8, "identities", include_str!("../../migrations/postgres/0008_identities.sql")),
    (9, "staleness", include_str!("../../migrations/postgres/0009_staleness.sql")),
    (10, "batch_idempotency", include_str!("../../migrations/postgres/0010_batch_idempotency.sql")),
];

/// The NOTIFY channel every write announces itself on.
const CHANNEL: &str = "credvault_changes";

#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    /// Tags this daemon's notifications so it can ignore its own.
    instance: String,
    /// TLS done by the daemon itself (see `pg_tls`); the pool connects through it.
    _bridge: Option<std::sync::Arc<super::pg_tls::Bridge>>,
    /// Where the change feed LISTENs: one connection of its own, beside the query pool,
    /// so queries never wait behind it and it never waits behind them. To the main URL,
    /// or to `database_listen_url` (e.g. the main URL goes through a transaction-mode
    /// PgBouncer, which cannot hold a LISTEN).
    listen: (PgPool, Option<std::sync::Arc<super::pg_tls::Bridge>>),
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
    /// Pool size unless configured: enough for puts and misses from many callers to
    /// overlap their round trips.
    pub const DEFAULT_POOL: u32 = 16;

    /// Connects and applies migrations (under sqlx's advisory lock, so daemons starting
    /// together migrate once).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::connect_with_listener(url, None, max_connections).await
    }

    /// Like [`PgStore::connect`], with the change feed's connection made to `listen_url`
    /// (the same database reached another way) instead of `url`.
    pub async fn connect_with_listener(
        url: &str,
        listen_url: Option<&str>,
        max_connections: u32,
    ) -> Result<Self, StoreError> {
        let (pool, bridge) = Self::open_pool(url, max_connections, "credvault").await?;
        let listen = Self::open_pool(listen_url.unwrap_or(url), 1, "credvault-listener").await?;
        sql::migrator(MIGRATIONS).run(&pool).await?;
        Ok(PgStore { pool, instance: format!("{:016x}", rand::random::<u64>()), _bridge: bridge, listen })
    }

    async fn open_pool(
        url: &str,
        max_connections: u32,
        application_name: &str,
    ) -> Result<(PgPool, Option<std::sync::Arc<super::pg_tls::Bridge>>), StoreError> {
        let (options, bridge_spec) = connect_options(url)?;
        let (host, port, mode) = (options.get_host().to_owned(), options.get_port(), options.get_ssl_mode());
        let tls_error = |e: &dyn fmt::Display| {
            let message = format!("PostgreSQL at {host}:{port} with sslmode={}: {e}", mode_name(mode));
            StoreError::Unavailable(sqlx::Error::Tls(message.into()))
        };
        let (options, bridge) = match &bridge_spec {
            None => (options, None),
            Some(spec) => {
                let bridge = super::pg_tls::start(spec, &host, port).await.map_err(|e| match e.kind() {
                    // A refused certificate or a bad CA file; anything else is the network.
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => tls_error(&e),
                    _ => StoreError::Unavailable(sqlx::Error::Io(e)),
                })?;
                let options = options.socket(bridge.socket_dir()).ssl_mode(PgSslMode::Disable);
                (options, Some(std::sync::Arc::new(bridge)))
            }
        };
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.application_name(application_name))
            .await
            .map_err(|e| {
                // A handshake failure (the driver reports a refused certificate as invalid
                // I/O data): say which server and which mode, which its message does not.
                let handshake = match &e {
                    sqlx::Error::Tls(_) => true,
                    sqlx::Error::Io(io) => io.kind() == std::io::ErrorKind::InvalidData,
                    _ => false,
                };
                if !handshake || matches!(mode, PgSslMode::Disable) {
                    return StoreError::from(e);
                }
                tls_error(&e)
            })?;
        let verified = matches!(mode, PgSslMode::VerifyCa | PgSslMode::VerifyFull);
        let loopback = host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
        if !verified && !loopback && !host.starts_with('/') {
            tracing::warn!(%host, port, sslmode = mode_name(mode), "the PostgreSQL server's certificate is not verified; use sslmode=verify-full with sslrootcert=<CA file> outside a trusted network");
        } else {
            tracing::info!(%host, port, sslmode = mode_name(mode), application_name, "connected to PostgreSQL");
        }
        Ok((pool, bridge))
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

#[async_trait]
impl SqlBackend for PgStore {
    type DB = Postgres;

    const ACTIVE_KEK_CHECK: &'static str = "SELECT state FROM keks WHERE id = $1 FOR SHARE";
    /// This mode conflicts with itself, so of two daemons starting on an empty database
    /// the second sees the first's root token.
    const FIRST_TOKEN_LOCK: Option<&'static str> = Some("LOCK TABLE tokens IN SHARE ROW EXCLUSIVE MODE");
    const LOCK_ACTIVE_KEK: &'static str = "SELECT id FROM keks WHERE state = 'active' FOR UPDATE";
    /// The index of migration 0005 is on the `"C"` collation.
    const LIVE_TOKEN_RANGE: &'static str = "SELECT * FROM tokens WHERE token_hash COLLATE \"C\" >= $1 \
         AND token_hash COLLATE \"C\" < $2 AND revoked_at IS NULL ORDER BY token_hash COLLATE \"C\" LIMIT $3";

    fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `pg_notify`, tagged with this daemon's instance id so it can skip its own.
    async fn notify(&self, tx: &mut Tx<'_>, message: &str) -> Result<(), StoreError> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(format!("{}\t{message}", self.instance))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    /// `= ANY($1)` with the names as one array.
    async fn current_many(&self, names: &[String]) -> Result<Vec<PgRow>, StoreError> {
        let q = format!(
            "SELECT {}, {} FROM credentials c JOIN credential_versions v \
             ON v.name = c.name AND v.version = c.current_version WHERE c.name = ANY($1)",
            sql::CRED_COLS,
            sql::VERSION_COLS
        );
        Ok(sqlx::query(&q).bind(names).fetch_all(&self.pool).await?)
    }

    /// One `UPDATE … FROM UNNEST(…)` for the whole batch.
    async fn apply_rewrap(&self, tx: &mut Tx<'_>, new_kek: i64, rows: &[Rewrapped]) -> Result<u64, StoreError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let names: Vec<&str> = rows.iter().map(|r| r.old.name.as_str()).collect();
        let versions: Vec<i64> = rows.iter().map(|r| sql::to_db(r.old.version)).collect();
        let old_wrapped: Vec<&[u8]> = rows.iter().map(|r| r.old.wrapped_dek.as_slice()).collect();
        let wrapped: Vec<&[u8]> = rows.iter().map(|r| r.wrapped_dek.as_slice()).collect();
        // One primary-key probe per row keeps a batch's cost flat as the table grows.
        // Left alone, the planner hash-joins the batch against the whole table, or (with
        // statistics taken while the table was small) intersects the primary key with the
        // whole kek_id index for every row: 0.8 s a batch at 50,000 versions. So joins
        // other than nested loops are off for this transaction, and the row is matched on
        // its key and its old wrapped bytes only (those bytes are bound to their KEK by
        // their associated data, so they stand for the KEK too).
        sqlx::query("SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)")
            .execute(&mut **tx)
            .await?;
        let n = sqlx::query(
            "UPDATE credential_versions AS v SET kek_id = $1, wrapped_dek = u.w \
             FROM UNNEST($2::text[], $3::bigint[], $4::bytea[], $5::bytea[]) AS u(name, version, old_w, w) \
             WHERE v.name = u.name AND v.version = u.version AND v.wrapped_dek = u.old_w",
        )
        .bind(new_kek)
        .bind(names)
        .bind(versions)
        .bind(old_wrapped)
        .bind(wrapped)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// The batch travels as one array per column, so every batch size uses the same
    /// statement.
    async fn insert_audit_batch(&self, events: &[AuditRow]) -> Result<(), StoreError> {
        let col = |f: fn(&AuditRow) -> String| events.iter().map(f).collect::<Vec<String>>();
        let at: Vec<i64> = events.iter().map(|e| e.at).collect();
        let credential: Vec<Option<String>> = events.iter().map(|e| e.credential.clone()).collect();
        let version: Vec<Option<i64>> = events.iter().map(|e| e.version.map(sql::to_db)).collect();
        let latency: Vec<i64> = events.iter().map(|e| sql::to_db(e.latency_us)).collect();
        let q = format!(
            "INSERT INTO audit_log ({}) SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::bigint[], $8::text[], $9::bigint[], $10::text[], $11::bigint[], $12::bigint[])",
            sql::AUDIT_COLS
        );
        sqlx::query(&q)
            .bind(at)
            .bind(col(|e| e.request_id.clone()))
            .bind(col(|e| e.token_id.clone()))
            .bind(col(|e| e.token_name.clone()))
            .bind(col(|e| e.rpc.clone()))
            .bind(credential)
            .bind(version)
            .bind(col(|e| e.code.clone()))
            .bind(latency)
            .bind(col(|e| e.peer.clone()))
            .bind(events.iter().map(|e| sql::to_db(e.count)).collect::<Vec<i64>>())
            .bind(events.iter().map(|e| e.last_at).collect::<Vec<Option<i64>>>())
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Store for PgStore {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// A fresh connection (not one of the pool's) and `SELECT 1`: tells a database that
    /// cannot be reached from a pool whose connections are all busy.
    async fn reach(&self) -> Result<(), StoreError> {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect_with(&self.pool.connect_options()).await?;
        sqlx::query("SELECT 1").execute(&mut conn).await?;
        conn.close().await?;
        Ok(())
    }

    fn pool_stats(&self) -> PoolStats {
        PoolStats { size: self.pool.size(), idle: self.pool.num_idle() }
    }

    /// LISTENs for other daemons' writes. On any loss of the listening connection it
    /// reports [`Change::Lost`] (once per loss), re-subscribes with backoff, and then
    /// reports [`Change::Resync`]: notifications sent while it was away are gone, so
    /// whatever was cached before must be revalidated.
    async fn watch_changes(&self, sink: ChangeSink, mut shutdown: watch::Receiver<bool>) -> Result<(), StoreError> {
        let mut backoff = FEED_FIRST_BACKOFF;
        // Lost is reported once per loss, not once per failed attempt.
        let mut lost_reported = false;
        while !*shutdown.borrow() {
            let subscribed = async {
                let mut l = PgListener::connect_with(&self.listen.0).await?;
                // Report a closed connection at once. Eagerly, `try_recv` would first wait
                // for the pool to connect again (up to its acquire timeout, 5 s) and only
                // then say the connection was lost, so an outage went unnoticed, and the
                // cache trusted, that long. This loop re-subscribes by itself.
                l.eager_reconnect(false);
                l.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = shutdown.changed() => return Ok(()),
                l = subscribed => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot subscribe to change notifications; retrying");
                        if !lost_reported {
                            sink(Change::Lost);
                            lost_reported = true;
                        }
                        tokio::select! {
                            _ = shutdown.changed() => return Ok(()),
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(FEED_MAX_BACKOFF);
                        continue;
                    }
                },
            };
            backoff = FEED_FIRST_BACKOFF;
            sink(Change::Resync);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return Ok(()),
                    n = listener.try_recv() => match n {
                        Ok(Some(n)) => {
                            match n.payload().split_once('\t') {
                                Some((from, _)) if from == self.instance => {}
                                Some((_, message)) => match super::decode_change(message) {
                                    Some(change) => sink(change),
                                    None => tracing::warn!("ignoring a malformed change notification"),
                                },
                                None => tracing::warn!("ignoring a malformed change notification"),
                            }
                        }
                        Ok(None) | Err(_) => {
                            tracing::warn!("change notification connection lost; the cache is unverified until it resyncs");
                            sink(Change::Lost);
                            lost_reported = true;
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The feed's first wait before re-subscribing; it doubles per failed attempt.
const FEED_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Short, so the cache is trusted again soon after the store returns (each attempt
/// also waits for the pool to connect).
const FEED_MAX_BACKOFF: Duration = Duration::from_secs(1);

type Tx<'a> = Transaction<'a, Postgres>;

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

/// Parses a `postgres://` URL into the driver's options, and says whether the daemon
/// must do the TLS itself (see `pg_tls`). libpq's rules, where sqlx 0.8 with rustls
/// reads `sslmode` and `sslrootcert` differently:
///
/// - `verify-ca` checks the chain against `sslrootcert` only, never the name (sqlx
///   fails on any name mismatch and would trust the public roots too); it needs
///   `sslrootcert`.
/// - `verify-full` with `sslrootcert=<file>` trusts that CA only (sqlx would trust the
///   public web roots besides it).
/// - `require` with `sslrootcert=<file>` is `verify-ca` (sqlx would ignore the file).
/// - `sslrootcert=system` means the public roots (sqlx would open a file named
///   `system`) and requires `verify-full`, the mode it implies when none is given.
///
/// `PGSSLMODE`/`PGSSLROOTCERT`/`PGSSLCERT`/`PGSSLKEY` count as URL settings, as in libpq.
pub(crate) fn connect_options(url: &str) -> Result<(PgConnectOptions, Option<pg_tls::BridgeSpec>), StoreError> {
    let config = |m: String| StoreError::Unavailable(sqlx::Error::Configuration(m.into()));
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut root_cert = env("PGSSLROOTCERT");
    let (mut client_cert, mut client_key) = (env("PGSSLCERT"), env("PGSSLKEY"));
    let mut mode_given = env("PGSSLMODE").is_some();
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslrootcert" | "ssl-root-cert" | "ssl-ca" => {
                root_cert = Some(percent_decode(value));
                if value == "system" {
                    continue;
                }
            }
            "sslcert" | "ssl-cert" => client_cert = Some(percent_decode(value)),
            "sslkey" | "ssl-key" => client_key = Some(percent_decode(value)),
            "sslmode" | "ssl-mode" => mode_given = true,
            _ => {}
        }
        kept.push(pair);
    }
    let system_roots = root_cert.as_deref() == Some("system");
    let ca_file = root_cert.filter(|_| !system_roots).map(PathBuf::from);
    let rebuilt = if kept.is_empty() { base.to_owned() } else { format!("{base}?{}", kept.join("&")) };
    let options: PgConnectOptions = rebuilt.parse().map_err(StoreError::Unavailable)?;
    let mode = match options.get_ssl_mode() {
        _ if system_roots && !mode_given => PgSslMode::VerifyFull,
        PgSslMode::VerifyFull => PgSslMode::VerifyFull,
        m if system_roots => {
            return Err(config(format!(
                "sslrootcert=system needs sslmode=verify-full (it was {}): the public roots prove \
                 nothing without the host name check",
                mode_name(m)
            )))
        }
        PgSslMode::Require if ca_file.is_some() => PgSslMode::VerifyCa,
        PgSslMode::VerifyCa if ca_file.is_none() => {
            return Err(config(
                "sslmode=verify-ca needs sslrootcert=<file> naming the CA that signed the server's \
                 certificate (or use sslmode=verify-full, which also checks the host name)"
                    .to_owned(),
            ))
        }
        m => m,
    };
    let bridge = match (mode, ca_file) {
        (PgSslMode::VerifyCa | PgSslMode::VerifyFull, Some(root_cert)) => {
            if options.get_socket().is_some() {
                return Err(config("TLS cannot be used over a Unix socket; give a host name".to_owned()));
            }
            let client = match (client_cert, client_key) {
                (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
                (None, None) => None,
                _ => return Err(config("sslcert and sslkey must be given together".to_owned())),
            };
            Some(pg_tls::BridgeSpec { root_cert, check_name: matches!(mode, PgSslMode::VerifyFull), client })
        }
        _ => None,
    };
    Ok((options.ssl_mode(mode), bridge))
}

/// Decodes `%XX` escapes in a URL parameter (paths of certificate files).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        match (b[i], b.get(i + 1).copied().and_then(hex), b.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
