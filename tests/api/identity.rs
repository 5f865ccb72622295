//! Workload identity from mTLS: a bound certificate identity authenticates without a
//! token, within its policy; unbinding reaches every daemon; bad certificates and bad
//! bindings are refused with their exact status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, Ia5String, IsCa, KeyPair, SanType};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

use credvault::config::TlsSettings;
use credvault::proto::credential_service_client::CredentialServiceClient;
use credvault::proto::{
    BindIdentityRequest, Capability, GetCredentialRequest, ListAuditEventsRequest, ListCredentialsRequest,
    ListIdentitiesRequest, PolicyRule, UnbindIdentityRequest, WatchCredentialsRequest,
};

use crate::both_backends;
use crate::helpers::spawn::Binary;
use crate::helpers::{
    admin_over, assert_status, client_over, create_token, eventually, put, rule, Admin, Backend, TestDaemon, TestEnv,
};

both_backends!(a_bound_identity_works_within_its_policy, bad_bindings_get_their_exact_status);

const SPIFFE: &str = "spiffe://example.org/ns/payments/sa/api";

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

/// A client certificate and key (PEM) with this CN (none: no CN at all) and URI SANs.
struct Cert(String, String);

impl Pki {
    fn new(dir: &Path) -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, "identity test CA");
        let ca = p.self_signed(&ca_key).unwrap();
        Pki { dir: dir.to_owned(), ca, ca_key }
    }

    fn leaf(&self, cn: Option<&str>, uris: &[&str], dns: &[&str]) -> Cert {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::OrganizationName, "Example");
        if let Some(cn) = cn {
            p.distinguished_name.push(DnType::CommonName, cn);
        }
        p.subject_alt_names.extend(uris.iter().map(|u| SanType::URI(Ia5String::try_from(*u).unwrap())));
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).unwrap();
        Cert(cert.pem(), key.serialize_pem())
    }

    /// mTLS settings: the server certificate for localhost, clients verified by our CA.
    fn tls(&self) -> TlsSettings {
        let Cert(cert, key) = self.leaf(Some("credvault"), &[], &["localhost"]);
        let write = |name: &str, text: &str| {
            let p = self.dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        TlsSettings {
            cert_file: write("server.pem", &cert),
            key_file: write("server.key", &key),
            client_ca_file: Some(write("ca.pem", &self.ca.pem())),
        }
    }

    async fn channel(&self, d: &TestDaemon, cert: &Cert) -> Result<Channel, tonic::transport::Error> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(self.ca.pem()))
            .domain_name("localhost")
            .identity(Identity::from_pem(&cert.0, &cert.1));
        Channel::from_shared(format!("https://127.0.0.1:{}", d.addr.port())).unwrap().tls_config(tls)?.connect().await
    }

    /// A credential client presenting `cert` and no token.
    async fn anonymous(&self, d: &TestDaemon, cert: &Cert) -> CredentialServiceClient<Channel> {
        CredentialServiceClient::new(self.channel(d, cert).await.unwrap())
    }

    /// An admin client presenting `cert` and the root token.
    async fn root(&self, d: &TestDaemon, cert: &Cert) -> Admin {
        admin_over(self.channel(d, cert).await.unwrap(), &d.token)
    }
}

fn read_list(pattern: &str) -> Vec<PolicyRule> {
    vec![rule(pattern, &[Capability::Read, Capability::List], false)]
}

fn bind(identity: &str, rules: Vec<PolicyRule>) -> BindIdentityRequest {
    BindIdentityRequest { identity: identity.into(), rules, rate_limit_per_second: 0 }
}

fn get_req(name: &str) -> GetCredentialRequest {
    GetCredentialRequest { name: name.into(), version: None }
}

async fn mtls_daemon(env: &TestEnv, pki: &Pki) -> TestDaemon {
    let mut s = env.settings();
    s.tls = Some(pki.tls());
    TestDaemon::start(s, None).await
}

