//! The edge of the write features: the `idempotency-key` metadata, the replay marker,
//! `WriteCredentials` conversion and its conflict status.

use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status};
use zeroize::Zeroizing;

use super::{caller, denied, timestamp};
use crate::auth::{Caller, Capability};
use crate::model::Metadata;
use crate::names::CredentialName;
use crate::proto;
use crate::vault::{BatchItem, IdempotencyKey, Replayed, Vault, VaultError, WriteConflict};

// The header names are the client library's, so the two cannot drift apart.
pub use crate::client::{IDEMPOTENCY_KEY_HEADER, REPLAY_HEADER, WRITE_CONFLICTS_TRAILER};

/// The request's idempotency key, if it names one, bound to its caller's token.
pub(crate) fn idempotency_key<T>(req: &Request<T>, c: &Caller) -> Result<Option<IdempotencyKey>, Status> {
    let Some(v) = req.metadata().get(IDEMPOTENCY_KEY_HEADER) else {
        return Ok(None);
    };
    let text = v.to_str().map_err(|_| Status::invalid_argument("idempotency key must be visible ASCII characters"))?;
    Ok(Some(IdempotencyKey::parse(&c.token_id, text)?))
}

/// A response, marked as a replay if it was answered from its idempotency key.
pub(crate) fn replay_marked<T>(message: T, replayed: bool) -> Response<T> {
    let mut response = Response::new(message);
    if replayed {
        response.metadata_mut().insert(REPLAY_HEADER, MetadataValue::from_static("1"));
    }
    response
}

/// ABORTED naming every conflict, with the conflicts also in a binary trailer.
fn conflicts_status(message: String, conflicts: &[WriteConflict]) -> Status {
    use prost::Message as _;
    let detail = proto::WriteConflicts {
        conflicts: conflicts
            .iter()
            .map(|c| proto::WriteConflict {
                name: c.name.clone(),
                expected_version: c.expected,
                current_version: c.current,
                deleted: c.deleted,
            })
            .collect(),
    };
    let mut metadata = MetadataMap::new();
    metadata.insert_bin(WRITE_CONFLICTS_TRAILER, tonic::metadata::MetadataValue::from_bytes(&detail.encode_to_vec()));
    Status::with_metadata(tonic::Code::Aborted, message, metadata)
}

/// One write of a `WriteCredentials` request, its value moved out (zeroized on drop).
struct Write {
    name: String,
    put: Option<(Zeroizing<Vec<u8>>, Option<Metadata>)>,
    expected: Option<u64>,
}

