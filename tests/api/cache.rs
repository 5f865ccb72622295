//! The hot path: hits make no store query, misses coalesce, fills never go stale, and
//! daemons sharing PostgreSQL invalidate each other.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tonic::Code;

use credvault::proto::BatchGetCredentialsRequest;
use credvault::store::{
    AuditStore, Backend as StoreBackend, ChangeSink, CredentialHead, CredentialStore, IdentityRecord, IdentityStore,
    JobStore, KekRow, KeyStore, KeyringRow, ListFilter, ListQuery, Micros, NewVersion, PolicyStore, PoolStats,
    RewrapBatch, RewrapRow, RotationJob, RotationPolicy, Staleness, StalenessQuery, StalenessStore, Store, StoreError,
    TokenRecord, TokenStore, VersionInfo, VersionRow,
};
use credvault::vault::Vault;

use crate::both_backends;
use crate::helpers::{
    assert_status, eventually, get, put, scrape, series_value as value, Backend, TestDaemon, TestEnv,
};

both_backends!(hits_make_no_store_queries, concurrent_misses_make_one_query, not_found_is_cached_until_a_put);

async fn hits_make_no_store_queries(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let names: Vec<String> = (0..10).map(|i| format!("hot/{i}")).collect();
    for n in &names {
        put(&mut c, n, format!("value-of-{n}").as_bytes(), None).await.unwrap();
    }
    let before = d.vault.store_queries();
    for i in 0..1000 {
        let n = &names[i % names.len()];
        let (_, value) = get(&mut c, n, None).await.unwrap();
        assert_eq!(value, format!("value-of-{n}").into_bytes());
    }
    let batch = c.batch_get_credentials(BatchGetCredentialsRequest { names: names.clone() }).await.unwrap();
    assert_eq!(batch.into_inner().results.len(), 10);
    assert_eq!(d.vault.store_queries(), before, "1,000 hits (authentication included) made store queries");
    d.stop().await;
}