async fn a_bound_identity_works_within_its_policy(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let pki = Pki::new(env.data_dir());
    let d = mtls_daemon(&env, &pki).await;
    let spiffe = pki.leaf(Some("ignored-cn"), &[SPIFFE], &["api.example.org"]);
    let cn_only = pki.leaf(Some("batch-job"), &[], &[]);
    let nameless = pki.leaf(None, &[], &["host.example.org"]);
    let mut admin = pki.root(&d, &cn_only).await;
    let mut root = client_over(pki.channel(&d, &cn_only).await.unwrap(), &d.token);
    put(&mut root, "payments/stripe", b"sk", None).await.unwrap();
    put(&mut root, "hr/salaries", b"secret", None).await.unwrap();

    // Unbound: no token and an unbound identity is UNAUTHENTICATED.
    let mut api = pki.anonymous(&d, &spiffe).await;
    assert_status(api.get_credential(get_req("payments/stripe")).await, Code::Unauthenticated, "bound to no policy");

    let b = admin.bind_identity(bind(SPIFFE, read_list("payments/**"))).await.unwrap().into_inner();
    assert_eq!(b.identity, SPIFFE, "the URI SAN wins over the CN");
    assert!(b.id.starts_with("id-"), "{}", b.id);
    let r = api.get_credential(get_req("payments/stripe")).await.unwrap().into_inner();
    assert_eq!(r.value, b"sk");
    assert_status(api.get_credential(get_req("hr/salaries")).await, Code::PermissionDenied, "");
    let listed = api.list_credentials(ListCredentialsRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.credentials.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["payments/stripe"]);
    let mut api_admin =
        credvault::proto::admin_service_client::AdminServiceClient::new(pki.channel(&d, &spiffe).await.unwrap());
    assert_status(api_admin.list_identities(ListIdentitiesRequest {}).await, Code::PermissionDenied, "admin");

    // A bearer token, when sent, decides: the root token reads beyond the identity's
    // policy, and a bad token is refused although the certificate is bound.
    let mut with_token = client_over(pki.channel(&d, &spiffe).await.unwrap(), &d.token);
    assert_eq!(with_token.get_credential(get_req("hr/salaries")).await.unwrap().into_inner().value, b"secret");
    let mut bad_token = client_over(pki.channel(&d, &spiffe).await.unwrap(), "cvt_not-a-token");
    assert_status(bad_token.get_credential(get_req("payments/stripe")).await, Code::Unauthenticated, "invalid");

    // Without a URI SAN the CN is the identity; without either there is none.
    let mut job = pki.anonymous(&d, &cn_only).await;
    assert_status(job.get_credential(get_req("hr/salaries")).await, Code::Unauthenticated, "bound to no policy");
    admin.bind_identity(bind("batch-job", read_list("hr/**"))).await.unwrap();
    assert_eq!(job.get_credential(get_req("hr/salaries")).await.unwrap().into_inner().value, b"secret");
    let mut nobody = pki.anonymous(&d, &nameless).await;
    assert_status(nobody.get_credential(get_req("hr/salaries")).await, Code::Unauthenticated, "no usable identity");

    // A certificate from another CA does not get past the handshake.
    let rogue_pki = Pki::new(env.data_dir());
    let rogue = rogue_pki.leaf(None, &[SPIFFE], &[]);
    let refused = match pki.channel(&d, &rogue).await {
        Err(_) => true,
        Ok(ch) => CredentialServiceClient::new(ch).get_credential(get_req("payments/stripe")).await.is_err(),
    };
    assert!(refused, "a certificate from an untrusted CA was accepted");

    // Listings and audit rows show the identity.
    let all = admin.list_identities(ListIdentitiesRequest {}).await.unwrap().into_inner().bindings;
    assert_eq!(all.iter().map(|b| b.identity.as_str()).collect::<Vec<_>>(), ["batch-job", SPIFFE]);
    assert_eq!(all[1].rules, read_list("payments/**"));
    // The audit trail marks a field with bytes beyond a plain name (here ':') with '!'.
    let name = format!("!identity:{SPIFFE}");
    eventually("the identity's reads are audited", Duration::from_secs(10), async || {
        let events = admin.list_audit_events(ListAuditEventsRequest { limit: 100 }).await.unwrap().into_inner().events;
        events.iter().any(|e| e.token_name == name && e.token_id == b.id && e.rpc == "GetCredential" && e.code == "OK")
    })
    .await;

    // A watch opened by an identity lives while the binding does (its first re-check is
    // at once), and ends when it goes.
    let watch = WatchCredentialsRequest { prefix: "payments/".into() };
    let mut stream = api.watch_credentials(watch).await.unwrap().into_inner();
    put(&mut root, "payments/stripe", b"sk2", None).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.name, "payments/stripe");

    // Unbinding takes effect at once on this daemon.
    let gone = admin.unbind_identity(UnbindIdentityRequest { identity: SPIFFE.into() }).await.unwrap().into_inner();
    assert_eq!(gone.identity, SPIFFE);
    assert_status(api.get_credential(get_req("payments/stripe")).await, Code::Unauthenticated, "bound to no policy");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    });
    assert_status(ended.await.unwrap(), Code::Unauthenticated, "revoked");
    d.stop().await;
}

