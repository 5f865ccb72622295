//! TLS to PostgreSQL where the driver's own TLS would not do what the URL asks:
//! `sslmode=verify-ca` (sqlx's chain-only verifier misses rustls 0.23's name error and
//! rejects every certificate whose name differs) and a private CA (`sslrootcert`) with
//! `verify-full` or `verify-ca` (sqlx trusts the public web roots besides it).
//!
//! For those, the pool connects over a Unix socket, in a directory only this process's
//! user can enter, to a bridge that opens the TCP connection itself, sends PostgreSQL's
//! `SSLRequest`, completes the TLS handshake with a verifier that trusts exactly the
//! given CA (checking the host name for `verify-full` only), and then relays bytes.
//!
//! **Invariant:** nothing reaches PostgreSQL through the bridge over a connection whose
//! certificate did not verify against the configured CA.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixListener};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// What the bridge verifies.
#[derive(Debug, Clone)]
pub(super) struct BridgeSpec {
    pub root_cert: PathBuf,
    /// `verify-full`: the certificate must also name the host.
    pub check_name: bool,
    /// A client certificate and key (`sslcert`, `sslkey`).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// A running bridge; dropping it stops accepting and removes its socket directory.
pub(super) struct Bridge {
    dir: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bridge {
    /// The directory to give the driver as its socket directory.
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }
}

/// Connect plus handshake; the pool's own acquire timeout is shorter, so this only
/// bounds how long an abandoned attempt lingers.
const OPEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// PostgreSQL's `SSLRequest`: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    name: ServerName<'static>,
    connector: TlsConnector,
}

impl Target {
    async fn open(&self) -> io::Result<TlsStream<TcpStream>> {
        tokio::time::timeout(OPEN_TIMEOUT, self.open_now())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connection to PostgreSQL timed out"))?
    }

    async fn open_now(&self) -> io::Result<TlsStream<TcpStream>> {
        let mut tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(&SSL_REQUEST).await?;
        let mut answer = [0u8; 1];
        tcp.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(io::Error::other("the server does not accept TLS connections"));
        }
        self.connector.connect(self.name.clone(), tcp).await
    }
}

fn config_error(m: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, m)
}

fn client_config(spec: &BridgeSpec) -> io::Result<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(&spec.root_cert)
        .map_err(|e| config_error(format!("sslrootcert {}: {e}", spec.root_cert.display())))?;
    for cert in certs {
        let cert = cert.map_err(|e| config_error(format!("sslrootcert {}: {e}", spec.root_cert.display())))?;
        roots.add(cert).map_err(|e| config_error(format!("sslrootcert {}: {e}", spec.root_cert.display())))?;
    }
    if roots.is_empty() {
        return Err(config_error(format!("sslrootcert {} holds no certificate", spec.root_cert.display())));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_error(e.to_string()))?;
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| config_error(e.to_string()))?;
    let builder = if spec.check_name {
        builder.with_webpki_verifier(verifier)
    } else {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(ChainOnly(verifier)))
    };
    match &spec.client {
        None => Ok(builder.with_no_client_auth()),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| config_error(format!("sslcert {}: {e}", cert.display())))?;
            let key_der = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| config_error(format!("sslkey {}: {e}", key.display())))?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| config_error(e.to_string()))
        }
    }
}

/// `verify-ca`: the chain must lead to the configured CA; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked after the chain, so a name error means the chain verified.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Checks one handshake (so a wrong CA or name fails start-up with the reason), then
/// starts the bridge. The socket is `<dir>/.s.PGSQL.<port>`, where the driver looks.
pub(super) async fn start(spec: &BridgeSpec, host: &str, port: u16) -> io::Result<Bridge> {
    let config = client_config(spec)?;
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| config_error(format!("host {host:?} cannot be checked against a certificate: {e}")))?;
    let target = Target { host: host.to_owned(), port, name, connector: TlsConnector::from(Arc::new(config)) };
    let mut probe = target.open().await?;
    let _ = probe.shutdown().await;
    drop(probe);

    let dir = std::env::temp_dir().join(format!("credvault-pg-{:016x}", rand::random::<u64>()));
    let mut builder = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(&dir)?;
    let listener = match UnixListener::bind(dir.join(format!(".s.PGSQL.{port}"))) {
        Ok(l) => l,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    let task = tokio::spawn(async move {
        loop {
            let mut local = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "PostgreSQL TLS bridge cannot accept; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let target = target.clone();
            tokio::spawn(async move {
                let mut remote = match target.open().await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(host = %target.host, port = target.port, error = %e, "cannot open a TLS connection to PostgreSQL");
                        return;
                    }
                };
                if let Err(e) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                    tracing::debug!(error = %e, "PostgreSQL TLS connection ended with an error");
                }
            });
        }
    });
    Ok(Bridge { dir, task })
}
