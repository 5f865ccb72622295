//! The gRPC edge. Handlers authenticate (via [`AuthInterceptor`]), parse the request's
//! name once into a [`CredentialName`], authorize it, call the
//! [`Vault`](crate::vault::Vault), and convert the model's answer into a message.
//!
//! - `status.rs`: the one mapping from [`VaultError`](crate::vault::VaultError) to a
//!   status code. `interceptor.rs`: bearer token to [`Caller`]. `convert.rs`: timestamps
//!   and version states. `credential.rs`, `admin.rs`: the two services.
//!   `layers/`: the tower layers around them. `lifecycle.rs`: health and drain.
//!
//! **Invariant:** no status message carries a secret value, a token or internal detail;
//! internal detail is logged instead. Nothing here imports the store: the vault answers
//! in the model's types.

mod admin;
mod convert;
mod credential;
mod identity;
mod interceptor;
pub mod layers;
pub mod lifecycle;
mod status;
mod writes;

pub use admin::AdminApi;
pub(crate) use convert::{from_timestamp, timestamp, version_state};
pub use credential::{CredentialApi, STALE_HEADER};
pub use interceptor::AuthInterceptor;
pub use writes::{IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER, WRITE_CONFLICTS_TRAILER};

use tonic::{Extensions, Request, Status};

use crate::auth::{AuthError, Caller, Capability};
use crate::model::CredentialName;
use crate::vault::Vault;

/// `RESOURCE_EXHAUSTED` for a refused request or stream, naming the token.
pub(crate) fn admission_status(c: &Caller, e: crate::limits::AdmissionError) -> Status {
    Status::resource_exhausted(format!("token {:?}: {e}", c.display_name))
}

/// The authenticated caller of a request (set by the interceptor).
pub(crate) fn caller<T>(req: &Request<T>) -> Result<std::sync::Arc<Caller>, Status> {
    caller_of(req.extensions())
}

/// [`caller`] for a request already taken apart (`Request::into_parts`).
pub(crate) fn caller_of(ext: &Extensions) -> Result<std::sync::Arc<Caller>, Status> {
    ext.get::<std::sync::Arc<Caller>>().cloned().ok_or_else(|| Status::unauthenticated(AuthError::Missing.to_string()))
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

/// The hot path's form of [`authorize`]: takes the name out of the request, records it
/// in the audit event, parses it once (INVALID_ARGUMENT before any policy check, which
/// reveals nothing) and checks `cap` on it. The handler passes the [`CredentialName`]
/// on to the vault, which neither re-validates nor copies it.
pub(crate) fn authorize_name(
    vault: &Vault,
    ext: &Extensions,
    cap: Capability,
    raw: String,
) -> Result<(std::sync::Arc<Caller>, CredentialName), Status> {
    let c = caller_of(ext)?;
    if let Some(ctx) = ext.get::<std::sync::Arc<crate::audit::AuditContext>>() {
        ctx.set_credential(&raw);
    }
    let name = vault.parse_name(raw)?;
    if !c.policy.allows(cap, name.as_str()) {
        return Err(denied(&c, cap, name.as_str()));
    }
    Ok((c, name))
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
