//! Credential rotation: `RotateCredential`, rotation policies, and the scheduler that
//! runs due policies.
//!
//! **Invariant:** a scheduled rotation claims its slot inside the rotation's own
//! transaction (a compare-and-set on the policy's `next_run_at`), so with any number of
//! daemons on one database exactly one of them rotates per slot, and a crash between
//! "rotated" and "slot advanced" cannot happen: both commit or neither does.

use std::time::Duration;

use serde::Deserialize;
use zeroize::Zeroizing;

use super::{micros, not_found, Vault, VaultError, WriteOptions};
use crate::generate::GeneratorSpec;
use crate::names::NameArg;
use crate::store::{
    ChangeKind, CredentialHead, CredentialStore, Micros, PolicyAdvance, PolicyKind, PolicyStore, RotationPolicy,
    StoreError,
};
use crate::telemetry::names;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotationSettings {
    /// How often the scheduler looks for due rotations and ended grace periods.
    pub scheduler_interval_ms: u64,
    /// Grace period of a rotation that names none (and whose policy names none).
    pub default_grace_seconds: u64,
    /// A failed scheduled rotation is tried again after this long.
    pub retry_after_seconds: u64,
    /// Versions re-wrapped per transaction by a KEK rotation job.
    pub rewrap_batch_size: u32,
    /// Pause between re-wrap batches (0: none), to bound the load a job puts on the database.
    pub rewrap_pause_ms: u64,
    /// How long a daemon's claim on a running job holds without progress; after that
    /// another daemon (or this one, restarted) resumes the job.
    pub job_lease_ms: u64,
    /// Change events buffered per watcher; a watcher further behind is dropped.
    pub watch_buffer: usize,
    /// Periodic and before-expiry rotations are moved by up to this much (never more
    /// than half the policy's interval), by a fixed amount per credential name, so
    /// credentials given the same schedule at the same moment do not all rotate in the
    /// same second. 0: no jitter.
    pub schedule_jitter_seconds: u64,
    /// How often the staleness task recounts overdue, expiring and old credentials.
    pub staleness_interval_ms: u64,
    /// A rotation policy whose slot passed this long ago without a rotation is overdue
    /// (the scheduler runs due slots within about a second; a failing one retries).
    pub overdue_after_seconds: u64,
    /// Credentials expiring within this horizon are counted as expiring.
    pub expiry_horizon_seconds: u64,
    /// Each staleness count stops here: the work of a pass is bounded, and a gauge at
    /// this value means "at least this many".
    pub staleness_max_count: u32,
}

impl Default for RotationSettings {
    fn default() -> Self {
        RotationSettings {
            scheduler_interval_ms: 1000,
            default_grace_seconds: 3600,
            retry_after_seconds: 60,
            rewrap_batch_size: 1000,
            rewrap_pause_ms: 0,
            job_lease_ms: 15_000,
            watch_buffer: 1024,
            schedule_jitter_seconds: 0,
            staleness_interval_ms: 30_000,
            overdue_after_seconds: 300,
            expiry_horizon_seconds: 7 * 86_400,
            staleness_max_count: 100_000,
        }
    }
}

impl RotationSettings {
    pub fn validate(&self) -> Result<(), String> {
        if self.scheduler_interval_ms == 0 || self.job_lease_ms == 0 {
            return Err("rotation.scheduler_interval_ms and rotation.job_lease_ms must be positive".into());
        }
        if self.rewrap_pause_ms.saturating_mul(2) >= self.job_lease_ms {
            // The lease is renewed by each batch: a pause near the lease would let another
            // daemon take the job over while this one still works on it.
            return Err("rotation.rewrap_pause_ms must be less than half of rotation.job_lease_ms".into());
        }
        if !(1..=100_000).contains(&self.rewrap_batch_size) {
            return Err("rotation.rewrap_batch_size must be between 1 and 100000".into());
        }
        if self.staleness_interval_ms == 0 || self.staleness_max_count == 0 {
            return Err("rotation.staleness_interval_ms and rotation.staleness_max_count must be positive".into());
        }
        if self.watch_buffer == 0 {
            return Err("rotation.watch_buffer must be at least 1".into());
        }
        Ok(())
    }

    pub(super) fn default_grace(&self) -> Duration {
        Duration::from_secs(self.default_grace_seconds)
    }

