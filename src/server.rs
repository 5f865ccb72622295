//! Builds a daemon from [`Settings`]: storage, keys, tokens, services, listener. Then
//! runs it until a shutdown future completes; the future is a parameter so tests (and
//! `main`'s signal handler) decide when to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use secrecy::SecretString;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;

use crate::auth::Auth;
use crate::config::{ConfigError, DatabaseUrl, Settings, StorageTarget};
use crate::proto::admin_service_server::AdminServiceServer;
use crate::proto::credential_service_server::CredentialServiceServer;
use crate::service::layers::AroundLayer;
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
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the Prometheus recorder could not be installed (another recorder is active)")]
    Metrics,
}

/// A daemon that is built, unlocked and bound, but not yet serving.
pub struct Daemon {
    settings: Settings,
    metrics_listener: TcpListener,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
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
        StorageTarget::Postgres(url) => Arc::new(
            PgStore::connect_with_listener(
                &url,
                settings.database_listen_url.as_ref().map(DatabaseUrl::expose),
                settings.db_max_connections.unwrap_or(PgStore::DEFAULT_POOL),
            )
            .await?,
        ),
        StorageTarget::Sqlite(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::unlock::create_private_dir(dir)
                    .map_err(|source| ServerError::DataDir { path: dir.into(), source })?;
            }
            Arc::new(SqliteStore::open(&path, settings.db_max_connections.unwrap_or(SqliteStore::DEFAULT_POOL)).await?)
        }
    })
}

fn tls_config(tls: &crate::config::TlsSettings) -> Result<tonic::transport::ServerTlsConfig, ServerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| ServerError::Tls(format!("{}: {e}", p.display())));
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(read(&tls.cert_file)?, read(&tls.key_file)?));
    if let Some(ca) = &tls.client_ca_file {
        config = config.client_ca_root(Certificate::from_pem(read(ca)?)).client_auth_optional(false);
    }
    Ok(config)
}

/// Accepted connections with `TCP_NODELAY` set. `Server::tcp_nodelay` applies only to
/// listeners tonic binds itself; without this, Nagle's algorithm holds back the part of
/// a response written after the first (the trailers) until the client's delayed ACK,
/// about 40 ms on Linux, on every request. (The bench's baseline server does the same.)
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// HTTP/2 settings from `[transport]`: streams per connection and keepalive pings. A
/// header block that stops mid-way blocks its whole connection, so the unanswered ping
/// closes it: the keepalive interval plus timeout bounds the time to receive headers.
fn transport_settings(server: Server, t: &crate::limits::TransportSettings) -> Server {
    use std::time::Duration;
    server
        .max_concurrent_streams(t.max_concurrent_streams)
        .http2_keepalive_interval(Some(Duration::from_millis(t.keepalive_interval_ms)))
        .http2_keepalive_timeout(Some(Duration::from_millis(t.keepalive_timeout_ms)))
}

impl Daemon {
    pub async fn build(settings: Settings) -> Result<Daemon, ServerError> {
        Self::build_with_clock(settings, Arc::new(crate::model::SystemClock)).await
    }

    /// [`Daemon::build`] with the vault reading the time of day from `clock`: tests pass a
    /// [`ManualClock`](crate::model::ManualClock) to run grace periods and schedules
    /// without waiting for them.
    pub async fn build_with_clock(
        settings: Settings,
        clock: Arc<dyn crate::model::Clock>,
    ) -> Result<Daemon, ServerError> {
        settings.validate()?;
        if let Some(tls) = &settings.tls {
            // Fail at start-up, not at the first handshake.
            tls_config(tls)?;
            for p in [&tls.cert_file, &tls.key_file] {
                if !p.is_file() {
                    return Err(ServerError::Tls(format!("{} is not a readable file", p.display())));
                }
            }
        }
        // Before anything creates metric handles, so they record into it.
        let metrics = crate::telemetry::install().ok_or(ServerError::Metrics)?;
        let store = open_store(&settings).await?;
        let keys = unlock(store.as_ref(), &settings.master_key_spec()).await?;
        let auth = Auth::load(store.as_ref(), settings.limits.default_token_rate_per_second).await?;
        let root_token = auth.ensure_root_token(store.as_ref()).await?;
        let vault = Vault::with_clock(
            store.clone(),
            keys,
            settings.limits.vault(),
            settings.cache.clone(),
            settings.rotation.clone(),
            clock,
        );
        let listener = TcpListener::bind(settings.listen)
            .await
            .map_err(|source| ServerError::Bind { addr: settings.listen, source })?;
        let metrics_listener = crate::telemetry::bind(settings.metrics_listen)
            .await
            .map_err(|source| ServerError::Bind { addr: settings.metrics_listen, source })?;
        Ok(Daemon {
            settings,
            metrics_listener,
            metrics,
            store: vault.store(),
            vault,
            auth,
            listener,
            root_token,
            started_at: now_micros(),
        })
    }

