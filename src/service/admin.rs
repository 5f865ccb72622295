//! `credvault.v1.AdminService`. This release implements `GetStatus` and the token RPCs;
//! the rotation and key RPCs are declared in the API and answer `UNIMPLEMENTED`.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{authorize, authorize_everywhere, timestamp};
use crate::auth::{Auth, Capability, PolicyDoc, Rule, TokenError};
use crate::proto::{self, admin_service_server::AdminService};
use crate::store::{Micros, TokenRow};
use crate::unlock::MasterKeySpec;
use crate::vault::Vault;

#[derive(Debug, Clone)]
pub struct AdminApi {
    vault: Vault,
    auth: Auth,
    master_key_source: &'static str,
    started_at: Micros,
}

impl AdminApi {
    pub fn new(vault: Vault, auth: Auth, spec: &MasterKeySpec, started_at: Micros) -> Self {
        let master_key_source = match spec {
            MasterKeySpec::Passphrase { .. } => "passphrase",
            MasterKeySpec::KeyFile { .. } => "key-file",
        };
        AdminApi { vault, auth, master_key_source, started_at }
    }
}

fn capability_to_proto(c: Capability) -> proto::Capability {
    match c {
        Capability::Read => proto::Capability::Read,
        Capability::Write => proto::Capability::Write,
        Capability::Delete => proto::Capability::Delete,
        Capability::List => proto::Capability::List,
        Capability::Rotate => proto::Capability::Rotate,
        Capability::Admin => proto::Capability::Admin,
    }
}

fn capability_from_proto(v: i32) -> Result<Capability, Status> {
    Ok(match proto::Capability::try_from(v) {
        Ok(proto::Capability::Read) => Capability::Read,
        Ok(proto::Capability::Write) => Capability::Write,
        Ok(proto::Capability::Delete) => Capability::Delete,
        Ok(proto::Capability::List) => Capability::List,
        Ok(proto::Capability::Rotate) => Capability::Rotate,
        Ok(proto::Capability::Admin) => Capability::Admin,
        _ => return Err(Status::invalid_argument(format!("unknown capability {v}"))),
    })
}

fn token_info(row: &TokenRow) -> proto::TokenInfo {
    let doc = PolicyDoc::parse(&row.policies).unwrap_or_default();
    proto::TokenInfo {
        id: crate::auth::token_id(&row.token_hash),
        display_name: row.display_name.clone(),
        rules: doc
            .rules
            .iter()
            .map(|r| proto::PolicyRule {
                pattern: r.pattern.clone(),
                capabilities: r.capabilities.iter().map(|c| capability_to_proto(*c) as i32).collect(),
                deny: r.deny,
            })
            .collect(),
        created_at: Some(timestamp(row.created_at)),
        expires_at: row.expires_at.map(timestamp),
        revoked_at: row.revoked_at.map(timestamp),
    }
}

