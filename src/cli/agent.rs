//! `credvault agent --config agent.toml`: keeps selected credentials as files (for
//! applications that cannot speak the API), through the caching client, so a write on the
//! daemon reaches the files within one push and a debounce window.
//!
//! **Invariant:** a file is replaced only by a complete new file (temporary file in the
//! same directory, fsync, rename, fsync of the directory): a reader sees the old content
//! or the new, never a mix. When the daemon is unreachable the files are left as they are
//! and health says so.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use zeroize::Zeroizing;

use crate::client::{CacheConfig, CachingClient, Client, ClientConfig, Error, TlsConfig, TokenSource};

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The agent's TOML configuration.
    #[arg(long, env = "CREDVAULT_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Only validate the configuration, then exit (0: valid, 2: not).
    #[arg(long)]
    pub check: bool,
}

/// A configuration that cannot be used, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    path: String,
    message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: DaemonSection,
    agent: AgentSection,
    #[serde(default, rename = "file")]
    files: Vec<RawFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DaemonSection {
    addr: Option<String>,
    /// Read the token from this file (else `CREDVAULT_TOKEN`).
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_client_cert: Option<PathBuf>,
    tls_client_key: Option<PathBuf>,
    tls_domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    dir: PathBuf,
    ready_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    on_change: Option<String>,
    #[serde(default = "default_debounce")]
    debounce_ms: u64,
    /// Re-render everything this often even without events (backstop).
    #[serde(default = "default_refresh")]
    refresh_seconds: u64,
}

fn default_debounce() -> u64 {
    200
}
fn default_refresh() -> u64 {
    300
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    name: Option<String>,
    names: Option<Vec<String>>,
    prefix: Option<String>,
    #[serde(default)]
    format: Format,
    mode: Option<String>,
    owner: Option<u32>,
    group: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The value, byte for byte (one credential).
    #[default]
    Raw,
    /// `KEY='value'` lines, shell-quoted.
    Env,
    /// One JSON object, name to value.
    Json,
}

/// Which credentials a file holds.
#[derive(Debug, Clone)]
enum Selection {
    Names(Vec<String>),
    Prefix(String),
}

