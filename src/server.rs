//! Builds a daemon from [`Settings`]: storage, keys, tokens, services, listener. Then
//! runs it until a shutdown future completes; the future is a parameter so tests (and
//! `main`'s signal handler) decide when to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;

use crate::auth::Auth;
use crate::config::{ConfigError, Settings, StorageTarget};
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::credential_service_server::CredentialServiceServer;
use crate::service::{AdminApi, AuthInterceptor, CredentialApi};
use crate::store::{now_micros, Micros, PgStore, SqliteStore, Store, StoreError};
use crate::unlock::{unlock, UnlockError};
use crate::vault::Vault;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot open storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot unlock keys: {0}")]
    Unlock(#[from] UnlockError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot create data directory {path}: {source}")]
    DataDir { path: std::path::PathBuf, source: std::io::Error },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(String),
}

/// A daemon that is built, unlocked and bound, but not yet serving.
pub struct Daemon {
    settings: Settings,
    store: Arc<dyn Store>,
    vault: Vault,
    auth: Auth,
    listener: TcpListener,
    root_token: Option<SecretString>,
    started_at: Micros,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

/// Opens the configured store and applies its migrations.
pub async fn open_store(settings: &Settings) -> Result<Arc<dyn Store>, ServerError> {
    Ok(match settings.storage()? {
        StorageTarget::Postgres(url) => Arc::new(PgStore::connect(&url, settings.db_max_connections).await?),
        StorageTarget::Sqlite(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| ServerError::DataDir { path: dir.into(), source })?;
            }
            Arc::new(SqliteStore::open(&path, settings.db_max_connections).await?)
        }
    })
}

impl Daemon {
    pub async fn build(settings: Settings) -> Result<Daemon, ServerError> {
        settings.validate()?;
        let store = open_store(&settings).await?;
        let keys = unlock(store.as_ref(), &settings.master_key_spec()).await?;
        let auth = Auth::load(store.as_ref()).await?;
        let root_token = auth.ensure_root_token(store.as_ref()).await?;
        let vault = Vault::new(store.clone(), keys, settings.limits.clone());
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: settings.listen, source })?;
        Ok(Daemon { settings, store, vault, auth, listener, root_token, started_at: now_micros() })
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.settings.listen)
    }

    /// The root token, if this start created it: returned once, to be shown once.
    pub fn take_root_token(&mut self) -> Option<SecretString> {
        self.root_token.take()
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let limits = &self.settings.limits;
        // A put carries the value plus name and metadata: allow the value limit plus room
        // for those, and no more.
        let max_request = limits.max_value_bytes + 64 * 1024;
        let interceptor = AuthInterceptor::new(self.auth.clone());
        let credentials = CredentialServiceServer::new(CredentialApi::new(self.vault.clone()))
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(limits.max_batch_size * (limits.max_value_bytes + 4096) + 4096);
        let admin = AdminServiceServer::new(AdminApi::new(
            self.vault.clone(),
            &self.settings.master_key_spec(),
            self.started_at,
        ))
        .max_decoding_message_size(max_request);

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<CredentialServiceServer<CredentialApi>>().await;
        health_reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        let addr = self.local_addr();
        tracing::info!(%addr, backend = self.store.backend().as_str(), "credvault serving gRPC");
        Server::builder()
            .tcp_nodelay(true)
            .add_service(health)
            .add_service(reflection)
            .add_service(InterceptedService::new(credentials, interceptor.clone()))
            .add_service(InterceptedService::new(admin, interceptor))
            .serve_with_incoming_shutdown(TcpListenerStream::new(self.listener), shutdown)
            .await?;
        tracing::info!("credvault stopped");
        Ok(())
    }
}
