use proptest::prelude::*;

use super::*;
use Capability::*;

fn rule(pattern: &str, caps: &[Capability], deny: bool) -> Rule {
    Rule { pattern: pattern.into(), capabilities: caps.to_vec(), deny }
}

fn policy(spec: &[(&str, &[Capability], bool)]) -> Policy {
    Policy::new(spec.iter().map(|(p, c, d)| rule(p, c, *d)).collect()).unwrap()
}

fn refused(pattern: &str) -> String {
    Policy::new(vec![rule(pattern, &[Read], false)]).unwrap_err()
}

#[test]
fn exact_names() {
    let p = policy(&[("team-a/db", &[Read], false)]);
    assert!(p.allows(Read, "team-a/db"));
    for n in ["team-a/db/k", "team-a/dbx", "team-a", "team-a/d"] {
        assert!(!p.allows(Read, n), "{n}");
    }
    let d = policy(&[("**", &[Read], false), ("team-a/secret", &[Read], true)]);
    assert!(!d.allows(Read, "team-a/secret"));
    assert!(d.allows(Read, "team-a/secret/k"), "an exact deny covers that name only");
    assert!(d.allows(Read, "team-a/secrets"));
}

#[test]
fn one_segment_star() {
    let p = policy(&[("team-a/*", &[Read], false)]);
    assert!(p.allows(Read, "team-a/x"));
    for n in ["team-a/x/y", "team-a", "team-ab/x", "team-b/x"] {
        assert!(!p.allows(Read, n), "{n}");
    }
    let mid = policy(&[("*/db/password", &[Read], false)]);
    assert!(mid.allows(Read, "svc/db/password"));
    assert!(!mid.allows(Read, "a/b/db/password") && !mid.allows(Read, "db/password"));
    let d = policy(&[("**", &[Read], false), ("team-a/*", &[Read], true)]);
    assert!(!d.allows(Read, "team-a/x"));
    assert!(d.allows(Read, "team-a/x/y"), "a one-level deny leaves deeper names");
    assert!(d.allows(Read, "team-a"));
}

#[test]
fn any_depth_double_star() {
    let p = policy(&[("team-a/**", &[Read], false)]);
    for n in ["team-a/x", "team-a/x/y", "team-a/x/y/z"] {
        assert!(p.allows(Read, n), "{n}");
    }
    for n in ["team-a", "team-ab/x", "team-b/team-a/x"] {
        assert!(!p.allows(Read, n), "{n}");
    }
    let d = policy(&[("team-a/**", &[Read], false), ("team-a/secret/**", &[Read], true)]);
    assert!(!d.allows(Read, "team-a/secret/k") && !d.allows(Read, "team-a/secret/k/j"));
    assert!(d.allows(Read, "team-a/secret"), "`x/**` is below x, not x itself");
    assert!(d.allows(Read, "team-a/secrets/k"));
    let mid = policy(&[("*/db/**", &[Read], false)]);
    assert!(mid.allows(Read, "svc/db/a/b") && !mid.allows(Read, "svc/db"));
}

#[test]
fn everything() {
    for all in ["**", "*"] {
        let p = policy(&[(all, &[Read, Admin], false)]);
        assert_eq!(p.rules()[0].pattern, "**", "`*` alone is shown as `**`");
        for n in ["a", "a/b", "team-a/x/y/z"] {
            assert!(p.allows(Read, n), "{all} {n}");
        }
        assert!(p.allows_everywhere(Admin));
        let d = policy(&[("team-a/**", &[Read], false), (all, &[Read], true)]);
        assert!(!d.allows(Read, "team-a/x"), "deny {all} takes everything away");
    }
}

#[test]
fn misreadable_patterns_are_refused() {
    for (p, why) in [
        ("team-a*", "'*' must be a whole segment"),
        ("a*b/c", "'*' must be a whole segment"),
        ("team-a/x*", "'*' must be a whole segment"),
        ("***", "'*' must be a whole segment"),
        ("**/x", "'**' may only be the last segment"),
        ("a/**/b", "'**' may only be the last segment"),
        ("/a", "empty segment"),
        ("a/", "empty segment"),
        ("a//b", "empty segment"),
        ("a/../b", "'..' segment"),
        ("a b", "contains byte 0x20"),
        ("a\u{0}b", "byte 0x00"),
        ("", "1-256 characters"),
    ] {
        let e = refused(p);
        assert!(e.contains(why), "{p:?}: {e}");
    }
    assert!(refused(&"a".repeat(257)).contains("1-256"));
    let e = Policy::new(vec![rule("team-a/**", &[Read, Admin], false)]).unwrap_err();
    assert!(e.contains("admin applies to the whole vault"), "{e}");
    let e = Policy::new(vec![rule("**", &[Read], false), rule("team-a/**", &[Admin], true)]).unwrap_err();
    assert!(e.contains("admin applies to the whole vault"), "{e}");
    assert!(Policy::new(vec![]).unwrap_err().contains("at least one"));
    assert!(Policy::new(vec![rule("a", &[], false)]).unwrap_err().contains("grants no capability"));
    let many = (0..=MAX_RULES).map(|i| rule(&format!("n{i}"), &[Read], false)).collect();
    assert!(Policy::new(many).unwrap_err().contains("at most 64 rules"));
}

