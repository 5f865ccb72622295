//! The rows the store reads and writes, and what a write or a scan asks of it. Plain data:
//! the SQL that fills them is in `sql/`.

use super::{ChangeKind, Metadata, Micros, StoreError, VersionInfo};
use crate::crypto::{KdfParams, Sealed};

/// A version with its sealed bytes (`None` once destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRow {
    pub info: VersionInfo,
    pub sealed: Option<Sealed>,
}

/// What the compare-and-set of a write expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBase {
    /// No row by this name.
    Create,
    /// A live row at this current version.
    Update(u64),
    /// A soft-deleted row at this current version; the write revives it.
    Revive(u64),
}

impl WriteBase {
    /// The version the write creates (saturating: callers refuse versions beyond
    /// `vault::MAX_VERSION` before writing).
    pub fn next_version(self) -> u64 {
        match self {
            WriteBase::Create => 1,
            WriteBase::Update(v) | WriteBase::Revive(v) => v.saturating_add(1),
        }
    }
}

pub struct NewVersion<'a> {
    pub name: &'a str,
    pub base: WriteBase,
    pub sealed: &'a Sealed,
    /// `None` keeps the stored metadata.
    pub metadata: Option<&'a Metadata>,
    pub now: Micros,
    /// Versions older than the newest `max_versions` are pruned in the same transaction.
    pub max_versions: u64,
    /// When the version this write supersedes stops being readable (a rotation's grace
    /// period); `None` keeps it readable until pruned.
    pub previous_expires_at: Option<Micros>,
    /// What the change feed reports the write as.
    pub kind: ChangeKind,
    /// A rotation moves the credential's rotation policy on in the same transaction.
    pub policy: Option<PolicyAdvance>,
}

/// How a rotation updates the credential's rotation policy row (if it has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyAdvance {
    /// A scheduled rotation claims its slot: the write commits only if the policy's
    /// `next_run_at` still equals this, so of several daemons exactly one rotates per slot.
    pub claim: Option<Micros>,
    /// The next slot (`None`: nothing more is due).
    pub next_run_at: Option<Micros>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterKeySource {
    Passphrase,
    KeyFile,
}

impl MasterKeySource {
    pub fn as_str(self) -> &'static str {
        match self {
            MasterKeySource::Passphrase => "passphrase",
            MasterKeySource::KeyFile => "key-file",
        }
    }
}

/// How this database's master key is made and checked.
#[derive(Debug, Clone)]
pub struct KeyringRow {
    pub source: MasterKeySource,
    /// Salt and cost for a passphrase-derived key.
    pub kdf: Option<(Vec<u8>, KdfParams)>,
    pub verifier: Vec<u8>,
    pub created_at: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KekState {
    Active,
    Retiring,
    Retired,
}

impl KekState {
    pub fn as_str(self) -> &'static str {
        match self {
            KekState::Active => "active",
            KekState::Retiring => "retiring",
            KekState::Retired => "retired",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "active" => KekState::Active,
            "retiring" => KekState::Retiring,
            "retired" => KekState::Retired,
            other => return Err(StoreError::Corrupt(format!("unknown KEK state {other:?}"))),
        })
    }
}

#[derive(Debug, Clone)]
pub struct KekRow {
    pub id: i64,
    pub wrapped_key: Vec<u8>,
    pub state: KekState,
    pub created_at: Micros,
}

/// One audited request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AuditRow {
    pub at: Micros,
    pub request_id: String,
    pub token_id: String,
    pub token_name: String,
    pub rpc: String,
    pub credential: Option<String>,
    pub version: Option<u64>,
    pub code: String,
    pub latency_us: u64,
    pub peer: String,
    /// Identical successful reads this row stands for (1 unless folded).
    pub count: u64,
    /// The last of the folded reads (`None` for a single event).
    pub last_at: Option<Micros>,
}

/// A version whose DEK is wrapped by an older KEK (empty `wrapped_dek`: destroyed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RewrapRow {
    pub name: String,
    pub version: u64,
    pub kek_id: i64,
    pub wrapped_dek: Vec<u8>,
}

/// A re-wrapped DEK, applied only if the row still holds `old` (so it never races a
/// concurrent destroy, prune or another re-wrap).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrapped {
    pub old: RewrapRow,
    pub wrapped_dek: Vec<u8>,
}

/// One committed batch of a re-wrap job.
#[derive(Debug, Clone)]
pub struct RewrapBatch<'a> {
    pub job_id: i64,
    pub owner: &'a str,
    pub new_kek_id: i64,
    pub rows: &'a [Rewrapped],
    /// The last row the batch looked at (re-wrapped or not).
    pub cursor: (&'a str, u64),
    pub failed: u64,
    pub now: Micros,
    pub lease_until: Micros,
}

/// One scan of `ListCredentials`: names `start <= name < end` in name order (byte
/// order), at most `limit` of them. See [`NameRange`](crate::names::NameRange) for bounds.
#[derive(Debug, Clone)]
pub struct ListQuery<'a> {
    pub start: &'a str,
    pub end: &'a str,
    pub limit: u32,
    pub include_deleted: bool,
}
