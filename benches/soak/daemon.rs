//! Daemon processes: start, follow, signal and stop one `credvault serve` life.

use super::*;

/// How to start one daemon; the same for each of its lives.
pub(crate) struct Spec {
    pub(crate) label: &'static str,
    pub(crate) config: PathBuf,
    pub(crate) data_dir: PathBuf,
    pub(crate) key_file: PathBuf,
    pub(crate) database_url: String,
    pub(crate) log_file: PathBuf,
    pub(crate) heaptrack: Option<PathBuf>,
}

/// Warnings and errors a daemon logged, by message, over all its lives.
#[derive(Default)]
pub(crate) struct LogTally {
    pub(crate) lines: AtomicU64,
    pub(crate) by_message: Mutex<BTreeMap<(String, String), u64>>,
}

pub(crate) struct Running {
    pub(crate) child: tokio::process::Child,
    /// The `credvault` process itself (under heaptrack, a child of the wrapper script).
    pub(crate) pid: u32,
    pub(crate) addr: String,
    pub(crate) metrics_addr: String,
    pub(crate) root_token: Option<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The child handle kills the wrapper on drop; a daemon under heaptrack is its
        // child and would outlive it.
        if Some(self.pid) != self.child.id() && Path::new(&format!("/proc/{}", self.pid)).exists() {
            signal(self.pid, "KILL");
        }
    }
}

pub(crate) fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("soak: kill -{sig} {pid} failed");
    }
}

/// The parent pid and command name of `pid`, from `/proc/PID/stat`.
pub(crate) fn stat(pid: u32) -> Option<(u32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s[open + 1..close].to_owned();
    let ppid = s[close + 2..].split(' ').nth(1)?.parse().ok()?;
    Some((ppid, comm))
}

/// `root` if it is the daemon, else its descendant named `credvault`.
pub(crate) fn daemon_pid(root: u32) -> Option<u32> {
    if stat(root).is_some_and(|(_, comm)| comm == "credvault") {
        return Some(root);
    }
    let mut frontier = vec![root];
    while let Some(parent) = frontier.pop() {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Some((ppid, comm)) = stat(pid) {
                if ppid == parent {
                    if comm == "credvault" {
                        return Some(pid);
                    }
                    frontier.push(pid);
                }
            }
        }
    }
    None
}

pub(crate) async fn spawn(spec: &Spec, tally: Arc<LogTally>, life: u32) -> Running {
    let bin = env!("CARGO_BIN_EXE_credvault");
    let mut cmd = match &spec.heaptrack {
        Some(out) => {
            let mut c = tokio::process::Command::new("heaptrack");
            c.arg("-o").arg(out).arg(bin);
            c
        }
        None => tokio::process::Command::new(bin),
    };
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--log-format", "json"])
        .arg("--config")
        .arg(&spec.config)
        .arg("--data-dir")
        .arg(&spec.data_dir)
        .arg("--master-key-file")
        .arg(&spec.key_file)
        .arg("--database-url")
        .arg(&spec.database_url)
        .env("RUST_LOG", "info")
        .env_remove("CREDVAULT_PASSPHRASE")
        .env_remove("CREDVAULT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start daemon {}: {e}", spec.label));
    let root = child.id().expect("a started child has a pid");

    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<(String, String)>();
    let stderr = child.stderr.take().expect("piped stderr");
    let log_file = spec.log_file.clone();
    tokio::spawn(async move {
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_file)
            .await
            .expect("open the daemon's log file");
        let _ = out.write_all(format!("---- life {life}\n").as_bytes()).await;
        let mut lines = BufReader::new(stderr).lines();
        let mut addr_tx = Some(addr_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = out.write_all(line.as_bytes()).await;
            let _ = out.write_all(b"\n").await;
            tally.lines.fetch_add(1, Ordering::Relaxed);
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            let level = v["level"].as_str().unwrap_or_default();
            let message = v["fields"]["message"].as_str().unwrap_or_default();
            if level == "WARN" || level == "ERROR" {
                *tally.by_message.lock().expect("tally").entry((level.to_owned(), message.to_owned())).or_default() +=
                    1;
            }
            if message.contains("serving gRPC") {
                if let (Some(tx), Some(a), Some(m)) =
                    (addr_tx.take(), v["fields"]["addr"].as_str(), v["fields"]["metrics_addr"].as_str())
                {
                    let _ = tx.send((a.to_owned(), m.to_owned()));
                }
            }
        }
        let _ = out.flush().await;
    });
    let (token_tx, token_rx) = tokio::sync::oneshot::channel::<String>();
    let stdout = child.stdout.take().expect("piped stdout");
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        let mut token_tx = Some(token_tx);
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(t) = line.strip_prefix("export CREDVAULT_TOKEN=") {
                if let Some(tx) = token_tx.take() {
                    let _ = tx.send(t.trim().to_owned());
                }
            }
        }
    });

    let started = tokio::time::timeout(Duration::from_secs(60), addr_rx).await;
    let Ok(Ok((addr, metrics_addr))) = started else {
        panic!("daemon {} did not log \"serving gRPC\" within 60 s; see {}", spec.label, spec.log_file.display());
    };
    // Printed before the daemon serves, so it is there by now if there is one.
    let root_token = tokio::time::timeout(Duration::from_millis(500), token_rx).await.ok().and_then(Result::ok);
    let pid = daemon_pid(root).unwrap_or_else(|| panic!("no credvault process under pid {root}"));
    Running { child, pid, addr, metrics_addr, root_token }
}

/// SIGTERM, then the exit status and how long the drain took.
pub(crate) async fn terminate(mut r: Running) -> (std::process::ExitStatus, Duration) {
    let t = Instant::now();
    signal(r.pid, "TERM");
    // Under heaptrack the wrapper exits once the profile is written.
    let status = tokio::time::timeout(Duration::from_secs(300), r.child.wait())
        .await
        .expect("the daemon exits within 300 s of SIGTERM")
        .expect("wait for the daemon");
    (status, t.elapsed())
}
