//! Credential names and list prefixes: validated once, at the edge of the core.
//!
//! A name is a path of segments joined by `/`, like `payments/stripe/api-key`: each
//! segment is 1 or more of `[A-Za-z0-9._-]`, not `.` or `..`; no leading, trailing or
//! doubled slash. The charset keeps names safe in URLs, shells, logs and metric labels,
//! and keeps every name below `~`, which prefix range queries rely on.

use std::borrow::Cow;
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
        check(s, max_len)?;
        Ok(CredentialName(s.to_owned()))
    }

    /// [`parse`](Self::parse) that keeps the caller's `String` (no copy): the edge parses
    /// the name it took out of a request this way, once, and passes it down.
    pub fn parse_owned(s: String, max_len: usize) -> Result<Self, NameError> {
        check(&s, max_len)?;
        Ok(CredentialName(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

fn check(s: &str, max_len: usize) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError("credential name must not be empty".into()));
    }
    if s.len() > max_len {
        return Err(NameError(format!("credential name is {} bytes; the limit is {max_len}", s.len())));
    }
    for segment in s.split('/') {
        check_segment(segment, s)?;
    }
    Ok(())
}

/// What the vault's operations take as a name: text, checked when the operation starts,
/// or a [`CredentialName`] parsed already, which is only checked against the length
/// limit again (a comparison), never re-validated or copied.
pub trait NameArg {
    fn to_name(&self, max_len: usize) -> Result<Cow<'_, CredentialName>, NameError>;
}

impl NameArg for str {
    fn to_name(&self, max_len: usize) -> Result<Cow<'_, CredentialName>, NameError> {
        CredentialName::parse(self, max_len).map(Cow::Owned)
    }
}

impl NameArg for String {
    fn to_name(&self, max_len: usize) -> Result<Cow<'_, CredentialName>, NameError> {
        self.as_str().to_name(max_len)
    }
}

impl NameArg for CredentialName {
    fn to_name(&self, max_len: usize) -> Result<Cow<'_, CredentialName>, NameError> {
        if self.0.len() > max_len {
            return Err(NameError(format!("credential name is {} bytes; the limit is {max_len}", self.0.len())));
        }
        Ok(Cow::Borrowed(self))
    }
}

impl<T: NameArg + ?Sized> NameArg for &T {
    fn to_name(&self, max_len: usize) -> Result<Cow<'_, CredentialName>, NameError> {
        (**self).to_name(max_len)
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

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A valid name: 1 to 6 segments of the allowed charset, none `.` or `..`.
        fn valid_name() -> impl Strategy<Value = String> {
            let segment = "[A-Za-z0-9._-]{1,12}".prop_filter("not . or ..", |s| s != "." && s != "..");
            prop::collection::vec(segment, 1..6).prop_map(|v| v.join("/"))
        }

        proptest! {
            #[test]
            fn arbitrary_input_never_panics_and_errors_are_printable(
                bytes in prop::collection::vec(any::<u8>(), 0..300),
                max in 0usize..300,
            ) {
                let s = String::from_utf8_lossy(&bytes);
                for e in [CredentialName::parse(&s, max).err(), check_prefix(&s, max).err()].into_iter().flatten() {
                    // Messages reach logs and audit rows: no raw control characters.
                    prop_assert!(!e.0.chars().any(char::is_control), "{:?}", e.0);
                }
            }

            #[test]
            fn arbitrary_unicode_never_panics(s in "\\PC{0,80}|[\\x00-\\x7f]{0,80}") {
                let _ = CredentialName::parse(&s, 256);
                let _ = check_prefix(&s, 256);
            }

            #[test]
            fn what_parses_has_the_documented_shape(s in "[A-Za-z0-9._/~*-]{0,40}") {
                if let Ok(n) = CredentialName::parse(&s, 256) {
                    let t = n.as_str();
                    prop_assert_eq!(t, s.as_str());
                    prop_assert!(!t.is_empty() && !t.starts_with('/') && !t.ends_with('/') && !t.contains("//"));
                    prop_assert!(t.split('/').all(|seg| seg != "." && seg != ".."));
                    prop_assert!(t.bytes().all(|b| b == b'/' || allowed(b)) && t.bytes().all(|b| b < b'~'));
                }
            }

            #[test]
            fn valid_names_parse_and_every_start_of_one_is_a_prefix(name in valid_name()) {
                prop_assert_eq!(CredentialName::parse(&name, 256).map(|n| n.as_str().to_owned()), Ok(name.clone()));
                for cut in 0..=name.len() {
                    prop_assert!(check_prefix(&name[..cut], 256).is_ok(), "{:?}", &name[..cut]);
                }
                let limit = name.len() - 1;
                prop_assert!(CredentialName::parse(&name, limit).is_err(), "length limit ignored");
            }
        }
    }
}
