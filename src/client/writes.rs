//! Safe retries and all-or-nothing writes: idempotent put, delete and rotate, and
//! [`Client::write_many`].
//!
//! With an idempotency key the client's own retries (after UNAVAILABLE or a timeout) are
//! safe for every write: a retry of an attempt that did commit gets that attempt's answer
//! from the daemon instead of writing again or reporting a conflict.

use prost::Message as _;
use tonic::metadata::MetadataValue;

use super::{timed, Client, Error, Metadata, RotateOptions, Rotated, RotationSource, SecretValue};
use crate::proto;

/// Request metadata naming a write's idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Response metadata of a write answered from its idempotency key.
pub const REPLAY_HEADER: &str = "credvault-idempotent-replay";
/// Trailer of an ABORTED `WriteCredentials` holding the encoded [`proto::WriteConflicts`].
pub const WRITE_CONFLICTS_TRAILER: &str = "credvault-write-conflicts-bin";

/// A fresh random idempotency key (32 hex digits).
pub fn new_idempotency_key() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// What a keyed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// The version written (a delete: the version deleted at).
    pub version: u64,
    /// The daemon answered from the key: an earlier attempt of this request wrote it.
    pub replayed: bool,
}

/// One write of [`Client::write_many`].
#[derive(Clone, PartialEq, Eq)]
pub enum BatchWrite {
    Put { name: String, value: Vec<u8>, expected_version: Option<u64> },
    Delete { name: String, expected_version: Option<u64> },
}

impl std::fmt::Debug for BatchWrite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchWrite::Put { name, expected_version, .. } => f
                .debug_struct("Put")
                .field("name", name)
                .field("expected_version", expected_version)
                .field("value", &"REDACTED")
                .finish(),
            BatchWrite::Delete { name, expected_version } => {
                f.debug_struct("Delete").field("name", name).field("expected_version", expected_version).finish()
            }
        }
    }
}

impl Drop for BatchWrite {
    fn drop(&mut self) {
        if let BatchWrite::Put { value, .. } = self {
            zeroize::Zeroize::zeroize(value);
        }
    }
}

/// One applied write of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchWritten {
    pub name: String,
    pub version: u64,
    pub deleted: bool,
}

/// A write of a batch whose expected version did not match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConflict {
    pub name: String,
    /// What the write expected (0: that it did not exist).
    pub expected_version: u64,
    /// The current version (`None`: no such credential).
    pub current_version: Option<u64>,
    pub deleted: bool,
}

/// What [`Client::rollback`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RolledBack {
    /// The new current version, holding the value of `to_version`.
    pub version: u64,
    pub to_version: u64,
    /// The version it replaced (readable for its grace period).
    pub previous_version: u64,
}

/// How [`Client::write_many`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Every write was applied, in request order.
    Applied(Vec<BatchWritten>),
    /// None was: these writes conflicted.
    Conflicts(Vec<BatchConflict>),
}

fn keyed<T>(
    message: T,
    timeout: std::time::Duration,
    key: &MetadataValue<tonic::metadata::Ascii>,
) -> tonic::Request<T> {
    let mut req = timed(message, timeout);
    req.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, key.clone());
    req
}

