//! The `credvault` command line: `serve` runs the daemon; every other subcommand is a
//! gRPC client of a running daemon.

pub mod agent;
pub mod bench;
mod client;
mod conn;
mod identity;
mod rotate;
pub mod run;
mod writes;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::ServeArgs;

pub use client::run_client;
pub use conn::ClientError;

#[derive(Debug, Parser)]
#[command(name = "credvault", version, about = "A credential vault daemon and its client")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// How client subcommands reach the daemon.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// Daemon address.
    #[arg(long, env = "CREDVAULT_ADDR", default_value = "http://127.0.0.1:7420", global = true)]
    pub addr: String,
    /// Bearer token (the root token is printed when the daemon first starts).
    #[arg(long, env = "CREDVAULT_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// PEM CA that signed the daemon's certificate (implies https).
    #[arg(long, env = "CREDVAULT_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a daemon that requires mutual TLS.
    #[arg(long, env = "CREDVAULT_TLS_CLIENT_CERT", global = true, requires = "tls_client_key")]
    pub tls_client_cert: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_TLS_CLIENT_KEY", global = true, requires = "tls_client_cert")]
    pub tls_client_key: Option<PathBuf>,
    /// Name to verify in the daemon's certificate [default: the address's host].
    #[arg(long, env = "CREDVAULT_TLS_DOMAIN", global = true)]
    pub tls_domain: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Keep credentials as files in a directory (a sidecar for any language).
    Agent(agent::AgentArgs),
    /// Run a command with credentials in its environment.
    Run(Box<run::RunArgs>),
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Write a new version of a credential; the value comes from --value-file or stdin.
    Put {
        name: String,
        /// Read the value from this file, byte for byte.
        #[arg(long)]
        value_file: Option<PathBuf>,
        /// Write only if the current version is N (0: only if it does not exist).
        #[arg(long)]
        expected_version: Option<u64>,
        /// Keep a trailing newline read from stdin (it is stripped by default).
        #[arg(long)]
        keep_newline: bool,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// Label as key=value; repeat for more.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Make retries of this write safe: a later call with the same key (within the
        /// daemon's idempotency window) gets the first call's answer and writes nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Print a credential's value to stdout.
    Get {
        name: String,
        /// A specific version instead of the current one.
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a credential's metadata and versions (never its value).
    Describe {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List credentials under a prefix.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// Include soft-deleted credentials.
        #[arg(long)]
        deleted: bool,
        /// Only credentials whose current version is older than this (90d, 12h, 30m).
        #[arg(long, value_parser = rotate::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// Only credentials whose rotation policy is overdue.
        #[arg(long)]
        rotation_overdue: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Soft-delete a credential (its versions are kept).
    Delete {
        name: String,
        #[arg(long)]
        expected_version: Option<u64>,
        /// Make retries of this write safe: a later call with the same key (within the
        /// daemon's idempotency window) gets the first call's answer and writes nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show the daemon's status.
    Status {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show recent audit events (needs the admin capability).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Create, list and revoke access tokens (needs the admin capability).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Bind mTLS certificate identities to policies (needs the admin capability).
    #[command(subcommand)]
    Identity(identity::IdentityCommand),
    /// Load-test a daemon (and, with --baseline, a bare gRPC server in this process).
    Bench(Box<bench::BenchArgs>),
    #[command(flatten)]
    Rotation(rotate::RotationCommand),
    #[command(flatten)]
    Writes(writes::WritesCommand),
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCommand {
    /// The newest events, oldest first.
    Tail {
        /// How many events [max 1000].
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: u32,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// Create a token; it is printed once.
    Create {
        /// A name for the token, shown in listings and audit events.
        #[arg(long)]
        name: String,
        /// PATTERN=CAP[,CAP...], e.g. 'team-a/**=read,list'; repeat for more rules.
        /// PATTERN is '/'-separated segments: a literal name segment, '*' (exactly one
        /// segment) or, last only, '**' (any depth): 'team-a/db' is one name, 'team-a/*'
        /// is one level below team-a/, 'team-a/**' is everything below it, '**' is
        /// everything. CAP is read, write, delete, list, rotate, destroy (destroy
        /// versions, cut grace periods short) or admin (only with '**').
        #[arg(long = "allow", value_parser = parse_rule, required = true)]
        allow: Vec<(String, Vec<String>)>,
        /// PATTERN=CAP[,CAP...] taken away even where an allow rule grants it (deny
        /// wins). To deny a name and everything below it, deny both 'x' and 'x/**'.
        #[arg(long = "deny", value_parser = parse_rule)]
        deny: Vec<(String, Vec<String>)>,
        /// Lifetime in seconds [default: no expiry].
        #[arg(long)]
        ttl_seconds: Option<u64>,
        /// Requests per second [default: the server's default].
        #[arg(long)]
        rate: Option<u32>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Revoke a token by its id (from `token list`).
    Revoke {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

fn parse_rule(s: &str) -> Result<(String, Vec<String>), String> {
    let (pattern, caps) = s.split_once('=').ok_or_else(|| format!("rule {s:?} must look like PATTERN=read,list"))?;
    Ok((pattern.to_owned(), caps.split(',').map(|c| c.trim().to_owned()).filter(|c| !c.is_empty()).collect()))
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("label {s:?} must look like key=value"))
}
