//! What the operator calls take and return: tokens and their rules, the daemon's status,
//! audit events, rotation sources and policies, key rotation jobs. Converted from and to
//! the generated types here and nowhere else in the client.

use std::fmt;
use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use super::types::{proto_duration, std_duration, system_time};
use super::SecretValue;
use crate::proto;

fn time(t: &Option<prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(system_time)
}

/// What a token rule grants (or, in a deny rule, takes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Capability {
    Read,
    Write,
    Delete,
    List,
    Rotate,
    /// Operator calls (tokens, keys, status, audit); only with the pattern `**`.
    Admin,
    /// What cannot be undone or cuts a grace period short.
    Destroy,
    /// A capability this client does not know (a newer daemon).
    Unknown,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Read,
        Capability::Write,
        Capability::Delete,
        Capability::List,
        Capability::Rotate,
        Capability::Destroy,
        Capability::Admin,
    ];

    /// `read`, `write`, ...; `None` for anything else.
    pub fn parse(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Lower case; `?` for [`Capability::Unknown`].
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Rotate => "rotate",
            Capability::Admin => "admin",
            Capability::Destroy => "destroy",
            Capability::Unknown => "?",
        }
    }

    fn from_proto(v: i32) -> Capability {
        match proto::Capability::try_from(v) {
            Ok(proto::Capability::Read) => Capability::Read,
            Ok(proto::Capability::Write) => Capability::Write,
            Ok(proto::Capability::Delete) => Capability::Delete,
            Ok(proto::Capability::List) => Capability::List,
            Ok(proto::Capability::Rotate) => Capability::Rotate,
            Ok(proto::Capability::Admin) => Capability::Admin,
            Ok(proto::Capability::Destroy) => Capability::Destroy,
            _ => Capability::Unknown,
        }
    }

    fn to_proto(self) -> i32 {
        (match self {
            Capability::Read => proto::Capability::Read,
            Capability::Write => proto::Capability::Write,
            Capability::Delete => proto::Capability::Delete,
            Capability::List => proto::Capability::List,
            Capability::Rotate => proto::Capability::Rotate,
            Capability::Admin => proto::Capability::Admin,
            Capability::Destroy => proto::Capability::Destroy,
            // Refused by the daemon as INVALID_ARGUMENT.
            Capability::Unknown => proto::Capability::Unspecified,
        }) as i32
    }
}

/// One rule of a token: the names `pattern` covers and what it grants there (or denies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    pub pattern: String,
    pub capabilities: Vec<Capability>,
    pub deny: bool,
}

impl PolicyRule {
    pub(super) fn from_proto(r: proto::PolicyRule) -> PolicyRule {
        PolicyRule {
            pattern: r.pattern,
            capabilities: r.capabilities.into_iter().map(Capability::from_proto).collect(),
            deny: r.deny,
        }
    }

    pub(super) fn to_proto(&self) -> proto::PolicyRule {
        proto::PolicyRule {
            pattern: self.pattern.clone(),
            capabilities: self.capabilities.iter().map(|c| c.to_proto()).collect(),
            deny: self.deny,
        }
    }
}

/// A token to create.
#[derive(Debug, Clone, Default)]
pub struct TokenSpec {
    pub display_name: String,
    pub rules: Vec<PolicyRule>,
    /// `None`: never expires.
    pub ttl: Option<Duration>,
    /// Requests per second; 0: the daemon's default.
    pub rate_limit_per_second: u32,
}

impl TokenSpec {
    pub(crate) fn to_proto(&self) -> proto::CreateTokenRequest {
        proto::CreateTokenRequest {
            display_name: self.display_name.clone(),
            rules: self.rules.iter().map(PolicyRule::to_proto).collect(),
            ttl: self.ttl.map(proto_duration),
            rate_limit_per_second: self.rate_limit_per_second,
        }
    }
}

/// A token as the daemon lists it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    /// First hex characters of the token's SHA-256.
    pub id: String,
    pub display_name: String,
    pub rules: Vec<PolicyRule>,
    pub created_at: Option<SystemTime>,
    pub expires_at: Option<SystemTime>,
    pub revoked_at: Option<SystemTime>,
}

impl TokenInfo {
    pub(crate) fn from_proto(t: proto::TokenInfo) -> TokenInfo {
        TokenInfo {
            created_at: time(&t.created_at),
            expires_at: time(&t.expires_at),
            revoked_at: time(&t.revoked_at),
            rules: t.rules.into_iter().map(PolicyRule::from_proto).collect(),
            id: t.id,
            display_name: t.display_name,
        }
    }
}

/// A token just created: the secret is shown once (redacted in `Debug`).
#[derive(Clone)]
pub struct NewToken {
    pub token: Zeroizing<String>,
    pub info: Option<TokenInfo>,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken").field("token", &"REDACTED").field("info", &self.info).finish()
    }
}

/// `GetStatus`.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonStatus {
    pub version: String,
    /// `postgres` or `sqlite`.
    pub storage_backend: String,
    pub storage_healthy: bool,
    /// `passphrase` or `key-file`.
    pub master_key_source: String,
    pub active_kek_id: u32,
    pub credentials: u64,
    pub started_at: Option<SystemTime>,
    pub uptime: Option<Duration>,
}

