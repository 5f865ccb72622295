//! Client subcommands other than `rotation` and `bench`: one gRPC call each, printed.

use std::io::{IsTerminal as _, Write as _};

use super::conn::{connect, read_value, ts, ClientError};
use super::{AuditCommand, ClientCommand, TokenCommand};
use crate::proto::{self, VersionState};

fn state_name(state: i32) -> &'static str {
    match VersionState::try_from(state) {
        Ok(VersionState::Current) => "current",
        Ok(VersionState::Previous) => "previous",
        Ok(VersionState::Deprecated) => "deprecated",
        Ok(VersionState::Destroyed) => "destroyed",
        _ => "unknown",
    }
}

/// Runs one client subcommand, printing its result to stdout.
pub async fn run_client(cmd: ClientCommand) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ClientCommand::Put { name, value_file, expected_version, keep_newline, description, owner, labels, conn } => {
            let value = read_value(value_file.as_deref(), keep_newline)?;
            let metadata = (description.is_some() || owner.is_some() || !labels.is_empty()).then(|| proto::Metadata {
                labels: labels.into_iter().collect(),
                description: description.unwrap_or_default(),
                owner: owner.unwrap_or_default(),
                expires_at: None,
            });
            let (mut c, _) = connect(&conn).await?;
            let r = c
                .put_credential(proto::PutCredentialRequest { name, value: value.to_vec(), expected_version, metadata })
                .await?
                .into_inner();
            writeln!(out, "{} version {}", r.name, r.version)?;
        }
        ClientCommand::Get { name, version, conn } => {
            let (mut c, _) = connect(&conn).await?;
            let r = c.get_credential(proto::GetCredentialRequest { name, version }).await?.into_inner();
            let value = zeroize::Zeroizing::new(r.value);
            out.write_all(&value)?;
            if out.is_terminal() {
                writeln!(out)?;
            }
        }
        ClientCommand::Describe { name, conn } => {
            let (mut c, _) = connect(&conn).await?;
            let m = c.get_credential_metadata(proto::GetCredentialMetadataRequest { name }).await?.into_inner();
            writeln!(out, "name:            {}", m.name)?;
            writeln!(out, "current version: {}", m.current_version)?;
            if let Some(meta) = &m.metadata {
                writeln!(out, "description:     {}", meta.description)?;
                writeln!(out, "owner:           {}", meta.owner)?;
                for (k, v) in &meta.labels {
                    writeln!(out, "label:           {k}={v}")?;
                }
            }
            writeln!(out, "created:         {}", ts(&m.created_at))?;
            writeln!(out, "updated:         {}", ts(&m.updated_at))?;
            if m.deleted_at.is_some() {
                writeln!(out, "deleted:         {}", ts(&m.deleted_at))?;
            }
            writeln!(out, "{:>8}  {:<10}  {:>4}  CREATED", "VERSION", "STATE", "KEK")?;
            for v in &m.versions {
                writeln!(out, "{:>8}  {:<10}  {:>4}  {}", v.version, state_name(v.state), v.kek_id, ts(&v.created_at))?;
            }
        }
        ClientCommand::List { prefix, deleted, conn } => {
            let (mut c, _) = connect(&conn).await?;
            let mut page_token = String::new();
            loop {
                let r = c
                    .list_credentials(proto::ListCredentialsRequest {
                        prefix: prefix.clone(),
                        page_size: 0,
                        page_token,
                        include_deleted: deleted,
                    })
                    .await?
                    .into_inner();
                for m in &r.credentials {
                    let mark = if m.deleted_at.is_some() { "  (deleted)" } else { "" };
                    writeln!(out, "{}\tv{}\t{}{mark}", m.name, m.current_version, ts(&m.updated_at))?;
                }
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
        }
        ClientCommand::Delete { name, expected_version, conn } => {
            let (mut c, _) = connect(&conn).await?;
            let r = c.delete_credential(proto::DeleteCredentialRequest { name, expected_version }).await?.into_inner();
            writeln!(out, "{} deleted at version {}", r.name, r.version)?;
        }
        ClientCommand::Status { conn } => {
            let (_, mut a) = connect(&conn).await?;
            let s = a.get_status(proto::GetStatusRequest {}).await?.into_inner();
            writeln!(out, "version:         {}", s.version)?;
            writeln!(
                out,
                "storage:         {} ({})",
                s.storage_backend,
                if s.storage_healthy { "healthy" } else { "UNHEALTHY" }
            )?;
            writeln!(out, "master key:      {}", s.master_key_source)?;
            writeln!(out, "active KEK:      {}", s.active_kek_id)?;
            writeln!(out, "credentials:     {}", s.credentials)?;
            writeln!(out, "started:         {}", ts(&s.started_at))?;
        }
        ClientCommand::Token(cmd) => run_token(cmd, &mut out).await?,
        ClientCommand::Rotation(cmd) => super::rotate::run(cmd, &mut out).await?,
        ClientCommand::Writes(cmd) => super::writes::run(cmd, &mut out).await?,
        ClientCommand::Bench(args) => super::bench::run(*args, &mut out).await?,
        ClientCommand::Audit(AuditCommand::Tail { lines, conn }) => {
            let (_, mut a) = connect(&conn).await?;
            let r = a.list_audit_events(proto::ListAuditEventsRequest { limit: lines }).await?.into_inner();
            for e in r.events.iter().rev() {
                let version = if e.version > 0 { format!(" v{}", e.version) } else { String::new() };
                writeln!(
                    out,
                    "{}  {}  {:<16} {:<22} {:<18} {}{}  {}us  {}",
                    ts(&e.at),
                    e.request_id,
                    if e.token_name.is_empty() { "-" } else { &e.token_name },
                    e.rpc,
                    e.code,
                    if e.credential.is_empty() { "-" } else { &e.credential },
                    version,
                    e.latency_us,
                    e.peer
                )?;
            }
        }
    }
    Ok(())
}

