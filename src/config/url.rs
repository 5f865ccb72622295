//! The database URL: a newtype whose `Debug` hides the password.

use std::fmt;

use serde::Deserialize;

/// A database URL whose `Debug` hides any password.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        DatabaseUrl(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A `postgres://` URL without a password gets `password` (percent-encoded); any
    /// other URL is returned as it is.
    pub fn with_default_password(&self, password: &str) -> DatabaseUrl {
        let u = &self.0;
        let Some(s) = ["postgres://", "postgresql://"].iter().find(|p| u.starts_with(**p)).map(|p| p.len()) else {
            return self.clone();
        };
        let authority_end = u[s..].find(['/', '?']).map_or(u.len(), |i| s + i);
        // No user: an empty one keeps the driver's default (PGUSER, else the OS user).
        let at = u[s..authority_end].rfind('@').map_or(s, |i| s + i);
        if u[s..at].contains(':') {
            return self.clone();
        }
        let mut encoded = String::with_capacity(password.len() * 3);
        for b in password.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                encoded.push(char::from(b));
            } else {
                const HEX: &[u8; 16] = b"0123456789ABCDEF";
                encoded.extend(['%', char::from(HEX[usize::from(b >> 4)]), char::from(HEX[usize::from(b & 15)])]);
            }
        }
        let rest = if at == s { format!("@{}", &u[s..]) } else { u[at..].to_owned() };
        let out = DatabaseUrl(format!("{}:{encoded}{rest}", &u[..at]));
        zeroize::Zeroize::zeroize(&mut encoded);
        out
    }

    /// The URL with its password replaced by `REDACTED`.
    pub fn redacted(&self) -> String {
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let userinfo = &self.0[s + 3..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let masked = if userinfo.contains(':') { format!("{user}:REDACTED") } else { user.to_owned() };
                format!("{}{masked}{}", &self.0[..s + 3], &self.0[at..])
            }
            _ => self.0.clone(),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}