impl DaemonStatus {
    pub(crate) fn from_proto(s: proto::Status) -> DaemonStatus {
        DaemonStatus {
            started_at: time(&s.started_at),
            uptime: std_duration(s.uptime.as_ref()),
            version: s.version,
            storage_backend: s.storage_backend,
            storage_healthy: s.storage_healthy,
            master_key_source: s.master_key_source,
            active_kek_id: s.active_kek_id,
            credentials: s.credentials,
        }
    }
}

/// One audit event (never a value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub at: Option<SystemTime>,
    pub request_id: String,
    /// Empty when the request was unauthenticated.
    pub token_id: String,
    pub token_name: String,
    pub rpc: String,
    pub credential: String,
    pub version: u64,
    /// The gRPC status code name, e.g. `OK`, `NOT_FOUND`.
    pub code: String,
    pub latency_us: u64,
    pub peer: String,
    /// Identical successful reads this event stands for, made between `at` and `last_at`.
    pub count: u64,
    pub last_at: Option<SystemTime>,
}

impl AuditEvent {
    pub(crate) fn from_proto(e: proto::AuditEvent) -> AuditEvent {
        AuditEvent {
            at: time(&e.at),
            last_at: time(&e.last_at),
            request_id: e.request_id,
            token_id: e.token_id,
            token_name: e.token_name,
            rpc: e.rpc,
            credential: e.credential,
            version: e.version,
            code: e.code,
            latency_us: e.latency_us,
            peer: e.peer,
            count: e.count,
        }
    }
}

/// A generated password.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PasswordSpec {
    pub length: u32,
    pub lowercase: bool,
    pub uppercase: bool,
    pub digits: bool,
    pub symbols: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteEncoding {
    Raw,
    Hex,
    Base64,
}

/// Generated random bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BytesSpec {
    pub length: u32,
    pub encoding: ByteEncoding,
}

impl PasswordSpec {
    fn to_proto(self) -> proto::PasswordSpec {
        proto::PasswordSpec {
            length: self.length,
            lowercase: self.lowercase,
            uppercase: self.uppercase,
            digits: self.digits,
            symbols: self.symbols,
        }
    }

    fn from_proto(p: &proto::PasswordSpec) -> PasswordSpec {
        PasswordSpec {
            length: p.length,
            lowercase: p.lowercase,
            uppercase: p.uppercase,
            digits: p.digits,
            symbols: p.symbols,
        }
    }
}

impl BytesSpec {
    fn to_proto(self) -> proto::BytesSpec {
        let encoding = match self.encoding {
            ByteEncoding::Raw => proto::ByteEncoding::Raw,
            ByteEncoding::Hex => proto::ByteEncoding::Hex,
            ByteEncoding::Base64 => proto::ByteEncoding::Base64,
        };
        proto::BytesSpec { length: self.length, encoding: encoding as i32 }
    }

    fn from_proto(b: &proto::BytesSpec) -> BytesSpec {
        let encoding = match proto::ByteEncoding::try_from(b.encoding) {
            Ok(proto::ByteEncoding::Raw) => ByteEncoding::Raw,
            Ok(proto::ByteEncoding::Hex) => ByteEncoding::Hex,
            _ => ByteEncoding::Base64,
        };
        BytesSpec { length: b.length, encoding }
    }
}

/// How a rotation policy makes new values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    Password(PasswordSpec),
    RandomBytes(BytesSpec),
}

/// Where the value of a rotation comes from.
#[derive(Debug, Clone)]
pub enum RotationSource {
    Value(SecretValue),
    Generate(Generator),
}

/// A rotation: the source (`None`: the credential's policy generates the value), how long
/// the replaced version stays readable (`None`: the policy's grace period, else the
/// daemon's default; zero: not at all) and an optional compare-and-set.
#[derive(Debug, Clone, Default)]
pub struct RotateOptions {
    pub source: Option<RotationSource>,
    pub grace_period: Option<Duration>,
    pub expected_version: Option<u64>,
}

impl RotateOptions {
    pub(crate) fn to_proto(&self, name: &str) -> proto::RotateCredentialRequest {
        use proto::rotate_credential_request::Source;
        proto::RotateCredentialRequest {
            name: name.to_owned(),
            source: self.source.as_ref().map(|s| match s {
                RotationSource::Value(v) => Source::Value(v.expose().to_vec()),
                RotationSource::Generate(Generator::Password(p)) => Source::Password(p.to_proto()),
                RotationSource::Generate(Generator::RandomBytes(b)) => Source::RandomBytes(b.to_proto()),
            }),
            grace_period: self.grace_period.map(proto_duration),
            expected_version: self.expected_version,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    /// Never by itself; a rotation without a value uses the policy's generator.
    Manual,
    /// Every `interval`.
    Periodic,
    /// `interval` before the credential expires; each rotation sets the expiry to now +
    /// `validity`.
    BeforeExpiry,
    /// Once, at `at`.
    Scheduled,
    Unknown,
}

impl PolicyKind {
    /// Lower case with `_` (`before_expiry`), as the command line prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Manual => "manual",
            PolicyKind::Periodic => "periodic",
            PolicyKind::BeforeExpiry => "before_expiry",
            PolicyKind::Scheduled => "scheduled",
            PolicyKind::Unknown => "unspecified",
        }
    }
}

