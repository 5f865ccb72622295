//! PostgreSQL over TLS against the local server (TLS on, Debian's snakeoil certificate:
//! self-signed, valid for `localhost` only). Each `sslmode` does what libpq says it does.

use credvault::store::PgStore;

use crate::helpers::{Backend, TestEnv};

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// The test database's URL with `host` in place of 127.0.0.1 and `query` appended.
fn url(env: &TestEnv, host: &str, query: &str) -> String {
    let base = env.database_url().replacen("127.0.0.1", host, 1);
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{query}")
}

async fn connection_is_tls(store: &PgStore) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(store.pool())
        .await
        .expect("pg_stat_ssl")
}

async fn connect_err(url: &str) -> String {
    match PgStore::connect(url, 1).await {
        Ok(_) => panic!("connecting with {url} should fail"),
        Err(e) => format!("{e}: {:?}", std::error::Error::source(&e).map(|s| s.to_string())),
    }
}

#[tokio::test]
async fn require_really_uses_tls_and_disable_does_not() {
    let env = TestEnv::new(Backend::Postgres).await;
    let tls = PgStore::connect(&url(&env, "127.0.0.1", "sslmode=require"), 1).await.expect("sslmode=require connects");
    assert!(connection_is_tls(&tls).await, "sslmode=require must give a TLS connection");
    tls.pool().close().await;
    let plain = PgStore::connect(&url(&env, "127.0.0.1", "sslmode=disable"), 1).await.expect("disable connects");
    assert!(!connection_is_tls(&plain).await, "sslmode=disable must not use TLS");
    plain.pool().close().await;
    // The default (prefer) takes TLS when the server offers it.
    let prefer = PgStore::connect(&env.database_url(), 1).await.expect("default connects");
    assert!(connection_is_tls(&prefer).await, "the default sslmode=prefer uses TLS when offered");
    prefer.pool().close().await;
}

#[tokio::test]
async fn verify_modes_check_the_ca_and_the_host_name() {
    let env = TestEnv::new(Backend::Postgres).await;
    let root = format!("sslrootcert={SNAKEOIL}");
    // The snakeoil certificate as its own root: verify-ca checks the chain, not the name,
    // so 127.0.0.1 (not in the certificate) connects; so does require with a root (libpq
    // reads it as verify-ca).
    for query in [format!("sslmode=verify-ca&{root}"), format!("sslmode=require&{root}")] {
        let store = PgStore::connect(&url(&env, "127.0.0.1", &query), 1)
            .await
            .unwrap_or_else(|e| panic!("{query}: the server's own certificate as root must connect: {e}"));
        assert!(connection_is_tls(&store).await, "{query}: not TLS");
        store.pool().close().await;
    }
    // verify-full by the name in the certificate works...
    let full = PgStore::connect(&url(&env, "localhost", &format!("sslmode=verify-full&{root}")), 1)
        .await
        .expect("verify-full against the certificate's own name connects");
    assert!(connection_is_tls(&full).await);
    full.pool().close().await;
    // ...and by any other name fails, saying where, in which mode and why.
    let err = connect_err(&url(&env, "127.0.0.1", &format!("sslmode=verify-full&{root}"))).await;
    for needle in ["127.0.0.1:5432", "sslmode=verify-full", "not valid for name"] {
        assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    }
    // A CA that did not sign the server's certificate fails in every verifying mode.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let other_path = env.data_dir().join("other-ca.pem");
    std::fs::write(&other_path, other.cert.pem()).expect("write CA");
    let other_root = format!("sslrootcert={}", other_path.display());
    for (mode, shown) in [("verify-full", "verify-full"), ("verify-ca", "verify-ca"), ("require", "verify-ca")] {
        let err = connect_err(&url(&env, "localhost", &format!("sslmode={mode}&{other_root}"))).await;
        assert!(err.contains(&format!("sslmode={shown}")) && err.contains("UnknownIssuer"), "{mode}: {err:?}");
    }
    // A root file that holds no certificate is a clear error, not "trust nothing".
    let empty = env.data_dir().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").expect("write");
    let err = connect_err(&url(&env, "localhost", &format!("sslmode=verify-ca&sslrootcert={}", empty.display()))).await;
    assert!(err.contains("holds no certificate"), "{err:?}");
    // Public roots: the snakeoil certificate is not among them.
    let err = connect_err(&url(&env, "localhost", "sslmode=verify-full")).await;
    assert!(err.contains("UnknownIssuer"), "{err:?}");
    let err = connect_err(&url(&env, "localhost", "sslrootcert=system")).await;
    assert!(err.contains("sslmode=verify-full") && err.contains("UnknownIssuer"), "{err:?}");
}