    /// `name`'s schedule offset under a policy with this interval ([`schedule_jitter`]).
    fn jitter(&self, name: &str, interval_us: Option<Micros>) -> Micros {
        schedule_jitter(name, Duration::from_secs(self.schedule_jitter_seconds), interval_us.unwrap_or(0))
    }
}

/// How far `name`'s rotations are moved within a jitter window of `window` (at most half
/// of `interval_us`): a share of the window fixed by a hash of the name. Every daemon
/// computes the same offset for a name, so the compare-and-set on a slot still works,
/// and many names spread evenly across the window.
pub fn schedule_jitter(name: &str, window: Duration, interval_us: Micros) -> Micros {
    use sha2::{Digest, Sha256};
    let window = micros(window).min(interval_us / 2);
    let Ok(span) = u64::try_from(window) else { return 0 };
    if span == 0 {
        return 0;
    }
    let digest = Sha256::digest(name.as_bytes());
    let Some(head) = digest.first_chunk::<8>() else { return 0 };
    // Below `span + 1`, which fits an i64 since `span` came from one.
    Micros::try_from(u64::from_be_bytes(*head) % (span + 1)).unwrap_or(0)
}

/// The first slot of a policy set at `now`. `jitter` moves a periodic slot later and a
/// before-expiry slot earlier (a rotation before expiry must not drift past it).
fn first_run(spec: &PolicySpec, now: Micros, head_expires: Option<Micros>, jitter: Micros) -> Option<Micros> {
    let interval = spec.interval.map(micros).unwrap_or(0);
    match spec.kind {
        PolicyKind::Manual => None,
        PolicyKind::Periodic => Some(now.saturating_add(interval).saturating_add(jitter)),
        PolicyKind::BeforeExpiry => {
            // Without an expiry yet, treat the current value as issued now.
            let validity = spec.validity.map(micros).unwrap_or(0);
            let expires = head_expires.unwrap_or(now.saturating_add(validity));
            Some(expires.saturating_sub(interval).saturating_sub(jitter))
        }
        PolicyKind::Scheduled => spec.at,
    }
}

/// Where a rotation's new value comes from.
#[derive(Debug, Clone, Copy)]
pub enum NewValue<'a> {
    Given(&'a [u8]),
    Generate(GeneratorSpec),
    /// The credential's rotation policy generator.
    FromPolicy,
}

#[derive(Debug, Clone)]
pub struct RotateOutcome {
    pub name: String,
    pub version: u64,
    /// 0 when the rotation made the first version.
    pub previous_version: u64,
    /// When the previous version stops being readable.
    pub previous_expires_at: Option<Micros>,
}

/// A rotation policy as a caller states it.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    pub kind: PolicyKind,
    pub interval: Option<Duration>,
    pub validity: Option<Duration>,
    pub at: Option<Micros>,
    pub generator: GeneratorSpec,
    pub grace: Option<Duration>,
}

/// Shortest period a policy may have: the scheduler ticks about once a second.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// What a rotation under a policy changes besides the value.
struct Plan {
    next_run_at: Option<Micros>,
    /// A `before_expiry` rotation renews the credential's expiry.
    expires_at: Option<Micros>,
}

/// `jitter`: the credential's schedule offset ([`schedule_jitter`]).
fn plan(p: &RotationPolicy, claim: Option<Micros>, now: Micros, jitter: Micros) -> Plan {
    let interval = p.interval_us.unwrap_or(0);
    match p.kind {
        PolicyKind::Manual => Plan { next_run_at: None, expires_at: None },
        PolicyKind::Periodic => {
            // Slots follow each other at the period (keeping the offset the first slot
            // got); slots missed while no daemon ran are skipped, not made up in a burst.
            let next = match claim {
                Some(c) if c.saturating_add(interval) > now => c.saturating_add(interval),
                _ => now.saturating_add(interval).saturating_add(jitter),
            };
            Plan { next_run_at: Some(next), expires_at: None }
        }
        PolicyKind::BeforeExpiry => {
            let expires = now.saturating_add(p.validity_us.unwrap_or(0));
            let next = expires.saturating_sub(interval).saturating_sub(jitter);
            Plan { next_run_at: Some(next), expires_at: Some(expires) }
        }
        // A scheduled rotation happens once; a manual one before it leaves it pending.
        PolicyKind::Scheduled => {
            Plan { next_run_at: if claim.is_some() { None } else { p.next_run_at }, expires_at: None }
        }
    }
}

