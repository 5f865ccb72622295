//! `credvault.v1.AdminService`: rotation, keys, tokens, audit and status.

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use secrecy::{ExposeSecret as _, SecretString};
use zeroize::{Zeroize as _, Zeroizing};

use super::credential::metadata_message;
use super::{audit_version, authorize, authorize_everywhere, from_timestamp, timestamp};
use crate::auth::{Auth, Capability, Policy, PolicyDoc};
use crate::crypto::KdfParams;
use crate::generate::{Encoding, GeneratorSpec, PasswordClasses};
use crate::model::{JobState, Micros, PolicyKind, RotationPolicy, TokenRecord};
use crate::proto::{self, admin_service_server::AdminService};
use crate::unlock::MasterKeySpec;
use crate::vault::{JobProgress, NewValue, PolicySpec, Vault};

/// How often `WatchRotationJob` re-reads the job row.
const JOB_POLL: std::time::Duration = std::time::Duration::from_millis(250);

#[derive(Debug, Clone)]
pub struct AdminApi {
    vault: Vault,
    auth: Auth,
    master_key_source: &'static str,
    /// Argon2id cost for a new passphrase (`RekeyMaster`).
    kdf: KdfParams,
    started_at: Micros,
    /// Caps open `WatchRotationJob` streams (shared with the watch streams).
    streams: crate::limits::StreamLimiter,
}

impl AdminApi {
    pub fn new(vault: Vault, auth: Auth, spec: &MasterKeySpec, started_at: Micros) -> Self {
        let (master_key_source, kdf) = match spec {
            MasterKeySpec::Passphrase { params, .. } => ("passphrase", *params),
            MasterKeySpec::KeyFile { .. } => ("key-file", KdfParams::DEFAULT),
        };
        AdminApi { vault, auth, master_key_source, kdf, started_at, streams: crate::limits::StreamLimiter::default() }
    }

    pub fn with_stream_limits(mut self, streams: crate::limits::StreamLimiter) -> Self {
        self.streams = streams;
        self
    }
}

pub(super) fn capability_to_proto(c: Capability) -> proto::Capability {
    match c {
        Capability::Read => proto::Capability::Read,
        Capability::Write => proto::Capability::Write,
        Capability::Delete => proto::Capability::Delete,
        Capability::List => proto::Capability::List,
        Capability::Rotate => proto::Capability::Rotate,
        Capability::Admin => proto::Capability::Admin,
        Capability::Destroy => proto::Capability::Destroy,
    }
}

pub(super) fn capability_from_proto(v: i32) -> Result<Capability, Status> {
    Ok(match proto::Capability::try_from(v) {
        Ok(proto::Capability::Read) => Capability::Read,
        Ok(proto::Capability::Write) => Capability::Write,
        Ok(proto::Capability::Delete) => Capability::Delete,
        Ok(proto::Capability::List) => Capability::List,
        Ok(proto::Capability::Rotate) => Capability::Rotate,
        Ok(proto::Capability::Admin) => Capability::Admin,
        Ok(proto::Capability::Destroy) => Capability::Destroy,
        _ => return Err(Status::invalid_argument(format!("unknown capability {v}"))),
    })
}