pub(crate) async fn write_credentials(
    vault: &Vault,
    mut req: Request<proto::WriteCredentialsRequest>,
) -> Result<Response<proto::WriteCredentialsResponse>, Status> {
    let c = caller(&req)?;
    let ctx = super::layers::audit::context(&req).cloned();
    // Values leave the messages first, so they are zeroized on every path.
    let raw = std::mem::take(&mut req.get_mut().writes);
    let mut writes = Vec::with_capacity(raw.len());
    for (i, w) in raw.into_iter().enumerate() {
        writes.push(match w.op {
            Some(proto::credential_write::Op::Put(mut p)) => {
                let value = Zeroizing::new(std::mem::take(&mut p.value));
                let metadata = p.metadata.map(super::credential::metadata_from).transpose()?;
                Write { name: p.name, put: Some((value, metadata)), expected: p.expected_version }
            }
            Some(proto::credential_write::Op::Delete(d)) => {
                Write { name: d.name, put: None, expected: d.expected_version }
            }
            None => return Err(Status::invalid_argument(format!("write {i} is neither a put nor a delete"))),
        });
    }
    if let Some(ctx) = &ctx {
        // One event per name, but never more than a valid batch has: an oversized
        // request (refused below) is one event listing its names, bounded.
        if writes.len() <= vault.limits().max_write_batch_size {
            let entries: Vec<(&str, Option<u64>)> = writes.iter().map(|w| (w.name.as_str(), None)).collect();
            ctx.set_entries(&entries);
        } else {
            let names: Vec<&str> = writes.iter().map(|w| w.name.as_str()).collect();
            ctx.set_credentials(&names);
        }
    }
    // All or nothing, permissions included: one write the caller may not make refuses all.
    for w in &writes {
        let cap = if w.put.is_some() { Capability::Write } else { Capability::Delete };
        if CredentialName::parse(&w.name, usize::MAX).is_ok() && !c.policy.allows(cap, &w.name) {
            return Err(denied(&c, cap, &w.name));
        }
    }
    let items: Vec<BatchItem<'_>> = writes
        .iter()
        .map(|w| match &w.put {
            Some((value, metadata)) => {
                BatchItem::Put { name: &w.name, value, expected: w.expected, metadata: metadata.as_ref() }
            }
            None => BatchItem::Delete { name: &w.name, expected: w.expected },
        })
        .collect();
    let key = idempotency_key(&req, &c)?;
    let written = match &key {
        Some(key) => vault.write_many_idempotent(key, &items).await,
        None => vault.write_many(&items).await.map(|outcome| Replayed { outcome, replayed: false }),
    };
    let (outcomes, replayed) = match written {
        Ok(o) => (o.outcome, o.replayed),
        Err(VaultError::WriteConflicts(conflicts)) => {
            let message = VaultError::WriteConflicts(conflicts.clone()).to_string();
            return Err(conflicts_status(message, &conflicts));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(ctx) = &ctx {
        let written: Vec<(&str, Option<u64>)> = outcomes.iter().map(|o| (o.name.as_str(), Some(o.version))).collect();
        ctx.set_entries(&written);
    }
    let message = proto::WriteCredentialsResponse {
        results: outcomes
            .into_iter()
            .map(|o| proto::CredentialWriteResult {
                name: o.name,
                version: o.version,
                deleted: o.deleted,
                at: Some(timestamp(o.at)),
            })
            .collect(),
    };
    Ok(replay_marked(message, replayed))
}

/// `write` capability: a rollback writes a new version, and only of a value that this
/// name held before (written by someone who could write it). The caller never sees the
/// value, so `read` is not needed; nor `rotate`, which also governs rotation policies.
pub(crate) async fn rollback_credential(
    vault: &Vault,
    req: Request<proto::RollbackCredentialRequest>,
) -> Result<Response<proto::RollbackCredentialResponse>, Status> {
    super::authorize(&req, Capability::Write, &req.get_ref().name)?;
    let r = req.get_ref();
    let out = vault.rollback(r.name.as_str(), r.to_version, r.expected_version).await?;
    super::audit_version(&req, out.version);
    Ok(Response::new(proto::RollbackCredentialResponse {
        name: out.name,
        version: out.version,
        to_version: out.restored,
        previous_version: out.previous_version,
        previous_expires_at: out.previous_expires_at.map(timestamp),
    }))
}

/// `write` capability, as for a put that carries metadata.
pub(crate) async fn update_credential_metadata(
    vault: &Vault,
    req: Request<proto::UpdateCredentialMetadataRequest>,
) -> Result<Response<proto::CredentialMetadata>, Status> {
    super::authorize(&req, Capability::Write, &req.get_ref().name)?;
    let r = req.into_inner();
    let expires_at = match (r.expires_at, r.clear_expires_at) {
        (Some(_), true) => return Err(Status::invalid_argument("expires_at and clear_expires_at exclude each other")),
        (Some(t), false) => Some(Some(super::from_timestamp(&t)?)),
        (None, true) => Some(None),
        (None, false) => None,
    };
    let patch = crate::vault::MetadataPatch {
        set_labels: r.set_labels.into_iter().collect(),
        remove_labels: r.remove_labels,
        description: r.description,
        owner: r.owner,
        expires_at,
    };
    let head = vault.update_metadata(r.name.as_str(), &patch, r.expected_metadata_version).await?;
    Ok(Response::new(super::credential::metadata_message(&head, &[])))
}
