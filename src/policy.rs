//! Token policies: capabilities, rules, the pattern language, and the name ranges a
//! policy lets a listing scan.
//!
//! # Patterns
//! A pattern is a path of `/`-separated segments, like a name:
//! - a literal segment (`[A-Za-z0-9._-]+`, not `.` or `..`) matches that segment;
//! - `*` as a whole segment matches exactly one segment;
//! - `**` as the last segment matches one or more segments (any depth below);
//! - `**` alone matches every name, and so does `*` alone (an alias kept because it has
//!   always meant "everything"; it is stored and shown as `**`).
//!
//! So `team-a/db` names one credential, `team-a/*` covers `team-a/x` but not
//! `team-a/x/y`, `team-a/**` covers both, and none of them covers `team-a` itself or
//! `team-ab/x`. Anything else (`team-a*`, `a*b`, `***`, `**` before the end, empty
//! segments) is refused at token creation: a pattern means one thing or nothing.
//!
//! Tokens stored before this syntax (documents without `"syntax": 2`) keep their old
//! meaning, where `*` matched any run of characters, `/` included: `P/*` is read as
//! `P/**` and `*` as `**` (the same names), exact names stay exact, and any other
//! wildcard pattern keeps the old matcher and is shown as `legacy:<pattern>`. In such
//! documents `delete` also grants `destroy`, which it used to include.
//!
//! **Invariant:** [`Policy::list_ranges`] covers every name [`Policy::allows`] grants; it
//! only narrows a scan, the per-name check still decides.

use crate::names::NameRange;
use crate::store::StoreError;

/// What a token may do to a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Capability {
    Read,
    Write,
    Delete,
    List,
    Rotate,
    /// Operator RPCs: tokens, keys, status. Granted only by a rule whose pattern is `**`.
    Admin,
    /// What cannot be undone or cuts a grace period short: `DestroyVersion`, a rotation
    /// whose grace period is shorter than it would otherwise get, a rotation policy with
    /// a grace period below the server default.
    Destroy,
}

impl Capability {
    pub const ALL: [Capability; 7] = [
        Capability::Read,
        Capability::Write,
        Capability::Delete,
        Capability::List,
        Capability::Rotate,
        Capability::Admin,
        Capability::Destroy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Read => "read",
            Capability::Write => "write",
            Capability::Delete => "delete",
            Capability::List => "list",
            Capability::Rotate => "rotate",
            Capability::Admin => "admin",
            Capability::Destroy => "destroy",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// One policy rule: a name pattern and the capabilities it grants (or, with `deny`,
/// takes away). The pattern language is described in the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    pub pattern: String,
    pub capabilities: Vec<Capability>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deny: bool,
}

/// Longest pattern accepted at token creation.
pub const MAX_PATTERN_BYTES: usize = 256;
/// Most rules one token may carry (a listing scans at most one range per allow rule).
pub const MAX_RULES: usize = 64;

/// The stored pattern syntax: documents without it predate segment patterns.
pub const SYNTAX_LEGACY: u32 = 1;
pub const SYNTAX_SEGMENTS: u32 = 2;

/// How new databases' root token is stored.
pub const ROOT_POLICY: &str = r#"{"rules":[{"pattern":"**","capabilities":["read","write","delete","list","rotate","admin","destroy"]}],"syntax":2}"#;

/// A compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// Segments to match one for one (`None` is `*`); `tail`: a final `**` (one or more
    /// further segments).
    Segments { segments: Vec<Option<String>>, tail: bool },
    /// A pre-segment-syntax pattern with no exact translation: `*` is any run, `/` included.
    Legacy(String),
    /// A stored pattern that no longer parses: it matches nothing (fail closed).
    Never,
}

fn segment_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

