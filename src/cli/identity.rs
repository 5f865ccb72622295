//! `credvault identity bind|list|unbind`: workload identities (the URI SAN or CN of an
//! mTLS client certificate) bound to policies.

use clap::Subcommand;

use super::client::{capability, capability_name};
use super::conn::{connect, ts, ClientError};
use super::{parse_rule, Connection};
use crate::proto;

#[derive(Debug, Clone, Subcommand)]
pub enum IdentityCommand {
    /// Bind a certificate identity to rules: a client presenting a certificate with this
    /// identity (its URI SAN, else its subject CN) needs no token.
    Bind {
        /// e.g. spiffe://example.org/ns/payments/sa/api
        identity: String,
        /// PATTERN=CAP[,CAP...], as `token create --allow` takes it; repeat for more rules.
        #[arg(long = "allow", value_parser = parse_rule, required = true)]
        allow: Vec<(String, Vec<String>)>,
        /// PATTERN=CAP[,CAP...] taken away even where an allow rule grants it.
        #[arg(long = "deny", value_parser = parse_rule)]
        deny: Vec<(String, Vec<String>)>,
        /// Requests per second [default: the server's default].
        #[arg(long)]
        rate: Option<u32>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List bound identities.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove an identity's binding; its certificates stop working on every daemon.
    Unbind {
        identity: String,
        #[command(flatten)]
        conn: Connection,
    },
}

fn rules_text(rules: &[proto::PolicyRule]) -> String {
    let rules: Vec<String> = rules
        .iter()
        .map(|rule| {
            let caps: Vec<&str> = rule.capabilities.iter().map(|c| capability_name(*c)).collect();
            format!("{}{}={}", if rule.deny { "!" } else { "" }, rule.pattern, caps.join(","))
        })
        .collect();
    rules.join(" ")
}

pub async fn run(cmd: IdentityCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    match cmd {
        IdentityCommand::Bind { identity, allow, deny, rate, conn } => {
            let mut rules = Vec::new();
            for ((pattern, caps), deny) in
                allow.into_iter().map(|r| (r, false)).chain(deny.into_iter().map(|r| (r, true)))
            {
                let capabilities = caps.iter().map(|c| capability(c)).collect::<Result<Vec<_>, _>>()?;
                rules.push(proto::PolicyRule { pattern, capabilities, deny });
            }
            let (_, mut a) = connect(&conn).await?;
            let req = proto::BindIdentityRequest { identity, rules, rate_limit_per_second: rate.unwrap_or(0) };
            let b = a.bind_identity(req).await?.into_inner();
            writeln!(out, "bound {} ({}): {}", b.identity, b.id, rules_text(&b.rules))?;
        }
        IdentityCommand::List { conn } => {
            let (_, mut a) = connect(&conn).await?;
            let r = a.list_identities(proto::ListIdentitiesRequest {}).await?.into_inner();
            writeln!(out, "{:<15}  {:<27}  IDENTITY  RULES", "ID", "CREATED")?;
            for b in &r.bindings {
                writeln!(out, "{:<15}  {:<27}  {}  {}", b.id, ts(&b.created_at), b.identity, rules_text(&b.rules))?;
            }
        }
        IdentityCommand::Unbind { identity, conn } => {
            let (_, mut a) = connect(&conn).await?;
            let b = a.unbind_identity(proto::UnbindIdentityRequest { identity }).await?.into_inner();
            writeln!(out, "unbound {}", b.identity)?;
        }
    }
    Ok(())
}
