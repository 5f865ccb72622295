//! The gRPC edge. Handlers authenticate (via [`AuthInterceptor`]), convert messages,
//! call the [`Vault`](crate::vault::Vault), and map [`VaultError`] to a status code in
//! exactly one place ([`From<VaultError> for Status`]).
//!
//! **Invariant:** no status message carries a secret value, a token or internal detail;
//! internal detail is logged instead.

mod admin;
mod credential;
pub mod layers;
pub mod lifecycle;
mod writes;

pub use admin::AdminApi;
pub use credential::{CredentialApi, STALE_HEADER};
pub use writes::{IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER, WRITE_CONFLICTS_TRAILER};

use tonic::{Request, Status};

use crate::auth::{Auth, AuthError, Caller, Capability};
use crate::names::CredentialName;
use crate::proto;
use crate::store::{Micros, VersionState};
use crate::vault::VaultError;

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Status {
        let msg = e.to_string();
        match e {
            VaultError::InvalidArgument(_) => Status::invalid_argument(msg),
            VaultError::NotFound(_) => Status::not_found(msg),
            VaultError::PermissionDenied(_) => Status::permission_denied(msg),
            VaultError::Conflict { .. } | VaultError::Aborted(_) | VaultError::WriteConflicts(_) => {
                Status::aborted(msg)
            }
            VaultError::AlreadyExists { .. } => Status::already_exists(msg),
            VaultError::FailedPrecondition(_) => Status::failed_precondition(msg),
            VaultError::DataLoss { .. } => Status::data_loss(msg),
            VaultError::Unavailable(source) => {
                // A refusal by the open breaker is one of many while the store is down, and
                // the breaker logs its opening once: no line per request then.
                if matches!(source, crate::store::StoreError::Down) {
                    tracing::debug!(error = %source, "storage unavailable");
                } else {
                    tracing::warn!(error = %source, "storage unavailable");
                }
                Status::unavailable("storage is unavailable; retry later")
            }
            VaultError::UnknownKek(id) => {
                tracing::error!(kek_id = id, "a stored data key refers to a KEK that no keyring row holds");
                Status::data_loss("stored data refers to an unknown key-encryption key")
            }
            VaultError::Internal(detail) => {
                tracing::error!(%detail, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// Checks the bearer token and puts the [`Caller`] into the request's extensions.
#[derive(Clone, Debug)]
pub struct AuthInterceptor {
    auth: Auth,
}

impl AuthInterceptor {
    pub fn new(auth: Auth) -> Self {
        AuthInterceptor { auth }
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let header = match req.metadata().get("authorization") {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| Status::unauthenticated(AuthError::Malformed.to_string()))?),
        };
        let caller = self.auth.authenticate(header).map_err(|e| Status::unauthenticated(e.to_string()))?;
        if let Some(limiter) = &caller.limiter {
            if let Err(wait) = limiter.check() {
                let mut status = Status::resource_exhausted(format!(
                    "rate limit of token {:?} exceeded; retry after {} ms",
                    caller.display_name,
                    wait.as_millis().max(1)
                ));
                if let Ok(v) = wait.as_millis().max(1).to_string().parse() {
                    status.metadata_mut().insert("retry-after-ms", v);
                }
                return Err(status);
            }
        }
        if let Some(ctx) = crate::service::layers::audit::context(&req) {
            ctx.set_caller(caller.clone());
        }
        if let Some(slot) = crate::service::layers::admission::request_slot(req.extensions()) {
            slot.admit(&caller.token_id).map_err(|e| admission_status(&caller, e))?;
        }
        req.extensions_mut().insert(caller);
        Ok(req)
    }
}

/// `RESOURCE_EXHAUSTED` for a refused request or stream, naming the token.
pub(crate) fn admission_status(c: &Caller, e: crate::limits::AdmissionError) -> Status {
    Status::resource_exhausted(format!("token {:?}: {e}", c.display_name))
}

/// The authenticated caller of a request (set by the interceptor).
pub(crate) fn caller<T>(req: &Request<T>) -> Result<std::sync::Arc<Caller>, Status> {
    req.extensions()
        .get::<std::sync::Arc<Caller>>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated(AuthError::Missing.to_string()))
}

/// The caller, if its policy grants `cap` on `name`. A name that is not even valid
/// skips the check: the core rejects it with INVALID_ARGUMENT, which is more useful and
/// reveals nothing.
pub(crate) fn authorize<T>(req: &Request<T>, cap: Capability, name: &str) -> Result<std::sync::Arc<Caller>, Status> {
    let c = caller(req)?;
    if let Some(ctx) = crate::service::layers::audit::context(req) {
        ctx.set_credential(name);
    }
    if CredentialName::parse(name, usize::MAX).is_ok() && !c.policy.allows(cap, name) {
        return Err(denied(&c, cap, name));
    }
    Ok(c)
}

/// Records the version a request read or wrote in its audit event.
pub(crate) fn audit_version<T>(req: &Request<T>, version: u64) {
    if let Some(ctx) = crate::service::layers::audit::context(req) {
        ctx.set_version(version);
    }
}

pub(crate) fn denied(c: &Caller, cap: Capability, name: &str) -> Status {
    Status::permission_denied(format!("token {:?} may not {} {name:?}", c.display_name, cap.as_str()))
}

/// The caller, if it holds `cap` over every name (operator RPCs).
pub(crate) fn authorize_everywhere<T>(req: &Request<T>, cap: Capability) -> Result<std::sync::Arc<Caller>, Status> {
    let c = caller(req)?;
    if !c.policy.allows_everywhere(cap) {
        return Err(Status::permission_denied(format!(
            "token {:?} lacks the {} capability",
            c.display_name,
            cap.as_str()
        )));
    }
    Ok(c)
}

pub(crate) fn timestamp(micros: Micros) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        // In 0..1_000_000_000 by construction.
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or_default(),
    }
}

pub(crate) fn from_timestamp(t: &prost_types::Timestamp) -> Result<Micros, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument("timestamp nanos must be in 0..1e9"));
    }
    t.seconds
        .checked_mul(1_000_000)
        .and_then(|s| s.checked_add(i64::from(t.nanos / 1000)))
        .ok_or_else(|| Status::invalid_argument("timestamp out of range"))
}

pub(crate) fn version_state(s: VersionState) -> proto::VersionState {
    match s {
        VersionState::Current => proto::VersionState::Current,
        VersionState::Previous => proto::VersionState::Previous,
        VersionState::Deprecated => proto::VersionState::Deprecated,
        VersionState::Destroyed => proto::VersionState::Destroyed,
    }
}