async fn concurrent_misses_make_one_query(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    put(&mut c, "coalesce/x", b"v", None).await.unwrap();
    d.vault.cache().clear();
    let before = d.vault.store_queries();
    let mut tasks = Vec::new();
    for _ in 0..32 {
        let mut c = d.client().await;
        tasks.push(tokio::spawn(async move { get(&mut c, "coalesce/x", None).await }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().1, b"v");
    }
    // Whether a caller waited on the in-flight load or arrived after it filled the cache,
    // the store saw exactly one read.
    assert_eq!(d.vault.store_queries() - before, 1);
    d.stop().await;
}

async fn not_found_is_cached_until_a_put(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    assert_status(get(&mut c, "neg/x", None).await, Code::NotFound, "not found");
    let before = d.vault.store_queries();
    for _ in 0..20 {
        assert_status(get(&mut c, "neg/x", None).await, Code::NotFound, "not found");
    }
    assert_eq!(d.vault.store_queries(), before, "not-found answers are cached");
    put(&mut c, "neg/x", b"now here", Some(0)).await.unwrap();
    assert_eq!(get(&mut c, "neg/x", None).await.unwrap(), (1, b"now here".to_vec()));
    // A delete is seen at once too.
    c.delete_credential(credvault::proto::DeleteCredentialRequest { name: "neg/x".into(), expected_version: None })
        .await
        .unwrap();
    assert_status(get(&mut c, "neg/x", None).await, Code::NotFound, "is deleted");
    d.stop().await;
}

/// A store whose next current-version read stops until released.
struct PausingStore {
    inner: Arc<dyn Store>,
    armed: std::sync::atomic::AtomicBool,
    entered: Notify,
    release: Notify,
}

#[async_trait]
impl CredentialStore for PausingStore {
    async fn get_credential(&self, name: &str) -> Result<Option<CredentialHead>, StoreError> {
        self.inner.get_credential(name).await
    }
    async fn get_version(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<(CredentialHead, Option<VersionRow>)>, StoreError> {
        let row = self.inner.get_version(name, version).await;
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            // The row is read; now stall before handing it back, like a slow network.
            self.entered.notify_one();
            self.release.notified().await;
        }
        row
    }
    async fn get_current_many(&self, names: &[String]) -> Result<Vec<(CredentialHead, VersionRow)>, StoreError> {
        self.inner.get_current_many(names).await
    }
    async fn list_versions(&self, name: &str) -> Result<Vec<VersionInfo>, StoreError> {
        self.inner.list_versions(name).await
    }
    async fn put_version(&self, new: &NewVersion<'_>) -> Result<CredentialHead, StoreError> {
        self.inner.put_version(new).await
    }
    async fn delete_credential(&self, name: &str, expected: Option<u64>, now: Micros) -> Result<bool, StoreError> {
        self.inner.delete_credential(name, expected, now).await
    }
    async fn list_credentials(&self, q: &ListQuery<'_>) -> Result<Vec<CredentialHead>, StoreError> {
        self.inner.list_credentials(q).await
    }
    async fn count_credentials(&self) -> Result<u64, StoreError> {
        self.inner.count_credentials().await
    }
    async fn destroy_version(&self, n: &str, v: u64) -> Result<Option<bool>, StoreError> {
        self.inner.destroy_version(n, v).await
    }
    async fn undelete_credential(&self, n: &str, now: Micros) -> Result<bool, StoreError> {
        self.inner.undelete_credential(n, now).await
    }
    async fn deprecate_expired(&self, now: Micros) -> Result<u64, StoreError> {
        self.inner.deprecate_expired(now).await
    }
}

#[async_trait]
impl KeyStore for PausingStore {
    async fn load_keyring(&self) -> Result<Option<KeyringRow>, StoreError> {
        self.inner.load_keyring().await
    }
    async fn init_keyring(&self, k: &KeyringRow, kek: &KekRow) -> Result<bool, StoreError> {
        self.inner.init_keyring(k, kek).await
    }
    async fn list_keks(&self) -> Result<Vec<KekRow>, StoreError> {
        self.inner.list_keks().await
    }
    async fn rekey(&self, k: &KeyringRow, old: &[u8], keks: &[(i64, Vec<u8>)]) -> Result<bool, StoreError> {
        self.inner.rekey(k, old, keks).await
    }
}

#[async_trait]
impl JobStore for PausingStore {
    async fn start_kek_rotation(&self, k: &KekRow, v: &[u8], now: Micros) -> Result<RotationJob, StoreError> {
        self.inner.start_kek_rotation(k, v, now).await
    }
    async fn get_job(&self, id: Option<i64>) -> Result<Option<RotationJob>, StoreError> {
        self.inner.get_job(id).await
    }
    async fn claim_job(&self, id: i64, o: &str, now: Micros, until: Micros) -> Result<bool, StoreError> {
        self.inner.claim_job(id, o, now, until).await
    }
    async fn rewrap_candidates(
        &self,
        a: i64,
        after: Option<(&str, u64)>,
        l: u32,
    ) -> Result<Vec<RewrapRow>, StoreError> {
        self.inner.rewrap_candidates(a, after, l).await
    }
    async fn commit_rewrap(&self, b: &RewrapBatch<'_>) -> Result<Option<u64>, StoreError> {
        self.inner.commit_rewrap(b).await
    }
    async fn finish_job(
        &self,
        id: i64,
        o: &str,
        now: Micros,
        e: Option<&str>,
    ) -> Result<Option<RotationJob>, StoreError> {
        self.inner.finish_job(id, o, now, e).await
    }
}

#[async_trait]
impl PolicyStore for PausingStore {
    async fn put_rotation_policy(&self, p: &RotationPolicy) -> Result<bool, StoreError> {
        self.inner.put_rotation_policy(p).await
    }
    async fn get_rotation_policy(&self, n: &str) -> Result<Option<RotationPolicy>, StoreError> {
        self.inner.get_rotation_policy(n).await
    }
    async fn delete_rotation_policy(&self, n: &str) -> Result<bool, StoreError> {
        self.inner.delete_rotation_policy(n).await
    }
    async fn due_rotations(&self, now: Micros, limit: u32) -> Result<Vec<RotationPolicy>, StoreError> {
        self.inner.due_rotations(now, limit).await
    }
    async fn defer_rotation(&self, n: &str, claim: Micros, retry: Micros, e: &str) -> Result<bool, StoreError> {
        self.inner.defer_rotation(n, claim, retry, e).await
    }
}

#[async_trait]
impl TokenStore for PausingStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        self.inner.insert_token(t).await
    }
    async fn get_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.get_token(hash).await
    }
    async fn find_live_tokens(&self, prefix: &str, limit: u32) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.find_live_tokens(prefix, limit).await
    }
    async fn insert_first_token(&self, t: &TokenRecord) -> Result<bool, StoreError> {
        self.inner.insert_first_token(t).await
    }
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.inner.list_tokens().await
    }
    async fn revoke_token(&self, h: &str, now: Micros) -> Result<bool, StoreError> {
        self.inner.revoke_token(h, now).await
    }
}

