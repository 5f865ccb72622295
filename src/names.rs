//! Credential names and list prefixes: validated once, at the edge of the core.
//!
//! A name is a path of segments joined by `/`, like `payments/stripe/api-key`: each
//! segment is 1 or more of `[A-Za-z0-9._-]`, not `.` or `..`; no leading, trailing or
//! doubled slash. The charset keeps names safe in URLs, shells, logs and metric labels,
//! and keeps every name below `~`, which prefix range queries rely on.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct NameError(pub String);

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// A validated credential name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CredentialName(String);

impl CredentialName {
    pub fn parse(s: &str, max_len: usize) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError("credential name must not be empty".into()));
        }
        if s.len() > max_len {
            return Err(NameError(format!("credential name is {} bytes; the limit is {max_len}", s.len())));
        }
        for segment in s.split('/') {
            check_segment(segment, s)?;
        }
        Ok(CredentialName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_segment(segment: &str, whole: &str) -> Result<(), NameError> {
    if segment.is_empty() {
        return Err(NameError(format!(
            "credential name {whole:?} has an empty path segment (leading, trailing or double '/')"
        )));
    }
    if segment == "." || segment == ".." {
        return Err(NameError(format!("credential name {whole:?} has a '{segment}' segment")));
    }
    if let Some(bad) = segment.bytes().find(|b| !allowed(*b)) {
        let shown = if bad.is_ascii_graphic() { format!("'{}'", bad as char) } else { format!("byte 0x{bad:02x}") };
        return Err(NameError(format!(
            "credential name {:?} contains {shown}; allowed are letters, digits, '.', '_', '-' and '/' between segments",
            whole.escape_debug().to_string()
        )));
    }
    Ok(())
}

impl fmt::Display for CredentialName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CredentialName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// Checks a `ListCredentials` prefix: empty, or the start of a valid name (it may end
/// in `/` or in the middle of a segment).
pub fn check_prefix(prefix: &str, max_len: usize) -> Result<(), NameError> {
    if prefix.is_empty() {
        return Ok(());
    }
    if prefix.len() > max_len {
        return Err(NameError(format!("prefix is {} bytes; the limit is {max_len}", prefix.len())));
    }
    let body = prefix.strip_suffix('/').unwrap_or(prefix);
    let segments: Vec<&str> = body.split('/').collect();
    for (i, segment) in segments.iter().enumerate() {
        // The last segment may be partial ("pay" matches "payments/..."), but "." or ".."
        // can still begin a valid segment like ".env", so only charset and emptiness apply.
        if i + 1 == segments.len() && !prefix.ends_with('/') {
            if segment.is_empty() || segment.bytes().any(|b| !allowed(b)) {
                return Err(NameError(format!("prefix {prefix:?} is not the start of a valid credential name")));
            }
        } else {
            check_segment(segment, prefix)
                .map_err(|_| NameError(format!("prefix {prefix:?} is not the start of a valid credential name")))?;
        }
    }
    Ok(())
}

/// Names `start <= name < end`, in byte order (the order of the store's name index).
/// Bounds need not be valid names: `,` sorts below every name character and `~` above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameRange {
    pub start: String,
    pub end: String,
}

/// Sorts below every character a name may hold (`-` is the lowest, 0x2d).
const BELOW_NAME_CHARS: char = ',';
/// Sorts above every character a name may hold (`z` is the highest, 0x7a).
const ABOVE_NAME_CHARS: char = '~';

impl NameRange {
    /// Every name starting with `prefix`.
    pub fn prefix(prefix: &str) -> NameRange {
        NameRange { start: prefix.to_owned(), end: format!("{prefix}{ABOVE_NAME_CHARS}") }
    }

    /// Exactly the name `name`.
    pub fn exact(name: &str) -> NameRange {
        NameRange { start: name.to_owned(), end: after(name) }
    }

    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    pub fn contains(&self, name: &str) -> bool {
        self.start.as_str() <= name && name < self.end.as_str()
    }

    pub fn intersect(&self, other: &NameRange) -> Option<NameRange> {
        let r = NameRange {
            start: self.start.clone().max(other.start.clone()),
            end: self.end.clone().min(other.end.clone()),
        };
        (!r.is_empty()).then_some(r)
    }

    /// What is left of this range without `cut`: none, one or two ranges, in order.
    pub fn minus(&self, cut: &NameRange) -> Vec<NameRange> {
        if cut.is_empty() || cut.end <= self.start || self.end <= cut.start {
            return vec![self.clone()];
        }
        [
            NameRange { start: self.start.clone(), end: cut.start.clone() },
            NameRange { start: cut.end.clone(), end: self.end.clone() },
        ]
        .into_iter()
        .filter(|r| !r.is_empty())
        .collect()
    }
}

/// The lowest bound above `name` and below every other name: where a scan resumes after it.
pub fn after(name: &str) -> String {
    format!("{name}{BELOW_NAME_CHARS}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_names() {
        for n in ["a", "payments/stripe/api-key", "x.y_z-1/2", ".env", "a/..b"] {
            assert!(CredentialName::parse(n, 256).is_ok(), "{n}");
        }
    }

    #[test]
    fn invalid_names() {
        for n in ["", "/a", "a/", "a//b", "a/./b", "../a", "a b", "a\u{0}b", "ä", "a~b", "a*"] {
            assert!(CredentialName::parse(n, 256).is_err(), "{n:?}");
        }
        let long = "a".repeat(257);
        let e = CredentialName::parse(&long, 256).unwrap_err();
        assert!(e.0.contains("257 bytes"), "{e}");
    }

    #[test]
    fn prefixes() {
        for p in ["", "a", "a/", "team-a/db", "team-a/db/"] {
            assert!(check_prefix(p, 256).is_ok(), "{p:?}");
        }
        for p in ["/", "a//", "a b", "../", "*"] {
            assert!(check_prefix(p, 256).is_err(), "{p:?}");
        }
    }
}
