//! The Rust client of the daemon, for services: [`Client`] (typed errors, TLS and mutual
//! TLS, token from an environment variable or a file, per-call timeouts, retries with
//! backoff and jitter) and [`CachingClient`] (an in-process cache kept fresh by
//! `WatchCredentials` pushes).
//!
//! Built with the `client` feature alone (`default-features = false, features =
//! ["client"]`) it needs tonic, prost and tokio, none of the daemon's storage, crypto or
//! HTTP dependencies.
//!
//! **Invariant:** secret values live in [`SecretValue`] (zeroized on drop, redacted in
//! `Debug`) from the moment they are decoded; the token is never printed.

mod admin;
mod admin_types;
mod caching;
mod config;
mod error;
mod identity;
mod retry;
mod types;
mod writes;

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

pub use admin::JobStream;
pub use admin_types::{
    AuditEvent, ByteEncoding, BytesSpec, Capability, DaemonStatus, Generator, JobState, NewToken, PasswordSpec,
    PolicyKind, PolicyRule, RotateOptions, RotationJob, RotationPolicy, RotationSource, TokenInfo, TokenSpec,
};
pub use caching::{CacheConfig, CacheStats, CachingClient, Update};
pub use config::{ClientConfig, TlsConfig, TokenSource, DEFAULT_ADDR};
pub use error::{Error, RETRY_AFTER_HEADER};
pub use identity::IdentityBinding;
pub use retry::{Backoff, RetryPolicy};
pub use types::{
    Credential, CredentialInfo, Event, EventKind, EventStream, Metadata, Rotated, SecretValue, VersionInfo,
    VersionState,
};
pub use writes::{
    new_idempotency_key, BatchConflict, BatchOutcome, BatchWrite, BatchWritten, RolledBack, Written,
    IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER, WRITE_CONFLICTS_TRAILER,
};

use crate::proto;
use crate::proto::admin_service_client::AdminServiceClient;
use crate::proto::credential_service_client::CredentialServiceClient;

/// Response metadata set when the daemon served a value from its cache while its store
/// was unreachable: the age in seconds of what it served.
pub const STALE_HEADER: &str = "credvault-stale";

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Bearer {
    fn new(token: &str) -> Result<Bearer, Error> {
        let mut header: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| Error::Config("the token contains characters not allowed in a header".into()))?;
        // Sensitive: never logged by the HTTP/2 stack.
        header.set_sensitive(true);
        Ok(Bearer(header))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A connection to one daemon (or a load balancer in front of several). Cheap to clone:
/// clones share the HTTP/2 connection.
///
/// The calls are spread over `impl Client` blocks by concern (this file: credentials;
/// `admin.rs`: operator calls); the stubs and the retry loop are `pub(crate)` so every
/// block calls the daemon the same way.
#[derive(Clone)]
pub struct Client {
    pub(crate) creds: CredentialServiceClient<Authed>,
    pub(crate) admin: AdminServiceClient<Authed>,
    pub(crate) addr: String,
    pub(crate) timeout: Duration,
    pub(crate) retry: RetryPolicy,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("token", &"REDACTED")
            .field("timeout", &self.timeout)
            .field("retry", &self.retry)
            .finish()
    }
}

