//! Layered settings: defaults < TOML file < `CREDVAULT_*` environment < flags.
//! clap reads each flag and its environment variable (flag wins); the file fills in
//! whatever neither set.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use crate::audit::{AuditSettings, AuditSink};
use crate::cache::{CacheSettings, PlaintextPolicy};
use crate::crypto::KdfParams;
use crate::unlock::MasterKeySpec;
use crate::vault::{Limits, RotationSettings};

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

/// A database URL whose `Debug` hides any password.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A `postgres://` URL without a password gets `password` (percent-encoded); any
    /// other URL is returned as it is.
    pub fn with_default_password(&self, password: &str) -> DatabaseUrl {
        let u = &self.0;
        let Some(s) = ["postgres://", "postgresql://"].iter().find(|p| u.starts_with(**p)).map(|p| p.len()) else {
            return self.clone();
        };
        let authority_end = u[s..].find(['/', '?']).map_or(u.len(), |i| s + i);
        // No user: an empty one keeps the driver's default (PGUSER, else the OS user).
        let at = u[s..authority_end].rfind('@').map_or(s, |i| s + i);
        if u[s..at].contains(':') {
            return self.clone();
        }
        let mut encoded = String::with_capacity(password.len() * 3);
        for b in password.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                encoded.push(char::from(b));
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                encoded.extend(['%', char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)])]);
            }
        }
        let rest = if at == s { format!("@{}", &u[s..]) } else { u[at..].to_owned() };
        let out = DatabaseUrl(format!("{}:{encoded}{rest}", &u[..at]));
        zeroize::Zeroize::zeroize(&mut encoded);
        out
    }

    /// The URL with its password replaced by `REDACTED`.
    pub fn redacted(&self) -> String {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let userinfo = &self.0[s + 3..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let masked = if userinfo.contains(':') { format!("{user}:REDACTED") } else { user.to_owned() };
                format!("{}{masked}{}", &self.0[..s + 3], &self.0[at..])
            }
            _ => self.0.clone(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
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
    pub limits: Limits,
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
            limits: Limits::default(),
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

/// `serve` flags; each also reads its `CREDVAULT_*` variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "CREDVAULT_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:7420].
    #[arg(long, env = "CREDVAULT_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Metrics listen address [default: 127.0.0.1:7421].
    #[arg(long, env = "CREDVAULT_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Data directory for SQLite and the generated key file [default: ./credvault-data].
    #[arg(long, env = "CREDVAULT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// postgres://user@host/db, or sqlite://path [default: SQLite in the data directory].
    #[arg(long, env = "CREDVAULT_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// postgres://user@host/db for the change feed's LISTEN connection, when the main URL
    /// goes through a pooler that cannot hold one [default: the main pool].
    #[arg(long, env = "CREDVAULT_DATABASE_LISTEN_URL", hide_env_values = true)]
    pub database_listen_url: Option<String>,
    #[arg(long, env = "CREDVAULT_DB_MAX_CONNECTIONS")]
    pub db_max_connections: Option<u32>,
    /// Master key file (32 raw bytes or 64 hex characters).
    #[arg(long, env = "CREDVAULT_MASTER_KEY_FILE")]
    pub master_key_file: Option<PathBuf>,
    /// File holding the passphrase the master key is derived from (CREDVAULT_PASSPHRASE also works).
    #[arg(long, env = "CREDVAULT_PASSPHRASE_FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Accept a key or passphrase file that group or others may access.
    #[arg(long, env = "CREDVAULT_ALLOW_INSECURE_KEY_PERMISSIONS")]
    pub allow_insecure_key_permissions: bool,
    /// Versions kept per credential [default: 10].
    #[arg(long, env = "CREDVAULT_MAX_VERSIONS")]
    pub max_versions: Option<u64>,
    /// Largest accepted value in bytes [default: 65536].
    #[arg(long, env = "CREDVAULT_MAX_VALUE_BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Tokio worker threads [default: one per core].
    #[arg(long, env = "CREDVAULT_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    #[arg(long, env = "CREDVAULT_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Seconds in-flight requests may finish after SIGTERM/SIGINT [default: 10].
    #[arg(long, env = "CREDVAULT_SHUTDOWN_GRACE_SECONDS")]
    pub shutdown_grace_seconds: Option<u64>,
    /// PEM certificate chain for the gRPC listener (enables TLS; needs --tls-key).
    #[arg(long, env = "CREDVAULT_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "CREDVAULT_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle: require client certificates signed by it (mutual TLS).
    #[arg(long, env = "CREDVAULT_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Cached credentials at most [default: 10000].
    #[arg(long, env = "CREDVAULT_CACHE_MAX_ENTRIES")]
    pub cache_max_entries: Option<usize>,
    /// Seconds a cached credential may be served [default: 300].
    #[arg(long, env = "CREDVAULT_CACHE_TTL_SECONDS")]
    pub cache_ttl_seconds: Option<u64>,
    /// Keep decrypted values in the cache (memoize) or decrypt on every read (per-read).
    #[arg(long, env = "CREDVAULT_CACHE_PLAINTEXT", value_parser = parse_plaintext)]
    pub cache_plaintext: Option<PlaintextPolicy>,
    /// Seconds cached credentials are still served (marked stale) while the store is
    /// unreachable; 0 fails closed [default: 300].
    #[arg(long, env = "CREDVAULT_CACHE_SERVE_STALE_SECONDS")]
    pub cache_serve_stale_seconds: Option<u64>,
    /// Open client connections at most [default: 1024].
    #[arg(long, env = "CREDVAULT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
}

fn parse_plaintext(s: &str) -> Result<PlaintextPolicy, String> {
    match s {
        "memoize" => Ok(PlaintextPolicy::Memoize),
        "per-read" => Ok(PlaintextPolicy::PerRead),
        _ => Err(format!("{s:?}: expected memoize or per-read")),
    }
}

impl Settings {
    /// Resolves the layers. The passphrase comes from `CREDVAULT_PASSPHRASE` or the
    /// passphrase file only: never from a flag, where it would show in `ps`.
    pub fn load(args: &ServeArgs) -> Result<Settings, ConfigError> {
        let mut s = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Settings::default(),
        };
        macro_rules! take {
            ($($field:ident),*) => {$( if let Some(v) = args.$field.clone() { s.$field = v.into(); } )*};
        }
        take!(listen, metrics_listen, data_dir, db_max_connections, log_format, shutdown_grace_seconds);
        if let Some(url) = &args.database_url {
            s.database_url = Some(DatabaseUrl::new(url.clone()));
        }
        if let Some(url) = &args.database_listen_url {
            s.database_listen_url = Some(DatabaseUrl::new(url.clone()));
        }
        // `serve` removes PGPASSWORD from the environment before the driver would read it
        // (see `unlock::scrub_environment`), so it travels inside the URL instead.
        if let Ok(password) = std::env::var("PGPASSWORD") {
            let password = zeroize::Zeroizing::new(password);
            for url in [&mut s.database_url, &mut s.database_listen_url].into_iter().flatten() {
                *url = url.with_default_password(&password);
            }
        }
        if args.master_key_file.is_some() {
            s.master_key_file = args.master_key_file.clone();
        }
        if args.passphrase_file.is_some() {
            s.passphrase_file = args.passphrase_file.clone();
        }
        if args.allow_insecure_key_permissions {
            s.allow_insecure_key_permissions = true;
        }
        if args.worker_threads.is_some() {
            s.worker_threads = args.worker_threads;
        }
        if let Some(v) = args.max_versions {
            s.limits.max_versions = v;
        }
        if let Some(v) = args.max_value_bytes {
            s.limits.max_value_bytes = v;
        }
        if let (Some(cert_file), Some(key_file)) = (&args.tls_cert, &args.tls_key) {
            // A new certificate from a flag keeps the file's client CA: dropping it would
            // silently turn mutual TLS off.
            let file_ca = s.tls.as_ref().and_then(|t| t.client_ca_file.clone());
            s.tls = Some(TlsSettings {
                cert_file: cert_file.clone(),
                key_file: key_file.clone(),
                client_ca_file: args.tls_client_ca.clone().or(file_ca),
            });
        }
        if let Some(v) = args.cache_max_entries {
            s.cache.max_entries = v;
        }
        if let Some(v) = args.cache_ttl_seconds {
            s.cache.ttl_ms = v.saturating_mul(1000);
        }
        if let Some(v) = args.cache_plaintext {
            s.cache.plaintext = v;
        }
        if let Some(v) = args.cache_serve_stale_seconds {
            s.cache.serve_stale_seconds = v;
        }
        if let Some(v) = args.max_connections {
            s.transport.max_connections = v;
        }
        s.passphrase = match (std::env::var("CREDVAULT_PASSPHRASE").ok(), &s.passphrase_file) {
            (Some(p), _) => Some(SecretString::from(p)),
            (None, Some(path)) => Some(read_passphrase(path, s.allow_insecure_key_permissions)?),
            (None, None) => None,
        };
        s.validate()?;
        Ok(s)
    }

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

fn read_passphrase(path: &Path, allow_insecure: bool) -> Result<SecretString, ConfigError> {
    crate::unlock::check_private_file(path, "passphrase file", allow_insecure)?;
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?,
    );
    let trimmed = text.trim_end_matches(['\r', '\n']);
    if trimmed.is_empty() {
        return Err(ConfigError::Invalid(format!("passphrase file {} is empty", path.display())));
    }
    Ok(SecretString::from(trimmed.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_debug_hides_the_password() {
        let u = DatabaseUrl::new("postgres://app:s3cret@db:5432/vault");
        assert_eq!(format!("{u:?}"), "\"postgres://app:REDACTED@db:5432/vault\"");
        assert_eq!(DatabaseUrl::new("postgres://app@db/v").redacted(), "postgres://app@db/v");
    }

    #[test]
    fn pgpassword_fills_a_url_without_a_password() {
        let u = DatabaseUrl::new("postgres://app@db:5432/vault?sslmode=require");
        assert_eq!(
            u.with_default_password("p@ss:w/rd").expose(),
            "postgres://app:p%40ss%3Aw%2Frd@db:5432/vault?sslmode=require"
        );
        let has = DatabaseUrl::new("postgresql://app:own@db/vault");
        assert_eq!(has.with_default_password("x").expose(), "postgresql://app:own@db/vault");
        let no_user = DatabaseUrl::new("postgres://db/vault");
        assert_eq!(no_user.with_default_password("x").expose(), "postgres://:x@db/vault");
        assert_eq!(format!("{:?}", no_user.with_default_password("x")), "\"postgres://:REDACTED@db/vault\"");
        let sqlite = DatabaseUrl::new("sqlite://a@b");
        assert_eq!(sqlite.with_default_password("x").expose(), "sqlite://a@b");
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:9000\"\n[limits]\nmax_versions = 3\n").unwrap();
        let args = ServeArgs { config: Some(path.clone()), max_versions: Some(5), ..Default::default() };
        let s = Settings::load(&args).unwrap();
        assert_eq!(s.listen.port(), 9000);
        assert_eq!(s.limits.max_versions, 5);
        std::fs::write(&path, "lisen = 1\n").unwrap();
        assert!(matches!(Settings::from_file(&path), Err(ConfigError::Parse { .. })));
    }

    #[test]
    fn a_certificate_flag_keeps_the_files_client_ca() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\nclient_ca_file = \"ca.pem\"\n")
            .unwrap();
        let args = ServeArgs {
            config: Some(path),
            tls_cert: Some("b.pem".into()),
            tls_key: Some("b.key".into()),
            ..Default::default()
        };
        let s = Settings::load(&args).unwrap();
        let tls = s.tls.unwrap();
        assert_eq!((tls.cert_file, tls.client_ca_file), (PathBuf::from("b.pem"), Some(PathBuf::from("ca.pem"))));
    }

    #[test]
    fn serve_stale_seconds_from_file_and_flag() {
        assert_eq!(Settings::default().cache.serve_stale_seconds, 300);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[cache]\nserve_stale_seconds = 0\n").unwrap();
        let args = ServeArgs { config: Some(path.clone()), ..Default::default() };
        assert_eq!(Settings::load(&args).unwrap().cache.serve_stale_seconds, 0, "0 fails closed");
        let args = ServeArgs { config: Some(path), cache_serve_stale_seconds: Some(60), ..Default::default() };
        assert_eq!(Settings::load(&args).unwrap().cache.serve_stale_seconds, 60, "the flag wins");
    }

    #[test]
    fn zero_concurrency_is_refused() {
        let mut s = Settings::default();
        s.limits.max_concurrent_requests = 0;
        assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("max_concurrent_requests")));
    }

    #[test]
    fn transport_section_parses_and_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[transport]\nmax_connections = 7\nkeepalive_timeout_ms = 0\n").unwrap();
        let s = Settings::from_file(&path).unwrap();
        assert_eq!(s.transport.max_connections, 7);
        assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("transport.keepalive_timeout_ms")));
        let args = ServeArgs { config: Some(path.clone()), max_connections: Some(0), ..Default::default() };
        std::fs::write(&path, "[transport]\nmax_concurrent_streams = 10\n").unwrap();
        assert!(matches!(Settings::load(&args), Err(ConfigError::Invalid(m)) if m.contains("max_connections")));
    }

    #[test]
    fn pool_size_and_audit_flush_interval_are_bounded() {
        let s = Settings { db_max_connections: Some(0), ..Settings::default() };
        assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("db_max_connections")));
        let mut s = Settings::default();
        assert_eq!(s.db_max_connections, None, "unset: each backend's own default");
        s.audit.flush_interval_ms = 10_001;
        assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("flush_interval_ms")));
        s.audit.flush_interval_ms = 0;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn a_listen_url_needs_postgres_on_both_sides() {
        let listen = Some(DatabaseUrl::new("postgres://app:pw@db-direct:5432/vault"));
        let sqlite = Settings { database_listen_url: listen.clone(), ..Settings::default() };
        assert!(matches!(sqlite.validate(), Err(ConfigError::Invalid(m)) if m.contains("is for PostgreSQL")));
        let pg = Some(DatabaseUrl::new("postgres://app:pw@pgbouncer:6432/vault"));
        let ok = Settings { database_url: pg.clone(), database_listen_url: listen, ..Settings::default() };
        assert!(ok.validate().is_ok());
        let bad = Settings {
            database_url: pg,
            database_listen_url: Some(DatabaseUrl::new("mysql://app:secretpw@db/vault")),
            ..Settings::default()
        };
        let Err(ConfigError::Invalid(m)) = bad.validate() else { panic!("accepted a mysql listen URL") };
        assert!(m.contains("database_listen_url") && !m.contains("secretpw"), "{m}");
    }

    #[test]
    fn defaults_use_sqlite_and_a_generated_key_file() {
        let s = Settings::default();
        assert_eq!(s.storage().unwrap(), StorageTarget::Sqlite(PathBuf::from("./credvault-data/credvault.db")));
        assert!(matches!(s.master_key_spec(), MasterKeySpec::KeyFile { create: true, .. }));
        let bad = Settings { database_url: Some(DatabaseUrl::new("mysql://x")), ..Settings::default() };
        assert!(bad.validate().is_err());
    }
}
