//! What the core and the edge share: credential names, metadata, version states,
//! change kinds, rotation policies and jobs, token records, and the [`Clock`].
//!
//! Plain data with no I/O. The store fills these from its rows, the vault returns them,
//! and the gRPC edge converts them to messages; neither edge imports the store.
//!
//! **Invariant:** nothing here imports `tonic`, generated proto types, sqlx or the store.

pub mod clock;
pub mod names;

use std::collections::BTreeMap;

pub use clock::{now_micros, Clock, ManualClock, Micros, SystemClock};
pub use names::{CredentialName, NameError};

/// A stored enumeration value this build does not know (the store reports it as
/// corruption).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {value:?}")]
pub struct UnknownValue {
    pub what: &'static str,
    pub value: String,
}

/// What happened to a credential, as the change feed and `WatchCredentials` report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Put,
    Rotate,
    Delete,
    Undelete,
    DestroyVersion,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Rotate => "rotate",
            ChangeKind::Delete => "delete",
            ChangeKind::Undelete => "undelete",
            ChangeKind::DestroyVersion => "destroy",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "put" => ChangeKind::Put,
            "rotate" => ChangeKind::Rotate,
            "delete" => ChangeKind::Delete,
            "undelete" => ChangeKind::Undelete,
            "destroy" => ChangeKind::DestroyVersion,
            _ => return None,
        })
    }
}

/// Descriptive data a credential carries besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub owner: String,
    pub expires_at: Option<Micros>,
}

/// The head of a credential: its name, current version and metadata (a row of
/// `credentials`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHead {
    pub name: String,
    pub current_version: u64,
    pub metadata: Metadata,
    /// Counts changes to `metadata`, apart from the value's version (compare-and-set for
    /// `UpdateCredentialMetadata`).
    pub metadata_version: u64,
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

    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "current" => VersionState::Current,
            "previous" => VersionState::Previous,
            "deprecated" => VersionState::Deprecated,
            "destroyed" => VersionState::Destroyed,
            other => return Err(UnknownValue { what: "version state", value: other.to_owned() }),
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

    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "manual" => PolicyKind::Manual,
            "periodic" => PolicyKind::Periodic,
            "before_expiry" => PolicyKind::BeforeExpiry,
            "scheduled" => PolicyKind::Scheduled,
            other => return Err(UnknownValue { what: "rotation policy kind", value: other.to_owned() }),
        })
    }
}

/// A credential's rotation policy (a row of `rotation_policies`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
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

    pub fn parse(s: &str) -> Result<Self, UnknownValue> {
        Ok(match s {
            "running" => JobState::Running,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            other => return Err(UnknownValue { what: "job state", value: other.to_owned() }),
        })
    }
}

/// A KEK re-wrap job and how far it got (a row of `rotation_jobs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationJob {
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

/// A stored token: its hash (never the token), name and policy (a row of `tokens`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Hex SHA-256 of the token.
    pub token_hash: String,
    pub display_name: String,
    /// Policy rules as JSON.
    pub policies: String,
    pub created_at: Micros,
    pub expires_at: Option<Micros>,
    pub revoked_at: Option<Micros>,
}

/// A workload identity (see `vault::identity`) bound to a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    pub identity: String,
    /// The JSON policy document, as tokens carry it.
    pub policies: String,
    pub created_at: Micros,
}
