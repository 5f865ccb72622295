//! Token changes between daemons: a created or revoked token is named on the change
//! feed, so other daemons refresh that one entry; a lost notification is made good by
//! the periodic full reload. Also what running behind a transaction-mode pooler needs:
//! the separate LISTEN connection (`database_listen_url`) and the driver's statement
//! cache turned off.

use std::time::Duration;

use tonic::Code;

use credvault::config::DatabaseUrl;
use credvault::proto;

use crate::helpers::{client_with, create_token, eventually, put, rule, Backend, Raw, TestDaemon, TestEnv};
use crate::proxy::PgProxy;

/// A token that may read `t/*`; returns its text and id.
async fn create_reader(d: &TestDaemon, name: &str) -> (String, String) {
    create_token(d, name, vec![rule("t/*", &[proto::Capability::Read], false)], 0, None).await
}

/// What `token` gets on `d` for a read of a missing name: NOT_FOUND while the daemon
/// accepts it, UNAUTHENTICATED once it does not.
async fn code_for(d: &TestDaemon, token: &str) -> Code {
    let mut c = client_with(d, token).await;
    c.get_credential(proto::GetCredentialRequest { name: "t/missing".into(), version: None })
        .await
        .map(|_| Code::Ok)
        .unwrap_or_else(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_on_one_daemon_are_applied_one_by_one_on_another() {
    let env = TestEnv::new(Backend::Postgres).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let b = TestDaemon::start(env.settings(), Some(&a.token)).await;
    // B's start-up and its first feed subscription each reload the whole table.
    eventually("B's feed subscribed", Duration::from_secs(10), async || b.auth.update_counts().0 >= 2).await;
    let mut tokens = Vec::new();
    let (full_before, one_before) = b.auth.update_counts();
    for i in 0..20 {
        tokens.push(create_reader(&a, &format!("w{i}")).await);
    }
    for (token, _) in &tokens {
        eventually("B accepts a token created on A", Duration::from_secs(10), async || {
            code_for(&b, token).await == Code::NotFound
        })
        .await;
    }
    for (token, id) in &tokens[..5] {
        a.admin().await.revoke_token(proto::RevokeTokenRequest { id: id.clone() }).await.unwrap();
        assert_eq!(code_for(&a, token).await, Code::Unauthenticated, "at once on A");
        eventually("B refuses a token revoked on A", Duration::from_secs(10), async || {
            code_for(&b, token).await == Code::Unauthenticated
        })
        .await;
    }
    for (token, _) in &tokens[5..] {
        assert_eq!(code_for(&b, token).await, Code::NotFound, "the others still work on B");
    }
    let (full, one) = b.auth.update_counts();
    assert_eq!(full, full_before, "no full reload for named token changes");
    assert!(one - one_before >= 25, "one refresh per change: {}", one - one_before);
    a.stop().await;
    b.stop().await;
}

/// B's change feed goes through its own URL (here a proxy, standing in for a direct
/// connection beside a pooler), while its pool goes straight to PostgreSQL. The feed is
/// seen on its own connection; cutting it leaves B serving, and a token revoked on A
/// while B cannot hear is refused by B within its backstop period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listen_url_carries_the_feed_and_the_backstop_covers_its_loss() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut proxy = PgProxy::start().await;
    let a = TestDaemon::start(env.settings(), None).await;
    let mut settings = env.settings();
    settings.database_listen_url = Some(DatabaseUrl::new(proxy.url(&env.database_url())));
    settings.token_resync_seconds = 1;
    let b = TestDaemon::start(settings, Some(&a.token)).await;

    let Raw::Pg(raw) = env.raw().await else { unreachable!() };
    let database = env.database_url().rsplit('/').next().unwrap().split('?').next().unwrap().to_owned();
    let listeners = async || -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'credvault-listener' AND query LIKE 'LISTEN%'",
        )
        .bind(&database)
        .fetch_one(&raw)
        .await
        .unwrap()
    };
    // One feed connection each for A and B (the feed never uses a query connection).
    eventually("both feeds on their own connections", Duration::from_secs(10), async || listeners().await == 2).await;

    // Notifications reach B through it.
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    put(&mut ca, "t/x", b"1", None).await.unwrap();
    assert_eq!(crate::helpers::get(&mut cb, "t/x", None).await.unwrap().0, 1);
    put(&mut ca, "t/x", b"2", None).await.unwrap();
    eventually("B sees A's write", Duration::from_secs(10), async || {
        crate::helpers::get(&mut cb, "t/x", None).await.unwrap().0 == 2
    })
    .await;

    let (token, id) = create_reader(&a, "cut-off").await;
    eventually("B accepts the new token", Duration::from_secs(10), async || {
        code_for(&b, &token).await == Code::NotFound
    })
    .await;
    proxy.cut().await;
    eventually("B's feed is gone", Duration::from_secs(10), async || listeners().await == 1).await;
    a.admin().await.revoke_token(proto::RevokeTokenRequest { id }).await.unwrap();
    // Nothing tells B; its 1 s backstop reload does.
    eventually("B refuses the token revoked while it could not hear", Duration::from_secs(5), async || {
        code_for(&b, &token).await == Code::Unauthenticated
    })
    .await;
    // B's own pool never depended on the feed's connection.
    assert_eq!(crate::helpers::get(&mut cb, "t/x", None).await.unwrap().0, 2);

    proxy.restore().await;
    eventually("B's feed is back", Duration::from_secs(15), async || listeners().await == 2).await;
    raw.close().await;
    a.stop().await;
    b.stop().await;
}

