//! One test's data: a fresh PostgreSQL database or an SQLite file in a temporary
//! directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sqlx::Connection as _;

use credvault::config::{DatabaseUrl, Settings};
use credvault::server::open_store;
use credvault::store::Store;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

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

#[test]
fn database_url_rewrite() {
    assert_eq!(with_database("postgres://u@h:5432/postgres", "x"), "postgres://u@h:5432/x");
    assert_eq!(with_database("postgres://u@h/postgres?sslmode=disable", "x"), "postgres://u@h/x?sslmode=disable");
    assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
}
