//! Workload identities: bind the identity of an mTLS client certificate (its URI SAN, else
//! its subject CN) to policy rules, list and unbind them (operator calls).

use std::time::SystemTime;

use super::admin_types::PolicyRule;
use super::types::system_time;
use super::{timed, Client, Error};
use crate::proto;

/// A certificate identity and the rules it is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityBinding {
    pub identity: String,
    /// How the identity appears in audit events (their `token_id`).
    pub id: String,
    pub rules: Vec<PolicyRule>,
    pub created_at: Option<SystemTime>,
    /// 0: the daemon's default.
    pub rate_limit_per_second: u32,
}

impl IdentityBinding {
    fn from_proto(b: proto::IdentityBinding) -> IdentityBinding {
        IdentityBinding {
            identity: b.identity,
            id: b.id,
            rules: b.rules.into_iter().map(PolicyRule::from_proto).collect(),
            created_at: b.created_at.as_ref().and_then(system_time),
            rate_limit_per_second: b.rate_limit_per_second,
        }
    }
}

impl Client {
    /// Binds `identity` to `rules`; a client presenting a certificate with it needs no
    /// token. Bound already: `AlreadyExists` (unbind it first).
    pub async fn bind_identity(
        &self,
        identity: &str,
        rules: &[PolicyRule],
        rate_limit_per_second: u32,
    ) -> Result<IdentityBinding, Error> {
        let req = proto::BindIdentityRequest {
            identity: identity.to_owned(),
            rules: rules.iter().map(PolicyRule::to_proto).collect(),
            rate_limit_per_second,
        };
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.bind_identity(req).await }
            })
            .await?;
        Ok(IdentityBinding::from_proto(r.into_inner()))
    }

    pub async fn list_identities(&self) -> Result<Vec<IdentityBinding>, Error> {
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(proto::ListIdentitiesRequest {}, t);
                async move { c.list_identities(req).await }
            })
            .await?;
        Ok(r.into_inner().bindings.into_iter().map(IdentityBinding::from_proto).collect())
    }

    /// Removes a binding; the identity's certificates stop working on every daemon.
    pub async fn unbind_identity(&self, identity: &str) -> Result<IdentityBinding, Error> {
        let req = proto::UnbindIdentityRequest { identity: identity.to_owned() };
        let r = self
            .unary_admin(|mut c, t| {
                let req = timed(req.clone(), t);
                async move { c.unbind_identity(req).await }
            })
            .await?;
        Ok(IdentityBinding::from_proto(r.into_inner()))
    }
}