#[async_trait]
impl AuditStore for PausingStore {
    async fn insert_audit(&self, e: &[credvault::store::AuditRow]) -> Result<(), StoreError> {
        self.inner.insert_audit(e).await
    }
    async fn recent_audit(&self, n: u32) -> Result<Vec<credvault::store::AuditRow>, StoreError> {
        self.inner.recent_audit(n).await
    }
    async fn prune_audit(&self, before: Micros, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_audit(before, limit).await
    }
}

#[async_trait]
impl IdentityStore for PausingStore {
    async fn insert_identity(&self, r: &IdentityRecord) -> Result<bool, StoreError> {
        self.inner.insert_identity(r).await
    }
    async fn list_identities(&self) -> Result<Vec<IdentityRecord>, StoreError> {
        self.inner.list_identities().await
    }
    async fn delete_identity(&self, identity: &str) -> Result<Option<IdentityRecord>, StoreError> {
        self.inner.delete_identity(identity).await
    }
}

#[async_trait]
impl StalenessStore for PausingStore {
    async fn staleness(&self, q: &StalenessQuery) -> Result<Staleness, StoreError> {
        self.inner.staleness(q).await
    }
    async fn list_filtered(
        &self,
        q: &ListQuery<'_>,
        f: &ListFilter,
    ) -> Result<Vec<(CredentialHead, bool)>, StoreError> {
        self.inner.list_filtered(q, f).await
    }
}

#[async_trait]
impl credvault::store::WriteStore for PausingStore {
    async fn put_version_keyed(
        &self,
        new: &NewVersion<'_>,
        key: &credvault::store::KeyClaim,
    ) -> Result<CredentialHead, StoreError> {
        self.inner.put_version_keyed(new, key).await
    }
    async fn delete_credential_keyed(
        &self,
        name: &str,
        expected: Option<u64>,
        now: Micros,
        key: &credvault::store::KeyClaim,
    ) -> Result<bool, StoreError> {
        self.inner.delete_credential_keyed(name, expected, now, key).await
    }
    async fn get_idempotency_key(
        &self,
        token_id: &str,
        key: &str,
        now: Micros,
    ) -> Result<Option<credvault::store::KeyRecord>, StoreError> {
        self.inner.get_idempotency_key(token_id, key, now).await
    }
    async fn prune_idempotency_keys(&self, now: Micros, limit: u32) -> Result<u64, StoreError> {
        self.inner.prune_idempotency_keys(now, limit).await
    }
    async fn write_batch(
        &self,
        batch: &credvault::store::BatchWrite<'_>,
    ) -> Result<credvault::store::BatchOutcome, StoreError> {
        self.inner.write_batch(batch).await
    }
    async fn set_metadata(
        &self,
        name: &str,
        metadata: &credvault::store::Metadata,
        expected: u64,
        now: Micros,
    ) -> Result<Option<CredentialHead>, StoreError> {
        self.inner.set_metadata(name, metadata, expected, now).await
    }
}

