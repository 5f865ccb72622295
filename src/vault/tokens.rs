//! Tokens and the audit trail as the admin API sees them: the token table lives in
//! [`Auth`] (in memory) and the store; these go through the vault's store, so the edge
//! never holds a store handle.

use super::*;
use crate::auth::{Auth, NewToken, Rule, TokenError};
use crate::store::{AuditRow, AuditStore, TokenRecord, TokenStore};

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

    /// The newest `limit` audit events, newest first.
    pub async fn recent_audit(&self, limit: u32) -> Result<Vec<AuditRow>, VaultError> {
        Ok(self.inner.store.recent_audit(limit).await?)
    }
}
