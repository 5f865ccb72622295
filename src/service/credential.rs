//! `credvault.v1.CredentialService`: thin handlers over the vault.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{audit_version, authorize_name, caller, denied, from_timestamp, timestamp, version_state};
use crate::auth::{Auth, Capability};
use crate::model::{ChangeKind, CredentialHead, CredentialName, Metadata};
use crate::proto::{self, credential_service_server::CredentialService};
use crate::telemetry::names;
use crate::vault::{CredentialDetails, CredentialValue, Replayed, Vault, WatchEvent};

/// Messages queued per watch stream between the event loop and the transport; the
/// broadcast buffer behind it (`rotation.watch_buffer`) is what a slow client exhausts.
const WATCH_SEND_BUFFER: usize = 16;

fn event_kind(k: ChangeKind) -> proto::EventKind {
    match k {
        ChangeKind::Put => proto::EventKind::Put,
        ChangeKind::Rotate => proto::EventKind::Rotate,
        ChangeKind::Delete => proto::EventKind::Delete,
        ChangeKind::Undelete => proto::EventKind::Undelete,
        ChangeKind::DestroyVersion => proto::EventKind::DestroyVersion,
    }
}

#[derive(Debug, Clone)]
pub struct CredentialApi {
    vault: Vault,
    /// Long-lived streams re-check their token with it.
    auth: Auth,
    /// Caps open watch streams, globally and per token.
    streams: crate::limits::StreamLimiter,
}

impl CredentialApi {
    pub fn new(vault: Vault, auth: Auth) -> Self {
        CredentialApi { vault, auth, streams: crate::limits::StreamLimiter::default() }
    }

    /// Shares `streams` (e.g. with the admin service's job watches).
    pub fn with_stream_limits(mut self, streams: crate::limits::StreamLimiter) -> Self {
        self.streams = streams;
        self
    }
}

/// Response metadata on reads answered from the cache while the store was unreachable:
/// whole seconds since the daemon last knew the version to be current.
pub const STALE_HEADER: &str = "credvault-stale";

/// A response, marked stale if any value in it was served stale.
fn marked<T>(message: T, stale: Option<std::time::Duration>) -> Response<T> {
    let mut response = Response::new(message);
    if let Some(age) = stale {
        response.metadata_mut().insert(STALE_HEADER, tonic::metadata::MetadataValue::from(age.as_secs()));
    }
    response
}

/// How often an open watch stream re-checks its token (revocation, expiry).
const WATCH_TOKEN_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// `name` is the request's own (the vault's answer carries none, so a hit copies no name).
fn value_response(mut v: CredentialValue, name: String) -> proto::GetCredentialResponse {
    proto::GetCredentialResponse {
        // prost owns its buffers: the plaintext moves into the response (no second copy)
        // and lives until the response is encoded; what is left in `v` is empty.
        value: std::mem::take(&mut *v.value),
        name,
        version: v.version,
        state: version_state(v.state) as i32,
        created_at: Some(timestamp(v.created_at)),
        expires_at: v.expires_at.map(timestamp),
    }
}

pub(crate) fn metadata_message(
    head: &CredentialHead,
    versions: &[crate::model::VersionInfo],
) -> proto::CredentialMetadata {
    let m = &head.metadata;
    proto::CredentialMetadata {
        name: head.name.clone(),
        current_version: head.current_version,
        metadata_version: head.metadata_version,
        metadata: Some(proto::Metadata {
            labels: m.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            description: m.description.clone(),
            owner: m.owner.clone(),
            expires_at: m.expires_at.map(timestamp),
        }),
        created_at: Some(timestamp(head.created_at)),
        updated_at: Some(timestamp(head.updated_at)),
        deleted_at: head.deleted_at.map(timestamp),
        versions: versions
            .iter()
            .map(|v| proto::VersionInfo {
                version: v.version,
                state: version_state(v.state) as i32,
                created_at: Some(timestamp(v.created_at)),
                expires_at: v.expires_at.map(timestamp),
                kek_id: u32::try_from(v.kek_id).unwrap_or_default(),
            })
            .collect(),
    }
}

pub(crate) fn metadata_from(m: proto::Metadata) -> Result<Metadata, Status> {
    Ok(Metadata {
        labels: m.labels.into_iter().collect(),
        description: m.description,
        owner: m.owner,
        expires_at: m.expires_at.as_ref().map(from_timestamp).transpose()?,
    })
}

#[tonic::async_trait]
impl CredentialService for CredentialApi {
    async fn get_credential(
        &self,
        req: Request<proto::GetCredentialRequest>,
    ) -> Result<Response<proto::GetCredentialResponse>, Status> {
        // The hot path: the name is parsed once, here, and moves into the response.
        let (_, ext, r) = req.into_parts();
        let (_, name) = authorize_name(&self.vault, &ext, Capability::Read, r.name)?;
        let v = self.vault.get(&name, r.version).await?;
        if let Some(ctx) = ext.get::<std::sync::Arc<crate::audit::AuditContext>>() {
            ctx.set_version(v.version);
        }
        let stale = v.stale;
        Ok(marked(value_response(v, name.into_string()), stale))
    }

