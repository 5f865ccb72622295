//! Master keys: passphrases, key files, wrong keys at start-up.

use credvault::server::{Daemon, ServerError};
use credvault::unlock::UnlockError;

use crate::helpers::spawn::Binary;
use crate::helpers::{get, passphrase_settings, put, Backend, TestDaemon, TestEnv};

#[tokio::test]
async fn passphrase_database_restarts_with_the_same_passphrase_only() {
    let env = TestEnv::new(Backend::Postgres).await;
    let d = TestDaemon::start(passphrase_settings(env.settings(), "correct horse battery"), None).await;
    let token = d.token.clone();
    let mut c = d.client().await;
    put(&mut c, "p/x", b"value", None).await.unwrap();
    d.stop().await;

    let err = Daemon::build(passphrase_settings(env.settings(), "wrong horse")).await.unwrap_err();
    assert!(matches!(err, ServerError::Unlock(UnlockError::WrongKey("passphrase"))), "{err}");
    assert!(err.to_string().contains("wrong master key"), "{err}");

    // A key file cannot open a passphrase database either.
    let err = Daemon::build(env.settings()).await.unwrap_err();
    assert!(matches!(err, ServerError::Unlock(UnlockError::SourceMismatch { .. })), "{err}");

    let d = TestDaemon::start(passphrase_settings(env.settings(), "correct horse battery"), Some(&token)).await;
    let mut c = d.client().await;
    assert_eq!(get(&mut c, "p/x", None).await.unwrap().1, b"value");
    d.stop().await;
}

#[tokio::test]
async fn wrong_key_file_fails_start_up() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    d.stop().await;
    let key_path = env.data_dir().join("master.key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "generated key file must be owner-only");
    }
    std::fs::write(&key_path, format!("{}\n", "ab".repeat(32))).unwrap();
    let err = Daemon::build(env.settings()).await.unwrap_err();
    assert!(matches!(err, ServerError::Unlock(UnlockError::WrongKey("key file"))), "{err}");
    std::fs::write(&key_path, "not a key").unwrap();
    let err = Daemon::build(env.settings()).await.unwrap_err();
    assert!(err.to_string().contains("64 hex characters"), "{err}");
    // A missing key file is an error, never silently replaced on an existing database.
    std::fs::remove_file(&key_path).unwrap();
    let err = Daemon::build(env.settings()).await.unwrap_err();
    assert!(
        matches!(err, ServerError::Unlock(UnlockError::WrongKey(_)) | ServerError::Unlock(UnlockError::KeyFile { .. })),
        "{err}"
    );
}

#[tokio::test]
async fn the_binary_exits_non_zero_on_a_wrong_passphrase() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(passphrase_settings(env.settings(), "right"), None).await;
    d.stop().await;
    let out = Binary::serve(env.data_dir()).env("CREDVAULT_PASSPHRASE", "wrong").output().await;
    assert!(!out.status.success());
    let stderr = &out.stderr;
    assert!(stderr.contains("wrong master key"), "{stderr}");
    assert!(
        !stderr.contains("wrong\n") && !String::from_utf8_lossy(&out.stdout).contains("wrong"),
        "passphrase echoed"
    );
}

#[cfg(unix)]
#[tokio::test]
async fn a_new_data_directory_is_owner_only() {
    use std::os::unix::fs::PermissionsExt as _;
    let env = TestEnv::new(Backend::Sqlite).await;
    let mut settings = env.settings();
    settings.data_dir = env.data_dir().join("fresh/data");
    settings.database_url = None;
    let d = TestDaemon::start(settings.clone(), None).await;
    d.stop().await;
    let mode = std::fs::metadata(&settings.data_dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the data directory holds the database and the key file");
    assert!(settings.data_dir.join("credvault.db").is_file());
}
