//! Layered settings: defaults < TOML file < `CREDVAULT_*` environment < flags.
//! clap reads each flag and its environment variable (flag wins); the file fills in
//! whatever neither set.

mod args;
mod url;

pub use args::ServeArgs;
pub use url::DatabaseUrl;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::audit::{AuditSettings, AuditSink};
use crate::cache::CacheSettings;
use crate::crypto::KdfParams;
use crate::unlock::MasterKeySpec;
use crate::vault::{Limits, RotationSettings};

/// The `[limits]` section: the vault's request-size limits and the edge's concurrency
/// and token-rate limits, in one place for the operator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    pub max_value_bytes: usize,
    pub max_name_bytes: usize,
    pub max_batch_size: usize,
    pub max_page_size: u32,
    pub default_page_size: u32,
    /// Rows one `ListCredentials` request reads from the store at most, counting those
    /// the caller may not see; past it the page comes back short with a token to go on.
    pub max_list_scan_rows: usize,
    /// Versions kept per credential; older ones are pruned on write.
    pub max_versions: u64,
    pub max_labels: usize,
    /// Longest a single store call may take before the request fails with UNAVAILABLE.
    pub store_timeout_ms: u64,
    /// Requests in flight at most; beyond it requests are refused at once (the edge).
    pub max_concurrent_requests: usize,
    /// Requests per second for tokens without their own limit (0: unlimited; the edge).
    pub default_token_rate_per_second: u32,
    /// Writes (puts and deletes) per `WriteCredentials` request at most.
    pub max_write_batch_size: usize,
    /// How long an idempotency key is remembered after its write.
    pub idempotency_window_seconds: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        let v = Limits::default();
        LimitSettings {
            max_value_bytes: v.max_value_bytes,
            max_name_bytes: v.max_name_bytes,
            max_batch_size: v.max_batch_size,
            max_page_size: v.max_page_size,
            default_page_size: v.default_page_size,
            max_list_scan_rows: v.max_list_scan_rows,
            max_versions: v.max_versions,
            max_labels: v.max_labels,
            store_timeout_ms: v.store_timeout_ms,
            max_concurrent_requests: 1024,
            default_token_rate_per_second: 0,
            max_write_batch_size: v.max_write_batch_size,
            idempotency_window_seconds: v.idempotency_window_seconds,
        }
    }
}