impl Pattern {
    /// Parses the segment syntax (what `CreateToken` accepts).
    fn parse(p: &str) -> Result<Pattern, String> {
        if p.is_empty() || p.len() > MAX_PATTERN_BYTES {
            return Err(format!(
                "rule pattern {:?} must be 1-{MAX_PATTERN_BYTES} characters",
                p.escape_debug().to_string()
            ));
        }
        if let Some(bad) = p.bytes().find(|b| !segment_char(*b) && !matches!(b, b'/' | b'*')) {
            let shown = if bad.is_ascii_graphic() { format!("'{}'", bad as char) } else { format!("byte 0x{bad:02x}") };
            return Err(format!(
                "rule pattern {:?} contains {shown}; patterns use letters, digits, '.', '_', '-', '/' and '*'",
                p.escape_debug().to_string()
            ));
        }
        if p == "*" {
            return Ok(Pattern::Segments { segments: Vec::new(), tail: true });
        }
        let parts: Vec<&str> = p.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        let mut tail = false;
        for (i, seg) in parts.iter().enumerate() {
            let last = i + 1 == parts.len();
            match *seg {
                "" => {
                    return Err(format!("rule pattern {p:?} has an empty segment (leading, trailing or double '/')"))
                }
                "**" if last => tail = true,
                "**" => {
                    return Err(format!(
                        "rule pattern {p:?}: '**' may only be the last segment (`prefix/**` matches any depth below prefix)"
                    ))
                }
                "*" => segments.push(None),
                s if s.contains('*') => {
                    return Err(format!(
                        "rule pattern {p:?}: '*' must be a whole segment; `{s}` is not supported. Use `prefix/*` for \
                         one segment below prefix or `prefix/**` for any depth"
                    ))
                }
                "." | ".." => return Err(format!("rule pattern {p:?} has a '{seg}' segment, which no name has")),
                s => segments.push(Some(s.to_owned())),
            }
        }
        Ok(Pattern::Segments { segments, tail })
    }

    /// Reads a pattern stored before the segment syntax, keeping its meaning.
    fn legacy(p: &str) -> Pattern {
        if !p.contains('*') {
            return match Pattern::parse(p) {
                Ok(exact) => exact,
                Err(_) => Pattern::Legacy(p.to_owned()),
            };
        }
        let stem = p.trim_end_matches('*');
        if stem.is_empty() {
            return Pattern::Segments { segments: Vec::new(), tail: true };
        }
        // `P/*` (any run after `P/`) covers exactly the names `P/**` does.
        if let Some(parent) = stem.strip_suffix('/') {
            if let Ok(Pattern::Segments { segments, tail: false }) = Pattern::parse(parent) {
                if segments.iter().all(Option::is_some) {
                    return Pattern::Segments { segments, tail: true };
                }
            }
        }
        Pattern::Legacy(p.to_owned())
    }

    fn matches(&self, name: &str) -> bool {
        match self {
            Pattern::Segments { segments, tail } => {
                let mut parts = name.split('/');
                for seg in segments {
                    match (parts.next(), seg) {
                        (None, _) => return false,
                        (Some(part), Some(lit)) if part != lit => return false,
                        (Some(""), _) => return false,
                        _ => {}
                    }
                }
                match parts.next() {
                    None => !tail,
                    Some(part) => *tail && !part.is_empty(),
                }
            }
            Pattern::Legacy(glob) => legacy_glob_match(glob, name),
            Pattern::Never => false,
        }
    }

    /// Does it match every name?
    fn is_everything(&self) -> bool {
        matches!(self, Pattern::Segments { segments, tail: true } if segments.is_empty())
    }

    /// The smallest name range holding every name the pattern matches.
    fn scan_range(&self) -> Option<NameRange> {
        match self {
            Pattern::Segments { segments, tail } => {
                let literal: Vec<&str> = segments.iter().map_while(|s| s.as_deref()).collect();
                if literal.len() == segments.len() && !tail {
                    return Some(NameRange::exact(&literal.join("/")));
                }
                Some(NameRange::prefix(&subtree(&literal)))
            }
            Pattern::Legacy(glob) => Some(NameRange::prefix(glob.split('*').next().unwrap_or_default())),
            Pattern::Never => None,
        }
    }

