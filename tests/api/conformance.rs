//! The storage conformance suite: the same cases against PostgreSQL and SQLite.

use credvault::crypto::Sealed;
use credvault::store::{
    now_micros, AuditRow, KekRow, KekState, KeyringRow, ListQuery, MasterKeySource, Metadata, NewVersion, Store,
    StoreError, TokenRecord, VersionState, WriteBase,
};

use credvault::names::{self, NameRange};

use crate::both_backends;
use crate::helpers::{Backend, TestEnv};

both_backends!(
    keyring_is_initialised_once,
    create_update_and_read,
    compare_and_set_rejects_stale_bases,
    history_is_pruned_to_max_versions,
    soft_delete_and_revive,
    pagination_is_stable_across_inserts,
    batch_reads_current_versions,
    tokens_round_trip,
    audit_batches_round_trip,
);

fn sealed(tag: u8) -> Sealed {
    Sealed { kek_id: 1, wrapped_dek: vec![tag; 60], ciphertext: vec![tag; 40] }
}

/// A store with a keyring and KEK 1, as every daemon has.
async fn ready(backend: Backend) -> (TestEnv, std::sync::Arc<dyn Store>) {
    let env = TestEnv::new(backend).await;
    let store = env.store().await;
    let keyring = KeyringRow { source: MasterKeySource::KeyFile, kdf: None, verifier: vec![1, 2, 3], created_at: 1 };
    let kek = KekRow { id: 1, wrapped_key: vec![9; 61], state: KekState::Active, created_at: 1 };
    assert!(store.init_keyring(&keyring, &kek).await.unwrap());
    (env, store)
}

/// Writes and checks the returned head names the new version.
async fn put(store: &dyn Store, name: &str, base: WriteBase, tag: u8, max: u64) -> Result<(), StoreError> {
    let head = store
        .put_version(&NewVersion {
            name,
            base,
            sealed: &sealed(tag),
            metadata: None,
            now: now_micros(),
            max_versions: max,
            previous_expires_at: None,
            kind: credvault::store::ChangeKind::Put,
            policy: None,
        })
        .await?;
    assert_eq!((head.name.as_str(), head.current_version, head.deleted_at), (name, base.next_version(), None));
    Ok(())
}

async fn keyring_is_initialised_once(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let other = KeyringRow { source: MasterKeySource::Passphrase, kdf: None, verifier: vec![7], created_at: 2 };
    let kek = KekRow { id: 2, wrapped_key: vec![1], state: KekState::Active, created_at: 2 };
    assert!(!store.init_keyring(&other, &kek).await.unwrap(), "a second init must not replace the keyring");
    let k = store.load_keyring().await.unwrap().unwrap();
    assert_eq!((k.source, k.verifier), (MasterKeySource::KeyFile, vec![1, 2, 3]));
    let keks = store.list_keks().await.unwrap();
    assert_eq!(keks.len(), 1, "the losing init's KEK must not be stored");
    assert_eq!(keks[0].wrapped_key, vec![9; 61]);
}

