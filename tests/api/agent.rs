//! `credvault agent` (in process, against the real daemon) and `credvault run` (the real
//! binary).

use std::os::unix::fs::PermissionsExt as _;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use credvault::cli::agent::{run_agent, AgentConfig};

use crate::client::client;
use crate::helpers::{eventually, Backend, TestDaemon, TestEnv};

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
    let config = AgentConfig::parse(&agent_toml(&d, &dir, &token_file, &health.to_string())).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = tokio::spawn(run_agent(config, async {
        let _ = stop_rx.await;
    }));

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
    stop_tx.send(()).unwrap();
    agent.await.unwrap().unwrap();
    d.stop().await;
}

async fn binary(args: &[&str], d: Option<&TestDaemon>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_credvault"));
    cmd.args(args).env_remove("CREDVAULT_TOKEN").env_remove("CREDVAULT_ADDR").env_remove("DB_PASSWORD");
    if let Some(d) = d {
        cmd.env("CREDVAULT_ADDR", format!("http://{}", d.addr)).env("CREDVAULT_TOKEN", &d.token);
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.kill_on_drop(true);
    cmd.spawn().expect("spawn credvault")
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
        let out = binary(&["agent", "--config", file.to_str().unwrap()], None).await.wait_with_output().await.unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(field), "{err:?} does not name {field}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_passes_the_environment_and_the_exit_code() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    client(&d).await.put("app/db/password", b"s3cret", None).await.unwrap();
    let child =
        binary(&["run", "--prefix", "app/", "--", "sh", "-c", "echo \"pw=$DB_PASSWORD\"; exit 7"], Some(&d)).await;
    let out = child.wait_with_output().await.unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stderr));
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
    let child = binary(&["run", "--prefix", "app/", "--restart-on-change", "--", "sh", "-c", &script], Some(&d)).await;
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    eventually("the child started", Duration::from_secs(10), async || lines() == "start one\n").await;
    c.put("app/key", b"two", None).await.unwrap();
    eventually("the child restarted with the new value", Duration::from_secs(10), async || {
        lines() == "start one\nstart two\n"
    })
    .await;
    let pid = child.id().unwrap() as i32;
    // SAFETY: kill(2) on the pid of a child this test spawned.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    assert_eq!(out.status.code(), Some(42), "SIGTERM reached the child, its code came back");
    d.stop().await;
}
