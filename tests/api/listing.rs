//! Scoped listings: sealed page tokens that reveal nothing, and pages that are useful
//! when the caller may see only a few of many names.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use tonic::Code;

use credvault::proto::{Capability, ListCredentialsRequest};

use crate::both_backends;
use crate::helpers::{assert_status, client_with, create_token, put, rule, Backend, Client, Raw, TestDaemon, TestEnv};

fn req(prefix: &str, page_size: u32, page_token: &str) -> ListCredentialsRequest {
    ListCredentialsRequest { prefix: prefix.into(), page_size, page_token: page_token.into(), ..Default::default() }
}

/// Pages through a listing; returns the names and every token handed out.
async fn page_all(c: &mut Client, prefix: &str, page_size: u32) -> (Vec<String>, Vec<String>) {
    let (mut names, mut tokens) = (Vec::new(), Vec::new());
    let mut token = String::new();
    for _ in 0..1000 {
        let page = c.list_credentials(req(prefix, page_size, &token)).await.unwrap().into_inner();
        names.extend(page.credentials.into_iter().map(|m| m.name));
        if page.next_page_token.is_empty() {
            return (names, tokens);
        }
        token = page.next_page_token;
        tokens.push(token.clone());
    }
    panic!("listing did not end in 1000 pages");
}

both_backends!(page_tokens_reveal_nothing, outside_names_cost_few_pages);

async fn page_tokens_reveal_nothing(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut root = d.client().await;
    let inside = ["team-a/1", "team-a/3", "team-a/5"];
    let outside = [
        "team-a/2/deep",
        "team-a/4/deep",
        "team-a0",
        "team-ab/x",
        "team-ab/y",
        "team-b/one",
        "team-b/two",
        "team-a/secret",
        "aaa/first",
        "zzz/last",
    ];
    for n in inside.iter().chain(&outside) {
        put(&mut root, n, b"v", None).await.unwrap();
    }
    let (token, _) = create_token(
        &d,
        "team-a-lister",
        vec![rule("team-a/*", &[Capability::List], false), rule("team-a/secret", &[Capability::List], true)],
        0,
        None,
    )
    .await;
    let mut a = client_with(&d, &token).await;

    for prefix in ["", "team-a", "team-a/", "team-"] {
        let (names, tokens) = page_all(&mut a, prefix, 1).await;
        assert_eq!(names, inside, "prefix {prefix:?}");
        assert!(tokens.len() >= inside.len() - 1, "page_size 1 pages: {tokens:?}");
        for t in &tokens {
            let raw = URL_SAFE_NO_PAD.decode(t).expect("tokens are base64url");
            let text = String::from_utf8_lossy(&raw);
            for hidden in &outside {
                for piece in hidden.split('/').filter(|p| p.len() > 2) {
                    assert!(!text.contains(piece), "token {t} reveals {piece:?} of {hidden:?}");
                }
            }
            assert_eq!(t.len(), tokens[0].len(), "token length does not depend on the position");
        }
    }

    // The root token sees everything; its tokens are useless to the scoped token and back.
    let root_page = root.list_credentials(req("", 1, "")).await.unwrap().into_inner();
    let a_page = a.list_credentials(req("", 1, "")).await.unwrap().into_inner();
    let foreign = "does not belong to this listing";
    assert_status(a.list_credentials(req("", 1, &root_page.next_page_token)).await, Code::InvalidArgument, foreign);
    assert_status(root.list_credentials(req("", 1, &a_page.next_page_token)).await, Code::InvalidArgument, foreign);
    // Another prefix or include_deleted setting.
    assert_status(a.list_credentials(req("team-a/", 1, &a_page.next_page_token)).await, Code::InvalidArgument, foreign);
    let mut deleted = req("", 1, &a_page.next_page_token);
    deleted.include_deleted = true;
    assert_status(a.list_credentials(deleted).await, Code::InvalidArgument, foreign);
    // Tampered: every byte flipped in turn fails, never lists.
    let mut raw = URL_SAFE_NO_PAD.decode(&a_page.next_page_token).unwrap();
    for i in [0, 1, 13, raw.len() / 2, raw.len() - 1] {
        raw[i] ^= 0x01;
        let r = a.list_credentials(req("", 1, &URL_SAFE_NO_PAD.encode(&raw))).await;
        let s = r.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
        assert!(s.message().contains("page_token"), "{}", s.message());
        raw[i] ^= 0x01;
    }
    // Garbage and the old plaintext format.
    let old = URL_SAFE_NO_PAD.encode("v1:team-b/one");
    for garbage in ["!!!", "AAAA", old.as_str()] {
        assert_status(a.list_credentials(req("", 1, garbage)).await, Code::InvalidArgument, "page_token is malformed");
    }
    // The good token still works after all that.
    let next = a.list_credentials(req("", 1, &a_page.next_page_token)).await.unwrap().into_inner();
    assert_eq!(next.credentials[0].name, "team-a/3");
    d.stop().await;
}

/// 50,000 names the token may not list, 5 it may: under the prefix its policy scans
/// (`team-a/`, one level), 10,000 deeper names it must skip; 40,000 elsewhere that the
/// scan never touches.
async fn outside_names_cost_few_pages(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let d = TestDaemon::start(env.settings(), None).await;
    let mut root = d.client().await;
    let visible = ["team-a/k0", "team-a/k1", "team-a/m2", "team-a/z3", "team-a/zz4"];
    for n in visible {
        put(&mut root, n, b"v", None).await.unwrap();
    }
    let raw = env.raw().await;
    let seed = |prefix: &str, n: u32| {
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i:05}")).collect();
        serde_json::to_string(&names).unwrap()
    };
    let batches =
        [seed("aaa/", 20_000), seed("team-ab/", 10_000), seed("team-b/", 10_000), seed("team-a/k1/deep", 10_000)];
    for names in &batches {
        match &raw {
            Raw::Sqlite(p) => {
                sqlx::query(
                    "INSERT INTO credentials (name, current_version, created_at, updated_at) \
                     SELECT value, 1, 0, 0 FROM json_each($1)",
                )
                .bind(names)
                .execute(p)
                .await
                .unwrap();
            }
            Raw::Pg(p) => {
                sqlx::query(
                    "INSERT INTO credentials (name, current_version, created_at, updated_at) \
                     SELECT value, 1, 0, 0 FROM jsonb_array_elements_text($1::jsonb)",
                )
                .bind(names)
                .execute(p)
                .await
                .unwrap();
            }
        }
    }
    raw.close().await;
    let (token, _) = create_token(&d, "few", vec![rule("team-a/*", &[Capability::List], false)], 0, None).await;
    let mut a = client_with(&d, &token).await;

    let before = d.vault.store_queries();
    let (names, tokens) = page_all(&mut a, "", 100).await;
    let queries = d.vault.store_queries() - before;
    eprintln!("{backend:?}: 5 of 50,005 names in {} pages, {queries} store queries", tokens.len() + 1);
    assert_eq!(names, visible);
    assert!(tokens.len() <= 2, "5 names in {} pages", tokens.len() + 1);
    assert!(queries <= 30, "{queries} store queries");
    // The root token, listing everything, still pages by size.
    let first = root.list_credentials(req("", 1000, "")).await.unwrap().into_inner();
    assert_eq!(first.credentials.len(), 1000);
    d.stop().await;
}