#[derive(Debug, Clone)]
struct FileSpec {
    path: PathBuf,
    selection: Selection,
    format: Format,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct AgentConfig {
    client: ClientConfig,
    dir: PathBuf,
    ready_file: Option<PathBuf>,
    listen: Option<SocketAddr>,
    on_change: Option<String>,
    debounce: Duration,
    refresh: Duration,
    files: Vec<FileSpec>,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { path: path.display().to_string(), message: e.to_string() })?;
        AgentConfig::parse(&text)
    }

    pub fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            path: "agent.toml".into(),
            message: e.message().to_owned() + &span(text, &e),
        })?;
        let bad = |path: String, message: &str| ConfigError { path, message: message.to_owned() };
        if raw.files.is_empty() {
            return Err(bad("file".into(), "no [[file]] entries: nothing to write"));
        }
        if raw.agent.debounce_ms > 60_000 {
            return Err(bad("agent.debounce_ms".into(), "at most 60000"));
        }
        if raw.agent.refresh_seconds == 0 {
            return Err(bad("agent.refresh_seconds".into(), "must be at least 1"));
        }
        let mut files = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (i, f) in raw.files.iter().enumerate() {
            let at = |field: &str| format!("file[{i}].{field}");
            let rel = Path::new(&f.path);
            if f.path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
                return Err(bad(at("path"), "must be a relative path inside agent.dir, without `..`"));
            }
            if !seen.insert(rel.to_owned()) {
                return Err(bad(at("path"), "another [[file]] writes the same path"));
            }
            let selection = match (&f.name, &f.names, &f.prefix) {
                (Some(n), None, None) => Selection::Names(vec![n.clone()]),
                (None, Some(ns), None) if !ns.is_empty() => Selection::Names(ns.clone()),
                (None, None, Some(p)) => Selection::Prefix(p.clone()),
                _ => return Err(bad(at("name"), "give exactly one of `name`, `names` (non-empty) or `prefix`")),
            };
            if f.format == Format::Raw && !matches!(&selection, Selection::Names(n) if n.len() == 1) {
                return Err(bad(at("format"), "`raw` holds exactly one credential: use `name`, or format env/json"));
            }
            let mode = match &f.mode {
                None => 0o400,
                Some(m) => match u32::from_str_radix(m.trim_start_matches("0o"), 8) {
                    Ok(m) if m <= 0o777 => m,
                    _ => return Err(bad(at("mode"), "an octal mode such as \"0400\"")),
                },
            };
            files.push(FileSpec {
                path: raw.agent.dir.join(rel),
                selection,
                format: f.format,
                mode,
                owner: f.owner,
                group: f.group,
            });
        }
        let d = raw.daemon;
        let mut client = ClientConfig::from_env();
        if let Some(addr) = d.addr {
            client.addr = addr;
        }
        match (d.token_file, d.token_env) {
            (Some(_), Some(_)) => {
                return Err(bad("daemon.token_file".into(), "give token_file or token_env, not both"))
            }
            (Some(f), None) => client.token = TokenSource::File(f),
            (None, Some(v)) => client.token = TokenSource::Env(v),
            (None, None) => {}
        }
        if d.tls_client_cert.is_some() != d.tls_client_key.is_some() {
            return Err(bad("daemon.tls_client_cert".into(), "tls_client_cert and tls_client_key go together"));
        }
        if d.tls_ca.is_some() || d.tls_client_cert.is_some() || d.tls_domain.is_some() {
            client.tls = Some(TlsConfig {
                ca: d.tls_ca,
                client_cert: d.tls_client_cert,
                client_key: d.tls_client_key,
                domain: d.tls_domain,
            });
        }
        Ok(AgentConfig {
            client,
            dir: raw.agent.dir,
            ready_file: raw.agent.ready_file,
            listen: raw.agent.listen,
            on_change: raw.agent.on_change,
            debounce: Duration::from_millis(raw.agent.debounce_ms),
            refresh: Duration::from_secs(raw.agent.refresh_seconds),
            files,
        })
    }
}