fn generator(p: &RotationPolicy) -> Result<GeneratorSpec, VaultError> {
    serde_json::from_str(&p.generator)
        .map_err(|e| VaultError::Internal(format!("rotation policy of {:?} has a bad generator: {e}", p.name)))
}

impl Vault {
    /// Makes a new current version of a live credential. The version it replaces stays
    /// readable by explicit version for the grace period (`None`: the policy's, else the
    /// configured default), then is not. A grace period shorter than that needs
    /// `may_cut_grace` (the `destroy` capability).
    pub async fn rotate(
        &self,
        name: &(impl NameArg + ?Sized),
        source: NewValue<'_>,
        grace: Option<Duration>,
        expected: Option<u64>,
        may_cut_grace: bool,
    ) -> Result<RotateOutcome, VaultError> {
        self.rotate_keyed(name, source, grace, expected, may_cut_grace, None).await
    }

    /// [`Vault::rotate`], storing `key` with the write (see `vault/idempotency.rs`).
    pub(super) async fn rotate_keyed(
        &self,
        name: &(impl NameArg + ?Sized),
        source: NewValue<'_>,
        grace: Option<Duration>,
        expected: Option<u64>,
        may_cut_grace: bool,
        key: Option<&crate::store::KeyClaim>,
    ) -> Result<RotateOutcome, VaultError> {
        let parsed = self.name(name)?;
        super::check_expected(expected)?;
        if expected == Some(0) {
            return Err(VaultError::InvalidArgument(
                "expected_version 0 means \"must not exist\"; a rotation needs an existing credential".into(),
            ));
        }
        let store = &self.inner.store;
        let head = self.live_head(&parsed).await?;
        let policy = store.get_rotation_policy(parsed.as_str()).await?;
        let usual = match &policy {
            Some(p) => (Duration::from_micros(u64::try_from(p.grace_us).unwrap_or(0)), "its rotation policy's"),
            None => (self.inner.rotation.default_grace(), "the server default"),
        };
        if let Some(g) = grace.filter(|g| *g < usual.0 && !may_cut_grace) {
            return Err(VaultError::PermissionDenied(format!(
                "a grace period of {g:?} for {:?} is shorter than the {:?} it would otherwise get ({}); cutting a \
                 grace period short needs the destroy capability",
                parsed.as_str(),
                usual.0,
                usual.1
            )));
        }
        let value: Zeroizing<Vec<u8>> = match source {
            NewValue::Given(v) => Zeroizing::new(v.to_vec()),
            NewValue::Generate(spec) => spec.generate().map_err(VaultError::InvalidArgument)?,
            NewValue::FromPolicy => match &policy {
                Some(p) => generator(p)?.generate().map_err(VaultError::Internal)?,
                None => {
                    return Err(VaultError::InvalidArgument(format!(
                        "no value or generator given, and {:?} has no rotation policy to generate one",
                        parsed.as_str()
                    )))
                }
            },
        };
        let grace = grace.unwrap_or(usual.0);
        let now = self.now();
        let plan = policy.as_ref().map(|p| plan(p, None, now, self.inner.rotation.jitter(&p.name, p.interval_us)));
        let metadata = renewed_metadata(&head, plan.as_ref());
        let opts = WriteOptions {
            expected,
            metadata: metadata.as_ref(),
            grace: Some(grace),
            kind: ChangeKind::Rotate,
            policy: plan.map(|p| PolicyAdvance { claim: None, next_run_at: p.next_run_at }),
            live_only: true,
            key,
            seen_version: Some(head.current_version),
        };
        let out = self.write(parsed.as_str(), &value, opts).await?;
        metrics::counter!(names::ROTATIONS, "trigger" => "request").increment(1);
        let previous_version = out.version.saturating_sub(1);
        Ok(RotateOutcome {
            name: out.name,
            version: out.version,
            previous_version,
            previous_expires_at: (previous_version > 0).then(|| out.created_at.saturating_add(micros(grace))),
        })
    }