fn token_info(row: &TokenRecord) -> proto::TokenInfo {
    // Rules as the daemon reads them (legacy patterns translated, or marked `legacy:`).
    let policy = PolicyDoc::parse(&row.policies).map(|d| Policy::from_doc(&d)).unwrap_or_default();
    proto::TokenInfo {
        id: crate::auth::token_id(&row.token_hash),
        display_name: row.display_name.clone(),
        rules: policy
            .rules()
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

pub(super) fn duration(d: Option<prost_types::Duration>, what: &str) -> Result<Option<std::time::Duration>, Status> {
    d.map(|d| {
        to_std_duration(d)
            .ok_or_else(|| Status::invalid_argument(format!("{what} must not be negative")))?
            .map_err(|_| Status::invalid_argument(format!("{what}: nanos must be below 1,000,000,000")))
    })
    .transpose()
}

/// `None` for a negative duration, `Some(Err)` for nanos out of range. prost-types' own
/// conversion negates a negative duration to report it, which overflows (a panic in
/// debug builds) at `seconds = i64::MIN`: found by the RPC fuzz test.
fn to_std_duration(d: prost_types::Duration) -> Option<Result<std::time::Duration, ()>> {
    let (seconds, nanos) = (u64::try_from(d.seconds).ok()?, u32::try_from(d.nanos).ok()?);
    Some(if nanos < 1_000_000_000 { Ok(std::time::Duration::new(seconds, nanos)) } else { Err(()) })
}

fn to_proto_duration(micros: Option<i64>) -> Option<prost_types::Duration> {
    micros.and_then(|m| prost_types::Duration::try_from(std::time::Duration::from_micros(u64::try_from(m).ok()?)).ok())
}

fn password_spec(p: &proto::PasswordSpec) -> Result<GeneratorSpec, Status> {
    let length = usize::try_from(p.length).map_err(|_| Status::invalid_argument("password length is too large"))?;
    Ok(GeneratorSpec::Password {
        length,
        classes: PasswordClasses {
            lowercase: p.lowercase,
            uppercase: p.uppercase,
            digits: p.digits,
            symbols: p.symbols,
        },
    })
}

fn bytes_spec(b: &proto::BytesSpec) -> Result<GeneratorSpec, Status> {
    let length = usize::try_from(b.length).map_err(|_| Status::invalid_argument("byte length is too large"))?;
    let encoding = match proto::ByteEncoding::try_from(b.encoding) {
        Ok(proto::ByteEncoding::Raw) => Encoding::Raw,
        Ok(proto::ByteEncoding::Hex) => Encoding::Hex,
        Ok(proto::ByteEncoding::Base64 | proto::ByteEncoding::Unspecified) => Encoding::Base64,
        Err(_) => return Err(Status::invalid_argument(format!("unknown byte encoding {}", b.encoding))),
    };
    Ok(GeneratorSpec::Bytes { length, encoding })
}

fn policy_kind(v: i32) -> Result<PolicyKind, Status> {
    Ok(match proto::PolicyKind::try_from(v) {
        Ok(proto::PolicyKind::Manual) => PolicyKind::Manual,
        Ok(proto::PolicyKind::Periodic) => PolicyKind::Periodic,
        Ok(proto::PolicyKind::BeforeExpiry) => PolicyKind::BeforeExpiry,
        Ok(proto::PolicyKind::Scheduled) => PolicyKind::Scheduled,
        _ => {
            return Err(Status::invalid_argument(format!(
                "policy kind {v} is not one of manual, periodic, before_expiry, scheduled"
            )))
        }
    })
}

fn policy_message(p: &RotationPolicy) -> proto::RotationPolicy {
    let generator = serde_json::from_str::<GeneratorSpec>(&p.generator).ok().map(|g| match g {
        GeneratorSpec::Password { length, classes } => {
            proto::rotation_policy::Generator::Password(proto::PasswordSpec {
                length: u32::try_from(length).unwrap_or(u32::MAX),
                lowercase: classes.lowercase,
                uppercase: classes.uppercase,
                digits: classes.digits,
                symbols: classes.symbols,
            })
        }
        GeneratorSpec::Bytes { length, encoding } => proto::rotation_policy::Generator::RandomBytes(proto::BytesSpec {
            length: u32::try_from(length).unwrap_or(u32::MAX),
            encoding: match encoding {
                Encoding::Raw => proto::ByteEncoding::Raw,
                Encoding::Hex => proto::ByteEncoding::Hex,
                Encoding::Base64 => proto::ByteEncoding::Base64,
            } as i32,
        }),
    });
    proto::RotationPolicy {
        name: p.name.clone(),
        kind: match p.kind {
            PolicyKind::Manual => proto::PolicyKind::Manual,
            PolicyKind::Periodic => proto::PolicyKind::Periodic,
            PolicyKind::BeforeExpiry => proto::PolicyKind::BeforeExpiry,
            PolicyKind::Scheduled => proto::PolicyKind::Scheduled,
        } as i32,
        interval: to_proto_duration(p.interval_us),
        validity: to_proto_duration(p.validity_us),
        at: p.at.map(timestamp),
        generator,
        grace_period: to_proto_duration(Some(p.grace_us)),
        next_run_at: p.next_run_at.map(timestamp),
        rotations: p.rotations,
        last_rotated_at: p.last_rotated_at.map(timestamp),
        last_error: p.last_error.clone().unwrap_or_default(),
    }
}

fn job_message(p: &JobProgress) -> proto::RotationJob {
    let j = &p.job;
    proto::RotationJob {
        job_id: u64::try_from(j.id).unwrap_or_default(),
        state: match j.state {
            JobState::Running => proto::JobState::Running,
            JobState::Completed => proto::JobState::Completed,
            JobState::Failed => proto::JobState::Failed,
        } as i32,
        new_kek_id: u32::try_from(j.new_kek_id).unwrap_or_default(),
        done: j.done,
        total: j.total,
        rate_per_second: p.rate_per_second,
        eta: p.eta.and_then(|d| prost_types::Duration::try_from(d).ok()),
        started_at: Some(timestamp(j.started_at)),
        finished_at: j.finished_at.map(timestamp),
        error: j.error.clone().unwrap_or_default(),
        failed: j.failed,
    }
}

/// Copies a secret out of a decoded message into a zeroized-on-drop box of its exact
/// size, then wipes the message's buffer (its whole capacity) in place.
fn take_secret(field: &mut String) -> SecretString {
    let secret = SecretString::from(field.as_str());
    field.zeroize();
    secret
}

fn job_id(id: u64) -> Result<Option<i64>, Status> {
    match id {
        0 => Ok(None),
        n => i64::try_from(n).map(Some).map_err(|_| Status::invalid_argument(format!("job_id {n} is out of range"))),
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn rotate_credential(
        &self,
        req: Request<proto::RotateCredentialRequest>,
    ) -> Result<Response<proto::RotateCredentialResponse>, Status> {
        // A given value leaves the message first, so it is zeroized on every path.
        let mut req = req;
        let given = match &mut req.get_mut().source {
            Some(proto::rotate_credential_request::Source::Value(v)) => Zeroizing::new(std::mem::take(v)),
            _ => Zeroizing::new(Vec::new()),
        };
        let raw = std::mem::take(&mut req.get_mut().name);
        let (c, name) = super::authorize_name(&self.vault, req.extensions(), Capability::Rotate, raw)?;
        let may_cut_grace = c.policy.allows(Capability::Destroy, name.as_str());
        let r = req.get_ref();
        let grace = duration(r.grace_period, "grace_period")?;
        let spec;
        let source = match &r.source {
            Some(proto::rotate_credential_request::Source::Value(_)) => NewValue::Given(&given),
            Some(proto::rotate_credential_request::Source::Password(p)) => {
                spec = password_spec(p)?;
                NewValue::Generate(spec)
            }
            Some(proto::rotate_credential_request::Source::RandomBytes(b)) => {
                spec = bytes_spec(b)?;
                NewValue::Generate(spec)
            }
            None => NewValue::FromPolicy,
        };
        let key = super::writes::idempotency_key(&req, &c)?;
        let (name, expected) = (&name, r.expected_version);
        let done = match &key {
            Some(k) => self.vault.rotate_idempotent(k, name, source, grace, expected, may_cut_grace).await?,
            None => crate::vault::Replayed {
                outcome: self.vault.rotate(name, source, grace, expected, may_cut_grace).await?,
                replayed: false,
            },
        };
        let out = done.outcome;
        audit_version(&req, out.version);
        let message = proto::RotateCredentialResponse {
            name: out.name,
            version: out.version,
            previous_version: out.previous_version,
            previous_expires_at: out.previous_expires_at.map(timestamp),
        };
        Ok(super::writes::replay_marked(message, done.replayed))
    }

    async fn destroy_version(
        &self,
        req: Request<proto::DestroyVersionRequest>,
    ) -> Result<Response<proto::DestroyVersionResponse>, Status> {
        authorize(&req, Capability::Destroy, &req.get_ref().name)?;
        let r = req.get_ref();
        if r.version == 0 {
            return Err(Status::invalid_argument("version must be given (versions start at 1)"));
        }
        self.vault.destroy_version(&r.name, r.version).await?;
        audit_version(&req, r.version);
        Ok(Response::new(proto::DestroyVersionResponse {}))
    }

    async fn undelete_credential(
        &self,
        req: Request<proto::UndeleteCredentialRequest>,
    ) -> Result<Response<proto::CredentialMetadata>, Status> {
        authorize(&req, Capability::Delete, &req.get_ref().name)?;
        let d = self.vault.undelete(&req.get_ref().name).await?;
        Ok(Response::new(metadata_message(&d.head, &d.versions)))
    }

    async fn rotate_kek(&self, req: Request<proto::RotateKekRequest>) -> Result<Response<proto::RotationJob>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let job = self.vault.rotate_kek().await?;
        Ok(Response::new(job_message(&job)))
    }

    async fn get_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<proto::RotationJob>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let job = self.vault.rotation_job(job_id(req.get_ref().job_id)?).await?;
        Ok(Response::new(job_message(&job)))
    }

    type WatchRotationJobStream = Pin<Box<dyn Stream<Item = Result<proto::RotationJob, Status>> + Send>>;

    async fn watch_rotation_job(
        &self,
        req: Request<proto::GetRotationJobRequest>,
    ) -> Result<Response<Self::WatchRotationJobStream>, Status> {
        let caller = authorize_everywhere(&req, Capability::Admin)?;
        let permit = self.streams.try_acquire(&caller.token_id).map_err(|e| super::admission_status(&caller, e))?;
        // Resolve "the newest job" once, so the stream follows one job to its end.
        let first = self.vault.rotation_job(job_id(req.get_ref().job_id)?).await?;
        let id = first.job.id;
        let vault = self.vault.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let _permit = permit;
            let mut last = None;
            let mut current = Ok(first);
            loop {
                let progress = match current {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Status::from(e))).await;
                        return;
                    }
                };
                let msg = job_message(&progress);
                let running = progress.job.state == JobState::Running;
                if last.as_ref() != Some(&(msg.done, msg.failed, msg.state)) {
                    last = Some((msg.done, msg.failed, msg.state));
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // The client went away.
                    }
                }
                if !running {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(JOB_POLL) => {}
                }
                current = vault.rotation_job(Some(id)).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn rekey_master(
        &self,
        req: Request<proto::RekeyMasterRequest>,
    ) -> Result<Response<proto::RekeyMasterResponse>, Status> {
        // Both passphrases leave the message first, so they are zeroized on every path.
        let mut req = req;
        let old = take_secret(&mut req.get_mut().old_passphrase);
        let new = take_secret(&mut req.get_mut().new_passphrase);
        authorize_everywhere(&req, Capability::Admin)?;
        if old.expose_secret().is_empty() || new.expose_secret().is_empty() {
            return Err(Status::invalid_argument("old_passphrase and new_passphrase are both required"));
        }
        let n = self.vault.rekey_master(old, new, self.kdf).await?;
        Ok(Response::new(proto::RekeyMasterResponse { keks_rewrapped: u32::try_from(n).unwrap_or(u32::MAX) }))
    }

    async fn set_rotation_policy(
        &self,
        req: Request<proto::SetRotationPolicyRequest>,
    ) -> Result<Response<proto::RotationPolicy>, Status> {
        let p = req.get_ref().policy.clone().ok_or_else(|| Status::invalid_argument("policy is required"))?;
        let c = authorize(&req, Capability::Rotate, &p.name)?;
        let may_cut_grace = c.policy.allows(Capability::Destroy, &p.name);
        let generator = match &p.generator {
            Some(proto::rotation_policy::Generator::Password(s)) => password_spec(s)?,
            Some(proto::rotation_policy::Generator::RandomBytes(b)) => bytes_spec(b)?,
            None => return Err(Status::invalid_argument("policy.generator (password or random_bytes) is required")),
        };
        let spec = PolicySpec {
            kind: policy_kind(p.kind)?,
            interval: duration(p.interval, "interval")?,
            validity: duration(p.validity, "validity")?,
            at: p.at.as_ref().map(from_timestamp).transpose()?,
            generator,
            grace: duration(p.grace_period, "grace_period")?,
        };
        let row = self.vault.set_rotation_policy(&p.name, &spec, may_cut_grace).await?;
        Ok(Response::new(policy_message(&row)))
    }

    async fn get_rotation_policy(
        &self,
        req: Request<proto::GetRotationPolicyRequest>,
    ) -> Result<Response<proto::RotationPolicy>, Status> {
        authorize(&req, Capability::Rotate, &req.get_ref().name)?;
        let row = self.vault.rotation_policy(&req.get_ref().name).await?;
        Ok(Response::new(policy_message(&row)))
    }

    async fn delete_rotation_policy(
        &self,
        req: Request<proto::DeleteRotationPolicyRequest>,
    ) -> Result<Response<proto::DeleteRotationPolicyResponse>, Status> {
        authorize(&req, Capability::Rotate, &req.get_ref().name)?;
        self.vault.delete_rotation_policy(&req.get_ref().name).await?;
        Ok(Response::new(proto::DeleteRotationPolicyResponse {}))
    }

    async fn create_token(
        &self,
        req: Request<proto::CreateTokenRequest>,
    ) -> Result<Response<proto::CreateTokenResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let r = req.into_inner();
        let rules = super::identity::rules_from_proto(r.rules)?;
        let ttl = match r.ttl {
            None => None,
            Some(d) => Some(
                duration(Some(d), "ttl")
                    .map_err(|_| Status::invalid_argument("ttl must be positive"))?
                    .unwrap_or_default(),
            ),
        };
        let rate = (r.rate_limit_per_second > 0).then_some(r.rate_limit_per_second);
        let new = self.vault.create_token(&self.auth, &r.display_name, rules, ttl, rate).await?;
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
        let row = self.vault.revoke_token(&self.auth, &req.get_ref().id).await?;
        tracing::info!(token_id = %crate::auth::token_id(&row.token_hash), "token revoked");
        Ok(Response::new(proto::RevokeTokenResponse {}))
    }

    async fn list_tokens(
        &self,
        req: Request<proto::ListTokensRequest>,
    ) -> Result<Response<proto::ListTokensResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let rows = self.vault.list_tokens().await?;
        Ok(Response::new(proto::ListTokensResponse { tokens: rows.iter().map(token_info).collect() }))
    }

    async fn bind_identity(
        &self,
        req: Request<proto::BindIdentityRequest>,
    ) -> Result<Response<proto::IdentityBinding>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let r = req.into_inner();
        let rules = super::identity::rules_from_proto(r.rules)?;
        let rate = (r.rate_limit_per_second > 0).then_some(r.rate_limit_per_second);
        let record = self.vault.bind_identity(&self.auth, &r.identity, rules, rate).await?;
        tracing::info!(identity = %record.identity, "identity bound");
        Ok(Response::new(super::identity::identity_binding(&record)))
    }

    async fn list_identities(
        &self,
        req: Request<proto::ListIdentitiesRequest>,
    ) -> Result<Response<proto::ListIdentitiesResponse>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let records = self.vault.list_identities().await?;
        Ok(Response::new(proto::ListIdentitiesResponse {
            bindings: records.iter().map(super::identity::identity_binding).collect(),
        }))
    }

    async fn unbind_identity(
        &self,
        req: Request<proto::UnbindIdentityRequest>,
    ) -> Result<Response<proto::IdentityBinding>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let record = self.vault.unbind_identity(&self.auth, &req.get_ref().identity).await?;
        tracing::info!(identity = %record.identity, "identity unbound");
        Ok(Response::new(super::identity::identity_binding(&record)))
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
        let rows = self.vault.recent_audit(limit).await?;
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
                count: e.count,
                last_at: e.last_at.map(timestamp),
            })
            .collect();
        Ok(Response::new(proto::ListAuditEventsResponse { events }))
    }

    async fn get_status(&self, req: Request<proto::GetStatusRequest>) -> Result<Response<proto::Status>, Status> {
        authorize_everywhere(&req, Capability::Admin)?;
        let s = self.vault.status().await;
        let now = crate::model::now_micros();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_durations_are_refused_without_overflow() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        for (seconds, nanos) in [(i64::MIN, 0), (i64::MIN, i32::MIN), (-1, 0), (0, -1), (i64::MAX, i32::MIN)] {
            let e = duration(d(seconds, nanos), "grace_period").unwrap_err();
            assert_eq!((e.code(), e.message()), (tonic::Code::InvalidArgument, "grace_period must not be negative"));
        }
        let e = duration(d(1, i32::MAX), "grace_period").unwrap_err();
        assert!(e.message().contains("nanos must be below"), "{}", e.message());
        let max = duration(d(i64::MAX, 999_999_999), "x").unwrap();
        assert_eq!(max, Some(std::time::Duration::new(i64::MAX as u64, 999_999_999)));
        assert_eq!(duration(None, "x").unwrap(), None);
    }

    #[test]
    fn take_secret_wipes_the_whole_message_buffer() {
        let mut field = String::with_capacity(64);
        field.push_str("correct horse battery staple");
        let capacity = field.capacity();
        let secret = take_secret(&mut field);
        assert_eq!(secret.expose_secret(), "correct horse battery staple");
        assert!(field.is_empty());
        assert_eq!(field.capacity(), capacity, "wiped in place, not reallocated");
        // SAFETY: zeroize wrote every byte of the capacity, so all of it is initialised.
        let bytes = unsafe { std::slice::from_raw_parts(field.as_ptr(), capacity) };
        assert!(bytes.iter().all(|b| *b == 0), "passphrase bytes left in the buffer");
    }
}
