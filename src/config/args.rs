//! The `serve` flags (each with its `CREDVAULT_*` variable) and how they layer over the
//! file and the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::SecretString;

use super::{ConfigError, DatabaseUrl, LogFormat, Settings, TlsSettings};
use crate::cache::PlaintextPolicy;

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