    /// The bound gRPC address (the real port when configured with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.settings.listen)
    }

    /// The bound metrics address.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_listener.local_addr().unwrap_or(self.settings.metrics_listen)
    }

    /// The root token, if this start created it: returned once, to be shown once.
    pub fn take_root_token(&mut self) -> Option<SecretString> {
        self.root_token.take()
    }

    pub fn vault(&self) -> &Vault {
        &self.vault
    }

    /// The token table requests are authenticated against.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// Serves until `shutdown` completes, then lets in-flight requests finish.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        let limits = &self.settings.limits;
        // A put carries the value plus name and metadata: allow the value limit plus room
        // for those, and no more.
        let max_request = limits.max_value_bytes + 64 * 1024;
        let interceptor = AuthInterceptor::new(self.auth.clone());
        let transport = &self.settings.transport;
        // One cap for WatchCredentials and WatchRotationJob streams together.
        let watch_streams = crate::limits::StreamLimiter::from_settings(transport);
        let credentials = CredentialServiceServer::new(
            CredentialApi::new(self.vault.clone(), self.auth.clone()).with_stream_limits(watch_streams.clone()),
        )
        .max_decoding_message_size(max_request)
        .max_encoding_message_size(limits.max_batch_size * (limits.max_value_bytes + 4096) + 4096);
        let admin = AdminServiceServer::new(
            AdminApi::new(self.vault.clone(), self.auth.clone(), &self.settings.master_key_spec(), self.started_at)
                .with_stream_limits(watch_streams),
        )
        .max_decoding_message_size(max_request);

        let (health_reporter, health) = tonic_health::server::health_reporter();
        health_reporter.set_serving::<CredentialServiceServer<CredentialApi>>().await;
        health_reporter.set_serving::<AdminServiceServer<AdminApi>>().await;
        // The overall status and the API services stay SERVING through a store outage
        // (cache hits are still answered); `credvault.store` follows the store breaker.
        let store_health = tokio::spawn(report_store_health(health_reporter.clone(), self.vault.store_reachable()));
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;
        // Older tools (grpcurl before 1.8.8, many language plugins) speak only v1alpha.
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| ServerError::Reflection(e.to_string()))?;

        // Background tasks stop when this flips to true.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        // The first Resync means the change feed is subscribed: only then is it safe to
        // fill the cache, since a fill made earlier could miss a notification.
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel::<()>();
        let subscribed_tx = std::sync::Mutex::new(Some(subscribed_tx));
        let vault = self.vault.clone();
        let auth = self.auth.clone();
        let sink: crate::store::ChangeSink = Arc::new(move |change| {
            use crate::store::Change;
            if matches!(change, Change::Keys | Change::Resync) {
                // Another daemon rotated the KEK (or we may have missed that it did).
                let vault = vault.clone();
                tokio::spawn(async move {
                    if let Err(e) = vault.reload_keys().await {
                        tracing::error!(error = %e, "cannot reload keys");
                    }
                });
            }
            // Tokens created or revoked by other daemons take effect here through the
            // one reload task (serialized, retried, coalesced): one entry per named
            // token, the whole table after a resync (changes missed while deaf) or a
            // change from an older daemon that did not name its token.
            match &change {
                Change::Token(hash) => auth.request_token(hash),
                Change::Tokens | Change::Resync => auth.request_reload(),
                _ => {}
            }
            if change == Change::Resync {
                if let Some(tx) = subscribed_tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(());
                }
            }
            vault.apply_change(change)
        });
        let feed_store = self.store.clone();
        let feed_stop = stop_rx.clone();
        // Backends without a feed return at once, which drops the sender: ready as well.
        let feed = tokio::spawn(async move {
            if let Err(e) = feed_store.watch_changes(sink, feed_stop).await {
                tracing::error!(error = %e, "change feed stopped");
            }
        });
        if tokio::time::timeout(std::time::Duration::from_secs(10), subscribed_rx).await.is_err() {
            tracing::warn!("change feed not subscribed after 10 s; serving anyway, the cache resyncs when it is");
            // What is cached before the subscription may miss notifications.
            self.vault.apply_change(crate::store::Change::Lost);
        }
        let (audit, audit_writer) = crate::audit::channel(&self.settings.audit, self.store.clone());
        let audit_task = audit_writer.map(|w| tokio::spawn(w.run(stop_rx.clone())));
        let metrics_addr = self.metrics_addr();
        let addr = self.local_addr();
        let token_reloads = tokio::spawn(self.auth.clone().run_reloads(
            self.store.clone(),
            std::time::Duration::from_secs(self.settings.token_resync_seconds),
            stop_rx.clone(),
        ));
        let scheduler = tokio::spawn(self.vault.clone().run_scheduler(stop_rx.clone()));
        let keeper = tokio::spawn(self.vault.clone().run_keeper(stop_rx.clone()));
        let jobs = tokio::spawn(self.vault.clone().run_jobs(stop_rx.clone()));
        let staleness = tokio::spawn(self.vault.clone().run_staleness(stop_rx.clone()));
        let idempotency_pruner = tokio::spawn(crate::vault::prune_idempotency_keys(
            self.vault.store(),
            {
                let vault = self.vault.clone();
                std::sync::Arc::new(move || vault.now())
            },
            IDEMPOTENCY_PRUNE_BATCH,
            IDEMPOTENCY_PRUNE_EVERY,
            stop_rx.clone(),
        ));
        let upkeep = tokio::spawn(crate::telemetry::run_upkeep(
            self.metrics.clone(),
            crate::telemetry::UPKEEP_INTERVAL,
            stop_rx.clone(),
        ));
        let metrics_server =
            tokio::spawn(crate::telemetry::serve(self.metrics_listener, self.metrics, self.store.clone(), stop_rx));

        // Draining: on `shutdown`, tonic stops accepting and sends GOAWAY; the drain layer
        // ends open streams with UNAVAILABLE; unary requests get the grace period.
        let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
        let grace = std::time::Duration::from_secs(self.settings.shutdown_grace_seconds);
        let drain_signal = {
            let (drain_tx, health_reporter) = (drain_tx.clone(), health_reporter.clone());
            async move {
                shutdown.await;
                tracing::info!(
                    grace_seconds = grace.as_secs(),
                    "draining: streams end now, requests get the grace period"
                );
                health_reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
                let _ = drain_tx.send(true);
            }
        };

        tracing::info!(%addr, %metrics_addr, backend = self.store.backend().as_str(), "credvault serving gRPC");
        let mut builder = transport_settings(Server::builder(), transport);
        if let Some(tls) = &self.settings.tls {
            builder = builder.tls_config(tls_config(tls)?)?;
        }
        let server = builder
            .layer(AroundLayer(crate::service::layers::metrics::RequestMetricsLayer))
            .layer(AroundLayer(crate::service::lifecycle::DeadlineLayer))
            .layer(AroundLayer(crate::service::layers::audit::AuditLayer::new(audit)))
            .layer(AroundLayer(crate::service::lifecycle::DrainLayer::new(drain_rx.clone())))
            .layer(AroundLayer(crate::service::layers::admission::AdmissionLayer::new(
                limits.max_concurrent_requests,
                transport,
                // The largest message either service decodes, plus its 5-byte frame header.
                max_request + 5,
            )))
            .add_service(health)
            .add_service(reflection)
            .add_service(reflection_v1alpha)
            .add_service(InterceptedService::new(credentials, interceptor.clone()))
            .add_service(InterceptedService::new(admin, interceptor))
            .serve_with_incoming_shutdown(
                crate::service::layers::admission::limited_incoming(incoming(self.listener), transport.max_connections),
                drain_signal,
            );
        let mut grace_over = drain_rx;
        let served = tokio::select! {
            served = server => served,
            () = async {
                // The sender lives until this function returns, so this waits for the drain.
                let _ = grace_over.wait_for(|d| *d).await;
                tokio::time::sleep(grace).await;
            } => {
                tracing::warn!(grace_seconds = grace.as_secs(), "requests still running after the grace period are cancelled");
                Ok(())
            }
        };
        drop(drain_tx);
        let _ = stop_tx.send(true);
        let _ = feed.await;
        let _ = scheduler.await;
        let _ = keeper.await;
        store_health.abort();
        let _ = jobs.await;
        let _ = staleness.await;
        let _ = idempotency_pruner.await;
        let _ = metrics_server.await;
        let _ = upkeep.await;
        let _ = token_reloads.await;
        if let Some(t) = audit_task {
            // The writer drains what is queued before it returns.
            let _ = t.await;
        }
        // Wipe cached plaintext now rather than whenever the last handle drops.
        self.vault.cache().clear();
        tracing::info!("credvault stopped");
        Ok(served?)
    }
}

/// Expired idempotency keys deleted per statement: small, so pruning never holds locks long.
const IDEMPOTENCY_PRUNE_BATCH: u32 = 500;
/// How often the pruner looks again when the last batch was not full.
const IDEMPOTENCY_PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// The name under which `grpc.health.v1.Health` reports whether the store is reachable.
pub const STORE_HEALTH_SERVICE: &str = "credvault.store";

/// Mirrors the store breaker into the `credvault.store` health status until the breaker
/// goes away (the daemon stops; the task is also aborted then).
async fn report_store_health(
    reporter: tonic_health::server::HealthReporter,
    mut reachable: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    loop {
        let status = if *reachable.borrow_and_update() { ServingStatus::Serving } else { ServingStatus::NotServing };
        reporter.set_service_status(STORE_HEALTH_SERVICE, status).await;
        if reachable.changed().await.is_err() {
            return;
        }
    }
}