    /// The name range this pattern matches in full, when it is one: what a deny rule can
    /// cut out of a scan.
    fn full_range(&self) -> Option<NameRange> {
        match self {
            Pattern::Segments { segments, tail: true } if segments.iter().all(Option::is_some) => {
                let literal: Vec<&str> = segments.iter().filter_map(|s| s.as_deref()).collect();
                Some(NameRange::prefix(&subtree(&literal)))
            }
            Pattern::Legacy(glob) => {
                let stem = glob.trim_end_matches('*');
                (!stem.contains('*')).then(|| NameRange::prefix(stem))
            }
            _ => None,
        }
    }

    fn display(&self, original: &str) -> String {
        match self {
            Pattern::Segments { segments, tail } => {
                let mut parts: Vec<&str> = segments.iter().map(|s| s.as_deref().unwrap_or("*")).collect();
                if *tail {
                    parts.push("**");
                }
                parts.join("/")
            }
            Pattern::Legacy(glob) => format!("legacy:{glob}"),
            Pattern::Never => format!("invalid:{original}"),
        }
    }
}

/// `a/b/` for segments `a`, `b`; empty for none (every name).
fn subtree(literal: &[&str]) -> String {
    if literal.is_empty() {
        String::new()
    } else {
        format!("{}/", literal.join("/"))
    }
}

/// The matcher of pre-segment patterns: `*` matches any run of characters, `/` included;
/// everything else matches itself.
pub fn legacy_glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while ni < n.len() {
        if p.get(pi) == Some(&b'*') {
            backtrack = Some((pi, ni));
            pi += 1;
        } else if pi < p.len() && p.get(pi) == n.get(ni) {
            pi += 1;
            ni += 1;
        } else if let Some((bp, bn)) = backtrack {
            pi = bp + 1;
            ni = bn + 1;
            backtrack = Some((bp, bn + 1));
        } else {
            return false;
        }
    }
    p.get(pi..).unwrap_or_default().iter().all(|b| *b == b'*')
}

/// A token's rules, compiled. Default deny; a capability is granted when an allow rule
/// matching the name grants it and no deny rule matching the name takes it away (deny
/// wins, whatever the order or specificity).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// As shown (`ListTokens`) and stored: patterns in their normal form.
    rules: Vec<Rule>,
    patterns: Vec<Pattern>,
}

impl Policy {
    /// Checks rules from an untrusted source (`CreateToken`) and normalizes them.
    pub fn new(rules: Vec<Rule>) -> Result<Policy, String> {
        if rules.is_empty() {
            return Err("a token needs at least one policy rule".into());
        }
        if rules.len() > MAX_RULES {
            return Err(format!("a token may carry at most {MAX_RULES} rules, got {}", rules.len()));
        }
        let mut policy = Policy::default();
        for mut r in rules {
            let pattern = Pattern::parse(&r.pattern)?;
            if r.capabilities.is_empty() {
                return Err(format!("rule {:?} grants no capability", r.pattern));
            }
            if r.capabilities.contains(&Capability::Admin) && !pattern.is_everything() {
                return Err(format!(
                    "rule {:?}: admin applies to the whole vault, never to some names; give it with the pattern `**`",
                    r.pattern
                ));
            }
            r.capabilities.dedup();
            r.pattern = pattern.display(&r.pattern);
            policy.rules.push(r);
            policy.patterns.push(pattern);
        }
        Ok(policy)
    }