impl From<TokenError> for Status {
    fn from(e: TokenError) -> Status {
        match e {
            TokenError::Invalid(m) => Status::invalid_argument(m),
            e @ TokenError::NotFound(_) => Status::not_found(e.to_string()),
            e @ TokenError::Ambiguous(_) => Status::invalid_argument(e.to_string()),
            TokenError::Store(e) => crate::vault::VaultError::from(e).into(),
        }
    }
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("{rpc} is not implemented in this release"))
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn rotate_credential(
        &self,
        req: Request<proto::RotateCredentialRequest>,
    ) -> Result<Response<proto::RotateCredentialResponse>, Status> {
        authorize(&req, Capability::Rotate, &req.get_ref().name)?;
        Err(not_yet("RotateCredential"))
    }

    async fn destroy_version(
        &self,
        req: Request<proto::DestroyVersionRequest>,
    ) -> Result<Response<proto::DestroyVersionResponse>, Status> {
        authorize(&req, Capability::Delete, &req.get_ref().name)?;
        Err(not_yet("DestroyVersion"))
    }

    async fn undelete_credential(
        &self,
        req: Request<proto::UndeleteCredentialRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        authorize(&req, Capability::Delete, &req.get_ref().name)?;
        Err(not_yet("UndeleteCredential"))
    }

    async fn rotate_kek(&self, req: Request<proto::RotateKekRequest>) -> Result<Response<proto::RotationJob>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        Err(not_yet("RotateKek"))
    }

    async fn get_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        Err(not_yet("GetRotationJob"))
    }

    type WatchRotationJobStream = Pin<Box<dyn Stream<Item = Result<proto::RotationJob, Status>> + Send>>;

    async fn watch_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<Self::WatchRotationJobStream>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        Err(not_yet("WatchRotationJob"))
    }

    async fn rekey_master(
        &self,
        req: Request<proto::RekeyMasterRequest>,
    ) -> Result<Response<proto::RekeyMasterResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        Err(not_yet("RekeyMaster"))
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let r = req.into_inner();
        let rules = r
            .rules
            .into_iter()
            .map(|rule| {
                Ok(Rule {
                    pattern: rule.pattern,
                    capabilities: rule
                        .capabilities
                        .into_iter()
                        .map(capability_from_proto)
                        .collect::<Result<_, Status>>()?,
                    deny: rule.deny,
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let ttl = match r.ttl {
            None => None,
            Some(d) => {
                Some(std::time::Duration::try_from(d).map_err(|_| Status::invalid_argument("ttl must be positive"))?)
            }
        };
        let rate = (r.rate_limit_per_second > 0).then_some(r.rate_limit_per_second);
        let store = self.vault.store();
        let new = self.auth.create_token(store.as_ref(), &r.display_name, rules, ttl, rate).await?;
        tracing::info!(token_id = %crate::auth::token_id(&new.row.token_hash), display_name = %new.row.display_name, "token created");
        Ok(Response::new(proto::CreateTokenResponse {
            token: secrecy::ExposeSecret::expose_secret(&new.token).to_owned(),
            info: Some(token_info(&new.row)),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let store = self.vault.store();
        let row = self.auth.revoke_token(store.as_ref(), &req.get_ref().id).await?;
        tracing::info!(token_id = %crate::auth::token_id(&row.token_hash), "token revoked");
        Ok(Response::new(proto::RevokeTokenResponse {}))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let rows = self.vault.store().list_tokens().await.map_err(crate::vault::VaultError::from)?;
        Ok(Response::new(proto::ListTokensResponse { tokens: rows.iter().map(token_info).collect() }))
    }

    async fn list_audit_events(
        &self,
        req: Request<proto::ListAuditEventsRequest>,
    ) -> Result<Response<proto::ListAuditEventsResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let limit = match req.get_ref().limit {
            0 => 100,
            n if n > 1000 => return Err(Status::invalid_argument(format!("limit {n} is over the maximum of 1000"))),
            n => n,
        };
        let rows = self.vault.store().recent_audit(limit).await.map_err(crate::vault::VaultError::from)?;
        let events = rows
            .into_iter()
            .map(|e| proto::AuditEvent {
                at: Some(timestamp(e.at)),
                request_id: e.request_id,
                token_id: e.token_id,
                token_name: e.token_name,
                rpc: e.rpc,
                credential: e.credential.unwrap_or_default(),
                version: e.version.unwrap_or_default(),
                code: e.code,
                latency_us: e.latency_us,
                peer: e.peer,
            })
            .collect();
        Ok(Response::new(proto::ListAuditEventsResponse { events }))
    }

    async fn get_status(&self, req: Request<proto::GetStatusRequest>) -> Result<Response<proto::Status>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let s = self.vault.status().await;
        let now = crate::store::now_micros();
        let uptime = std::time::Duration::from_micros(u64::try_from(now - self.started_at).unwrap_or_default());
        Ok(Response::new(proto::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            storage_backend: s.backend.as_str().to_owned(),
            storage_healthy: s.storage_healthy,
            master_key_source: self.master_key_source.to_owned(),
            active_kek_id: u32::try_from(s.active_kek_id).unwrap_or_default(),
            credentials: s.credentials,
            started_at: Some(timestamp(self.started_at)),
            uptime: prost_types::Duration::try_from(uptime).ok(),
        }))
    }
}
