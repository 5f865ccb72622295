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
        if self.watch_buffer == 0 {
            return Err("rotation.watch_buffer must be at least 1".into());
        }
        Ok(())
    }

    pub(super) fn default_grace(&self) -> Duration {
        Duration::from_secs(self.default_grace_seconds)
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

fn plan(p: &RotationPolicy, claim: Option<Micros>, now: Micros) -> Plan {
    let interval = p.interval_us.unwrap_or(0);
    match p.kind {
        PolicyKind::Manual => Plan { next_run_at: None, expires_at: None },
        PolicyKind::Periodic => {
            // Slots follow each other at the period; slots missed while no daemon ran
            // are skipped, not made up in a burst.
            let next = match claim {
                Some(c) if c.saturating_add(interval) > now => c.saturating_add(interval),
                _ => now.saturating_add(interval),
            };
            Plan { next_run_at: Some(next), expires_at: None }
        }
        PolicyKind::BeforeExpiry => {
            let expires = now.saturating_add(p.validity_us.unwrap_or(0));
            Plan { next_run_at: Some(expires.saturating_sub(interval)), expires_at: Some(expires) }
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
        let plan = policy.as_ref().map(|p| plan(p, None, now));
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
        let next_run_at = match spec.kind {
            PolicyKind::Manual => None,
            PolicyKind::Periodic => Some(now.saturating_add(interval.unwrap_or(0))),
            PolicyKind::BeforeExpiry => {
                // Without an expiry yet, treat the current value as issued now.
                let expires = head.metadata.expires_at.unwrap_or(now.saturating_add(validity.unwrap_or(0)));
                Some(expires.saturating_sub(interval.unwrap_or(0)))
            }
            PolicyKind::Scheduled => spec.at,
        };
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
            let plan = plan(policy, Some(claim), self.now());
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
