//! The real `credvault` binary, the one way tests run it: [`Binary`] builds the command
//! line and environment, then either runs it to its exit ([`Binary::output`]: client
//! subcommands, `bench`, a `serve` that must refuse to start), starts a daemon and waits
//! until its JSON log says where it serves ([`Binary::start`], giving a [`Running`]), or
//! starts any other long-running command (`agent`, `run`) the test signals and waits for
//! ([`Binary::spawn`], giving a [`Process`]).

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use credvault::config::Settings;

use super::{TestDaemon, TestEnv};

/// How long a daemon may take from spawn to "serving gRPC" (it may derive a key first).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `credvault` command line, to run once or to start as a daemon.
pub struct Binary {
    cmd: Command,
    stdin: Option<Vec<u8>>,
}

impl Binary {
    /// `credvault <args>`. No `CREDVAULT_*` variable of the test process reaches it, so
    /// the environment a developer runs the tests from cannot change what they check:
    /// the test sets the variables the binary should see.
    pub fn new<I, S>(args: I) -> Binary
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_credvault"));
        cmd.args(args);
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with("CREDVAULT_")) {
                cmd.env_remove(name);
            }
        }
        Binary { cmd, stdin: None }
    }

    /// `credvault serve` over `data_dir`, both listeners on port 0, logging at `info` (a
    /// later `.env("RUST_LOG", ..)` changes the level).
    pub fn serve(data_dir: &Path) -> Binary {
        Binary::new(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "info")
    }

    /// `serve` over `env`'s data and database, with what tests of the binary vary in
    /// `settings` (the shutdown grace period and the `[rotation]` table) in a config file.
    pub fn serve_env(env: &TestEnv, settings: &Settings) -> Binary {
        let r = &settings.rotation;
        let toml = format!(
            "shutdown_grace_seconds = {}\n[rotation]\nrewrap_batch_size = {}\nrewrap_pause_ms = {}\njob_lease_ms = {}\nscheduler_interval_ms = {}\n",
            settings.shutdown_grace_seconds,
            r.rewrap_batch_size, r.rewrap_pause_ms, r.job_lease_ms, r.scheduler_interval_ms
        );
        Binary::serve(env.data_dir())
            .arg("--database-url")
            .arg(env.database_url())
            .config(&env.data_dir().join("binary.toml"), &toml)
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Binary {
        self.cmd.arg(arg);
        self
    }

    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Binary {
        self.cmd.env(name, value);
        self
    }

    /// Keeps a variable of the test process (other than `CREDVAULT_*`, already removed)
    /// from reaching it.
    pub fn env_remove(mut self, name: impl AsRef<OsStr>) -> Binary {
        self.cmd.env_remove(name);
        self
    }

    /// Writes `toml` to `path` and passes `--config <path>`.
    pub fn config(self, path: &Path, toml: &str) -> Binary {
        std::fs::write(path, toml).expect("write the config file");
        self.arg("--config").arg(path)
    }

    /// A client of `d`: `CREDVAULT_ADDR` and `CREDVAULT_TOKEN` name it and its root token.
    pub fn client_of(self, d: &TestDaemon) -> Binary {
        self.env("CREDVAULT_ADDR", format!("http://{}", d.addr)).env("CREDVAULT_TOKEN", &d.token)
    }

    /// Bytes for standard input; without them it reads end-of-file at once.
    pub fn stdin(mut self, bytes: &[u8]) -> Binary {
        self.stdin = Some(bytes.to_vec());
        self
    }

    /// Runs it to its exit and returns what it printed.
    pub async fn output(mut self) -> Output {
        let stdin = if self.stdin.is_some() { Stdio::piped() } else { Stdio::null() };
        self.cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = self.cmd.spawn().expect("spawn credvault");
        let input = child.stdin.take();
        let feed = async move {
            if let (Some(mut input), Some(bytes)) = (input, self.stdin) {
                // A command that exits without reading its input is judged by its output.
                let _ = input.write_all(&bytes).await;
            }
        };
        let ((), out) = tokio::join!(feed, child.wait_with_output());
        let out = out.expect("wait for credvault");
        Output { status: out.status, stdout: out.stdout, stderr: String::from_utf8_lossy(&out.stderr).into_owned() }
    }

    /// Starts it and returns at once: for commands that run until signalled (`agent`,
    /// `run`). Both output pipes are read in the background; the process is killed if
    /// the [`Process`] is dropped.
    pub fn spawn(mut self) -> Process {
        self.cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = self.cmd.spawn().expect("spawn credvault");
        let stdout = tokio::spawn(read_all(child.stdout.take().expect("stdout")));
        let stderr = tokio::spawn(read_all(child.stderr.take().expect("stderr")));
        Process { child, stdout, stderr }
    }

    /// Starts a daemon (`serve`) with JSON logs and waits until it logs "serving gRPC",
    /// which names both listening addresses. Panics with what it logged if it exits or
    /// stalls first. The process is killed if the [`Running`] is dropped.
    pub async fn start(mut self) -> Running {
        self.cmd.args(["--log-format", "json"]);
        self.cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let mut child = self.cmd.spawn().expect("spawn credvault");

        // Both pipes are read to the end in the background, so the daemon never blocks on
        // a full pipe, and everything it wrote is there for the test afterwards.
        let log = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = oneshot::channel::<(SocketAddr, SocketAddr)>();
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let stderr = tokio::spawn({
            let log = log.clone();
            async move {
                let mut addr_tx = Some(addr_tx);
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("serving gRPC") {
                        if let Some(addrs) = listening(&line) {
                            if let Some(tx) = addr_tx.take() {
                                let _ = tx.send(addrs);
                            }
                        }
                    }
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
        let printed = Arc::new(Mutex::new(String::new()));
        let (token_tx, token_rx) = oneshot::channel::<String>();
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let stdout = tokio::spawn({
            let printed = printed.clone();
            async move {
                let mut token_tx = Some(token_tx);
                let mut line = String::new();
                while out.read_line(&mut line).await.is_ok_and(|n| n > 0) {
                    if let Some(token) = line.strip_prefix("export CREDVAULT_TOKEN=") {
                        if let Some(tx) = token_tx.take() {
                            let _ = tx.send(token.trim().to_owned());
                        }
                    }
                    printed.lock().unwrap().push_str(&line);
                    line.clear();
                }
            }
        });

        let (addr, metrics_addr) = match tokio::time::timeout(START_TIMEOUT, addr_rx).await {
            Ok(Ok(addrs)) => addrs,
            // The log ended (the process closed stderr) before the line came.
            Ok(Err(_)) => {
                let status = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                panic!("credvault stopped ({status:?}) before serving:\n{}", log.lock().unwrap());
            }
            Err(_) => panic!("credvault is not serving after {START_TIMEOUT:?}:\n{}", log.lock().unwrap()),
        };
        Running {
            child,
            addr,
            metrics_addr,
            token_rx: Some(token_rx),
            root_token: None,
            log,
            stderr: Some(stderr),
            printed,
            stdout: Some(stdout),
        }
    }
}

/// The gRPC and metrics addresses of a JSON "serving gRPC" log line.
fn listening(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let addr = |field: &str| v["fields"][field].as_str()?.parse().ok();
    Some((addr("addr")?, addr("metrics_addr")?))
}

async fn read_all(mut pipe: impl tokio::io::AsyncRead + Unpin) -> Vec<u8> {
    let mut buf = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut buf).await;
    buf
}

/// A command started by [`Binary::spawn`], killed when dropped.
pub struct Process {
    child: Child,
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid fits pid_t");
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill({pid}, {signal})");
    }

    /// Waits up to `timeout` for it to exit; returns how it ended and what it printed.
    /// Panics (the process is killed) if it is still running then.
    pub async fn wait(mut self, timeout: Duration) -> Output {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => status.expect("wait for credvault"),
            Err(_) => {
                let _ = self.child.kill().await;
                let stderr = self.stderr.await.unwrap_or_default();
                panic!("credvault still running after {timeout:?}:\n{}", String::from_utf8_lossy(&stderr));
            }
        };
        let stdout = self.stdout.await.expect("stdout reader");
        let stderr = String::from_utf8_lossy(&self.stderr.await.expect("stderr reader")).into_owned();
        Output { status, stdout, stderr }
    }
}

