//! `credvault identity bind|list|unbind`: workload identities (the URI SAN or CN of an
//! mTLS client certificate) bound to policies.

use clap::Subcommand;

use super::client::capability;
use super::conn::{connect, ts, ClientError};
use super::{parse_rule, Connection};
use crate::client::PolicyRule;

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

fn rules_text(rules: &[PolicyRule]) -> String {
    let rules: Vec<String> = rules
        .iter()
        .map(|rule| {
            let caps: Vec<&str> = rule.capabilities.iter().map(|c| c.as_str()).collect();
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
                rules.push(PolicyRule { pattern, capabilities, deny });
            }
            let b = connect(&conn).await?.bind_identity(&identity, &rules, rate.unwrap_or(0)).await?;
            writeln!(out, "bound {} ({}): {}", b.identity, b.id, rules_text(&b.rules))?;
        }
        IdentityCommand::List { conn } => {
            let bindings = connect(&conn).await?.list_identities().await?;
            writeln!(out, "{:<15}  {:<27}  IDENTITY  RULES", "ID", "CREATED")?;
            for b in &bindings {
                writeln!(out, "{:<15}  {:<27}  {}  {}", b.id, ts(b.created_at), b.identity, rules_text(&b.rules))?;
            }
        }
        IdentityCommand::Unbind { identity, conn } => {
            let b = connect(&conn).await?.unbind_identity(&identity).await?;
            writeln!(out, "unbound {}", b.identity)?;
        }
    }
    Ok(())
}
