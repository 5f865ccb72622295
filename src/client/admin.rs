//! The operator calls (`AdminService`): rotation, version destruction, undelete, rotation
//! policies, key-encryption-key rotation and its job, master rekey, tokens, status,
//! audit. Each needs the matching capability (`rotate`, `destroy`, `delete`, `admin`).

use std::fmt;

use super::admin_types::{
    AuditEvent, DaemonStatus, NewToken, RotateOptions, RotationJob, RotationPolicy, TokenInfo, TokenSpec,
};
use super::{timed, Client, CredentialInfo, Error, Rotated};
use crate::proto;

impl Client {
    /// Rotates `name`: a new current version from `options.source` (or the credential's
    /// policy), the replaced one readable for its grace period.
    pub async fn rotate_with(&self, name: &str, options: &RotateOptions) -> Result<Rotated, Error> {
        let req = options.to_proto(name);
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.rotate_credential(req).await }
            })
            .await?;
        Ok(Rotated::from_proto(r.into_inner()))
    }

    /// Wipes one version's ciphertext irreversibly.
    pub async fn destroy_version(&self, name: &str, version: u64) -> Result<(), Error> {
        let req = proto::DestroyVersionRequest { name: name.to_owned(), version };
        self.unary_admin(|mut c, t| {
            let req = timed(req.clone(), t);
            async move { c.destroy_version(req).await }
        })
        .await?;
        Ok(())
    }

    /// Brings back a soft-deleted credential at the version it had.
    pub async fn undelete(&self, name: &str) -> Result<CredentialInfo, Error> {
        let req = proto::UndeleteCredentialRequest { name: name.to_owned() };
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.undelete_credential(req).await }
            })
            .await?;
        Ok(CredentialInfo::from_proto(r.into_inner()))
    }

    /// Creates or replaces the rotation policy of `policy.name`; returns it as stored
    /// (with its next run).
    pub async fn set_rotation_policy(&self, policy: &RotationPolicy) -> Result<RotationPolicy, Error> {
        let req = proto::SetRotationPolicyRequest { policy: Some(policy.to_proto()) };
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.set_rotation_policy(req).await }
            })
            .await?;
        Ok(RotationPolicy::from_proto(r.into_inner()))
    }

    pub async fn rotation_policy(&self, name: &str) -> Result<RotationPolicy, Error> {
        let req = proto::GetRotationPolicyRequest { name: name.to_owned() };
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.get_rotation_policy(req).await }
            })
            .await?;
        Ok(RotationPolicy::from_proto(r.into_inner()))
    }

    pub async fn delete_rotation_policy(&self, name: &str) -> Result<(), Error> {
        let req = proto::DeleteRotationPolicyRequest { name: name.to_owned() };
        self.unary_admin(|mut c, t| {
            let req = timed(req.clone(), t);
            async move { c.delete_rotation_policy(req).await }
        })
        .await?;
        Ok(())
    }

    /// Creates a new key-encryption key and starts re-wrapping every data key under it.
    pub async fn rotate_kek(&self) -> Result<RotationJob, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::RotateKekRequest {}, t);
                async move { c.rotate_kek(req).await }
            })
            .await?;
        Ok(RotationJob::from_proto(r.into_inner()))
    }

    /// A rotation job (`0`: the newest).
    pub async fn rotation_job(&self, job_id: u64) -> Result<RotationJob, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::GetRotationJobRequest { job_id }, t);
                async move { c.get_rotation_job(req).await }
            })
            .await?;
        Ok(RotationJob::from_proto(r.into_inner()))
    }

    /// The job's progress as it happens, until it ends (no deadline on the stream; only
    /// on the daemon's first answer).
    pub async fn watch_rotation_job(&self, job_id: u64) -> Result<JobStream, Error> {
        let mut c = self.admin.clone();
        let call = c.watch_rotation_job(proto::GetRotationJobRequest { job_id });
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(JobStream { inner: r.into_inner() }),
            Ok(Err(s)) => Err(Error::from_status(&s)),
            Err(_) => Err(Error::Timeout(format!("no answer to WatchRotationJob within {:?}", self.timeout))),
        }
    }

    /// Changes the master passphrase; returns how many key-encryption keys were re-wrapped.
    /// Every daemon must then restart with the new passphrase.
    pub async fn rekey_master(&self, old_passphrase: &str, new_passphrase: &str) -> Result<u32, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(
                    proto::RekeyMasterRequest {
                        old_passphrase: old_passphrase.to_owned(),
                        new_passphrase: new_passphrase.to_owned(),
                    },
                    t,
                );
                async move { c.rekey_master(req).await }
            })
            .await?;
        Ok(r.into_inner().keks_rewrapped)
    }

    /// Creates a token; its secret is in the answer only.
    pub async fn create_token(&self, spec: &TokenSpec) -> Result<NewToken, Error> {
        let req = spec.to_proto();
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.create_token(req).await }
            })
            .await?
            .into_inner();
        Ok(NewToken { token: zeroize::Zeroizing::new(r.token), info: r.info.map(TokenInfo::from_proto) })
    }

    pub async fn list_tokens(&self) -> Result<Vec<TokenInfo>, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::ListTokensRequest {}, t);
                async move { c.list_tokens(req).await }
            })
            .await?;
        Ok(r.into_inner().tokens.into_iter().map(TokenInfo::from_proto).collect())
    }

    /// Revokes a token by its id (from [`Client::list_tokens`]).
    pub async fn revoke_token(&self, id: &str) -> Result<(), Error> {
        let req = proto::RevokeTokenRequest { id: id.to_owned() };
        self.unary_admin(|mut c, t| {
            let req = timed(req.clone(), t);
            async move { c.revoke_token(req).await }
        })
        .await?;
        Ok(())
    }

    pub async fn status(&self) -> Result<DaemonStatus, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::GetStatusRequest {}, t);
                async move { c.get_status(req).await }
            })
            .await?;
        Ok(DaemonStatus::from_proto(r.into_inner()))
    }

    /// The newest `limit` audit events (0: 100; at most 1000), newest first.
    pub async fn audit_events(&self, limit: u32) -> Result<Vec<AuditEvent>, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::ListAuditEventsRequest { limit }, t);
                async move { c.list_audit_events(req).await }
            })
            .await?;
        Ok(r.into_inner().events.into_iter().map(AuditEvent::from_proto).collect())
    }
}

/// The progress reports of one `WatchRotationJob` call.
pub struct JobStream {
    inner: tonic::Streaming<proto::RotationJob>,
}

impl fmt::Debug for JobStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobStream")
    }
}

impl JobStream {
    /// The next report; `None` once the job has ended and the daemon closed the stream.
    pub async fn next(&mut self) -> Option<Result<RotationJob, Error>> {
        match self.inner.message().await {
            Ok(Some(j)) => Some(Ok(RotationJob::from_proto(j))),
            Ok(None) => None,
            Err(s) => Some(Err(Error::from_status(&s))),
        }
    }
}
