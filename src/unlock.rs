//! Start-up key handling: turns the operator's passphrase or key file into an unlocked
//! [`KeyRing`], creating the keyring on a new database.
//!
//! **Invariant:** the master key is never written to the database; only a verifier and
//! the KEKs it wraps are. A key file is the operator's to keep, like a passphrase.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rand::RngCore;
use secrecy::SecretString;
use zeroize::Zeroizing;

use crate::crypto::{CryptoError, KdfParams, Kek, KeyRing, MasterKey, KEY_LEN};
use crate::store::{now_micros, KekRow, KekState, KeyringRow, MasterKeySource, Store, StoreError};

/// Where the master key comes from.
pub enum MasterKeySpec {
    Passphrase {
        passphrase: SecretString,
        params: KdfParams,
    },
    /// A 32-byte key (raw, or 64 hex characters); generated on first start if `create`.
    /// An existing file that group or others may access is refused unless
    /// `allow_insecure_permissions`.
    KeyFile {
        path: PathBuf,
        create: bool,
        allow_insecure_permissions: bool,
    },
}

impl std::fmt::Debug for MasterKeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterKeySpec::Passphrase { params, .. } => {
                f.debug_struct("Passphrase").field("passphrase", &"REDACTED").field("params", params).finish()
            }
            MasterKeySpec::KeyFile { path, create, allow_insecure_permissions } => f
                .debug_struct("KeyFile")
                .field("path", path)
                .field("create", create)
                .field("allow_insecure_permissions", allow_insecure_permissions)
                .finish(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error("wrong master key: this database was initialised with a different {0}")]
    WrongKey(&'static str),
    #[error("this database was initialised with a {expected} master key, but a {given} was configured")]
    SourceMismatch { expected: &'static str, given: &'static str },
    #[error("master key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error(transparent)]
    InsecureFile(#[from] InsecureFile),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("key derivation task failed: {0}")]
    Join(String),
}

/// Unlocks the database's keys, initialising the keyring (and first KEK) if it has none.
pub async fn unlock(store: &dyn Store, spec: &MasterKeySpec) -> Result<KeyRing, UnlockError> {
    let master = match store.load_keyring().await? {
        Some(k) => open_existing(&k, spec).await?,
        None => match initialise(store, spec).await? {
            Some(master) => master,
            // Another daemon initialised the database between our read and our write:
            // unlock what it stored.
            None => {
                let k = store.load_keyring().await?.ok_or_else(|| StoreError::Corrupt("keyring vanished".into()))?;
                open_existing(&k, spec).await?
            }
        },
    };
    load_keks(store, master).await
}

async fn open_existing(k: &KeyringRow, spec: &MasterKeySpec) -> Result<MasterKey, UnlockError> {
    let given = match spec {
        MasterKeySpec::Passphrase { .. } => MasterKeySource::Passphrase,
        MasterKeySpec::KeyFile { .. } => MasterKeySource::KeyFile,
    };
    if k.source != given {
        return Err(UnlockError::SourceMismatch { expected: k.source.as_str(), given: given.as_str() });
    }
    let master = match spec {
        MasterKeySpec::Passphrase { passphrase, .. } => {
            let (salt, params) =
                k.kdf.clone().ok_or_else(|| StoreError::Corrupt("passphrase keyring without KDF parameters".into()))?;
            derive(passphrase.clone(), salt, params).await?
        }
        MasterKeySpec::KeyFile { path, allow_insecure_permissions, .. } => {
            read_key_file(path, *allow_insecure_permissions)?
        }
    };
    master.check_verifier(&k.verifier).map_err(|_| UnlockError::WrongKey(given_noun(given)))?;
    Ok(master)
}

fn given_noun(s: MasterKeySource) -> &'static str {
    match s {
        MasterKeySource::Passphrase => "passphrase",
        MasterKeySource::KeyFile => "key file",
    }
}

async fn initialise(store: &dyn Store, spec: &MasterKeySpec) -> Result<Option<MasterKey>, UnlockError> {
    let (master, source, kdf) = match spec {
        MasterKeySpec::Passphrase { passphrase, params } => {
            let mut salt = vec![0u8; 16];
            rand::rng().fill_bytes(&mut salt);
            let master = derive(passphrase.clone(), salt.clone(), *params).await?;
            (master, MasterKeySource::Passphrase, Some((salt, *params)))
        }
        MasterKeySpec::KeyFile { path, create, allow_insecure_permissions } => {
            let master = if *create && !path.exists() {
                create_key_file(path)?
            } else {
                read_key_file(path, *allow_insecure_permissions)?
            };
            (master, MasterKeySource::KeyFile, None)
        }
    };
    let now = now_micros();
    let (_, wrapped) = Kek::generate(1, &master)?;
    let keyring = KeyringRow { source, kdf, verifier: master.make_verifier()?, created_at: now };
    let kek = KekRow { id: 1, wrapped_key: wrapped, state: KekState::Active, created_at: now };
    Ok(store.init_keyring(&keyring, &kek).await?.then_some(master))
}

async fn load_keks(store: &dyn Store, master: MasterKey) -> Result<KeyRing, UnlockError> {
    let rows = store.list_keks().await?;
    let mut keks = Vec::with_capacity(rows.len());
    let mut active = None;
    for row in &rows {
        if row.state == KekState::Active {
            active = Some(row.id);
        }
        keks.push(Kek::unwrap(row.id, &row.wrapped_key, &master)?);
    }
    let active = active.ok_or_else(|| StoreError::Corrupt("no active KEK".into()))?;
    Ok(KeyRing::new(master, keks, active)?)
}

