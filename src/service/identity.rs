//! What the identity RPCs of `AdminService` convert: rules in, bindings out, and the
//! binding errors as statuses.

use tonic::Status;

use super::admin::{capability_from_proto, capability_to_proto};
use super::timestamp;
use crate::auth::{Policy, PolicyDoc, Rule};
use crate::proto;

/// Rules as `CreateToken` and `BindIdentity` take them.
pub(super) fn rules_from_proto(rules: Vec<proto::PolicyRule>) -> Result<Vec<Rule>, Status> {
    rules
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
        .collect()
}

pub(super) fn identity_binding(r: &crate::model::IdentityRecord) -> proto::IdentityBinding {
    let doc = PolicyDoc::parse(&r.policies).ok();
    let policy = doc.as_ref().map(Policy::from_doc).unwrap_or_default();
    proto::IdentityBinding {
        identity: r.identity.clone(),
        id: crate::auth::identity_id(&r.identity),
        rules: policy
            .rules()
            .iter()
            .map(|r| proto::PolicyRule {
                pattern: r.pattern.clone(),
                capabilities: r.capabilities.iter().map(|c| capability_to_proto(*c) as i32).collect(),
                deny: r.deny,
            })
            .collect(),
        created_at: Some(timestamp(r.created_at)),
        rate_limit_per_second: doc.and_then(|d| d.rate_limit_per_second).unwrap_or(0),
    }
}

impl From<crate::auth::IdentityError> for Status {
    fn from(e: crate::auth::IdentityError) -> Status {
        use crate::auth::IdentityError as E;
        match e {
            E::Invalid(m) => Status::invalid_argument(m),
            e @ E::Exists(_) => Status::already_exists(e.to_string()),
            e @ E::NotFound(_) => Status::not_found(e.to_string()),
            e @ E::TooMany => Status::resource_exhausted(e.to_string()),
            E::Store(e) => Status::from(crate::vault::VaultError::from(e)),
        }
    }
}
