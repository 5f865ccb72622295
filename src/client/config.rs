//! How a client reaches the daemon: address, TLS or mutual TLS, where the token comes
//! from, timeouts and the retry policy.
//!
//! **Invariant:** the token is read into a zeroizing buffer, marked sensitive in the
//! request metadata and never printed: `Debug` shows where it comes from, not what it is.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use zeroize::Zeroizing;

use super::retry::RetryPolicy;
use super::Error;

/// The default daemon address (`credvault serve` with no configuration).
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:7420";

/// Where the bearer token comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// Read from this environment variable when the client is built.
    Env(String),
    /// Read from this file (trailing whitespace stripped), e.g. a mounted Kubernetes
    /// secret; re-read on every [`Client::connect`](super::Client::connect).
    File(PathBuf),
    /// Given directly.
    Value(Zeroizing<String>),
}

impl TokenSource {
    /// `CREDVAULT_TOKEN`, the variable the command line uses.
    pub fn env() -> TokenSource {
        TokenSource::Env("CREDVAULT_TOKEN".into())
    }

    pub fn value(token: impl Into<String>) -> TokenSource {
        TokenSource::Value(Zeroizing::new(token.into()))
    }

    pub(crate) fn read(&self) -> Result<Zeroizing<String>, Error> {
        let token = match self {
            TokenSource::Env(var) => Zeroizing::new(
                std::env::var(var).map_err(|_| Error::Config(format!("environment variable {var} is not set")))?,
            ),
            TokenSource::File(path) => {
                let raw = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| Error::Config(format!("cannot read the token file {}: {e}", path.display())))?,
                );
                Zeroizing::new(raw.trim_end().to_owned())
            }
            TokenSource::Value(v) => v.clone(),
        };
        if token.is_empty() {
            return Err(Error::Config(format!("the token from {self:?} is empty")));
        }
        Ok(token)
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Env(var) => write!(f, "env {var}"),
            TokenSource::File(path) => write!(f, "file {}", path.display()),
            TokenSource::Value(_) => f.write_str("value REDACTED"),
        }
    }
}

/// TLS towards the daemon. A CA to trust (else the system roots are not used: the daemon
/// normally has a private CA), and a client certificate for mutual TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    /// PEM CA that signed the daemon's certificate.
    pub ca: Option<PathBuf>,
    /// PEM client certificate and key, for a daemon that requires mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Name to verify in the daemon's certificate (default: the address's host).
    pub domain: Option<String>,
}

/// Everything [`Client::connect`](super::Client::connect) needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` or `https://host:port` (TLS is implied by `tls`).
    pub addr: String,
    pub token: TokenSource,
    pub tls: Option<TlsConfig>,
    pub connect_timeout: Duration,
    /// Deadline of one attempt (sent to the daemon as `grpc-timeout` too).
    pub timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            addr: DEFAULT_ADDR.into(),
            token: TokenSource::env(),
            tls: None,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
        }
    }
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>, token: TokenSource) -> ClientConfig {
        ClientConfig { addr: addr.into(), token, ..ClientConfig::default() }
    }

    /// From the same environment variables as the command line: `CREDVAULT_ADDR`,
    /// `CREDVAULT_TOKEN` (or `CREDVAULT_TOKEN_FILE`), `CREDVAULT_TLS_CA`,
    /// `CREDVAULT_TLS_CLIENT_CERT`, `CREDVAULT_TLS_CLIENT_KEY`, `CREDVAULT_TLS_DOMAIN`.
    pub fn from_env() -> ClientConfig {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let token = match (var("CREDVAULT_TOKEN"), var("CREDVAULT_TOKEN_FILE")) {
            (None, Some(file)) => TokenSource::File(file.into()),
            _ => TokenSource::env(),
        };
        let tls = TlsConfig {
            ca: var("CREDVAULT_TLS_CA").map(Into::into),
            client_cert: var("CREDVAULT_TLS_CLIENT_CERT").map(Into::into),
            client_key: var("CREDVAULT_TLS_CLIENT_KEY").map(Into::into),
            domain: var("CREDVAULT_TLS_DOMAIN"),
        };
        let any_tls = tls.ca.is_some() || tls.client_cert.is_some() || tls.domain.is_some();
        ClientConfig {
            addr: var("CREDVAULT_ADDR").unwrap_or_else(|| DEFAULT_ADDR.into()),
            token,
            tls: any_tls.then_some(tls),
            ..ClientConfig::default()
        }
    }

    /// The tonic endpoint: `https` when TLS is configured or asked for by the address (an
    /// `http://` address is upgraded), plaintext otherwise.
    pub fn endpoint(&self) -> Result<Endpoint, Error> {
        let tls = self.tls.is_some() || self.addr.starts_with("https://");
        let addr = match (self.addr.split_once("://"), tls) {
            (Some(("http", rest)), true) => format!("https://{rest}"),
            (Some(_), _) => self.addr.clone(),
            (None, true) => format!("https://{}", self.addr),
            (None, false) => format!("http://{}", self.addr),
        };
        let bad = |e: &dyn fmt::Display| Error::Config(format!("address {addr:?}: {e}"));
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| bad(&e))?
            .tcp_nodelay(true)
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        if tls {
            endpoint = endpoint.tls_config(client_tls(self.tls.as_ref())?).map_err(|e| bad(&e))?;
        }
        Ok(endpoint)
    }
}

fn client_tls(tls: Option<&TlsConfig>) -> Result<ClientTlsConfig, Error> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| Error::Config(format!("cannot read {}: {e}", p.display())));
    let mut config = ClientTlsConfig::new();
    let Some(tls) = tls else { return Ok(config) };
    if let Some(ca) = &tls.ca {
        config = config.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => config = config.identity(Identity::from_pem(read(cert)?, read(key)?)),
        (None, None) => {}
        _ => return Err(Error::Config("a client certificate needs its key and a key its certificate".into())),
    }
    if let Some(domain) = &tls.domain {
        config = config.domain_name(domain.clone());
    }
    Ok(config)
}