impl Client {
    /// Connects now: fails with [`Error::Unavailable`] if the daemon cannot be reached.
    pub async fn connect(config: &ClientConfig) -> Result<Client, Error> {
        let endpoint = config.endpoint()?;
        let bearer = Bearer::new(&config.token.read()?)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("cannot reach the daemon at {}: {e}", config.addr)))?;
        Ok(Client::from_channel(channel, bearer, config))
    }

    /// Connects on first use (and reconnects whenever the connection is lost): for
    /// long-running services that must start while the daemon is down.
    pub fn connect_lazy(config: &ClientConfig) -> Result<Client, Error> {
        let endpoint = config.endpoint()?;
        let bearer = Bearer::new(&config.token.read()?)?;
        Ok(Client::from_channel(endpoint.connect_lazy(), bearer, config))
    }

    fn from_channel(channel: Channel, bearer: Bearer, config: &ClientConfig) -> Client {
        Client {
            creds: CredentialServiceClient::with_interceptor(channel.clone(), bearer.clone())
                .max_decoding_message_size(64 * 1024 * 1024),
            admin: AdminServiceClient::with_interceptor(channel, bearer),
            addr: config.addr.clone(),
            timeout: config.timeout,
            retry: config.retry.clone(),
        }
    }

    /// The generated stubs over this connection, for RPCs the typed API does not cover
    /// (other languages use the same proto).
    pub fn raw(&self) -> (CredentialServiceClient<Authed>, AdminServiceClient<Authed>) {
        (self.creds.clone(), self.admin.clone())
    }

    /// The current version of `name`.
    pub async fn get(&self, name: &str) -> Result<Credential, Error> {
        self.get_version(name, None).await
    }

    /// `version` of `name` (`None`: the current one).
    pub async fn get_version(&self, name: &str, version: Option<u64>) -> Result<Credential, Error> {
        let req = proto::GetCredentialRequest { name: name.to_owned(), version };
        let r = self
            .unary(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.get_credential(req).await }
            })
            .await?;
        let stale = stale_age(&r);
        Ok(Credential::from_proto(r.into_inner(), stale))
    }

    /// Several credentials in one round trip: one result per name, in order. Batches
    /// larger than the daemon's `max_batch_size` (100 by default) are refused.
    pub async fn batch_get(&self, names: &[String]) -> Result<Vec<(String, Result<Credential, Error>)>, Error> {
        let req = proto::BatchGetCredentialsRequest { names: names.to_vec() };
        let r = self
            .unary(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.batch_get_credentials(req).await }
            })
            .await?;
        let stale = stale_age(&r);
        Ok(r.into_inner()
            .results
            .into_iter()
            .map(|res| {
                let outcome = match res.result {
                    Some(proto::batch_get_result::Result::Credential(c)) => Ok(Credential::from_proto(c, stale)),
                    Some(proto::batch_get_result::Result::Error(e)) => Err(Error::from_code(e.code, e.message)),
                    None => Err(Error::Other { code: tonic::Code::Unknown, message: "empty batch result".into() }),
                };
                (res.name, outcome)
            })
            .collect())
    }

    /// Writes a new version; with `expected_version` a compare-and-set (`Some(0)`: only
    /// if it does not exist). Returns the new version. A lost compare-and-set is
    /// [`Error::Conflict`] and is never retried.
    ///
    /// An unconditional put retried after an UNAVAILABLE whose first attempt did commit
    /// writes the same value twice (two versions); a conditional one then reports a
    /// conflict. Use `expected_version` where that matters.
    pub async fn put(&self, name: &str, value: &[u8], expected_version: Option<u64>) -> Result<u64, Error> {
        self.put_with(name, value, expected_version, None).await
    }

    /// [`Client::put`] that also replaces the credential's metadata (`None`: keep it).
    pub async fn put_with(
        &self,
        name: &str,
        value: &[u8],
        expected_version: Option<u64>,
        metadata: Option<&Metadata>,
    ) -> Result<u64, Error> {
        let metadata = metadata.map(Metadata::to_proto);
        let r = self
            .unary(|mut c, t| {
                let req = timed(
                    proto::PutCredentialRequest {
                        name: name.to_owned(),
                        value: value.to_vec(),
                        expected_version,
                        metadata: metadata.clone(),
                    },
                    t,
                );
                async move { c.put_credential(req).await }
            })
            .await?;
        Ok(r.into_inner().version)
    }

    /// Soft-deletes `name` (optionally only at `expected_version`); returns the version
    /// that was current.
    pub async fn delete(&self, name: &str, expected_version: Option<u64>) -> Result<u64, Error> {
        let req = proto::DeleteCredentialRequest { name: name.to_owned(), expected_version };
        let r = self
            .unary(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.delete_credential(req).await }
            })
            .await?;
        Ok(r.into_inner().version)
    }

    /// The retained versions of `name`, newest first (never values).
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionInfo>, Error> {
        let req = proto::GetCredentialMetadataRequest { name: name.to_owned() };
        let r = self
            .unary(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.get_credential_metadata(req).await }
            })
            .await?;
        Ok(r.into_inner().versions.iter().map(VersionInfo::from_proto).collect())
    }

    /// A credential's metadata and retained versions, newest first (never a value).
    pub async fn describe(&self, name: &str) -> Result<CredentialInfo, Error> {
        let req = proto::GetCredentialMetadataRequest { name: name.to_owned() };
        let r = self
            .unary(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.get_credential_metadata(req).await }
            })
            .await?;
        Ok(CredentialInfo::from_proto(r.into_inner()))
    }

    /// Every name under `prefix` the token may list, following the pages.
    pub async fn list_names(&self, prefix: &str) -> Result<Vec<String>, Error> {
        Ok(self.list(prefix, false).await?.into_iter().map(|c| c.name).collect())
    }

    /// Every credential under `prefix` the token may list (soft-deleted ones too with
    /// `include_deleted`), following the pages; rows carry no versions.
    pub async fn list(&self, prefix: &str, include_deleted: bool) -> Result<Vec<CredentialInfo>, Error> {
        self.list_where(prefix, &ListFilter { include_deleted, ..ListFilter::default() }).await
    }

    /// [`Client::list`] narrowed by the daemon: only credentials whose current version is
    /// older than `older_than`, or (with `rotation_overdue`) whose rotation policy is past
    /// due.
    pub async fn list_where(&self, prefix: &str, filter: &ListFilter) -> Result<Vec<CredentialInfo>, Error> {
        let include_deleted = filter.include_deleted;
        let older_than = filter.older_than.map(types::proto_duration);
        let rotation_overdue = filter.rotation_overdue;
        let mut names = Vec::new();
        let mut page_token = String::new();
        loop {
            let req = proto::ListCredentialsRequest {
                prefix: prefix.to_owned(),
                page_size: 0,
                page_token: page_token.clone(),
                include_deleted,
                older_than,
                rotation_overdue,
            };
            let page = self
                .unary(|mut c, t| {
                    let req = timed(req.clone(), t);
                    async move { c.list_credentials(req).await }
                })
                .await?
                .into_inner();
            names.extend(page.credentials.into_iter().map(CredentialInfo::from_proto));
            if page.next_page_token.is_empty() {
                return Ok(names);
            }
            page_token = page.next_page_token;
        }
    }

    /// Rotates `name` to `value` (`None`: the daemon generates one by the credential's
    /// policy); the replaced version stays readable for its grace period.
    pub async fn rotate(&self, name: &str, value: Option<&[u8]>) -> Result<Rotated, Error> {
        let source = value.map(|v| RotationSource::Value(SecretValue::new(v.to_vec())));
        self.rotate_with(name, &RotateOptions { source, ..RotateOptions::default() }).await
    }

    /// Change events under `prefix`. Once this returns, no later change is missed; the
    /// stream ends (or yields an error) when the connection is lost, and a
    /// [`EventKind::Resync`] means events may have been missed: re-read what you hold.
    pub async fn watch(&self, prefix: &str) -> Result<types::EventStream, Error> {
        let mut c = self.creds.clone();
        // No grpc-timeout on the request: it would end the stream. The deadline covers
        // only the daemon's answer (its subscription is in place by then).
        let call = c.watch_credentials(proto::WatchCredentialsRequest { prefix: prefix.to_owned() });
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(types::EventStream::new(r.into_inner())),
            Ok(Err(s)) => Err(Error::from_status(&s)),
            Err(_) => Err(Error::Timeout(format!("no answer to WatchCredentials within {:?}", self.timeout))),
        }
    }

    /// One credential-service call with the retry loop.
    pub(crate) async fn unary<T, F, Fut>(&self, f: F) -> Result<Response<T>, Error>
    where
        F: FnMut(CredentialServiceClient<Authed>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let stub = self.creds.clone();
        self.with_retries(stub, f).await
    }

    /// One admin-service call with the retry loop.
    pub(crate) async fn unary_admin<T, F, Fut>(&self, f: F) -> Result<Response<T>, Error>
    where
        F: FnMut(AdminServiceClient<Authed>, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let stub = self.admin.clone();
        self.with_retries(stub, f).await
    }

    /// One attempt after another until success, an error that is not retryable, the
    /// attempt budget or the elapsed-time budget. A RESOURCE_EXHAUSTED with the daemon's
    /// `retry-after-ms` hint waits that long (if the budget allows) instead of the backoff.
    async fn with_retries<S: Clone, T, F, Fut>(&self, stub: S, mut f: F) -> Result<Response<T>, Error>
    where
        F: FnMut(S, Duration) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let started = Instant::now();
        let mut backoff = self.retry.backoff();
        let mut attempt = 1;
        loop {
            let err = match tokio::time::timeout(self.timeout, f(stub.clone(), self.timeout)).await {
                Ok(Ok(r)) => return Ok(r),
                Ok(Err(s)) => Error::from_status(&s),
                Err(_) => Error::Timeout(format!("no answer within {:?}", self.timeout)),
            };
            if !err.is_retryable() || attempt >= self.retry.max_attempts {
                return Err(err);
            }
            let delay = match &err {
                Error::ResourceExhausted { retry_after: Some(hint), .. } => *hint,
                _ => backoff.next_delay(),
            };
            if started.elapsed() + delay > self.retry.max_elapsed {
                return Err(err);
            }
            tracing::debug!(attempt, ?delay, error = %err, "retrying a call to the daemon");
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

/// A request carrying the attempt's deadline as `grpc-timeout`.
pub(crate) fn timed<T>(message: T, timeout: Duration) -> Request<T> {
    let mut req = Request::new(message);
    req.set_timeout(timeout);
    req
}

fn stale_age<T>(r: &Response<T>) -> Option<Duration> {
    let v = r.metadata().get(STALE_HEADER)?.to_str().ok()?;
    v.parse::<u64>().ok().map(Duration::from_secs)
}

/// What [`Client::list_where`] keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// Soft-deleted credentials too.
    pub include_deleted: bool,
    /// Only those whose current version is older than this.
    pub older_than: Option<Duration>,
    /// Only those overdue for rotation under their rotation policy.
    pub rotation_overdue: bool,
}