    async fn batch_get_credentials(
        &self,
        req: Request<proto::BatchGetCredentialsRequest>,
    ) -> Result<Response<proto::BatchGetCredentialsResponse>, Status> {
        let c = caller(&req)?;
        if let Some(ctx) = crate::service::layers::audit::context(&req) {
            ctx.set_credentials(&req.get_ref().names);
        }
        let raw = req.into_inner().names;
        // Parsed once: an invalid name fails the whole request with INVALID_ARGUMENT (what
        // the vault reports for a bad batch), before any policy decision.
        self.vault.check_batch_size(raw.len())?;
        let names = raw.into_iter().map(|n| self.vault.parse_name(n)).collect::<Result<Vec<_>, _>>()?;
        // Names the caller may not read get PERMISSION_DENIED in their own slot; the rest
        // are read together. Decided once per name, here; the answers below follow it.
        let permitted: Vec<bool> = names.iter().map(|n| c.policy.allows(Capability::Read, n.as_str())).collect();
        let allowed: Vec<&CredentialName> =
            names.iter().zip(&permitted).filter(|(_, ok)| **ok).map(|(n, _)| n).collect();
        let outcomes = self.vault.batch_get(&allowed).await?;
        let stale = outcomes.iter().filter_map(|o| o.as_ref().ok().and_then(|v| v.stale)).max();
        let mut outcomes = outcomes.into_iter();
        let error = |status: Status| {
            proto::batch_get_result::Result::Error(proto::BatchGetError {
                code: status.code() as i32,
                message: status.message().to_owned(),
            })
        };
        let results = names
            .into_iter()
            .zip(permitted)
            .map(|(name, permitted)| {
                let name = name.into_string();
                let result = if !permitted {
                    error(denied(&c, Capability::Read, &name))
                } else {
                    match outcomes.next() {
                        Some(Ok(v)) => proto::batch_get_result::Result::Credential(value_response(v, name.clone())),
                        Some(Err(e)) => error(Status::from(e)),
                        None => error(Status::internal("internal error")),
                    }
                };
                proto::BatchGetResult { name, result: Some(result) }
            })
            .collect();
        Ok(marked(proto::BatchGetCredentialsResponse { results }, stale))
    }

    async fn get_credential_metadata(
        &self,
        req: Request<proto::GetCredentialMetadataRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        let (_, ext, r) = req.into_parts();
        let (_, name) = authorize_name(&self.vault, &ext, Capability::Read, r.name)?;
        let CredentialDetails { head, versions } = self.vault.metadata(&name).await?;
        Ok(Response::new(metadata_message(&head, &versions)))
    }

    async fn put_credential(
        &self,
        req: Request<proto::PutCredentialRequest>,
    ) -> Result<Response<proto::PutCredentialResponse>, Status> {
        // The value leaves the message first, so it is zeroized on every path, refusals
        // included (see ARCHITECTURE.md, "Secrets in memory", for the copies tonic keeps).
        let mut req = req;
        let value = zeroize::Zeroizing::new(std::mem::take(&mut req.get_mut().value));
        // Parsed once, here; the vault takes the parsed name.
        let raw = std::mem::take(&mut req.get_mut().name);
        let (c, name) = authorize_name(&self.vault, req.extensions(), Capability::Write, raw)?;
        let key = super::writes::idempotency_key(&req, &c)?;
        let ctx = crate::service::layers::audit::context(&req).cloned();
        let r = req.into_inner();
        let metadata = r.metadata.map(metadata_from).transpose()?;
        let (name, expected, metadata) = (&name, r.expected_version, metadata.as_ref());
        let done = match &key {
            Some(k) => self.vault.put_idempotent(k, name, &value, expected, metadata).await?,
            None => Replayed { outcome: self.vault.put(name, &value, expected, metadata).await?, replayed: false },
        };
        let out = done.outcome;
        if let Some(ctx) = ctx {
            ctx.set_version(out.version);
        }
        let message = proto::PutCredentialResponse {
            name: out.name,
            version: out.version,
            created_at: Some(timestamp(out.created_at)),
        };
        Ok(super::writes::replay_marked(message, done.replayed))
    }