fn key_value(key: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, Error> {
    key.parse().map_err(|_| Error::InvalidArgument("idempotency key must be visible ASCII characters".into()))
}

fn replayed<T>(r: &tonic::Response<T>) -> bool {
    r.metadata().get(REPLAY_HEADER).is_some()
}

impl Client {
    /// [`Client::put`] under an idempotency key: retrying it (here or after a restart,
    /// against any daemon of the same database, within the daemon's window, 24 h by
    /// default) gives the first result. Reusing the key for another request is
    /// [`Error::FailedPrecondition`].
    pub async fn put_idempotent(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
        expected_version: Option<u64>,
    ) -> Result<Written, Error> {
        self.put_idempotent_with(key, name, value, expected_version, None).await
    }

    /// [`Client::put_idempotent`] that also sets the credential's metadata, as
    /// [`Client::put_with`] does.
    pub async fn put_idempotent_with(
        &self,
        key: &str,
        name: &str,
        value: &[u8],
        expected_version: Option<u64>,
        metadata: Option<&Metadata>,
    ) -> Result<Written, Error> {
        let key = key_value(key)?;
        let metadata = metadata.map(Metadata::to_proto);
        let r = self
            .unary(|mut c, t| {
                let message = proto::PutCredentialRequest {
                    name: name.to_owned(),
                    value: value.to_vec(),
                    expected_version,
                    metadata: metadata.clone(),
                };
                let req = keyed(message, t, &key);
                async move { c.put_credential(req).await }
            })
            .await?;
        Ok(Written { version: r.get_ref().version, replayed: replayed(&r) })
    }

    /// [`Client::delete`] under an idempotency key.
    pub async fn delete_idempotent(
        &self,
        key: &str,
        name: &str,
        expected_version: Option<u64>,
    ) -> Result<Written, Error> {
        let key = key_value(key)?;
        let message = proto::DeleteCredentialRequest { name: name.to_owned(), expected_version };
        let r = self
            .unary(|mut c, t| {
                let req = keyed(message.clone(), t, &key);
                async move { c.delete_credential(req).await }
            })
            .await?;
        Ok(Written { version: r.get_ref().version, replayed: replayed(&r) })
    }

    /// [`Client::rotate`] under an idempotency key; a replay generates nothing new.
    pub async fn rotate_idempotent(
        &self,
        key: &str,
        name: &str,
        value: Option<&[u8]>,
    ) -> Result<(Rotated, bool), Error> {
        let source = value.map(|v| RotationSource::Value(SecretValue::new(v.to_vec())));
        self.rotate_idempotent_with(key, name, &RotateOptions { source, ..RotateOptions::default() }).await
    }

    /// [`Client::rotate_with`] under an idempotency key: the rotation and whether it was
    /// answered from the key (an earlier attempt rotated; nothing was generated now).
    pub async fn rotate_idempotent_with(
        &self,
        key: &str,
        name: &str,
        options: &RotateOptions,
    ) -> Result<(Rotated, bool), Error> {
        let key = key_value(key)?;
        let message = options.to_proto(name);
        let r = self
            .unary_admin(|mut c, t| {
                let req = keyed(message.clone(), t, &key);
                async move { c.rotate_credential(req).await }
            })
            .await?;
        let again = replayed(&r);
        Ok((Rotated::from_proto(r.into_inner()), again))
    }

    /// Makes the value of `to_version` the new current version of `name` (with
    /// `expected_version`: only if the current version is still that), without reading it.
    pub async fn rollback(
        &self,
        name: &str,
        to_version: u64,
        expected_version: Option<u64>,
    ) -> Result<RolledBack, Error> {
        let message = proto::RollbackCredentialRequest { name: name.to_owned(), to_version, expected_version };
        let r = self
            .unary(|mut c, t| {
                let req = timed(message.clone(), t);
                async move { c.rollback_credential(req).await }
            })
            .await?
            .into_inner();
        Ok(RolledBack { version: r.version, to_version: r.to_version, previous_version: r.previous_version })
    }

    /// Patches the labels of `name` (set some, remove some, keep the rest) and, when
    /// given, its description and owner; with `expected_metadata_version` only at that
    /// metadata version ([`Error::Other`] with ABORTED otherwise). Returns the new
    /// metadata version; the value's version does not change.
    pub async fn update_metadata(
        &self,
        name: &str,
        set_labels: &[(String, String)],
        remove_labels: &[String],
        description: Option<&str>,
        owner: Option<&str>,
        expected_metadata_version: Option<u64>,
    ) -> Result<u64, Error> {
        let message = proto::UpdateCredentialMetadataRequest {
            name: name.to_owned(),
            expected_metadata_version,
            set_labels: set_labels.iter().cloned().collect(),
            remove_labels: remove_labels.to_vec(),
            description: description.map(str::to_owned),
            owner: owner.map(str::to_owned),
            expires_at: None,
            clear_expires_at: false,
        };
        let r = self
            .unary(|mut c, t| {
                let req = timed(message.clone(), t);
                async move { c.update_credential_metadata(req).await }
            })
            .await?;
        Ok(r.into_inner().metadata_version)
    }

    /// Applies every write in one transaction, or none: a conflict is
    /// [`BatchOutcome::Conflicts`] naming every write that conflicted. Like an
    /// unconditional put, a batch retried after UNAVAILABLE may apply twice: one attempt
    /// only. [`Client::write_many_idempotent`] is safe to retry.
    pub async fn write_many(&self, writes: &[BatchWrite]) -> Result<BatchOutcome, Error> {
        let message = batch_message(writes);
        let mut c = self.creds.clone();
        let call = c.write_credentials(timed(message, self.timeout));
        let r = match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => return Err(Error::Timeout(format!("no answer to WriteCredentials within {:?}", self.timeout))),
        };
        match r {
            Ok(r) => Ok(applied(r.into_inner())),
            Err(s) => match conflicts_of(&s) {
                Some(conflicts) => Ok(BatchOutcome::Conflicts(conflicts)),
                None => Err(Error::from_status(&s)),
            },
        }
    }

    /// [`Client::write_many`] under an idempotency key, with the client's retries: a
    /// retry of an attempt that committed gets that attempt's results (the `bool`: the
    /// answer came from the key) and writes nothing.
    pub async fn write_many_idempotent(&self, key: &str, writes: &[BatchWrite]) -> Result<(BatchOutcome, bool), Error> {
        let key = key_value(key)?;
        let message = batch_message(writes);
        let r = self
            .unary(|mut c, t| {
                let req = keyed(message.clone(), t, &key);
                async move {
                    match c.write_credentials(req).await {
                        Ok(r) => Ok(r.map(Ok)),
                        // Conflicts are an answer, not an error to retry.
                        Err(s) => match conflicts_of(&s) {
                            Some(conflicts) => Ok(tonic::Response::new(Err(conflicts))),
                            None => Err(s),
                        },
                    }
                }
            })
            .await?;
        let again = replayed(&r);
        Ok(match r.into_inner() {
            Ok(done) => (applied(done), again),
            Err(conflicts) => (BatchOutcome::Conflicts(conflicts), false),
        })
    }
}

