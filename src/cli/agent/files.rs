//! Rendering credentials into files and replacing files atomically: one file by a
//! temporary file and a rename; a group of files by a fresh directory and one rename of
//! the `..data` link that points at it (the layout Kubernetes uses for secret volumes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::config::{AgentConfig, FileSpec, Format, Selection};
use crate::client::{CachingClient, Credential, Error};

/// The link a group's directory reads through; renamed over to switch versions.
pub const DATA_LINK: &str = "..data";

/// What one pass read: each name once, so every file of a pass (above all every member
/// of a group) is rendered from the same versions.
#[derive(Default)]
struct Snapshot {
    read: HashMap<String, Option<Arc<Credential>>>,
    listed: HashMap<String, Vec<String>>,
}

impl Snapshot {
    /// `None`: deleted (only between a listing and the read).
    async fn get(&mut self, cache: &CachingClient, name: &str, listed: bool) -> Result<Option<Arc<Credential>>, Error> {
        if let Some(c) = self.read.get(name) {
            return Ok(c.clone());
        }
        let c = match cache.get(name).await {
            Ok(c) => Some(c),
            Err(Error::NotFound(_)) if listed => None,
            Err(e) => return Err(e),
        };
        self.read.insert(name.to_owned(), c.clone());
        Ok(c)
    }

    async fn creds(&mut self, cache: &CachingClient, f: &FileSpec) -> Result<Vec<(String, Arc<Credential>)>, Error> {
        let mut out = Vec::new();
        match &f.selection {
            Selection::Names(ns) => {
                for n in ns {
                    if let Some(c) = self.get(cache, n, false).await? {
                        out.push((n.clone(), c));
                    }
                }
            }
            Selection::Prefix(p) => {
                let names = match self.listed.get(p) {
                    Some(names) => names.clone(),
                    None => {
                        let names = cache.client().list_names(p).await?;
                        self.listed.insert(p.clone(), names.clone());
                        names
                    }
                };
                for n in names {
                    if let Some(c) = self.get(cache, &n, true).await? {
                        out.push((n, c));
                    }
                }
            }
        }
        Ok(out)
    }

    async fn render(&mut self, cache: &CachingClient, f: &FileSpec) -> Result<Zeroizing<Vec<u8>>, Error> {
        let creds = self.creds(cache, f).await?;
        let strip = match &f.selection {
            Selection::Prefix(p) => p.as_str(),
            Selection::Names(_) => "",
        };
        render(f.format, strip, &creds).map_err(Error::InvalidArgument)
    }
}