    async fn delete_credential(
        &self,
        req: Request<proto::DeleteCredentialRequest>,
    ) -> Result<Response<proto::DeleteCredentialResponse>, Status> {
        let mut req = req;
        let raw = std::mem::take(&mut req.get_mut().name);
        let (c, name) = authorize_name(&self.vault, req.extensions(), Capability::Delete, raw)?;
        let key = super::writes::idempotency_key(&req, &c)?;
        if let Some(v) = req.get_ref().expected_version {
            audit_version(&req, v);
        }
        let r = req.into_inner();
        let (message, replayed) = match &key {
            Some(k) => {
                let done = self.vault.delete_idempotent(k, &name, r.expected_version).await?;
                let o = done.outcome;
                let message = proto::DeleteCredentialResponse {
                    name: o.name,
                    version: o.version,
                    deleted_at: Some(timestamp(o.deleted_at)),
                };
                (message, done.replayed)
            }
            None => {
                let head = self.vault.delete(&name, r.expected_version).await?;
                let message = proto::DeleteCredentialResponse {
                    name: head.name,
                    version: head.current_version,
                    deleted_at: head.deleted_at.map(timestamp),
                };
                (message, false)
            }
        };
        Ok(super::writes::replay_marked(message, replayed))
    }

    async fn list_credentials(
        &self,
        req: Request<proto::ListCredentialsRequest>,
    ) -> Result<Response<proto::ListCredentialsResponse>, Status> {
        let c = caller(&req)?;
        if let Some(ctx) = crate::service::layers::audit::context(&req) {
            ctx.set_credential(&req.get_ref().prefix);
        }
        let r = req.into_inner();
        // The vault scans only what this caller may list, and seals the cursor to it.
        let filters = crate::vault::ListFilters {
            older_than: super::admin::duration(r.older_than, "older_than")?,
            rotation_overdue: r.rotation_overdue,
        };
        let page = self.vault.list_where(&c, &r.prefix, r.page_size, &r.page_token, r.include_deleted, filters).await?;
        Ok(Response::new(proto::ListCredentialsResponse {
            credentials: page.credentials.iter().map(|h| metadata_message(h, &[])).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    type WatchCredentialsStream = Pin<Box<dyn Stream<Item = Result<proto::CredentialEvent, Status>> + Send>>;

    async fn watch_credentials(
        &self,
        req: Request<proto::WatchCredentialsRequest>,
    ) -> Result<Response<Self::WatchCredentialsStream>, Status> {
        let caller = caller(&req)?;
        let permit = self.streams.try_acquire(&caller.token_id).map_err(|e| super::admission_status(&caller, e))?;
        // The stream outlives the request: keep the header to re-check the token, so a
        // revoked or expired token stops receiving events.
        let header = zeroize::Zeroizing::new(
            req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned(),
        );
        let auth = self.auth.clone();
        let watcher = caller.clone();
        if let Some(ctx) = crate::service::layers::audit::context(&req) {
            ctx.set_credential(&req.get_ref().prefix);
        }
        let prefix = req.into_inner().prefix;
        self.vault.check_prefix(&prefix)?;
        // Subscribe before answering, so nothing that happens after the call returns is missed.
        let mut events = self.vault.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(WATCH_SEND_BUFFER);
        let watchers = metrics::gauge!(names::WATCHERS);
        watchers.increment(1.0);
        tokio::spawn(async move {
            let mut token_check = tokio::time::interval(WATCH_TOKEN_CHECK);
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => break, // The client went away.
                    _ = token_check.tick() => {
                        if !auth.still_valid(header.as_str(), &watcher) {
                            let _ = tx.send(Err(Status::unauthenticated("the token was revoked or has expired"))).await;
                            break;
                        }
                        continue;
                    }
                    e = events.recv() => e,
                };
                let msg = match event {
                    Ok(WatchEvent::Change(e)) => {
                        // Only names under the prefix that the caller may read.
                        if !e.name.starts_with(&prefix) || !caller.policy.allows(Capability::Read, &e.name) {
                            continue;
                        }
                        proto::CredentialEvent {
                            kind: event_kind(e.kind) as i32,
                            name: e.name,
                            version: e.version,
                            at: Some(timestamp(e.at)),
                        }
                    }
                    Ok(WatchEvent::Resync) => proto::CredentialEvent {
                        kind: proto::EventKind::Resync as i32,
                        at: Some(timestamp(crate::model::now_micros())),
                        ..Default::default()
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        metrics::counter!(names::WATCH_DROPPED).increment(1);
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "watcher fell {n} events behind and was dropped; re-read the credentials \
                                 under the prefix and watch again"
                            ))))
                            .await;
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if tx.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
            watchers.decrement(1.0);
            drop(permit);
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn write_credentials(
        &self,
        req: Request<proto::WriteCredentialsRequest>,
    ) -> Result<Response<proto::WriteCredentialsResponse>, Status> {
        super::writes::write_credentials(&self.vault, req).await
    }

    async fn rollback_credential(
        &self,
        req: Request<proto::RollbackCredentialRequest>,
    ) -> Result<Response<proto::RollbackCredentialResponse>, Status> {
        super::writes::rollback_credential(&self.vault, req).await
    }

    async fn update_credential_metadata(
        &self,
        req: Request<proto::UpdateCredentialMetadataRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        super::writes::update_credential_metadata(&self.vault, req).await
    }
}
