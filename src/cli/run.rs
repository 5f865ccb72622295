//! `credvault run --prefix app/ -- ./server`: starts a child with credentials in its
//! environment, passes signals on to it and exits with its exit code; with
//! `--restart-on-change` a new version restarts it with the new environment.
//!
//! Environment variables leak more easily than files (child processes inherit them,
//! `/proc/PID/environ`, crash reports): prefer the agent's files where the application
//! can read them.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::signal::unix::{signal, SignalKind};
use zeroize::Zeroizing;

use super::agent::env_key;
use super::conn::ClientError;
use super::Connection;
use crate::client::{CacheConfig, CachingClient, Client, Error};

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Put every credential under this prefix in the environment (`app/db/password` with
    /// `--prefix app/` becomes `DB_PASSWORD`). Repeat for more.
    #[arg(long = "prefix")]
    pub prefixes: Vec<String>,
    /// Put this one credential in the environment (its whole name, upper-cased with `_`
    /// for separators). Repeat for more.
    #[arg(long = "name")]
    pub names: Vec<String>,
    /// Restart the child (SIGTERM, then SIGKILL after --stop-timeout) when a credential changes.
    #[arg(long)]
    pub restart_on_change: bool,
    /// Seconds to wait for the child to exit after SIGTERM before SIGKILL.
    #[arg(long, default_value_t = 10)]
    pub stop_timeout: u64,
    /// Quiet period after a change before the restart, in milliseconds.
    #[arg(long, default_value_t = 200)]
    pub debounce_ms: u64,
    #[command(flatten)]
    pub conn: Connection,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

type Env = BTreeMap<String, Zeroizing<String>>;

/// Runs the child to completion; returns the exit code to exit with (the child's, or
/// 128 + the signal that ended it).
pub async fn run_command(args: RunArgs) -> Result<i32, ClientError> {
    if args.prefixes.is_empty() && args.names.is_empty() {
        return Err(ClientError::Usage("give at least one --prefix or --name".into()));
    }
    let client = Client::connect_lazy(&super::conn::client_config(&args.conn)?).map_err(client_error)?;
    let mut prefixes = args.prefixes.clone();
    for n in &args.names {
        prefixes.push(n.rfind('/').map_or(n.clone(), |i| n[..=i].to_owned()));
    }
    let cache = CachingClient::new(client, CacheConfig { prefixes, ..CacheConfig::default() });
    let mut changes = cache.changes();
    let mut env = environment(&args, &cache).await.map_err(client_error)?;
    let mut child = spawn(&args.command, &env)?;

    let kinds = [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::quit(),
        SignalKind::user_defined1(),
        SignalKind::user_defined2(),
    ];
    let mut signals = Vec::new();
    for k in kinds {
        signals.push((k, signal(k)?));
    }
    loop {
        let forwarded = async {
            let futs = signals.iter_mut().map(|(k, s)| Box::pin(async move { s.recv().await.map(|_| *k) }));
            futures_select(futs).await
        };
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                return Ok(exit_code(status));
            }
            Some(kind) = forwarded => {
                if let Some(pid) = child.id() {
                    send(pid, kind.as_raw_value());
                }
            }
            r = changes.recv(), if args.restart_on_change => {
                if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    continue;
                }
                // Let a burst of changes settle, then restart only if the environment differs.
                loop {
                    tokio::select! {
                        _ = changes.recv() => {}
                        _ = tokio::time::sleep(Duration::from_millis(args.debounce_ms)) => break,
                    }
                }
                let new_env = match environment(&args, &cache).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the new credentials; the child keeps running");
                        continue;
                    }
                };
                if new_env == env {
                    continue;
                }
                env = new_env;
                eprintln!("credvault run: credentials changed; restarting the child");
                stop(&mut child, Duration::from_secs(args.stop_timeout)).await?;
                child = spawn(&args.command, &env)?;
            }
        }
    }
}

/// The first of several futures to complete (without a `futures` dependency).
async fn futures_select<F, T>(futs: impl Iterator<Item = F>) -> Option<T>
where
    F: std::future::Future<Output = Option<T>> + Unpin,
{
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(move |cx| {
        for f in futs.iter_mut() {
            if let std::task::Poll::Ready(v) = std::pin::Pin::new(f).poll(cx) {
                return std::task::Poll::Ready(v);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn environment(args: &RunArgs, cache: &CachingClient) -> Result<Env, Error> {
    let mut env = Env::new();
    for p in &args.prefixes {
        for n in cache.client().list_names(p).await? {
            match cache.get(&n).await {
                Ok(c) => {
                    env.insert(env_key(&n, p), Zeroizing::new(utf8(&n, c.value.expose())?));
                }
                Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    for n in &args.names {
        let c = cache.get(n).await?;
        env.insert(env_key(n, ""), Zeroizing::new(utf8(n, c.value.expose())?));
    }
    Ok(env)
}

fn utf8(name: &str, v: &[u8]) -> Result<String, Error> {
    String::from_utf8(v.to_vec())
        .map_err(|_| Error::InvalidArgument(format!("{name:?} is not UTF-8 and cannot go into the environment")))
}

fn spawn(command: &[String], env: &Env) -> Result<Child, ClientError> {
    let (program, args) =
        command.split_first().ok_or_else(|| ClientError::Usage("no command given after --".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v.as_str());
    }
    cmd.spawn().map_err(|e| ClientError::Usage(format!("cannot start {program:?}: {e}")))
}

async fn stop(child: &mut Child, timeout: Duration) -> Result<(), ClientError> {
    if let Some(pid) = child.id() {
        send(pid, libc::SIGTERM);
    }
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        child.kill().await?;
    }
    Ok(())
}

fn send(pid: u32, sig: i32) {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return };
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child's.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

fn client_error(e: Error) -> ClientError {
    ClientError::Client(e)
}
