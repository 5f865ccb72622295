//! Tokens and the audit trail as the admin API sees them: the token table lives in
//! [`Auth`] (in memory) and the store; these go through the vault's store, so the edge
//! never holds a store handle.

use super::*;
use crate::auth::{Auth, IdentityError, NewToken, Rule, TokenError};
use crate::store::{AuditRow, AuditStore, IdentityRecord, IdentityStore, TokenRecord, TokenStore};

impl Vault {
    /// Creates a token (see [`Auth::create_token`]).
    pub async fn create_token(
        &self,
        auth: &Auth,
        display_name: &str,
        rules: Vec<Rule>,
        ttl: Option<std::time::Duration>,
        rate_limit_per_second: Option<u32>,
    ) -> Result<NewToken, TokenError> {
        auth.create_token(self.inner.store.as_ref(), display_name, rules, ttl, rate_limit_per_second).await
    }

    /// Revokes the live token whose id starts with `id` (see [`Auth::revoke_token`]).
    pub async fn revoke_token(&self, auth: &Auth, id: &str) -> Result<TokenRecord, TokenError> {
        auth.revoke_token(self.inner.store.as_ref(), id).await
    }

    /// Every token, live or revoked (hashes and metadata only).
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, VaultError> {
        Ok(self.inner.store.list_tokens().await?)
    }

    /// Binds a workload identity to `rules` (see [`Auth::bind_identity`]).
    pub async fn bind_identity(
        &self,
        auth: &Auth,
        identity: &str,
        rules: Vec<Rule>,
        rate_limit_per_second: Option<u32>,
    ) -> Result<IdentityRecord, IdentityError> {
        auth.bind_identity(self.inner.store.as_ref(), identity, rules, rate_limit_per_second).await
    }

    /// Removes a workload identity's binding (see [`Auth::unbind_identity`]).
    pub async fn unbind_identity(&self, auth: &Auth, identity: &str) -> Result<IdentityRecord, IdentityError> {
        auth.unbind_identity(self.inner.store.as_ref(), identity).await
    }

    /// Every bound identity, in identity order.
    pub async fn list_identities(&self) -> Result<Vec<IdentityRecord>, VaultError> {
        Ok(self.inner.store.list_identities().await?)
    }

    /// The newest `limit` audit events, newest first.
    pub async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, VaultError> {
        Ok(self.inner.store.recent_audit(limit).await?)
    }
}