    async fn live_head(&self, name: &crate::names::CredentialName) -> Result<CredentialHead, VaultError> {
        match self.inner.store.get_credential(name.as_str()).await? {
            None => Err(not_found(name)),
            Some(h) if h.deleted_at.is_some() => Err(super::deleted(name)),
            Some(h) => Ok(h),
        }
    }

    /// Creates or replaces the rotation policy of a live credential. A grace period
    /// shorter than the server default needs `may_cut_grace` (the `destroy` capability).
    pub async fn set_rotation_policy(
        &self,
        name: &str,
        spec: &PolicySpec,
        may_cut_grace: bool,
    ) -> Result<RotationPolicy, VaultError> {
        let name = self.name(name)?;
        let usual = self.inner.rotation.default_grace();
        if let Some(g) = spec.grace.filter(|g| *g < usual && !may_cut_grace) {
            return Err(VaultError::PermissionDenied(format!(
                "a rotation policy grace period of {g:?} for {:?} is shorter than the server default of {usual:?}; \
                 that needs the destroy capability",
                name.as_str()
            )));
        }
        let bad = |m: &str| Err(VaultError::InvalidArgument(m.to_owned()));
        spec.generator.check().map_err(|e| VaultError::InvalidArgument(format!("generator: {e}")))?;
        let now = self.now();
        let interval = spec.interval.map(micros);
        let validity = spec.validity.map(micros);
        match spec.kind {
            PolicyKind::Periodic | PolicyKind::BeforeExpiry if spec.interval.is_none_or(|i| i < MIN_INTERVAL) => {
                return bad("interval must be at least 1s for periodic and before_expiry policies");
            }
            PolicyKind::BeforeExpiry if validity.is_none_or(|v| Some(v) <= interval) => {
                return bad("before_expiry needs a validity longer than its interval");
            }
            PolicyKind::Scheduled if spec.at.is_none() => return bad("a scheduled policy needs `at`"),
            _ => {}
        }
        let head = self.live_head(&name).await?;
        let jitter = self.inner.rotation.jitter(name.as_str(), interval);
        let next_run_at = first_run(spec, now, head.metadata.expires_at, jitter);
        let row = RotationPolicy {
            name: name.as_str().to_owned(),
            kind: spec.kind,
            interval_us: interval,
            validity_us: validity,
            at: spec.at,
            generator: serde_json::to_string(&spec.generator)
                .map_err(|e| VaultError::Internal(format!("generator spec: {e}")))?,
            grace_us: micros(spec.grace.unwrap_or_else(|| self.inner.rotation.default_grace())),
            next_run_at,
            rotations: 0,
            last_rotated_at: None,
            last_error: None,
            updated_at: now,
        };
        if !self.inner.store.put_rotation_policy(&row).await? {
            return Err(not_found(&name));
        }
        self.rotation_policy(name.as_str()).await
    }

    pub async fn rotation_policy(&self, name: &str) -> Result<RotationPolicy, VaultError> {
        let name = self.name(name)?;
        self.inner
            .store
            .get_rotation_policy(name.as_str())
            .await?
            .ok_or_else(|| VaultError::NotFound(format!("credential {:?} has no rotation policy", name.as_str())))
    }

    pub async fn delete_rotation_policy(&self, name: &str) -> Result<(), VaultError> {
        let name = self.name(name)?;
        if !self.inner.store.delete_rotation_policy(name.as_str()).await? {
            return Err(VaultError::NotFound(format!("credential {:?} has no rotation policy", name.as_str())));
        }
        Ok(())
    }

