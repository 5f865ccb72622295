//! Secrets at rest and in the process: secret environment variables leave the daemon's
//! environment after start-up; key and passphrase files open to group or others are
//! refused unless explicitly allowed.

use credvault::config::{ConfigError, ServeArgs, Settings};
use credvault::server::{Daemon, ServerError};
use credvault::unlock::UnlockError;

use crate::helpers::spawn::Binary;
use crate::helpers::{Backend, TestEnv};

/// The real binary, passphrase from the environment, database URL (with a password) from
/// the environment, a client token inherited by mistake: none of their values is left in
/// `/proc/<pid>/environ` once it serves; other variables are.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_variables_leave_the_daemons_environment() {
    let env = TestEnv::new(Backend::Postgres).await;
    let config = env.data_dir().join("kdf.toml");
    let passphrase = "passphrase-marker-7d1f";
    let db_password = "dbpassword-marker-91aa";
    let token = "token-marker-c3e0";
    // Trust authentication ignores the password; it is there to be scrubbed.
    let url = env.database_url().replacen("postgres@", &format!("postgres:{db_password}@"), 1);
    let mut child = Binary::serve(env.data_dir())
        .config(&config, "[kdf]\nmemory_kib = 19456\niterations = 2\nparallelism = 1\n")
        .env("CREDVAULT_PASSPHRASE", passphrase)
        .env("CREDVAULT_DATABASE_URL", &url)
        .env("CREDVAULT_TOKEN", token)
        .env("CREDVAULT_UNRELATED", "stays-here")
        .start()
        .await;
    let pid = child.pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("read environ");
    let text = String::from_utf8_lossy(&environ);
    assert!(text.contains("CREDVAULT_UNRELATED=stays-here"), "reading the wrong environment? {text:?}");
    for secret in [passphrase, db_password, token] {
        assert!(!text.contains(secret), "{secret} is still in /proc/{pid}/environ");
    }
    for name in ["CREDVAULT_PASSPHRASE", "CREDVAULT_DATABASE_URL", "CREDVAULT_TOKEN"] {
        assert!(
            text.split('\0').all(|e| !e.starts_with(&format!("{name}=")) || e.len() == name.len() + 1),
            "{name} still has a value"
        );
    }
    child.kill().await;
    let logs = child.log().await;
    assert!(logs.contains("removed secret variables from the process environment"), "{logs}");
    for secret in [passphrase, db_password, token] {
        assert!(!logs.contains(secret), "{secret} was logged");
    }
}

#[cfg(unix)]
fn chmod(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[cfg(unix)]
#[tokio::test]
async fn a_key_file_open_to_others_is_refused_unless_allowed() {
    let env = TestEnv::new(Backend::Sqlite).await;
    // First start generates the key file 0600.
    let d = crate::helpers::TestDaemon::start(env.settings(), None).await;
    d.stop().await;
    let key = env.data_dir().join("master.key");
    for mode in [0o644, 0o640, 0o604, 0o660] {
        chmod(&key, mode);
        let Err(err) = Daemon::build(env.settings()).await else { panic!("an insecure key file must be refused") };
        let ServerError::Unlock(UnlockError::InsecureFile(f)) = &err else { panic!("wrong error: {err}") };
        assert_eq!((f.path.as_path(), f.mode), (key.as_path(), mode));
        let message = err.to_string();
        let needles = [
            key.display().to_string(),
            format!("mode {mode:04o}"),
            "chmod 600".into(),
            "--allow-insecure-key-permissions".into(),
        ];
        for needle in needles {
            assert!(message.contains(&needle), "{message:?} lacks {needle:?}");
        }
    }
    // Explicitly allowed: it starts.
    let mut allowed = env.settings();
    allowed.allow_insecure_key_permissions = true;
    let daemon = Daemon::build(allowed).await.expect("allowed insecure key file");
    drop(daemon);
    // Owner-only again (read-only too): it starts without the flag.
    chmod(&key, 0o400);
    drop(Daemon::build(env.settings()).await.expect("0400 key file is fine"));
}

#[cfg(unix)]
#[tokio::test]
async fn a_passphrase_file_open_to_others_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passphrase");
    std::fs::write(&file, "correct horse\n").unwrap();
    chmod(&file, 0o644);
    let args =
        ServeArgs { passphrase_file: Some(file.clone()), data_dir: Some(dir.path().into()), ..Default::default() };
    // The variable would win over the file; make sure the file is what is read.
    assert!(std::env::var_os("CREDVAULT_PASSPHRASE").is_none(), "run the tests without CREDVAULT_PASSPHRASE");
    match Settings::load(&args) {
        Err(ConfigError::InsecureFile(f)) => {
            assert_eq!((f.path, f.mode, f.what), (file.clone(), 0o644, "passphrase file"));
        }
        other => panic!("expected an insecure-file error, got {other:?}"),
    }
    let allowed = ServeArgs { allow_insecure_key_permissions: true, ..args.clone() };
    let s = Settings::load(&allowed).expect("allowed by the flag");
    assert!(s.passphrase.is_some());
    chmod(&file, 0o600);
    assert!(Settings::load(&args).expect("owner-only passphrase file").passphrase.is_some());

    // The real binary: exit status 2 and a message naming the file and its mode.
    chmod(&file, 0o640);
    let out = Binary::serve(dir.path()).arg("--passphrase-file").arg(&file).output().await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = &out.stderr;
    assert!(
        stderr.contains(&format!("passphrase file {} is accessible by group or others (mode 0640)", file.display())),
        "{stderr}"
    );
    assert!(!stderr.contains("correct horse"), "{stderr}");
}
