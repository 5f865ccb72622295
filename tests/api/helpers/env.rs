//! One test's data: a fresh PostgreSQL database or an SQLite file in a temporary
//! directory, removed when the `TestEnv` is dropped, whether the test passed or panicked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sqlx::Connection as _;

use credvault::config::{DatabaseUrl, Settings};
use credvault::server::open_store;
use credvault::store::Store;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// How long dropping a test database may take before the fixture gives up and says so.
const DROP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
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

/// A place for one test's data: a fresh PostgreSQL database (`cv_test_*`) or a temporary
/// directory with an SQLite file. Either way `dir` holds the key file.
///
/// Dropping it drops the database (`WITH (FORCE)`) and removes the directory, also when
/// the test panics, so there is no cleanup call to forget.
///
/// This fixture owns the data and nothing else; daemons are separate values
/// ([`TestDaemon`](super::TestDaemon), or the real binary as a child process). A `TestApp`
/// owning both would fit a test with one daemon for its whole life, but ours restart
/// daemons over the same data (restart, rekey, crash and resume), run two or three side
/// by side, run the real binary or only the store, or run no daemon at all. What every
/// test has exactly one of is its data, so that is what cleans up. Tests declare the
/// environment first, so its daemons, proxies and pools are dropped before it (locals drop
/// in reverse order); a daemon dropped without `stop` has only been told to stop, and
/// `FORCE` closes whatever connections it still holds.
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
}

impl Drop for TestEnv {
    /// Drops the PostgreSQL database (the temp dir removes itself afterwards).
    ///
    /// `drop` cannot await, and it runs on a runtime thread of the test (perhaps a
    /// current-thread runtime, perhaps while a panic unwinds). So a plain thread with a
    /// runtime of its own drops the database and this thread joins it: the work depends
    /// on nothing the blocked thread would have to run. Nothing here panics, since a panic
    /// during unwinding would abort the whole test binary.
    fn drop(&mut self) {
        let Some(db) = self.pg_database.take() else { return };
        let name = db.clone();
        let dropped = std::thread::Builder::new().name(format!("drop {db}")).spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            rt.block_on(async {
                match tokio::time::timeout(DROP_TIMEOUT, drop_database(&db)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer within {DROP_TIMEOUT:?}")),
                }
            })
        });
        let outcome = match dropped {
            Ok(thread) => thread.join().unwrap_or_else(|_| Err("the dropping thread panicked".to_owned())),
            Err(e) => Err(format!("cannot start a thread: {e}")),
        };
        if let Err(e) = outcome {
            eprintln!("warning: test database {name} was not dropped: {e}");
        }
    }
}

async fn drop_database(db: &str) -> Result<(), sqlx::Error> {
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await?;
    // FORCE: connections a test left open (a daemon told to stop but still draining, a
    // pool never closed) are terminated by the server rather than failing the drop.
    let r = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&mut conn).await;
    conn.close().await.ok();
    r.map(|_| ())
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

#[test]
fn database_url_rewrite() {
    assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/postgres?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}

/// Whether `db` is still listed in `pg_database`.
async fn database_exists(db: &str) -> bool {
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await.expect("admin connection");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(db)
        .fetch_one(&mut conn)
        .await
        .expect("pg_database");
    conn.close().await.ok();
    n > 0
}

/// A test that panics while its daemon is serving (connections open, a write made)
/// leaves neither its database nor its directory behind, and neither does one that ends
/// without a word about cleanup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_test_leaves_no_database_behind() {
    use super::{put, TestDaemon};

    let (tx, rx) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let env = TestEnv::new(Backend::Postgres).await;
        let d = TestDaemon::start(env.settings(), None).await;
        let mut c = d.client().await;
        put(&mut c, "leak/x", b"v", None).await.expect("put");
        let db = env.pg_database.clone().expect("a PostgreSQL environment");
        assert!(database_exists(&db).await);
        let _ = tx.send((db, env.data_dir().to_owned()));
        panic!("a failing assertion, with the daemon still serving");
    });
    let err = failing.await.expect_err("the test body panicked");
    assert!(err.is_panic());
    let (db, dir) = rx.await.expect("the body got as far as its database");
    assert!(!database_exists(&db).await, "{db} outlived the panicking test");
    assert!(!dir.exists(), "{} outlived the panicking test", dir.display());

    // A test that passes, with no cleanup call and a daemon it never stopped.
    let db = {
        let env = TestEnv::new(Backend::Postgres).await;
        let _d = TestDaemon::start(env.settings(), None).await;
        env.pg_database.clone().expect("a PostgreSQL environment")
    };
    assert!(!database_exists(&db).await, "{db} outlived its test");
}