    /// Compiles a stored document; never fails (a pattern that does not parse matches
    /// nothing).
    pub fn from_doc(doc: &PolicyDoc) -> Policy {
        let mut policy = Policy::default();
        for r in &doc.rules {
            let mut r = r.clone();
            let pattern = if doc.syntax >= SYNTAX_SEGMENTS {
                Pattern::parse(&r.pattern).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "stored token rule does not parse; it matches nothing");
                    Pattern::Never
                })
            } else {
                if r.capabilities.contains(&Capability::Delete) && !r.capabilities.contains(&Capability::Destroy) {
                    r.capabilities.push(Capability::Destroy);
                }
                Pattern::legacy(&r.pattern)
            };
            r.pattern = pattern.display(&r.pattern);
            policy.rules.push(r);
            policy.patterns.push(pattern);
        }
        policy
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    fn with(&self, cap: Capability) -> impl Iterator<Item = (&Rule, &Pattern)> {
        self.rules.iter().zip(&self.patterns).filter(move |(r, _)| r.capabilities.contains(&cap))
    }

    /// May the holder do `cap` to credential `name`?
    pub fn allows(&self, cap: Capability, name: &str) -> bool {
        let mut allowed = false;
        for (r, p) in self.with(cap) {
            if p.matches(name) {
                if r.deny {
                    return false;
                }
                allowed = true;
            }
        }
        allowed
    }

    /// May the holder do `cap` regardless of name (operator RPCs)? Only an allow rule
    /// matching every name grants it, and any deny rule naming `cap` takes it away.
    pub fn allows_everywhere(&self, cap: Capability) -> bool {
        let mut allowed = false;
        for (r, p) in self.with(cap) {
            if r.deny {
                return false;
            }
            allowed |= p.is_everything();
        }
        allowed
    }

    /// The sorted, disjoint name ranges under `prefix` that can hold a name this policy
    /// grants `cap` on: one range per allow rule (its literal segments before the first
    /// wildcard), merged, minus the subtrees that deny rules take away whole.
    pub fn list_ranges(&self, cap: Capability, prefix: &str) -> Vec<NameRange> {
        let wanted = NameRange::prefix(prefix);
        let mut ranges: Vec<NameRange> = self
            .with(cap)
            .filter(|(r, _)| !r.deny)
            .filter_map(|(_, p)| p.scan_range())
            .filter_map(|r| r.intersect(&wanted))
            .collect();
        ranges.sort_by(|a, b| a.start.cmp(&b.start));
        let mut merged: Vec<NameRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => {
                    if r.end > last.end {
                        last.end = r.end;
                    }
                }
                _ => merged.push(r),
            }
        }
        for cut in self.with(cap).filter(|(r, _)| r.deny).filter_map(|(_, p)| p.full_range()) {
            merged = merged.iter().flat_map(|r| r.minus(&cut)).collect();
        }
        merged
    }
}

/// A token's stored policy document: its rules, its rate limit, and the pattern syntax
/// its rules are written in.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyDoc {
    pub rules: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_per_second: Option<u32>,
    #[serde(default = "legacy_syntax")]
    pub syntax: u32,
}

fn legacy_syntax() -> u32 {
    SYNTAX_LEGACY
}

impl Default for PolicyDoc {
    fn default() -> Self {
        PolicyDoc { rules: Vec::new(), rate_limit_per_second: None, syntax: SYNTAX_SEGMENTS }
    }
}

impl PolicyDoc {
    /// A document for a policy checked by [`Policy::new`].
    pub fn new(policy: &Policy, rate_limit_per_second: Option<u32>) -> PolicyDoc {
        PolicyDoc { rules: policy.rules.clone(), rate_limit_per_second, syntax: SYNTAX_SEGMENTS }
    }

    /// Reads a stored document; the oldest documents were a bare list of rules.
    pub fn parse(json: &str) -> Result<PolicyDoc, StoreError> {
        if let Ok(rules) = serde_json::from_str::<Vec<Rule>>(json) {
            return Ok(PolicyDoc { rules, rate_limit_per_second: None, syntax: SYNTAX_LEGACY });
        }
        serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("token policy: {e}")))
    }
}

#[cfg(test)]
mod tests;
