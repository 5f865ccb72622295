//! Test fixtures: fresh databases, daemons on port 0, authenticated tonic clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use sqlx::Connection as _;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use credvault::config::{DatabaseUrl, Settings};
use credvault::proto::admin_service_client::AdminServiceClient;
use credvault::proto::credential_service_client::CredentialServiceClient;
use credvault::server::{open_store, Daemon, ServerError};
use credvault::store::Store;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Runs an async test body once per backend: `both_backends!(name, body_fn)` defines
/// `name::postgres` and `name::sqlite`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
        }
    )*};
}

pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with its database name replaced.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let root = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{root}/{db}?{q}"),
        None => format!("{root}/{db}"),
    }
}

/// A place for one test's data: a fresh PostgreSQL database or a temporary directory
/// with an SQLite file. Either way `dir` holds the key file.
pub struct TestEnv {
    pub backend: Backend,
    pub dir: tempfile::TempDir,
    pub pg_database: Option<String>,
}

impl TestEnv {
    pub async fn new(backend: Backend) -> TestEnv {
        let dir = tempfile::tempdir().expect("temp dir");
        let pg_database = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let name = format!("cv_test_{:016x}", rand::random::<u64>());
                let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL is not reachable at DATABASE_URL={} ({e}). The tests need a real \
                         PostgreSQL: start it (pg_ctlcluster 15 main start) or point DATABASE_URL at one.",
                        admin_url()
                    )
                });
                sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut conn).await.expect("create database");
                conn.close().await.ok();
                Some(name)
            }
        };
        TestEnv { backend, dir, pg_database }
    }

    pub fn database_url(&self) -> String {
        match &self.pg_database {
            Some(db) => with_database(&admin_url(), db),
            None => format!("sqlite://{}", self.dir.path().join("credvault.db").display()),
        }
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn sqlite_path(&self) -> PathBuf {
        self.dir.path().join("credvault.db")
    }

    /// Settings for a daemon on port 0 over this environment, unlocked by a key file.
    pub fn settings(&self) -> Settings {
        // Tests count individual events; `audit::reads_fold_into_counted_events` covers folding.
        let audit = credvault::audit::AuditSettings { fold_reads_seconds: 0, ..Default::default() };
        Settings {
            audit,
            listen: "127.0.0.1:0".parse().expect("addr"),
            metrics_listen: "127.0.0.1:0".parse().expect("addr"),
            data_dir: self.dir.path().to_owned(),
            database_url: Some(DatabaseUrl::new(self.database_url())),
            db_max_connections: Some(8),
            ..Settings::default()
        }
    }

    pub async fn store(&self) -> Arc<dyn Store> {
        open_store(&self.settings()).await.expect("open store")
    }

    /// Direct SQL access, for tests that tamper with stored rows.
    pub async fn raw(&self) -> Raw {
        match self.backend {
            Backend::Postgres => Raw::Pg(sqlx::PgPool::connect(&self.database_url()).await.expect("pg pool")),
            Backend::Sqlite => Raw::Sqlite(
                sqlx::SqlitePool::connect(&format!("sqlite://{}", self.sqlite_path().display())).await.expect("pool"),
            ),
        }
    }

    /// Drops the PostgreSQL database (the temp dir removes itself).
    pub async fn cleanup(self) {
        if let Some(db) = &self.pg_database {
            if let Ok(mut conn) = sqlx::PgConnection::connect(&admin_url()).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&mut conn).await;
            }
        }
    }
}

pub enum Raw {
    Pg(sqlx::PgPool),
    Sqlite(sqlx::SqlitePool),
}

impl Raw {
    /// One blob column of one credential version.
    pub async fn blob(&self, column: &str, name: &str, version: i64) -> Vec<u8> {
        let q = format!("SELECT {column} FROM credential_versions WHERE name = $1 AND version = $2");
        match self {
            Raw::Pg(p) => sqlx::query_scalar(&q).bind(name).bind(version).fetch_one(p).await.expect("blob"),
            Raw::Sqlite(p) => sqlx::query_scalar(&q).bind(name).bind(version).fetch_one(p).await.expect("blob"),
        }
    }