/// `statement-cache-capacity=0` (for a pooler without prepared-statement support): every
/// statement runs unnamed, and everything still works, writes and the feed included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_cache_can_be_turned_off() {
    let env = TestEnv::new(Backend::Postgres).await;
    let mut settings = env.settings();
    let url = env.database_url();
    let sep = if url.contains('?') { '&' } else { '?' };
    settings.database_url = Some(DatabaseUrl::new(format!("{url}{sep}statement-cache-capacity=0")));
    let a = TestDaemon::start(settings.clone(), None).await;
    let b = TestDaemon::start(settings, Some(&a.token)).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for v in 1..=3u64 {
        assert_eq!(put(&mut ca, "t/nocache", format!("v{v}").as_bytes(), None).await.unwrap(), v);
        eventually("B sees the write", Duration::from_secs(10), async || {
            crate::helpers::get(&mut cb, "t/nocache", None).await.unwrap().0 == v
        })
        .await;
    }
    a.stop().await;
    b.stop().await;
}

/// Revocation looks a token up by a prefix of its hash, through an index: an exact
/// prefix finds it in any case, a shared prefix is ambiguous, a revoked token is gone.
async fn revoking_by_id_finds_exactly_one_token(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let a = TestDaemon::start(env.settings(), None).await;
    let store = env.store().await;
    // Two tokens whose hashes share their first twelve characters, and one more.
    for tail in ["1", "2"] {
        let hash = format!("{:0<64}", format!("abcdef012345{tail}"));
        let row = credvault::store::TokenRecord {
            token_hash: hash,
            display_name: "twin".into(),
            policies: "[]".into(),
            created_at: 1,
            expires_at: None,
            revoked_at: None,
        };
        store.insert_token(&row).await.unwrap();
    }
    let (token, id) = create_reader(&a, "needle").await;
    let mut admin = a.admin().await;
    let short = admin.revoke_token(proto::RevokeTokenRequest { id: "abcdef0".into() }).await.unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    let twins = admin.revoke_token(proto::RevokeTokenRequest { id: "abcdef012345".into() }).await.unwrap_err();
    assert_eq!(twins.code(), Code::InvalidArgument, "{twins:?}");
    assert!(twins.message().contains("ambiguous"), "{twins:?}");
    admin.revoke_token(proto::RevokeTokenRequest { id: "abcdef0123451".into() }).await.unwrap();
    // Now only one live token has the shared prefix.
    admin.revoke_token(proto::RevokeTokenRequest { id: "abcdef012345".into() }).await.unwrap();

    admin.revoke_token(proto::RevokeTokenRequest { id: id[..8].to_ascii_uppercase() }).await.unwrap();
    assert_eq!(code_for(&a, &token).await, Code::Unauthenticated);
    let again = admin.revoke_token(proto::RevokeTokenRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");
    let not_hex = admin.revoke_token(proto::RevokeTokenRequest { id: "abcdefg12345".into() }).await.unwrap_err();
    assert_eq!(not_hex.code(), Code::InvalidArgument, "{not_hex:?}");
    a.stop().await;
}

crate::both_backends!(revoking_by_id_finds_exactly_one_token);
