//! TLS and mutual TLS on the gRPC listener, with certificates made in the test.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use credvault::config::TlsSettings;
use credvault::proto::admin_service_client::AdminServiceClient;
use credvault::proto::GetStatusRequest;

use crate::helpers::spawn::Binary;
use crate::helpers::{Backend, TestDaemon, TestEnv};

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: String,
    client_key: String,
    rogue_cert: String,
    rogue_key: String,
}

fn ca(name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    (p.self_signed(&key).unwrap(), key)
}

fn leaf(sans: &[&str], cn: &str, issuer: &rcgen::Certificate, issuer_key: &KeyPair) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    let cert = p.signed_by(&key, issuer, issuer_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn pki(dir: &Path) -> Pki {
    let (ca_cert, ca_key) = ca("credvault test CA");
    let (server_cert, server_key) = leaf(&["localhost", "127.0.0.1"], "credvault", &ca_cert, &ca_key);
    let (client_cert, client_key) = leaf(&[], "payments-service", &ca_cert, &ca_key);
    let (rogue_ca, rogue_ca_key) = ca("someone else");
    let (rogue_cert, rogue_key) = leaf(&[], "intruder", &rogue_ca, &rogue_ca_key);
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}

async fn status_over(d: &TestDaemon, tls: Option<ClientTlsConfig>) -> Result<(), String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://127.0.0.1:{}", d.addr.port())).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).map_err(|e| e.to_string())?;
    }
    let channel = endpoint.connect().await.map_err(|e| format!("connect: {e}"))?;
    let mut admin = AdminServiceClient::with_interceptor(channel, d.bearer());
    admin.get_status(GetStatusRequest {}).await.map(|_| ()).map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

fn client_tls(pki: &Pki, identity: Option<(&str, &str)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(&pki.ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        c = c.identity(Identity::from_pem(cert, key));
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let pki = pki(env.data_dir());

    // Server TLS only.
    let mut settings = env.settings();
    settings.tls = Some(TlsSettings {
        cert_file: pki.server_cert.clone(),
        key_file: pki.server_key.clone(),
        client_ca_file: None,
    });
    let d = TestDaemon::start(settings.clone(), None).await;
    status_over(&d, Some(client_tls(&pki, None))).await.unwrap();
    let plain = status_over(&d, None).await;
    assert!(plain.is_err(), "a plaintext client must not get through: {plain:?}");
    // A client that does not trust the server's CA refuses it.
    let untrusting =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pki.rogue_cert.clone())).domain_name("localhost");
    assert!(status_over(&d, Some(untrusting)).await.is_err());
    // The daemon kept serving through all that.
    status_over(&d, Some(client_tls(&pki, None))).await.unwrap();

    // The CLI speaks TLS too.
    let out = Binary::new(["status", "--addr", &format!("127.0.0.1:{}", d.addr.port()), "--tls-domain", "localhost"])
        .arg("--tls-ca")
        .arg(&pki.ca)
        .env("CREDVAULT_TOKEN", &d.token)
        .output()
        .await;
    assert!(out.status.success(), "{}", out.stderr);
    let token = d.token.clone();
    d.stop().await;

    // Mutual TLS: a client certificate from our CA is required.
    settings.tls.as_mut().unwrap().client_ca_file = Some(pki.ca.clone());
    let d = TestDaemon::start(settings, Some(&token)).await;
    status_over(&d, Some(client_tls(&pki, Some((&pki.client_cert, &pki.client_key))))).await.unwrap();
    assert!(status_over(&d, Some(client_tls(&pki, None))).await.is_err(), "no client certificate");
    assert!(
        status_over(&d, Some(client_tls(&pki, Some((&pki.rogue_cert, &pki.rogue_key))))).await.is_err(),
        "a certificate from another CA"
    );
    assert!(status_over(&d, None).await.is_err());
    status_over(&d, Some(client_tls(&pki, Some((&pki.client_cert, &pki.client_key))))).await.unwrap();
    d.stop().await;
}

#[tokio::test]
async fn bad_tls_files_fail_start_up() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.tls = Some(TlsSettings {
        cert_file: env.data_dir().join("missing.pem"),
        key_file: env.data_dir().join("missing.key"),
        client_ca_file: None,
    });
    let err = credvault::server::Daemon::build(settings).await.unwrap_err();
    assert!(err.to_string().contains("missing.pem"), "{err}");
}
