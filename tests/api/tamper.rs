//! Stored bytes changed behind the daemon's back: reads answer DATA_LOSS, never wrong
//! plaintext; and plaintext never reaches the database.

use tonic::Code;

use crate::both_backends;
use crate::helpers::{assert_status, get, put, Backend, TestDaemon, TestEnv};

both_backends!(flipped_bytes_are_data_loss, moved_ciphertexts_are_data_loss, no_plaintext_at_rest);

/// These tests change rows behind the daemon's back, which a cache would (rightly) hide
/// until its TTL: they read straight from storage.
fn uncached(env: &TestEnv) -> credvault::config::Settings {
    let mut s = env.settings();
    s.cache.enabled = false;
    s
}

async fn flipped_bytes_are_data_loss(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(uncached(&env), None).await;
    let mut c = d.client().await;
    put(&mut c, "t/a", b"alpha-secret", None).await.unwrap();
    put(&mut c, "t/b", b"bravo-secret", None).await.unwrap();
    let raw = env.raw().await;

    for column in ["ciphertext", "wrapped_dek"] {
        let original = raw.blob(column, "t/a", 1).await;
        for index in [0, 5, original.len() / 2, original.len() - 1] {
            let mut bad = original.clone();
            bad[index] ^= 0x01;
            raw.set_blob(column, "t/a", 1, &bad).await;
            let s = assert_status(get(&mut c, "t/a", None).await, Code::DataLoss, "failed authentication");
            assert!(!s.message().contains("alpha"), "{}", s.message());
        }
        raw.set_blob(column, "t/a", 1, &original).await;
        assert_eq!(get(&mut c, "t/a", None).await.unwrap().1, b"alpha-secret", "restored bytes read again");
    }
    // A truncated blob is rejected before any slicing.
    raw.set_blob("ciphertext", "t/a", 1, &[1, 2, 3]).await;
    assert_status(get(&mut c, "t/a", None).await, Code::DataLoss, "t/a");
    // Other credentials are unaffected.
    assert_eq!(get(&mut c, "t/b", None).await.unwrap().1, b"bravo-secret");
    raw.close().await;
    d.stop().await;
}

async fn moved_ciphertexts_are_data_loss(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(uncached(&env), None).await;
    let mut c = d.client().await;
    put(&mut c, "m/a", b"alpha-secret", None).await.unwrap();
    put(&mut c, "m/b", b"bravo-secret", None).await.unwrap();
    put(&mut c, "m/a", b"alpha-v2", None).await.unwrap();
    let raw = env.raw().await;

    // Row a's ciphertext and wrapped DEK copied into row b: both bound to "m/a".
    for column in ["ciphertext", "wrapped_dek"] {
        let from_a = raw.blob(column, "m/a", 1).await;
        raw.set_blob(column, "m/b", 1, &from_a).await;
    }
    let s = assert_status(get(&mut c, "m/b", None).await, Code::DataLoss, "m/b");
    assert!(!s.message().contains("alpha") && !s.message().contains("bravo"));

    // Only the value ciphertext moved (its DEK stays): the wrong key opens nothing.
    let v1 = raw.blob("ciphertext", "m/a", 1).await;
    raw.set_blob("ciphertext", "m/a", 2, &v1).await;
    assert_status(get(&mut c, "m/a", None).await, Code::DataLoss, "version 2");

    // A whole version (DEK and value) copied onto another version of the same name.
    let dek1 = raw.blob("wrapped_dek", "m/a", 1).await;
    raw.set_blob("wrapped_dek", "m/a", 2, &dek1).await;
    assert_status(get(&mut c, "m/a", None).await, Code::DataLoss, "version 2");
    assert_eq!(get(&mut c, "m/a", Some(1)).await.unwrap().1, b"alpha-secret", "the source row still reads");
    raw.close().await;
    d.stop().await;
}

async fn no_plaintext_at_rest(backend: Backend) {
    const MARKER: &str = "MARKER-7f3a9c-plaintext-must-never-be-stored";
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    for i in 0..3 {
        put(&mut c, &format!("rest/n{i}"), format!("{MARKER}-{i}").as_bytes(), None).await.unwrap();
    }
    put(&mut c, "rest/n0", MARKER.as_bytes(), Some(1)).await.unwrap();
    d.stop().await;

    let haystack: Vec<u8> = match backend {
        Backend::Sqlite => {
            // The database, its WAL and shared-memory files: everything SQLite wrote.
            let mut all = Vec::new();
            for entry in std::fs::read_dir(env.data_dir()).unwrap() {
                let path = entry.unwrap().path();
                if path.file_name().unwrap().to_string_lossy().starts_with("credvault.db") {
                    all.extend(std::fs::read(&path).unwrap());
                }
            }
            all
        }
        Backend::Postgres => {
            let out = std::process::Command::new("pg_dump")
                .args(["--data-only", "--dbname", &env.database_url()])
                .output()
                .expect("pg_dump must be installed to check PostgreSQL at rest (package postgresql-client)");
            assert!(out.status.success(), "pg_dump failed: {}", String::from_utf8_lossy(&out.stderr));
            out.stdout
        }
    };
    let contains = |needle: &[u8]| haystack.windows(needle.len()).any(|w| w == needle);
    // The check would notice plaintext: names are stored in clear and must be found.
    assert!(contains(b"rest/n1"), "the dump does not hold the data at all");
    assert!(!contains(MARKER.as_bytes()), "plaintext value found at rest");
    assert!(!contains(hex::encode(MARKER).as_bytes()), "hex-encoded plaintext found at rest");
}
