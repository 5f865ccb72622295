//! `credvault agent` and `credvault run`: the real binary (through the shared spawner)
//! against the real daemon.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::client::client;
use crate::helpers::spawn::{Binary, Process};
use crate::helpers::{eventually, Backend, TestDaemon, TestEnv};

/// `credvault agent --config <dir>/../agent.toml` with `toml` written there.
fn start_agent(dir: &Path, toml: &str) -> Process {
    let file = dir.parent().expect("the files directory has a parent").join("agent.toml");
    std::fs::write(&file, toml).expect("write agent.toml");
    Binary::new(["agent", "--config"]).arg(&file).env("RUST_LOG", "info").spawn()
}

/// SIGTERM, then the agent must exit 0 within 10 s.
async fn stop_agent(agent: Process) {
    agent.signal(libc::SIGTERM);
    let out = agent.wait(Duration::from_secs(10)).await;
    assert_eq!(out.code(), 0, "the agent stops cleanly on SIGTERM: {}", out.stderr);
}

fn agent_toml(d: &TestDaemon, dir: &std::path::Path, token_file: &std::path::Path, listen: &str) -> String {
    format!(
        r#"
[daemon]
addr = "http://{addr}"
token_file = "{token}"

[agent]
dir = "{dir}"
ready_file = "{dir}/.ready"
listen = "{listen}"
on_change = "echo changed >> {dir}/../hooks.log"
debounce_ms = 50

[[file]]
path = "db-password"
name = "app/db/password"

[[file]]
path = "app.env"
prefix = "app/"
format = "env"
mode = "0440"

[[file]]
path = "both.json"
names = ["app/db/user", "app/db/password"]
format = "json"
"#,
        addr = d.addr,
        token = token_file.display(),
        dir = dir.display(),
    )
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("health endpoint");
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let code = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned())
}

