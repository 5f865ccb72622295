//! `credvault write`: several puts and deletes applied together, all or nothing.
//! `credvault rollback`: an older version's value as the new current version.
//! `credvault meta`: patch a credential's metadata under its own version.

use std::path::PathBuf;

use clap::Subcommand;

use super::conn::{client_config, note_replayed, ClientError};
use super::Connection;
use crate::client::{BatchOutcome, BatchWrite, Client, Error};

#[derive(Debug, Clone, Subcommand)]
pub enum WritesCommand {
    /// Write several credentials in one transaction: every write, or none.
    ///
    /// e.g. `credvault write --put db/user=user.txt --put db/password=pass.txt
    /// --expect db/password=3 --delete db/old-password`
    Write {
        /// NAME=FILE: a new version of NAME holding FILE's bytes; repeat for more.
        #[arg(long = "put", value_parser = parse_pair)]
        puts: Vec<(String, String)>,
        /// NAME: soft-delete NAME; repeat for more.
        #[arg(long = "delete")]
        deletes: Vec<String>,
        /// NAME=N: write NAME only if its current version is N (0: only if it does not
        /// exist); repeat for more. Without it a write is unconditional.
        #[arg(long = "expect", value_parser = parse_pair)]
        expect: Vec<(String, String)>,
        /// Make retries of this batch safe: a later call with the same key (within the
        /// daemon's idempotency window) gets the first call's answer and writes nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Patch a credential's metadata: set and remove labels, replace description or owner.
    Meta {
        name: String,
        /// key=value to add or overwrite; repeat for more.
        #[arg(long = "set", value_parser = parse_pair)]
        set: Vec<(String, String)>,
        /// A label key to remove; repeat for more.
        #[arg(long = "remove")]
        remove: Vec<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        owner: Option<String>,
        /// Only if the metadata version is N (see `describe`).
        #[arg(long)]
        expected_metadata_version: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Make an older version's value the new current version (the value is never shown).
    Rollback {
        name: String,
        /// The version whose value comes back.
        #[arg(long = "to")]
        to_version: u64,
        /// Only if the current version is N.
        #[arg(long)]
        expected_version: Option<u64>,
        #[command(flatten)]
        conn: Connection,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} must look like NAME=VALUE"))
}

pub async fn run(cmd: WritesCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    match cmd {
        WritesCommand::Meta { name, set, remove, description, owner, expected_metadata_version, conn } => {
            let client = Client::connect(&client_config(&conn)?).await.map_err(ClientError::Client)?;
            let (d, o) = (description.as_deref(), owner.as_deref());
            let v = client
                .update_metadata(&name, &set, &remove, d, o, expected_metadata_version)
                .await
                .map_err(ClientError::Client)?;
            writeln!(out, "{name} metadata version {v}")?;
        }
        WritesCommand::Rollback { name, to_version, expected_version, conn } => {
            let client = Client::connect(&client_config(&conn)?).await.map_err(ClientError::Client)?;
            let r = client.rollback(&name, to_version, expected_version).await.map_err(ClientError::Client)?;
            writeln!(
                out,
                "{name} version {} (the value of version {}; version {} stays readable for its grace period)",
                r.version, r.to_version, r.previous_version
            )?;
        }
        WritesCommand::Write { puts, deletes, expect, idempotency_key, conn } => {
            let mut expected = std::collections::BTreeMap::new();
            for (name, n) in expect {
                let n: u64 =
                    n.parse().map_err(|_| ClientError::Usage(format!("--expect {name}={n}: not a version")))?;
                expected.insert(name, n);
            }
            let mut writes = Vec::with_capacity(puts.len() + deletes.len());
            for (name, file) in puts {
                let value = std::fs::read(PathBuf::from(&file))
                    .map_err(|e| ClientError::Usage(format!("--put {name}={file}: {e}")))?;
                let expected_version = expected.remove(&name);
                writes.push(BatchWrite::Put { name, value, expected_version });
            }
            for name in deletes {
                let expected_version = expected.remove(&name);
                writes.push(BatchWrite::Delete { name, expected_version });
            }
            if let Some(name) = expected.keys().next() {
                return Err(ClientError::Usage(format!("--expect {name}: no --put or --delete names it")));
            }
            let client = Client::connect(&client_config(&conn)?).await.map_err(ClientError::Client)?;
            let outcome = match idempotency_key {
                Some(key) => {
                    let (outcome, replayed) =
                        client.write_many_idempotent(&key, &writes).await.map_err(ClientError::Client)?;
                    note_replayed(replayed);
                    outcome
                }
                None => client.write_many(&writes).await.map_err(ClientError::Client)?,
            };
            match outcome {
                BatchOutcome::Applied(done) => {
                    for w in done {
                        if w.deleted {
                            writeln!(out, "{} deleted at version {}", w.name, w.version)?;
                        } else {
                            writeln!(out, "{} version {}", w.name, w.version)?;
                        }
                    }
                }
                BatchOutcome::Conflicts(conflicts) => {
                    let each: Vec<String> = conflicts
                        .iter()
                        .map(|c| {
                            let found = match c.current_version {
                                None => "does not exist".to_owned(),
                                Some(v) if c.deleted => format!("is at version {v} (deleted)"),
                                Some(v) => format!("is at version {v}"),
                            };
                            format!("{} expected version {}, {found}", c.name, c.expected_version)
                        })
                        .collect();
                    return Err(ClientError::Client(Error::Conflict {
                        current: None,
                        message: format!("nothing was written: {}", each.join("; ")),
                    }));
                }
            }
        }
    }
    Ok(())
}
