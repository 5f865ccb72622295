//! `UpdateCredentialMetadata`: patches a credential's metadata under its own version.
//!
//! Labels are patched (set some, remove some, keep the rest); description, owner and
//! expiry are replaced when given. The metadata version moves on by one per change, and
//! an `expected_metadata_version` makes the update a compare-and-set on it. The value and
//! its version are never touched.

use std::collections::BTreeMap;

use super::*;
use crate::store::WriteStore as _;

/// Unconditional updates retry their compare-and-set on the metadata version this often.
const MAX_METADATA_ATTEMPTS: usize = 16;

/// What to change. Absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetadataPatch {
    pub set_labels: BTreeMap<String, String>,
    pub remove_labels: Vec<String>,
    pub description: Option<String>,
    pub owner: Option<String>,
    /// `Some(None)` clears the expiry.
    pub expires_at: Option<Option<Micros>>,
}

impl MetadataPatch {
    fn is_empty(&self) -> bool {
        self.set_labels.is_empty()
            && self.remove_labels.is_empty()
            && self.description.is_none()
            && self.owner.is_none()
            && self.expires_at.is_none()
    }

    fn apply(&self, m: &Metadata) -> Metadata {
        let mut out = m.clone();
        for k in &self.remove_labels {
            out.labels.remove(k);
        }
        out.labels.extend(self.set_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(d) = &self.description {
            out.description = d.clone();
        }
        if let Some(o) = &self.owner {
            out.owner = o.clone();
        }
        if let Some(e) = self.expires_at {
            out.expires_at = e;
        }
        out
    }
}

impl Vault {
    /// Applies `patch` to the metadata of `name` (with `expected`: only at that metadata
    /// version). Returns the head after the change.
    pub async fn update_metadata(
        &self,
        name: &(impl NameArg + ?Sized),
        patch: &MetadataPatch,
        expected: Option<u64>,
    ) -> Result<CredentialHead, VaultError> {
        let name = self.name(name)?;
        if patch.is_empty() {
            return Err(VaultError::InvalidArgument(
                "nothing to change: give labels to set or remove, a description, an owner or an expiry".into(),
            ));
        }
        match expected {
            Some(0) => {
                return Err(VaultError::InvalidArgument(
                    "expected_metadata_version 0: metadata versions start at 1".into(),
                ))
            }
            Some(v) if v >= MAX_VERSION => {
                return Err(VaultError::InvalidArgument(format!(
                    "expected_metadata_version {v} is out of range: it must be below {MAX_VERSION}"
                )))
            }
            _ => {}
        }
        let max = self.inner.limits.max_labels;
        if patch.remove_labels.len() > max {
            return Err(VaultError::InvalidArgument(format!(
                "{} labels to remove; the limit is {max}",
                patch.remove_labels.len()
            )));
        }
        if let Some(k) = patch.remove_labels.iter().find(|k| patch.set_labels.contains_key(*k)) {
            return Err(VaultError::InvalidArgument(format!("label {k:?} is both set and removed")));
        }
        let store = &self.inner.store;
        for attempt in 0..MAX_METADATA_ATTEMPTS {
            if attempt > 0 {
                super::write::conflict_backoff(attempt).await;
            }
            let head = match store.get_credential(name.as_str()).await? {
                None => return Err(not_found(&name)),
                Some(h) if h.deleted_at.is_some() => return Err(deleted(&name)),
                Some(h) => h,
            };
            if let Some(e) = expected.filter(|e| *e != head.metadata_version) {
                return Err(VaultError::Aborted(format!(
                    "metadata version conflict on {:?}: expected metadata version {e}, current metadata version \
                     is {}",
                    name.as_str(),
                    head.metadata_version
                )));
            }
            let merged = patch.apply(&head.metadata);
            self.check_metadata(&merged)?;
            if let Some(after) = store.set_metadata(name.as_str(), &merged, head.metadata_version, self.now()).await? {
                return Ok(after);
            }
            // Changed (or deleted) since it was read: read again, and with an expected
            // version report the conflict.
        }
        Err(VaultError::Aborted(format!(
            "gave up updating the metadata of {:?} after {MAX_METADATA_ATTEMPTS} attempts lost to concurrent \
             writers; retry",
            name.as_str()
        )))
    }
}
