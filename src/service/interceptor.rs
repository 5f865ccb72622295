//! Authentication: the bearer token becomes the request's [`Caller`], checked against
//! its rate limit and in-flight cap before any handler runs.

use tonic::{Request, Status};

use super::admission_status;
use crate::auth::{Auth, AuthError};

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