fn capability(name: &str) -> Result<i32, ClientError> {
    let c = match name {
        "read" => proto::Capability::Read,
        "write" => proto::Capability::Write,
        "delete" => proto::Capability::Delete,
        "list" => proto::Capability::List,
        "rotate" => proto::Capability::Rotate,
        "admin" => proto::Capability::Admin,
        "destroy" => proto::Capability::Destroy,
        other => {
            return Err(ClientError::Usage(format!(
                "unknown capability {other:?}; use read, write, delete, list, rotate, destroy or admin"
            )))
        }
    };
    Ok(c as i32)
}

fn capability_name(v: i32) -> &'static str {
    match proto::Capability::try_from(v) {
        Ok(proto::Capability::Read) => "read",
        Ok(proto::Capability::Write) => "write",
        Ok(proto::Capability::Delete) => "delete",
        Ok(proto::Capability::List) => "list",
        Ok(proto::Capability::Rotate) => "rotate",
        Ok(proto::Capability::Admin) => "admin",
        Ok(proto::Capability::Destroy) => "destroy",
        _ => "?",
    }
}

async fn run_token(cmd: TokenCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    match cmd {
        TokenCommand::Create { name, allow, deny, ttl_seconds, rate, conn } => {
            let mut rules = Vec::new();
            for ((pattern, caps), deny) in
                allow.into_iter().map(|r| (r, false)).chain(deny.into_iter().map(|r| (r, true)))
            {
                let capabilities = caps.iter().map(|c| capability(c)).collect::<Result<Vec<_>, _>>()?;
                rules.push(proto::PolicyRule { pattern, capabilities, deny });
            }
            let (_, mut a) = connect(&conn).await?;
            let r = a
                .create_token(proto::CreateTokenRequest {
                    display_name: name,
                    rules,
                    ttl: ttl_seconds
                        .map(|s| prost_types::Duration { seconds: i64::try_from(s).unwrap_or(i64::MAX), nanos: 0 }),
                    rate_limit_per_second: rate.unwrap_or(0),
                })
                .await?
                .into_inner();
            let id = r.info.as_ref().map(|i| i.id.clone()).unwrap_or_default();
            writeln!(out, "{}", r.token)?;
            eprintln!("token id {id}: shown only once, store it safely");
        }
        TokenCommand::List { conn } => {
            let (_, mut a) = connect(&conn).await?;
            let r = a.list_tokens(proto::ListTokensRequest {}).await?.into_inner();
            writeln!(out, "{:<12}  {:<20}  {:<9}  {:<27}  RULES", "ID", "NAME", "STATE", "EXPIRES")?;
            for t in &r.tokens {
                let state = if t.revoked_at.is_some() { "revoked" } else { "live" };
                let rules: Vec<String> = t
                    .rules
                    .iter()
                    .map(|rule| {
                        let caps: Vec<&str> = rule.capabilities.iter().map(|c| capability_name(*c)).collect();
                        format!("{}{}={}", if rule.deny { "!" } else { "" }, rule.pattern, caps.join(","))
                    })
                    .collect();
                writeln!(
                    out,
                    "{:<12}  {:<20}  {:<9}  {:<27}  {}",
                    t.id,
                    t.display_name,
                    state,
                    ts(&t.expires_at),
                    rules.join(" ")
                )?;
            }
        }
        TokenCommand::Revoke { id, conn } => {
            let (_, mut a) = connect(&conn).await?;
            a.revoke_token(proto::RevokeTokenRequest { id: id.clone() }).await?;
            writeln!(out, "revoked {id}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_parse_and_print_both_ways() {
        for name in ["read", "write", "delete", "list", "rotate", "destroy", "admin"] {
            assert_eq!(capability_name(capability(name).unwrap()), name);
        }
        match capability("nuke") {
            Err(ClientError::Usage(m)) => assert!(m.contains("rotate, destroy or admin"), "{m}"),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }
}
