//! Bearer tokens. Tokens are stored only as SHA-256 hashes; the daemon keeps every
//! hash in memory so authenticating a request never queries the database.
//!
//! **Invariant:** a token's plaintext exists only in the request header and, once, in
//! the answer that creates it.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

use crate::store::{now_micros, Micros, Store, StoreError, TokenRecord};

use crate::policy::ROOT_POLICY;
pub use crate::policy::{Capability, Policy, PolicyDoc, Rule};

/// Every token starts with this, so leaked tokens are easy to find with a scanner.
pub const TOKEN_PREFIX: &str = "cvt_";

/// Who is calling: put into each request's extensions by the interceptor.
#[derive(Debug)]
pub struct Caller {
    /// The first 12 hex characters of the token hash: identifies a token in logs and audits.
    pub token_id: String,
    pub display_name: String,
    pub policy: Policy,
    /// Requests per second this token may make; `None`: unlimited.
    pub limiter: Option<crate::limits::TokenLimiter>,
}

#[derive(Debug, Clone)]
struct Entry {
    caller: Arc<Caller>,
    expires_at: Option<Micros>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send `authorization: Bearer <token>`")]
    Missing,
    #[error("malformed authorization header: expected `Bearer <token>`")]
    Malformed,
    /// Unknown, revoked and expired tokens get the same answer: no oracle for guessing.
    #[error("invalid or expired token")]
    Invalid,
}

/// The in-memory token table. Cheap to clone.
#[derive(Clone, Default)]
pub struct Auth {
    // std RwLock: lookups are short and never await.
    tokens: Arc<RwLock<HashMap<[u8; 32], Entry>>>,
    /// Rate limit for tokens that do not set their own (0: none).
    default_rate: u32,
    /// Held while a reload reads and swaps the table and while a local create or revoke
    /// applies itself, so a reload never overwrites a newer change with an older list.
    reload_lock: Arc<tokio::sync::Mutex<()>>,
    /// Wakes the reload task ([`Auth::run_reloads`]); several requests coalesce.
    reload_requested: Arc<tokio::sync::Notify>,
    /// What the reload task has been asked to do.
    pending: Arc<std::sync::Mutex<Pending>>,
    updates: Arc<Updates>,
}

/// How often the table was updated from the store, by kind.
#[derive(Debug, Default)]
struct Updates {
    full: std::sync::atomic::AtomicU64,
    one: std::sync::atomic::AtomicU64,
}

/// Work queued for the reload task: single tokens to refresh, or the whole table.
#[derive(Debug, Default)]
struct Pending {
    full: bool,
    tokens: std::collections::HashSet<[u8; 32]>,
}

/// More single-token refreshes than this queued at once turn into one full reload.
const MAX_PENDING_TOKENS: usize = 1024;

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.tokens.read().map(|t| t.len()).unwrap_or_default();
        f.debug_struct("Auth").field("tokens", &n).finish()
    }
}

pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// A new random 256-bit token.
pub fn generate_token() -> SecretString {
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(raw.as_mut());
    SecretString::from(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(raw.as_ref())))
}

impl Auth {
    /// Loads every live token hash from the store.
    pub async fn load(store: &dyn Store, default_rate: u32) -> Result<Self, StoreError> {
        let auth = Auth { default_rate, ..Auth::default() };
        auth.reload(store).await?;
        Ok(auth)
    }

    /// Replaces the table with the store's live tokens. Tokens already known keep their
    /// entry (a token's policy never changes after creation), so their rate-limit state
    /// survives the reload.
    pub async fn reload(&self, store: &dyn Store) -> Result<(), StoreError> {
        let _serial = self.reload_lock.lock().await;
        let rows = store.list_tokens().await?;
        let old = self.tokens.read().unwrap_or_else(|p| p.into_inner()).clone();
        let mut map = HashMap::with_capacity(rows.len());
        for row in rows.iter().filter(|r| r.revoked_at.is_none()) {
            let hash = parse_hash(&row.token_hash)?;
            let e = match old.get(&hash) {
                Some(e) if e.expires_at == row.expires_at => e.clone(),
                _ => entry(row, self.default_rate)?,
            };
            map.insert(hash, e);
        }
        let live = map.len();
        *self.tokens.write().unwrap_or_else(|p| p.into_inner()) = map;
        self.updated(&self.updates.full, "full", live);
        Ok(())
    }