async fn create_update_and_read(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let meta = Metadata {
        labels: [("team".to_owned(), "payments".to_owned())].into(),
        description: "d".into(),
        owner: "o".into(),
        expires_at: Some(42),
    };
    store
        .put_version(&NewVersion {
            name: "a/b",
            base: WriteBase::Create,
            sealed: &sealed(1),
            metadata: Some(&meta),
            now: 100,
            max_versions: 10,
            previous_expires_at: None,
            kind: credvault::store::ChangeKind::Put,
            policy: None,
        })
        .await
        .unwrap();
    put(store.as_ref(), "a/b", WriteBase::Update(1), 2, 10).await.unwrap();

    let (head, row) = store.get_version("a/b", None).await.unwrap().unwrap();
    assert_eq!(head.current_version, 2);
    assert_eq!(head.metadata, meta, "metadata: None keeps what was stored");
    assert_eq!(head.created_at, 100);
    let row = row.unwrap();
    assert_eq!((row.info.version, row.info.state), (2, VersionState::Current));
    assert_eq!(row.sealed, Some(sealed(2)));

    let (_, v1) = store.get_version("a/b", Some(1)).await.unwrap().unwrap();
    let v1 = v1.unwrap();
    assert_eq!((v1.info.state, v1.sealed), (VersionState::Previous, Some(sealed(1))));
    let (_, missing) = store.get_version("a/b", Some(3)).await.unwrap().unwrap();
    assert!(missing.is_none());
    assert!(store.get_version("nope", None).await.unwrap().is_none());

    let versions = store.list_versions("a/b").await.unwrap();
    assert_eq!(versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(store.count_credentials().await.unwrap(), 1);
}

async fn compare_and_set_rejects_stale_bases(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let s = store.as_ref();
    put(s, "x", WriteBase::Create, 1, 10).await.unwrap();
    assert!(matches!(put(s, "x", WriteBase::Create, 9, 10).await, Err(StoreError::Conflict)));
    put(s, "x", WriteBase::Update(1), 2, 10).await.unwrap();
    assert!(matches!(put(s, "x", WriteBase::Update(1), 9, 10).await, Err(StoreError::Conflict)));
    assert!(matches!(put(s, "x", WriteBase::Revive(2), 9, 10).await, Err(StoreError::Conflict)), "not deleted");
    assert!(matches!(put(s, "nope", WriteBase::Update(0), 9, 10).await, Err(StoreError::Conflict)));
    // Losers changed nothing.
    let (head, row) = s.get_version("x", None).await.unwrap().unwrap();
    assert_eq!(head.current_version, 2);
    assert_eq!(row.unwrap().sealed, Some(sealed(2)));
    assert_eq!(s.list_versions("x").await.unwrap().len(), 2);
}

async fn history_is_pruned_to_max_versions(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let s = store.as_ref();
    put(s, "h", WriteBase::Create, 1, 3).await.unwrap();
    for v in 1..7u8 {
        put(s, "h", WriteBase::Update(u64::from(v)), v + 1, 3).await.unwrap();
    }
    let versions = s.list_versions("h").await.unwrap();
    assert_eq!(versions.iter().map(|v| v.version).collect::<Vec<_>>(), vec![7, 6, 5]);
    assert_eq!(versions.iter().filter(|v| v.state == VersionState::Current).count(), 1);
    let (_, pruned) = s.get_version("h", Some(4)).await.unwrap().unwrap();
    assert!(pruned.is_none());
}

async fn soft_delete_and_revive(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let s = store.as_ref();
    put(s, "d", WriteBase::Create, 1, 10).await.unwrap();
    assert!(!s.delete_credential("d", Some(5), 10).await.unwrap(), "wrong expected version deletes nothing");
    assert!(s.delete_credential("d", Some(1), 10).await.unwrap());
    assert!(!s.delete_credential("d", None, 11).await.unwrap(), "already deleted");
    assert!(!s.delete_credential("missing", None, 11).await.unwrap());
    let head = s.get_credential("d").await.unwrap().unwrap();
    assert_eq!(head.deleted_at, Some(10));
    assert_eq!(s.count_credentials().await.unwrap(), 0);
    // Versions survive a soft delete.
    assert_eq!(s.list_versions("d").await.unwrap().len(), 1);
    // A live-update base cannot write over a deleted credential; a revive can.
    assert!(matches!(put(s, "d", WriteBase::Update(1), 2, 10).await, Err(StoreError::Conflict)));
    put(s, "d", WriteBase::Revive(1), 2, 10).await.unwrap();
    let head = s.get_credential("d").await.unwrap().unwrap();
    assert_eq!((head.current_version, head.deleted_at), (2, None));
}

async fn pagination_is_stable_across_inserts(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let s = store.as_ref();
    for n in ["team-a/1", "team-a/3", "team-a/5", "team-a/7", "team-ab/x", "team-b/1", "team-a"] {
        put(s, n, WriteBase::Create, 1, 10).await.unwrap();
    }
    // The vault resumes a listing at `after(last name)`; the range is the prefix's.
    let range = NameRange::prefix("team-a/");
    let page = |after: Option<&str>| {
        let start = after.map(names::after).unwrap_or_else(|| range.start.clone());
        (start, range.end.clone())
    };
    async fn list(s: &dyn Store, bounds: (String, String), include_deleted: bool) -> Vec<String> {
        let q = ListQuery { start: &bounds.0, end: &bounds.1, limit: 2, include_deleted };
        s.list_credentials(&q).await.unwrap().into_iter().map(|r| r.name).collect()
    }
    assert_eq!(list(s, page(None), false).await, vec!["team-a/1", "team-a/3"]);
    // Inserts before and after the cursor: earlier names are not repeated, later ones appear.
    put(s, "team-a/0", WriteBase::Create, 1, 10).await.unwrap();
    put(s, "team-a/4", WriteBase::Create, 1, 10).await.unwrap();
    assert_eq!(list(s, page(Some("team-a/3")), false).await, vec!["team-a/4", "team-a/5"]);
    assert_eq!(list(s, page(Some("team-a/5")), false).await, vec!["team-a/7"]);
    // Deleted names are hidden unless asked for.
    assert!(s.delete_credential("team-a/7", None, 1).await.unwrap());
    assert!(list(s, page(Some("team-a/5")), false).await.is_empty());
    assert_eq!(list(s, page(Some("team-a/5")), true).await, vec!["team-a/7"]);
    // A prefix without a slash matches across segment boundaries; empty lists all in order.
    let all = NameRange::prefix("");
    let q = ListQuery { start: &all.start, end: &all.end, limit: 100, include_deleted: true };
    let all: Vec<String> = s.list_credentials(&q).await.unwrap().into_iter().map(|r| r.name).collect();
    let mut sorted = all.clone();
    sorted.sort();
    assert_eq!(all, sorted);
    assert_eq!(all.len(), 9);
    let a = NameRange::prefix("team-a");
    let q = ListQuery { start: &a.start, end: &a.end, limit: 100, include_deleted: false };
    assert_eq!(s.list_credentials(&q).await.unwrap().len(), 7);
    // An exact range holds one name, not the names that start with it.
    let exact = NameRange::exact("team-a");
    let q = ListQuery { start: &exact.start, end: &exact.end, limit: 100, include_deleted: false };
    let one: Vec<String> = s.list_credentials(&q).await.unwrap().into_iter().map(|r| r.name).collect();
    assert_eq!(one, vec!["team-a"]);
}

async fn batch_reads_current_versions(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let s = store.as_ref();
    put(s, "b/1", WriteBase::Create, 1, 10).await.unwrap();
    put(s, "b/1", WriteBase::Update(1), 2, 10).await.unwrap();
    put(s, "b/2", WriteBase::Create, 3, 10).await.unwrap();
    let names = vec!["b/1".to_owned(), "b/2".to_owned(), "b/3".to_owned()];
    let mut rows = s.get_current_many(&names).await.unwrap();
    rows.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    assert_eq!(rows.len(), 2);
    assert_eq!((rows[0].1.info.version, rows[0].1.sealed.clone()), (2, Some(sealed(2))));
    assert_eq!((rows[1].1.info.version, rows[1].1.sealed.clone()), (1, Some(sealed(3))));
    assert!(s.get_current_many(&[]).await.unwrap().is_empty());
}

async fn tokens_round_trip(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let t = TokenRecord {
        token_hash: "ab".repeat(32),
        display_name: "ci".into(),
        policies: "[]".into(),
        created_at: 5,
        expires_at: Some(10),
        revoked_at: None,
    };
    store.insert_token(&t).await.unwrap();
    assert!(store.insert_token(&t).await.is_err(), "token hashes are unique");
    assert_eq!(store.list_tokens().await.unwrap(), vec![t]);
}

/// Batches of any size, with absent credential and version, Unicode, quotes and the
/// extremes of each number column come back exactly as written, in order.
async fn audit_batches_round_trip(backend: Backend) {
    let (_env, store) = ready(backend).await;
    let row = |i: u64| AuditRow {
        at: 1_700_000_000_000_000 + i as i64,
        request_id: format!("{i:016x}"),
        token_id: "abcdef012345".into(),
        token_name: if i % 2 == 0 { "ops \"root\" \u{e9}\u{4e2d}'; --".into() } else { String::new() },
        rpc: "GetCredential".into(),
        credential: (i % 3 != 0).then(|| format!("team/app-{i}")),
        version: (i % 3 == 1).then_some(if i == 1 { i64::MAX as u64 } else { i }),
        code: "OK".into(),
        latency_us: if i == 2 { i64::MAX as u64 } else { i * 7 },
        peer: "[::1]:50051".into(),
        count: if i == 3 { i64::MAX as u64 } else { 1 + i % 4 },
        last_at: (i % 4 != 0).then_some(1_700_000_000_000_000 + 2 * i as i64),
    };
    let mut written = Vec::new();
    for size in [1u64, 2, 63, 500] {
        let batch: Vec<AuditRow> = (0..size).map(|i| row(written.len() as u64 + i)).collect();
        store.insert_audit(&batch).await.unwrap();
        written.extend(batch);
    }
    store.insert_audit(&[]).await.unwrap();
    let mut back = store.recent_audit(10_000).await.unwrap();
    back.reverse();
    assert_eq!(back.len(), written.len());
    assert!(back == written, "rows differ: first {:?} vs {:?}", back.first(), written.first());
}
