//! The one place core errors become gRPC statuses. Internal detail is logged here and
//! answered with a bare code; messages name the caller's own inputs only.

use tonic::Status;

use crate::auth::TokenError;
use crate::vault::VaultError;

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Status {
        let msg = e.to_string();
        let quiet = e.is_breaker_refusal();
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
                if quiet {
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

/// Token administration errors; a storage failure maps as the vault's would.
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