fn span(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// What `/healthz` and `/readyz` report.
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
    for f in &config.files {
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
        let all_present = config.files.iter().all(|f| written.contains_key(&f.path) || f.path.exists());
        if first && all_present && lock(&health).last_error.is_none() {
            first = false;
            // Ready for the probe first, so whoever sees the file sees /readyz agree.
            lock(&health).ready = true;
            if let Some(ready) = &config.ready_file {
                let stamp = format!("{}\n", unix_seconds(SystemTime::now()));
                write_atomic(ready, stamp.as_bytes(), 0o444, None, None)?;
            }
            tracing::info!(files = config.files.len(), "files written; ready");
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
async fn sync_files(
    config: &AgentConfig,
    cache: &CachingClient,
    written: &mut BTreeMap<PathBuf, Zeroizing<Vec<u8>>>,
) -> Result<usize, Error> {
    let mut changed = 0;
    for f in &config.files {
        let creds = match &f.selection {
            Selection::Names(ns) => {
                let mut out = Vec::new();
                for n in ns {
                    out.push((n.clone(), cache.get(n).await?));
                }
                out
            }
            Selection::Prefix(p) => {
                let mut out = Vec::new();
                for n in cache.client().list_names(p).await? {
                    match cache.get(&n).await {
                        Ok(c) => out.push((n, c)),
                        // Deleted between the listing and the read.
                        Err(Error::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                out
            }
        };
        let strip = match &f.selection {
            Selection::Prefix(p) => p.as_str(),
            Selection::Names(_) => "",
        };
        let content = render(f.format, strip, &creds).map_err(Error::InvalidArgument)?;
        if written.get(&f.path).is_some_and(|old| **old == *content) {
            continue;
        }
        write_atomic(&f.path, &content, f.mode, f.owner, f.group)
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", f.path.display())))?;
        written.insert(f.path.clone(), content);
        changed += 1;
    }
    Ok(changed)
}

/// The environment variable for a credential: the name without `strip`, upper-cased,
/// every character other than a letter or digit turned into `_` (`db/password` ->
/// `DB_PASSWORD`).
pub fn env_key(name: &str, strip: &str) -> String {
    let rest = name.strip_prefix(strip).unwrap_or(name);
    let mut key: String =
        rest.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    if key.starts_with(|c: char| c.is_ascii_digit()) {
        key.insert(0, '_');
    }
    key
}

fn render(
    format: Format,
    strip: &str,
    creds: &[(String, Arc<crate::client::Credential>)],
) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut out = Zeroizing::new(Vec::new());
    match format {
        Format::Raw => {
            if let Some((_, c)) = creds.first() {
                out.extend_from_slice(c.value.expose());
            }
        }
        Format::Env => {
            for (name, c) in creds {
                let v = c.value.expose_str().ok_or_else(|| format!("{name:?} is not UTF-8; use format raw"))?;
                out.extend_from_slice(env_key(name, strip).as_bytes());
                out.extend_from_slice(b"='");
                out.extend_from_slice(v.replace('\'', "'\\''").as_bytes());
                out.extend_from_slice(b"'\n");
            }
        }
        Format::Json => {
            let mut map = serde_json::Map::new();
            for (name, c) in creds {
                let v = c.value.expose_str().ok_or_else(|| format!("{name:?} is not UTF-8; use format raw"))?;
                map.insert(name.clone(), serde_json::Value::String(v.to_owned()));
            }
            let text = Zeroizing::new(serde_json::to_vec_pretty(&map).map_err(|e| e.to_string())?);
            out.extend_from_slice(&text);
            out.push(b'\n');
            // The map's strings are not zeroized; they are dropped here.
        }
    }
    Ok(out)
}

/// Replaces `path` atomically: a new file beside it (mode set at creation), fsync, owner,
/// rename over the old one, fsync of the directory.
pub fn write_atomic(
    path: &Path,
    content: &[u8],
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(content)?;
        // The creation mode is filtered by the umask: set it exactly.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        f.sync_all()?;
        if owner.is_some() || group.is_some() {
            std::os::unix::fs::fchown(&f, owner, group)?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Runs the change hook through `sh -c`, waiting for it (so hooks never overlap).
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

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agent]
dir = "/tmp/x"
on_change = "true"

[[file]]
path = "db-password"
name = "app/db/password"

[[file]]
path = "app.env"
prefix = "app/"
format = "env"
mode = "0440"
"#;

    #[test]
    fn parses_and_validates() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.files[0].mode, 0o400);
        assert_eq!(c.files[1].mode, 0o440);
        let err = |text: &str| AgentConfig::parse(text).unwrap_err().to_string();
        assert!(err(&GOOD.replace("format = \"env\"", "format = \"yaml\"")).contains("yaml"));
        assert!(err(&GOOD.replace("\"0440\"", "\"999\"")).contains("file[1].mode"));
        assert!(err(&GOOD.replace("path = \"app.env\"", "path = \"../app.env\"")).contains("file[1].path"));
        assert!(
            err(&GOOD.replace("prefix = \"app/\"\nformat = \"env\"", "prefix = \"app/\"")).contains("file[1].format")
        );
        assert!(err(&GOOD.replace("dir = ", "dri = ")).contains("dri"));
        assert!(err("[agent]\ndir = \"/x\"\n").contains("file"));
    }

    #[test]
    fn env_keys_and_quoting() {
        assert_eq!(env_key("app/db/password", "app/"), "DB_PASSWORD");
        assert_eq!(env_key("app/1st-key", "app/"), "_1ST_KEY");
    }
}
