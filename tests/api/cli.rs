//! The command line against a real daemon: values round-trip byte for byte, and
//! failures exit with codes a shell script can act on.

use crate::helpers::spawn::Binary;
use crate::helpers::{Backend, TestDaemon, TestEnv};

async fn run(d: Option<&TestDaemon>, args: &[&str], stdin: Option<&[u8]>) -> (i32, Vec<u8>, String) {
    let mut cmd = Binary::new(args).stdin(stdin.unwrap_or_default());
    if let Some(d) = d {
        cmd = cmd.client_of(d);
    }
    let out = cmd.output().await;
    (out.code(), out.stdout, out.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_round_trip_and_exit_codes() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;

    let (code, out, err) = run(Some(&d), &["put", "app/db", "--label", "team=app"], Some(b"s3cr3t\n")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), "app/db version 1");
    let (code, out, _) = run(Some(&d), &["get", "app/db"], None).await;
    assert_eq!((code, out), (0, b"s3cr3t".to_vec()), "one trailing newline from stdin is stripped");

    let file = env.data_dir().join("value.bin");
    let binary: Vec<u8> = (0..=255u8).collect();
    std::fs::write(&file, &binary).unwrap();
    let (code, _, err) =
        run(Some(&d), &["put", "app/db", "--value-file", file.to_str().unwrap(), "--expected-version", "1"], None)
            .await;
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = run(Some(&d), &["get", "app/db"], None).await;
    assert_eq!(out, binary, "files are stored byte for byte");
    let (_, out, _) = run(Some(&d), &["get", "app/db", "--version", "1"], None).await;
    assert_eq!(out, b"s3cr3t");

    let (code, _, err) = run(Some(&d), &["put", "app/db", "--expected-version", "1"], Some(b"x")).await;
    assert_eq!(code, 4, "conflict: {err}");
    assert!(err.contains("current version is 2"), "{err}");
    let (code, _, err) = run(Some(&d), &["get", "app/missing"], None).await;
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = run(Some(&d), &["get", "bad name"], None).await;
    assert_eq!(code, 7, "{err}");

    let (code, out, _) = run(Some(&d), &["list", "app/"], None).await;
    assert_eq!(code, 0);
    assert!(String::from_utf8_lossy(&out).starts_with("app/db\tv2\t"));
    let (code, out, _) = run(Some(&d), &["describe", "app/db"], None).await;
    let text = String::from_utf8_lossy(&out);
    assert_eq!(code, 0);
    assert!(text.contains("label:           team=app") && !text.contains("s3cr3t"), "{text}");
    let (code, out, _) = run(Some(&d), &["status"], None).await;
    assert_eq!(code, 0);
    assert!(String::from_utf8_lossy(&out).contains("sqlite (healthy)"));
    let (code, _, _) = run(Some(&d), &["delete", "app/db"], None).await;
    assert_eq!(code, 0);
    let (code, _, err) = run(Some(&d), &["get", "app/db"], None).await;
    assert_eq!(code, 3, "{err}");

    // No token, wrong token, nothing listening.
    let (code, _, err) = run(None, &["get", "app/db", "--addr", &format!("http://{}", d.addr)], None).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("CREDVAULT_TOKEN"), "{err}");
    let (code, _, err) =
        run(None, &["get", "app/db", "--addr", &format!("http://{}", d.addr), "--token", "cvt_nope"], None).await;
    assert_eq!(code, 5, "{err}");
    d.stop().await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let free = listener.local_addr().unwrap();
    drop(listener);
    let (code, _, err) = run(None, &["status", "--addr", &format!("http://{free}"), "--token", "cvt_x"], None).await;
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("cannot reach the daemon"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_rotation_commands() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let text = |out: &[u8]| String::from_utf8_lossy(out).into_owned();
    assert_eq!(run(Some(&d), &["put", "cli/key"], Some(b"first")).await.0, 0);

    let (code, out, err) = run(Some(&d), &["rotate", "cli/key", "--stdin", "--grace", "10m"], Some(b"second\n")).await;
    assert_eq!(code, 0, "{err}");
    let out = text(&out);
    assert!(out.starts_with("cli/key version 2\nversion 1 readable until "), "{out}");
    assert_eq!(run(Some(&d), &["get", "cli/key"], None).await.1, b"second");
    assert_eq!(run(Some(&d), &["get", "cli/key", "--version", "1"], None).await.1, b"first");

    let (code, _, err) = run(Some(&d), &["rotate", "cli/key", "--password", "20", "--classes", "digits"], None).await;
    assert_eq!(code, 0, "{err}");
    let value = run(Some(&d), &["get", "cli/key"], None).await.1;
    assert!(value.len() == 20 && value.iter().all(u8::is_ascii_digit));
    let (code, _, err) = run(Some(&d), &["rotate", "cli/key", "--grace", "soon"], None).await;
    assert_eq!(code, 2, "clap rejects a bad duration: {err}");
    let (code, _, err) = run(Some(&d), &["rotate", "cli/key"], None).await;
    assert_eq!(code, 7, "no value and no policy: {err}");
    assert!(err.contains("no rotation policy"), "{err}");

    let (code, out, err) = run(
        Some(&d),
        &[
            "policy",
            "set",
            "cli/key",
            "--kind",
            "periodic",
            "--interval",
            "30d",
            "--random-bytes",
            "32",
            "--encoding",
            "hex",
        ],
        None,
    )
    .await;
    assert_eq!(code, 0, "{err}");
    assert!(text(&out).starts_with("cli/key: periodic\n  next run:"), "{}", text(&out));
    assert_eq!(run(Some(&d), &["rotate", "cli/key"], None).await.0, 0, "the policy's generator makes the value");
    assert_eq!(run(Some(&d), &["get", "cli/key"], None).await.1.len(), 64);
    let (code, _, err) = run(Some(&d), &["policy", "set", "cli/key", "--kind", "weekly"], None).await;
    assert_eq!(code, 7, "{err}");

    assert_eq!(run(Some(&d), &["destroy", "cli/key", "1"], None).await.0, 0);
    let (code, _, err) = run(Some(&d), &["get", "cli/key", "--version", "1"], None).await;
    assert!(code == 4 && err.contains("destroyed"), "{code} {err}");
    assert_eq!(run(Some(&d), &["delete", "cli/key"], None).await.0, 0);
    let (code, out, err) = run(Some(&d), &["undelete", "cli/key"], None).await;
    assert_eq!((code, text(&out).trim()), (0, "cli/key restored at version 4"), "{err}");

    let (code, out, err) = run(Some(&d), &["kek", "rotate"], None).await;
    assert_eq!(code, 0, "{err}");
    let out = text(&out);
    assert!(out.lines().last().is_some_and(|l| l.contains("(completed): KEK 2, 4/4 re-wrapped, 0 failed")), "{out}");
    let (code, out, _) = run(Some(&d), &["kek", "status"], None).await;
    assert!(code == 0 && text(&out).contains("completed"));

    let (code, _, err) = run(Some(&d), &["rekey"], None).await;
    assert_eq!(code, 7, "no passphrases given: {err}");
    let out = Binary::new(["rekey"])
        .client_of(&d)
        .env("CREDVAULT_OLD_PASSPHRASE", "old passphrase")
        .env("CREDVAULT_NEW_PASSPHRASE", "new passphrase")
        .output()
        .await;
    let err = &out.stderr;
    assert_eq!(out.status.code(), Some(4), "a key-file database has no passphrase: {err}");
    assert!(err.contains("key file"), "{err}");
    d.stop().await;
}

