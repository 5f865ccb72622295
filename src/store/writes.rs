//! What idempotent writes and all-or-nothing multi-credential writes ask of the store
//! ([`WriteStore`](super::WriteStore)). Plain data: the SQL is in `sql/writes.rs`.

use super::{CredentialHead, Metadata, Micros, WriteBase};
use crate::crypto::Sealed;

/// An idempotency key to store in the transaction of the write it belongs to. The
/// request is only a keyed hash here; the result is filled in by the store from the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyClaim {
    /// The caller's token id: keys of different tokens never meet.
    pub token_id: String,
    pub key: String,
    pub rpc: &'static str,
    pub fingerprint: Vec<u8>,
    /// When the key may be forgotten.
    pub expires_at: Micros,
}

/// A stored idempotency key and the result of its write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub rpc: String,
    pub fingerprint: Vec<u8>,
    pub name: String,
    /// The version written (a delete: the version it deleted at).
    pub version: u64,
    /// When the write happened.
    pub at: Micros,
    /// A rotation: when the version it replaced stops being readable.
    pub previous_expires_at: Option<Micros>,
    pub expires_at: Micros,
    /// A `WriteCredentials` key: every write's result, in request order (`name` and
    /// `version` then hold the first one's).
    pub batch: Option<Vec<KeyedWrite>>,
}

/// What one write of a keyed batch did, as its key remembers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedWrite {
    pub name: String,
    /// The version written; for a delete, the version deleted at.
    pub version: u64,
    pub deleted: bool,
}

/// One write of a [`BatchWrite`].
#[derive(Debug, Clone, Copy)]
pub enum BatchOp<'a> {
    /// A new version, if the head still matches `base`.
    Put { name: &'a str, base: WriteBase, sealed: &'a Sealed, metadata: Option<&'a Metadata> },
    /// A soft delete of a live credential (at `expected` if given).
    Delete { name: &'a str, expected: Option<u64> },
}

impl BatchOp<'_> {
    pub fn name(&self) -> &str {
        match self {
            BatchOp::Put { name, .. } | BatchOp::Delete { name, .. } => name,
        }
    }
}

/// Several writes applied in one transaction, all or none.
#[derive(Debug, Clone, Copy)]
pub struct BatchWrite<'a> {
    /// Distinct names (the vault refuses duplicates).
    pub ops: &'a [BatchOp<'a>],
    pub now: Micros,
    /// As [`NewVersion::max_versions`](super::NewVersion).
    pub max_versions: u64,
    /// Stored with the batch's results in its transaction; a live key of that name makes
    /// the batch fail with [`StoreError::Conflict`](super::StoreError) and write nothing.
    pub key: Option<&'a KeyClaim>,
}

/// How a [`BatchWrite`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every write committed; the heads after them, in `ops` order.
    Applied(Vec<CredentialHead>),
    /// Nothing was written: the writes (by index into `ops`) whose compare-and-set
    /// failed, each with the head it found (`None`: no credential by that name).
    Conflicts(Vec<(usize, Option<CredentialHead>)>),
}