    fn updated(&self, counter: &std::sync::atomic::AtomicU64, kind: &'static str, live: usize) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!(crate::telemetry::names::TOKEN_UPDATES, "kind" => kind).increment(1);
        metrics::gauge!(crate::telemetry::names::TOKENS).set(live as f64);
    }

    /// Full reloads and single-token refreshes done so far.
    pub fn update_counts(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.updates.full.load(Relaxed), self.updates.one.load(Relaxed))
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the reload task for a full reload (notifications may have been missed, or
    /// an older daemon reported a change without naming the token).
    pub fn request_reload(&self) {
        let mut p = self.pending();
        p.full = true;
        p.tokens.clear();
        drop(p);
        self.reload_requested.notify_one();
    }

    /// Asks the reload task to refresh one token (another daemon created or revoked it;
    /// `token_hash` is its hex hash from the change feed).
    pub fn request_token(&self, token_hash: &str) {
        let Ok(hash) = parse_hash(token_hash) else { return self.request_reload() };
        let mut p = self.pending();
        if !p.full {
            p.tokens.insert(hash);
            if p.tokens.len() > MAX_PENDING_TOKENS {
                p.full = true;
                p.tokens.clear();
            }
        }
        drop(p);
        self.reload_requested.notify_one();
    }

    /// Re-reads one token and applies what the store says: a live token is added (or
    /// kept, with its rate-limit state), a revoked or missing one removed.
    pub async fn refresh_token(&self, store: &dyn Store, hash: [u8; 32]) -> Result<(), StoreError> {
        let _serial = self.reload_lock.lock().await;
        let row = store.get_token(&hex::encode(hash)).await?.filter(|r| r.revoked_at.is_none());
        let known = self.tokens.read().unwrap_or_else(|p| p.into_inner()).get(&hash).cloned();
        let e = match (row, known) {
            (None, _) => None,
            (Some(row), Some(e)) if e.expires_at == row.expires_at => Some(e),
            (Some(row), _) => Some(entry(&row, self.default_rate)?),
        };
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        match e {
            Some(e) => tokens.insert(hash, e),
            None => tokens.remove(&hash),
        };
        let live = tokens.len();
        drop(tokens);
        self.updated(&self.updates.one, "one", live);
        Ok(())
    }

    /// Runs what is pending; on failure puts it back (as a full reload: what failed may
    /// have been part of it) for the caller to retry.
    async fn run_pending(&self, store: &dyn Store) -> Result<(), StoreError> {
        let work = std::mem::take(&mut *self.pending());
        let out = if work.full {
            self.reload(store).await
        } else {
            let mut out = Ok(());
            for hash in &work.tokens {
                out = self.refresh_token(store, *hash).await;
                if out.is_err() {
                    break;
                }
            }
            out
        };
        if out.is_err() {
            let mut p = self.pending();
            p.full = true;
            p.tokens.clear();
        }
        out
    }

    /// The one task that updates the table from the store: single tokens and full
    /// reloads on request, and a full reload every `period` as a backstop to lost
    /// notifications; a failure is retried with backoff (100 ms doubling to 5 s). Runs
    /// until `shutdown` turns true.
    pub async fn run_reloads(
        self,
        store: Arc<dyn Store>,
        period: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                () = self.reload_requested.notified() => {}
                () = tokio::time::sleep(period) => self.pending().full = true,
            }
            let mut backoff = std::time::Duration::from_millis(100);
            while let Err(e) = self.run_pending(store.as_ref()).await {
                tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "cannot reload tokens; retrying");
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }

    /// Applies one local change to the table without reading the others back.
    async fn apply_local(&self, hash: [u8; 32], e: Option<Entry>) {
        let _serial = self.reload_lock.lock().await;
        let mut tokens = self.tokens.write().unwrap_or_else(|p| p.into_inner());
        match e {
            Some(e) => tokens.insert(hash, e),
            None => tokens.remove(&hash),
        };
        metrics::gauge!(crate::telemetry::names::TOKENS).set(tokens.len() as f64);
    }

    /// Checks an `authorization` header value against the in-memory table.
    pub fn authenticate(&self, header: Option<&str>) -> Result<Arc<Caller>, AuthError> {
        let header = header.ok_or(AuthError::Missing)?;
        let (scheme, token) = header.split_once(' ').ok_or(AuthError::Malformed)?;
        let token = token.trim();
        if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
            return Err(AuthError::Malformed);
        }
        let hash = hash_token(token);
        let tokens = self.tokens.read().unwrap_or_else(|p| p.into_inner());
        let e = tokens.get(&hash).ok_or(AuthError::Invalid)?;
        if e.expires_at.is_some_and(|t| t <= now_micros()) {
            return Err(AuthError::Invalid);
        }
        Ok(e.caller.clone())
    }

    /// On a database with no tokens, creates the root token and returns it (to be shown
    /// once). Returns `None` when tokens already exist.
    pub async fn ensure_root_token(&self, store: &dyn Store) -> Result<Option<SecretString>, StoreError> {
        if !store.list_tokens().await?.is_empty() {
            return Ok(None);
        }
        let token = generate_token();
        let row = TokenRecord {
            token_hash: hex::encode(hash_token(token.expose_secret())),
            display_name: "root".into(),
            policies: ROOT_POLICY.into(),
            created_at: now_micros(),
            expires_at: None,
            revoked_at: None,
        };
        // Atomic: of two daemons starting together on an empty database, one creates it.
        if !store.insert_first_token(&row).await? {
            tracing::info!("another daemon created the root token first; not creating one");
            return Ok(None);
        }
        self.reload(store).await?;
        Ok(Some(token))
    }
}

fn parse_hash(hex_hash: &str) -> Result<[u8; 32], StoreError> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash)
        .map_err(|_| StoreError::Corrupt("token hash is not 64 hex characters".into()))?;
    Ok(hash)
}

fn entry(row: &TokenRecord, default_rate: u32) -> Result<Entry, StoreError> {
    let doc = PolicyDoc::parse(&row.policies)?;
    let rate = doc.rate_limit_per_second.unwrap_or(default_rate);
    Ok(Entry {
        caller: Arc::new(Caller {
            token_id: token_id(&row.token_hash),
            display_name: row.display_name.clone(),
            policy: Policy::from_doc(&doc),
            limiter: crate::limits::TokenLimiter::per_second(rate),
        }),
        expires_at: row.expires_at,
    })
}

/// The public id of a token: the first 12 hex characters of its hash.
pub fn token_id(hash_hex: &str) -> String {
    hash_hex.chars().take(12).collect()
}