#[test]
fn deny_wins_and_default_deny() {
    let p = policy(&[("team-a/**", &[Read, List], false), ("team-a/secret/**", &[Read], true)]);
    assert!(p.allows(Read, "team-a/x"));
    assert!(p.allows(List, "team-a/secret/k"), "the deny names read only");
    assert!(!p.allows(Read, "team-a/secret/k"));
    assert!(!p.allows(Write, "team-a/x"), "default deny");
    assert!(!p.allows(Destroy, "team-a/x"));
    assert!(!p.allows_everywhere(Admin));
    let no_admin = policy(&[("**", &[Admin, Read], false), ("**", &[Admin], true)]);
    assert!(!no_admin.allows_everywhere(Admin));
}

#[test]
fn root_policy_grants_everything() {
    let p = Policy::from_doc(&PolicyDoc::parse(ROOT_POLICY).unwrap());
    for c in Capability::ALL {
        assert!(p.allows(c, "any/name") && p.allows_everywhere(c), "{c:?}");
    }
}

#[test]
fn legacy_documents_keep_their_meaning() {
    // The root token of a database made before segment patterns, and a scoped token.
    let old_root = r#"[{"pattern":"*","capabilities":["read","write","delete","list","rotate","admin"]}]"#;
    let p = Policy::from_doc(&PolicyDoc::parse(old_root).unwrap());
    for c in Capability::ALL {
        assert!(p.allows(c, "a/b/c") && p.allows_everywhere(c), "{c:?}: delete implies destroy in old documents");
    }
    assert_eq!(p.rules()[0].pattern, "**");
    let old = r#"{"rules":[{"pattern":"team-a/*","capabilities":["read"]},{"pattern":"team-a/secret/*","capabilities":["read"],"deny":true},{"pattern":"*/db/*","capabilities":["list"]},{"pattern":"exact/name","capabilities":["rotate"]}],"rate_limit_per_second":5}"#;
    let doc = PolicyDoc::parse(old).unwrap();
    assert_eq!((doc.syntax, doc.rate_limit_per_second), (SYNTAX_LEGACY, Some(5)));
    let p = Policy::from_doc(&doc);
    let shown: Vec<&str> = p.rules().iter().map(|r| r.pattern.as_str()).collect();
    assert_eq!(shown, vec!["team-a/**", "team-a/secret/**", "legacy:*/db/*", "exact/name"]);
    assert!(p.allows(Read, "team-a/x/y"), "old `*` crossed `/`");
    assert!(!p.allows(Read, "team-a/secret/k/j"));
    assert!(p.allows(List, "a/b/db/c/d"), "untranslatable patterns keep the old matcher");
    assert!(p.allows(Rotate, "exact/name") && !p.allows(Rotate, "exact/name/x"));
    assert!(!p.allows(Destroy, "team-a/x"), "only delete brings destroy");
    // New documents are written with the syntax marker and read back the same.
    let new = Policy::new(vec![rule("team-a/*", &[Read], false)]).unwrap();
    let json = serde_json::to_string(&PolicyDoc::new(&new, None)).unwrap();
    assert!(json.contains(r#""syntax":2"#), "{json}");
    let back = Policy::from_doc(&PolicyDoc::parse(&json).unwrap());
    assert!(back.allows(Read, "team-a/x") && !back.allows(Read, "team-a/x/y"));
    // A stored new-syntax rule that does not parse matches nothing.
    let bad = r#"{"rules":[{"pattern":"team-a*","capabilities":["read"]}],"syntax":2}"#;
    let p = Policy::from_doc(&PolicyDoc::parse(bad).unwrap());
    assert!(!p.allows(Read, "team-a") && !p.allows(Read, "team-ab"));
    assert_eq!(p.rules()[0].pattern, "invalid:team-a*");
}

#[test]
fn list_ranges_narrow_the_scan() {
    let p = policy(&[
        ("team-a/*", &[List], false),
        ("team-c/**", &[List], false),
        ("team-c/secret/**", &[List], true),
        ("ops/db", &[List], false),
        ("team-b/**", &[Read], false),
    ]);
    let ranges = |prefix: &str| {
        p.list_ranges(List, prefix).into_iter().map(|r| (r.start, r.end)).collect::<Vec<(String, String)>>()
    };
    let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
    assert_eq!(
        ranges(""),
        vec![
            s("ops/db", "ops/db,"),
            s("team-a/", "team-a/~"),
            s("team-c/", "team-c/secret/"),
            s("team-c/secret/~", "team-c/~")
        ]
    );
    assert_eq!(ranges("team-a/x"), vec![s("team-a/x", "team-a/x~")]);
    assert_eq!(
        ranges("team"),
        vec![s("team-a/", "team-a/~"), s("team-c/", "team-c/secret/"), s("team-c/secret/~", "team-c/~")]
    );
    assert!(ranges("team-b/").is_empty(), "no list rule covers team-b");
    let everything = policy(&[("**", &[List], false)]);
    assert_eq!(everything.list_ranges(List, "").len(), 1);
    let wild_first = policy(&[("*/db", &[List], false)]);
    assert_eq!(wild_first.list_ranges(List, "x/").into_iter().map(|r| r.start).collect::<Vec<_>>(), vec!["x/"]);
    let none = policy(&[("team-a/**", &[List], false), ("**", &[List], true)]);
    assert!(none.list_ranges(List, "").is_empty());
}

// ---- Properties ----------------------------------------------------------------

/// The reference model: a pattern as a regular language over bytes, matched by
/// backtracking. `*` is `[^/]+`, a final `/**` is `/.+`, `**` alone is `.+`.
fn model_matches(pattern: &str, name: &str) -> bool {
    let pattern = if pattern == "*" { "**" } else { pattern };
    if pattern == "**" {
        return !name.is_empty();
    }
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some((b'*', rest)) if rest.first() == Some(&b'*') => !n.is_empty(),
            Some((b'*', rest)) => (1..=n.len()).take_while(|&k| n[k - 1] != b'/').any(|k| go(rest, &n[k..])),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![Just("a".to_owned()), Just("b".to_owned()), Just("ab".to_owned()), "[a-c.-]{1,3}"]
        .prop_filter("not . or ..", |s| s != "." && s != "..")
}

fn name() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 1..5).prop_map(|s| s.join("/"))
}

