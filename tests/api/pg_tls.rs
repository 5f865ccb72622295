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
    env.cleanup().await;
}

#[tokio::test]
async fn verify_modes_check_the_ca_and_the_host_name() {
    let env = TestEnv::new(Backend::Postgres).await;
    let root = format!("sslrootcert={SNAKEOIL}");
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
    // A CA that did not sign the server's certificate fails in verify-full and verify-ca.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let other_path = env.data_dir().join("other-ca.pem");
    std::fs::write(&other_path, other.cert.pem()).expect("write CA");
    let other_root = format!("sslrootcert={}", other_path.display());
    let err = connect_err(&url(&env, "localhost", &format!("sslmode=verify-full&{other_root}"))).await;
    assert!(err.contains("sslmode=verify-full") && err.contains("UnknownIssuer"), "{err:?}");
    // Public roots: the snakeoil certificate is not among them.
    let err = connect_err(&url(&env, "localhost", "sslmode=verify-full")).await;
    assert!(err.contains("UnknownIssuer"), "{err:?}");
    let err = connect_err(&url(&env, "localhost", "sslrootcert=system")).await;
    assert!(err.contains("sslmode=verify-full") && err.contains("UnknownIssuer"), "{err:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn tls_settings_that_would_be_misread_are_refused() {
    let env = TestEnv::new(Backend::Postgres).await;
    // verify-ca cannot be honoured by the driver (it checks the name anyway): refused,
    // with or without a root; so is require with a root, which libpq reads as verify-ca.
    for query in ["sslmode=verify-ca", &format!("sslmode=verify-ca&sslrootcert={SNAKEOIL}")] {
        let err = connect_err(&url(&env, "127.0.0.1", query)).await;
        assert!(err.contains("sslmode=verify-ca is not supported") && err.contains("verify-full"), "{err:?}");
    }
    let err = connect_err(&url(&env, "127.0.0.1", &format!("sslmode=require&sslrootcert={SNAKEOIL}"))).await;
    assert!(err.contains("asks for verify-ca, which is not supported"), "{err:?}");
    let err = connect_err(&url(&env, "127.0.0.1", "sslmode=require&sslrootcert=system")).await;
    assert!(err.contains("sslrootcert=system needs sslmode=verify-full"), "{err:?}");
    let err = connect_err(&url(&env, "127.0.0.1", "sslmode=sometimes")).await;
    assert!(err.contains("sometimes"), "{err:?}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_daemon_over_tls_serves_and_never_shows_the_password() {
    use crate::e2e::{get, put};
    use crate::helpers::TestDaemon;
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
    env.cleanup().await;
}
