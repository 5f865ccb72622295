//! Policy semantics over gRPC: each pattern form, refused patterns, and the `destroy`
//! capability for what cannot be undone or cuts a grace period short.

use std::time::Duration;

use tonic::metadata::MetadataValue;
use tonic::Code;

use credvault::proto::rotate_credential_request::Source;
use credvault::proto::rotation_policy::Generator;
use credvault::proto::{
    self, Capability, CreateTokenRequest, DestroyVersionRequest, ListTokensRequest, PasswordSpec, PolicyRule,
    RotateCredentialRequest, RotationPolicy, SetRotationPolicyRequest,
};

use crate::helpers::{
    assert_status, client_with, create_token, eventually, get, put, rule, Admin, Backend, Bearer, TestDaemon, TestEnv,
};

async fn admin_with(d: &TestDaemon, token: &str) -> Admin {
    let bearer = Bearer(format!("Bearer {token}").parse::<MetadataValue<_>>().unwrap());
    proto::admin_service_client::AdminServiceClient::with_interceptor(d.channel().await, bearer)
}

fn rotate(name: &str, grace: Option<u64>) -> RotateCredentialRequest {
    RotateCredentialRequest {
        name: name.into(),
        source: Some(Source::Value(b"next".to_vec())),
        grace_period: grace.map(|s| prost_types::Duration { seconds: s as i64, nanos: 0 }),
        expected_version: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pattern_form_allows_and_denies() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut root = d.client().await;
    let names =
        ["exact/one", "exact/one/below", "one/x", "one/x/y", "deep/x", "deep/x/y", "svc/db/pw", "svc/db/pw/old"];
    for n in names {
        put(&mut root, n, n.as_bytes(), None).await.unwrap();
    }
    let read = &[Capability::Read];
    let (token, _) = create_token(
        &d,
        "forms",
        vec![
            rule("exact/one", read, false),
            rule("one/*", read, false),
            rule("deep/**", read, false),
            rule("*/db/pw", read, false),
        ],
        0,
        None,
    )
    .await;
    let mut c = client_with(&d, &token).await;
    for (n, ok) in [
        ("exact/one", true),
        ("exact/one/below", false),
        ("one/x", true),
        ("one/x/y", false),
        ("deep/x", true),
        ("deep/x/y", true),
        ("svc/db/pw", true),
        ("svc/db/pw/old", false),
    ] {
        match get(&mut c, n, None).await {
            Ok((_, v)) => assert!(ok && v == n.as_bytes(), "{n} was readable"),
            Err(s) => {
                assert!(!ok, "{n}: {s:?}");
                assert_eq!(s.code(), Code::PermissionDenied);
                assert!(s.message().contains(&format!("may not read {n:?}")), "{}", s.message());
            }
        }
    }
    // The same forms as denies, under an allow of everything.
    let (token, _) = create_token(
        &d,
        "denies",
        vec![
            rule("**", read, false),
            rule("exact/one", read, true),
            rule("one/*", read, true),
            rule("deep/**", read, true),
            rule("*/db/pw", read, true),
        ],
        0,
        None,
    )
    .await;
    let mut c = client_with(&d, &token).await;
    for (n, ok) in [
        ("exact/one", false),
        ("exact/one/below", true),
        ("one/x", false),
        ("one/x/y", true),
        ("deep/x", false),
        ("deep/x/y", false),
        ("svc/db/pw", false),
        ("svc/db/pw/old", true),
    ] {
        let r = get(&mut c, n, None).await;
        assert_eq!(r.is_ok(), ok, "{n}: {r:?}");
        if let Err(s) = r {
            assert_eq!(s.code(), Code::PermissionDenied);
        }
    }
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misreadable_rules_are_refused_at_creation() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut admin = d.admin().await;
    let mk = |pattern: &str, caps: &[Capability]| CreateTokenRequest {
        display_name: "x".into(),
        rules: vec![PolicyRule {
            pattern: pattern.into(),
            capabilities: caps.iter().map(|c| *c as i32).collect(),
            deny: false,
        }],
        ttl: None,
        rate_limit_per_second: 0,
    };
    for (p, why) in [
        ("team-a*", "'*' must be a whole segment"),
        ("team-a/x*y", "'*' must be a whole segment"),
        ("**/secret", "'**' may only be the last segment"),
        ("team-a/", "empty segment"),
        ("team a", "contains byte 0x20"),
    ] {
        assert_status(admin.create_token(mk(p, &[Capability::Read])).await, Code::InvalidArgument, why);
    }
    assert_status(
        admin.create_token(mk("team-a/**", &[Capability::Admin])).await,
        Code::InvalidArgument,
        "admin applies to the whole vault",
    );
    // `*` alone still means everything, shown as `**`.
    admin.create_token(mk("*", &[Capability::Read, Capability::Destroy])).await.unwrap();
    let tokens = admin.list_tokens(ListTokensRequest {}).await.unwrap().into_inner().tokens;
    let x = tokens.iter().find(|t| t.display_name == "x").unwrap();
    assert_eq!(x.rules[0].pattern, "**");
    assert_eq!(x.rules[0].capabilities, vec![Capability::Read as i32, Capability::Destroy as i32]);
    let root = tokens.iter().find(|t| t.display_name == "root").unwrap();
    assert!(root.rules[0].capabilities.contains(&(Capability::Destroy as i32)), "the root token may destroy");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroying_and_cutting_grace_need_destroy() {
    let env = TestEnv::new(Backend::Sqlite).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut root = d.client().await;
    for n in ["ops/a", "ops/b"] {
        put(&mut root, n, b"v1", None).await.unwrap();
        put(&mut root, n, b"v2", None).await.unwrap();
    }
    let everyday = &[Capability::Read, Capability::Write, Capability::Delete, Capability::Rotate];
    let (plain, _) = create_token(&d, "operator", vec![rule("ops/**", everyday, false)], 0, None).await;
    let mut a = admin_with(&d, &plain).await;
    let r = a.destroy_version(DestroyVersionRequest { name: "ops/a".into(), version: 1 }).await;
    assert_status(r, Code::PermissionDenied, "token \"operator\" may not destroy \"ops/a\"");
    let r = a.rotate_credential(rotate("ops/a", Some(0))).await;
    assert_status(r, Code::PermissionDenied, "a grace period of 0ns for \"ops/a\" is shorter than the 3600s it would otherwise get (the server default); cutting a grace period short needs the destroy capability");
    let r = a.rotate_credential(rotate("ops/a", Some(60))).await;
    assert_status(r, Code::PermissionDenied, "needs the destroy capability");
    // The usual grace, or a longer one, needs only rotate.
    a.rotate_credential(rotate("ops/a", None)).await.unwrap();
    a.rotate_credential(rotate("ops/a", Some(7200))).await.unwrap();
    // Against a policy's grace period (set by root: 120 s, below the default).
    let policy = RotationPolicy {
        name: "ops/b".into(),
        kind: proto::PolicyKind::Manual as i32,
        generator: Some(Generator::Password(PasswordSpec { length: 16, ..Default::default() })),
        grace_period: Some(Duration::from_secs(120).try_into().unwrap()),
        ..Default::default()
    };
    let r = a.set_rotation_policy(SetRotationPolicyRequest { policy: Some(policy.clone()) }).await;
    assert_status(
        r,
        Code::PermissionDenied,
        "shorter than the server default of 3600s; that needs the destroy capability",
    );
    d.admin().await.set_rotation_policy(SetRotationPolicyRequest { policy: Some(policy) }).await.unwrap();
    let r = a.rotate_credential(rotate("ops/b", Some(60))).await;
    assert_status(r, Code::PermissionDenied, "shorter than the 120s it would otherwise get (its rotation policy's)");
    a.rotate_credential(rotate("ops/b", Some(120))).await.unwrap();
    // Nothing was destroyed.
    assert_eq!(get(&mut root, "ops/a", Some(1)).await.unwrap().1, b"v1");

    // With destroy, all of it is allowed.
    let mut caps = everyday.to_vec();
    caps.push(Capability::Destroy);
    let (strong, _) = create_token(&d, "destroyer", vec![rule("ops/**", &caps, false)], 0, None).await;
    let mut s = admin_with(&d, &strong).await;
    s.destroy_version(DestroyVersionRequest { name: "ops/a".into(), version: 1 }).await.unwrap();
    assert_status(get(&mut root, "ops/a", Some(1)).await, Code::FailedPrecondition, "destroyed");
    let out = s.rotate_credential(rotate("ops/a", Some(0))).await.unwrap().into_inner();
    assert_status(get(&mut root, "ops/a", Some(out.previous_version)).await, Code::FailedPrecondition, "");
    s.rotate_credential(rotate("ops/b", Some(1))).await.unwrap();
    // Destroy on other names is still denied.
    let r = s.destroy_version(DestroyVersionRequest { name: "other/x".into(), version: 1 }).await;
    assert_status(r, Code::PermissionDenied, "may not destroy \"other/x\"");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_stored_with_old_patterns_keep_working() {
    let env = TestEnv::new(Backend::Sqlite).await;
    // The token below is inserted behind the daemon's back: the periodic reload finds it.
    let settings = credvault::config::Settings { token_resync_seconds: 1, ..env.settings() };
    let d = TestDaemon::start(settings, None).await;
    let mut root = d.client().await;
    for n in ["team-a/x/y", "team-b/x"] {
        put(&mut root, n, b"v1", None).await.unwrap();
        put(&mut root, n, b"v2", None).await.unwrap();
    }
    // A token as an older version stored it: a bare list of rules, `*` crossing `/`.
    let token = "cvt_legacy0000000000000000000000000000000000000";
    let store = env.store().await;
    store
        .insert_token(&credvault::store::TokenRecord {
            token_hash: hex::encode(credvault::auth::hash_token(token)),
            display_name: "old".into(),
            policies: r#"[{"pattern":"team-a/*","capabilities":["read","delete","list"]}]"#.into(),
            created_at: credvault::store::now_micros(),
            expires_at: None,
            revoked_at: None,
        })
        .await
        .unwrap();
    let mut old = client_with(&d, token).await;
    eventually("the periodic token reload to load the old token", std::time::Duration::from_secs(10), async || {
        get(&mut old.clone(), "team-a/x/y", None).await.is_ok()
    })
    .await;
    assert_eq!(get(&mut old, "team-a/x/y", None).await.unwrap().1, b"v2", "old `team-a/*` reaches any depth");
    assert_status(get(&mut old, "team-b/x", None).await, Code::PermissionDenied, "may not read \"team-b/x\"");
    let mut old_admin = admin_with(&d, token).await;
    old_admin.destroy_version(DestroyVersionRequest { name: "team-a/x/y".into(), version: 1 }).await.unwrap();
    let tokens = d.admin().await.list_tokens(ListTokensRequest {}).await.unwrap().into_inner().tokens;
    let shown = tokens.iter().find(|t| t.display_name == "old").unwrap();
    assert_eq!(shown.rules[0].pattern, "team-a/**");
    assert!(shown.rules[0].capabilities.contains(&(Capability::Destroy as i32)));
    d.stop().await;
}
