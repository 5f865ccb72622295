//! `RollbackCredential`: an older version's value becomes a new current version, without
//! the caller ever reading it. The version it replaces gets the usual grace period (the
//! rotation policy's, else the server default), as after a rotation.

use std::time::Duration;

use super::*;
use crate::store::PolicyStore as _;

/// What a rollback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackOutcome {
    pub name: String,
    /// The new current version, holding the value of `restored`.
    pub version: u64,
    pub restored: u64,
    /// The version it replaced, and when that one stops being readable.
    pub previous_version: u64,
    pub previous_expires_at: Option<Micros>,
}

impl Vault {
    /// Writes the value of version `to_version` of `name` as its new current version
    /// (with `expected`, only if the current version is still that).
    pub async fn rollback(
        &self,
        name: &(impl NameArg + ?Sized),
        to_version: u64,
        expected: Option<u64>,
    ) -> Result<RollbackOutcome, VaultError> {
        let name = self.name(name)?;
        check_expected(expected)?;
        if to_version == 0 {
            return Err(VaultError::InvalidArgument("to_version must be given (versions start at 1)".into()));
        }
        if expected == Some(0) {
            return Err(VaultError::InvalidArgument(
                "expected_version 0 means \"must not exist\"; a rollback needs an existing credential".into(),
            ));
        }
        let store = &self.inner.store;
        let (head, row) = match store.get_version(name.as_str(), Some(to_version)).await? {
            None => return Err(not_found(&name)),
            Some((h, _)) if h.deleted_at.is_some() => return Err(deleted(&name)),
            Some((_, None)) => {
                return Err(VaultError::NotFound(format!(
                    "credential {:?} has no version {to_version} (never written, or no longer retained)",
                    name.as_str()
                )))
            }
            Some((h, Some(v))) => (h, v),
        };
        if to_version == head.current_version {
            return Err(VaultError::FailedPrecondition(format!(
                "version {to_version} of {:?} is already the current version",
                name.as_str()
            )));
        }
        // Deprecated and expired versions may come back (that is the point); destroyed
        // ones have nothing left to bring back.
        let Some(sealed) = row.sealed.as_ref().filter(|_| row.info.state != VersionState::Destroyed) else {
            return Err(VaultError::FailedPrecondition(format!(
                "version {to_version} of {:?} is destroyed and cannot be restored",
                name.as_str()
            )));
        };
        let value = match self.decrypt(&name, to_version, sealed) {
            Err(VaultError::UnknownKek(_)) => {
                // Another daemon rotated the KEK since this one loaded its keys.
                self.reload_keys().await?;
                self.decrypt(&name, to_version, sealed)?
            }
            other => other?,
        };
        let grace = match store.get_rotation_policy(name.as_str()).await? {
            Some(p) => Duration::from_micros(u64::try_from(p.grace_us).unwrap_or(0)),
            None => self.inner.rotation.default_grace(),
        };
        let opts = WriteOptions {
            expected,
            metadata: None,
            grace: Some(grace),
            kind: ChangeKind::Put,
            policy: None,
            live_only: true,
            key: None,
            seen_version: None,
        };
        let out = self.write(name.as_ref(), &value, opts).await?;
        let previous_version = out.version.saturating_sub(1);
        Ok(RollbackOutcome {
            name: out.name,
            version: out.version,
            restored: to_version,
            previous_version,
            previous_expires_at: Some(out.created_at.saturating_add(micros(grace))),
        })
    }
}