fn pattern() -> impl Strategy<Value = String> {
    let seg = prop_oneof![3 => segment(), 1 => Just("*".to_owned())];
    (prop::collection::vec(seg, 0..4), any::<bool>()).prop_filter_map("a pattern has a segment", |(mut segs, tail)| {
        if tail {
            segs.push("**".into());
        }
        (!segs.is_empty()).then(|| segs.join("/"))
    })
}

fn caps() -> impl Strategy<Value = Vec<Capability>> {
    prop::sample::subsequence(vec![Read, List, Destroy], 1..=3)
}

proptest! {
    #[test]
    fn matching_agrees_with_the_model(p in pattern(), n in name()) {
        let policy = Policy::new(vec![rule(&p, &[Read], false)]).unwrap();
        prop_assert_eq!(policy.allows(Read, &n), model_matches(&p, &n), "pattern {} name {}", p, n);
    }

    #[test]
    fn random_input_never_panics(p in "\\PC{0,40}", n in "\\PC{0,40}", legacy in any::<bool>()) {
        let doc = PolicyDoc {
            rules: vec![rule(&p, &[Read, List], false), rule(&p, &[Read], true)],
            rate_limit_per_second: None,
            syntax: if legacy { SYNTAX_LEGACY } else { SYNTAX_SEGMENTS },
        };
        let compiled = Policy::from_doc(&doc);
        let _ = compiled.allows(List, &n);
        let _ = compiled.list_ranges(List, &n);
        let _ = Policy::new(vec![rule(&p, &[Read], false)]);
    }

    #[test]
    fn deny_wins(rules in prop::collection::vec((pattern(), caps(), any::<bool>()), 1..6), n in name()) {
        let policy = Policy::new(rules.iter().map(|(p, c, d)| rule(p, c, *d)).collect()).unwrap();
        for cap in [Read, List, Destroy] {
            let denied = rules.iter().any(|(p, c, d)| *d && c.contains(&cap) && model_matches(p, &n));
            let granted = rules.iter().any(|(p, c, d)| !*d && c.contains(&cap) && model_matches(p, &n));
            prop_assert_eq!(policy.allows(cap, &n), granted && !denied);
        }
    }

    #[test]
    fn ranges_cover_every_listable_name(
        rules in prop::collection::vec((pattern(), caps(), any::<bool>()), 1..6),
        n in name(),
        cut in 0usize..4,
    ) {
        let policy = Policy::new(rules.iter().map(|(p, c, d)| rule(p, c, *d)).collect()).unwrap();
        let prefix: String = n.chars().take(cut).collect();
        let ranges = policy.list_ranges(List, &prefix);
        for w in ranges.windows(2) {
            prop_assert!(w[0].end <= w[1].start, "sorted and disjoint: {:?}", ranges);
        }
        if policy.allows(List, &n) {
            prop_assert!(ranges.iter().any(|r| r.contains(&n)), "{} not in {:?}", n, ranges);
        }
    }

    #[test]
    fn legacy_translation_keeps_the_old_meaning(p in "[ab/*]{1,8}", n in name()) {
        let doc = PolicyDoc { rules: vec![rule(&p, &[Read], false)], rate_limit_per_second: None, syntax: SYNTAX_LEGACY };
        prop_assert_eq!(Policy::from_doc(&doc).allows(Read, &n), legacy_glob_match(&p, &n));
    }
}
