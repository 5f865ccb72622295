//! `credvault.v1.AdminService`. This release implements `GetStatus`; the rotation,
//! key and token RPCs are declared in the API and answer `UNIMPLEMENTED`.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{caller, timestamp};
use crate::proto::{self, admin_service_server::AdminService};
use crate::store::Micros;
use crate::unlock::MasterKeySpec;
use crate::vault::Vault;

#[derive(Debug, Clone)]
pub struct AdminApi {
    vault: Vault,
    master_key_source: &'static str,
    started_at: Micros,
}

impl AdminApi {
    pub fn new(vault: Vault, spec: &MasterKeySpec, started_at: Micros) -> Self {
        let master_key_source = match spec {
            MasterKeySpec::Passphrase { .. } => "passphrase",
            MasterKeySpec::KeyFile { .. } => "key-file",
        };
        AdminApi { vault, master_key_source, started_at }
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
        caller(&req)?;
        Err(not_yet("RotateCredential"))
    }

    async fn destroy_version(
        &self,
        req: Request<proto::DestroyVersionRequest>,
    ) -> Result<Response<proto::DestroyVersionResponse>, Status> {
        caller(&req)?;
        Err(not_yet("DestroyVersion"))
    }

    async fn undelete_credential(
        &self,
        req: Request<proto::UndeleteCredentialRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        caller(&req)?;
        Err(not_yet("UndeleteCredential"))
    }

    async fn rotate_kek(&self, req: Request<proto::RotateKekRequest>) -> Result<Response<proto::RotationJob>, Status> {
        caller(&req)?;
        Err(not_yet("RotateKek"))
    }

    async fn get_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        caller(&req)?;
        Err(not_yet("GetRotationJob"))
    }

    type WatchRotationJobStream = Pin<Box<dyn Stream<Item = Result<proto::RotationJob, Status>> + Send>>;

    async fn watch_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<Self::WatchRotationJobStream>, Status> {
        caller(&req)?;
        Err(not_yet("WatchRotationJob"))
    }

    async fn rekey_master(
        &self,
        req: Request<proto::RekeyMasterRequest>,
    ) -> Result<Response<proto::RekeyMasterResponse>, Status> {
        caller(&req)?;
        Err(not_yet("RekeyMaster"))
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        caller(&req)?;
        Err(not_yet("CreateToken"))
    }

    async fn revoke_token(
        &self,
        req: Request<proto::RevokeTokenRequest>,
    ) -> Result<Response<proto::RevokeTokenResponse>, Status> {
        caller(&req)?;
        Err(not_yet("RevokeToken"))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        caller(&req)?;
        Err(not_yet("ListTokens"))
    }

    async fn get_status(&self, req: Request<proto::GetStatusRequest>) -> Result<Response<proto::Status>, Status> {
        caller(&req)?;
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