    pub async fn set_blob(&self, column: &str, name: &str, version: i64, bytes: &[u8]) {
        let q = format!("UPDATE credential_versions SET {column} = $3 WHERE name = $1 AND version = $2");
        let n = match self {
            Raw::Pg(p) => {
                sqlx::query(&q).bind(name).bind(version).bind(bytes).execute(p).await.expect("set").rows_affected()
            }
            Raw::Sqlite(p) => {
                sqlx::query(&q).bind(name).bind(version).bind(bytes).execute(p).await.expect("set").rows_affected()
            }
        };
        assert_eq!(n, 1, "tampered with exactly one row");
    }

    pub async fn close(self) {
        match self {
            Raw::Pg(p) => p.close().await,
            Raw::Sqlite(p) => p.close().await,
        }
    }
}

#[derive(Clone)]
pub struct Bearer(pub MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = CredentialServiceClient<InterceptedService<Channel, Bearer>>;
pub type Admin = AdminServiceClient<InterceptedService<Channel, Bearer>>;

/// A daemon running inside the test process.
pub struct TestDaemon {
    pub addr: std::net::SocketAddr,
    pub metrics_addr: std::net::SocketAddr,
    /// The daemon's core, for counting its store queries.
    pub vault: credvault::vault::Vault,
    /// The daemon's token table, for counting how it was updated.
    pub auth: credvault::auth::Auth,
    pub token: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

impl TestDaemon {
    /// Builds and starts a daemon; `token` is the root token to use when the database
    /// already has one (a restart), since it is printed only on first start.
    pub async fn start(settings: Settings, token: Option<&str>) -> TestDaemon {
        let mut daemon = Daemon::build(settings).await.expect("daemon starts");
        let token = match (daemon.take_root_token(), token) {
            (Some(t), _) => t.expose_secret().to_owned(),
            (None, Some(t)) => t.to_owned(),
            (None, None) => panic!("no root token: pass the one from the first start"),
        };
        let addr = daemon.local_addr();
        let metrics_addr = daemon.metrics_addr();
        let vault = daemon.vault().clone();
        let auth = daemon.auth().clone();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(daemon.run_until(async {
            let _ = rx.await;
        }));
        TestDaemon { addr, metrics_addr, vault, auth, token, stop: Some(tx), task: Some(task) }
    }

    pub async fn channel(&self) -> Channel {
        // The listener is bound before `start` returns, so the first connect succeeds;
        // retry briefly anyway in case the accept loop is still being scheduled.
        let endpoint = format!("http://{}", self.addr);
        let mut last = None;
        for _ in 0..50 {
            match Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("cannot connect to test daemon: {last:?}");
    }

    pub async fn client(&self) -> Client {
        CredentialServiceClient::with_interceptor(self.channel().await, self.bearer())
    }

    pub async fn admin(&self) -> Admin {
        AdminServiceClient::with_interceptor(self.channel().await, self.bearer())
    }

    pub fn bearer(&self) -> Bearer {
        Bearer(format!("Bearer {}", self.token).parse().expect("ascii token"))
    }

    /// Stops the daemon and waits for it to finish in-flight requests.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("daemon task").expect("daemon ran cleanly");
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

pub fn passphrase_settings(mut s: Settings, passphrase: &str) -> Settings {
    s.passphrase = Some(SecretString::from(passphrase.to_owned()));
    // The minimum allowed cost keeps tests quick; production defaults are higher.
    s.kdf.memory_kib = 19 * 1024;
    s.kdf.iterations = 2;
    s.kdf.parallelism = 1;
    s
}

/// Asserts a gRPC error's code and that its message contains `needle`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(r: Result<T, Status>, code: tonic::Code, needle: &str) -> Status {
    let s = r.expect_err("expected an error status");
    assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
    assert!(s.message().contains(needle), "message {:?} lacks {needle:?}", s.message());
    s
}

#[test]
fn database_url_rewrite() {
    assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/postgres?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}