/// Renders every file and group and replaces those whose content changed; returns how
/// many were replaced (a group counts once).
pub(super) async fn sync_files(
    config: &AgentConfig,
    cache: &CachingClient,
    written: &mut BTreeMap<PathBuf, Zeroizing<Vec<u8>>>,
) -> Result<usize, Error> {
    let mut changed = 0;
    let mut snap = Snapshot::default();
    for f in &config.files {
        let content = snap.render(cache, f).await?;
        if written.get(&f.path).is_some_and(|old| **old == *content) {
            continue;
        }
        write_atomic(&f.path, &content, f.mode, f.owner, f.group)
            .map_err(|e| Error::Config(format!("cannot write {}: {e}", f.path.display())))?;
        written.insert(f.path.clone(), content);
        changed += 1;
    }
    for g in &config.groups {
        let mut rendered = Vec::new();
        for f in &g.files {
            rendered.push((f, snap.render(cache, f).await?));
        }
        let same =
            rendered.iter().all(|(f, content)| written.get(&g.dir.join(&f.path)).is_some_and(|old| **old == **content));
        if same && g.dir.join(DATA_LINK).exists() {
            continue;
        }
        let members: Vec<Member<'_>> = rendered
            .iter()
            .map(|(f, content)| Member { path: &f.path, content, mode: f.mode, owner: f.owner, group: f.group })
            .collect();
        write_group(&g.dir, &members).map_err(|e| Error::Config(format!("cannot write {}: {e}", g.dir.display())))?;
        for (f, content) in rendered {
            written.insert(g.dir.join(&f.path), content);
        }
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

fn render(format: Format, strip: &str, creds: &[(String, Arc<Credential>)]) -> Result<Zeroizing<Vec<u8>>, String> {
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

/// Creates `path` (which must not exist) with exactly `mode`, writes and fsyncs it, then
/// sets its owner.
fn write_new(path: &Path, content: &[u8], mode: u32, owner: Option<u32>, group: Option<u32>) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    f.write_all(content)?;
    // The creation mode is filtered by the umask: set it exactly.
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    f.sync_all()?;
    if owner.is_some() || group.is_some() {
        std::os::unix::fs::fchown(&f, owner, group)?;
    }
    Ok(())
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
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{:016x}", rand::random::<u64>()));
    let result = (|| {
        write_new(&tmp, content, mode, owner, group)?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Runs the change hook through `sh -c`, waiting for it (so hooks never overlap).
/// One file of a group: its path inside the group's directory, content and ownership.
pub struct Member<'a> {
    pub path: &'a Path,
    pub content: &'a [u8],
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
}

/// Replaces a group of files at once. Every member is written (and fsynced) into a new
/// hidden version directory `dir/..<time>.<random>`; a link `..data_tmp` to it is renamed
/// over `dir/..data` (rename(2) is atomic, so `..data` names the old version or the new,
/// never neither); `dir/NAME` are links to `..data/NAME`, made once. Then every other
/// version directory (the previous one, and leftovers of an interrupted run) is removed.
///
/// A reader that resolves `..data` once and reads through the resolved directory sees one
/// version of every member, or (if it straddles a removal) a missing file, never a mix;
/// one that opens `dir/NAME` sees a complete file of some version.
pub fn write_group(dir: &Path, members: &[Member<'_>]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let version = format!("..{nanos}.{:08x}", rand::random::<u32>());
    let new = dir.join(&version);
    std::fs::DirBuilder::new().mode(0o755).create(&new)?;
    let filled = (|| {
        for m in members {
            let path = new.join(m.path);
            if let Some(parent) = path.parent() {
                std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
            }
            write_new(&path, m.content, m.mode, m.owner, m.group)?;
        }
        // The directory's mode is filtered by the umask too.
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(&new)?.sync_all()
    })();
    if let Err(e) = filled {
        let _ = std::fs::remove_dir_all(&new);
        return Err(e);
    }
    let tmp_link = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&version, &tmp_link)?;
    std::fs::rename(&tmp_link, dir.join(DATA_LINK))?;
    std::fs::File::open(dir)?.sync_all()?;

    // The names the application opens, through `..data`.
    let mut tops: Vec<&std::ffi::OsStr> = members.iter().filter_map(|m| m.path.iter().next()).collect();
    tops.sort();
    tops.dedup();
    for top in tops {
        let target = Path::new(DATA_LINK).join(top);
        let link = dir.join(top);
        if std::fs::read_link(&link).is_ok_and(|t| t == target) {
            continue;
        }
        if link.is_dir() && !link.is_symlink() {
            std::fs::remove_dir_all(&link)?;
        }
        let tmp = dir.join(format!("..link_tmp.{:08x}", rand::random::<u32>()));
        std::os::unix::fs::symlink(&target, &tmp)?;
        std::fs::rename(&tmp, &link)?;
    }
    std::fs::File::open(dir)?.sync_all()?;

    // Every other version directory goes.
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("..") && name != DATA_LINK && *name != *version {
            let path = entry.path();
            let removed =
                if entry.file_type()?.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
            if let Err(e) = removed {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove an old version directory");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_keys_and_quoting() {
        assert_eq!(env_key("app/db/password", "app/"), "DB_PASSWORD");
        assert_eq!(env_key("app/1st-key", "app/"), "_1ST_KEY");
    }

    #[test]
    fn a_group_swaps_its_directory_and_removes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let g = dir.path().join("tls");
        let write = |cert: &[u8], key: &[u8]| {
            let members = [
                Member { path: Path::new("cert.pem"), content: cert, mode: 0o444, owner: None, group: None },
                Member { path: Path::new("sub/key.pem"), content: key, mode: 0o400, owner: None, group: None },
            ];
            write_group(&g, &members).unwrap();
        };
        write(b"c1", b"k1");
        let first = std::fs::read_link(g.join(DATA_LINK)).unwrap();
        assert_eq!(std::fs::read(g.join("cert.pem")).unwrap(), b"c1");
        assert_eq!(std::fs::read(g.join("sub/key.pem")).unwrap(), b"k1");
        write(b"c2", b"k2");
        let second = std::fs::read_link(g.join(DATA_LINK)).unwrap();
        assert_ne!(first, second);
        assert!(!g.join(&first).exists(), "the old version directory is removed");
        assert_eq!(std::fs::read(g.join("cert.pem")).unwrap(), b"c2");
        assert_eq!(std::fs::read(g.join("sub/key.pem")).unwrap(), b"k2");
        let mut names: Vec<String> =
            std::fs::read_dir(&g).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut want =
            vec!["..data".to_owned(), second.to_string_lossy().into_owned(), "cert.pem".into(), "sub".into()];
        want.sort();
        assert_eq!(names, want);
    }
}