    /// Runs one due policy. `Ok(false)`: nothing to do (another daemon took the slot, or
    /// the credential is gone).
    async fn rotate_scheduled(&self, policy: &RotationPolicy) -> Result<bool, VaultError> {
        let Some(claim) = policy.next_run_at else { return Ok(false) };
        let name = self.name(&policy.name)?;
        let spec = generator(policy)?;
        // A concurrent put moves the version on; the slot is still ours to take then.
        for _ in 0..3 {
            let head = match self.live_head(&name).await {
                Ok(h) => h,
                Err(VaultError::NotFound(_)) => return Ok(false),
                Err(e) => return Err(e),
            };
            let value = spec.generate().map_err(VaultError::Internal)?;
            let jitter = self.inner.rotation.jitter(&policy.name, policy.interval_us);
            let plan = plan(policy, Some(claim), self.now(), jitter);
            let metadata = renewed_metadata(&head, Some(&plan));
            let opts = WriteOptions {
                expected: Some(head.current_version),
                metadata: metadata.as_ref(),
                grace: Some(Duration::from_micros(u64::try_from(policy.grace_us).unwrap_or(0))),
                kind: ChangeKind::Rotate,
                policy: Some(PolicyAdvance { claim: Some(claim), next_run_at: plan.next_run_at }),
                live_only: true,
                key: None,
                seen_version: None,
            };
            match self.write(name.as_str(), &value, opts).await {
                Ok(out) => {
                    tracing::info!(credential = %name, version = out.version, "scheduled rotation done");
                    metrics::counter!(names::ROTATIONS, "trigger" => "schedule").increment(1);
                    return Ok(true);
                }
                Err(VaultError::Conflict { .. }) => {
                    let now = self.inner.store.get_rotation_policy(name.as_str()).await?;
                    if now.and_then(|p| p.next_run_at) != Some(claim) {
                        return Ok(false);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(VaultError::Aborted(format!("{:?} kept changing during its scheduled rotation", name.as_str())))
    }

    /// One scheduler pass: ends grace periods that are over, then runs due policies.
    pub async fn run_due_rotations(&self) -> Result<usize, VaultError> {
        let store = &self.inner.store;
        let now = self.now();
        let deprecated = store.deprecate_expired(now).await?;
        if deprecated > 0 {
            tracing::info!(versions = deprecated, "grace periods ended; versions deprecated");
        }
        let mut rotated = 0;
        for policy in store.due_rotations(now, 100).await? {
            match self.rotate_scheduled(&policy).await {
                Ok(true) => rotated += 1,
                Ok(false) => {}
                Err(e) => {
                    metrics::counter!(names::ROTATION_FAILURES).increment(1);
                    tracing::warn!(credential = %policy.name, error = %e, "scheduled rotation failed; will retry");
                    if let Some(claim) = policy.next_run_at {
                        let retry = self
                            .now()
                            .saturating_add(micros(Duration::from_secs(self.inner.rotation.retry_after_seconds)));
                        store.defer_rotation(&policy.name, claim, retry, &e.to_string()).await?;
                    }
                }
            }
        }
        Ok(rotated)
    }

    /// The scheduler: runs [`Vault::run_due_rotations`] every tick until `stop` turns true.
    pub async fn run_scheduler(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let tick = Duration::from_millis(self.inner.rotation.scheduler_interval_ms.max(1));
        while !*stop.borrow() {
            if let Err(e) = self.run_due_rotations().await {
                if !matches!(e, VaultError::Unavailable(StoreError::Unavailable(_) | StoreError::Timeout(..))) {
                    tracing::warn!(error = %e, "rotation scheduler pass failed");
                }
            }
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(tick) => {}
            }
        }
    }
}

/// The head's metadata with a renewed expiry, when the plan renews it.
fn renewed_metadata(head: &CredentialHead, plan: Option<&Plan>) -> Option<crate::store::Metadata> {
    let expires = plan?.expires_at?;
    let mut m = head.metadata.clone();
    m.expires_at = Some(expires);
    Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The injected clock: every schedule function takes `now`.
    const NOW: Micros = 1_800_000_000_000_000;
    const SECOND: Micros = 1_000_000;
    const HOUR: Micros = 3600 * SECOND;

    fn spec(kind: PolicyKind, interval: Micros, validity: Option<Micros>) -> PolicySpec {
        let d = |us: Micros| Duration::from_micros(u64::try_from(us).unwrap());
        PolicySpec {
            kind,
            interval: Some(d(interval)),
            validity: validity.map(d),
            at: None,
            generator: GeneratorSpec::Bytes { length: 16, encoding: crate::generate::Encoding::Hex },
            grace: None,
        }
    }

    fn row(name: &str, kind: PolicyKind, interval: Micros, validity: Option<Micros>) -> RotationPolicy {
        RotationPolicy {
            name: name.into(),
            kind,
            interval_us: Some(interval),
            validity_us: validity,
            at: None,
            generator: "{}".into(),
            grace_us: 0,
            next_run_at: None,
            rotations: 0,
            last_rotated_at: None,
            last_error: None,
            updated_at: NOW,
        }
    }

    #[test]
    fn jitter_is_fixed_per_name_and_bounded() {
        let window = Duration::from_secs(600);
        let mut distinct = std::collections::HashSet::new();
        for i in 0..1000 {
            let name = format!("svc/{i}/key");
            let j = schedule_jitter(&name, window, HOUR);
            assert_eq!(j, schedule_jitter(&name, window, HOUR), "the same on every call (and daemon)");
            assert!((0..=600 * SECOND).contains(&j), "{name}: {j}");
            // Never more than half the interval, whatever the window.
            assert!(schedule_jitter(&name, window, 10 * SECOND) <= 5 * SECOND);
            distinct.insert(j);
        }
        assert!(distinct.len() > 990, "offsets spread: {} distinct of 1000", distinct.len());
        assert_eq!(schedule_jitter("svc/x", Duration::ZERO, HOUR), 0, "no window, no jitter");
        assert_eq!(schedule_jitter("svc/x", window, 0), 0, "no interval, no jitter");
    }

    #[test]
    fn credentials_given_one_schedule_at_once_spread_over_the_window() {
        // 1,000 credentials get the same hourly policy in the same microsecond. Without
        // jitter all are due in the same instant; with a 60 s window every second of the
        // window gets some of them and none gets a burst (16.4 a second on average).
        let hourly = spec(PolicyKind::Periodic, HOUR, None);
        assert_eq!(first_run(&hourly, NOW, None, 0), Some(NOW + HOUR));
        let mut per_second = [0u32; 61];
        for i in 0..1000 {
            let name = format!("team-{}/db/{i}", i % 7);
            let jitter = schedule_jitter(&name, Duration::from_secs(60), HOUR);
            let due = first_run(&hourly, NOW, None, jitter).unwrap();
            assert!((NOW + HOUR..=NOW + HOUR + 60 * SECOND).contains(&due));
            per_second[usize::try_from((due - NOW - HOUR) / SECOND).unwrap()] += 1;
        }
        assert!(per_second[..60].iter().all(|&n| n > 0), "{per_second:?}");
        assert!(per_second.iter().all(|&n| n <= 40), "no second gets a burst: {per_second:?}");
    }

    #[test]
    fn periodic_slots_keep_their_offset_and_skip_missed_ones() {
        let p = row("app/token", PolicyKind::Periodic, HOUR, None);
        let jitter = schedule_jitter(&p.name, Duration::from_secs(300), HOUR);
        assert!(jitter > 0);
        let first = NOW + HOUR + jitter;
        // The scheduler takes the slot a little late: the next one is a period on.
        assert_eq!(plan(&p, Some(first), first + 2 * SECOND, jitter).next_run_at, Some(first + HOUR));
        // Slots missed while no daemon ran are skipped; the offset is kept.
        let late = first + 3 * HOUR;
        assert_eq!(plan(&p, Some(first), late, jitter).next_run_at, Some(late + HOUR + jitter));
        // A rotation by request starts the chain over from now, with the same offset.
        assert_eq!(plan(&p, None, NOW, jitter).next_run_at, Some(NOW + HOUR + jitter));
    }

    #[test]
    fn before_expiry_jitter_only_moves_rotations_earlier() {
        let (lead, validity) = (24 * HOUR, 30 * 24 * HOUR);
        let p = row("tls/cert", PolicyKind::BeforeExpiry, lead, Some(validity));
        let jitter = schedule_jitter(&p.name, Duration::from_secs(86_400), lead);
        assert!(jitter > 0 && jitter <= lead / 2, "{jitter}");
        let planned = plan(&p, None, NOW, jitter);
        assert_eq!(planned.expires_at, Some(NOW + validity));
        assert_eq!(planned.next_run_at, Some(NOW + validity - lead - jitter));
        let s = spec(PolicyKind::BeforeExpiry, lead, Some(validity));
        let expires = NOW + 10 * 24 * HOUR;
        assert_eq!(first_run(&s, NOW, Some(expires), jitter), Some(expires - lead - jitter));
        assert_eq!(first_run(&s, NOW, Some(expires), 0), Some(expires - lead));
    }
}