/// A credential's rotation policy. The last four fields are the daemon's to fill in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationPolicy {
    pub name: String,
    pub kind: PolicyKind,
    pub interval: Option<Duration>,
    pub validity: Option<Duration>,
    pub at: Option<SystemTime>,
    /// Required by the daemon.
    pub generator: Option<Generator>,
    /// `None`: the daemon's default.
    pub grace_period: Option<Duration>,
    pub next_run_at: Option<SystemTime>,
    pub rotations: u64,
    pub last_rotated_at: Option<SystemTime>,
    pub last_error: String,
}

impl RotationPolicy {
    /// A policy to set: no output fields.
    pub fn new(name: impl Into<String>, kind: PolicyKind) -> RotationPolicy {
        RotationPolicy {
            name: name.into(),
            kind,
            interval: None,
            validity: None,
            at: None,
            generator: None,
            grace_period: None,
            next_run_at: None,
            rotations: 0,
            last_rotated_at: None,
            last_error: String::new(),
        }
    }

    pub(crate) fn to_proto(&self) -> proto::RotationPolicy {
        use proto::rotation_policy::Generator as G;
        let kind = match self.kind {
            PolicyKind::Manual => proto::PolicyKind::Manual,
            PolicyKind::Periodic => proto::PolicyKind::Periodic,
            PolicyKind::BeforeExpiry => proto::PolicyKind::BeforeExpiry,
            PolicyKind::Scheduled => proto::PolicyKind::Scheduled,
            PolicyKind::Unknown => proto::PolicyKind::Unspecified,
        };
        proto::RotationPolicy {
            name: self.name.clone(),
            kind: kind as i32,
            interval: self.interval.map(proto_duration),
            validity: self.validity.map(proto_duration),
            at: self.at.map(prost_types::Timestamp::from),
            generator: self.generator.map(|g| match g {
                Generator::Password(p) => G::Password(p.to_proto()),
                Generator::RandomBytes(b) => G::RandomBytes(b.to_proto()),
            }),
            grace_period: self.grace_period.map(proto_duration),
            ..Default::default()
        }
    }

    pub(crate) fn from_proto(p: proto::RotationPolicy) -> RotationPolicy {
        use proto::rotation_policy::Generator as G;
        let kind = match proto::PolicyKind::try_from(p.kind) {
            Ok(proto::PolicyKind::Manual) => PolicyKind::Manual,
            Ok(proto::PolicyKind::Periodic) => PolicyKind::Periodic,
            Ok(proto::PolicyKind::BeforeExpiry) => PolicyKind::BeforeExpiry,
            Ok(proto::PolicyKind::Scheduled) => PolicyKind::Scheduled,
            _ => PolicyKind::Unknown,
        };
        RotationPolicy {
            kind,
            interval: std_duration(p.interval.as_ref()),
            validity: std_duration(p.validity.as_ref()),
            at: time(&p.at),
            generator: p.generator.as_ref().map(|g| match g {
                G::Password(s) => Generator::Password(PasswordSpec::from_proto(s)),
                G::RandomBytes(b) => Generator::RandomBytes(BytesSpec::from_proto(b)),
            }),
            grace_period: std_duration(p.grace_period.as_ref()),
            next_run_at: time(&p.next_run_at),
            rotations: p.rotations,
            last_rotated_at: time(&p.last_rotated_at),
            last_error: p.last_error,
            name: p.name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Completed,
    Failed,
    Unknown,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
            JobState::Unknown => "unknown",
        }
    }
}

/// A key-encryption-key rotation and its re-wrap progress.
#[derive(Debug, Clone, PartialEq)]
pub struct RotationJob {
    pub job_id: u64,
    pub state: JobState,
    pub new_kek_id: u32,
    pub done: u64,
    pub total: u64,
    /// Versions whose data key failed authentication and could not be re-wrapped.
    pub failed: u64,
    pub rate_per_second: f64,
    pub eta: Option<Duration>,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub error: String,
}

impl RotationJob {
    pub(crate) fn from_proto(j: proto::RotationJob) -> RotationJob {
        let state = match proto::JobState::try_from(j.state) {
            Ok(proto::JobState::Running) => JobState::Running,
            Ok(proto::JobState::Completed) => JobState::Completed,
            Ok(proto::JobState::Failed) => JobState::Failed,
            _ => JobState::Unknown,
        };
        RotationJob {
            job_id: j.job_id,
            state,
            new_kek_id: j.new_kek_id,
            done: j.done,
            total: j.total,
            failed: j.failed,
            rate_per_second: j.rate_per_second,
            eta: std_duration(j.eta.as_ref()),
            started_at: time(&j.started_at),
            finished_at: time(&j.finished_at),
            error: j.error,
        }
    }
}
