//! A scratch PostgreSQL database for a bench: created under `DATABASE_URL`'s server
//! (default `postgres://postgres@127.0.0.1:5432/postgres`) and dropped by [`Scratch::drop_now`].

use sqlx::Connection as _;

pub struct Scratch {
    admin: sqlx::PgConnection,
    /// The database's name.
    pub name: String,
    /// A URL to it.
    pub url: String,
}

/// `None` (the bench reports it and skips) when PostgreSQL cannot be reached.
pub async fn scratch(prefix: &str) -> Option<Scratch> {
    let admin_url =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url).await else {
        println!("postgres: skipped (cannot connect to {admin_url})");
        return None;
    };
    let name = format!("{prefix}_{:08x}", rand::random::<u32>());
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&mut admin).await.expect("create database");
    let url = match admin_url.rsplit_once('/') {
        Some((root, _)) => format!("{root}/{name}"),
        None => admin_url.clone(),
    };
    Some(Scratch { admin, name, url })
}

impl Scratch {
    /// A connection to the server's default database (not to this one).
    pub fn admin(&mut self) -> &mut sqlx::PgConnection {
        &mut self.admin
    }

    pub async fn drop_now(mut self) {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .execute(&mut self.admin)
            .await;
    }
}