fn batch_message(writes: &[BatchWrite]) -> proto::WriteCredentialsRequest {
    proto::WriteCredentialsRequest {
        writes: writes
            .iter()
            .map(|w| proto::CredentialWrite {
                op: Some(match w {
                    BatchWrite::Put { name, value, expected_version } => {
                        proto::credential_write::Op::Put(proto::PutCredentialRequest {
                            name: name.clone(),
                            value: value.clone(),
                            expected_version: *expected_version,
                            metadata: None,
                        })
                    }
                    BatchWrite::Delete { name, expected_version } => {
                        proto::credential_write::Op::Delete(proto::DeleteCredentialRequest {
                            name: name.clone(),
                            expected_version: *expected_version,
                        })
                    }
                }),
            })
            .collect(),
    }
}

fn applied(r: proto::WriteCredentialsResponse) -> BatchOutcome {
    BatchOutcome::Applied(
        r.results.into_iter().map(|w| BatchWritten { name: w.name, version: w.version, deleted: w.deleted }).collect(),
    )
}

/// The conflicts an ABORTED `WriteCredentials` names in its trailer.
fn conflicts_of(s: &tonic::Status) -> Option<Vec<BatchConflict>> {
    if s.code() != tonic::Code::Aborted {
        return None;
    }
    let detail = s.metadata().get_bin(WRITE_CONFLICTS_TRAILER).and_then(|v| v.to_bytes().ok())?;
    let d = proto::WriteConflicts::decode(detail).ok()?;
    Some(
        d.conflicts
            .into_iter()
            .map(|c| BatchConflict {
                name: c.name,
                expected_version: c.expected_version,
                current_version: c.current_version,
                deleted: c.deleted,
            })
            .collect(),
    )
}