/// `--idempotency-key` makes a script's retry of put, delete and rotate safe: the retry
/// prints what the first call printed, says on stderr that it was answered from the
/// key, and changes nothing; the key reused for another request is refused (exit 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_writes_retried_under_an_idempotency_key_change_nothing() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let put = ["put", "idem/x", "--idempotency-key", "deploy-42-put", "--owner", "ops"];
    let (code, first, err) = run(Some(&d), &put, Some(b"v1")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&first).trim(), "idem/x version 1");
    assert!(!err.contains("idempotency key"), "a first call is not a replay: {err}");
    let (code, again, err) = run(Some(&d), &put, Some(b"v1")).await;
    assert_eq!((code, &again), (0, &first), "{err}");
    assert!(err.contains("answered from the idempotency key"), "{err}");
    let (_, out, _) = run(Some(&d), &["describe", "idem/x"], None).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("current version: 1") && text.contains("owner:           ops"), "{text}");
    // The same key for a different value is another request: refused, nothing written.
    let (code, _, err) = run(Some(&d), &put, Some(b"v2")).await;
    assert_eq!(code, 4, "{err}");
    let (_, out, _) = run(Some(&d), &["get", "idem/x"], None).await;
    assert_eq!(out, b"v1");

    let rotate = ["rotate", "idem/x", "--password", "24", "--idempotency-key", "deploy-42-rotate"];
    let (code, first, err) = run(Some(&d), &rotate, None).await;
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&first).starts_with("idem/x version 2\n"), "{}", String::from_utf8_lossy(&first));
    let (_, generated, _) = run(Some(&d), &["get", "idem/x"], None).await;
    let (code, again, err) = run(Some(&d), &rotate, None).await;
    assert_eq!((code, &again), (0, &first), "{err}");
    assert!(err.contains("answered from the idempotency key"), "{err}");
    let (_, after, _) = run(Some(&d), &["get", "idem/x"], None).await;
    assert_eq!(after, generated, "a replayed rotation generates nothing new");

    let delete = ["delete", "idem/x", "--idempotency-key", "deploy-42-delete"];
    let (code, first, err) = run(Some(&d), &delete, None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&first).trim(), "idem/x deleted at version 2");
    // Without the key a second delete would find nothing to delete; with it, the answer
    // of the first.
    let (code, again, err) = run(Some(&d), &delete, None).await;
    assert_eq!((code, &again), (0, &first), "{err}");
    let (code, _, err) = run(Some(&d), &["delete", "idem/x"], None).await;
    assert_eq!(code, 3, "{err}");
    // A batch: the retry prints the first answer again and writes nothing.
    let file = env.data_dir().join("batch-value");
    std::fs::write(&file, b"w1").unwrap();
    let put_arg = format!("idem/w={}", file.display());
    let write = ["write", "--put", &put_arg, "--expect", "idem/w=0", "--idempotency-key", "deploy-42-write"];
    let (code, first, err) = run(Some(&d), &write, None).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&first).trim(), "idem/w version 1");
    let (code, again, err) = run(Some(&d), &write, None).await;
    assert_eq!((code, &again), (0, &first), "{err}");
    assert!(err.contains("answered from the idempotency key"), "{err}");
    let (code, _, err) = run(Some(&d), &["write", "--put", &put_arg, "--expect", "idem/w=0"], None).await;
    assert_eq!(code, 4, "without the key the retry is a conflict: {err}");
    let (code, _, err) = run(Some(&d), &["put", "idem/y", "--idempotency-key", "bad\u{1}key"], Some(b"v")).await;
    assert_eq!(code, 7, "{err}");
    assert!(err.contains("visible ASCII"), "{err}");
    d.stop().await;
}
