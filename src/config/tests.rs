use super::*;

#[test]
fn database_url_debug_hides_the_password() {
    let u = DatabaseUrl::new("postgres://app:s3cret@db:5432/vault");
    assert_eq!(format!("{u:?}"), "\"postgres://app:REDACTED@db:5432/vault\"");
    assert_eq!(DatabaseUrl::new("postgres://app@db/v").redacted(), "postgres://app@db/v");
}

#[test]
fn pgpassword_fills_a_url_without_a_password() {
    let u = DatabaseUrl::new("postgres://app@db:5432/vault?sslmode=require");
    assert_eq!(
        u.with_default_password("p@ss:w/rd").expose(),
        "postgres://app:p%40ss%3Aw%2Frd@db:5432/vault?sslmode=require"
    );
    let has = DatabaseUrl::new("postgresql://app:own@db/vault");
    assert_eq!(has.with_default_password("x").expose(), "postgresql://app:own@db/vault");
    let no_user = DatabaseUrl::new("postgres://db/vault");
    assert_eq!(no_user.with_default_password("x").expose(), "postgres://:x@db/vault");
    assert_eq!(format!("{:?}", no_user.with_default_password("x")), "\"postgres://:REDACTED@db/vault\"");
    let sqlite = DatabaseUrl::new("sqlite://a@b");
    assert_eq!(sqlite.with_default_password("x").expose(), "sqlite://a@b");
}

#[test]
fn file_then_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "listen = \"127.0.0.1:9000\"\n[limits]\nmax_versions = 3\n").unwrap();
    let args = ServeArgs { config: Some(path.clone()), max_versions: Some(5), ..Default::default() };
    let s = Settings::load(&args).unwrap();
    assert_eq!(s.listen.port(), 9000);
    assert_eq!(s.limits.max_versions, 5);
    std::fs::write(&path, "lisen = 1\n").unwrap();
    assert!(matches!(Settings::from_file(&path), Err(ConfigError::Parse { .. })));
}

#[test]
fn a_certificate_flag_keeps_the_files_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[tls]\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\nclient_ca_file = \"ca.pem\"\n").unwrap();
    let args = ServeArgs {
        config: Some(path),
        tls_cert: Some("b.pem".into()),
        tls_key: Some("b.key".into()),
        ..Default::default()
    };
    let s = Settings::load(&args).unwrap();
    let tls = s.tls.unwrap();
    assert_eq!((tls.cert_file, tls.client_ca_file), (PathBuf::from("b.pem"), Some(PathBuf::from("ca.pem"))));
}

#[test]
fn serve_stale_seconds_from_file_and_flag() {
    assert_eq!(Settings::default().cache.serve_stale_seconds, 300);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[cache]\nserve_stale_seconds = 0\n").unwrap();
    let args = ServeArgs { config: Some(path.clone()), ..Default::default() };
    assert_eq!(Settings::load(&args).unwrap().cache.serve_stale_seconds, 0, "0 fails closed");
    let args = ServeArgs { config: Some(path), cache_serve_stale_seconds: Some(60), ..Default::default() };
    assert_eq!(Settings::load(&args).unwrap().cache.serve_stale_seconds, 60, "the flag wins");
}

#[test]
fn zero_concurrency_is_refused() {
    let mut s = Settings::default();
    s.limits.max_concurrent_requests = 0;
    assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("max_concurrent_requests")));
}

#[test]
fn transport_section_parses_and_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[transport]\nmax_connections = 7\nkeepalive_timeout_ms = 0\n").unwrap();
    let s = Settings::from_file(&path).unwrap();
    assert_eq!(s.transport.max_connections, 7);
    assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("transport.keepalive_timeout_ms")));
    let args = ServeArgs { config: Some(path.clone()), max_connections: Some(0), ..Default::default() };
    std::fs::write(&path, "[transport]\nmax_concurrent_streams = 10\n").unwrap();
    assert!(matches!(Settings::load(&args), Err(ConfigError::Invalid(m)) if m.contains("max_connections")));
}

#[test]
fn pool_size_and_audit_flush_interval_are_bounded() {
    let s = Settings { db_max_connections: Some(0), ..Settings::default() };
    assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("db_max_connections")));
    let mut s = Settings::default();
    assert_eq!(s.db_max_connections, None, "unset: each backend's own default");
    s.audit.flush_interval_ms = 10_001;
    assert!(matches!(s.validate(), Err(ConfigError::Invalid(m)) if m.contains("flush_interval_ms")));
    s.audit.flush_interval_ms = 0;
    assert!(s.validate().is_ok());
}

#[test]
fn a_listen_url_needs_postgres_on_both_sides() {
    let listen = Some(DatabaseUrl::new("postgres://app:pw@db-direct:5432/vault"));
    let sqlite = Settings { database_listen_url: listen.clone(), ..Settings::default() };
    assert!(matches!(sqlite.validate(), Err(ConfigError::Invalid(m)) if m.contains("is for PostgreSQL")));
    let pg = Some(DatabaseUrl::new("postgres://app:pw@pgbouncer:6432/vault"));
    let ok = Settings { database_url: pg.clone(), database_listen_url: listen, ..Settings::default() };
    assert!(ok.validate().is_ok());
    let bad = Settings {
        database_url: pg,
        database_listen_url: Some(DatabaseUrl::new("mysql://app:secretpw@db/vault")),
        ..Settings::default()
    };
    let Err(ConfigError::Invalid(m)) = bad.validate() else { panic!("accepted a mysql listen URL") };
    assert!(m.contains("database_listen_url") && !m.contains("secretpw"), "{m}");
}

#[test]
fn defaults_use_sqlite_and_a_generated_key_file() {
    let s = Settings::default();
    assert_eq!(s.storage().unwrap(), StorageTarget::Sqlite(PathBuf::from("./credvault-data/credvault.db")));
    assert!(matches!(s.master_key_spec(), MasterKeySpec::KeyFile { create: true, .. }));
    let bad = Settings { database_url: Some(DatabaseUrl::new("mysql://x")), ..Settings::default() };
    assert!(bad.validate().is_err());
}
