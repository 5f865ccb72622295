//! Client subcommands other than `rotation` and `bench`: one call each through the
//! library client, printed.

use std::io::{IsTerminal as _, Write as _};

use super::conn::{connect, note_replayed, read_value, ts, ClientError};
use super::{AuditCommand, ClientCommand, TokenCommand};
use crate::client::{Capability, Metadata, PolicyRule, TokenSpec};

/// Runs one client subcommand, printing its result to stdout.
pub async fn run_client(cmd: ClientCommand) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match cmd {
        ClientCommand::Put {
            name,
            value_file,
            expected_version,
            keep_newline,
            description,
            owner,
            labels,
            idempotency_key,
            conn,
        } => {
            let value = read_value(value_file.as_deref(), keep_newline)?;
            let metadata = (description.is_some() || owner.is_some() || !labels.is_empty()).then(|| Metadata {
                labels: labels.into_iter().collect(),
                description: description.unwrap_or_default(),
                owner: owner.unwrap_or_default(),
                expires_at: None,
            });
            let c = connect(&conn).await?;
            let version = match idempotency_key {
                Some(key) => {
                    let w = c.put_idempotent_with(&key, &name, &value, expected_version, metadata.as_ref()).await?;
                    note_replayed(w.replayed);
                    w.version
                }
                None => c.put_with(&name, &value, expected_version, metadata.as_ref()).await?,
            };
            writeln!(out, "{name} version {version}")?;
        }
        ClientCommand::Get { name, version, conn } => {
            let c = connect(&conn).await?;
            let cred = c.get_version(&name, version).await?;
            out.write_all(cred.value.expose())?;
            if out.is_terminal() {
                writeln!(out)?;
            }
        }
        ClientCommand::Describe { name, conn } => {
            let c = connect(&conn).await?;
            let m = c.describe(&name).await?;
            writeln!(out, "name:            {}", m.name)?;
            writeln!(out, "current version: {}", m.current_version)?;
            if let Some(meta) = &m.metadata {
                writeln!(out, "description:     {}", meta.description)?;
                writeln!(out, "owner:           {}", meta.owner)?;
                for (k, v) in &meta.labels {
                    writeln!(out, "label:           {k}={v}")?;
                }
            }
            writeln!(out, "created:         {}", ts(m.created_at))?;
            writeln!(out, "updated:         {}", ts(m.updated_at))?;
            if m.deleted_at.is_some() {
                writeln!(out, "deleted:         {}", ts(m.deleted_at))?;
            }
            writeln!(out, "{:>8}  {:<10}  {:>4}  CREATED", "VERSION", "STATE", "KEK")?;
            for v in &m.versions {
                writeln!(out, "{:>8}  {:<10}  {:>4}  {}", v.version, v.state.as_str(), v.kek_id, ts(v.created_at))?;
            }
        }
        ClientCommand::List { prefix, deleted, older_than, rotation_overdue, conn } => {
            let c = connect(&conn).await?;
            let filter = crate::client::ListFilter { include_deleted: deleted, older_than, rotation_overdue };
            for m in c.list_where(&prefix, &filter).await? {
                let mark = if m.deleted_at.is_some() { "  (deleted)" } else { "" };
                writeln!(out, "{}\tv{}\t{}{mark}", m.name, m.current_version, ts(m.updated_at))?;
            }
        }
        ClientCommand::Delete { name, expected_version, idempotency_key, conn } => {
            let c = connect(&conn).await?;
            let version = match idempotency_key {
                Some(key) => {
                    let w = c.delete_idempotent(&key, &name, expected_version).await?;
                    note_replayed(w.replayed);
                    w.version
                }
                None => c.delete(&name, expected_version).await?,
            };
            writeln!(out, "{name} deleted at version {version}")?;
        }
        ClientCommand::Status { conn } => {
            let s = connect(&conn).await?.status().await?;
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
            writeln!(out, "started:         {}", ts(s.started_at))?;
        }
        ClientCommand::Token(cmd) => run_token(cmd, &mut out).await?,
        ClientCommand::Identity(cmd) => super::identity::run(cmd, &mut out).await?,
        ClientCommand::Rotation(cmd) => super::rotate::run(cmd, &mut out).await?,
        ClientCommand::Writes(cmd) => super::writes::run(cmd, &mut out).await?,
        ClientCommand::Bench(args) => super::bench::run(*args, &mut out).await?,
        ClientCommand::Audit(AuditCommand::Tail { lines, conn }) => {
            let events = connect(&conn).await?.audit_events(lines).await?;
            for e in events.iter().rev() {
                let version = if e.version > 0 { format!(" v{}", e.version) } else { String::new() };
                writeln!(
                    out,
                    "{}  {}  {:<16} {:<22} {:<18} {}{}  {}us  {}",
                    ts(e.at),
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

pub(super) fn capability(name: &str) -> Result<Capability, ClientError> {
    Capability::parse(name).ok_or_else(|| {
        ClientError::Usage(format!(
            "unknown capability {name:?}; use read, write, delete, list, rotate, destroy or admin"
        ))
    })
}

async fn run_token(cmd: TokenCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    match cmd {
        TokenCommand::Create { name, allow, deny, ttl_seconds, rate, conn } => {
            let mut rules = Vec::new();
            for ((pattern, caps), deny) in
                allow.into_iter().map(|r| (r, false)).chain(deny.into_iter().map(|r| (r, true)))
            {
                let capabilities = caps.iter().map(|c| capability(c)).collect::<Result<Vec<_>, _>>()?;
                rules.push(PolicyRule { pattern, capabilities, deny });
            }
            let spec = TokenSpec {
                display_name: name,
                rules,
                ttl: ttl_seconds.map(std::time::Duration::from_secs),
                rate_limit_per_second: rate.unwrap_or(0),
            };
            let created = connect(&conn).await?.create_token(&spec).await?;
            let id = created.info.as_ref().map(|i| i.id.clone()).unwrap_or_default();
            writeln!(out, "{}", created.token.as_str())?;
            eprintln!("token id {id}: shown only once, store it safely");
        }
        TokenCommand::List { conn } => {
            let tokens = connect(&conn).await?.list_tokens().await?;
            writeln!(out, "{:<12}  {:<20}  {:<9}  {:<27}  RULES", "ID", "NAME", "STATE", "EXPIRES")?;
            for t in &tokens {
                let state = if t.revoked_at.is_some() { "revoked" } else { "live" };
                let rules: Vec<String> = t
                    .rules
                    .iter()
                    .map(|rule| {
                        let caps: Vec<&str> = rule.capabilities.iter().map(|c| c.as_str()).collect();
                        format!("{}{}={}", if rule.deny { "!" } else { "" }, rule.pattern, caps.join(","))
                    })
                    .collect();
                writeln!(
                    out,
                    "{:<12}  {:<20}  {:<9}  {:<27}  {}",
                    t.id,
                    t.display_name,
                    state,
                    ts(t.expires_at),
                    rules.join(" ")
                )?;
            }
        }
        TokenCommand::Revoke { id, conn } => {
            connect(&conn).await?.revoke_token(&id).await?;
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
            assert_eq!(capability(name).unwrap().as_str(), name);
        }
        match capability("nuke") {
            Err(ClientError::Usage(m)) => assert!(m.contains("rotate, destroy or admin"), "{m}"),
            other => panic!("expected a usage error, got {other:?}"),
        }
    }
}
