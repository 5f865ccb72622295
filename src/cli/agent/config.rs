//! The agent's configuration: the TOML layout and its validation, which names the
//! field of every mistake.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::client::{ClientConfig, TlsConfig, TokenSource};

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
    #[serde(default, rename = "group")]
    groups: Vec<RawGroup>,
}

/// Files that must change together: written into a fresh directory, then switched to
/// by one atomic rename of the `..data` link.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    path: String,
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
pub(super) enum Selection {
    Names(Vec<String>),
    Prefix(String),
}

#[derive(Debug, Clone)]
pub(super) struct FileSpec {
    /// Under `agent.dir` for a single file; inside the group's directory for a member.
    pub(super) path: PathBuf,
    pub(super) selection: Selection,
    pub(super) format: Format,
    pub(super) mode: u32,
    pub(super) owner: Option<u32>,
    pub(super) group: Option<u32>,
}

/// A set of files replaced together: `dir/..data` links to the current version
/// directory, and each file `dir/NAME` links to `..data/NAME`.
#[derive(Debug, Clone)]
pub(super) struct GroupSpec {
    pub(super) dir: PathBuf,
    pub(super) files: Vec<FileSpec>,
}

/// The validated configuration.
#[derive(Debug)]
pub struct AgentConfig {
    pub(super) client: ClientConfig,
    pub(super) dir: PathBuf,
    pub(super) ready_file: Option<PathBuf>,
    pub(super) listen: Option<SocketAddr>,
    pub(super) on_change: Option<String>,
    pub(super) debounce: Duration,
    pub(super) refresh: Duration,
    pub(super) files: Vec<FileSpec>,
    pub(super) groups: Vec<GroupSpec>,
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
        if raw.files.is_empty() && raw.groups.is_empty() {
            return Err(bad("file".into(), "no [[file]] or [[group]] entries: nothing to write"));
        }
        if raw.agent.debounce_ms > 60_000 {
            return Err(bad("agent.debounce_ms".into(), "at most 60000"));
        }
        if raw.agent.refresh_seconds == 0 {
            return Err(bad("agent.refresh_seconds".into(), "must be at least 1"));
        }
        let mut files = Vec::new();
        let mut taken: Vec<PathBuf> = Vec::new();
        for (i, f) in raw.files.iter().enumerate() {
            let at = |field: &str| format!("file[{i}].{field}");
            let spec = parse_file(f, &at)?;
            if taken.iter().any(|t| t.starts_with(&spec.path) || spec.path.starts_with(t)) {
                return Err(bad(at("path"), "another [[file]] or [[group]] writes the same path"));
            }
            taken.push(spec.path.clone());
            files.push(FileSpec { path: raw.agent.dir.join(&spec.path), ..spec });
        }
        let mut groups = Vec::new();
        for (g, raw_group) in raw.groups.iter().enumerate() {
            let at = |field: &str| format!("group[{g}].{field}");
            let dir = relative(&raw_group.path).ok_or_else(|| bad(at("path"), RELATIVE))?;
            if taken.iter().any(|t| t.starts_with(&dir) || dir.starts_with(t)) {
                return Err(bad(at("path"), "another [[file]] or [[group]] writes the same path"));
            }
            taken.push(dir.clone());
            if raw_group.files.is_empty() {
                return Err(bad(at("file"), "a group needs at least one [[group.file]]"));
            }
            let mut members: Vec<FileSpec> = Vec::new();
            for (i, f) in raw_group.files.iter().enumerate() {
                let at = |field: &str| format!("group[{g}].file[{i}].{field}");
                let spec = parse_file(f, &at)?;
                if spec.path.to_string_lossy().starts_with("..") {
                    return Err(bad(at("path"), "names starting with `..` are the agent's own (`..data`)"));
                }
                if members.iter().any(|m| m.path.starts_with(&spec.path) || spec.path.starts_with(&m.path)) {
                    return Err(bad(at("path"), "another file of the group writes the same path"));
                }
                members.push(spec);
            }
            groups.push(GroupSpec { dir: raw.agent.dir.join(dir), files: members });
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
            groups,
        })
    }
}

const RELATIVE: &str = "must be a relative path inside agent.dir, without `..`";

fn relative(path: &str) -> Option<PathBuf> {
    let rel = Path::new(path);
    (!path.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)))).then(|| rel.to_owned())
}

/// One `[[file]]` (or `[[group.file]]`); `path` is left relative.
fn parse_file(f: &RawFile, at: &dyn Fn(&str) -> String) -> Result<FileSpec, ConfigError> {
    let bad = |path: String, message: &str| ConfigError { path, message: message.to_owned() };
    let path = relative(&f.path).ok_or_else(|| bad(at("path"), RELATIVE))?;
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
    Ok(FileSpec { path, selection, format: f.format, mode, owner: f.owner, group: f.group })
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

[[group]]
path = "tls"

[[group.file]]
path = "cert.pem"
name = "app/tls/cert"

[[group.file]]
path = "key.pem"
name = "app/tls/key"
"#;

    #[test]
    fn parses_and_validates() {
        let c = AgentConfig::parse(GOOD).unwrap();
        assert_eq!(c.files.len(), 2);
        assert_eq!(c.files[0].mode, 0o400);
        assert_eq!(c.files[1].mode, 0o440);
        assert_eq!(c.groups.len(), 1);
        assert_eq!(c.groups[0].dir, Path::new("/tmp/x/tls"));
        assert_eq!(c.groups[0].files[1].path, Path::new("key.pem"));
        let err = |text: &str| AgentConfig::parse(text).unwrap_err().to_string();
        assert!(err(&GOOD.replace("format = \"env\"", "format = \"yaml\"")).contains("yaml"));
        assert!(err(&GOOD.replace("\"0440\"", "\"999\"")).contains("file[1].mode"));
        assert!(err(&GOOD.replace("path = \"app.env\"", "path = \"../app.env\"")).contains("file[1].path"));
        assert!(
            err(&GOOD.replace("prefix = \"app/\"\nformat = \"env\"", "prefix = \"app/\"")).contains("file[1].format")
        );
        assert!(err(&GOOD.replace("dir = ", "dri = ")).contains("dri"));
        assert!(err("[agent]\ndir = \"/x\"\n").contains("file"));
        // Groups: their own paths, no `..` names, no overlap with single files.
        assert!(err(&GOOD.replace("path = \"tls\"", "path = \"app.env\"")).contains("group[0].path"));
        assert!(err(&GOOD.replace("path = \"key.pem\"", "path = \"..data\"")).contains("group[0].file[1].path"));
        assert!(err(&GOOD.replace("path = \"key.pem\"", "path = \"cert.pem\"")).contains("group[0].file[1].path"));
        assert!(err(&GOOD.replace("name = \"app/tls/key\"", "name = \"app/tls/key\"\nmode = \"8\""))
            .contains("group[0].file[1].mode"));
        assert!(err("[agent]\ndir = \"/x\"\n[[group]]\npath = \"g\"\n").contains("group[0].file"));
    }
}