fn free_port() -> std::net::SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_writes_files_atomically_and_survives_a_restart() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    c.put("app/db/password", b"pw-1", None).await.unwrap();
    c.put("app/db/user", b"alice", None).await.unwrap();
    let token_file = env.data_dir().join("agent-token");
    std::fs::write(&token_file, &d.token).unwrap();
    let root = env.data_dir().join("agent");
    let dir = root.join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let health = free_port();
    let agent = start_agent(&dir, &agent_toml(&d, &dir, &token_file, &health.to_string()));

    eventually("ready file", Duration::from_secs(5), async || dir.join(".ready").exists()).await;
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    assert_eq!(read("db-password"), "pw-1");
    assert_eq!(std::fs::metadata(dir.join("db-password")).unwrap().permissions().mode() & 0o777, 0o400);
    assert_eq!(std::fs::metadata(dir.join("app.env")).unwrap().permissions().mode() & 0o777, 0o440);
    assert_eq!(read("app.env"), "DB_PASSWORD='pw-1'\nDB_USER='alice'\n");
    let json: serde_json::Value = serde_json::from_str(&read("both.json")).unwrap();
    assert_eq!(json, serde_json::json!({"app/db/user": "alice", "app/db/password": "pw-1"}));
    assert_eq!(http_get(health, "/readyz").await.0, 200);
    eventually("health reports the daemon reachable", Duration::from_secs(5), async || {
        let (code, body) = http_get(health, "/healthz").await;
        code == 200 && body.contains("\"daemon\":\"reachable\"")
    })
    .await;

    // A reader that never sees a partial or mixed file while versions change.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (done, path) = (done.clone(), dir.join("both.json"));
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !done.load(Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).unwrap();
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("partial file: {e}"));
                let pw = v["app/db/password"].as_str().unwrap().to_owned();
                assert!(pw.starts_with("pw-"), "mixed file {text}");
                reads += 1;
            }
            reads
        })
    };
    let hooks = root.join("hooks.log");
    for round in 2..5 {
        c.put("app/db/password", format!("pw-{round}").as_bytes(), None).await.unwrap();
        eventually("the file follows the put", Duration::from_secs(2), async || {
            read("db-password") == format!("pw-{round}")
        })
        .await;
        let want = format!("DB_PASSWORD='pw-{round}'\n");
        eventually("the env file follows", Duration::from_secs(2), async || read("app.env").starts_with(&want)).await;
        // One hook run per change, after the debounce window.
        let want = (round - 1) as usize;
        eventually("the hook ran once", Duration::from_secs(2), async || {
            std::fs::read_to_string(&hooks).map(|s| s.lines().count()).unwrap_or(0) == want
        })
        .await;
    }
    done.store(true, Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    tokio::time::sleep(Duration::from_millis(300)).await; // No late extra hook run.
    assert_eq!(std::fs::read_to_string(&hooks).unwrap().lines().count(), 3);

    // The daemon goes away: the files stay, health says so.
    let addr = d.addr;
    let token = d.token.clone();
    d.stop().await;
    eventually("health reports the daemon unreachable", Duration::from_secs(5), async || {
        let (code, body) = http_get(health, "/healthz").await;
        code == 200 && body.contains("unreachable")
    })
    .await;
    assert_eq!(read("db-password"), "pw-4");
    assert_eq!(http_get(health, "/readyz").await.0, 200, "the last files are still served");

    // It comes back: a put after the restart reaches the files.
    let mut settings = env.settings();
    settings.listen = addr;
    while std::net::TcpListener::bind(addr).is_err() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let d = TestDaemon::start(settings, Some(&token)).await;
    client(&d).await.put("app/db/password", b"pw-after", None).await.unwrap();
    eventually("the file follows a put after the restart", Duration::from_secs(10), async || {
        read("db-password") == "pw-after"
    })
    .await;
    stop_agent(agent).await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_agent_config_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    for (text, field) in [
        ("[agent]\ndir = \"/tmp/x\"\n[[file]]\npath = \"a\"\nname = \"a/b\"\nmode = \"99x\"\n", "file[0].mode"),
        ("[agent]\ndir = \"/tmp/x\"\n[[file]]\npath = \"a\"\nprefix = \"a/\"\n", "file[0].format"),
        ("[agent]\ndirectory = \"/tmp/x\"\n", "directory"),
    ] {
        std::fs::write(&file, text).unwrap();
        let out = Binary::new(["agent", "--config"]).arg(&file).output().await;
        let err = &out.stderr;
        assert_eq!(out.code(), 2, "{err}");
        assert!(err.contains(field), "{err:?} does not name {field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_environment_and_the_exit_code() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    client(&d).await.put("app/db/password", b"s3cret", None).await.unwrap();
    let out = Binary::new(["run", "--prefix", "app/", "--", "sh", "-c", "echo \"pw=$DB_PASSWORD\"; exit 7"])
        .client_of(&d)
        .env_remove("DB_PASSWORD")
        .output()
        .await;
    assert_eq!(out.code(), 7, "{}", out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pw=s3cret\n");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_forwards_signals_and_restarts_on_change() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    c.put("app/key", b"one", None).await.unwrap();
    let log = env.data_dir().join("starts.log");
    let script =
        format!("echo \"start $KEY\" >> {}; trap 'exit 42' TERM; while true; do sleep 0.05; done", log.display());
    let child = Binary::new(["run", "--prefix", "app/", "--restart-on-change", "--", "sh", "-c", &script])
        .client_of(&d)
        .env_remove("KEY")
        .spawn();
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the child started", Duration::from_secs(10), async || lines() == "start one\n").await;
    c.put("app/key", b"two", None).await.unwrap();
    eventually("the child restarted with the new value", Duration::from_secs(10), async || {
        lines() == "start one\nstart two\n"
    })
    .await;
    child.signal(libc::SIGTERM);
    let out = child.wait(Duration::from_secs(10)).await;
    assert_eq!(out.code(), 42, "SIGTERM reached the child, its code came back: {}", out.stderr);
    d.stop().await;
}

/// Reads a group through one resolution of its `..data` link: every member from the same
/// version directory. `None` if that directory was swapped away and removed meanwhile.
fn read_group(dir: &Path, members: &[&str]) -> Option<Vec<String>> {
    let version = std::fs::read_link(dir.join("..data")).ok()?;
    let mut out = Vec::new();
    for m in members {
        match std::fs::read_to_string(dir.join(&version).join(m)) {
            Ok(text) => out.push(text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => panic!("reading {m}: {e}"),
        }
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_files_changes_all_at_once() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let c = client(&d).await;
    c.put("app/db/password", b"pw-1", None).await.unwrap();
    c.put("app/db/user", b"user-1", None).await.unwrap();
    let token_file = env.data_dir().join("agent-token");
    std::fs::write(&token_file, &d.token).unwrap();
    let dir = env.data_dir().join("agent").join("files");
    std::fs::create_dir_all(&dir).unwrap();
    let toml = format!(
        r#"
[daemon]
addr = "http://{addr}"
token_file = "{token}"

[agent]
dir = "{dir}"
ready_file = "{dir}/.ready"
debounce_ms = 0

[[group]]
path = "db"

[[group.file]]
path = "password"
name = "app/db/password"

[[group.file]]
path = "app.env"
prefix = "app/db/"
format = "env"
mode = "0440"

[[group.file]]
path = "conf/all.json"
names = ["app/db/user", "app/db/password"]
format = "json"
"#,
        addr = d.addr,
        token = token_file.display(),
        dir = dir.display(),
    );
    let agent = start_agent(&dir, &toml);
    eventually("ready file", Duration::from_secs(10), async || dir.join(".ready").exists()).await;
    let group = dir.join("db");
    let members = ["password", "app.env", "conf/all.json"];
    let first = read_group(&group, &members).expect("the first version");
    assert_eq!(first[0], "pw-1");
    assert_eq!(first[1], "PASSWORD='pw-1'\nUSER='user-1'\n");
    // The application's names are links through `..data`, with the configured modes.
    assert_eq!(std::fs::read_link(group.join("password")).unwrap(), Path::new("..data/password"));
    assert_eq!(std::fs::read_to_string(group.join("conf/all.json")).unwrap(), first[2]);
    assert_eq!(std::fs::metadata(group.join("app.env")).unwrap().permissions().mode() & 0o777, 0o440);
    assert_eq!(std::fs::metadata(group.join("password")).unwrap().permissions().mode() & 0o777, 0o400);

    // Readers that never see two versions at once: each snapshot's members agree (the
    // password file, the env file and the JSON file carry the same password and user).
    let done = Arc::new(AtomicBool::new(false));
    let snapshots = Arc::new(AtomicU64::new(0));
    let reader = {
        let (done, snapshots, group) = (done.clone(), snapshots.clone(), group.clone());
        std::thread::spawn(move || {
            let mut vanished = 0u64;
            while !done.load(Ordering::Relaxed) {
                let Some(files) = read_group(&group, &members) else {
                    vanished += 1;
                    continue;
                };
                let (pw, env_file, json) = (&files[0], &files[1], &files[2]);
                assert!(pw.starts_with("pw-"), "partial password file {pw:?}");
                let user = env_file
                    .strip_prefix(&format!("PASSWORD='{pw}'\nUSER='"))
                    .and_then(|rest| rest.strip_suffix("'\n"))
                    .unwrap_or_else(|| panic!("mixed set: password {pw:?}, env file {env_file:?}"));
                let v: serde_json::Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("partial JSON: {e}"));
                assert_eq!(v, serde_json::json!({"app/db/password": pw, "app/db/user": user}), "mixed set");
                // And through the application's own path: always a complete file.
                let direct = std::fs::read_to_string(group.join("password")).unwrap_or_default();
                assert!(direct.is_empty() || direct.starts_with("pw-"), "partial file {direct:?}");
                snapshots.fetch_add(1, Ordering::Relaxed);
            }
            vanished
        })
    };
    for round in 2..=12 {
        // Two puts are two daemon-side changes: the agent may render between them (a
        // new user with the old password is a state the daemon had). What must never
        // happen is files of one snapshot disagreeing with each other.
        c.put("app/db/user", format!("user-{round}").as_bytes(), None).await.unwrap();
        c.put("app/db/password", format!("pw-{round}").as_bytes(), None).await.unwrap();
        let want = format!("pw-{round}");
        eventually("the group follows the puts", Duration::from_secs(5), async || {
            read_group(&group, &members).is_some_and(|f| f[0] == want && f[1].contains(&format!("user-{round}")))
        })
        .await;
    }
    done.store(true, Ordering::Relaxed);
    reader.join().expect("the reader saw no mixed or partial set");
    assert!(snapshots.load(Ordering::Relaxed) > 0);
    // Old version directories are removed once the link has moved on.
    eventually("only the current version directory is left", Duration::from_secs(5), async || {
        let versions: Vec<String> = std::fs::read_dir(&group)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("..") && n != "..data")
            .collect();
        versions.len() == 1 && std::fs::read_link(group.join("..data")).unwrap().to_string_lossy() == versions[0]
    })
    .await;
    stop_agent(agent).await;
    d.stop().await;
}