/// How a command run by [`Binary::output`] ended, and what it printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl Output {
    /// The exit code; -1 if a signal ended it.
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or(-1)
    }
}

/// A `credvault serve` process started by [`Binary::start`], killed when dropped.
pub struct Running {
    child: Child,
    pub addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    token_rx: Option<oneshot::Receiver<String>>,
    root_token: Option<String>,
    log: Arc<Mutex<String>>,
    stderr: Option<JoinHandle<()>>,
    printed: Arc<Mutex<String>>,
    stdout: Option<JoinHandle<()>>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }

    /// The root token a first start prints to stdout.
    pub async fn root_token(&mut self) -> String {
        if let Some(rx) = self.token_rx.take() {
            let token = tokio::time::timeout(Duration::from_secs(10), rx).await;
            self.root_token = Some(
                token
                    .expect("the root token within 10 s")
                    .expect("a root token on stdout: only the first start over a new database prints one"),
            );
        }
        self.root_token.clone().expect("the root token was read")
    }

    /// A connection to its gRPC listener (it is serving once `start` returns).
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr)).expect("endpoint").connect().await.expect("connect")
    }

    /// Sends SIGTERM: the graceful drain.
    pub fn sigterm(&self) {
        let pid = self.pid().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("run kill").success());
    }

    /// Kills it (SIGKILL: no drain) and reaps it.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("kill the daemon");
    }

    pub async fn wait(&mut self) -> ExitStatus {
        self.child.wait().await.expect("wait for the daemon")
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll the daemon")
    }

    /// Everything it logged (stderr), one line each; waits until it has exited.
    pub async fn log(&mut self) -> String {
        if let Some(task) = self.stderr.take() {
            task.await.expect("stderr reader");
        }
        self.log.lock().unwrap().clone()
    }

    /// Everything it printed to stdout; waits until it has exited.
    pub async fn stdout(&mut self) -> String {
        if let Some(task) = self.stdout.take() {
            task.await.expect("stdout reader");
        }
        self.printed.lock().unwrap().clone()
    }
}
