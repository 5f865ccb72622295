//! `credvault agent --config agent.toml`: keeps selected credentials as files (for
//! applications that cannot speak the API), through the caching client, so a write on the
//! daemon reaches the files within one push and a debounce window. `config.rs` reads and
//! checks the configuration, `files.rs` renders and writes, this file runs the loop, the
//! hook and the health endpoints.
//!
//! **Invariant:** a file is replaced only by a complete new file (temporary file in the
//! same directory, fsync, rename, fsync of the directory): a reader sees the old content
//! or the new, never a mix. The files of a `[[group]]` change together: a new version
//! directory, then one rename of the `..data` link, so a reader that resolves it once
//! never sees members of two versions. When the daemon is unreachable the files are left
//! as they are and health says so.

mod config;
mod files;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use zeroize::Zeroizing;

use crate::client::{CacheConfig, CachingClient, Client};
use config::Selection;
pub use config::{AgentArgs, AgentConfig, ConfigError, Format};
use files::sync_files;
pub use files::{env_key, write_atomic, write_group, Member, DATA_LINK};

#[derive(Debug, Default)]
struct Health {
    ready: bool,
    daemon_reachable: bool,
    last_sync: Option<SystemTime>,
    last_error: Option<String>,
    writes: u64,
    hooks: u64,
}

/// Runs the agent until `shutdown` completes.
pub async fn run_agent(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), anyhow::Error> {
    let client = Client::connect_lazy(&config.client)?;
    let mut prefixes: Vec<String> = Vec::new();
    for f in config.files.iter().chain(config.groups.iter().flat_map(|g| g.files.iter())) {
        match &f.selection {
            Selection::Prefix(p) => prefixes.push(p.clone()),
            Selection::Names(ns) => {
                for n in ns {
                    prefixes.push(n.rfind('/').map_or(n.clone(), |i| n[..=i].to_owned()));
                }
            }
        }
    }
    prefixes.sort();
    prefixes.dedup();
    let cache = CachingClient::new(
        client,
        CacheConfig { prefixes, stale_if_error: Duration::from_secs(365 * 24 * 3600), ..CacheConfig::default() },
    );
    std::fs::create_dir_all(&config.dir)?;
    let health = Arc::new(Mutex::new(Health::default()));
    if let Some(addr) = config.listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "health endpoints listening");
        tokio::spawn(serve_health(listener, health.clone(), cache.clone()));
    }
    let mut changes = cache.changes();
    let mut written: BTreeMap<PathBuf, Zeroizing<Vec<u8>>> = BTreeMap::new();
    tokio::pin!(shutdown);
    let mut first = true;
    loop {
        if !first {
            // Wait for a change (or the backstop), then for the debounce window to go quiet.
            tokio::select! {
                _ = &mut shutdown => break,
                _ = changes.recv() => {}
                _ = tokio::time::sleep(config.refresh) => {}
            }
            loop {
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    r = changes.recv() => { if matches!(r, Err(tokio::sync::broadcast::error::RecvError::Closed)) { break } }
                    _ = tokio::time::sleep(config.debounce) => break,
                }
            }
        }
        let outcome = sync_files(&config, &cache, &mut written).await;
        let reachable = cache.is_live();
        let changed = match outcome {
            Ok(changed) => {
                let mut h = lock(&health);
                h.last_sync = Some(SystemTime::now());
                h.last_error = None;
                h.daemon_reachable = reachable;
                h.writes += changed as u64;
                changed
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot bring the files up to date; keeping the last ones");
                let mut h = lock(&health);
                h.last_error = Some(e.to_string());
                h.daemon_reachable = false;
                0
            }
        };
        let all_present = config.files.iter().all(|f| written.contains_key(&f.path) || f.path.exists())
            && config.groups.iter().all(|g| g.dir.join(DATA_LINK).exists());
        if first && all_present && lock(&health).last_error.is_none() {
            first = false;
            // Ready for the probe first, so whoever sees the file sees /readyz agree.
            lock(&health).ready = true;
            if let Some(ready) = &config.ready_file {
                let stamp = format!("{}\n", unix_seconds(SystemTime::now()));
                write_atomic(ready, stamp.as_bytes(), 0o444, None, None)?;
            }
            tracing::info!(files = config.files.len(), groups = config.groups.len(), "files written; ready");
        } else if first {
            // Not everything could be written yet: retry soon.
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
            continue;
        } else if changed > 0 {
            if let Some(cmd) = &config.on_change {
                run_hook(cmd).await;
                lock(&health).hooks += 1;
            }
        }
    }
    Ok(())
}

fn lock(h: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    h.lock().unwrap_or_else(|p| p.into_inner())
}

/// Renders every file and replaces those whose content changed; returns how many.
async fn run_hook(cmd: &str) {
    match tokio::process::Command::new("sh").arg("-c").arg(cmd).status().await {
        Ok(s) if s.success() => tracing::info!("on_change hook ran"),
        Ok(s) => tracing::warn!(status = %s, "on_change hook failed"),
        Err(e) => tracing::warn!(error = %e, "cannot run the on_change hook"),
    }
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
}

/// `/healthz`: 200 while the agent runs, with whether the daemon is reachable (the files
/// are kept when it is not). `/readyz`: 200 once every file was written, 503 before.
async fn serve_health(listener: tokio::net::TcpListener, health: Arc<Mutex<Health>>, cache: CachingClient) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let health = health.clone();
        let cache = cache.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let (code, body) = {
                let mut h = lock(&health);
                let live = cache.is_live();
                if h.last_error.is_none() {
                    h.daemon_reachable = live;
                }
                let reachable = h.daemon_reachable && live;
                let body = format!(
                    "{{\"ready\":{},\"daemon\":\"{}\",\"last_sync\":{},\"writes\":{},\"hooks\":{},\"last_error\":{}}}\n",
                    h.ready,
                    if reachable { "reachable" } else { "unreachable (serving the last files)" },
                    h.last_sync.map_or("null".to_owned(), |t| unix_seconds(t).to_string()),
                    h.writes,
                    h.hooks,
                    serde_json::to_string(&h.last_error).unwrap_or_else(|_| "null".into()),
                );
                match path {
                    "/healthz" => (200, body),
                    "/readyz" if h.ready => (200, body),
                    "/readyz" => (503, body),
                    _ => (404, "not found\n".to_owned()),
                }
            };
            let reason = match code {
                200 => "OK",
                503 => "Service Unavailable",
                _ => "Not Found",
            };
            let response = format!(
                "HTTP/1.1 {code} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(response.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
