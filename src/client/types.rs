//! What the client hands out: credentials with their value in a zeroizing, redacted
//! buffer, version information and change events.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use super::Error;
use crate::proto;

/// A secret value: zeroized when dropped, `REDACTED` in `Debug`, not `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(Zeroizing::new(bytes))
    }

    /// The bytes. Copies made from them are the caller's to zeroize.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The bytes as UTF-8, if they are.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(REDACTED, {} bytes)", self.0.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Current,
    /// Superseded, still readable by explicit version during its grace period.
    Previous,
    Deprecated,
    Destroyed,
    Unknown,
}

impl VersionState {
    fn from_proto(v: i32) -> VersionState {
        match proto::VersionState::try_from(v) {
            Ok(proto::VersionState::Current) => VersionState::Current,
            Ok(proto::VersionState::Previous) => VersionState::Previous,
            Ok(proto::VersionState::Deprecated) => VersionState::Deprecated,
            Ok(proto::VersionState::Destroyed) => VersionState::Destroyed,
            _ => VersionState::Unknown,
        }
    }
}

/// One version of a credential, with its value.
#[derive(Debug, Clone)]
pub struct Credential {
    pub name: String,
    pub version: u64,
    pub state: VersionState,
    pub created_at: Option<SystemTime>,
    /// When a superseded version stops being readable.
    pub expires_at: Option<SystemTime>,
    /// Set when the daemon served this from its own cache while its store was
    /// unreachable: the age of what it served.
    pub stale: Option<Duration>,
    pub value: SecretValue,
}

impl Credential {
    pub(crate) fn from_proto(r: proto::GetCredentialResponse, stale: Option<Duration>) -> Credential {
        Credential {
            version: r.version,
            state: VersionState::from_proto(r.state),
            created_at: r.created_at.as_ref().and_then(system_time),
            expires_at: r.expires_at.as_ref().and_then(system_time),
            stale,
            name: r.name,
            value: SecretValue::new(r.value),
        }
    }

    /// Bytes held for this credential, for the cache's byte bound.
    pub(crate) fn weight(&self) -> usize {
        self.value.len() + self.name.len() + std::mem::size_of::<Credential>()
    }
}

impl VersionState {
    /// Lower case, as the command line prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            VersionState::Current => "current",
            VersionState::Previous => "previous",
            VersionState::Deprecated => "deprecated",
            VersionState::Destroyed => "destroyed",
            VersionState::Unknown => "unknown",
        }
    }
}

/// A retained version, without its value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: u64,
    pub state: VersionState,
    pub created_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    /// The key-encryption key that wraps this version's data key.
    pub kek_id: u32,
}

impl VersionInfo {
    pub(crate) fn from_proto(v: &proto::VersionInfo) -> VersionInfo {
        VersionInfo {
            version: v.version,
            state: VersionState::from_proto(v.state),
            created_at: v.created_at.as_ref().and_then(system_time),
            expires_at: v.expires_at.as_ref().and_then(system_time),
            kek_id: v.kek_id,
        }
    }
}

/// What a credential says about itself besides its value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub labels: BTreeMap<String, String>,
    pub description: String,
    pub owner: String,
    /// When the credential itself expires (informational; rotation policies use it).
    pub expires_at: Option<SystemTime>,
}

