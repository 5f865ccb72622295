//! Rotation subcommands: `rotate`, `destroy`, `undelete`, `policy`, `kek`, `rekey`, `watch`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::conn::{connect, note_replayed, read_value, ts, ClientError};
use super::Connection;
use crate::client::{
    ByteEncoding, BytesSpec, Client, Generator, JobState, PasswordSpec, PolicyKind, RotateOptions, RotationJob,
    RotationPolicy, RotationSource, SecretValue,
};

#[derive(Debug, Clone, Subcommand)]
pub enum RotationCommand {
    /// Rotate a credential: a new current version, the old one readable for a grace period.
    ///
    /// The value comes from --value-file, stdin (with --stdin), a generator
    /// (--password / --random-bytes), or, with none of these, the credential's policy.
    Rotate {
        name: String,
        #[arg(long, conflicts_with_all = ["stdin", "password", "random_bytes"])]
        value_file: Option<PathBuf>,
        /// Read the value from stdin.
        #[arg(long, conflicts_with_all = ["password", "random_bytes"])]
        stdin: bool,
        #[command(flatten)]
        generator: GeneratorArgs,
        /// How long the replaced version stays readable, e.g. 30s, 15m, 24h, 7d.
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
        #[arg(long)]
        expected_version: Option<u64>,
        /// Make retries of this rotation safe: a later call with the same key (within the
        /// daemon's idempotency window) gets the first call's answer and rotates nothing.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Wipe one version's ciphertext irreversibly.
    Destroy {
        name: String,
        version: u64,
        #[command(flatten)]
        conn: Connection,
    },
    /// Bring back a soft-deleted credential at the version it had.
    Undelete {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Manage a credential's rotation policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Rotate the key-encryption key and follow the re-wrap job.
    #[command(subcommand)]
    Kek(KekCommand),
    /// Change the master passphrase. Reads CREDVAULT_OLD_PASSPHRASE and
    /// CREDVAULT_NEW_PASSPHRASE, or the files given.
    Rekey {
        #[arg(long)]
        old_passphrase_file: Option<PathBuf>,
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Print change events under a prefix as they happen (until interrupted).
    Watch {
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct GeneratorArgs {
    /// Generate a password of this many characters.
    #[arg(long, conflicts_with = "random_bytes")]
    password: Option<u32>,
    /// Character classes for --password: any of lower,upper,digits,symbols [default: all].
    #[arg(long, value_delimiter = ',', requires = "password")]
    classes: Vec<String>,
    /// Generate this many random bytes.
    #[arg(long)]
    random_bytes: Option<u32>,
    /// Encoding for --random-bytes: raw, hex or base64 [default: base64].
    #[arg(long, requires = "random_bytes")]
    encoding: Option<String>,
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Set (create or replace) the policy.
    Set {
        name: String,
        /// manual, periodic, before-expiry or scheduled.
        #[arg(long)]
        kind: String,
        /// periodic: the period; before-expiry: how long before expiry to rotate.
        #[arg(long, value_parser = parse_duration)]
        interval: Option<Duration>,
        /// before-expiry: how long each new value is valid.
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
        /// scheduled: how long from now, e.g. 2h.
        #[arg(long = "in", value_parser = parse_duration)]
        in_: Option<Duration>,
        #[command(flatten)]
        generator: GeneratorArgs,
        #[arg(long, value_parser = parse_duration)]
        grace: Option<Duration>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show the policy and when it runs next.
    Get {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove the policy.
    Delete {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum KekCommand {
    /// Create a new KEK and re-wrap every data key under it, with a progress bar.
    Rotate {
        /// Start the job and return at once.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a rotation job (the newest by default).
    Status {
        #[arg(default_value_t = 0)]
        job: u64,
        #[command(flatten)]
        conn: Connection,
    },
}

/// `90s`, `15m`, `24h`, `7d`, `500ms`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration like 30s, 15m, 24h or 7d"))?;
    let secs = |k: u64| n.checked_mul(k).map(Duration::from_secs).ok_or_else(|| format!("{s:?} is too long"));
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    }
}

impl GeneratorArgs {
    fn password_spec(&self) -> Result<Option<PasswordSpec>, ClientError> {
        let Some(length) = self.password else { return Ok(None) };
        let mut spec = PasswordSpec { length, ..Default::default() };
        for c in &self.classes {
            match c.as_str() {
                "lower" => spec.lowercase = true,
                "upper" => spec.uppercase = true,
                "digits" => spec.digits = true,
                "symbols" => spec.symbols = true,
                other => return Err(ClientError::Usage(format!("unknown character class {other:?}"))),
            }
        }
        Ok(Some(spec))
    }

    fn bytes_spec(&self) -> Result<Option<BytesSpec>, ClientError> {
        let Some(length) = self.random_bytes else { return Ok(None) };
        let encoding = match self.encoding.as_deref().unwrap_or("base64") {
            "raw" => ByteEncoding::Raw,
            "hex" => ByteEncoding::Hex,
            "base64" => ByteEncoding::Base64,
            other => return Err(ClientError::Usage(format!("unknown encoding {other:?} (raw, hex or base64)"))),
        };
        Ok(Some(BytesSpec { length, encoding }))
    }

    fn generator(&self) -> Result<Option<Generator>, ClientError> {
        Ok(match (self.password_spec()?, self.bytes_spec()?) {
            (Some(p), _) => Some(Generator::Password(p)),
            (None, Some(b)) => Some(Generator::RandomBytes(b)),
            (None, None) => None,
        })
    }
}

fn job_line(j: &RotationJob) -> String {
    let eta = j.eta.map(|d| format!(", eta {}s", d.as_secs())).unwrap_or_default();
    let error = if j.error.is_empty() { String::new() } else { format!("\nerror: {}", j.error) };
    format!(
        "job {} ({}): KEK {}, {}/{} re-wrapped, {} failed, {:.0}/s{eta}{error}",
        j.job_id,
        j.state.as_str(),
        j.new_kek_id,
        j.done,
        j.total,
        j.failed,
        j.rate_per_second
    )
}

fn read_secret(env: &str, file: Option<&PathBuf>) -> Result<String, ClientError> {
    let text = match file {
        Some(p) => {
            std::fs::read_to_string(p).map_err(|e| ClientError::Usage(format!("cannot read {}: {e}", p.display())))?
        }
        None => std::env::var(env).map_err(|_| ClientError::Usage(format!("set {env} or pass the file option")))?,
    };
    Ok(text.trim_end_matches(['\r', '\n']).to_owned())
}

pub async fn run(cmd: RotationCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    match cmd {
        RotationCommand::Rotate {
            name,
            value_file,
            stdin,
            generator,
            grace,
            expected_version,
            idempotency_key,
            conn,
        } => {
            let source = if value_file.is_some() || stdin {
                Some(RotationSource::Value(SecretValue::new(read_value(value_file.as_deref(), false)?.to_vec())))
            } else {
                generator.generator()?.map(RotationSource::Generate)
            };
            let options = RotateOptions { source, grace_period: grace, expected_version };
            let c = connect(&conn).await?;
            let r = match idempotency_key {
                Some(key) => {
                    let (r, replayed) = c.rotate_idempotent_with(&key, &name, &options).await?;
                    note_replayed(replayed);
                    r
                }
                None => c.rotate_with(&name, &options).await?,
            };
            writeln!(out, "{name} version {}", r.version)?;
            if r.previous_version > 0 {
                writeln!(out, "version {} readable until {}", r.previous_version, ts(r.previous_expires_at))?;
            }
        }
        RotationCommand::Destroy { name, version, conn } => {
            connect(&conn).await?.destroy_version(&name, version).await?;
            writeln!(out, "{name} version {version} destroyed")?;
        }
        RotationCommand::Undelete { name, conn } => {
            let m = connect(&conn).await?.undelete(&name).await?;
            writeln!(out, "{} restored at version {}", m.name, m.current_version)?;
        }
        RotationCommand::Policy(cmd) => run_policy(cmd, out).await?,
        RotationCommand::Kek(KekCommand::Rotate { no_wait, conn }) => {
            let c = connect(&conn).await?;
            let job = c.rotate_kek().await?;
            writeln!(out, "{}", job_line(&job))?;
            if !no_wait {
                follow(&c, job.job_id, job.total, out).await?;
            }
        }
        RotationCommand::Kek(KekCommand::Status { job, conn }) => {
            let j = connect(&conn).await?.rotation_job(job).await?;
            writeln!(out, "{}", job_line(&j))?;
        }
        RotationCommand::Rekey { old_passphrase_file, new_passphrase_file, conn } => {
            let old = zeroize::Zeroizing::new(read_secret("CREDVAULT_OLD_PASSPHRASE", old_passphrase_file.as_ref())?);
            let new = zeroize::Zeroizing::new(read_secret("CREDVAULT_NEW_PASSPHRASE", new_passphrase_file.as_ref())?);
            let rewrapped = connect(&conn).await?.rekey_master(&old, &new).await?;
            writeln!(out, "{rewrapped} KEKs re-wrapped; restart every daemon with the new passphrase")?;
        }
        RotationCommand::Watch { prefix, conn } => {
            let mut events = connect(&conn).await?.watch(&prefix).await?;
            while let Some(e) = events.next().await {
                let e = e?;
                writeln!(out, "{} {} {} {}", ts(e.at), e.kind.as_str(), e.name, e.version)?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// Follows a job's progress stream with a progress bar until it ends.
async fn follow(c: &Client, job_id: u64, total: u64, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    let bar = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} DEKs ({per_sec}, eta {eta})",
    ) {
        bar.set_style(style);
    }
    let mut stream = c.watch_rotation_job(job_id).await?;
    let mut last = None;
    while let Some(j) = stream.next().await {
        let j = j?;
        bar.set_length(j.total);
        bar.set_position(j.done + j.failed);
        last = Some(j);
    }
    bar.finish_and_clear();
    if let Some(j) = last {
        writeln!(out, "{}", job_line(&j))?;
        if j.state != JobState::Completed {
            return Err(ClientError::Job(j.error));
        }
    }
    Ok(())
}

async fn run_policy(cmd: PolicyCommand, out: &mut impl std::io::Write) -> Result<(), ClientError> {
    let print = |out: &mut dyn std::io::Write, p: &RotationPolicy| -> std::io::Result<()> {
        writeln!(out, "{}: {}", p.name, p.kind.as_str())?;
        writeln!(out, "  next run:     {}", ts(p.next_run_at))?;
        writeln!(out, "  rotations:    {}", p.rotations)?;
        writeln!(out, "  last rotated: {}", ts(p.last_rotated_at))?;
        if !p.last_error.is_empty() {
            writeln!(out, "  last error:   {}", p.last_error)?;
        }
        Ok(())
    };
    match cmd {
        PolicyCommand::Set { name, kind, interval, validity, in_, generator, grace, conn } => {
            let kind = match kind.as_str() {
                "manual" => PolicyKind::Manual,
                "periodic" => PolicyKind::Periodic,
                "before-expiry" | "before_expiry" => PolicyKind::BeforeExpiry,
                "scheduled" => PolicyKind::Scheduled,
                other => {
                    return Err(ClientError::Usage(format!(
                        "unknown policy kind {other:?} (manual, periodic, before-expiry, scheduled)"
                    )))
                }
            };
            let mut policy = RotationPolicy::new(name, kind);
            policy.interval = interval;
            policy.validity = validity;
            policy.at = in_.map(|d| std::time::SystemTime::now() + d);
            policy.generator = generator.generator()?;
            policy.grace_period = grace;
            let p = connect(&conn).await?.set_rotation_policy(&policy).await?;
            print(out, &p)?;
        }
        PolicyCommand::Get { name, conn } => {
            let p = connect(&conn).await?.rotation_policy(&name).await?;
            print(out, &p)?;
        }
        PolicyCommand::Delete { name, conn } => {
            connect(&conn).await?.delete_rotation_policy(&name).await?;
            writeln!(out, "{name}: policy removed")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }
}