#[async_trait]
impl Store for PausingStore {
    fn backend(&self) -> StoreBackend {
        self.inner.backend()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    fn pool_stats(&self) -> PoolStats {
        self.inner.pool_stats()
    }
    async fn watch_changes(&self, s: ChangeSink, r: tokio::sync::watch::Receiver<bool>) -> Result<(), StoreError> {
        self.inner.watch_changes(s, r).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_fill_never_overwrites_a_newer_write() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let settings = env.settings();
    let inner = env.store().await;
    let keys = credvault::unlock::unlock(inner.as_ref(), &settings.master_key_spec()).await.unwrap();
    let store = Arc::new(PausingStore { inner, armed: false.into(), entered: Notify::new(), release: Notify::new() });
    let vault = Vault::new(store.clone(), keys, settings.limits.vault(), settings.cache.clone());
    vault.put("race/x", b"old", None, None).await.unwrap();
    vault.cache().clear();

    store.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let slow = {
        let vault = vault.clone();
        tokio::spawn(async move { vault.get("race/x", None).await.map(|v| (v.version, v.value.to_vec())) })
    };
    store.entered.notified().await;
    // The slow read holds version 1; a write commits version 2 meanwhile.
    vault.put("race/x", b"new", None, None).await.unwrap();
    store.release.notify_one();
    assert_eq!(slow.await.unwrap().unwrap(), (1, b"old".to_vec()), "the slow read answers what it read");

    let before = vault.store_queries();
    let now = vault.get("race/x", None).await.unwrap();
    assert_eq!((now.version, now.value.as_slice()), (2, b"new".as_slice()), "the cache kept the newer version");
    assert_eq!(vault.store_queries(), before, "served from the cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_postgres_invalidate_each_other() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let mut ca = a.client().await;
    let mut cb = b.client().await;

    put(&mut ca, "shared/x", b"v1", None).await.unwrap();
    assert_eq!(get(&mut cb, "shared/x", None).await.unwrap().1, b"v1");
    // A's notification of that put may arrive while B's first read is still loading it
    // (the fill is then voided, and the next read loads it again); one that arrives
    // later leaves the version B holds. Either way B then serves it from memory.
    eventually("B caches it", Duration::from_secs(1), async || {
        let before = b.vault.store_queries();
        let v = get(&mut cb, "shared/x", None).await.unwrap().1;
        v == b"v1" && b.vault.store_queries() == before
    })
    .await;

    put(&mut ca, "shared/x", b"v2", None).await.unwrap();
    eventually("B sees A's put", Duration::from_secs(1), async || {
        get(&mut cb, "shared/x", None).await.unwrap().1 == b"v2"
    })
    .await;

    // A delete through A.
    a.client()
        .await
        .delete_credential(credvault::proto::DeleteCredentialRequest {
            name: "shared/x".into(),
            expected_version: None,
        })
        .await
        .unwrap();
    eventually("B sees A's delete", Duration::from_secs(1), async || {
        get(&mut cb, "shared/x", None).await.is_err_and(|s| s.code() == Code::NotFound)
    })
    .await;
    put(&mut ca, "shared/x", b"v3", None).await.unwrap();
    eventually("B sees the revive", Duration::from_secs(1), async || {
        get(&mut cb, "shared/x", None).await.is_ok_and(|r| r.1 == b"v3")
    })
    .await;

    // Kill every LISTEN connection from the server side. B must not keep serving what it
    // cached while it was deaf: it clears its cache once it has re-subscribed.
    let raw = sqlx::PgPool::connect(&env.database_url()).await.unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
    )
    .fetch_all(&raw)
    .await
    .unwrap();
    assert!(killed.len() >= 2, "expected both daemons' listeners, killed {}", killed.len());
    put(&mut ca, "shared/x", b"v4", None).await.unwrap();
    eventually("B serves the write made while its listener was down", Duration::from_secs(1), async || {
        get(&mut cb, "shared/x", None).await.is_ok_and(|r| r.1 == b"v4")
    })
    .await;
    // And it is subscribed again: a later write still propagates.
    put(&mut ca, "shared/x", b"v5", None).await.unwrap();
    eventually("B sees writes after resubscribing", Duration::from_secs(1), async || {
        get(&mut cb, "shared/x", None).await.is_ok_and(|r| r.1 == b"v5")
    })
    .await;
    raw.close().await;
    a.stop().await;
    b.stop().await;
}

/// A small check of the text exposition format: every sample belongs to a metric with
/// HELP and TYPE lines, names are valid, values parse.
fn check_exposition(body: &str) {
    let mut typed = std::collections::HashSet::new();
    let mut helped = std::collections::HashSet::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            typed.insert(parts.next().unwrap().to_owned());
            let kind = parts.next().unwrap();
            assert!(["counter", "gauge", "histogram", "summary"].contains(&kind), "{line}");
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            helped.insert(rest.split(' ').next().unwrap().to_owned());
            continue;
        }
        assert!(!line.starts_with('#'), "{line}");
        let (series, v) = line.rsplit_once(' ').unwrap();
        assert!(v == "+Inf" || v == "NaN" || v.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        let family =
            ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).filter(|f| typed.contains(*f));
        let family = family.unwrap_or(name);
        assert!(typed.contains(family), "no TYPE for {name}");
        assert!(helped.contains(family), "no HELP for {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_traffic() {
    const MARKER: &str = "metrics-marker-9c1d-never-exported";
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut c = d.client().await;
    let before = scrape(&d).await;
    put(&mut c, "m/x", MARKER.as_bytes(), None).await.unwrap();
    d.vault.cache().clear();
    for _ in 0..5 {
        get(&mut c, "m/x", None).await.unwrap();
    }
    let _ = get(&mut c, "m/missing", None).await;
    let body = scrape(&d).await;
    check_exposition(&body);
    // Metrics are process-wide and other tests run in parallel: compare growth, not totals.
    let grew = |series: &str, by: f64| {
        let (a, b) = (value(&before, series), value(&body, series));
        assert!(b - a >= by, "{series}: {a} -> {b}, expected +{by}");
    };
    grew(r#"credvault_requests_total{rpc="GetCredential",code="OK"}"#, 5.0);
    grew(r#"credvault_requests_total{rpc="GetCredential",code="NOT_FOUND"}"#, 1.0);
    grew(r#"credvault_requests_total{rpc="PutCredential",code="OK"}"#, 1.0);
    grew("credvault_cache_hits_total", 4.0);
    grew("credvault_cache_misses_total", 2.0);
    grew(r#"credvault_cache_evictions_total{reason="invalidated"}"#, 1.0);
    grew("credvault_decrypt_duration_seconds_count", 1.0);
    grew(r#"credvault_request_duration_seconds_count{rpc="GetCredential"}"#, 6.0);
    grew(r#"credvault_store_query_duration_seconds_count{op="put_version"}"#, 1.0);
    for series in [
        r#"credvault_build_info{version=""#,
        r#"credvault_db_pool_connections{state="idle"}"#,
        "credvault_cache_entries ",
        "credvault_cache_bytes ",
        r#"credvault_request_duration_seconds_bucket{rpc="GetCredential",le="0.00005"}"#,
    ] {
        assert!(body.contains(series), "missing {series}");
    }
    assert!(!body.contains(MARKER) && !body.contains(&d.token), "a secret reached /metrics");
    d.stop().await;
}

/// Readers on B race a stream of writes on A, so A's notifications arrive before, during
/// and after B's loads of the versions they announce. When the writes stop, B serves
/// the last version from memory: no notification left an older version cached, and
/// the ones that came late kept what B had already loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_racing_another_daemons_writes_converge_on_the_last_one() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    let names: Vec<String> = (0..4).map(|i| format!("race2/{i}")).collect();
    let mut ca = a.client().await;
    for n in &names {
        put(&mut ca, n, b"0", None).await.unwrap();
    }
    const WRITES: u64 = 60;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for r in 0..4 {
        let (mut cb, names, stop) = (b.client().await, names.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut last = vec![0u64; names.len()];
            let mut i = r;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let k = i % names.len();
                let (v, _) = get(&mut cb, &names[k], None).await.unwrap();
                // One reader's view of one name never goes back (B's cache only moves forward).
                assert!(v >= last[k], "{}: version {v} after {}", names[k], last[k]);
                last[k] = v;
                i += 1;
            }
        }));
    }
    for round in 0..WRITES {
        let n = &names[(round % names.len() as u64) as usize];
        put(&mut ca, n, format!("{round}").as_bytes(), None).await.unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    let mut cb = b.client().await;
    let want = 1 + WRITES / names.len() as u64;
    for n in &names {
        eventually("B serves the last version", Duration::from_secs(10), async || {
            get(&mut cb, n, None).await.unwrap().0 == want
        })
        .await;
    }
    // And from memory, now that the feed has caught up.
    eventually("B serves all four from memory", Duration::from_secs(10), async || {
        let before = b.vault.store_queries();
        for n in &names {
            assert_eq!(get(&mut cb, n, None).await.unwrap().0, want);
        }
        b.vault.store_queries() == before
    })
    .await;
    a.stop().await;
    b.stop().await;
}