impl Metadata {
    pub(crate) fn from_proto(m: proto::Metadata) -> Metadata {
        Metadata {
            labels: m.labels.into_iter().collect(),
            description: m.description,
            owner: m.owner,
            expires_at: m.expires_at.as_ref().and_then(system_time),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::Metadata {
        proto::Metadata {
            labels: self.labels.clone().into_iter().collect(),
            description: self.description.clone(),
            owner: self.owner.clone(),
            expires_at: self.expires_at.map(prost_types::Timestamp::from),
        }
    }
}

/// A credential's metadata and retained versions (never a value): `describe`, one row
/// of `list` (whose rows carry no versions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialInfo {
    pub name: String,
    pub current_version: u64,
    pub metadata: Option<Metadata>,
    pub created_at: Option<SystemTime>,
    pub updated_at: Option<SystemTime>,
    /// Set when the credential is soft-deleted.
    pub deleted_at: Option<SystemTime>,
    /// Newest first; empty in listings.
    pub versions: Vec<VersionInfo>,
}

impl CredentialInfo {
    pub(crate) fn from_proto(m: proto::CredentialMetadata) -> CredentialInfo {
        CredentialInfo {
            current_version: m.current_version,
            metadata: m.metadata.map(Metadata::from_proto),
            created_at: m.created_at.as_ref().and_then(system_time),
            updated_at: m.updated_at.as_ref().and_then(system_time),
            deleted_at: m.deleted_at.as_ref().and_then(system_time),
            versions: m.versions.iter().map(VersionInfo::from_proto).collect(),
            name: m.name,
        }
    }
}

/// The outcome of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub version: u64,
    pub previous_version: u64,
    /// When the replaced version stops being readable.
    pub previous_expires_at: Option<SystemTime>,
}

impl Rotated {
    pub(crate) fn from_proto(r: proto::RotateCredentialResponse) -> Rotated {
        Rotated {
            version: r.version,
            previous_version: r.previous_version,
            previous_expires_at: r.previous_expires_at.as_ref().and_then(system_time),
        }
    }
}

impl EventKind {
    /// Upper case, as the command line prints it (`PUT`, `DESTROY_VERSION`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Put => "PUT",
            EventKind::Rotate => "ROTATE",
            EventKind::Delete => "DELETE",
            EventKind::Undelete => "UNDELETE",
            EventKind::DestroyVersion => "DESTROY_VERSION",
            EventKind::Resync => "RESYNC",
            EventKind::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Rotate,
    Delete,
    Undelete,
    DestroyVersion,
    /// Events may have been missed: re-read what you hold under the prefix.
    Resync,
    Unknown,
}

/// A change under a watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    /// Empty for [`EventKind::Resync`].
    pub name: String,
    pub version: u64,
    pub at: Option<SystemTime>,
}

impl Event {
    fn from_proto(e: proto::CredentialEvent) -> Event {
        let kind = match proto::EventKind::try_from(e.kind) {
            Ok(proto::EventKind::Put) => EventKind::Put,
            Ok(proto::EventKind::Rotate) => EventKind::Rotate,
            Ok(proto::EventKind::Delete) => EventKind::Delete,
            Ok(proto::EventKind::Undelete) => EventKind::Undelete,
            Ok(proto::EventKind::DestroyVersion) => EventKind::DestroyVersion,
            Ok(proto::EventKind::Resync) => EventKind::Resync,
            _ => EventKind::Unknown,
        };
        Event { kind, name: e.name, version: e.version, at: e.at.as_ref().and_then(system_time) }
    }
}

/// The events of one `WatchCredentials` call.
pub struct EventStream {
    inner: tonic::Streaming<proto::CredentialEvent>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventStream")
    }
}

impl EventStream {
    pub(crate) fn new(inner: tonic::Streaming<proto::CredentialEvent>) -> EventStream {
        EventStream { inner }
    }

    /// The next event; `None` when the daemon ended the stream, an error when it was
    /// cut (the caller reconnects and re-reads what it holds).
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        match self.inner.message().await {
            Ok(Some(e)) => Some(Ok(Event::from_proto(e))),
            Ok(None) => None,
            Err(s) => Some(Err(Error::from_status(&s))),
        }
    }
}

pub(crate) fn system_time(t: &prost_types::Timestamp) -> Option<SystemTime> {
    let secs = u64::try_from(t.seconds).ok()?;
    let nanos = u32::try_from(t.nanos).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// A protobuf duration as a `Duration`; `None` if negative or absent.
pub(crate) fn std_duration(d: Option<&prost_types::Duration>) -> Option<Duration> {
    d.and_then(|d| Duration::try_from(*d).ok())
}

/// A `Duration` as a protobuf duration (saturating at the largest one).
pub(crate) fn proto_duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap_or(prost_types::Duration { seconds: i64::MAX, nanos: 999_999_999 })
}
