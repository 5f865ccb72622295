//! The change feed's vocabulary: what a write reports ([`ChangeEvent`]), what the feed
//! delivers ([`Change`]), and the text of a notification (`kind TAB version TAB at TAB
//! name`), which every backend that notifies sends and decodes the same way.

use super::{ChangeKind, Micros};

/// One change to one credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEvent {
    pub name: String,
    pub kind: ChangeKind,
    /// The version written, deleted at, or destroyed.
    pub version: u64,
    pub at: Micros,
}

/// What the change feed reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Another daemon changed this credential.
    Credential(ChangeEvent),
    /// The token table changed in ways not named one by one: reload all of it.
    Tokens,
    /// A token was created or revoked (its hash): refresh that one entry.
    Token(String),
    /// Another daemon changed the KEKs or the master key's wrapping of them.
    Keys,
    /// The feed's connection dropped: from now on notifications may be missed, so what
    /// is cached can no longer be trusted (but may still be served within
    /// `cache.serve_stale_seconds` while the store is down).
    Lost,
    /// The feed is subscribed (again): notifications sent while it was away are gone, so
    /// everything cached must be revalidated before it is trusted.
    Resync,
}

/// Stands for "the token table changed" on the change feed; no credential name can
/// contain `#`.
pub const TOKENS_CHANGED: &str = "#tokens";
/// Stands for "the KEK table changed".
pub const KEYS_CHANGED: &str = "#keys";

/// The change feed's message for a credential change: `kind TAB version TAB at TAB name`.
pub(crate) fn encode_change(e: &ChangeEvent) -> String {
    format!("{}\t{}\t{}\t{}", e.kind.as_str(), e.version, e.at, e.name)
}

/// The change feed's message for a change to a whole table ([`TOKENS_CHANGED`], [`KEYS_CHANGED`]).
pub(crate) fn encode_table_change(table: &str) -> String {
    format!("table\t0\t0\t{table}")
}

/// The change feed's message for one token created or revoked: names it by hash, so
/// other daemons refresh one entry instead of reloading every token.
pub(crate) fn encode_token_change(token_hash: &str) -> String {
    format!("token\t0\t0\t{token_hash}")
}

/// Reads a message made by [`encode_change`], [`encode_table_change`] or
/// [`encode_token_change`].
pub(crate) fn decode_change(payload: &str) -> Option<Change> {
    let mut parts = payload.splitn(4, '\t');
    let (kind, version, at, name) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind == "token" {
        let hex = name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        return hex.then(|| Change::Token(name.to_owned()));
    }
    if kind == "table" {
        return match name {
            TOKENS_CHANGED => Some(Change::Tokens),
            KEYS_CHANGED => Some(Change::Keys),
            _ => None,
        };
    }
    Some(Change::Credential(ChangeEvent {
        name: name.to_owned(),
        kind: ChangeKind::parse(kind)?,
        version: version.parse().ok()?,
        at: at.parse().ok()?,
    }))
}

/// Where the change feed delivers what it hears.
pub type ChangeSink = std::sync::Arc<dyn Fn(Change) + Send + Sync>;