async fn bad_bindings_get_their_exact_status(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut admin = d.admin().await;
    let invalid = "identity must be 1-512 printable ASCII characters";
    for bad in ["", "has space", "tab\there", "caf\u{e9}", &"a".repeat(513)] {
        assert_status(admin.bind_identity(bind(bad, read_list("a/**"))).await, Code::InvalidArgument, invalid);
        assert_status(
            admin.unbind_identity(UnbindIdentityRequest { identity: bad.into() }).await,
            Code::InvalidArgument,
            invalid,
        );
    }
    assert_status(admin.bind_identity(bind("svc", vec![])).await, Code::InvalidArgument, "at least one policy rule");
    let unknown_cap = vec![PolicyRule { pattern: "a/**".into(), capabilities: vec![99], deny: false }];
    assert_status(admin.bind_identity(bind("svc", unknown_cap)).await, Code::InvalidArgument, "unknown capability 99");
    assert_status(admin.bind_identity(bind("svc", read_list("a/**/b"))).await, Code::InvalidArgument, "");
    admin.bind_identity(bind("svc", read_list("a/**"))).await.unwrap();
    assert_status(admin.bind_identity(bind("svc", read_list("b/**"))).await, Code::AlreadyExists, "bound already");
    let missing = UnbindIdentityRequest { identity: "nobody".into() };
    assert_status(admin.unbind_identity(missing).await, Code::NotFound, "\"nobody\" is not bound");

    // Only admins manage bindings.
    let (token, _) = create_token(&d, "reader", read_list("**"), 0, None).await;
    let mut reader = admin_over(d.channel().await, &token);
    assert_status(reader.bind_identity(bind("x", read_list("a/**"))).await, Code::PermissionDenied, "admin");
    assert_status(reader.list_identities(ListIdentitiesRequest {}).await, Code::PermissionDenied, "admin");
    let unbind = UnbindIdentityRequest { identity: "svc".into() };
    assert_status(reader.unbind_identity(unbind).await, Code::PermissionDenied, "admin");
    assert_eq!(admin.list_identities(ListIdentitiesRequest {}).await.unwrap().into_inner().bindings.len(), 1);

    if backend == Backend::Sqlite {
        // The CLI: bind, list, unbind.
        let run = |args: &[&str]| Binary::new(args.iter().copied()).client_of(&d).output();
        let out = run(&["identity", "bind", SPIFFE, "--allow", "payments/**=read,list"]).await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("bound {SPIFFE}")));
        let out = run(&["identity", "list"]).await;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains(SPIFFE) && text.contains("payments/**=read,list") && text.contains("svc"), "{text}");
        let out = run(&["identity", "unbind", SPIFFE]).await;
        assert_eq!(out.code(), 0, "{}", out.stderr);
        let out = run(&["identity", "unbind", SPIFFE]).await;
        assert_ne!(out.code(), 0);
        assert!(out.stderr.contains("is not bound"), "{}", out.stderr);
    }
    d.stop().await;
}

/// Two daemons over one PostgreSQL: a binding made on one works on the other, and its
/// removal stops working there within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbinding_reaches_a_second_daemon_within_a_second() {
    let env = TestEnv::new(Backend::Postgres).await;
    let pki = Pki::new(env.data_dir());
    let mut settings = env.settings();
    settings.tls = Some(pki.tls());
    let a = TestDaemon::start(settings.clone(), None).await;
    let b = TestDaemon::start(settings, Some(&a.token)).await;
    let cert = pki.leaf(None, &[SPIFFE], &[]);
    let mut root = client_over(pki.channel(&a, &cert).await.unwrap(), &a.token);
    put(&mut root, "payments/stripe", b"sk", None).await.unwrap();
    let mut admin = pki.root(&a, &cert).await;
    admin.bind_identity(bind(SPIFFE, read_list("payments/**"))).await.unwrap();
    let mut on_b = pki.anonymous(&b, &cert).await;
    eventually("the binding reaches the second daemon", Duration::from_secs(1), async || {
        on_b.get_credential(get_req("payments/stripe")).await.is_ok()
    })
    .await;
    admin.unbind_identity(UnbindIdentityRequest { identity: SPIFFE.into() }).await.unwrap();
    eventually("the unbinding reaches the second daemon", Duration::from_secs(1), async || {
        on_b.get_credential(get_req("payments/stripe")).await.is_err_and(|s| s.code() == Code::Unauthenticated)
    })
    .await;
    b.stop().await;
    a.stop().await;
}