impl LimitSettings {
    /// The part the vault enforces.
    pub fn vault(&self) -> Limits {
        Limits {
            max_value_bytes: self.max_value_bytes,
            max_name_bytes: self.max_name_bytes,
            max_batch_size: self.max_batch_size,
            max_page_size: self.max_page_size,
            default_page_size: self.default_page_size,
            max_list_scan_rows: self.max_list_scan_rows,
            max_versions: self.max_versions,
            max_labels: self.max_labels,
            store_timeout_ms: self.store_timeout_ms,
            max_write_batch_size: self.max_write_batch_size,
            idempotency_window_seconds: self.idempotency_window_seconds,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    InsecureFile(#[from] crate::unlock::InsecureFile),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdfSettings {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for KdfSettings {
    fn default() -> Self {
        let d = KdfParams::DEFAULT;
        KdfSettings { memory_kib: d.m_cost, iterations: d.t_cost, parallelism: d.p_cost }
    }
}

/// TLS for the gRPC listener. With `client_ca_file`, clients must present a certificate
/// signed by that CA (mutual TLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub client_ca_file: Option<PathBuf>,
}

/// Everything `serve` needs. Build it with [`Settings::load`], or directly in tests.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    pub metrics_listen: SocketAddr,
    /// Holds the SQLite file and the generated master key file.
    pub data_dir: PathBuf,
    /// `postgres://...` for PostgreSQL, `sqlite://PATH` for another SQLite file; unset:
    /// SQLite in `data_dir`.
    pub database_url: Option<DatabaseUrl>,
    /// PostgreSQL only: where the change feed LISTENs, on one connection of its own,
    /// when `database_url` cannot hold a LISTEN (a transaction-mode PgBouncer). The same
    /// database, reached directly. Unset: the feed uses a connection of the main pool.
    pub database_listen_url: Option<DatabaseUrl>,
    /// Database pool size; unset: 16 on PostgreSQL, 4 on SQLite (see
    /// [`Settings::pool_size`]).
    pub db_max_connections: Option<u32>,
    /// A 32-byte master key file. Default `data_dir/master.key`, generated on first start.
    pub master_key_file: Option<PathBuf>,
    /// Derive the master key from the passphrase in this file (Argon2id) instead.
    pub passphrase_file: Option<PathBuf>,
    /// Accept a key or passphrase file that group or others may access (refused by
    /// default, as ssh refuses such private keys).
    pub allow_insecure_key_permissions: bool,
    /// Set from `CREDVAULT_PASSPHRASE` or `passphrase_file`; never read from the TOML file.
    #[serde(skip)]
    pub passphrase: Option<SecretString>,
    /// Argon2id cost used when a passphrase database is created (an existing database
    /// keeps the parameters it was created with).
    pub kdf: KdfSettings,
    /// Tokio worker threads; unset: one per core.
    pub worker_threads: Option<usize>,
    pub log_format: LogFormat,
    /// On SIGTERM/SIGINT, how long in-flight unary requests may run before they are
    /// cancelled (streams end at once with UNAVAILABLE).
    pub shutdown_grace_seconds: u64,
    /// Every so often each daemon reloads the whole token table, a backstop to change
    /// notifications: a token revoked elsewhere stops working here within this period
    /// even if the notification was lost.
    pub token_resync_seconds: u64,
    pub limits: LimitSettings,
    pub cache: CacheSettings,
    pub audit: AuditSettings,
    /// Unset: plaintext gRPC (fine on loopback; use TLS anywhere else).
    pub tls: Option<TlsSettings>,
    pub rotation: RotationSettings,
    /// Connections, HTTP/2, body time limit, per-token and stream caps.
    pub transport: crate::limits::TransportSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7420)),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 7421)),
            data_dir: PathBuf::from("./credvault-data"),
            database_url: None,
            database_listen_url: None,
            db_max_connections: None,
            master_key_file: None,
            passphrase_file: None,
            allow_insecure_key_permissions: false,
            passphrase: None,
            kdf: KdfSettings::default(),
            worker_threads: None,
            log_format: LogFormat::Text,
            shutdown_grace_seconds: 10,
            token_resync_seconds: 30,
            limits: LimitSettings::default(),
            cache: CacheSettings::default(),
            audit: AuditSettings::default(),
            tls: None,
            rotation: RotationSettings::default(),
            transport: crate::limits::TransportSettings::default(),
        }
    }
}

/// Where credentials live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageTarget {
    Postgres(String),
    Sqlite(PathBuf),
}

