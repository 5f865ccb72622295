//! The client's error type: one variant per outcome a caller branches on, mapped from the
//! daemon's gRPC status codes in one place ([`Error::from_status`]).
//!
//! **Invariant:** no variant carries a secret value or the token; the daemon's messages
//! never do either, and the client adds only names, versions and codes.

use std::time::Duration;

use tonic::{Code, Status};

/// What a call to the daemon can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("not found: {0}")]
    NotFound(String),
    /// A compare-and-set write lost: `current` is the version now current (when the daemon
    /// said), so the caller can re-read and retry. Never retried by the client.
    #[error("version conflict (current version {}): {message}", current.map_or("unknown".to_owned(), |v| v.to_string()))]
    Conflict { current: Option<u64>, message: String },
    /// A create-only write (`expected_version = 0`) found the credential: `current` is its
    /// version. Never retried.
    #[error("already exists: {message}")]
    AlreadyExists { current: Option<u64>, message: String },
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// The daemon (or its storage) cannot be reached; retried with backoff before it is
    /// returned.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Rate limited or shedding load; retried (after the daemon's hint when it gives one).
    #[error("resource exhausted: {message}")]
    ResourceExhausted { message: String, retry_after: Option<Duration> },
    /// The call (with its retries) did not finish within its deadline.
    #[error("deadline exceeded: {0}")]
    Timeout(String),
    /// A stored value failed authentication on the daemon (tampered or corrupted).
    #[error("data loss: {0}")]
    DataLoss(String),
    /// Any other status (INTERNAL, UNKNOWN, ...): the daemon logged the detail.
    #[error("daemon error ({code:?}): {message}")]
    Other { code: Code, message: String },
    /// The client's own configuration is unusable (address, TLS files, token source).
    #[error("client configuration: {0}")]
    Config(String),
}

impl Error {
    /// Maps a status from the daemon (or from the transport) to a variant.
    pub fn from_status(s: &Status) -> Error {
        let message = s.message().to_owned();
        match s.code() {
            Code::NotFound => Error::NotFound(message),
            Code::Aborted => Error::Conflict { current: version_after(&message, "current version is "), message },
            Code::AlreadyExists => Error::AlreadyExists { current: version_after(&message, "at version "), message },
            Code::PermissionDenied => Error::PermissionDenied(message),
            Code::Unauthenticated => Error::Unauthenticated(message),
            Code::InvalidArgument | Code::OutOfRange => Error::InvalidArgument(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::Unavailable => Error::Unavailable(message),
            Code::ResourceExhausted => Error::ResourceExhausted { retry_after: retry_hint(s), message },
            Code::DeadlineExceeded | Code::Cancelled => Error::Timeout(message),
            Code::DataLoss => Error::DataLoss(message),
            code => Error::Other { code, message },
        }
    }

    /// Maps a `google.rpc.Code` number (a per-name result of a batch read).
    pub(crate) fn from_code(code: i32, message: String) -> Error {
        Error::from_status(&Status::new(Code::from_i32(code), message))
    }

    /// Whether the client retries a call that failed with this error: only when the
    /// daemon could not do the work at all (UNAVAILABLE, RESOURCE_EXHAUSTED). Never on a
    /// conflict, a denial or a bad argument.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::ResourceExhausted { .. })
    }

    /// Whether the daemon could not be reached or could not answer: what the caching
    /// client's stale-if-error covers.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Error::Unavailable(_) | Error::Timeout(_) | Error::ResourceExhausted { .. })
    }
}

/// The daemon's rate limiter attaches `retry-after-ms` to RESOURCE_EXHAUSTED.
pub const RETRY_AFTER_HEADER: &str = "retry-after-ms";

fn retry_hint(s: &Status) -> Option<Duration> {
    let v = s.metadata().get(RETRY_AFTER_HEADER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_millis)
}

/// The version named in a conflict message ("... current version is 7", "... already
/// exists at version 7").
fn version_after(message: &str, marker: &str) -> Option<u64> {
    let rest = &message[message.find(marker)? + marker.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_variants() {
        let conflict =
            Status::aborted("version conflict on \"a/b\": expected version 1, current version is 7 (deleted)");
        assert_eq!(
            Error::from_status(&conflict),
            Error::Conflict { current: Some(7), message: conflict.message().to_owned() }
        );
        assert!(matches!(Error::from_status(&Status::not_found("x")), Error::NotFound(_)));
        assert!(matches!(Error::from_status(&Status::permission_denied("x")), Error::PermissionDenied(_)));
        assert!(matches!(Error::from_status(&Status::unauthenticated("x")), Error::Unauthenticated(_)));
        assert!(matches!(Error::from_status(&Status::internal("x")), Error::Other { code: Code::Internal, .. }));
        assert!(!Error::from_status(&conflict).is_retryable());
        assert!(Error::from_status(&Status::unavailable("x")).is_retryable());
    }

    #[test]
    fn retry_hint_is_read() {
        let mut s = Status::resource_exhausted("slow down");
        s.metadata_mut().insert(RETRY_AFTER_HEADER, "250".parse().unwrap());
        match Error::from_status(&s) {
            Error::ResourceExhausted { retry_after, .. } => assert_eq!(retry_after, Some(Duration::from_millis(250))),
            e => panic!("unexpected {e:?}"),
        }
    }
}
