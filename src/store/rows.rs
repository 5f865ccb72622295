//! The rows the store reads and writes, and what a write or a scan asks of it. Plain data:
//! the SQL that fills them is in `sql/`.

use std::collections::BTreeMap;

use super::{ChangeKind, Micros, StoreError};
use crate::crypto::{KdfParams, Sealed};

/// Descriptive data a credential carries besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub owner: String,
    pub expires_at: Option<Micros>,
}

/// A row of `credentials`: the head of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRow {
    pub name: String,
    pub current_version: u64,
    pub metadata: Metadata,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub deleted_at: Option<Micros>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Current,
    Previous,
    Deprecated,
    Destroyed,
}

impl VersionState {
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Previous => "previous",
            VersionState::Deprecated => "deprecated",
            VersionState::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "current" => VersionState::Current,
            "previous" => VersionState::Previous,
            "deprecated" => VersionState::Deprecated,
            "destroyed" => VersionState::Destroyed,
            other => return Err(StoreError::Corrupt(format!("unknown version state {other:?}"))),
        })
    }
}

/// A version's description, without its sealed bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u64,
    pub state: VersionState,
    pub kek_id: i64,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    pub display_name: String,
    /// Policy rules as JSON.
    pub policies: String,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
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

/// When a credential's rotation policy makes the scheduler rotate it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Never by itself: `RotateCredential` without a value uses the policy's generator.
    Manual,
    /// Every `interval`.
    Periodic,
    /// `interval` before the credential's `expires_at`; each rotation renews the expiry.
    BeforeExpiry,
    /// Once, at a time.
    Scheduled,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Manual => "manual",
            PolicyKind::Periodic => "periodic",
            PolicyKind::BeforeExpiry => "before_expiry",
            PolicyKind::Scheduled => "scheduled",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "manual" => PolicyKind::Manual,
            "periodic" => PolicyKind::Periodic,
            "before_expiry" => PolicyKind::BeforeExpiry,
            "scheduled" => PolicyKind::Scheduled,
            other => return Err(StoreError::Corrupt(format!("unknown rotation policy kind {other:?}"))),
        })
    }
}

/// A row of `rotation_policies`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicyRow {
    pub name: String,
    pub kind: PolicyKind,
    pub interval_us: Option<i64>,
    pub validity_us: Option<i64>,
    pub at: Option<Micros>,
    /// The generator spec as JSON.
    pub generator: String,
    pub grace_us: i64,
    pub next_run_at: Option<Micros>,
    pub rotations: u64,
    pub last_rotated_at: Option<Micros>,
    pub last_error: Option<String>,
    pub updated_at: Micros,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            other => return Err(StoreError::Corrupt(format!("unknown job state {other:?}"))),
        })
    }
}

/// A row of `rotation_jobs`: a KEK re-wrap and how far it got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRow {
    pub id: i64,
    pub state: JobState,
    pub new_kek_id: i64,
    pub total: u64,
    pub done: u64,
    pub failed: u64,
    /// The last (name, version) handled.
    pub cursor: Option<(String, u64)>,
    pub started_at: Micros,
    pub updated_at: Micros,
    pub finished_at: Option<Micros>,
    pub error: Option<String>,
    pub lease_owner: Option<String>,
    pub lease_until: Option<Micros>,
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