impl Settings {
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse { path: path.into(), message: e.to_string() })
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_versions == 0 {
            return bad("limits.max_versions must be at least 1");
        }
        if l.max_value_bytes == 0 || l.max_value_bytes > 16 * 1024 * 1024 {
            return bad("limits.max_value_bytes must be between 1 and 16 MiB");
        }
        if l.max_page_size == 0 || l.default_page_size == 0 || l.default_page_size > l.max_page_size {
            return bad("limits: need 0 < default_page_size <= max_page_size");
        }
        if l.max_concurrent_requests == 0 {
            return bad("limits.max_concurrent_requests must be at least 1 (0 would refuse every request)");
        }
        if l.max_write_batch_size == 0 || l.idempotency_window_seconds == 0 {
            return bad("limits: max_write_batch_size and idempotency_window_seconds must be at least 1");
        }
        if l.max_batch_size == 0 || l.max_name_bytes == 0 || l.max_name_bytes > 1024 {
            return bad("limits: max_batch_size must be >= 1 and max_name_bytes between 1 and 1024");
        }
        if self.cache.enabled && (self.cache.max_entries == 0 || self.cache.max_bytes == 0 || self.cache.ttl_ms == 0) {
            return bad(
                "cache: max_entries, max_bytes and ttl_ms must be positive (set enabled = false to turn it off)",
            );
        }
        if matches!(self.audit.sink, AuditSink::File | AuditSink::Both) && self.audit.file.is_none() {
            return bad("audit.sink includes a file: set audit.file");
        }
        if self.audit.queue_capacity == 0 || self.audit.batch_size == 0 {
            return bad("audit.queue_capacity and audit.batch_size must be at least 1");
        }
        if self.audit.fold_reads_seconds > 3600 {
            return bad("audit.fold_reads_seconds must be at most 3600 (an hour)");
        }
        if self.audit.flush_interval_ms > 10_000 {
            return bad("audit.flush_interval_ms must be at most 10000 (10 s)");
        }
        if self.db_max_connections == Some(0) {
            return bad("db_max_connections must be at least 1");
        }
        self.rotation.validate().map_err(ConfigError::Invalid)?;
        self.transport.validate().map_err(ConfigError::Invalid)?;
        if self.worker_threads == Some(0) {
            return bad("worker_threads must be at least 1");
        }
        if self.shutdown_grace_seconds > 3600 {
            return bad("shutdown_grace_seconds must be at most 3600 (an hour)");
        }
        if self.token_resync_seconds == 0 || self.token_resync_seconds > 86_400 {
            return bad("token_resync_seconds must be between 1 and 86400 (1 day)");
        }
        let k = self.kdf;
        KdfParams { m_cost: k.memory_kib, t_cost: k.iterations, p_cost: k.parallelism }
            .check()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let storage = self.storage()?;
        if let Some(listen) = &self.database_listen_url {
            let u = listen.expose();
            if !matches!(storage, StorageTarget::Postgres(_)) {
                return Err(ConfigError::Invalid(
                    "database_listen_url is for PostgreSQL: set database_url to postgres://... too".into(),
                ));
            }
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                return Err(ConfigError::Invalid(format!(
                    "database_listen_url {} must start with postgres:// or postgresql://",
                    listen.redacted()
                )));
            }
        }
        Ok(())
    }

    pub fn storage(&self) -> Result<StorageTarget, ConfigError> {
        match &self.database_url {
            None => Ok(StorageTarget::Sqlite(self.data_dir.join("credvault.db"))),
            Some(url) => {
                let u = url.expose();
                if u.starts_with("postgres://") || u.starts_with("postgresql://") {
                    Ok(StorageTarget::Postgres(u.to_owned()))
                } else if let Some(path) = u.strip_prefix("sqlite://") {
                    Ok(StorageTarget::Sqlite(PathBuf::from(path)))
                } else {
                    Err(ConfigError::Invalid(format!(
                        "database_url {} must start with postgres://, postgresql:// or sqlite://",
                        url.redacted()
                    )))
                }
            }
        }
    }

    pub fn master_key_spec(&self) -> MasterKeySpec {
        match &self.passphrase {
            Some(p) => MasterKeySpec::Passphrase {
                passphrase: p.clone(),
                params: KdfParams {
                    m_cost: self.kdf.memory_kib,
                    t_cost: self.kdf.iterations,
                    p_cost: self.kdf.parallelism,
                },
            },
            None => match &self.master_key_file {
                // An explicitly named key file must exist: generating one silently could
                // hide a typo in the path.
                Some(path) => MasterKeySpec::KeyFile {
                    path: path.clone(),
                    create: false,
                    allow_insecure_permissions: self.allow_insecure_key_permissions,
                },
                None => MasterKeySpec::KeyFile {
                    path: self.data_dir.join("master.key"),
                    create: true,
                    allow_insecure_permissions: self.allow_insecure_key_permissions,
                },
            },
        }
    }
}

#[cfg(test)]
mod tests;
