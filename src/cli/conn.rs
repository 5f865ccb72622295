//! Reaching the daemon, shared by every client subcommand: the connection (a
//! [`crate::client::Client`], the one way the command line calls the daemon), the error
//! type with its exit codes, and reading values and printing timestamps. `bench` alone
//! builds its own channels (`endpoint`, `bearer`): it measures the raw transport.
//! Errors carry an exit code a shell script can branch on: 1 other, 3 not found, 4
//! conflict or precondition, 5 authentication or permission, 6 daemon unreachable or
//! unavailable, 7 invalid argument.

use std::io::{IsTerminal as _, Read as _};

use tonic::metadata::MetadataValue;
use tonic::transport::Endpoint;
use tonic::{Code, Request, Status};

use super::Connection;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach the daemon at {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{} ({:?})", .0.message(), .0.code())]
    Rpc(Status),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A rotation job ended without completing.
    #[error("the rotation job did not complete: {0}")]
    Job(String),
    #[error("{0}")]
    Client(crate::client::Error),
}

impl ClientError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Usage(_) => 7,
            ClientError::Connect { .. } => 6,
            ClientError::Io(_) => 1,
            ClientError::Job(_) => 4,
            ClientError::Client(e) => {
                use crate::client::Error as E;
                match e {
                    E::NotFound(_) => 3,
                    E::Conflict { .. } | E::AlreadyExists { .. } | E::FailedPrecondition(_) => 4,
                    E::Unauthenticated(_) | E::PermissionDenied(_) => 5,
                    E::Unavailable(_) | E::Timeout(_) | E::ResourceExhausted { .. } => 6,
                    E::InvalidArgument(_) | E::Config(_) => 7,
                    _ => 1,
                }
            }
            ClientError::Rpc(s) => match s.code() {
                Code::NotFound => 3,
                Code::Aborted | Code::AlreadyExists | Code::FailedPrecondition => 4,
                Code::Unauthenticated | Code::PermissionDenied => 5,
                Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => 6,
                Code::InvalidArgument | Code::OutOfRange => 7,
                _ => 1,
            },
        }
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Rpc(s)
    }
}

impl From<crate::client::Error> for ClientError {
    fn from(e: crate::client::Error) -> Self {
        ClientError::Client(e)
    }
}

#[derive(Clone)]
pub struct BearerToken(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// The library client for `conn`: TLS, the bearer token, one attempt per call (a shell
/// script decides about retries) and a deadline of [`CALL_TIMEOUT`] per call.
pub(super) async fn connect(conn: &Connection) -> Result<crate::client::Client, ClientError> {
    let mut config = client_config(conn)?;
    config.retry = crate::client::RetryPolicy::none();
    config.timeout = CALL_TIMEOUT;
    crate::client::Client::connect(&config).await.map_err(|e| config_error(conn, e))
}

/// How long one call of a client subcommand may take (the daemon may derive a key for
/// `rekey`); streams (`watch`, a followed KEK job) have no deadline.
pub(super) const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A configuration error of the library in the command line's terms: a TLS file that
/// cannot be read is the caller's mistake (usage), a bad address a connection failure.
fn config_error(conn: &Connection, e: crate::client::Error) -> ClientError {
    match e {
        crate::client::Error::Config(reason) if reason.starts_with("cannot read") => ClientError::Usage(reason),
        crate::client::Error::Config(reason) => ClientError::Connect { addr: conn.addr.clone(), reason },
        e => ClientError::Client(e),
    }
}

/// The `authorization` header for a bearer token, marked sensitive so it is never logged.
pub(super) fn bearer(token: &str) -> Result<BearerToken, ClientError> {
    let mut header: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Usage("the token contains characters not allowed in a header".into()))?;
    header.set_sensitive(true);
    Ok(BearerToken(header))
}

/// The client library's configuration for `conn` (the one way to reach the daemon).
pub(super) fn client_config(conn: &Connection) -> Result<crate::client::ClientConfig, ClientError> {
    use crate::client::{ClientConfig, TlsConfig, TokenSource};
    let token = conn.token.as_deref().filter(|t| !t.is_empty()).ok_or_else(|| {
        ClientError::Usage(
            "no token: set CREDVAULT_TOKEN or pass --token (the root token is printed when the daemon first starts)"
                .into(),
        )
    })?;
    let mut config = ClientConfig::new(conn.addr.clone(), TokenSource::value(token));
    if conn.tls_ca.is_some() || conn.tls_client_cert.is_some() || conn.addr.starts_with("https://") {
        config.tls = Some(TlsConfig {
            ca: conn.tls_ca.clone(),
            client_cert: conn.tls_client_cert.clone(),
            client_key: conn.tls_client_key.clone(),
            domain: conn.tls_domain.clone(),
        });
    }
    Ok(config)
}

/// Where `conn` points: `https` when any TLS option is given (an `http://` address is
/// upgraded), plaintext otherwise. Built by the client library.
pub(super) fn endpoint(conn: &Connection) -> Result<Endpoint, ClientError> {
    let config = client_config(&Connection { token: Some("-".into()), ..conn.clone() })?;
    config.endpoint().map_err(|e| config_error(conn, e))
}

/// Tells the operator, on stderr, when a keyed write was answered from its key. Stdout
/// stays what the first attempt printed, so a script that retries sees the same answer.
pub(super) fn note_replayed(replayed: bool) {
    if replayed {
        eprintln!("answered from the idempotency key: an earlier call with it made this change; nothing changed now");
    }
}

/// RFC 3339 (UTC), `-` when absent.
pub(super) fn ts(t: Option<std::time::SystemTime>) -> String {
    t.map(|t| prost_types::Timestamp::from(t).to_string()).unwrap_or_else(|| "-".into())
}

/// A value from a file (byte for byte) or from stdin (a trailing newline stripped
/// unless `keep_newline`). Never from an argument, where it would show in `ps`.
pub(super) fn read_value(
    file: Option<&std::path::Path>,
    keep_newline: bool,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ClientError> {
    Ok(zeroize::Zeroizing::new(match file {
        Some(path) => {
            std::fs::read(path).map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", path.display())))?
        }
        None => {
            if std::io::stdin().is_terminal() {
                return Err(ClientError::Usage(
                    "give the value with --value-file FILE or on stdin (values are never taken as arguments)".into(),
                ));
            }
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf)?;
            if !keep_newline {
                if buf.ends_with(b"\r\n") {
                    buf.truncate(buf.len() - 2);
                } else if buf.ends_with(b"\n") {
                    buf.truncate(buf.len() - 1);
                }
            }
            buf
        }
    }))
}