#[tokio::test]
async fn tls_settings_that_would_be_misread_are_refused() {
    let env = TestEnv::new(Backend::Postgres).await;
    let err = connect_err(&url(&env, "127.0.0.1", "sslmode=verify-ca")).await;
    assert!(err.contains("sslmode=verify-ca needs sslrootcert"), "{err:?}");
    let err = connect_err(&url(&env, "127.0.0.1", "sslmode=require&sslrootcert=system")).await;
    assert!(err.contains("sslrootcert=system needs sslmode=verify-full"), "{err:?}");
    let err =
        connect_err(&url(&env, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}&sslcert=a.pem"))).await;
    assert!(err.contains("sslcert and sslkey must be given together"), "{err:?}");
    let err = connect_err(&url(&env, "127.0.0.1", "sslmode=sometimes")).await;
    assert!(err.contains("sometimes"), "{err:?}");
}

/// Through the daemon's own TLS (verify-ca): a whole daemon works, change notifications
/// included, and the bridge's socket directory is private and removed with the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_over_verify_ca_serves_reads_writes_and_notifications() {
    use crate::helpers::{get, put, TestDaemon};
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    let verified = url(&env, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}"));
    settings.database_url = Some(credvault::config::DatabaseUrl::new(verified.clone()));
    let a = TestDaemon::start(settings.clone(), None).await;
    let b = TestDaemon::start(settings, Some(&a.token)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    put(&mut ca, "tls/one", b"v1", None).await.expect("put");
    assert_eq!(get(&mut cb, "tls/one", None).await.expect("get").1, b"v1".to_vec());
    put(&mut ca, "tls/one", b"v2", None).await.expect("put");
    // b cached v1; a's NOTIFY over the bridged LISTEN connection invalidates it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if get(&mut cb, "tls/one", None).await.expect("get").1 == b"v2" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the change notification never arrived");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    a.stop().await;
    b.stop().await;
    let store = PgStore::connect(&verified, 1).await.expect("connect");
    assert!(connection_is_tls(&store).await, "the bridged connection must be TLS at the server");
    let dirs = || {
        std::fs::read_dir(std::env::temp_dir())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("credvault-pg-"))
            .map(|e| e.path())
            .collect::<Vec<_>>()
    };
    #[cfg(unix)]
    for d in dirs() {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(m) = std::fs::metadata(&d) {
            assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
    }
    let before = dirs();
    drop(store);
    let after = dirs();
    assert!(before.iter().any(|d| !after.contains(d)), "the bridge's directory outlived its store");
}

#[tokio::test]
async fn a_daemon_over_tls_serves_and_never_shows_the_password() {
    use crate::helpers::{get, put, TestDaemon};
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    settings.database_url = Some(credvault::config::DatabaseUrl::new(url(&env, "127.0.0.1", "sslmode=require")));
    let d = TestDaemon::start(settings.clone(), None).await;
    let mut c = d.client().await;
    put(&mut c, "tls/one", b"over tls", None).await.expect("put");
    assert_eq!(get(&mut c, "tls/one", None).await.expect("get"), (1, b"over tls".to_vec()));
    d.stop().await;
    // A start-up failure names the server, not the password (trust auth ignores it).
    let secret = "pw-that-must-not-leak";
    let with_password = url(&env, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={SNAKEOIL}")).replacen(
        "postgres@",
        &format!("postgres:{secret}@"),
        1,
    );
    settings.database_url = Some(credvault::config::DatabaseUrl::new(with_password));
    assert!(!format!("{settings:?}").contains(secret), "settings Debug shows the password");
    let err = match credvault::server::Daemon::build(settings).await {
        Ok(_) => panic!("verify-full against 127.0.0.1 must fail"),
        Err(e) => format!("{e:#} {e:?}"),
    };
    assert!(err.contains("not valid for name") && !err.contains(secret), "{err}");
}

/// A server that is down is a network error, not a certificate problem, even when the
/// daemon does the TLS itself.
#[tokio::test]
async fn an_unreachable_server_is_unavailable_not_a_tls_error() {
    let env = TestEnv::new(Backend::Postgres).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dead = url(&env, "127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}")).replacen(
        ":5432",
        &format!(":{port}"),
        1,
    );
    match PgStore::connect(&dead, 1).await {
        Err(credvault::store::StoreError::Unavailable(sqlx::Error::Io(e))) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}")
        }
        Err(e) => panic!("expected an I/O error, got {e:?}"),
        Ok(_) => panic!("nothing listens on port {port}"),
    }
}