/// Argon2id is deliberately slow: keep it off the async workers.
pub(crate) async fn derive(
    passphrase: SecretString,
    salt: Vec<u8>,
    params: KdfParams,
) -> Result<MasterKey, UnlockError> {
    tokio::task::spawn_blocking(move || MasterKey::derive(&passphrase, &salt, params))
        .await
        .map_err(|e| UnlockError::Join(e.to_string()))?
        .map_err(UnlockError::from)
}

fn key_file_error(path: &Path, reason: impl std::fmt::Display) -> UnlockError {
    UnlockError::KeyFile { path: path.to_owned(), reason: reason.to_string() }
}

/// A key or passphrase file that group or others may access.
#[derive(Debug, thiserror::Error)]
#[error(
    "{what} {} is accessible by group or others (mode {mode:04o}); it must be private to its owner: \
     run `chmod 600 {}`, or start with --allow-insecure-key-permissions to accept it",
    path.display(),
    path.display()
)]
pub struct InsecureFile {
    pub what: &'static str,
    pub path: PathBuf,
    pub mode: u32,
}

/// Refuses a secret file whose permission bits grant anything to group or others (as
/// ssh does for private keys); with `allow` it is accepted with a warning. A file that
/// cannot be inspected is left to the read that follows, which reports why.
pub fn check_private_file(path: &Path, what: &'static str, allow: bool) -> Result<(), InsecureFile> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let Ok(meta) = std::fs::metadata(path) else { return Ok(()) };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let err = InsecureFile { what, path: path.to_owned(), mode };
            if !allow {
                return Err(err);
            }
            tracing::warn!(path = %path.display(), mode = format!("{mode:04o}"), "{what} is accessible by group or others; accepted because insecure key permissions are allowed");
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what, allow);
    Ok(())
}

/// Reads a key file: exactly 32 raw bytes, or 64 hex characters (surrounding whitespace
/// ignored). A file group or others may access is refused unless `allow_insecure`.
pub fn read_key_file(path: &Path, allow_insecure: bool) -> Result<MasterKey, UnlockError> {
    check_private_file(path, "master key file", allow_insecure)?;
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| key_file_error(path, e))?);
    if raw.len() == KEY_LEN {
        return Ok(MasterKey::from_bytes(&raw)?);
    }
    let text =
        std::str::from_utf8(&raw).map_err(|_| key_file_error(path, "must hold 32 raw bytes or 64 hex characters"))?;
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    hex::decode_to_slice(text.trim(), key.as_mut())
        .map_err(|_| key_file_error(path, "must hold 32 raw bytes or 64 hex characters"))?;
    Ok(MasterKey::from_bytes(key.as_ref())?)
}

/// Creates the data directory readable by its owner only (it holds the database and,
/// by default, the master key file). An existing directory keeps its permissions.
pub(crate) fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Creates a new random key file, readable by its owner only.
fn create_key_file(path: &Path) -> Result<MasterKey, UnlockError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rand::rng().fill_bytes(key.as_mut());
    let text = Zeroizing::new(format!("{}\n", hex::encode(key.as_ref())));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_private_dir(dir).map_err(|e| key_file_error(path, e))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| key_file_error(path, e))?;
    file.write_all(text.as_bytes()).and_then(|_| file.sync_all()).map_err(|e| key_file_error(path, e))?;
    tracing::info!(path = %path.display(), "generated a new master key file; back it up: without it the data cannot be read");
    Ok(MasterKey::from_bytes(key.as_ref())?)
}

/// Environment variables that carry secrets. `serve` reads what it needs from them and
/// then removes them (see [`scrub_environment`]); a client command keeps its token.
pub const SECRET_ENV_VARS: &[&str] = &[
    "CREDVAULT_PASSPHRASE",
    "CREDVAULT_DATABASE_URL",
    "CREDVAULT_TOKEN",
    "CREDVAULT_OLD_PASSPHRASE",
    "CREDVAULT_NEW_PASSPHRASE",
    "PGPASSWORD",
];

/// Removes `names` from the process environment and overwrites their values where the
/// kernel shows them (`/proc/<pid>/environ` reads the original environment block, which
/// `unsetenv` leaves untouched). Returns the names that were present.
///
/// Call it while the process has one thread (before the async runtime starts): the C
/// environment is not synchronised, and no other thread may read it meanwhile.
pub fn scrub_environment(names: &[&str]) -> Vec<String> {
    let present: Vec<String> = names.iter().filter(|n| std::env::var_os(n).is_some()).map(|n| n.to_string()).collect();
    #[cfg(unix)]
    // SAFETY: `environ` is the C library's NULL-terminated array of NUL-terminated
    // strings. We only read the array and overwrite bytes strictly before each matching
    // string's terminating NUL, so every string stays valid (it becomes `NAME=`). The
    // caller guarantees no other thread touches the environment meanwhile.
    unsafe {
        extern "C" {
            static mut environ: *mut *mut std::ffi::c_char;
        }
        let mut entry = environ;
        while !entry.is_null() && !(*entry).is_null() {
            let bytes = std::ffi::CStr::from_ptr(*entry).to_bytes();
            if let Some(eq) = bytes.iter().position(|b| *b == b'=') {
                if names.iter().any(|n| n.as_bytes() == &bytes[..eq]) {
                    let value = (*entry).cast::<u8>().add(eq + 1);
                    std::ptr::write_bytes(value, 0, bytes.len() - eq - 1);
                }
            }
            entry = entry.add(1);
        }
    }
    for name in &present {
        std::env::remove_var(name);
    }
    present
}
