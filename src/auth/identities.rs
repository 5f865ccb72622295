//! Workload identities bound to policies: what [`Auth`] knows of them and the admin
//! operations on them (`BindIdentity`, `ListIdentities`, `UnbindIdentity`).
//!
//! An identity caller is a [`Caller`] like a token's: its policy, its rate limit, its
//! id (`id-` and 12 hex characters of the identity's SHA-256, used by admission caps,
//! page tokens and audit rows) and its display name `identity:<identity>` (the audit
//! rows' `token_name`).
//!
//! **Invariant:** a binding removed here stops working here at once, and on every other
//! daemon when its token reload (woken by the change notification) has run.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::{Auth, AuthError, Caller};
use crate::policy::{Policy, PolicyDoc, Rule};
use crate::store::{now_micros, IdentityRecord, Store, StoreError};
use crate::vault::identity::MAX_IDENTITY_BYTES;

/// Bindings one daemon holds at most; binding more is refused.
pub const MAX_BINDINGS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Invalid(String),
    #[error("identity {0:?} is bound already; unbind it first")]
    Exists(String),
    #[error("identity {0:?} is not bound")]
    NotFound(String),
    #[error("at most {MAX_BINDINGS} identities may be bound")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks an identity as an admin names it: what a certificate could present.
pub fn check_identity(identity: &str) -> Result<(), IdentityError> {
    let ok = !identity.is_empty()
        && identity.len() <= MAX_IDENTITY_BYTES
        && identity.bytes().all(|b| (0x21..=0x7e).contains(&b));
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(format!(
            "identity must be 1-{MAX_IDENTITY_BYTES} printable ASCII characters without spaces \
             (a URI SAN such as spiffe://example.org/ns/payments/sa/api, or a certificate CN)"
        )))
    }
}

/// The public id of an identity caller.
pub fn identity_id(identity: &str) -> String {
    let digest = hex::encode(Sha256::digest(identity.as_bytes()));
    format!("id-{}", &digest[..12])
}

/// One binding as a daemon holds it: the stored policy document (a reload keeps the
/// caller, and its rate-limit state, while the document is the same) and its caller.
#[derive(Debug, Clone)]
pub(super) struct Binding {
    policies: String,
    caller: Arc<Caller>,
}

fn caller(record: &IdentityRecord, default_rate: u32) -> Result<Arc<Caller>, StoreError> {
    let doc = PolicyDoc::parse(&record.policies)?;
    let rate = doc.rate_limit_per_second.unwrap_or(default_rate);
    Ok(Arc::new(Caller {
        token_id: identity_id(&record.identity),
        display_name: format!("identity:{}", record.identity),
        policy: Policy::from_doc(&doc),
        limiter: crate::limits::TokenLimiter::per_second(rate),
    }))
}

impl Auth {
    /// The bindings in the store, keeping the callers (and their rate-limit state) of
    /// bindings that did not change. Called by [`Auth::reload`] under its lock.
    pub(super) async fn load_identities(&self, store: &dyn Store) -> Result<HashMap<String, Binding>, StoreError> {
        let records = store.list_identities().await?;
        let old = self.identities.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut map = HashMap::with_capacity(records.len());
        for r in &records {
            let b = match old.get(&r.identity) {
                Some(b) if b.policies == r.policies => b.clone(),
                _ => Binding { policies: r.policies.clone(), caller: caller(r, self.default_rate)? },
            };
            map.insert(r.identity.clone(), b);
        }
        metrics::gauge!(crate::telemetry::names::IDENTITIES).set(map.len() as f64);
        Ok(map)
    }

    /// The caller bound to a certificate's identity.
    pub fn authenticate_identity(&self, identity: &str) -> Result<Arc<Caller>, AuthError> {
        let bindings = self.identities.read().unwrap_or_else(|p| p.into_inner());
        bindings.get(identity).map(|b| b.caller.clone()).ok_or(AuthError::UnboundIdentity)
    }

    /// Whether a stream opened by `caller` with this `authorization` header (empty for a
    /// certificate identity) may go on: its token is still live, or its identity is still
    /// bound to the same rules (a rebinding ends it too). Token display names cannot
    /// contain ':', so the `identity:` prefix names identity callers only.
    pub fn still_valid(&self, header: &str, caller: &Arc<Caller>) -> bool {
        match caller.display_name.strip_prefix("identity:") {
            Some(identity) if header.is_empty() => {
                self.authenticate_identity(identity).is_ok_and(|c| Arc::ptr_eq(&c, caller))
            }
            _ => self.authenticate(Some(header)).is_ok(),
        }
    }

    fn apply_identity(&self, identity: &str, c: Option<Binding>) {
        let mut bindings = self.identities.write().unwrap_or_else(|p| p.into_inner());
        match c {
            Some(c) => bindings.insert(identity.to_owned(), c),
            None => bindings.remove(identity),
        };
        metrics::gauge!(crate::telemetry::names::IDENTITIES).set(bindings.len() as f64);
    }

    /// Binds `identity` to `rules`. It works here at once, and on other daemons when they
    /// hear of it.
    pub async fn bind_identity(
        &self,
        store: &dyn Store,
        identity: &str,
        rules: Vec<Rule>,
        rate_limit_per_second: Option<u32>,
    ) -> Result<IdentityRecord, IdentityError> {
        check_identity(identity)?;
        let policy = Policy::new(rules).map_err(|e| IdentityError::Invalid(e.replace("a token", "an identity")))?;
        if self.identities.read().unwrap_or_else(|p| p.into_inner()).len() >= MAX_BINDINGS {
            return Err(IdentityError::TooMany);
        }
        let doc = PolicyDoc::new(&policy, rate_limit_per_second);
        let record = IdentityRecord {
            identity: identity.to_owned(),
            policies: serde_json::to_string(&doc).map_err(|e| IdentityError::Invalid(e.to_string()))?,
            created_at: now_micros(),
        };
        let _serial = self.reload_lock.lock().await;
        if !store.insert_identity(&record).await? {
            return Err(IdentityError::Exists(identity.to_owned()));
        }
        let binding = Binding { policies: record.policies.clone(), caller: caller(&record, self.default_rate)? };
        self.apply_identity(identity, Some(binding));
        Ok(record)
    }

    /// Removes the binding of `identity`; certificates presenting it stop working here at
    /// once, and on other daemons when they hear of it.
    pub async fn unbind_identity(&self, store: &dyn Store, identity: &str) -> Result<IdentityRecord, IdentityError> {
        check_identity(identity)?;
        let _serial = self.reload_lock.lock().await;
        let record = store.delete_identity(identity).await?.ok_or_else(|| IdentityError::NotFound(identity.into()))?;
        self.apply_identity(identity, None);
        Ok(record)
    }
}