/// A new token as returned once to its creator.
pub struct NewToken {
    pub token: SecretString,
    pub row: TokenRecord,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("token", &"REDACTED").field("row", &self.row).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Invalid(String),
    #[error("no live token has id {0:?}")]
    NotFound(String),
    #[error("token id {0:?} is ambiguous; give more characters")]
    Ambiguous(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Auth {
    /// Creates a token with `rules`; the token itself is returned once and never stored.
    pub async fn create_token(
        &self,
        store: &dyn Store,
        display_name: &str,
        rules: Vec<Rule>,
        ttl: Option<std::time::Duration>,
        rate_limit_per_second: Option<u32>,
    ) -> Result<NewToken, TokenError> {
        let name_ok = !display_name.is_empty()
            && display_name.len() <= 64
            && display_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
        if !name_ok {
            return Err(TokenError::Invalid(
                "display_name must be 1-64 characters of letters, digits, '.', '_', '-', '@'".into(),
            ));
        }
        let policy = Policy::new(rules).map_err(TokenError::Invalid)?;
        let now = now_micros();
        let expires_at = match ttl {
            None => None,
            Some(d) if d.is_zero() => return Err(TokenError::Invalid("ttl must be positive".into())),
            Some(d) => Some(now.saturating_add(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))),
        };
        let doc = PolicyDoc::new(&policy, rate_limit_per_second);
        let token = generate_token();
        let row = TokenRecord {
            token_hash: hex::encode(hash_token(token.expose_secret())),
            display_name: display_name.to_owned(),
            policies: serde_json::to_string(&doc).map_err(|e| TokenError::Invalid(e.to_string()))?,
            created_at: now,
            expires_at,
            revoked_at: None,
        };
        store.insert_token(&row).await?;
        // This one token, not the whole table: creating stays flat however many exist.
        let e = entry(&row, self.default_rate)?;
        self.apply_local(hash_token(token.expose_secret()), Some(e)).await;
        Ok(NewToken { token, row })
    }

    /// Revokes the live token whose id starts with `id` (at least 8 hex characters). It
    /// stops working here at once, and on other daemons when they hear of it.
    pub async fn revoke_token(&self, store: &dyn Store, id: &str) -> Result<TokenRecord, TokenError> {
        let id = id.to_ascii_lowercase();
        if id.len() < 8 || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::Invalid("token id must be 8-64 hex characters".into()));
        }
        // Two are enough to tell a unique prefix from an ambiguous one.
        let live = store.find_live_tokens(&id, 2).await?;
        let row = match live.as_slice() {
            [] => return Err(TokenError::NotFound(id)),
            [one] => one.clone(),
            _ => return Err(TokenError::Ambiguous(id)),
        };
        let now = now_micros();
        if !store.revoke_token(&row.token_hash, now).await? {
            return Err(TokenError::NotFound(id));
        }
        self.apply_local(parse_hash(&row.token_hash)?, None).await;
        Ok(TokenRecord { revoked_at: Some(now), ..row })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_token(token: &str, expires_at: Option<Micros>) -> Auth {
        let auth = Auth::default();
        let row = TokenRecord {
            token_hash: hex::encode(hash_token(token)),
            display_name: "t".into(),
            policies: "[]".into(),
            created_at: 0,
            expires_at,
            revoked_at: None,
        };
        auth.tokens.write().unwrap().insert(hash_token(token), entry(&row, 0).unwrap());
        auth
    }

    #[test]
    fn headers() {
        let auth = with_token("cvt_abc", None);
        assert_eq!(auth.authenticate(Some("Bearer cvt_abc")).unwrap().display_name, "t");
        assert_eq!(auth.authenticate(Some("bearer cvt_abc")).unwrap().token_id.len(), 12);
        assert_eq!(auth.authenticate(None).err(), Some(AuthError::Missing));
        assert_eq!(auth.authenticate(Some("cvt_abc")).err(), Some(AuthError::Malformed));
        assert_eq!(auth.authenticate(Some("Basic cvt_abc")).err(), Some(AuthError::Malformed));
        assert_eq!(auth.authenticate(Some("Bearer ")).err(), Some(AuthError::Malformed));
        assert_eq!(auth.authenticate(Some("Bearer cvt_abd")).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let auth = with_token("cvt_old", Some(1));
        assert_eq!(auth.authenticate(Some("Bearer cvt_old")).err(), Some(AuthError::Invalid));
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token();
        let b = generate_token();
        assert!(a.expose_secret().starts_with(TOKEN_PREFIX));
        assert_eq!(a.expose_secret().len(), TOKEN_PREFIX.len() + 43);
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
